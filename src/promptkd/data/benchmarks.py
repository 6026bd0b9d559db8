"""The 15 CoOp-protocol benchmarks: 11 few-shot / base-to-novel datasets and the 4 ImageNet variants.

Readers follow the reference dataset code (KaiyangZhou/CoOp ``datasets/*.py``) so that splits, labels and class
names are identical: ``split_zhou_<Name>.json`` split files, FGVCAircraft's official txt files, ImageNet's wnid
folders and ``classnames.txt``. Deliberate differences, each fixing a reference pitfall:

- the registry is an explicit dict (:data:`BENCHMARKS`), not filled by import side effects;
- ImageNetV2 folders are mapped by ``int(name)``, never string-sorted;
- ImageNet has no held-out validation split: ``val`` is empty (the reference sets val = test);
- the ImageNet variants are test-only: ``train`` and ``val`` are empty (the reference sets train = test);
- folder scans are sorted and keep only image files, so item order does not depend on the file system;
- nothing is written into the dataset folder (no ``preprocessed.pkl``).
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from promptkd.data.items import DataError, DatasetSplits, Datum, check_files, format_list, is_image_file
from promptkd.data.templates import dataset_template
from promptkd.errors import PromptKDError

__all__ = [
    "BENCHMARKS",
    "BenchmarkSpec",
    "UnknownDatasetError",
    "build_benchmark",
    "list_benchmarks",
    "register_benchmark",
    "resolve_name",
]

COOP_DOCS = "the dataset instructions in CoOp's DATASETS.md (KaiyangZhou/CoOp)"
SPLIT_SOURCE = (
    "the split_zhou_*.json files are distributed with CoOp (linked from DATASETS.md) and mirrored with the images "
    "in the Hugging Face dataset zhengli97/prompt_learning_dataset"
)


class Builder(Protocol):
    """Reads one benchmark: ``builder(spec, root, check=...)``."""

    def __call__(self, spec: BenchmarkSpec, root: str, *, check: bool = True) -> DatasetSplits: ...


@dataclass(frozen=True)
class BenchmarkSpec:
    """How one benchmark is laid out and read.

    ``folder`` is the dataset folder under the data root; ``image_dir`` is where split-file paths point (relative
    to ``folder``; ``""`` = the dataset folder itself); ``split_file`` is the split JSON (if any); ``classes`` is the
    full dataset's class count (for documentation and sanity checks, not enforced); ``source`` says where the
    data comes from.
    """

    name: str
    dassl_name: str
    folder: str
    builder: Builder
    image_dir: str = ""
    split_file: str = ""
    classes: int = 0
    test_only: bool = False
    source: str = ""

    @property
    def template(self) -> str:
        """The dataset's zero-shot template."""
        return dataset_template(self.name)


# ---------------------------------------------------------------------------------------------------------------
# Class-name clean-ups (protocols.md §1.6). Split files already hold the cleaned names, so every clean-up is
# idempotent: it only changes names still in their raw (folder / devkit) form.

CALTECH_IGNORED = ("BACKGROUND_Google", "Faces_easy")
CALTECH_RENAMES = {"airplanes": "airplane", "Faces": "face", "Leopards": "leopard", "Motorbikes": "motorbike"}
EUROSAT_RENAMES = {
    "AnnualCrop": "Annual Crop Land",
    "Forest": "Forest",
    "HerbaceousVegetation": "Herbaceous Vegetation Land",
    "Highway": "Highway or Road",
    "Industrial": "Industrial Buildings",
    "Pasture": "Pasture Land",
    "PermanentCrop": "Permanent Crop Land",
    "Residential": "Residential Buildings",
    "River": "River",
    "SeaLake": "Sea or Lake",
}
_YEAR = re.compile(r"^(19|20)\d\d$")


def _clean_caltech(name: str) -> str:
    return CALTECH_RENAMES.get(name, name)


def _clean_pets(name: str) -> str:
    return name.lower()


