"""Benchmark readers, templates, the image dataset and data errors, on tiny fixture trees."""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from data_fixtures import V2_CLASSES, make_all_benchmarks, make_benchmark, write_image
from promptkd.data.benchmarks import (
    BENCHMARKS,
    UnknownDatasetError,
    build_benchmark,
    list_benchmarks,
    resolve_name,
)
from promptkd.data.items import DataError, DatasetSplits, Datum, ImageDataset, check_files
from promptkd.data.templates import (
    DATASET_TEMPLATES,
    IMAGENET_TEMPLATES_SELECT,
    OPENAI_IMAGENET_TEMPLATES,
    ensemble_templates,
)
from promptkd.errors import PromptKDError

ALL = [
    "imagenet",
    "caltech101",
    "oxford_pets",
    "stanford_cars",
    "oxford_flowers",
    "food101",
    "fgvc_aircraft",
    "sun397",
    "dtd",
    "eurosat",
    "ucf101",
    "imagenet_v2",
    "imagenet_sketch",
    "imagenet_a",
    "imagenet_r",
]

TEMPLATES = {
    "oxford_pets": "a photo of a {}, a type of pet.",
    "oxford_flowers": "a photo of a {}, a type of flower.",
    "fgvc_aircraft": "a photo of a {}, a type of aircraft.",
    "dtd": "{} texture.",
    "eurosat": "a centered satellite photo of {}.",
    "food101": "a photo of {}, a type of food.",
    "ucf101": "a photo of a person doing {}.",
}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("data")
    return root, make_all_benchmarks(root)


def test_registry_has_the_15_benchmarks() -> None:
    assert list_benchmarks() == ALL
    assert {s.dassl_name for s in BENCHMARKS.values()} == {
        "ImageNet", "Caltech101", "OxfordPets", "StanfordCars", "OxfordFlowers", "Food101", "FGVCAircraft",
        "SUN397", "DescribableTextures", "EuroSAT", "UCF101", "ImageNetV2", "ImageNetSketch", "ImageNetA",
        "ImageNetR",
    }  # fmt: skip


@pytest.mark.parametrize("name", ALL)
def test_every_benchmark_parses(name: str, data_root: tuple[Path, dict]) -> None:
    root, expected = data_root
    exp = expected[name]
    splits = build_benchmark(name, root)
    assert splits.name == name
    assert splits.classnames == exp.classnames
    assert (len(splits.train), len(splits.val), len(splits.test)) == exp.counts
    assert splits.num_classes == len(exp.classnames)
    assert splits.root == str(root / exp.folder)
    assert splits.template == TEMPLATES.get(name, "a photo of a {}.")
    splits.validate()
    for d in [*splits.train, *splits.val, *splits.test]:
        assert os.path.isabs(d.path) and os.path.isfile(d.path), d.path
        assert d.classname == exp.classnames[d.label]
        assert "_" not in d.classname
    # every class appears in the evaluated split
    assert {d.label for d in splits.test} == set(range(len(exp.classnames)))


@pytest.mark.parametrize(
    ("spelling", "canonical"),
    [
        ("ImageNet", "imagenet"),
        ("OxfordPets", "oxford_pets"),
        ("StanfordCars", "stanford_cars"),
        ("DescribableTextures", "dtd"),
        ("FGVCAircraft", "fgvc_aircraft"),
        ("ImageNetV2", "imagenet_v2"),
        ("imagenetv2", "imagenet_v2"),
        ("ImageNetSketch", "imagenet_sketch"),
        ("imagenet-a", "imagenet_a"),
        ("ImageNetR", "imagenet_r"),
        ("caltech-101", "caltech101"),
        ("food-101", "food101"),
        ("flowers102", "oxford_flowers"),
        ("EuroSAT", "eurosat"),
    ],
)
def test_dassl_names_and_aliases_resolve(spelling: str, canonical: str) -> None:
    assert resolve_name(spelling) == canonical


def test_unknown_name_suggests_close_match() -> None:
    with pytest.raises(UnknownDatasetError, match=r"Did you mean 'oxford_pets'") as info:
        resolve_name("oxford_pet")
    assert "Known datasets" in str(info.value)
    assert isinstance(info.value, PromptKDError) and isinstance(info.value, ValueError)
    with pytest.raises(ValueError, match=r"Did you mean 'imagenet_sketch'"):
        build_benchmark("imagenet_skech", "/nonexistent")


