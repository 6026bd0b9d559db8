"""Few-shot sampling (against a re-statement of the reference rule), the few-shot cache, and base/new splits."""

from __future__ import annotations

import json
import os
import random
import shutil
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest

from data_fixtures import make_benchmark
from promptkd.data.benchmarks import build_benchmark
from promptkd.data.items import DataError, DatasetSplits, Datum
from promptkd.data.sampling import (
    base_new_labels,
    few_shot_cache_path,
    few_shot_splits,
    sample_few_shot,
    subsample_classes,
    val_shots,
)


@pytest.fixture
def global_random() -> Iterator[None]:
    """The reference uses the global generator; restore its state so other tests are unaffected."""
    state = random.getstate()
    yield
    random.setstate(state)


def _reference_fewshot(data: list[Datum], num_shots: int) -> list[Datum]:
    """Dassl's generate_fewshot_dataset, stated independently: defaultdict grouping, global random."""
    tracker: dict[int, list[Datum]] = defaultdict(list)
    for item in data:
        tracker[item.label].append(item)
    out: list[Datum] = []
    for items in tracker.values():
        out.extend(random.sample(items, num_shots) if len(items) >= num_shots else items)
    return out


def _interleaved(n_classes: int, sizes: list[int], tag: str = "train") -> list[Datum]:
    """Items whose labels first appear out of order (like FGVCAircraft's id-ordered files)."""
    items = []
    order = list(range(n_classes))
    random.Random(123).shuffle(order)
    for round_ in range(max(sizes)):
        for y in order:
            if round_ < sizes[y]:
                items.append(Datum(f"/d/{tag}/{y}_{round_}.jpg", y, f"c{y}"))
    return items


def _synthetic_splits(n_classes: int, per_class: int = 6, name: str = "synth", root: str = "/d") -> DatasetSplits:
    def make(which: str, k: int) -> list[Datum]:
        return [Datum(f"{root}/{which}/{y}_{i}.jpg", y, f"class_{y}") for y in range(n_classes) for i in range(k)]

    return DatasetSplits(
        name, [f"class_{y}" for y in range(n_classes)], make("train", per_class), make("val", 3), make("test", 2),
        "a photo of a {}.", root=root,
    )  # fmt: skip


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("k", [1, 2, 4, 16])
def test_sample_few_shot_equals_reference(seed: int, k: int, global_random: None) -> None:
    sizes = [20, 3, 16, 7, 30, 1]
    items = _interleaved(6, sizes)
    random.seed(seed)
    expected = _reference_fewshot(items, k)
    got = sample_few_shot(items, k, seed)
    assert got == expected
    per_class = {y: sum(d.label == y for d in got) for y in range(6)}
    assert per_class == {y: min(k, n) for y, n in enumerate(sizes)}
    assert len(set(got)) == len(got)  # without replacement


def test_sorted_label_order_option(global_random: None) -> None:
    items = _interleaved(5, [9, 9, 9, 9, 9])
    by_label = sorted(items, key=lambda d: d.label)  # stable: keeps within-label order
    random.seed(7)
    expected = _reference_fewshot(by_label, 3)
    assert sample_few_shot(items, 3, 7, label_order="sorted") == expected
    assert sample_few_shot(items, 3, 7) != expected  # first-seen order differs for this list


def test_sample_few_shot_k_below_one_returns_all() -> None:
    items = _interleaved(3, [4, 4, 4])
    assert sample_few_shot(items, 0, 1) == items
    assert sample_few_shot(items, -1, 1) == items


def test_val_shots_rule() -> None:
    assert [val_shots(k) for k in (1, 2, 4, 8, 16)] == [1, 2, 4, 4, 4]


@pytest.mark.parametrize("k", [1, 2, 8, 16])
def test_few_shot_splits_match_reference_stream(k: int, global_random: None) -> None:
    splits = _synthetic_splits(5, per_class=20)
    splits.val = [Datum(f"/d/val/{y}_{i}.jpg", y, f"class_{y}") for y in range(5) for i in range(6)]
    random.seed(3)
    exp_train = _reference_fewshot(splits.train, k)
    exp_val = _reference_fewshot(splits.val, min(k, 4))  # same global stream, after train
    out = few_shot_splits(splits, k, 3)
    assert out.train == exp_train
    assert out.val == exp_val
    assert len(out.val) == 5 * min(k, 4)
    assert out.test == splits.test
    assert out.classnames == splits.classnames


def test_few_shot_cache_outside_root_reused_and_portable(tmp_path: Path) -> None:
    data = tmp_path / "data"
    make_benchmark(data, "eurosat")
    cache = tmp_path / "cache"
    splits = build_benchmark("eurosat", data)
    first = few_shot_splits(splits, 1, 5, cache_dir=cache)
    assert [sum(d.label == y for d in first.train) for y in range(4)] == [1, 1, 1, 1]
    assert len(first.val) == 4

    path = Path(few_shot_cache_path(cache, "eurosat", 1, 5))
    assert path == cache / "eurosat" / "shot_1-seed_5.json" and path.is_file()
    assert not any(p.name.endswith(".json") and "shot_" in p.name for p in (data / "eurosat").rglob("*"))
    payload = json.loads(path.read_text())
    assert payload["shots"] == 1 and payload["val_shots"] == 1 and payload["seed"] == 5
    assert all(not os.path.isabs(rel) for rel, _, _ in payload["train"])
    assert payload["train"][0][0].startswith("2750" + os.sep)

    # Reuse: an edited cache (one train item dropped) is what comes back.
    payload["train"] = payload["train"][1:]
    path.write_text(json.dumps(payload))
    again = few_shot_splits(splits, 1, 5, cache_dir=cache)
    assert again.train == first.train[1:]
    assert again.val == first.val

    # Portable: the moved dataset reads the same cache, with paths under the new location.
    moved = tmp_path / "moved"
    shutil.copytree(data, moved)
    moved_splits = build_benchmark("eurosat", moved)
    from_moved = few_shot_splits(moved_splits, 1, 5, cache_dir=cache)
    assert len(from_moved.train) == 3
    assert all(d.path.startswith(str(moved)) and os.path.isfile(d.path) for d in from_moved.train)
    assert [Path(d.path).relative_to(moved) for d in from_moved.train] == [
        Path(d.path).relative_to(data) for d in again.train
    ]


