"""Users' own data: class folders, CSV/JSON lists, unlabelled folders and deterministic splits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_fixtures import write_image
from promptkd.data.items import DataError, Datum
from promptkd.data.userdata import image_folder, image_list, make_splits, read_classnames, unlabeled_folder


def _class_tree(root: Path, counts: dict[str, int]) -> Path:
    for name, n in counts.items():
        for i in range(n):
            write_image(root / name / f"img_{i}.png", seed=i)
    return root


def test_image_folder_sorted_labels_and_names(tmp_path: Path) -> None:
    root = _class_tree(tmp_path / "pets", {"tabby_cat": 2, "Beagle": 3, "axolotl": 1})
    write_image(root / "axolotl" / "nested" / "deep.JPG")
    (root / "Beagle" / "notes.txt").write_text("not an image")
    data = image_folder(root)
    assert data.classnames == ["Beagle", "axolotl", "tabby cat"]
    assert [(Path(d.path).name, d.label) for d in data.items] == [
        ("img_0.png", 0), ("img_1.png", 0), ("img_2.png", 0),
        ("img_0.png", 1), ("deep.JPG", 1),
        ("img_0.png", 2), ("img_1.png", 2),
    ]  # fmt: skip
    assert data.skipped_rows == []


def test_image_folder_matches_a_class_list_by_name_never_by_position(tmp_path: Path, caplog) -> None:
    root = _class_tree(tmp_path / "d", {"red_star": 1, "Blue Ring": 2})
    names = tmp_path / "names.txt"
    names.write_text("blue ring\n\nred star\ngreen cross\n")  # another order, and one class without images
    with caplog.at_level("WARNING"):
        data = image_folder(root, names)
    assert data.classnames == ["blue ring", "red star", "green cross"]  # labels follow the list
    by_folder = {Path(d.path).parent.name: (d.label, d.classname) for d in data.items}
    assert by_folder == {"Blue Ring": (0, "blue ring"), "red_star": (1, "red star")}
    assert "1 class names have no folder" in caplog.text and "green cross" in caplog.text
    mapping = tmp_path / "map.json"
    mapping.write_text('{"red_star": "n01 star", "Blue Ring": "n02 ring"}')
    assert image_folder(root, mapping).classnames == ["n02 ring", "n01 star"]  # folder -> name map, folder order


def test_image_folder_refuses_folders_without_a_name(tmp_path: Path) -> None:
    root = _class_tree(tmp_path / "d", {"a": 1, "b": 1, "c": 1})
    names = tmp_path / "names.txt"
    names.write_text("a\nb\n")
    with pytest.raises(DataError) as info:
        image_folder(root, names)
    msg = str(info.value)
    assert msg.startswith(f"{names}: 1 of 3 class folders match no name in the class list")
    assert "    c" in msg and "never by position" in msg  # the folder is listed
    (tmp_path / "partial.json").write_text('{"a": "x"}')
    with pytest.raises(DataError, match="2 class folders are not in the folder-to-name map"):
        image_folder(root, tmp_path / "partial.json")


def test_image_folder_empty_class_folder(tmp_path: Path) -> None:
    root = _class_tree(tmp_path / "d", {"a": 1, "c": 1})
    (root / "b_empty").mkdir()
    (root / "b_empty" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="class folder contains no images") as info:
        image_folder(root)
    assert info.value.path == str(root / "b_empty")


def test_image_folder_missing_or_flat(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="image folder not found"):
        image_folder(tmp_path / "nope")
    write_image(tmp_path / "flat" / "x.png")
    with pytest.raises(DataError, match="no class sub-folders"):
        image_folder(tmp_path / "flat")


def test_read_classnames_warns_on_duplicates_and_rejects_bad_json(tmp_path: Path, caplog) -> None:
    with caplog.at_level("WARNING"):
        assert read_classnames(["cat", "dog", "cat"]) == ["cat", "dog", "cat"]  # kept by position (ImageNet has some)
    assert "used more than once: 'cat' (2x)" in caplog.text
    bad = tmp_path / "names.json"
    bad.write_text('["a", "b",\n')
    with pytest.raises(DataError, match=r"names\.json:2: class-name file is not valid JSON"):
        read_classnames(bad)
    good = tmp_path / "good.json"
    good.write_text('["a", "b"]')
    assert read_classnames(good) == ["a", "b"]


def _images(tmp_path: Path, n: int = 4) -> list[Path]:
    return [write_image(tmp_path / "imgs" / f"{i}.jpg", seed=i) for i in range(n)]


def test_image_list_csv_with_classnames(tmp_path: Path) -> None:
    _images(tmp_path)
    csv_path = tmp_path / "list.csv"
    csv_path.write_text("path,label,classname\nimgs/0.jpg,1,dog\nimgs/1.jpg,0,cat\n\nimgs/2.jpg,1,dog\n")
    data = image_list(csv_path)
    assert data.classnames == ["cat", "dog"]
    assert [(Path(d.path), d.label, d.classname) for d in data.items] == [
        (tmp_path / "imgs" / "0.jpg", 1, "dog"),
        (tmp_path / "imgs" / "1.jpg", 0, "cat"),
        (tmp_path / "imgs" / "2.jpg", 1, "dog"),
    ]


def test_image_list_csv_with_class_list_and_absolute_paths(tmp_path: Path) -> None:
    imgs = _images(tmp_path)
    csv_path = tmp_path / "sub" / "list.csv"
    csv_path.parent.mkdir()
    csv_path.write_text(f"label,path\n2,{imgs[0]}\n0,../imgs/1.jpg\n")
    data = image_list(csv_path, ["a", "b", "c"])
    assert [(d.path, d.label, d.classname) for d in data.items] == [
        (str(imgs[0]), 2, "c"),
        (str(imgs[1]), 0, "a"),
    ]
    assert data.classnames == ["a", "b", "c"]


def test_image_list_csv_bad_row_names_line(tmp_path: Path) -> None:
    _images(tmp_path)
    csv_path = tmp_path / "list.csv"
    csv_path.write_text("path,label,classname\nimgs/0.jpg,0,cat\nimgs/1.jpg,zero,cat\nimgs/2.jpg,1,dog\n")
    with pytest.raises(DataError) as info:
        image_list(csv_path)
    assert str(info.value).startswith(f"{csv_path}:3: bad row: label 'zero' is not an integer")
    assert info.value.line == 3


def test_image_list_skip_bad_rows_counts_them(tmp_path: Path) -> None:
    _images(tmp_path)
    csv_path = tmp_path / "list.csv"
    csv_path.write_text(
        "path,label,classname\n"
        "imgs/0.jpg,0,cat\n"
        "imgs/1.jpg,zero,cat\n"  # line 3: bad label
        "imgs/2.jpg\n"  # line 4: too few fields
        "imgs/3.jpg,1,dog\n"
        "imgs/missing.jpg,1,dog\n"  # line 6: missing file
        "imgs/2.jpg,0,kitten\n"  # line 7: conflicting name
    )
    data = image_list(csv_path, skip_bad_rows=True)
    assert [Path(d.path).name for d in data.items] == ["0.jpg", "3.jpg"]
    assert data.classnames == ["cat", "dog"]
    assert len(data.skipped_rows) == 4
    assert [r.split(": ")[0] for r in data.skipped_rows] == [f"{csv_path}:{n}" for n in (3, 4, 7, 6)]
    assert "image not found" in data.skipped_rows[3]


def test_image_list_label_outside_class_list(tmp_path: Path) -> None:
    _images(tmp_path)
    csv_path = tmp_path / "list.csv"
    csv_path.write_text("path,label\nimgs/0.jpg,0\nimgs/1.jpg,2\n")
    with pytest.raises(DataError, match=r"list\.csv:3: bad row: label 2 is outside the class list \(0\.\.1\)"):
        image_list(csv_path, ["cat", "dog"])


def test_image_list_needs_class_names(tmp_path: Path) -> None:
    _images(tmp_path)
    csv_path = tmp_path / "list.csv"
    csv_path.write_text("path,label\nimgs/0.jpg,0\n")
    with pytest.raises(DataError, match="no class names"):
        image_list(csv_path)


def test_image_list_bad_header(tmp_path: Path) -> None:
    csv_path = tmp_path / "list.csv"
    csv_path.write_text("file,target\nimgs/0.jpg,0\n")
    with pytest.raises(DataError, match=r"list\.csv:1: CSV header is \['file', 'target'\]"):
        image_list(csv_path, ["a"])


def test_image_list_missing_files_listed(tmp_path: Path) -> None:
    _images(tmp_path, 1)
    csv_path = tmp_path / "list.csv"
    csv_path.write_text("path,label\nimgs/0.jpg,0\nimgs/gone.jpg,0\n")
    with pytest.raises(DataError, match=r"1 of 2 listed image files do not exist:\n.*gone\.jpg"):
        image_list(csv_path, ["a"])
    assert len(image_list(csv_path, ["a"], check=False).items) == 2


def test_image_list_json_forms(tmp_path: Path) -> None:
    _images(tmp_path)
    js = tmp_path / "list.json"
    js.write_text(json.dumps([["imgs/0.jpg", 0], {"path": "imgs/1.jpg", "label": 1}, ["imgs/2.jpg", "1"]]))
    data = image_list(js, ["cat", "dog"])
    assert [(Path(d.path).name, d.label, d.classname) for d in data.items] == [
        ("0.jpg", 0, "cat"),
        ("1.jpg", 1, "dog"),
        ("2.jpg", 1, "dog"),
    ]
    js.write_text(json.dumps([["imgs/0.jpg", 0, "cat"], ["imgs/1.jpg", 1, "dog"]]))
    assert image_list(js).classnames == ["cat", "dog"]
    js.write_text(json.dumps([["imgs/0.jpg", 0], ["imgs/1.jpg"]]))
    with pytest.raises(DataError, match=r"list\.json: bad row: entry 1 is not \[path, label\]"):
        image_list(js, ["cat"])


def test_image_list_labels_must_be_contiguous_without_class_list(tmp_path: Path) -> None:
    _images(tmp_path)
    csv_path = tmp_path / "list.csv"
    csv_path.write_text("path,label,classname\nimgs/0.jpg,0,cat\nimgs/1.jpg,2,dog\n")
    with pytest.raises(DataError, match="unused labels: 1"):
        image_list(csv_path)


def test_unlabeled_folder_recursive_sorted_case_insensitive(tmp_path: Path) -> None:
    root = tmp_path / "u"
    for rel in ("b/2.PNG", "a/z.jpeg", "a/deeper/x.WebP", "c.TIF", "top.bmp", "a/.hidden.png"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"")  # content is irrelevant for listing
    (root / "notes.txt").write_text("x")
    paths = unlabeled_folder(root)
    assert [Path(p).relative_to(root).as_posix() for p in paths] == [
        "a/deeper/x.WebP",
        "a/z.jpeg",
        "b/2.PNG",
        "c.TIF",
        "top.bmp",
    ]


def test_unlabeled_folder_empty(tmp_path: Path) -> None:
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "a.txt").write_text("x")
    with pytest.raises(DataError, match="no images found") as info:
        unlabeled_folder(tmp_path / "empty")
    assert info.value.path == str(tmp_path / "empty")


def _items(n_per_class: list[int]) -> list[Datum]:
    return [Datum(f"/u/{y}/{i:02d}.jpg", y, f"c{y}") for y, n in enumerate(n_per_class) for i in range(n)]


def test_make_splits_per_class_and_deterministic() -> None:
    items = _items([10, 5, 3])
    s = make_splits(items, ["c0", "c1", "c2"], 0.2, 0.3, seed=1)
    counts = [[sum(d.label == y for d in part) for part in (s.train, s.val, s.test)] for y in range(3)]
    # n_train = round(n * 0.5), n_val = round(n * 0.2), test = rest (round half to even)
    assert counts == [[5, 2, 3], [2, 1, 2], [2, 1, 0]]
    assert s.root == "/u" and s.classnames == ["c0", "c1", "c2"]
    again = make_splits(list(reversed(items)), ["c0", "c1", "c2"], 0.2, 0.3, seed=1)
    assert (again.train, again.val, again.test) == (s.train, s.val, s.test)  # input order does not matter
    other = make_splits(items, ["c0", "c1", "c2"], 0.2, 0.3, seed=2)
    assert other.train != s.train
    assert sorted(d.path for d in [*s.train, *s.val, *s.test]) == sorted(d.path for d in items)


def test_make_splits_rejects_class_without_training_items() -> None:
    with pytest.raises(DataError, match=r"class 'c1' \(label 1\) has 1 images"):
        make_splits(_items([4, 1]), ["c0", "c1"], 0.4, 0.4, seed=0)
    with pytest.raises(ValueError, match="val \\+ test < 1"):
        make_splits(_items([4]), ["c0"], 0.5, 0.5, seed=0)


def test_class_lists_that_are_not_utf8_are_one_message(tmp_path: Path) -> None:
    """A Latin-1 class list (text or JSON) is a DataError naming the file, line and byte, never UnicodeDecodeError."""
    text = tmp_path / "classes.txt"
    text.write_bytes("red star\ncaf\u00e9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"classes\.txt:2: class-name file is not UTF-8 text \(byte 0xe9"):
        read_classnames(text)
    as_json = tmp_path / "classes.json"
    as_json.write_bytes('["caf\u00e9"]'.encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8 text"):
        read_classnames(as_json)
    text.write_text("red star\ncaf\u00e9\n", encoding="utf-8")
    assert read_classnames(text) == ["red star", "caf\u00e9"]


def test_own_splits_say_how_they_were_made(tmp_path: Path) -> None:
    items = [Datum(str(tmp_path / f"{c}{i}.png"), c, f"c{c}") for c in range(2) for i in range(10)]
    splits = make_splits(items, ["c0", "c1"])
    assert splits.notes == ["images split per class 50/20/30 into train/val/test by promptkd (CoOp's rule, seeded)"]


def test_image_lists_that_are_not_utf8_are_one_message(tmp_path: Path) -> None:
    lists = {"list.csv": "path,label,classname\na.png,0,caf\u00e9\n", "list.json": '[["caf\u00e9.png", 0]]'}
    for name, body in lists.items():
        (tmp_path / name).write_bytes(body.encode("latin-1"))
        with pytest.raises(DataError, match=rf"{name}:\d: image list is not UTF-8 text"):
            image_list(tmp_path / name, ["cafe"])
