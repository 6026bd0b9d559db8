"""Builders of tiny on-disk dataset trees in every benchmark layout, plus what reading them must give.

Each tree mirrors the real folder names and file formats (split JSONs, FGVC txt files, wnid folders,
classnames.txt) with a few 8×8 images per class. Some split files deliberately hold raw (uncleaned) class names
so the per-dataset clean-ups are exercised; real split files already hold the cleaned names.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

__all__ = ["Expected", "make_all_benchmarks", "make_benchmark", "write_image"]


def write_image(path: Path, seed: int = 0, size: int = 8) -> Path:
    """A small RGB image, JPEG for .jpg/.jpeg suffixes (any case), PNG otherwise."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    img = Image.new("RGB", (size, size), (rng.randrange(256), rng.randrange(256), rng.randrange(256)))
    fmt = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG"
    img.save(path, format=fmt)
    return path


@dataclass
class Expected:
    """What ``build_benchmark`` must return for a fixture tree."""

    classnames: list[str]
    counts: tuple[int, int, int]  # train, val, test
    folder: str


_counter = 0


def _img(path: Path) -> None:
    global _counter
    _counter += 1
    write_image(path, seed=_counter)


def _json_dataset(
    dataset_dir: Path, split_name: str, prefix: Path, classes: list[tuple[str, list[str]]]
) -> tuple[int, int, int]:
    """Write images and a split JSON: per class the first two files are train, the third val, the fourth test."""
    split: dict[str, list[list[object]]] = {"train": [], "val": [], "test": []}
    for label, (json_name, files) in enumerate(classes):
        assert len(files) == 4
        for j, rel in enumerate(files):
            _img(prefix / rel)
            which = "train" if j < 2 else "val" if j == 2 else "test"
            split[which].append([rel, label, json_name])
    (dataset_dir / f"split_zhou_{split_name}.json").write_text(json.dumps(split, indent=4))
    return len(split["train"]), len(split["val"]), len(split["test"])


def _files(pattern: str, start: int = 1) -> list[str]:
    return [pattern.format(i) for i in range(start, start + 4)]


def _caltech(root: Path) -> Expected:
    d = root / "caltech-101"
    prefix = d / "101_ObjectCategories"
    # Excluded classes exist on disk but are not in the split file.
    _img(prefix / "BACKGROUND_Google" / "image_0001.jpg")
    _img(prefix / "Faces_easy" / "image_0001.jpg")
    classes = [
        ("face", _files("Faces/image_{:04d}.jpg")),
        ("Leopards", _files("Leopards/image_{:04d}.jpg")),  # raw name → "leopard"
        ("motorbike", _files("Motorbikes/image_{:04d}.jpg")),
        ("accordion", _files("accordion/image_{:04d}.jpg")),
        ("airplanes", _files("airplanes/image_{:04d}.jpg")),  # raw name → "airplane"
    ]
    counts = _json_dataset(d, "Caltech101", prefix, classes)
    return Expected(["face", "leopard", "motorbike", "accordion", "airplane"], counts, "caltech-101")


def _pets(root: Path) -> Expected:
    d = root / "oxford_pets"
    (d / "annotations").mkdir(parents=True)
    (d / "annotations" / "trainval.txt").write_text("")
    classes = [
        ("Abyssinian", _files("Abyssinian_{}.jpg")),  # raw capitalised breed → lower-cased
        ("american_bulldog", _files("american_bulldog_{}.jpg")),
        ("bengal", _files("Bengal_{}.jpg")),
    ]
    counts = _json_dataset(d, "OxfordPets", d / "images", classes)
    return Expected(["abyssinian", "american bulldog", "bengal"], counts, "oxford_pets")


def _cars(root: Path) -> Expected:
    d = root / "stanford_cars"
    classes = [
        ("2012 Tesla Model S Sedan", ["cars_train/00001.jpg", "cars_train/00002.jpg", "cars_train/00003.jpg",
                                      "cars_test/00001.jpg"]),
        ("AM General Hummer SUV 2000", ["cars_train/00004.jpg", "cars_train/00005.jpg", "cars_train/00006.jpg",
                                        "cars_test/00002.jpg"]),  # devkit form → year to the front
    ]  # fmt: skip
    counts = _json_dataset(d, "StanfordCars", d, classes)  # paths relative to the dataset folder
    return Expected(["2012 Tesla Model S Sedan", "2000 AM General Hummer SUV"], counts, "stanford_cars")