def test_stale_cache_is_rebuilt(tmp_path: Path) -> None:
    splits = _synthetic_splits(3, per_class=10)
    cache = tmp_path / "cache"
    first = few_shot_splits(splits, 2, 1, cache_dir=cache)
    splits.train = splits.train[1:]  # source changed → fingerprint differs
    second = few_shot_splits(splits, 2, 1, cache_dir=cache)
    assert second.train == sample_few_shot(splits.train, 2, 1)
    assert second.train != first.train
    payload = json.loads(Path(few_shot_cache_path(cache, "synth", 2, 1)).read_text())
    assert [rel for rel, _, _ in payload["train"]] == [os.path.relpath(d.path, "/d") for d in second.train]


def test_cache_inside_data_root_is_refused(tmp_path: Path) -> None:
    splits = _synthetic_splits(2, root=str(tmp_path / "data"))
    with pytest.raises(DataError, match="inside the dataset folder"):
        few_shot_splits(splits, 1, 1, cache_dir=tmp_path / "data" / "split_fewshot")


def test_strict_names_smallest_class() -> None:
    splits = _synthetic_splits(4, per_class=8)
    splits.train = [d for d in splits.train if not (d.label == 2 and d.path.endswith(("_5.jpg", "_6.jpg", "_7.jpg")))]
    splits.train = [d for d in splits.train if not (d.label == 1 and d.path.endswith("_7.jpg"))]
    with pytest.raises(DataError, match=r"class 'class_2' \(label 2\) has only 5 train items.*2 classes are short"):
        few_shot_splits(splits, 8, 1, strict=True)
    relaxed = few_shot_splits(splits, 8, 1)  # reference: take all items of short classes
    assert [sum(d.label == y for d in relaxed.train) for y in range(4)] == [8, 7, 5, 8]
    assert len(few_shot_splits(splits, 3, 1, strict=True).train) == 12
    # val needs min(K, 4) = 4 items per class, but every class has 3
    with pytest.raises(DataError, match=r"has only 3 val items, fewer than the 4 shots"):
        few_shot_splits(splits, 4, 1, strict=True)


@pytest.mark.parametrize(
    ("n", "n_base", "n_new"), [(37, 19, 18), (47, 24, 23), (10, 5, 5), (100, 50, 50), (397, 199, 198)]
)
def test_base_new_counts(n: int, n_base: int, n_new: int) -> None:
    base, new = base_new_labels(range(n))
    assert (len(base), len(new)) == (n_base, n_new)
    assert base == list(range(n_base)) and new == list(range(n_base, n))


def test_subsample_classes_relabels_and_drops() -> None:
    splits = _synthetic_splits(37, per_class=2)
    base = subsample_classes(splits, "base")
    new = subsample_classes(splits, "new")
    assert base.classnames == [f"class_{y}" for y in range(19)]
    assert new.classnames == [f"class_{y}" for y in range(19, 37)]
    assert new.num_classes == 18
    assert {d.label for d in new.train} == set(range(18))
    first_new = [d for d in new.test if d.label == 0]
    assert {d.classname for d in first_new} == {"class_19"}
    assert all(d.path.startswith("/d/test/19_") for d in first_new)
    assert len(base.test) == 19 * 2 and len(new.val) == 18 * 3
    base.validate()
    new.validate()
    assert subsample_classes(splits, "all").train == splits.train
    with pytest.raises(ValueError, match="subsample"):
        subsample_classes(splits, "novel")  # type: ignore[arg-type]


def test_dtd_fewshot_then_base_new(global_random: None) -> None:
    splits = _synthetic_splits(47, per_class=20)
    fs = few_shot_splits(splits, 16, 2)
    base, new = subsample_classes(fs, "base"), subsample_classes(fs, "new")
    assert (base.num_classes, new.num_classes) == (24, 23)
    assert len(base.train) == 24 * 16 and len(new.train) == 23 * 16
    assert len(base.val) == 24 * 3  # min(16, 4) = 4 shots, but only 3 val items per class
    assert len(new.test) == 23 * 2
    # base items are the K-shot selection of labels 0..23, unchanged apart from the relabel
    assert [d.path for d in base.train] == [d.path for d in fs.train if d.label < 24]


def test_test_only_dataset_subsample_uses_class_indices() -> None:
    splits = _synthetic_splits(5)
    splits.train, splits.val = [], []
    new = subsample_classes(splits, "new")
    assert new.classnames == ["class_3", "class_4"]
    assert {d.label for d in new.test} == {0, 1}
