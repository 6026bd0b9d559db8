"""Writing the world to disk in the benchmarks' own layout, deterministically, idempotently and atomically.

Layout under ``root``::

    world.json                                   manifest (written last; its presence means "complete")
    <dataset>/images/<class_folder>/<nnnn>.png   for shapes, patterns, counts and shapes' test-only shifts
    <dataset>/split_zhou_<Name>.json             {"train"|"val"|"test": [[relpath, label, classname], ...]}
    pretrain/images/<class_folder>/<nnnn>.png
    pretrain/captions.jsonl                      {"image", "caption", "label", "classname"} per line
    retrieval/images/<nnnnnn>.png
    retrieval/captions_coco.json                 COCO captions format: "images" + "annotations"

Paths in split files and ``captions.jsonl`` are relative to the folder's ``images/``; COCO ``file_name`` is relative
to ``retrieval/images/``.

Rebuild policy: a finished world with the same parameters is reused as is; a world with different parameters
raises :class:`WorldMismatchError` unless ``overwrite=True`` (then it is replaced). A build happens in a hidden
sibling folder that is renamed onto ``root`` only when complete, so an interrupted build never leaves a world
that looks finished (the temporary folder is removed on error).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import multiprocessing
import os
import shutil
import struct
import sys
import time
import uuid
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from promptkd.data.world.render import render_attributes
from promptkd.data.world.spec import (
    FAMILIES,
    PRETRAIN_TEMPLATES,
    WORLD_DATASETS,
    WORLD_VOCABULARY,
    held_out_compositions,
    parse_classname,
    pretrain_attributes,
    pretrain_classnames,
    sample_captions,
)
from promptkd.errors import PromptKDError

logger = logging.getLogger(__name__)

# The world's version: any change to what a build writes (images, splits, datasets) bumps it, and a world or
# rendering of another version is refused or rebuilt. Version 4 replaced the test-only shifts (see render.py).
WORLD_VERSION = 4
# The world version that last changed what pre-training sees (corpus images and captions, vocabulary, held-out
# compositions). Weights pre-trained on any version from it to WORLD_VERSION saw exactly today's corpus and stay
# valid; PRETRAIN_DIGEST is that corpus's fingerprint (pretrain_digest), pinned by a test so that a change to it
# cannot pass without bumping PRETRAIN_VERSION (and re-making the shipped weights).
PRETRAIN_VERSION = 3
PRETRAIN_DIGEST = "159fcc7b837568a2d74d2a0009d2240417b916c5dc8e418dbaf32c24e56090b2"
MANIFEST_NAME = "world.json"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_UNLABELED_CHUNK = 500  # images per task of render_unlabeled (fixed: the output does not depend on the workers)
_RETRIEVAL_CHUNK = 64  # images per retrieval task (fixed, so the output does not depend on the number of workers)


class WorldMismatchError(PromptKDError, ValueError):
    """The folder holds a world built with other parameters (or something that is not a world)."""


@dataclass(frozen=True)
class WorldConfig:
    """Everything that determines the bytes of a world. Counts are per class and are multiplied by ``scale``."""

    seed: int = 0
    image_size: int = 32
    scale: float = 1.0
    supersample: int = 4
    n_train: int = 40
    n_val: int = 10
    n_test: int = 30
    n_shift_test: int = 30
    n_pretrain: int = 120
    n_retrieval: int = 512  # images in total, not per class
    captions_per_image: int = 5  # retrieval captions per image

    def __post_init__(self) -> None:
        if self.seed < 0:
            raise ValueError(f"seed must be non-negative, got {self.seed}")
        if self.image_size < 8:
            raise ValueError(f"image_size must be at least 8, got {self.image_size}")
        if self.scale <= 0:
            raise ValueError(f"scale must be positive, got {self.scale}")
        if self.supersample < 1:
            raise ValueError(f"supersample must be at least 1, got {self.supersample}")

    def count(self, n: int) -> int:
        """A count after ``scale``: rounded half up, at least 1."""
        return max(1, math.floor(n * self.scale + 0.5))

    @property
    def counts(self) -> dict[str, int]:
        keys = ("n_train", "n_val", "n_test", "n_shift_test", "n_pretrain", "n_retrieval")
        return {k: self.count(getattr(self, k)) for k in keys}


def _stable_id(text: str) -> int:
    return zlib.crc32(text.encode("utf-8"))


def _class_folder(classname: str) -> str:
    return classname.replace(" ", "_")


# ----------------------------------------------------------------------------------------------------------------------
# Work units (one class of one dataset, or one chunk of retrieval images); run in-process or in worker processes
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Task:
    kind: str  # "dataset", "pretrain" or "retrieval"
    folder: str  # folder under the build root
    style: str
    index: int  # class label, or chunk index for retrieval
    classname: str  # "" for retrieval
    n: int
    seed: int
    image_size: int
    supersample: int
    captions: int = 0
    choices: tuple[str, ...] = ()  # retrieval: the compositions to draw from


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def encode_png(img: Image.Image) -> bytes:
    """Minimal deterministic 8-bit RGB PNG (no metadata), several times faster than ``Image.save`` for tiny images.

    Images up to 48x48 are stored uncompressed (a file takes one 4 KiB disk block either way); larger ones deflated.
    """
    img = img if img.mode == "RGB" else img.convert("RGB")
    w, h = img.size
    rows = np.zeros((h, 3 * w + 1), np.uint8)  # a leading 0 per row: filter type "None"
    rows[:, 1:] = np.frombuffer(img.tobytes(), np.uint8).reshape(h, 3 * w)
    data = zlib.compress(rows.tobytes(), 0 if w * h <= 48 * 48 else 6)
    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return _PNG_SIGNATURE + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", data) + _png_chunk(b"IEND", b"")


def _save_png(img: Image.Image, path: str) -> None:
    view = memoryview(encode_png(img))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)  # cheaper than open() for many tiny files
    try:
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def _task_images(task: _Task) -> Iterator[tuple[str, str, Image.Image, list[str]]]:
    """The task's images in order: (relpath, classname, image, captions); a pure function of the task."""
    rng = np.random.default_rng([task.seed, _stable_id(task.folder), task.index])
    for i in range(task.n):
        if task.kind == "retrieval":
            classname = task.choices[int(rng.integers(len(task.choices)))]
            rel = f"{task.index * _RETRIEVAL_CHUNK + i:06d}.png"
        elif task.kind == "unlabeled":  # classes in turn; the file name says nothing of the class
            number = task.index * _UNLABELED_CHUNK + i
            classname = task.choices[number % len(task.choices)]
            rel = f"{number:08d}.png"
        else:
            classname = task.classname
            rel = f"{_class_folder(classname)}/{i:04d}.png"
        if task.kind == "pretrain":
            attrs = pretrain_attributes(classname, rng)
        else:
            attrs = parse_classname(classname).complete(rng)
        style = task.style if task.style != "mixed" else ("clean" if rng.random() < 0.5 else "web")
        img = render_attributes(attrs, style, rng, image_size=task.image_size, supersample=task.supersample)
        captions = sample_captions(classname, attrs, rng, task.captions) if task.captions else []
        yield rel, classname, img, captions


