"""Inference and deployment: predictions for image files from any promptkd checkpoint, and a self-contained export.

A PromptKD student predicts with its image tower, prompts, projector and the stored teacher features only (no text
encoder, no teacher). Other methods' checkpoints rebuild their backbone from the checkpoint's config. ``export``
writes the PromptKD student as one TorchScript file plus its class names and preprocessing, and checks that the
exported file gives the same predictions as the method it came from.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from promptkd.backbones.onnx_attention import export_friendly
from promptkd.checkpoints import atomic_path, atomic_write_text, load_checkpoint
from promptkd.errors import PromptKDError

logger = logging.getLogger(__name__)


class DeployError(PromptKDError, ValueError):
    pass


#: distilled students: inference from their checkpoint and the stored teacher features alone
STUDENT_METHODS = ("promptkd", "promptkd_timm")


def _distilled(meta: dict) -> bool:
    """A student, or DPC over one: inference from the checkpoint and the stored teacher features."""
    if meta.get("method") == "dpc":
        return (meta.get("base_checkpoint") or {}).get("method") in STUDENT_METHODS
    return meta.get("method") in STUDENT_METHODS


def load_for_inference(
    checkpoint: str | Path, features: str | Path | None = None, *, device: str = "cpu", precision: str = "fp32"
):
    """The method a checkpoint describes, ready for ``logits`` (PromptKD students need no teacher)."""
    from promptkd.backbones import load_recorded_backbone
    from promptkd.methods import get_method
    from promptkd.methods.base import config_from

    _, meta = load_checkpoint(checkpoint)
    name = meta.get("method")
    if name in STUDENT_METHODS or (name == "dpc" and (features is None or _distilled(meta))):
        return get_method(name).from_checkpoint(checkpoint, features, device=device, precision=precision)
    if features is not None:
        raise DeployError(f"--features applies to promptkd students only; {checkpoint} is a {name!r} checkpoint.")
    classnames = meta.get("classnames")
    if not classnames:
        raise DeployError(f"{checkpoint}: the checkpoint records no class names; it cannot predict classes.")
    backbone = load_recorded_backbone(meta.get("backbone") or {}, device=device, precision=precision)
    method_cls = get_method(name)
    method = method_cls(backbone, list(classnames), config_from(method_cls, meta.get("method_config")))
    method.load(checkpoint)
    method.to(device)
    method.eval()
    return method


def iter_image_paths(sources: Sequence[str | Path]) -> Iterator[str]:
    """Files, folders (any nesting) and text files listing one path per line, in the order given, one at a time:
    a folder of a million images is walked lazily (one folder's listing at a time), never listed whole."""
    from promptkd.data.items import is_image_file

    for source in sources:
        source = Path(source)
        if source.is_dir():
            yield from _walk_images(str(source.absolute()))
        elif source.suffix.lower() in (".txt", ".lst", ".list"):
            yield from _listed_paths(source)
        elif source.is_file() and is_image_file(source.name):
            yield str(source)
        else:
            raise DeployError(f"{source}: not an image, a folder of images or a .txt list of image paths.")


def _walk_images(folder: str) -> Iterator[str]:
    """Image files below ``folder``, depth first, each folder's entries sorted; hidden files and folders skipped."""
    from promptkd.data.items import is_image_file

    try:
        entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
    except OSError as error:
        raise DeployError(f"{folder}: cannot be listed ({error.strerror or error}).") from None
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            yield from _walk_images(entry.path)
        elif is_image_file(entry.name):
            yield entry.path


def _listed_paths(source: Path) -> Iterator[str]:
    """The paths a list file names, read line by line (relative ones are relative to the list's folder)."""
    try:
        with open(source, encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    path = Path(line.strip())
                    yield str(path if path.is_absolute() else source.parent / path)
    except UnicodeDecodeError:
        raise DeployError(
            f"{source}: not UTF-8 text; save the list as UTF-8 (e.g. iconv -f latin1 -t utf-8)."
        ) from None
    except OSError as error:
        raise DeployError(f"{source}: cannot be read ({error.strerror or error}).") from None


def image_paths(sources: Sequence[str | Path]) -> list[str]:
    """All of :func:`iter_image_paths` as a list (for the few images of an export check or a demo)."""
    paths = list(iter_image_paths(sources))
    if not paths:
        raise DeployError("no images to predict.")
    return paths


def count_images(sources: Sequence[str | Path]) -> int:
    """How many images ``sources`` name (one walk, nothing held): the progress bar's total, and every source is
    checked here, in this process, before any loader worker starts."""
    total = sum(1 for _ in iter_image_paths(sources))
    if not total:
        raise DeployError(f"no images in {', '.join(str(s) for s in sources)}; give image files or folders of them.")
    return total


@dataclass
class Prediction:
    """Top-k of one image: class names, their rows in the class list (``indices``: the only way to tell apart names
    a list repeats, e.g. ImageNet's two 'missile' rows) and softmax scores; ``repeated``: names used twice or more."""

    path: str
    classes: list[str]
    scores: list[float]
    indices: list[int] = field(default_factory=list)
    repeated: frozenset[str] = frozenset()

    def label(self, rank: int = 0) -> str:
        """The class at ``rank`` as a user reads it: its name, plus ``[#row]`` when the list repeats that name."""
        name = self.classes[rank]
        if name in self.repeated and rank < len(self.indices):
            return f"{name} [#{self.indices[rank]}]"
        return name


def repeated_names(classnames: Sequence[str]) -> frozenset[str]:
    """Names a class list holds more than once."""
    seen: set[str] = set()
    return frozenset(n for n in classnames if n in seen or seen.add(n))


# --- decoding: batches of images, decoded in loader workers, in order -----------------------------------------------
@dataclass
class DecodedBatch:
    """One batch as the loader hands it over: the images that decoded (stacked), their paths, and the files that
    did not decode with the reason (the caller refuses or counts them: a worker cannot print one clean message)."""

    images: torch.Tensor | None
    paths: list[str]
    bad: list[tuple[str, str]]


def _decode(paths: Sequence[str], transform) -> DecodedBatch:
    from promptkd.data.items import DataError, load_rgb
    from promptkd.data.transforms import BatchNormalized

    batched = BatchNormalized.of(transform)
    per_image = batched.per_image if batched is not None else transform
    images, good, bad = [], [], []
    for path in paths:
        try:
            images.append(per_image(load_rgb(path)))
            good.append(path)
        except DataError as error:
            bad.append((path, error.problem))
    if not images:
        return DecodedBatch(None, good, bad)
    return DecodedBatch(batched.stack(images) if batched is not None else torch.stack(images), good, bad)


class _BatchedImages(torch.utils.data.IterableDataset):
    """Batches of decoded images from a lazy path iterator. Worker ``w`` of ``n`` decodes batches w, w + n, ...; the
    DataLoader asks its workers in turn, so the batches come back in input order and each path is read once."""

    def __init__(self, sources: Sequence[str | Path], transform, batch_size: int, *, expand: bool = True):
        self.sources, self.transform, self.batch_size, self.expand = list(sources), transform, batch_size, expand

    def __iter__(self) -> Iterator[DecodedBatch]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        paths = iter_image_paths(self.sources) if self.expand else iter(str(s) for s in self.sources)
        for number, chunk in enumerate(_chunks(paths, self.batch_size)):
            if number % workers == worker:
                yield _decode(chunk, self.transform)


def _chunks(items: Iterator[str], size: int) -> Iterator[list[str]]:
    while chunk := list(itertools.islice(items, size)):
        yield chunk


def _as_is(batch: DecodedBatch) -> DecodedBatch:
    return batch


def decoded_batches(
    sources: Sequence[str | Path], transform, *, batch_size: int, workers: int = 0, expand: bool = True
) -> Iterator[DecodedBatch]:
    """Decoded batches in input order; ``workers`` > 0 decode in that many processes (a few batches ahead)."""
    dataset = _BatchedImages(sources, transform, batch_size, expand=expand)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, num_workers=workers, collate_fn=_as_is, prefetch_factor=2 if workers else None
    )
    return iter(loader)


# --- predictors: a promptkd method in PyTorch, or an exported student in ONNX Runtime ---------------------------------
class TorchPredictor:
    """Logits of a promptkd method (any checkpoint :func:`load_for_inference` reads), with a student's stored
    calibration of added classes applied, as ``promptkd predict`` always did."""

    def __init__(self, method):
        from promptkd.data.transforms import build_transform
        from promptkd.distill.extend import calibrator

        self.method = method
        self.classnames = list(method.classnames)
        self.transform = build_transform(method.backbone.preprocess, train=False)
        self.device = next(method.clip.parameters()).device
        self.calibrate = calibrator(method)

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        with self.method.backbone.autocast():
            return self.calibrate(self.method.logits(images.to(self.device)).float()).cpu()


class OnnxPredictor:
    """An exported student folder (``promptkd export --format onnx``, int8 or not) run by ONNX Runtime: no torch
    model is built, torch only prepares the images (the preprocessing export.json records)."""

    def __init__(self, folder: str | Path, *, threads: int = 0, beside_decoders: bool = False):
        """``beside_decoders``: images are decoded in other processes on the same cores, so ONNX Runtime's threads
        sleep between runs instead of spinning (spinning took the decoders' cores: the world's CNN student at batch
        256 with one decoder, 4,200 -> 6,200 images/s)."""
        from promptkd.backbones.types import PreprocessInfo
        from promptkd.data.transforms import build_transform

        folder = Path(folder)
        self.manifest = read_export(folder, formats=("onnx",))
        ort = _onnxruntime()
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        if beside_decoders:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(folder / self.manifest["model_file"]), options)
        self.classnames = json.loads((folder / self.manifest["classnames_file"]).read_text(encoding="utf-8"))
        self.transform = build_transform(PreprocessInfo(**_preprocess(self.manifest)), train=False)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {"images": images.numpy()})[0])