def _flowers(root: Path) -> Expected:
    d = root / "oxford_flowers"
    names = ["pink primrose", "hard-leaved pocket orchid", "canterbury bells"]
    classes = [(n, _files("image_{:05d}.jpg", start=1 + 4 * i)) for i, n in enumerate(names)]
    counts = _json_dataset(d, "OxfordFlowers", d / "jpg", classes)
    (d / "cat_to_name.json").write_text(json.dumps({str(i + 1): n for i, n in enumerate(names)}))
    return Expected(names, counts, "oxford_flowers")


def _food(root: Path) -> Expected:
    d = root / "food-101"
    names = ["apple_pie", "baby_back_ribs", "baklava"]
    classes = [(n, _files(n + "/{}00.jpg")) for n in names]
    counts = _json_dataset(d, "Food101", d / "images", classes)
    return Expected(["apple pie", "baby back ribs", "baklava"], counts, "food-101")


def _sun(root: Path) -> Expected:
    d = root / "sun397"
    classes = [
        ("abbey", _files("a/abbey/sun_a{}.jpg")),
        ("outdoor apartment_building", _files("a/apartment_building/outdoor/sun_b{}.jpg")),
        ("/a/airport_terminal", _files("a/airport_terminal/sun_c{}.jpg")),  # raw category path
        ("/b/bus_station/indoor", _files("b/bus_station/indoor/sun_d{}.jpg")),  # raw multi-level path
    ]
    counts = _json_dataset(d, "SUN397", d / "SUN397", classes)
    (d / "ClassName.txt").write_text("/a/abbey\n/a/apartment_building/outdoor\n/a/airport_terminal\n")
    expected = ["abbey", "outdoor apartment building", "airport terminal", "indoor bus station"]
    return Expected(expected, counts, "sun397")


def _dtd(root: Path) -> Expected:
    d = root / "dtd"
    names = ["banded", "blotchy", "braided"]
    classes = [(n, _files(n + "/" + n + "_{:04d}.jpg")) for n in names]
    counts = _json_dataset(d, "DescribableTextures", d / "images", classes)
    return Expected(names, counts, "dtd")


def _eurosat(root: Path) -> Expected:
    d = root / "eurosat"
    classes = [
        ("Annual Crop Land", _files("AnnualCrop/AnnualCrop_{}.jpg")),
        ("Forest", _files("Forest/Forest_{}.jpg")),
        ("HerbaceousVegetation", _files("HerbaceousVegetation/HerbaceousVegetation_{}.jpg")),  # raw folder name
        ("SeaLake", _files("SeaLake/SeaLake_{}.jpg")),  # raw folder name
    ]
    counts = _json_dataset(d, "EuroSAT", d / "2750", classes)
    return Expected(["Annual Crop Land", "Forest", "Herbaceous Vegetation Land", "Sea or Lake"], counts, "eurosat")


def _ucf(root: Path) -> Expected:
    d = root / "ucf101"
    classes = [
        ("Apply_Eye_Makeup", _files("Apply_Eye_Makeup/v_ApplyEyeMakeup_g0{}_c01.jpg")),
        ("YoYo", _files("YoYo/v_YoYo_g0{}_c01.jpg")),  # raw CamelCase → "Yo_Yo"
        ("Archery", _files("Archery/v_Archery_g0{}_c01.jpg")),
    ]
    counts = _json_dataset(d, "UCF101", d / "UCF-101-midframes", classes)
    return Expected(["Apply Eye Makeup", "Yo Yo", "Archery"], counts, "ucf101")


FGVC_VARIANTS = ["707-320", "A300B4", "Falcon 2000", "F/A-18"]


def _fgvc(root: Path) -> Expected:
    d = root / "fgvc_aircraft"
    (d / "variants.txt").parent.mkdir(parents=True, exist_ok=True)
    (d / "variants.txt").write_text("\n".join(FGVC_VARIANTS) + "\n")
    rng = random.Random(0)
    lines: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    image_id = 1000000
    for variant in FGVC_VARIANTS:
        for which in ("train", "train", "val", "test"):
            image_id += 7
            _img(d / "images" / f"{image_id:07d}.jpg")
            lines[which].append(f"{image_id:07d} {variant}")
    for which, rows in lines.items():
        rng.shuffle(rows)  # the official files are ordered by image id, not by label
        (d / f"images_variant_{which}.txt").write_text("\n".join(rows) + "\n")
    return Expected(list(FGVC_VARIANTS), (8, 4, 4), "fgvc_aircraft")