def _render_task(task: _Task, build_root: str) -> list[tuple[str, str, list[str]]]:
    """Render and write the task's images. Returns (relpath, classname, captions) per image, in order."""
    images = os.path.join(build_root, task.folder, "images")
    if task.kind in ("retrieval", "unlabeled"):
        os.makedirs(images, exist_ok=True)
    else:
        os.makedirs(os.path.join(images, _class_folder(task.classname)), exist_ok=True)
    out: list[tuple[str, str, list[str]]] = []
    for rel, classname, img, captions in _task_images(task):
        _save_png(img, os.path.join(images, rel))
        out.append((rel, classname, captions))
    return out


def _run_task(args: tuple[_Task, str]) -> list[tuple[str, str, list[str]]]:
    return _render_task(*args)


def _default_workers(n_images: int) -> int:
    # Worker processes are forked (no re-import of the caller's __main__), so only where fork is the norm, and not
    # from a daemon process (e.g. a data-loader worker), which may not have children.
    if sys.platform != "linux" or n_images < 4000 or multiprocessing.current_process().daemon:
        return 1
    return max(1, min(os.cpu_count() or 1, 4))


def _run_all(tasks: list[_Task], build_root: str, workers: int) -> list[list[tuple[str, str, list[str]]]]:
    args = [(t, build_root) for t in tasks]
    if workers <= 1:
        return [_render_task(t, build_root) for t in tasks]
    from concurrent.futures import ProcessPoolExecutor

    ctx = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        return list(pool.map(_run_task, args, chunksize=2))