def test_imagenet_v2_maps_integer_folders_by_value(data_root: tuple[Path, dict]) -> None:
    root, _ = data_root
    splits = build_benchmark("ImageNetV2", root)
    in_10 = [d for d in splits.test if Path(d.path).parent.name == "10"]
    assert len(in_10) == 3
    assert {d.label for d in in_10} == {10}
    assert {d.classname for d in in_10} == {"thing 10"}
    # Every folder's label equals int(folder name): a string sort would give "10" label 2.
    assert all(d.label == int(Path(d.path).parent.name) for d in splits.test)
    assert splits.num_classes == V2_CLASSES


def test_imagenet_has_no_val_and_is_marked(data_root: tuple[Path, dict]) -> None:
    root, _ = data_root
    splits = build_benchmark("imagenet", root)
    assert splits.val == []
    assert any("no held-out validation" in n for n in splits.notes)
    # labels follow the sorted wnid folders, names are looked up by wnid (classnames.txt is shuffled)
    assert [Path(d.path).parent.name for d in splits.train[::3]] == ["n01440764", "n01443537", "n01484850", "n01491361"]
    assert all(d.path.endswith(".JPEG") for d in splits.train)  # .DS_Store skipped


def test_domain_shift_variants_are_test_only(data_root: tuple[Path, dict]) -> None:
    root, _ = data_root
    for name in ("imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r"):
        splits = build_benchmark(name, root)
        assert splits.train == [] and splits.val == []
        assert splits.test_only
    a = build_benchmark("imagenet_a", root)
    # labels enumerate the sorted wnid folders present (a subset of classnames.txt)
    assert [(Path(d.path).parent.name, d.label) for d in a.test[::2]] == [
        ("n01443537", 0),
        ("n01491361", 1),
        ("n01496331", 2),
    ]


def test_fgvc_labels_follow_variants_file(data_root: tuple[Path, dict]) -> None:
    root, _ = data_root
    splits = build_benchmark("fgvc_aircraft", root)
    lines = (root / "fgvc_aircraft" / "images_variant_train.txt").read_text().splitlines()
    # items keep file order; label = position of the variant in variants.txt
    first_id, *variant = lines[0].split(" ")
    assert splits.train[0].path == str(root / "fgvc_aircraft" / "images" / f"{first_id}.jpg")
    assert splits.train[0].label == splits.classnames.index(" ".join(variant))
    assert splits.classnames.index("Falcon 2000") == 2


def test_caltech_excluded_classes_not_read(data_root: tuple[Path, dict]) -> None:
    root, _ = data_root
    splits = build_benchmark("caltech101", root)
    paths = [d.path for d in [*splits.train, *splits.val, *splits.test]]
    assert not any("BACKGROUND_Google" in p or "Faces_easy" in p for p in paths)


def test_stanford_cars_paths_relative_to_dataset_folder(data_root: tuple[Path, dict]) -> None:
    root, _ = data_root
    splits = build_benchmark("stanford_cars", root)
    assert splits.test[0].path == str(root / "stanford_cars" / "cars_test" / "00001.jpg")


def test_root_may_be_the_dataset_folder(data_root: tuple[Path, dict]) -> None:
    root, expected = data_root
    splits = build_benchmark("dtd", root / "dtd")
    assert splits.classnames == expected["dtd"].classnames


