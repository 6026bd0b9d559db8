"""Inference and deployment: predictions for image files from any promptkd checkpoint, and a self-contained export.

A PromptKD student predicts with its image tower, prompts, projector and the stored teacher features only (no text
encoder, no teacher). Other methods' checkpoints rebuild their backbone from the checkpoint's config. ``export``
writes the PromptKD student as one TorchScript file plus its class names and preprocessing, and checks that the
exported file gives the same predictions as the method it came from.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from promptkd.checkpoints import atomic_path, atomic_write_text, load_checkpoint
from promptkd.errors import PromptKDError

logger = logging.getLogger(__name__)


class DeployError(PromptKDError, ValueError):
    pass


#: distilled students: inference from their checkpoint and the stored teacher features alone
STUDENT_METHODS = ("promptkd", "promptkd_timm")


def load_for_inference(
    checkpoint: str | Path, features: str | Path | None = None, *, device: str = "cpu", precision: str = "fp32"
):
    """The method a checkpoint describes, ready for ``logits`` (PromptKD students need no teacher)."""
    from promptkd.backbones import load_recorded_backbone
    from promptkd.methods import get_method
    from promptkd.methods.base import config_from

    _, meta = load_checkpoint(checkpoint)
    name = meta.get("method")
    if name in STUDENT_METHODS:
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


def image_paths(sources: Sequence[str | Path]) -> list[str]:
    """Files, folders (any nesting) and text files listing one path per line, in the order given."""
    from promptkd.data.items import is_image_file
    from promptkd.data.userdata import unlabeled_folder

    paths: list[str] = []
    for source in sources:
        source = Path(source)
        if source.is_dir():
            paths.extend(unlabeled_folder(source))
        elif source.suffix.lower() in (".txt", ".lst", ".list"):
            from promptkd.data.userdata import read_text

            base = source.parent
            for line in read_text(str(source), "image list").splitlines():
                if line.strip():
                    path = Path(line.strip())
                    paths.append(str(path if path.is_absolute() else base / path))
        elif source.is_file() and is_image_file(source.name):
            paths.append(str(source))
        else:
            raise DeployError(f"{source}: not an image, a folder of images or a .txt list of image paths.")
    if not paths:
        raise DeployError("no images to predict.")
    return paths


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


@torch.no_grad()
def predict(
    method, paths: Sequence[str], *, top_k: int = 5, batch_size: int = 64, skip_bad: bool = False, progress: bool = True
) -> tuple[list[Prediction], list[str]]:
    """Top-k classes and softmax scores per image; unreadable images raise, or are skipped and returned."""
    from promptkd.data.items import ImageDataset
    from promptkd.data.transforms import build_transform
    from promptkd.distill.extend import calibrator

    dataset = ImageDataset(
        list(paths), build_transform(method.backbone.preprocess, train=False), skip_bad=skip_bad, return_index=True
    )
    if skip_bad:
        dataset.verify()  # drop unreadable images up front, so none is replaced by a neighbour's prediction
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
    device = next(method.clip.parameters()).device
    calibrate = calibrator(method)  # a student's stored calibration of added classes (features calibrate), if any
    k = min(top_k, len(method.classnames))
    repeated = repeated_names(method.classnames)
    out: list[Prediction] = []
    for images, _, index in tqdm(loader, desc="predicting", disable=not progress, leave=False):
        with method.backbone.autocast():
            logits = calibrate(method.logits(images.to(device)).float())
        scores, classes = logits.softmax(-1).topk(k, dim=-1)
        for i, row_scores, row_classes in zip(index.tolist(), scores.tolist(), classes.tolist()):
            names = [method.classnames[c] for c in row_classes]
            out.append(Prediction(dataset.path(i), names, row_scores, list(row_classes), repeated))
    return out, list(getattr(dataset, "skipped", []))


def write_predictions_csv(predictions: Sequence[Prediction], path: str | Path) -> Path:
    path = Path(path)
    k = max((len(p.classes) for p in predictions), default=0)
    header = ["path"] + [f"{kind}_{r}" for r in range(1, k + 1) for kind in ("class", "index", "score")]
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for p in predictions:
            row: list[str] = [p.path]
            for rank, (c, s) in enumerate(zip(p.classes, p.scores)):
                row += [c, str(p.indices[rank]) if rank < len(p.indices) else "", f"{s:.6f}"]
            writer.writerow(row)
    return path


# --- export ---------------------------------------------------------------------------------------------------------
EXPORT_MODEL = "student.torchscript.pt"


@torch.no_grad()
def export_student(
    checkpoint: str | Path,
    out_dir: str | Path,
    features: str | Path | None = None,
    *,
    check_images: Sequence[str] | None = None,
    fmt: str = "torchscript",
) -> dict:
    """Write the deployable PromptKD student (TorchScript or ONNX) + class names + preprocessing, and check it."""
    from promptkd.methods import get_method

    _, meta = load_checkpoint(checkpoint)
    if meta.get("method") not in STUDENT_METHODS:
        raise DeployError(
            f"{checkpoint}: export is for promptkd students; this is a {meta.get('method')!r} "
            "checkpoint (use `promptkd predict` with the checkpoint itself)."
        )
    method = get_method(meta["method"]).from_checkpoint(checkpoint, features)
    module, calibrated = _with_calibration(method, method.deployable().eval())
    size = method.backbone.image_size
    probe = _probe_images(method, check_images, size)
    expected = module(probe)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "torchscript":
        traced = torch.jit.trace(module, probe[:1], check_trace=False)
        target = out / EXPORT_MODEL
        with atomic_path(target) as tmp:
            traced.save(str(tmp))
        reloaded = torch.jit.load(str(target))
        got = reloaded(probe)
    elif fmt == "onnx":
        try:
            import onnxruntime as ort
        except ImportError as error:
            raise DeployError("ONNX export needs onnx and onnxruntime: pip install 'promptkd[onnx]'") from error
        target = out / "student.onnx"
        fastpath = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)  # the fused inference kernel has no ONNX form
        try:
            _export_onnx(module, probe, target)
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)
        session = ort.InferenceSession(str(target))
        got = torch.from_numpy(session.run(None, {"images": probe.numpy()})[0])
    else:
        raise DeployError(f"unknown export format {fmt!r}; expected torchscript or onnx")
    same_top1 = bool(torch.equal(expected.argmax(-1), got.argmax(-1)))
    max_diff = float((expected - got).abs().max())
    if not same_top1 or max_diff > 1e-3:
        raise DeployError(
            f"exported model disagrees with the method (same top-1: {same_top1}, max |diff| "
            f"{max_diff:.2e}); the export was written to {target} but should not be used."
        )
    atomic_write_text(out / "classnames.json", json.dumps(method.classnames, indent=1) + "\n")
    manifest = {
        "format": fmt,
        "model_file": target.name,
        "input": {"shape": [None, 3, size, size], "preprocess": asdict(method.backbone.preprocess)},
        "classnames_file": "classnames.json",
        "source_checkpoint": str(checkpoint),
        "calibration": "folded into the logits" if calibrated else None,
        "check": {"images": int(probe.shape[0]), "same_top1": same_top1, "max_abs_logit_diff": max_diff},
    }
    atomic_write_text(out / "export.json", json.dumps(manifest, indent=2) + "\n")
    return manifest


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
    """The legacy (TorchScript-based) exporter: it handles the prompted towers; batch size stays dynamic."""
    torch.onnx.export(
        module,
        (probe[:1],),
        str(target),
        input_names=["images"],
        output_names=["logits"],
        dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
        dynamo=False,
    )


def _probe_images(method, check_images: Sequence[str] | None, size: int) -> torch.Tensor:
    if check_images:
        from promptkd.data.items import ImageDataset
        from promptkd.data.transforms import build_transform

        dataset = ImageDataset(list(check_images)[:64], build_transform(method.backbone.preprocess, train=False))
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