# ----------------------------------------------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------------------------------------------


def _write_json(path: Path, obj, indent: int | None = 4) -> None:
    path.write_text(json.dumps(obj, indent=indent) + "\n", encoding="utf-8")


def _plan(config: WorldConfig) -> dict[str, list[_Task]]:
    """Every task of the build, grouped by output folder, in a fixed order."""
    c = config.counts
    common = {"seed": config.seed, "image_size": config.image_size, "supersample": config.supersample}
    plan: dict[str, list[_Task]] = {}
    for ds in WORLD_DATASETS.values():
        n = c["n_shift_test"] if ds.test_only else c["n_train"] + c["n_val"] + c["n_test"]
        plan[ds.name] = [
            _Task("dataset", ds.name, ds.style, k, cls, n, **common) for k, cls in enumerate(ds.classnames)
        ]
    plan["pretrain"] = [
        _Task("pretrain", "pretrain", "mixed", k, cls, c["n_pretrain"], captions=1, **common)
        for k, cls in enumerate(pretrain_classnames())
    ]
    everything = tuple(cls for family in FAMILIES.values() for cls in family.classnames)
    n_ret = c["n_retrieval"]
    plan["retrieval"] = [
        _Task(
            "retrieval",
            "retrieval",
            "clean",
            k,
            "",
            min(_RETRIEVAL_CHUNK, n_ret - k * _RETRIEVAL_CHUNK),
            captions=config.captions_per_image,
            choices=everything,
            **common,
        )
        for k in range(math.ceil(n_ret / _RETRIEVAL_CHUNK))
    ]
    return plan


def pretrain_digest(per_class: int = 4) -> str:
    """SHA-256 of what the shipped CLIPs learnt from: the vocabulary, caption templates, compositions, held-out
    cells, and the first ``per_class`` images and captions of every pre-training composition of the default world.

    The shipped weights stay valid across world versions that leave this unchanged (test-only sets may change); a
    test pins it to :data:`PRETRAIN_DIGEST`, so changing pre-training content cannot pass unnoticed.
    """
    config = WorldConfig()
    text = {
        "vocabulary": list(WORLD_VOCABULARY),
        "templates": list(PRETRAIN_TEMPLATES),
        "classnames": list(pretrain_classnames()),
        "held_out": {k: list(v) for k, v in held_out_compositions().items()},
        "image_size": config.image_size,
        "supersample": config.supersample,
    }
    digest = hashlib.sha256(json.dumps(text, sort_keys=True).encode("utf-8"))
    for task in _plan(config)["pretrain"]:
        for rel, classname, img, captions in _task_images(dataclasses.replace(task, n=min(per_class, task.n))):
            digest.update(json.dumps([rel, classname, captions]).encode("utf-8"))
            digest.update(encode_png(img))
    return digest.hexdigest()