def test_missing_dataset_folder_names_folder_and_source(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        build_benchmark("oxford_pets", tmp_path)
    msg = str(info.value)
    assert str(tmp_path / "oxford_pets") in msg
    assert "split_zhou_OxfordPets.json" in msg
    assert "DATASETS.md" in msg
    assert info.value.path == str(tmp_path / "oxford_pets")


def test_missing_split_file(tmp_path: Path) -> None:
    make_benchmark(tmp_path, "dtd")
    (tmp_path / "dtd" / "split_zhou_DescribableTextures.json").unlink()
    with pytest.raises(DataError, match=r"split_zhou_DescribableTextures\.json") as info:
        build_benchmark("dtd", tmp_path)
    assert "CoOp" in str(info.value)


def test_missing_imagenet_classnames(tmp_path: Path) -> None:
    make_benchmark(tmp_path, "imagenet_r")
    (tmp_path / "imagenet-rendition" / "classnames.txt").unlink()
    with pytest.raises(DataError, match=r"imagenet-rendition.classnames\.txt"):
        build_benchmark("imagenet_r", tmp_path)


def test_split_file_naming_missing_images_lists_them(tmp_path: Path) -> None:
    make_benchmark(tmp_path, "food101")
    split_path = tmp_path / "food-101" / "split_zhou_Food101.json"
    split = json.loads(split_path.read_text())
    split["test"].append(["apple_pie/ghost.jpg", 0, "apple_pie"])
    split_path.write_text(json.dumps(split))
    os.remove(tmp_path / "food-101" / "images" / "baklava" / "100.jpg")
    with pytest.raises(DataError) as info:
        build_benchmark("food101", tmp_path)
    msg = str(info.value)
    assert msg.startswith(str(split_path))
    assert "2 of 13 listed image files do not exist" in msg
    assert str(tmp_path / "food-101" / "images" / "apple_pie" / "ghost.jpg") in msg
    assert str(tmp_path / "food-101" / "images" / "baklava" / "100.jpg") in msg
    # check=False skips the existence check
    assert len(build_benchmark("food101", tmp_path, check=False).test) == 4


def _edit_split(path: Path, fn) -> None:
    split = json.loads(path.read_text())
    fn(split)
    path.write_text(json.dumps(split))


def test_label_with_two_names_is_rejected(tmp_path: Path) -> None:
    make_benchmark(tmp_path, "dtd")
    split_path = tmp_path / "dtd" / "split_zhou_DescribableTextures.json"
    _edit_split(split_path, lambda s: s["test"][0].__setitem__(2, "striped"))
    with pytest.raises(DataError, match=r"label 0 has two class names, 'banded' and 'striped'"):
        build_benchmark("dtd", tmp_path)


def test_non_contiguous_labels_are_rejected(tmp_path: Path) -> None:
    make_benchmark(tmp_path, "dtd")
    split_path = tmp_path / "dtd" / "split_zhou_DescribableTextures.json"

    def shift(split: dict) -> None:
        for which in ("train", "val", "test"):
            for entry in split[which]:
                if entry[1] == 2:
                    entry[1] = 5

    _edit_split(split_path, shift)
    with pytest.raises(DataError, match=r"labels are not 0\.\.5.*2, 3, 4"):
        build_benchmark("dtd", tmp_path)


def test_fgvc_unknown_variant_names_line(tmp_path: Path) -> None:
    make_benchmark(tmp_path, "fgvc_aircraft")
    path = tmp_path / "fgvc_aircraft" / "images_variant_val.txt"
    lines = path.read_text().splitlines()
    image_id = lines[2].split(" ")[0]
    lines[2] = f"{image_id} Falcon 20000"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as info:
        build_benchmark("fgvc_aircraft", tmp_path)
    assert str(info.value).startswith(f"{path}:3: variant 'Falcon 20000'")
    assert info.value.line == 3
    assert "did you mean 'Falcon 2000'" in str(info.value)


def test_imagenet_v2_rejects_non_index_folders(tmp_path: Path) -> None:
    make_benchmark(tmp_path, "imagenet_v2")
    image_dir = tmp_path / "imagenetv2" / "imagenetv2-matched-frequency-format-val"
    shutil.move(image_dir / "11", image_dir / "12")
    with pytest.raises(DataError, match=r"not class indices 0\.\.11:\n\s+12"):
        build_benchmark("imagenet_v2", tmp_path)


def _open_clip_templates() -> list[str]:
    """open_clip's copy of the 80 templates, loaded from its file alone (importing open_clip takes seconds)."""
    spec = importlib.util.find_spec("open_clip")
    assert spec is not None and spec.submodule_search_locations
    path = Path(spec.submodule_search_locations[0]) / "zero_shot_metadata.py"
    module_spec = importlib.util.spec_from_file_location("_oc_zero_shot_metadata", path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return [t("{}") for t in module.OPENAI_IMAGENET_TEMPLATES]


def test_templates_match_published_lists() -> None:
    assert list(OPENAI_IMAGENET_TEMPLATES) == _open_clip_templates()
    assert len(OPENAI_IMAGENET_TEMPLATES) == 80
    assert len(IMAGENET_TEMPLATES_SELECT) == 7
    assert set(IMAGENET_TEMPLATES_SELECT) <= set(OPENAI_IMAGENET_TEMPLATES)
    assert set(DATASET_TEMPLATES) == set(ALL)
    assert ensemble_templates("imagenet") == list(IMAGENET_TEMPLATES_SELECT)
    assert ensemble_templates("dtd")[-1] == "{} texture."
    assert len(ensemble_templates("dtd")) == 8


# --- ImageDataset and file checks -------------------------------------------------------------------------------


def _corrupt_dataset(tmp_path: Path) -> tuple[list[Datum], Path]:
    good = [write_image(tmp_path / f"good{i}.png", seed=i) for i in range(3)]
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"this is not a jpeg at all")
    items = [
        Datum(str(good[0]), 0, "a"),
        Datum(str(bad), 1, "b"),
        Datum(str(good[1]), 2, "c"),
        Datum(str(good[2]), 3, "d"),
    ]
    return items, bad


def test_corrupt_image_raises_naming_the_file(tmp_path: Path) -> None:
    items, bad = _corrupt_dataset(tmp_path)
    ds = ImageDataset(items)
    img, label = ds[0]
    assert img.size == (8, 8) and img.mode == "RGB" and label == 0
    with pytest.raises(DataError) as info:
        ds[1]
    assert info.value.path == str(bad)
    assert str(bad) in str(info.value) and "skip_bad=True" in str(info.value)


def test_skip_bad_replaces_with_next_good_and_counts(tmp_path: Path) -> None:
    items, bad = _corrupt_dataset(tmp_path)
    ds = ImageDataset(items, transform=lambda im: torch.tensor(im.getpixel((0, 0))), skip_bad=True, return_index=True)
    x, label, index = ds[1]
    assert (label, index) == (2, 2)
    assert torch.equal(x, ds[2][0])
    ds[1]
    assert ds.skipped == [str(bad)]  # recorded once


def test_truncated_jpeg_is_a_data_error(tmp_path: Path) -> None:
    path = write_image(tmp_path / "full.jpg", size=64)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="cannot read image") as info:
        ImageDataset([str(path)])[0]
    assert info.value.path == str(path)