IMAGENET_CLASSES = {
    "n01440764": "tench",
    "n01443537": "goldfish",
    "n01484850": "great white shark",
    "n01491361": "tiger shark",
    "n01494475": "hammerhead shark",
    "n01496331": "electric ray",
}


def _write_classnames(path: Path, wnids: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{w} {IMAGENET_CLASSES[w]}\n" for w in wnids))


def _imagenet(root: Path) -> Expected:
    d = root / "imagenet"
    wnids = list(IMAGENET_CLASSES)[:4]
    _write_classnames(d / "classnames.txt", [wnids[2], wnids[0], wnids[3], wnids[1]])  # looked up by wnid
    for w in wnids:
        for j in range(3):
            _img(d / "images" / "train" / w / f"{w}_{j}.JPEG")
        for j in range(2):
            _img(d / "images" / "val" / w / f"ILSVRC2012_val_{w}_{j}.JPEG")
        (d / "images" / "train" / w / ".DS_Store").write_text("not an image")
    return Expected([IMAGENET_CLASSES[w] for w in wnids], (12, 0, 8), "imagenet")


V2_CLASSES = 12


def _imagenet_v2(root: Path) -> Expected:
    d = root / "imagenetv2"
    lines = [f"n{9000 + i:08d} thing_{i}\n" for i in range(V2_CLASSES)]
    (d / "classnames.txt").parent.mkdir(parents=True, exist_ok=True)
    (d / "classnames.txt").write_text("".join(lines))
    total = 0
    for i in range(V2_CLASSES):
        n = 3 if i == 10 else 1  # folder "10" is recognisable by its count
        for j in range(n):
            _img(d / "imagenetv2-matched-frequency-format-val" / str(i) / f"{i}_{j}.jpeg")
        total += n
    return Expected([f"thing {i}" for i in range(V2_CLASSES)], (0, 0, total), "imagenetv2")


def _imagenet_variant(root: Path, folder: str, image_dir: str, wnids: list[str], suffix: str) -> Expected:
    d = root / folder
    _write_classnames(d / "classnames.txt", list(IMAGENET_CLASSES))
    for w in wnids:
        for j in range(2):
            _img(d / image_dir / w / f"{w}_{j}{suffix}")
    (d / image_dir / "README.txt").write_text("readme")
    return Expected([IMAGENET_CLASSES[w] for w in sorted(wnids)], (0, 0, 2 * len(wnids)), folder)


def _sketch(root: Path) -> Expected:
    return _imagenet_variant(root, "imagenet-sketch", "images", list(IMAGENET_CLASSES), ".JPEG")


def _adversarial(root: Path) -> Expected:
    w = list(IMAGENET_CLASSES)
    return _imagenet_variant(root, "imagenet-adversarial", "imagenet-a", [w[5], w[1], w[3]], ".jpg")


def _rendition(root: Path) -> Expected:
    w = list(IMAGENET_CLASSES)
    return _imagenet_variant(root, "imagenet-rendition", "imagenet-r", [w[4], w[0]], ".jpg")


BUILDERS = {
    "imagenet": _imagenet,
    "caltech101": _caltech,
    "oxford_pets": _pets,
    "stanford_cars": _cars,
    "oxford_flowers": _flowers,
    "food101": _food,
    "fgvc_aircraft": _fgvc,
    "sun397": _sun,
    "dtd": _dtd,
    "eurosat": _eurosat,
    "ucf101": _ucf,
    "imagenet_v2": _imagenet_v2,
    "imagenet_sketch": _sketch,
    "imagenet_a": _adversarial,
    "imagenet_r": _rendition,
}


def make_benchmark(root: Path, name: str) -> Expected:
    """Write the tree of benchmark ``name`` (canonical) under the data root ``root``."""
    return BUILDERS[name](Path(root))


def make_all_benchmarks(root: Path) -> dict[str, Expected]:
    """Write all 15 trees under ``root``."""
    return {name: make_benchmark(root, name) for name in BUILDERS}