def _manifest(config: WorldConfig) -> dict:
    c = config.counts
    datasets = {}
    for ds in WORLD_DATASETS.values():
        if ds.test_only:
            num = {"train": 0, "val": 0, "test": c["n_shift_test"] * ds.num_classes}
        else:
            num = {k: c[f"n_{k}"] * ds.num_classes for k in ("train", "val", "test")}
        datasets[ds.name] = {
            **ds.to_dict(),
            "folder": ds.name,
            "image_dir": "images",
            "split_file": f"split_zhou_{ds.split_name}.json",
            "num_images": num,
        }
    pre = pretrain_classnames()
    return {
        "format": "promptkd-embedded-world",
        "version": WORLD_VERSION,
        "pretrain_version": PRETRAIN_VERSION,
        "params": asdict(config),
        "counts": c,
        "vocabulary": list(WORLD_VOCABULARY),
        "dataset_names": list(WORLD_DATASETS),
        "datasets": datasets,
        "pretrain": {
            "folder": "pretrain",
            "image_dir": "images",
            "captions_file": "captions.jsonl",
            "style": "clean + web (half each)",
            "classnames": list(pre),
            "num_images": c["n_pretrain"] * len(pre),
            "templates": list(PRETRAIN_TEMPLATES),
            "held_out": {k: list(v) for k, v in held_out_compositions().items()},
        },
        "retrieval": {
            "folder": "retrieval",
            "image_dir": "images",
            "annotations_file": "captions_coco.json",
            "style": "clean",
            "num_images": c["n_retrieval"],
            "captions_per_image": config.captions_per_image,
        },
    }


def _write_outputs(build_root: Path, config: WorldConfig, plan: dict[str, list[_Task]], results) -> None:
    c = config.counts
    by_folder: dict[str, list] = {}
    remaining = iter(results)
    for folder, tasks in plan.items():
        by_folder[folder] = [next(remaining) for _ in tasks]

    for ds in WORLD_DATASETS.values():
        split: dict[str, list] = {"train": [], "val": [], "test": []}
        bounds = {"train": (0, c["n_train"]), "val": (c["n_train"], c["n_train"] + c["n_val"])}
        bounds["test"] = (bounds["val"][1], bounds["val"][1] + c["n_test"])
        for label, items in enumerate(by_folder[ds.name]):
            for i, (rel, classname, _) in enumerate(items):
                part = "test" if ds.test_only else next(k for k, (lo, hi) in bounds.items() if lo <= i < hi)
                split[part].append([rel, label, classname])
        _write_json(build_root / ds.name / f"split_zhou_{ds.split_name}.json", split)

    with open(build_root / "pretrain" / "captions.jsonl", "w", encoding="utf-8") as f:
        for label, items in enumerate(by_folder["pretrain"]):
            for rel, classname, captions in items:
                row = {"image": rel, "caption": captions[0], "label": label, "classname": classname}
                f.write(json.dumps(row) + "\n")

    coco: dict = {
        "info": {"description": "promptkd embedded world: held-out retrieval captions", "version": WORLD_VERSION},
        "images": [],
        "annotations": [],
    }
    for items in by_folder["retrieval"]:
        for rel, classname, captions in items:
            image_id = len(coco["images"])
            coco["images"].append({"id": image_id, "file_name": rel, "classname": classname})
            for caption in captions:
                coco["annotations"].append({"id": len(coco["annotations"]), "image_id": image_id, "caption": caption})
    _write_json(build_root / "retrieval" / "captions_coco.json", coco, indent=None)


def _expected_files(manifest: dict) -> Iterable[tuple[Path, int]]:
    """(folder, number of PNG files it must hold, recursively) for each image folder of a manifest."""
    for ds in manifest["datasets"].values():
        yield Path(ds["folder"]) / ds["image_dir"], sum(ds["num_images"].values())
    for key in ("pretrain", "retrieval"):
        yield Path(manifest[key]["folder"]) / manifest[key]["image_dir"], manifest[key]["num_images"]