def _preprocess(manifest: dict) -> dict:
    info = dict(manifest["input"]["preprocess"])
    info["mean"], info["std"] = tuple(info["mean"]), tuple(info["std"])
    return info


def read_export(folder: str | Path, formats: Sequence[str] = ("torchscript", "onnx")) -> dict:
    """export.json of an export folder, checked: a folder that is not one is refused by name, with what to run."""
    folder = Path(folder)
    manifest_path = folder / "export.json"
    if not folder.is_dir() or not manifest_path.is_file():
        raise DeployError(
            f"{folder}: not an export folder (no export.json); create one with `promptkd export CHECKPOINT --format "
            "onnx --out DIR`, or predict from the checkpoint itself with --engine torch."
        )
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        fmt, model_file = manifest["format"], manifest["model_file"]
    except (ValueError, KeyError, TypeError):
        raise DeployError(f"{manifest_path}: not an export.json written by `promptkd export`; export again.") from None
    if fmt not in formats:
        raise DeployError(
            f"{folder}: a {fmt} export; this needs one of {', '.join(formats)} (promptkd export --format)."
        )
    for name in (model_file, manifest.get("classnames_file", "classnames.json")):
        if not (folder / name).is_file():
            raise DeployError(f"{folder}: export.json names {name}, which is missing; export the student again.")
    return manifest


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise DeployError("ONNX needs onnx and onnxruntime: pip install 'promptkd[onnx]'") from None
    return onnxruntime


