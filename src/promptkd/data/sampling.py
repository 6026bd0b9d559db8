"""Few-shot sampling and the base/new class split, reproducing the reference (Dassl / CoOp) rules exactly.

Few-shot (Dassl ``DatasetBase.generate_fewshot_dataset``): group the items by label, in the order labels first
appear in the list (a ``defaultdict``); per label take ``random.sample(items, K)``, or all items if the class has
fewer than K. The reference seeds Python's *global* ``random`` with the run seed and then samples train (K shots)
and val (min(K, 4) shots) from that one stream. Here a dedicated ``random.Random(seed)`` plays the global
generator's role, so the selection is identical to ``random.seed(seed)`` followed by the reference calls, without
touching global state.

Base/new (``subsample_classes``): labels = sorted(set(train labels)); m = ceil(n / 2); base = labels[:m],
new = labels[m:]; the kept labels are renumbered 0..k-1 in train, val and test. Few-shot sampling comes first,
so one few-shot selection covers both halves.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import random
from collections.abc import Iterable, Sequence
from typing import Literal

from promptkd.data.items import DataError, DatasetSplits, Datum

__all__ = [
    "CACHE_VERSION",
    "base_new_labels",
    "few_shot_cache_path",
    "few_shot_splits",
    "group_by_label",
    "sample_few_shot",
    "subsample_classes",
    "val_shots",
]

logger = logging.getLogger(__name__)

LabelOrder = Literal["first_seen", "sorted"]
Subsample = Literal["all", "base", "new"]

#: Bumped whenever the cache format or the sampling rule changes, so stale caches are rebuilt.
CACHE_VERSION = 1


def group_by_label(items: Iterable[Datum], label_order: LabelOrder = "first_seen") -> dict[int, list[Datum]]:
    """Items per label, keeping item order within a label.

    ``"first_seen"`` orders labels by first appearance (the reference); ``"sorted"`` by label value. The two agree
    whenever the list is ordered by label, as in the split files of every dataset except FGVCAircraft.
    """
    groups: dict[int, list[Datum]] = {}
    for item in items:
        groups.setdefault(item.label, []).append(item)
    if label_order == "sorted":
        return dict(sorted(groups.items()))
    if label_order != "first_seen":
        raise ValueError(f"label_order must be 'first_seen' or 'sorted', not {label_order!r}")
    return groups


def sample_few_shot(
    items: Sequence[Datum],
    k: int,
    seed: int | random.Random,
    *,
    label_order: LabelOrder = "first_seen",
) -> list[Datum]:
    """K items per class, without replacement (all items of a class with fewer than K).

    ``seed`` is an int (a fresh ``random.Random(seed)``) or a ``random.Random`` whose state is advanced, so several
    calls can share one stream as the reference does for train then val. ``k < 1`` returns all items, like the
    reference's ``NUM_SHOTS <= 0``.
    """
    if k < 1:
        return list(items)
    rng = seed if isinstance(seed, random.Random) else random.Random(seed)
    out: list[Datum] = []
    for group in group_by_label(items, label_order).values():
        # random.sample is called even when len(group) == k: it consumes randomness, and the reference does so.
        out.extend(rng.sample(group, k) if len(group) >= k else group)
    return out


def val_shots(k: int) -> int:
    """Validation shots per class for a K-shot run: min(K, 4) (reference rule)."""
    return min(k, 4)


def _relpath(path: str, root: str) -> str:
    if not root:
        return path
    prefix = root if root.endswith(os.sep) else root + os.sep
    if path.startswith(prefix):  # fast path: ImageNet has 1.28M items
        return path[len(prefix) :]
    try:
        return os.path.relpath(path, root)
    except ValueError:  # different drive on Windows
        return path


def _fingerprint(splits: DatasetSplits) -> str:
    """Hash of the ordered (relative path, label) lists the samples are drawn from; changes invalidate caches."""
    h = hashlib.sha256()
    for which in ("train", "val"):
        h.update(f"[{which}]\n".encode())
        h.update("".join(f"{_relpath(d.path, splits.root)}\t{d.label}\n" for d in splits.split(which)).encode())
    return h.hexdigest()


def few_shot_cache_path(
    cache_dir: str | os.PathLike[str], name: str, k: int, seed: int, label_order: LabelOrder = "first_seen"
) -> str:
    """``<cache_dir>/<dataset>/shot_<K>-seed_<S>.json`` (``-sorted`` appended for sorted label order)."""
    suffix = "" if label_order == "first_seen" else f"-{label_order}"
    return os.path.join(os.fspath(cache_dir), name, f"shot_{k}-seed_{seed}{suffix}.json")


def _inside(path: str, root: str) -> bool:
    path, root = os.path.realpath(path), os.path.realpath(root)
    try:
        return os.path.commonpath([path, root]) == root
    except ValueError:
        return False


def _check_strict(splits: DatasetSplits, which: str, shots: int) -> None:
    groups = group_by_label(splits.split(which), "sorted")
    if not groups:
        return
    label, group = min(groups.items(), key=lambda kv: (len(kv[1]), kv[0]))
    if len(group) < shots:
        name = splits.classnames[label] if 0 <= label < splits.num_classes else str(label)
        short = sum(1 for g in groups.values() if len(g) < shots)
        raise DataError(
            f"{splits.name}: class {name!r} (label {label}) has only {len(group)} {which} items, fewer than the "
            f"{shots} shots requested ({short} classes are short)",
            path=splits.root or splits.name,
            expected=f"at least {shots} {which} items in every class",
            fix="lower the number of shots, or pass strict=False (CLI: --set strict_shots=false) to take all items "
            "of the short classes (the reference behaviour)",
        )


def _load_cache(path: str, splits: DatasetSplits, fingerprint: str) -> tuple[list[Datum], list[Datum]] | None:
    """Cached selection mapped onto the current items, or None if the cache is absent, stale or unreadable."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if data.get("version") != CACHE_VERSION or data.get("fingerprint") != fingerprint:
            logger.warning("few-shot cache %s does not match the current %s splits; rebuilding", path, splits.name)
            return None
        # The fingerprint guarantees the source lists are unchanged, so items are rebuilt from the current root.
        out = []
        for which in ("train", "val"):
            items = []
            for rel, label, _ in data[which]:
                path = rel if os.path.isabs(rel) else os.path.normpath(os.path.join(splits.root, rel))
                items.append(Datum(path, int(label), splits.classnames[int(label)]))
            out.append(items)
        return out[0], out[1]
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        logger.warning("few-shot cache %s is unreadable (%s); rebuilding", path, e)
        return None