def _is_complete(root: Path, manifest: dict) -> bool:
    files = [Path(ds["folder"]) / ds["split_file"] for ds in manifest["datasets"].values()]
    files += [Path("pretrain") / manifest["pretrain"]["captions_file"]]
    files += [Path("retrieval") / manifest["retrieval"]["annotations_file"]]
    if not all((root / f).is_file() for f in files):
        return False
    for folder, n in _expected_files(manifest):
        found = sum(len([f for f in names if f.endswith(".png")]) for _, _, names in os.walk(root / folder))
        if found != n:
            return False
    return True


def load_manifest(root: str | os.PathLike) -> dict:
    """The manifest of a built world (raises FileNotFoundError if ``root`` holds no finished world)."""
    path = Path(root) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"no finished world at {root} ({MANIFEST_NAME} missing); run build_world({str(root)!r})"
        )
    return json.loads(path.read_text(encoding="utf-8"))


def _mismatch(found: dict, wanted: dict) -> list[str]:
    keys = sorted(set(found) | set(wanted))
    return [
        f"{k}: {found.get(k)!r} on disk, {wanted.get(k)!r} requested" for k in keys if found.get(k) != wanted.get(k)
    ]


def build_world(
    root: str | os.PathLike,
    seed: int = 0,
    image_size: int = 32,
    scale: float = 1.0,
    *,
    supersample: int = 4,
    n_train: int = 40,
    n_val: int = 10,
    n_test: int = 30,
    n_shift_test: int = 30,
    n_pretrain: int = 120,
    n_retrieval: int = 512,
    captions_per_image: int = 5,
    workers: int | None = None,
    overwrite: bool = False,
) -> dict:
    """Build the embedded world under ``root`` (or reuse the one already there) and return its manifest.

    Args:
        root: target folder; created if missing. Must be absent, empty, or hold a world.
        seed: all images and captions are a function of the parameters: same parameters, same bytes.
        image_size: output side in pixels; objects are drawn ``supersample`` times larger and box-down-sampled.
        scale: multiplies every count (rounded, at least 1), e.g. 0.05 for tests.
        n_train, n_val, n_test: images per class of the three compositional datasets.
        n_shift_test: images per class of the domain-shifted, test-only datasets.
        n_pretrain: images per pre-training composition (one caption each).
        n_retrieval, captions_per_image: size of the held-out COCO-style retrieval set.
        workers: rendering processes (forked); ``None`` = up to 4 on Linux for large builds, else 1. The output
            does not depend on it.
        overwrite: replace a world (or any folder content) at ``root`` built with other parameters.

    Raises:
        WorldMismatchError: ``root`` holds a world with other parameters, or non-world content, and not ``overwrite``.
    """
    config = WorldConfig(
        seed=int(seed),
        image_size=int(image_size),
        scale=float(scale),
        supersample=int(supersample),
        n_train=n_train,
        n_val=n_val,
        n_test=n_test,
        n_shift_test=n_shift_test,
        n_pretrain=n_pretrain,
        n_retrieval=n_retrieval,
        captions_per_image=captions_per_image,
    )
    root = Path(root)
    manifest = _manifest(config)

    replace_existing = False
    if (root / MANIFEST_NAME).is_file():
        found = load_manifest(root)
        if found == manifest and _is_complete(root, found):
            logger.info("world at %s is up to date", root)
            return found
        if found == manifest:
            logger.warning("world at %s has missing files; rebuilding it", root)
            replace_existing = True
        elif not overwrite:
            diff = _mismatch(found.get("params", {}), manifest["params"])
            if found.get("version") != WORLD_VERSION:
                diff.insert(0, f"version: {found.get('version')!r} on disk, {WORLD_VERSION} in this code")
            reason = "; ".join(diff) or "same parameters, but written by a different revision of the world code"
            raise WorldMismatchError(
                f"{root} holds a different world ({reason}). Use another folder, or pass overwrite=True to replace it."
            )
        else:
            replace_existing = True
    elif root.exists():
        if not root.is_dir():
            raise WorldMismatchError(f"{root} exists and is not a folder")
        if any(root.iterdir()):
            if not overwrite:
                raise WorldMismatchError(
                    f"{root} is not empty and holds no finished world ({MANIFEST_NAME} missing); "
                    "use an empty or new folder, or pass overwrite=True to replace its content."
                )
            replace_existing = True

    plan = _plan(config)
    tasks = [t for ts in plan.values() for t in ts]
    n_images = sum(t.n for t in tasks)
    workers = _default_workers(n_images) if workers is None else max(1, int(workers))
    root.parent.mkdir(parents=True, exist_ok=True)
    build_root = root.parent / f".{root.name}.building-{uuid.uuid4().hex[:12]}"
    start = time.perf_counter()
    try:
        build_root.mkdir()
        results = _run_all(tasks, str(build_root), workers)
        _write_outputs(build_root, config, plan, results)
        _write_json(build_root / MANIFEST_NAME, manifest)  # last: its presence marks a complete world
        _install(build_root, root, manifest, replace_existing)
    except BaseException:
        shutil.rmtree(build_root, ignore_errors=True)
        raise
    logger.info(
        "built world at %s: %d images in %.1f s (%d worker%s)",
        root,
        n_images,
        time.perf_counter() - start,
        workers,
        "" if workers == 1 else "s",
    )
    return manifest