# --- predict: batches in, rows out, nothing held -------------------------------------------------------------------
@dataclass
class PredictStats:
    """What a streamed prediction saw: images predicted, and the unreadable ones skipped (with ``skip_bad``)."""

    predicted: int = 0
    skipped: list[str] = field(default_factory=list)


def iter_predictions(
    predictor,
    sources: Sequence[str | Path],
    *,
    top_k: int = 5,
    batch_size: int = 64,
    workers: int = 0,
    skip_bad: bool = False,
    progress: bool = True,
    total: int | None = None,
    expand: bool = True,
    stats: PredictStats | None = None,
) -> Iterator[list[Prediction]]:
    """Top-k predictions batch by batch, in input order; an image that does not decode stops it with one message
    naming the file, or (``skip_bad``) is counted in ``stats.skipped`` and left out."""
    stats = stats if stats is not None else PredictStats()
    k = min(top_k, len(predictor.classnames))
    repeated = repeated_names(predictor.classnames)
    batches = decoded_batches(sources, predictor.transform, batch_size=batch_size, workers=workers, expand=expand)
    with tqdm(total=total, desc="predicting", unit="img", disable=not progress, leave=False) as bar:
        for batch in batches:
            if batch.bad and not skip_bad:
                path, problem = batch.bad[0]
                raise DeployError(
                    f"{path}: cannot decode this image ({problem}); replace or remove it, or skip and count "
                    "unreadable images with --skip-bad."
                )
            for path, problem in batch.bad:
                logger.warning("skipping unreadable image %s (%s)", path, problem)
            stats.skipped.extend(path for path, _ in batch.bad)
            bar.update(len(batch.paths) + len(batch.bad))
            if batch.images is None:
                continue
            scores, classes = predictor.logits(batch.images).float().softmax(-1).topk(k, dim=-1)
            stats.predicted += len(batch.paths)
            yield [
                Prediction(path, [predictor.classnames[c] for c in row], row_scores, list(row), repeated)
                for path, row_scores, row in zip(batch.paths, scores.tolist(), classes.tolist())
            ]