def _clean_cars(name: str) -> str:
    """Devkit names end with the year; move it to the front (``"Tesla Model S Sedan 2012"`` → ``"2012 Tesla …"``)."""
    words = name.split(" ")
    if len(words) > 1 and _YEAR.match(words[-1]) and not _YEAR.match(words[0]):
        words.insert(0, words.pop())
    return " ".join(words)


def _clean_sun397(name: str) -> str:
    """Raw category paths lose their letter prefix and are reversed (``"/a/apartment_building/outdoor"``)."""
    if "/" not in name:
        return name
    parts = [p for p in name.strip("/").split("/") if p]
    if len(parts) > 1 and len(parts[0]) == 1:
        parts = parts[1:]
    return " ".join(reversed(parts))


def _clean_eurosat(name: str) -> str:
    return EUROSAT_RENAMES.get(name, name)


def _clean_ucf101(name: str) -> str:
    """Raw CamelCase action folders are split with "_" (``"ApplyEyeMakeup"`` → ``"Apply_Eye_Makeup"``)."""
    if "_" in name:
        return name
    words = re.findall(r"[A-Z][^A-Z]*", name)
    return "_".join(words) if "".join(words) == name else name


def _final_name(name: str) -> str:
    """What every trainer does last: underscores become spaces."""
    return name.replace("_", " ")


_CLEANUPS: dict[str, Callable[[str], str]] = {
    "caltech101": _clean_caltech,
    "oxford_pets": _clean_pets,
    "stanford_cars": _clean_cars,
    "sun397": _clean_sun397,
    "eurosat": _clean_eurosat,
    "ucf101": _clean_ucf101,
}


# ---------------------------------------------------------------------------------------------------------------
# Shared helpers


def _dataset_dir(spec: BenchmarkSpec, root: str) -> str:
    """The dataset folder under ``root``; ``root`` may also be the dataset folder itself."""
    root = os.path.abspath(os.fspath(root))
    candidate = os.path.join(root, spec.folder)
    if os.path.isdir(candidate):
        return candidate
    if os.path.basename(root.rstrip(os.sep)) == spec.folder and os.path.isdir(root):
        return root
    raise DataError(
        f"dataset folder for {spec.dassl_name} not found",
        path=candidate,
        expected=f"a folder '{spec.folder}/' under the data root {root}" + _layout_hint(spec),
        fix=f"download {spec.dassl_name} following {COOP_DOCS}; {spec.source}",
    )


def _layout_hint(spec: BenchmarkSpec) -> str:
    parts = []
    if spec.image_dir:
        parts.append(f"{spec.folder}/{spec.image_dir}/")
    if spec.split_file:
        parts.append(f"{spec.folder}/{spec.split_file}")
    return f" containing {' and '.join(parts)}" if parts else ""


def _require(path: str, spec: BenchmarkSpec, what: str, *, is_dir: bool) -> str:
    ok = os.path.isdir(path) if is_dir else os.path.isfile(path)
    if not ok:
        kind = "folder" if is_dir else "file"
        raise DataError(
            f"{spec.dassl_name}: {what} {kind} not found",
            path=path,
            expected=f"the {kind} {os.path.basename(path)!r} inside {os.path.dirname(path)}",
            fix=f"set up {spec.dassl_name} following {COOP_DOCS}; {spec.source}",
        )
    return path


def _list_images(folder: str) -> list[str]:
    """Sorted absolute paths of the image files directly inside ``folder``."""
    with os.scandir(folder) as it:
        names = sorted(e.name for e in it if e.is_file() and is_image_file(e.name))
    return [os.path.join(folder, n) for n in names]


def _list_subdirs(folder: str) -> list[str]:
    with os.scandir(folder) as it:
        return sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))