def default_world_root() -> Path:
    """Where promptkd keeps the world it builds itself: ``$PROMPTKD_CACHE/world`` (default ``~/.cache/promptkd``)."""
    return Path(os.environ.get("PROMPTKD_CACHE", Path.home() / ".cache" / "promptkd")).expanduser() / "world"


def ensure_world(root: str | os.PathLike | None = None) -> Path:
    """A finished world of this code's version at ``root`` (default: :func:`default_world_root`); built if absent.

    A world with other parameters (e.g. a small one for tests) is used as it is. A world written by another world
    version (other images, other splits, CLIPs pre-trained on something else) is never used silently: in
    promptkd's own cache it is rebuilt, with a warning; at a folder the user named it is refused with what to do.
    """
    explicit = root is not None
    folder = Path(root).expanduser() if explicit else default_world_root()
    try:
        found = load_manifest(folder)
    except FileNotFoundError:
        build_world(folder)
        return folder
    version = found.get("version")
    if version != WORLD_VERSION:
        if explicit:
            raise WorldMismatchError(
                f"{folder} holds an embedded world of version {version}, but this promptkd renders version "
                f"{WORLD_VERSION} (other images, splits and shipped CLIPs). Delete the folder or name another one "
                "and it is built anew (promptkd's own cache is rebuilt automatically)."
            )
        logger.warning("the world at %s is version %s; rebuilding it for version %s", folder, version, WORLD_VERSION)
        build_world(folder, overwrite=True)
    return folder


def _install(build_root: Path, root: Path, manifest: dict, replace_existing: bool) -> None:
    """Move the finished build onto ``root`` (rename: atomic on one file system)."""
    if replace_existing:
        old = root.parent / f".{root.name}.old-{uuid.uuid4().hex[:12]}"
        os.rename(root, old)
        os.rename(build_root, root)
        shutil.rmtree(old, ignore_errors=True)
        return
    if root.is_dir() and not any(root.iterdir()):
        root.rmdir()
    try:
        os.rename(build_root, root)
    except OSError:
        # Another process finished the same world first: keep theirs if it is what we built.
        if (root / MANIFEST_NAME).is_file() and load_manifest(root) == manifest:
            shutil.rmtree(build_root, ignore_errors=True)
            return
        raise