def predict(
    method,
    paths: Sequence[str],
    *,
    top_k: int = 5,
    batch_size: int = 64,
    skip_bad: bool = False,
    progress: bool = True,
    workers: int = 0,
) -> tuple[list[Prediction], list[str]]:
    """Top-k classes and softmax scores of a few images, as a list (``promptkd predict`` streams instead);
    unreadable images raise, or are skipped and returned."""
    stats = PredictStats()
    batches = iter_predictions(
        TorchPredictor(method),
        list(paths),
        top_k=top_k,
        batch_size=batch_size,
        workers=workers,
        skip_bad=skip_bad,
        progress=progress,
        total=len(paths),
        expand=False,
        stats=stats,
    )
    out = [p for batch in batches for p in batch]
    return out, stats.skipped


class PredictionsCSV:
    """The predictions CSV, written row batch by row batch into a temporary file that replaces ``path`` only once
    every image is done (an interrupted run leaves the previous file, never half of one)."""

    def __init__(self, path: str | Path, k: int):
        self.path = Path(path)
        self.header = ["path"] + [f"{kind}_{r}" for r in range(1, k + 1) for kind in ("class", "index", "score")]

    def __enter__(self) -> PredictionsCSV:
        self._atomic = atomic_path(self.path)
        tmp = self._atomic.__enter__()
        self._handle = open(tmp, "w", newline="", encoding="utf-8")
        self._writer = csv.writer(self._handle)
        self._writer.writerow(self.header)
        return self

    def write(self, predictions: Sequence[Prediction]) -> None:
        for p in predictions:
            row: list[str] = [p.path]
            for rank, (c, s) in enumerate(zip(p.classes, p.scores)):
                row += [c, str(p.indices[rank]) if rank < len(p.indices) else "", f"{s:.6f}"]
            self._writer.writerow(row)

    def __exit__(self, *exc) -> bool | None:
        self._handle.close()
        return self._atomic.__exit__(*exc)


def write_predictions_csv(predictions: Sequence[Prediction], path: str | Path) -> Path:
    k = max((len(p.classes) for p in predictions), default=0)
    with PredictionsCSV(path, k) as out:
        out.write(predictions)
    return Path(path)


# --- export ---------------------------------------------------------------------------------------------------------
EXPORT_MODEL = "student.torchscript.pt"


#: static int8 quantisation by ONNX Runtime (chosen over PyTorch's dynamic int8 by measurement: see export_int8)
INT8_METHOD = "onnxruntime static, QDQ, int8 per-channel weights, uint8 activations, MinMax calibration"
#: calibration images taken by default, and the agreement an int8 student must reach with the fp32 one
CALIBRATION_COUNT = 64
MIN_AGREEMENT = 0.99


@dataclass
class CheckImages:
    """Images for an int8 export: ``calibration`` (unlabelled), ``check`` (compared fp32 vs int8), their labels in
    the student's class list when known (``labels``) and the base classes when the base/novel split is (``base``)."""

    source: str
    calibration: list[str]
    check: list[str]
    labels: list[int] | None = None
    base: list[int] | None = None


