"""The one dataset lookup: a dataset name and a data root become :class:`DatasetSplits` for every command.

Resolution order:

1. the embedded world's datasets (``shapes``, ``patterns``, ``counts`` and the test-only shifts of ``shapes``):
   ``<root>/<name>/split_zhou_<Name>.json`` with images under ``<root>/<name>/images/``, the layout
   ``build_world`` writes (its ``world.json`` manifest is read when present);
2. the CoOp-protocol benchmarks (``build_benchmark``: every name, Dassl name, folder name or alias);
3. any folder holding one ``split_zhou_<Name>.json`` (``name`` may be the folder itself or a folder under the
   root), the split layout shared by the benchmarks and the world, with paths relative to ``images/`` when that
   folder holds them and to the dataset folder otherwise;
4. users' data: a folder with one sub-folder per class, or a CSV/JSON list of (path, label[, classname]); the
   optional class list is matched to folders by name. It is split 50/20/30 per class with a fixed seed (1), so
   every run and seed sees the same train, validation and test images.

Missing data raises a :class:`~promptkd.data.items.DataError` that names the folder or file expected.
"""

from __future__ import annotations

import glob
import json
import os
import re
from typing import Any

from promptkd.data.benchmarks import (
    BENCHMARKS,
    BenchmarkSpec,
    UnknownDatasetError,
    build_benchmark,
    resolve_name,
)
from promptkd.data.benchmarks import _read_split_json as read_split_json  # the one split-JSON reader
from promptkd.data.items import DataError, DatasetSplits
from promptkd.errors import PromptKDError

__all__ = ["DatasetNotFoundError", "ensemble_for", "resolve_dataset", "split_folder", "world_dataset_names"]

_SPLIT_GLOB = "split_zhou_*.json"


class DatasetNotFoundError(PromptKDError, ValueError):
    """A dataset name that is neither a world dataset, a benchmark nor a folder in the split-JSON layout."""


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _world_specs() -> dict[str, Any]:
    try:
        from promptkd.data.world import WORLD_DATASETS
    except ImportError:  # the world is optional for evaluation of real benchmarks
        return {}
    return dict(WORLD_DATASETS)


def world_dataset_names() -> list[str]:
    """Names of the embedded world's downstream datasets."""
    return list(_world_specs())


def _world_lookup(name: str) -> Any | None:
    key = _key(name)
    for spec in _world_specs().values():
        if key in (_key(spec.name), _key(spec.split_name)):
            return spec
    return None


def ensemble_for(name: str) -> list[str] | None:
    """The template ensemble of a world dataset (its own caption-style templates); None for other datasets."""
    spec = _world_lookup(name)
    return list(spec.templates) if spec is not None else None


def _read_with_spec(
    name: str, split_name: str, folder: str, image_dir: str, root: str, check: bool, source: str
) -> DatasetSplits:
    """Read a split JSON through the benchmarks' reader (same validation, same DataErrors)."""
    spec = BenchmarkSpec(
        name=name,
        dassl_name=split_name,
        folder=folder,
        builder=read_split_json,
        image_dir=image_dir,
        split_file=f"split_zhou_{split_name}.json",
        source=source,
    )
    return read_split_json(spec, root, check=check)


def _check_world_version(manifest: Any, path: str) -> None:
    """A world written by another world version has other images and splits: never read it silently."""
    from promptkd.data.world import WORLD_VERSION, default_world_root

    version = manifest.get("version") if isinstance(manifest, dict) else None
    if version is not None and version != WORLD_VERSION:
        root = os.path.dirname(path)
        cache = os.path.abspath(default_world_root()) == os.path.abspath(root)
        raise DataError(
            f"the embedded world here is version {version}, but this promptkd renders version {WORLD_VERSION} "
            "(other images, splits and shipped CLIPs)",
            path=root,
            expected=f"a world built by this promptkd (world version {WORLD_VERSION})",
            fix="run `promptkd demo` once to rebuild promptkd's cached world"
            if cache
            else "delete the folder (or name another one) and build it again",
        )


def _world_dataset(spec: Any, root: str, check: bool) -> DatasetSplits:
    root = os.path.abspath(root)
    folder, image_dir, split_file = spec.name, "images", f"split_zhou_{spec.split_name}.json"
    manifest_path = os.path.join(root, "world.json")
    if os.path.isfile(manifest_path):
        try:
            with open(manifest_path, encoding="utf-8") as f:
                manifest = json.load(f)
            entry = manifest.get("datasets", {}).get(spec.name, {})
            folder = entry.get("folder", folder)
            image_dir = entry.get("image_dir", image_dir)
            split_file = entry.get("split_file", split_file)
        except (OSError, ValueError, AttributeError):
            manifest = {}
        _check_world_version(manifest, manifest_path)
    if os.path.basename(root.rstrip(os.sep)) == folder and os.path.isfile(os.path.join(root, split_file)):
        dataset_dir, parent = root, os.path.dirname(root)
    else:
        dataset_dir, parent = os.path.join(root, folder), root
    split_path = os.path.join(dataset_dir, split_file)
    if not os.path.isfile(split_path):
        raise DataError(
            f"world dataset {spec.name!r} not found",
            path=split_path,
            expected=f"the embedded world's layout: {dataset_dir}/{split_file} and {dataset_dir}/{image_dir}/",
            fix=f'build the world first: python -c "from promptkd.data.world import build_world; '
            f"build_world('{root}')\" (or pass the --data-root that holds it)",
        )
    split_name = split_file[len("split_zhou_") : -len(".json")]
    splits = _read_with_spec(
        spec.name, split_name, folder, image_dir, parent, check, "the embedded world (promptkd.data.world)"
    )
    splits.template = spec.template
    splits.notes = [*splits.notes, f"embedded world dataset ({spec.family}, style {spec.style})"]
    return splits