# ----------------------------------------------------------------------------------------------------------------------
# Unlabelled images on demand (PromptKD's "large amounts of unlabeled domain images")
# ----------------------------------------------------------------------------------------------------------------------
UNLABELED_FORMAT = "promptkd-world-unlabeled"


def render_unlabeled(
    dataset: str,
    count: int,
    out: str | os.PathLike,
    *,
    seed: int = 1,
    classes: str = "all",
    image_size: int = 32,
    supersample: int = 4,
    workers: int | None = None,
) -> Path:
    """Render ``count`` unlabelled images of a world dataset's domain into ``out/images`` (flat, numbered files).

    Classes take turns (``all``, or the ``base`` half for inductive distillation); each image draws its own
    attributes, position and style noise from a random stream keyed by (seed, dataset, "unlabeled", chunk), which
    no split of the world uses, so no rendered image repeats a train, val or test image. Writes
    ``classnames.txt`` (the dataset's full class list: the logits the student learns) and ``render.json``. A folder
    that already holds the same rendering is reused; any other non-empty folder is refused.
    """
    from promptkd.data.sampling import base_new_labels

    if dataset not in WORLD_DATASETS:
        raise WorldMismatchError(f"no world dataset {dataset!r}; world datasets: {', '.join(WORLD_DATASETS)}.")
    if count < 1:
        raise WorldMismatchError(f"--count must be at least 1, got {count}.")
    if classes not in ("all", "base"):
        raise WorldMismatchError(f"classes must be 'all' or 'base', not {classes!r}.")
    spec = WORLD_DATASETS[dataset]
    names = list(spec.classnames)
    chosen = names if classes == "all" else [names[y] for y in base_new_labels(set(range(len(names))))[0]]
    record = {
        "format": UNLABELED_FORMAT,
        "world_version": WORLD_VERSION,
        "dataset": dataset,
        "count": int(count),
        "seed": int(seed),
        "classes": classes,
        "image_size": int(image_size),
        "supersample": int(supersample),
    }
    root = Path(out)
    if root.is_dir() and any(root.iterdir()):
        try:
            found = json.loads((root / "render.json").read_text())
        except (OSError, ValueError):
            found = None
        if found == record and len(os.listdir(root / "images")) == count:
            return root
        old = isinstance(found, dict) and found.get("format") == UNLABELED_FORMAT
        if old and found.get("world_version") != WORLD_VERSION:
            raise WorldMismatchError(
                f"{root} holds images rendered by world version {found.get('world_version')}, but this promptkd "
                f"renders version {WORLD_VERSION}; delete the folder or name a new one to render them anew."
            )
        raise WorldMismatchError(
            f"{root} is not empty and does not hold this rendering ({dataset}, {count} images, seed {seed}); "
            "name an empty or new folder."
        )
    build_root = root.parent / f".{root.name}.building-{uuid.uuid4().hex[:8]}"
    tasks = [
        _Task(
            "unlabeled",
            f"{dataset}@unlabeled",
            spec.style,
            k,
            "",
            min(_UNLABELED_CHUNK, count - k * _UNLABELED_CHUNK),
            seed=int(seed),
            image_size=image_size,
            supersample=supersample,
            choices=tuple(chosen),
        )
        for k in range(math.ceil(count / _UNLABELED_CHUNK))
    ]
    try:
        _run_all(tasks, str(build_root), _default_workers(count) if workers is None else workers)
        os.rename(build_root / f"{dataset}@unlabeled", build_root / "staging")
        os.rename(build_root / "staging" / "images", build_root / "images")
        os.rmdir(build_root / "staging")
        (build_root / "classnames.txt").write_text("\n".join(names) + "\n", encoding="utf-8")
        _write_json(build_root / "render.json", record)
        if root.is_dir():
            root.rmdir()
        os.rename(build_root, root)
    finally:
        shutil.rmtree(build_root, ignore_errors=True)
    logger.info("rendered %d unlabelled %s images (seed %d, %s classes) at %s", count, dataset, seed, classes, root)
    return root