def calibration_images(source: str, classnames: Sequence[str], count: int = CALIBRATION_COUNT) -> CheckImages:
    """A folder of unlabelled images (calibrate on ``count`` spread through it, check on up to 4x as many), or a
    dataset name (calibrate on its train images, check on its test split: accuracy, and HM when its classes are the
    student's; base = the first half of the classes, as base-to-novel splits them)."""
    from promptkd.data.datasets import resolve_dataset
    from promptkd.data.sampling import base_new_labels

    if Path(source).is_dir():
        paths = image_paths([source])
        return CheckImages(source, _spread(paths, count), _spread(paths, 4 * count))
    splits = resolve_dataset(source, None)
    train = [d.path for d in splits.train] or [d.path for d in splits.test]
    test = _spread(list(splits.test), 4 * count)
    same = list(splits.classnames) == list(classnames)
    labels = [d.label for d in test] if same else None
    base = base_new_labels({d.label for d in splits.train})[0] if same and splits.train else None
    return CheckImages(source, _spread(train, count), [d.path for d in test], labels, base)


def _spread(items: list, count: int) -> list:
    """``count`` items evenly spread through ``items`` (a sorted folder is grouped by class: the first ``count``
    would be one class)."""
    if len(items) <= count:
        return list(items)
    return [items[i * len(items) // count] for i in range(count)]


@torch.no_grad()
def export_student(
    checkpoint: str | Path,
    out_dir: str | Path,
    features: str | Path | None = None,
    *,
    check_images: Sequence[str] | None = None,
    fmt: str = "torchscript",
    quantize: str | None = None,
    calibration: str | CheckImages | None = None,
    calibration_count: int = CALIBRATION_COUNT,
    min_agreement: float = MIN_AGREEMENT,
) -> dict:
    """Write the deployable PromptKD student (TorchScript, ONNX or int8 ONNX) + class names + preprocessing, checked
    first: every file is made in a staging folder and moved into ``out_dir`` only once the checks pass, so a refused
    export writes nothing and leaves a previous export there whole."""
    from promptkd.methods import get_method

    _, meta = load_checkpoint(checkpoint)
    if not _distilled(meta):
        raise DeployError(
            f"{checkpoint}: export is for promptkd students; this is a {meta.get('method')!r} "
            "checkpoint (use `promptkd predict` with the checkpoint itself)."
        )
    if fmt not in ("torchscript", "onnx"):
        raise DeployError(f"unknown export format {fmt!r}; expected torchscript or onnx")
    if quantize not in (None, "int8") or (quantize and fmt != "onnx"):
        raise DeployError(f"--quantize {quantize} writes an ONNX model; use --format onnx (got {fmt}).")
    if quantize and calibration is None:
        raise DeployError("--quantize int8 needs images to calibrate on: --calibration FOLDER_OR_DATASET.")
    method = get_method(meta["method"]).from_checkpoint(checkpoint, features)
    if isinstance(calibration, str | Path):
        calibration = calibration_images(str(calibration), method.classnames, calibration_count)
    module, calibrated = _with_calibration(method, method.deployable().eval())
    size = method.backbone.image_size
    images = check_images or (calibration.check if calibration else None)
    probe = _probe_images(method, images, size)
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as staging:
        stage = Path(staging)
        target, check = _write_checked(module, probe, stage, fmt)
        manifest = {
            "format": fmt,
            "model_file": target.name,
            "input": {"shape": [None, 3, size, size], "preprocess": asdict(method.backbone.preprocess)},
            "classnames_file": "classnames.json",
            "source_checkpoint": str(checkpoint),
            "calibration": "folded into the logits" if calibrated else None,
            "check": check,
        }
        if quantize:
            target, manifest["quantization"] = export_int8(method, module, target, calibration, min_agreement)
            manifest["model_file"] = target.name
            (stage / "student.onnx").unlink()
        atomic_write_text(stage / "classnames.json", json.dumps(method.classnames, indent=1) + "\n")
        atomic_write_text(stage / "export.json", json.dumps(manifest, indent=2) + "\n")
        out.mkdir(parents=True, exist_ok=True)
        for name in (manifest["model_file"], "classnames.json", "export.json"):  # export.json last: it names the rest
            os.replace(stage / name, out / name)
    return manifest


def _write_checked(module: torch.nn.Module, probe: torch.Tensor, stage: Path, fmt: str) -> tuple[Path, dict]:
    """The model file in ``stage``, reloaded by its own runtime and compared with ``module`` on ``probe``."""
    expected = module(probe)
    if fmt == "torchscript":
        target = stage / EXPORT_MODEL
        torch.jit.trace(module, probe[:1], check_trace=False).save(str(target))
        got = torch.jit.load(str(target))(probe)
    else:
        ort = _onnxruntime()
        target = stage / "student.onnx"
        _export_onnx(module, probe, target)
        session = ort.InferenceSession(str(target))
        got = torch.from_numpy(session.run(None, {"images": probe.numpy()})[0])
    same_top1 = bool(torch.equal(expected.argmax(-1), got.argmax(-1)))
    max_diff = float((expected - got).abs().max())
    if not same_top1 or max_diff > 1e-3:
        raise DeployError(
            f"the exported model disagrees with the method (same top-1: {same_top1}, max |diff| {max_diff:.2e}); "
            "nothing was written."
        )
    return target, {"images": int(probe.shape[0]), "same_top1": same_top1, "max_abs_logit_diff": max_diff}


def export_int8(
    method, module: torch.nn.Module, fp32: Path, images: CheckImages, min_agreement: float
) -> tuple[Path, dict]:
    """``fp32`` quantised to int8 by ONNX Runtime's static quantisation, calibrated on ``images.calibration``, and
    compared with the fp32 student on ``images.check``; refused (DeployError, with the figure) below
    ``min_agreement``.

    Why ONNX Runtime static and not PyTorch's int8: on the world student (2-core AMD EPYC, AVX-512 VNNI) PyTorch's
    dynamic int8 Linear agreed on 97.8% of the test images with the fp32 student but ran at 1.3x PyTorch fp32 and
    0.55x ONNX Runtime fp32, and it cannot be written as ONNX; ONNX Runtime static int8 agreed on 96.9-97.4%, ran at
    ~0.8-1.0x ONNX Runtime fp32 on this tiny student and faster on ViT-B/16 (benchmarks/e2e_deploy.py), and is
    one file any ONNX runtime loads. The final logits product (image features x stored class features, times the
    logit scale) stays fp32: it sets the top-1 and costs little.
    """
    calibration = _probe_images(method, images.calibration, method.backbone.image_size, limit=None)
    check = _probe_images(method, images.check, method.backbone.image_size, limit=None)
    target = fp32.with_name("student.int8.onnx")
    _quantize_static(fp32, target, calibration)
    expected = module(check)
    got = int8_logits(target, check)
    report = {
        "method": INT8_METHOD,
        "calibration": {
            "source": images.source,
            "images": len(images.calibration),
            "sha256": _files_hash(images.calibration),
        },
        "check": _int8_check(expected, got, images),
        "min_agreement": min_agreement,
    }
    agreement = report["check"]["top1_agreement"]
    if agreement < min_agreement:
        raise DeployError(
            f"the int8 student agrees with the fp32 student on {100 * agreement:.2f}% of {len(images.check)} images "
            f"(top-1), below --min-agreement {min_agreement:g}; nothing was written. Calibrate on images like those "
            "it will see (--calibration), use the fp32 ONNX export, or lower --min-agreement if this is enough."
        )
    return target, report


def int8_logits(model: Path, images: torch.Tensor) -> torch.Tensor:
    """The int8 model's logits (a seam: tests replace it to make a model that disagrees)."""
    session = _onnxruntime().InferenceSession(str(model))
    return torch.cat([torch.from_numpy(session.run(None, {"images": x.numpy()})[0]) for x in images.split(64)])


def _quantize_static(fp32: Path, target: Path, calibration: torch.Tensor) -> None:
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(calibration.split(32))

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {"images": batch.numpy()}

    prepared = fp32.with_name("student.prepared.onnx")
    quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)  # the prompted tower defeats the symbolic one
    products = [n.name for n in onnx.load(str(prepared)).graph.node if n.op_type in ("MatMul", "Gemm", "Conv")]
    quantize_static(
        str(prepared),
        str(target),
        Batches(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        op_types_to_quantize=["MatMul", "Gemm", "Conv"],
        nodes_to_exclude=products[-1:],  # the logits product (nodes are in topological order)
    )
    prepared.unlink()


def _int8_check(expected: torch.Tensor, got: torch.Tensor, images: CheckImages) -> dict:
    """Top-1 agreement; with labels the accuracy of each, with the class split the HM of each (base images scored
    among the base classes, novel among the novel ones)."""
    from promptkd.evaluation.metrics import harmonic_mean

    check: dict = {"images": int(expected.shape[0])}
    check["top1_agreement"] = float((expected.argmax(-1) == got.argmax(-1)).float().mean())
    if images.labels is None:
        return check
    labels = torch.tensor(images.labels)
    for name, logits in (("fp32", expected), ("int8", got)):
        check[f"accuracy_{name}"] = float((logits.argmax(-1) == labels).float().mean())
        if images.base is not None:
            halves = []
            for group in (images.base, [c for c in range(logits.shape[1]) if c not in set(images.base)]):
                rows = torch.tensor([label in group for label in images.labels])
                if not rows.any():
                    break
                sub = logits[rows][:, group].argmax(-1)
                halves.append(float((torch.tensor(group)[sub] == labels[rows]).float().mean()))
            if len(halves) == 2:
                check[f"hm_{name}"] = harmonic_mean(*halves)
    check["accuracy_difference"] = check["accuracy_int8"] - check["accuracy_fp32"]
    if "hm_fp32" in check and "hm_int8" in check:
        check["hm_difference"] = check["hm_int8"] - check["hm_fp32"]
    return check


def _files_hash(paths: Sequence[str]) -> str:
    """The calibration images bound by content (their bytes, in order), not by their names."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()


class _CalibratedLogits(torch.nn.Module):
    """The student's logits times a per-class scale plus a per-class bias: a stored calibration of classes added
    after distillation, carried into the exported model so it predicts as ``promptkd predict`` does."""

    def __init__(self, student: torch.nn.Module, scale: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.student = student
        self.register_buffer("scale", scale.float().clone())
        self.register_buffer("bias", bias.float().clone())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.student(images) * self.scale + self.bias


def _with_calibration(method, module: torch.nn.Module) -> tuple[torch.nn.Module, bool]:
    """``module`` with the student's stored calibration folded in (checked as ``predict`` checks it), if it has one."""
    from promptkd.distill.extend import calibrator

    calibrate = calibrator(method)
    ones = torch.ones(1, len(method.classnames))
    scale, bias = calibrate(ones) - calibrate(torch.zeros_like(ones)), calibrate(torch.zeros_like(ones))
    if torch.equal(scale, ones) and not bias.any():
        return module, False
    return _CalibratedLogits(module, scale[0], bias[0]).eval(), True


def _export_onnx(module: torch.nn.Module, probe: torch.Tensor, target: Path) -> None:
    """The legacy (TorchScript-based) exporter: it handles the prompted towers; batch size stays dynamic. Attention is
    written for export first (:func:`promptkd.backbones.onnx_attention.export_friendly`: ~1.6x ONNX Runtime speed on
    the world student, same outputs)."""
    friendly, _ = export_friendly(module)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # an attention left as it was: the fused kernel has no ONNX form
    try:
        torch.onnx.export(
            friendly,
            (probe[:1],),
            str(target),
            input_names=["images"],
            output_names=["logits"],
            dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
            dynamo=False,
        )
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def _probe_images(method, check_images: Sequence[str] | None, size: int, limit: int | None = 64) -> torch.Tensor:
    if check_images:
        from promptkd.data.items import ImageDataset
        from promptkd.data.transforms import build_transform

        dataset = ImageDataset(list(check_images)[:limit], build_transform(method.backbone.preprocess, train=False))
        return torch.stack([dataset[i][0] for i in range(len(dataset))])
    return torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(0))


class ExportedStudent:
    """Loads an export folder: ``predict(images)`` with the TorchScript model and its class names."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        manifest_path = folder / "export.json"
        if not manifest_path.is_file():
            raise DeployError(f"{folder}: no export.json; create the folder with `promptkd export`.")
        self.manifest = json.loads(manifest_path.read_text())
        if self.manifest["format"] != "torchscript":
            raise DeployError(f"{folder}: an {self.manifest['format']} export; load it with its own runtime.")
        self.model = torch.jit.load(str(folder / self.manifest["model_file"]))
        self.classnames = json.loads((folder / self.manifest["classnames_file"]).read_text())

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)