def _finalize(
    spec: BenchmarkSpec,
    dataset_dir: str,
    source: str,
    train: list[Datum],
    val: list[Datum],
    test: list[Datum],
    notes: Iterable[str] = (),
) -> DatasetSplits:
    """Check labels/classnames are consistent, derive ``classnames`` sorted by label and apply "_" → " "."""
    names: dict[int, str] = {}
    for which, items in (("train", train), ("val", val), ("test", test)):
        for d in items:
            known = names.setdefault(d.label, d.classname)
            if known != d.classname:
                raise DataError(
                    f"label {d.label} has two class names, {known!r} and {d.classname!r} (in {which}, {d.path})",
                    path=source,
                    expected="exactly one class name per label",
                    fix="use the unmodified split file distributed with CoOp, or fix the conflicting entries",
                )
    if not names:
        raise DataError(
            f"{spec.dassl_name}: no items found",
            path=source,
            expected="at least one image in the train/val/test splits",
            fix=f"check the dataset folder {dataset_dir} is complete ({COOP_DOCS})",
        )
    n = max(names) + 1
    bad = sorted(k for k in names if k < 0) or sorted(set(range(n)) - set(names))
    if bad:
        listed = ", ".join(str(x) for x in bad[:10]) + (f" ... ({len(bad)} in total)" if len(bad) > 10 else "")
        raise DataError(
            f"labels are not 0..{n - 1}; offending or unused labels: {listed}",
            path=source,
            expected="integer labels 0..n-1 with every label used",
            fix="use the unmodified split file distributed with CoOp, or renumber the labels",
        )
    if train:
        absent = sorted(set(range(n)) - {d.label for d in train})
        if absent:
            raise DataError(
                f"{len(absent)} classes have no training items: " + ", ".join(f"{y} ({names[y]})" for y in absent[:10]),
                path=source,
                expected="every class in the train split (class names and base/new splits derive from it)",
                fix="use the unmodified split file distributed with CoOp",
            )
    final = {y: _final_name(c) for y, c in names.items()}

    def fin(items: list[Datum]) -> list[Datum]:
        if all(final[y] == c for y, c in names.items()):
            return items
        return [Datum(d.path, d.label, final[d.label]) for d in items]

    return DatasetSplits(
        name=spec.name,
        classnames=[final[y] for y in range(n)],
        train=fin(train),
        val=fin(val),
        test=fin(test),
        template=spec.template,
        root=dataset_dir,
        notes=list(notes),
    )


# ---------------------------------------------------------------------------------------------------------------
# Builders


def _read_split_json(spec: BenchmarkSpec, root: str, *, check: bool = True) -> DatasetSplits:
    """``split_zhou_<Name>.json``: paths joined to the image dir (StanfordCars: the dataset folder)."""
    dataset_dir = _dataset_dir(spec, root)
    split_path = _require(os.path.join(dataset_dir, spec.split_file), spec, "split", is_dir=False)
    prefix = os.path.join(dataset_dir, spec.image_dir) if spec.image_dir else dataset_dir
    try:
        with open(split_path, encoding="utf-8") as f:
            raw = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        line = getattr(e, "lineno", None)
        raise DataError(
            f"split file is not valid JSON ({e})",
            path=split_path,
            line=line,
            expected='{"train": [[path, label, classname], ...], "val": [...], "test": [...]}',
            fix="download the split file again",
        ) from e
    if not isinstance(raw, dict) or any(k not in raw for k in ("train", "val", "test")):
        raise DataError(
            "split file does not have the keys 'train', 'val' and 'test'",
            path=split_path,
            expected='{"train": [[path, label, classname], ...], "val": [...], "test": [...]}',
            fix="download the split file again",
        )
    clean = _CLEANUPS.get(spec.name, lambda s: s)
    out: dict[str, list[Datum]] = {}
    for which in ("train", "val", "test"):
        items: list[Datum] = []
        for i, entry in enumerate(raw[which]):
            try:
                impath, label, classname = entry
                label = int(label)
                if not isinstance(impath, str) or not isinstance(classname, str):
                    raise TypeError
            except (TypeError, ValueError) as e:
                raise DataError(
                    f"entry {i} of {which!r} is malformed: {entry!r}",
                    path=split_path,
                    expected="[image path, integer label, class name]",
                    fix="download the split file again",
                ) from e
            if spec.name == "caltech101" and classname in CALTECH_IGNORED:
                raise DataError(
                    f"entry {i} of {which!r} uses the class {classname!r}, which the protocol excludes",
                    path=split_path,
                    expected=f"no items from {', '.join(CALTECH_IGNORED)}",
                    fix="use the unmodified split file distributed with CoOp",
                )
            items.append(Datum(os.path.abspath(os.path.join(prefix, impath)), label, clean(classname)))
        out[which] = items
    if check:
        check_files(
            [*out["train"], *out["val"], *out["test"]],
            source=split_path,
            fix=f"paths in the split file are relative to {prefix}; check that {spec.dassl_name} is fully "
            f"extracted there ({COOP_DOCS})",
        )
    return _finalize(spec, dataset_dir, split_path, out["train"], out["val"], out["test"])