def _write_cache(path: str, payload: dict[str, object]) -> None:
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=1)
        os.replace(tmp, path)
    except OSError as e:
        logger.warning("could not write few-shot cache %s (%s); continuing without it", path, e)


def few_shot_splits(
    splits: DatasetSplits,
    k: int,
    seed: int,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    strict: bool = False,
    label_order: LabelOrder = "first_seen",
) -> DatasetSplits:
    """New splits with a K-shot train and a min(K, 4)-shot val (one random stream, train first); test unchanged.

    With ``cache_dir`` the selection is stored as JSON under ``<cache_dir>/<dataset>/`` with paths relative to the
    dataset root, and reused when the source splits are unchanged (checked by a fingerprint), also after the data
    moved. The cache may not live inside the dataset folder (data roots stay read-only). ``strict`` raises a
    DataError naming the smallest class when a class has fewer than the requested shots instead of taking all
    its items. ``k < 1`` returns the splits unchanged.
    """
    if k < 1:
        return dataclasses.replace(splits, train=list(splits.train), val=list(splits.val), test=list(splits.test))
    nval = val_shots(k)
    if strict:
        _check_strict(splits, "train", k)
        if splits.val:
            _check_strict(splits, "val", nval)
    cache_path = None
    fingerprint = ""
    result: tuple[list[Datum], list[Datum]] | None = None
    if cache_dir is not None:
        if splits.root and _inside(os.fspath(cache_dir), splits.root):
            raise DataError(
                "few-shot cache directory is inside the dataset folder",
                path=os.fspath(cache_dir),
                expected=f"a cache directory outside {splits.root}",
                fix="choose a cache directory outside the data root (e.g. under your output or cache folder)",
            )
        cache_path = few_shot_cache_path(cache_dir, splits.name, k, seed, label_order)
        fingerprint = _fingerprint(splits)
        result = _load_cache(cache_path, splits, fingerprint)
    if result is None:
        rng = random.Random(seed)
        result = (
            sample_few_shot(splits.train, k, rng, label_order=label_order),
            sample_few_shot(splits.val, nval, rng, label_order=label_order),
        )
        if cache_path is not None:
            payload = {
                "version": CACHE_VERSION,
                "dataset": splits.name,
                "shots": k,
                "val_shots": nval,
                "seed": seed,
                "label_order": label_order,
                "root": splits.root,
                "fingerprint": fingerprint,
                "train": [[_relpath(d.path, splits.root), d.label, d.classname] for d in result[0]],
                "val": [[_relpath(d.path, splits.root), d.label, d.classname] for d in result[1]],
            }
            _write_cache(cache_path, payload)
    else:
        logger.info("loaded few-shot selection from %s", cache_path)
    return dataclasses.replace(
        splits,
        train=result[0],
        val=result[1],
        test=list(splits.test),
        notes=[*splits.notes, f"few-shot: {k} train shots, {nval} val shots per class, seed {seed}"],
    )


def base_new_labels(labels: Iterable[int]) -> tuple[list[int], list[int]]:
    """Sorted unique labels split into base = first ceil(n/2) and new = the rest."""
    ordered = sorted(set(labels))
    m = math.ceil(len(ordered) / 2)
    return ordered[:m], ordered[m:]


def subsample_classes(splits: DatasetSplits, which: Subsample) -> DatasetSplits:
    """Keep the base or new half of the classes (relabelled 0..k-1 in train, val and test), or all of them.

    The halves are computed from the train labels (reference); test-only datasets use all class indices.
    """
    if which not in ("all", "base", "new"):
        raise ValueError(f"subsample must be 'all', 'base' or 'new', not {which!r}")
    if which == "all":
        return dataclasses.replace(splits, train=list(splits.train), val=list(splits.val), test=list(splits.test))
    labels = {d.label for d in splits.train} if splits.train else set(range(splits.num_classes))
    base, new = base_new_labels(labels)
    selected = base if which == "base" else new
    relabel = {y: i for i, y in enumerate(selected)}

    def keep(items: list[Datum]) -> list[Datum]:
        return [Datum(d.path, relabel[d.label], d.classname) for d in items if d.label in relabel]

    span = f"original labels {selected[0]}..{selected[-1]}" if selected else "none"
    return dataclasses.replace(
        splits,
        classnames=[splits.classnames[y] for y in selected],
        train=keep(splits.train),
        val=keep(splits.val),
        test=keep(splits.test),
        notes=[*splits.notes, f"{which} classes: {len(selected)} of {len(base) + len(new)} ({span})"],
    )