def test_verify_reports_all_bad_or_drops_them(tmp_path: Path) -> None:
    items, bad = _corrupt_dataset(tmp_path)
    missing = Datum(str(tmp_path / "missing.png"), 0, "a")
    with pytest.raises(DataError, match=r"2 of 5 images are missing or unreadable") as info:
        ImageDataset([*items, missing]).verify()
    assert str(bad) in str(info.value) and missing.path in str(info.value)
    ds = ImageDataset([*items, missing], skip_bad=True)
    assert ds.verify() == [str(bad), missing.path]
    assert len(ds) == 3 and ds.skipped == [str(bad), missing.path]
    assert ds.labels == [0, 2, 3]


def test_unlabelled_paths_and_dataloader(tmp_path: Path) -> None:
    paths = [write_image(tmp_path / f"{i}.png", seed=i) for i in range(4)]
    ds = ImageDataset(paths, transform=lambda im: torch.from_numpy(np.asarray(im, dtype=np.float32).reshape(-1, 3)))
    loader = torch.utils.data.DataLoader(ds, batch_size=2)
    batches = list(loader)
    assert len(batches) == 2
    assert batches[0][0].shape == (2, 64, 3)
    assert batches[0][1].tolist() == [-1, -1]


def test_check_files_lists_first_ten_and_count(tmp_path: Path) -> None:
    items = [str(tmp_path / f"missing_{i:02d}.jpg") for i in range(12)]
    items.append(str(write_image(tmp_path / "present.png")))
    with pytest.raises(DataError) as info:
        check_files(items, source=tmp_path / "list.csv")
    msg = str(info.value)
    assert msg.startswith(f"{tmp_path / 'list.csv'}: 12 of 13 listed image files do not exist")
    assert "missing_09.jpg" in msg and "missing_10.jpg" not in msg
    assert "... and 2 more (12 in total)" in msg
    check_files(items[-1:])  # no error


def test_data_error_survives_pickling_and_worker_reraise() -> None:
    err = DataError("broken", path="/x/y.json", line=7, expected="a thing", fix="do it")
    assert str(err).splitlines()[0] == "/x/y.json:7: broken"
    again = pickle.loads(pickle.dumps(err))
    assert str(again) == str(err) and again.path == "/x/y.json" and again.line == 7
    assert str(DataError("whole message")) == "whole message"  # how DataLoader workers re-raise
    assert isinstance(err, PromptKDError) and isinstance(err, ValueError)


def test_splits_validate_catches_bad_labels() -> None:
    s = DatasetSplits("x", ["a", "b"], [Datum("/p", 2, "a")], [], [], "{}")
    with pytest.raises(DataError, match=r"label 2, outside 0\.\.1"):
        s.validate()
    s = DatasetSplits("x", ["a", "b"], [Datum("/p", 1, "a")], [], [], "{}")
    with pytest.raises(DataError, match="class name 'a' but label 1 is 'b'"):
        s.validate()