def _read_fgvc_aircraft(spec: BenchmarkSpec, root: str, *, check: bool = True) -> DatasetSplits:
    """Official ``variants.txt`` (one class per line) and ``images_variant_{train,val,test}.txt`` files."""
    dataset_dir = _dataset_dir(spec, root)
    image_dir = _require(os.path.join(dataset_dir, spec.image_dir), spec, "image", is_dir=True)
    variants_path = _require(os.path.join(dataset_dir, "variants.txt"), spec, "class list", is_dir=False)
    classnames: list[str] = []
    with open(variants_path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                classnames.append(line.strip())
    cname2lab = {c: i for i, c in enumerate(classnames)}
    out: dict[str, list[Datum]] = {}
    for which in ("train", "val", "test"):
        path = _require(os.path.join(dataset_dir, f"images_variant_{which}.txt"), spec, f"{which} list", is_dir=False)
        items: list[Datum] = []
        rows = _read_key_name_lines(
            path, "variant name", "'<image id> <variant name>'", "use the unmodified file from fgvc-aircraft-2013b/data"
        )
        for lineno, image_id, variant in rows:
            if variant not in cname2lab:
                hint = difflib.get_close_matches(variant, classnames, n=1)
                raise DataError(
                    f"variant {variant!r} is not listed in variants.txt"
                    + (f" (did you mean {hint[0]!r}?)" if hint else ""),
                    path=path,
                    line=lineno,
                    expected=f"one of the {len(classnames)} names in {variants_path}",
                    fix="use the unmodified files from fgvc-aircraft-2013b/data",
                )
            items.append(Datum(os.path.join(image_dir, image_id + ".jpg"), cname2lab[variant], variant))
        out[which] = items
    if check:
        check_files(
            [*out["train"], *out["val"], *out["test"]],
            source=dataset_dir,
            fix=f"images are expected as {image_dir}/<image id>.jpg; copy the data/ folder of fgvc-aircraft-2013b "
            f"to {dataset_dir} ({COOP_DOCS})",
        )
    return _finalize(spec, dataset_dir, variants_path, out["train"], out["val"], out["test"])


def _read_imagenet_classnames(path: str) -> dict[str, str]:
    """``classnames.txt``: one ``"<wnid> <class name with spaces>"`` per line, in file order."""
    rows = _read_key_name_lines(
        path,
        "class name",
        "'<wnid> <class name>' on every line",
        "use the classnames.txt distributed with CoOp (DATASETS.md, ImageNet section)",
    )
    return {wnid: name for _, wnid, name in rows}


def _read_key_name_lines(path: str, what: str, expected: str, fix: str) -> list[tuple[int, str, str]]:
    """(line number, key, name) of each non-empty ``"<key> <name with spaces>"`` line; a line without a name is
    a DataError naming the file and line."""
    rows: list[tuple[int, str, str]] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            parts = line.strip().split(" ")
            if len(parts) < 2:
                raise DataError(
                    f"line has no {what}: {line.strip()!r}", path=path, line=lineno, expected=expected, fix=fix
                )
            rows.append((lineno, parts[0], " ".join(parts[1:])))
    return rows


def _classnames_file(spec: BenchmarkSpec, dataset_dir: str) -> dict[str, str]:
    path = os.path.join(dataset_dir, "classnames.txt")
    if not os.path.isfile(path):
        raise DataError(
            f"{spec.dassl_name}: class-name file not found",
            path=path,
            expected="classnames.txt ('<wnid> <class name>' per line) in the dataset folder",
            fix="copy the ImageNet classnames.txt distributed with CoOp (DATASETS.md) into this folder",
        )
    return _read_imagenet_classnames(path)


def _scan_wnid_folders(
    spec: BenchmarkSpec, split_dir: str, names: dict[str, str], classnames_path: str
) -> tuple[list[str], list[Datum]]:
    """Items of sorted wnid folders, labels = folder index, class names looked up by wnid."""
    folders = _list_subdirs(split_dir)
    if not folders:
        raise DataError(
            f"{spec.dassl_name}: no class folders found",
            path=split_dir,
            expected="one sub-folder per class, named by WordNet id (n01440764, ...)",
            fix=f"extract {spec.dassl_name} here following {COOP_DOCS}",
        )
    unknown = [f for f in folders if f not in names]
    if unknown:
        raise DataError(
            f"{len(unknown)} class folders are not listed in classnames.txt:\n{format_list(unknown)}",
            path=split_dir,
            expected=f"every folder name to be a wnid listed in {classnames_path}",
            fix="remove stray folders or use the classnames.txt distributed with CoOp",
        )
    items: list[Datum] = []
    for label, wnid in enumerate(folders):
        images = _list_images(os.path.join(split_dir, wnid))
        if not images:
            raise DataError(
                f"{spec.dassl_name}: class folder has no images",
                path=os.path.join(split_dir, wnid),
                expected="image files in every class folder",
                fix="re-extract the dataset; the folder looks incomplete",
            )
        items.extend(Datum(p, label, names[wnid]) for p in images)
    return [names[w] for w in folders], items


def _read_imagenet(spec: BenchmarkSpec, root: str, *, check: bool = True) -> DatasetSplits:
    """``images/train`` = train and ``images/val`` (official val, 50 per class) = test; there is no val split."""
    dataset_dir = _dataset_dir(spec, root)
    names = _classnames_file(spec, dataset_dir)
    cpath = os.path.join(dataset_dir, "classnames.txt")
    train_dir = _require(os.path.join(dataset_dir, "images", "train"), spec, "train image", is_dir=True)
    test_dir = _require(os.path.join(dataset_dir, "images", "val"), spec, "val image", is_dir=True)
    classnames, train = _scan_wnid_folders(spec, train_dir, names, cpath)
    test_classnames, test = _scan_wnid_folders(spec, test_dir, names, cpath)
    if test_classnames != classnames:
        raise DataError(
            "images/train and images/val have different class folders",
            path=test_dir,
            expected="the same wnid folders in images/train and images/val",
            fix="reorganise the official val images into wnid folders (CoOp DATASETS.md, ImageNet section)",
        )
    note = (
        "no held-out validation split: val is empty (the reference uses the test set as val); "
        "sample validation items from train if needed"
    )
    return _finalize(spec, dataset_dir, cpath, train, [], test, notes=[note])


def _read_imagenet_v2(spec: BenchmarkSpec, root: str, *, check: bool = True) -> DatasetSplits:
    """Integer folders ``0..n-1``: folder ``int(name)`` is the position in classnames.txt (never string-sorted)."""
    dataset_dir = _dataset_dir(spec, root)
    names = _classnames_file(spec, dataset_dir)
    ordered = list(names.values())
    image_dir = _require(os.path.join(dataset_dir, spec.image_dir), spec, "image", is_dir=True)
    by_label: dict[int, str] = {}
    bad: list[str] = []
    for folder in _list_subdirs(image_dir):
        try:
            label = int(folder)
        except ValueError:
            bad.append(folder)
            continue
        if not 0 <= label < len(ordered) or folder != str(label):
            bad.append(folder)
            continue
        by_label[label] = folder
    if bad:
        raise DataError(
            f"folders that are not class indices 0..{len(ordered) - 1}:\n{format_list(bad)}",
            path=image_dir,
            expected=f"folders named 0..{len(ordered) - 1}, one per line of classnames.txt",
            fix="use the matched-frequency release of ImageNetV2 unmodified",
        )
    missing = [str(y) for y in range(len(ordered)) if y not in by_label]
    if missing:
        raise DataError(
            f"{len(missing)} class folders are missing:\n{format_list(missing)}",
            path=image_dir,
            expected=f"folders 0..{len(ordered) - 1}",
            fix="re-extract ImageNetV2 (matched-frequency) here",
        )
    test: list[Datum] = []
    for label in range(len(ordered)):
        folder = os.path.join(image_dir, by_label[label])
        images = _list_images(folder)
        if not images:
            raise DataError(
                "class folder has no images",
                path=folder,
                expected="image files in every class folder",
                fix="re-extract ImageNetV2 here",
            )
        test.extend(Datum(p, label, ordered[label]) for p in images)
    return _finalize(spec, dataset_dir, image_dir, [], [], test, notes=["test-only dataset: train and val are empty"])


def _read_imagenet_variant(spec: BenchmarkSpec, root: str, *, check: bool = True) -> DatasetSplits:
    """Sketch / A / R: labels enumerate the sorted wnid folders (A and R: 200-way); ``README.txt`` is ignored."""
    dataset_dir = _dataset_dir(spec, root)
    names = _classnames_file(spec, dataset_dir)
    image_dir = _require(os.path.join(dataset_dir, spec.image_dir), spec, "image", is_dir=True)
    _, test = _scan_wnid_folders(spec, image_dir, names, os.path.join(dataset_dir, "classnames.txt"))
    return _finalize(spec, dataset_dir, image_dir, [], [], test, notes=["test-only dataset: train and val are empty"])


# ---------------------------------------------------------------------------------------------------------------
# Registry


def _json_spec(name: str, dassl: str, folder: str, image_dir: str, classes: int, source: str) -> BenchmarkSpec:
    return BenchmarkSpec(
        name=name,
        dassl_name=dassl,
        folder=folder,
        builder=_read_split_json,
        image_dir=image_dir,
        split_file=f"split_zhou_{dassl}.json",
        classes=classes,
        source=f"{source}; {SPLIT_SOURCE}",
    )


_IMAGENET_SOURCE = "the ILSVRC-2012 train/val images; classnames.txt is distributed with CoOp"
_VARIANT_SOURCE = "classnames.txt is a copy of the ImageNet classnames.txt distributed with CoOp"

BENCHMARKS: dict[str, BenchmarkSpec] = {
    s.name: s
    for s in (
        BenchmarkSpec(
            "imagenet", "ImageNet", "imagenet", _read_imagenet, "images", classes=1000, source=_IMAGENET_SOURCE
        ),
        _json_spec("caltech101", "Caltech101", "caltech-101", "101_ObjectCategories", 100, "Caltech-101 images"),
        _json_spec("oxford_pets", "OxfordPets", "oxford_pets", "images", 37, "Oxford-IIIT Pet images"),
        _json_spec("stanford_cars", "StanfordCars", "stanford_cars", "", 196, "Stanford Cars train/test images"),
        _json_spec("oxford_flowers", "OxfordFlowers", "oxford_flowers", "jpg", 102, "Oxford 102 Flowers images"),
        _json_spec("food101", "Food101", "food-101", "images", 101, "Food-101 images"),
        BenchmarkSpec(
            "fgvc_aircraft",
            "FGVCAircraft",
            "fgvc_aircraft",
            _read_fgvc_aircraft,
            "images",
            classes=100,
            source="the data/ folder of fgvc-aircraft-2013b (images/, variants.txt, images_variant_*.txt)",
        ),
        _json_spec("sun397", "SUN397", "sun397", "SUN397", 397, "SUN397 images"),
        _json_spec("dtd", "DescribableTextures", "dtd", "images", 47, "DTD images"),
        _json_spec("eurosat", "EuroSAT", "eurosat", "2750", 10, "EuroSAT RGB images (folder 2750)"),
        _json_spec("ucf101", "UCF101", "ucf101", "UCF-101-midframes", 101, "UCF-101 middle frames"),
        BenchmarkSpec(
            "imagenet_v2",
            "ImageNetV2",
            "imagenetv2",
            _read_imagenet_v2,
            "imagenetv2-matched-frequency-format-val",
            classes=1000,
            test_only=True,
            source=f"ImageNetV2 matched-frequency images; {_VARIANT_SOURCE}",
        ),
        BenchmarkSpec(
            "imagenet_sketch",
            "ImageNetSketch",
            "imagenet-sketch",
            _read_imagenet_variant,
            "images",
            classes=1000,
            test_only=True,
            source=f"ImageNet-Sketch images; {_VARIANT_SOURCE}",
        ),
        BenchmarkSpec(
            "imagenet_a",
            "ImageNetA",
            "imagenet-adversarial",
            _read_imagenet_variant,
            "imagenet-a",
            classes=200,
            test_only=True,
            source=f"ImageNet-A images; {_VARIANT_SOURCE}",
        ),
        BenchmarkSpec(
            "imagenet_r",
            "ImageNetR",
            "imagenet-rendition",
            _read_imagenet_variant,
            "imagenet-r",
            classes=200,
            test_only=True,
            source=f"ImageNet-R images; {_VARIANT_SOURCE}",
        ),
    )
}

#: Extra accepted spellings (matched after lower-casing and removing everything but letters and digits).
ALIASES: dict[str, str] = {
    "describabletextures": "dtd",
    "textures": "dtd",
    "flowers102": "oxford_flowers",
    "flowers": "oxford_flowers",
    "pets": "oxford_pets",
    "cars": "stanford_cars",
    "aircraft": "fgvc_aircraft",
    "fgvc": "fgvc_aircraft",
    "caltech": "caltech101",
    "imagenetadversarial": "imagenet_a",
    "imagenetrendition": "imagenet_r",
}


class UnknownDatasetError(PromptKDError, ValueError):
    """A dataset name that is not in the registry; the message suggests the closest names."""


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _lookup() -> dict[str, str]:
    table = {_key(alias): canon for alias, canon in ALIASES.items()}
    for spec in BENCHMARKS.values():
        for spelling in (spec.name, spec.dassl_name, spec.folder):
            table[_key(spelling)] = spec.name
    return table


def list_benchmarks() -> list[str]:
    """Canonical names of all registered benchmarks, in registry order."""
    return list(BENCHMARKS)


def resolve_name(name: str) -> str:
    """Canonical benchmark name for a canonical name, Dassl class name, folder name or alias (any case)."""
    table = _lookup()
    key = _key(name)
    if key in table:
        return table[key]
    spellings = sorted(set(BENCHMARKS) | {s.dassl_name for s in BENCHMARKS.values()} | set(ALIASES))
    close = difflib.get_close_matches(name, spellings, n=3, cutoff=0.5)
    close += [table[_key(c)] for c in difflib.get_close_matches(key, list(table), n=3, cutoff=0.6)]
    suggestions = list(dict.fromkeys(table[_key(c)] for c in close))
    hint = f" Did you mean {' or '.join(repr(s) for s in suggestions)}?" if suggestions else ""
    raise UnknownDatasetError(f"unknown dataset {name!r}.{hint} Known datasets: {', '.join(BENCHMARKS)}")


def register_benchmark(spec: BenchmarkSpec, *, overwrite: bool = False) -> None:
    """Add a benchmark to the registry explicitly (no import side effects)."""
    if spec.name in BENCHMARKS and not overwrite:
        raise ValueError(f"benchmark {spec.name!r} is already registered; pass overwrite=True to replace it")
    BENCHMARKS[spec.name] = spec


def build_benchmark(name: str, root: str | os.PathLike[str], *, check: bool = True) -> DatasetSplits:
    """Read benchmark ``name`` from its standard folder under the data root ``root``.

    ``root`` may also be the dataset folder itself. With ``check`` (default) every image listed in a split file
    must exist, and all missing ones are reported together. Folder-scanned datasets (ImageNet family) only list
    files that exist.
    """
    spec = BENCHMARKS[resolve_name(name)]
    return spec.builder(spec, os.fspath(root), check=check)