def split_folder(folder: str | os.PathLike[str], *, check: bool = True, name: str | None = None) -> DatasetSplits:
    """Read any folder holding exactly one ``split_zhou_<Name>.json`` (paths relative to ``images/`` or the folder)."""
    folder = os.path.abspath(os.fspath(folder))
    found = sorted(glob.glob(os.path.join(glob.escape(folder), _SPLIT_GLOB)))
    if len(found) != 1:
        raise DataError(
            "no split file found" if not found else f"{len(found)} split files found; expected one",
            path=folder,
            expected="exactly one split_zhou_<Name>.json in the folder (the benchmarks' and the world's layout)",
            fix="pass the dataset folder itself, or a registered dataset name with --data-root",
        )
    split_path = found[0]
    split_name = os.path.basename(split_path)[len("split_zhou_") : -len(".json")]
    image_dir = ""
    images = os.path.join(folder, "images")
    if os.path.isdir(images):
        try:
            with open(split_path, encoding="utf-8") as f:
                raw = json.load(f)
            first = next((entry[0] for which in ("train", "test", "val") for entry in raw.get(which, [])[:1]), None)
        except (OSError, ValueError, TypeError, AttributeError, IndexError, KeyError):
            first = None  # the reader reports a malformed file properly
        if first is None or os.path.isfile(os.path.join(images, str(first))):
            image_dir = "images"
    dataset_name = name or os.path.basename(folder)
    return _read_with_spec(
        dataset_name,
        split_name,
        os.path.basename(folder),
        image_dir,
        os.path.dirname(folder),
        check,
        f"a dataset folder in the split-JSON layout ({split_path})",
    )


def resolve_dataset(
    name: str,
    data_root: str | os.PathLike[str] | None,
    *,
    check: bool = True,
    classnames: str | os.PathLike[str] | list[str] | None = None,
) -> DatasetSplits:
    """Read the dataset ``name`` under ``data_root`` (world, benchmark, or split-JSON folder; see module docs).

    Without ``data_root``: world datasets come from the world cache (built there on first use, as the demo does),
    benchmarks from ``$PROMPTKD_DATA``, anything else from the working directory.
    """
    world = _world_lookup(name)
    if world is not None:
        if data_root is None:
            from promptkd.data.world import ensure_world

            data_root = ensure_world()
        return _world_dataset(world, os.fspath(data_root), check)
    if data_root is None:
        data_root = os.environ.get("PROMPTKD_DATA") or None
    root = os.fspath(data_root) if data_root is not None else os.getcwd()
    try:
        canonical = resolve_name(name)
    except UnknownDatasetError:
        canonical = None
    if canonical is not None:
        return build_benchmark(canonical, root, check=check)
    for folder in (name, os.path.join(root, name), root):
        if os.path.isdir(folder) and glob.glob(os.path.join(glob.escape(folder), _SPLIT_GLOB)):
            label = name if folder != name else os.path.basename(os.path.abspath(folder))
            return split_folder(folder, check=check, name=label)
    user = _user_dataset(name, root, classnames)
    if user is not None:
        return user
    known = [*world_dataset_names(), *BENCHMARKS]
    raise DatasetNotFoundError(
        f"unknown dataset {name!r}: not an embedded-world dataset, not a benchmark, and no folder "
        f"{os.path.join(root, name)} holding a split_zhou_<Name>.json, class sub-folders or a CSV/JSON image list. "
        f"Known datasets: {', '.join(known)}"
    )


def _user_dataset(name: str, root: str, classnames: Any) -> DatasetSplits | None:
    """A folder of class folders or a CSV/JSON image list (see the module docstring), split 50/20/30 per class."""
    from promptkd.data.userdata import image_folder, image_list, make_splits

    for path in (name, os.path.join(root, name)):
        label = os.path.splitext(os.path.basename(os.path.abspath(path)))[0]
        if os.path.isdir(path) and any(e.is_dir() and not e.name.startswith(".") for e in os.scandir(path)):
            data = image_folder(path, classnames)
        elif os.path.isfile(path) and path.lower().endswith((".csv", ".json")):
            data = image_list(path, classnames)
        else:
            continue
        return make_splits(data.items, data.classnames, name=label)
    return None
