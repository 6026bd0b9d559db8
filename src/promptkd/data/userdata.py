"""Users' own data: class folders, CSV/JSON image lists and unlabelled image folders.

Readers return plain item lists so users can combine them freely; :func:`make_splits` turns labelled items into
a deterministic per-class train/val/test split. Every problem is a :class:`DataError` naming the file (and
line); ``skip_bad_rows=True`` skips bad list rows instead and reports each in ``skipped_rows``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import random
from collections import Counter
from collections.abc import Sequence
from typing import Any, NamedTuple

from promptkd.data.items import DataError, DatasetSplits, Datum, check_files, format_list, is_image_file
from promptkd.data.templates import DEFAULT_TEMPLATE

__all__ = [
    "LabeledData",
    "image_folder",
    "image_list",
    "make_splits",
    "read_classnames",
    "read_text",
    "unlabeled_folder",
]

logger = logging.getLogger(__name__)

ClassNames = str | os.PathLike[str] | Sequence[str]

_LIST_FORMAT = (
    "CSV with a header 'path,label' (optional 'classname' column), or JSON: a list of [path, label] / "
    '{"path": ..., "label": ...}; relative paths are relative to the list file\'s folder'
)


class LabeledData(NamedTuple):
    """Labelled items, the class names indexed by label, and rows skipped with ``skip_bad_rows`` ("file:line: why")."""

    items: list[Datum]
    classnames: list[str]
    skipped_rows: list[str]


def read_text(path: str, what: str) -> str:
    """A user's text file (class list, template list) as UTF-8; any other encoding is one DataError naming the byte,
    never a UnicodeDecodeError traceback (one reader, so every command says the same)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"{what} cannot be read ({e.strerror or e})", path=path, fix="check the file") from e
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(
            f"{what} is not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start})",
            path=path,
            line=line,
            expected="UTF-8 text",
            fix=f"save it as UTF-8, e.g. iconv -f latin1 -t utf-8 {path} > fixed.txt",
        ) from None


def read_classnames(source: ClassNames) -> list[str]:
    """Class names from a sequence, a text file (one name per line) or a JSON file (a list of strings)."""
    if isinstance(source, str | os.PathLike):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise DataError(
                "class-name file not found",
                path=path,
                expected="a text file with one class name per line, or a JSON list of names",
                fix="check the path of the class-name file",
            )
        content = read_text(path, "class-name file")
        if path.lower().endswith(".json"):
            try:
                names = json.loads(content)
            except ValueError as e:
                raise DataError(
                    f"class-name file is not valid JSON ({e})",
                    path=path,
                    line=getattr(e, "lineno", None),
                    expected="a JSON list of class names",
                    fix="fix the JSON syntax",
                ) from e
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise DataError(
                    "class-name JSON is not a list of strings",
                    path=path,
                    expected='a JSON list of class names, e.g. ["cat", "dog"]',
                    fix="rewrite the file as a list of names in label order",
                )
        else:
            names = [line.strip() for line in content.splitlines() if line.strip()]
        where = path
    else:
        names = [str(n) for n in source]
        where = "<class-name list>"
    if not names:
        raise DataError(
            "class-name list is empty", path=where, expected="at least one class name", fix="add the class names"
        )
    counts = Counter(names)
    dupes = sorted(n for n, c in counts.items() if c > 1)
    if dupes:  # real lists repeat names (ImageNet's CLIP names: 'missile', 'sunglasses'); labels stay positions
        logger.warning(
            "%s: class names used more than once: %s; they are kept as separate classes (labels are positions), "
            "and the model cannot tell them apart",
            where,
            ", ".join(f"{n!r} ({counts[n]}x)" for n in dupes[:10]),
        )
    return names


def _images_under(folder: str) -> list[str]:
    """All image files at any depth below ``folder``, sorted, hidden files and folders skipped."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(os.path.join(dirpath, f) for f in filenames if is_image_file(f))
    return sorted(found)


def _require_dir(root: str | os.PathLike[str], what: str) -> str:
    root = os.path.abspath(os.fspath(root))
    if not os.path.isdir(root):
        raise DataError(f"{what} not found", path=root, expected="an existing folder", fix="check the path")
    return root


def _match_folders(folders: list[str], classnames: ClassNames, root: str) -> tuple[list[str], dict[str, int]]:
    """Pair class folders with a given class list **by name**, never by position: a folder matches the name equal to
    it, or to it with "_" read as a space (case-insensitive). A JSON object file maps folder → name (e.g. WordNet
    ids). Labels follow the list's order; names without a folder stay classes (scored, no images)."""
    source = os.fspath(classnames) if isinstance(classnames, str | os.PathLike) else None
    if source and source.lower().endswith(".json") and os.path.isfile(source):
        try:
            mapping = json.loads(read_text(source, "class-name file"))
        except ValueError:
            mapping = None  # read_classnames below names the JSON problem
        if isinstance(mapping, dict):
            unknown = [f for f in folders if f not in mapping]
            if unknown:
                raise DataError(
                    f"{len(unknown)} class folders are not in the folder-to-name map: {format_list(unknown)}",
                    path=source,
                    expected="one entry per class folder, {folder: class name}",
                    fix="add the missing folders to the map",
                )
            names = read_classnames([mapping[f] for f in folders])
            return names, {f: k for k, f in enumerate(folders)}
    names = read_classnames(classnames)

    def key(text: str) -> str:
        return " ".join(text.replace("_", " ").split()).casefold()

    index: dict[str, int] = {}
    for k, name in enumerate(names):
        index.setdefault(key(name), k)
    unmatched = [f for f in folders if key(f) not in index]
    if unmatched:
        raise DataError(
            f"{len(unmatched)} of {len(folders)} class folders match no name in the class list: "
            f"{format_list(unmatched)}",
            path=source or root,
            expected='each folder named as its class ("_" may stand for a space); names are matched to folders by '
            "name, never by position",
            fix="rename the folders or the names, or give a JSON file mapping each folder to its class name",
        )
    label_of = {f: index[key(f)] for f in folders}
    empty = [names[k] for k in range(len(names)) if k not in set(label_of.values())]
    if empty:
        logger.warning(
            "%d class names have no folder under %s (scored, but no images): %s", len(empty), root, ", ".join(empty[:5])
        )
    return names, label_of


def image_folder(root: str | os.PathLike[str], classnames: ClassNames | None = None) -> LabeledData:
    """One sub-folder per class (sorted), images at any depth inside each.

    Class names default to the folder names with "_" → " " (label = sorted position). A given list (or file) is
    matched to the folders by name, never by position (see :func:`_match_folders`); labels then follow the list.
    """
    root = _require_dir(root, "image folder")
    folders = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not folders:
        raise DataError(
            "no class sub-folders found",
            path=root,
            expected="one sub-folder per class containing that class's images",
            fix="arrange the images as <root>/<class name>/<image>, or use an image list (CSV/JSON)",
        )
    stray = [f for f in os.listdir(root) if is_image_file(f)]
    if stray:
        logger.warning("%d images directly in %s belong to no class folder and are not used", len(stray), root)
    if classnames is None:
        names = [f.replace("_", " ") for f in folders]
        label_of = {folder: k for k, folder in enumerate(folders)}
    else:
        names, label_of = _match_folders(folders, classnames, root)
    items: list[Datum] = []
    for folder in folders:
        label = label_of[folder]
        images = _images_under(os.path.join(root, folder))
        if not images:
            raise DataError(
                "class folder contains no images",
                path=os.path.join(root, folder),
                expected="at least one .jpg/.jpeg/.png/.bmp/.webp/.tif image in every class folder",
                fix="add images or remove the empty folder",
            )
        items.extend(Datum(p, label, names[label]) for p in images)
    return LabeledData(items, names, [])


class _Row(NamedTuple):
    where: str  # "file:line" or "file entry i", for messages
    line: int | None
    path: Any
    label: Any
    classname: Any
    error: str | None = None  # a structural problem found while reading the row


def _csv_rows(path: str) -> tuple[list[_Row], bool]:
    text = read_text(path, "image list")
    # one reader for every user text file: a Latin-1 list is one DataError, not a traceback
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    cols = [c.strip().lower() for c in header] if header else []
    if "path" not in cols or "label" not in cols:
        raise DataError(
            f"CSV header is {header!r}",
            path=path,
            line=1,
            expected="a header row naming the columns 'path' and 'label' (optional 'classname')",
            fix="add the header line 'path,label' (or 'path,label,classname')",
        )
    ip, il = cols.index("path"), cols.index("label")
    ic = cols.index("classname") if "classname" in cols else None
    rows: list[_Row] = []
    for fields in reader:
        line = reader.line_num
        if not fields or all(not x.strip() for x in fields):
            continue
        if len(fields) < len(cols):
            problem = f"{len(fields)} fields, the header has {len(cols)}"
            rows.append(_Row(f"{path}:{line}", line, None, None, None, problem))
            continue
        cname = fields[ic].strip() if ic is not None else None
        rows.append(_Row(f"{path}:{line}", line, fields[ip].strip(), fields[il].strip(), cname))
    return rows, ic is not None


def _json_rows(path: str) -> tuple[list[_Row], bool]:
    text = read_text(path, "image list")
    try:
        data = json.loads(text)
    except ValueError as e:
        raise DataError(
            f"image list is not valid JSON ({e})",
            path=path,
            line=getattr(e, "lineno", None),
            expected=_LIST_FORMAT,
            fix="fix the JSON syntax",
        ) from e
    if not isinstance(data, list):
        raise DataError(
            f"image list JSON is a {type(data).__name__}", path=path, expected=_LIST_FORMAT, fix="write a JSON list"
        )
    rows: list[_Row] = []
    has_names = False
    for i, entry in enumerate(data):
        where = f"{path} entry {i}"
        if isinstance(entry, dict):
            rows.append(_Row(where, None, entry.get("path"), entry.get("label"), entry.get("classname")))
            has_names |= "classname" in entry
        elif isinstance(entry, list) and len(entry) in (2, 3):
            rows.append(_Row(where, None, entry[0], entry[1], entry[2] if len(entry) == 3 else None))
            has_names |= len(entry) == 3
        else:
            rows.append(_Row(where, None, None, None, None, f"entry {i} is not [path, label] or an object"))
    return rows, has_names


def _parse_label(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        return int(value.strip())
    raise ValueError


def image_list(
    path: str | os.PathLike[str],
    classnames: ClassNames | None = None,
    *,
    skip_bad_rows: bool = False,
    check: bool = True,
) -> LabeledData:
    """Items from a CSV (``path,label[,classname]`` header) or JSON image list; format chosen by the suffix.

    Relative image paths are relative to the list file's folder. Class names come from ``classnames`` (labels must
    index it) or else from the ``classname`` column (labels must then be 0..n-1). A bad row (missing field,
    non-integer or out-of-range label, conflicting class name, missing image with ``check``) raises a DataError
    with the file and line, or with ``skip_bad_rows`` is skipped and listed in ``skipped_rows``.
    """
    path = os.path.abspath(os.fspath(path))
    if not os.path.isfile(path):
        raise DataError("image list not found", path=path, expected=_LIST_FORMAT, fix="check the path")
    rows, has_names = _json_rows(path) if path.lower().endswith(".json") else _csv_rows(path)
    base = os.path.dirname(path)
    given = read_classnames(classnames) if classnames is not None else None
    if given is None and not has_names:
        raise DataError(
            "the image list has no class names and none were given",
            path=path,
            expected="a 'classname' column/field, or a class-name list passed as classnames",
            fix="add a classname column, or pass classnames=<file or list> (one name per label)",
        )
    skipped: list[str] = []
    parsed: list[tuple[_Row, Datum]] = []
    names: dict[int, str] = {}

    def bad(row: _Row, problem: str) -> None:
        if skip_bad_rows:
            skipped.append(f"{row.where}: {problem}")
            return
        raise DataError(
            f"bad row: {problem}",
            path=path,
            line=row.line,
            expected=_LIST_FORMAT + (f"; labels 0..{len(given) - 1}" if given else ""),
            fix="fix the row, or skip and count bad rows (--skip-bad; skip_bad_rows=True in Python)",
        )

    for row in rows:
        if row.error is not None:
            bad(row, row.error)
            continue
        if not isinstance(row.path, str) or not row.path.strip():
            bad(row, "missing or empty image path")
            continue
        try:
            label = _parse_label(row.label)
        except (TypeError, ValueError):
            bad(row, f"label {row.label!r} is not an integer")
            continue
        cname = row.classname.strip() if isinstance(row.classname, str) and row.classname.strip() else None
        if given is not None:
            if not 0 <= label < len(given):
                bad(row, f"label {label} is outside the class list (0..{len(given) - 1})")
                continue
            if cname is not None and cname.replace("_", " ") != given[label].replace("_", " "):
                bad(row, f"class name {cname!r} does not match the class list's {given[label]!r} for label {label}")
                continue
            cname = given[label]
        else:
            if label < 0:
                bad(row, f"label {label} is negative")
                continue
            if cname is None:
                bad(row, "missing class name")
                continue
            if names.setdefault(label, cname) != cname:
                bad(row, f"label {label} was named {names[label]!r} before, here {cname!r}")
                continue
        full = os.path.abspath(os.path.join(base, row.path.strip()))
        parsed.append((row, Datum(full, label, cname)))

    if check:
        missing = [(row, d) for row, d in parsed if not os.path.isfile(d.path)]
        if missing and skip_bad_rows:
            gone = {id(d) for _, d in missing}
            skipped.extend(f"{row.where}: image not found: {d.path}" for row, d in missing)
            parsed = [(row, d) for row, d in parsed if id(d) not in gone]
        elif missing:
            check_files([d for _, d in parsed], source=path, fix=f"relative paths are resolved against {base}")

    if given is not None:
        final_names = given
    else:
        labels = {d.label for _, d in parsed}
        n = max(labels) + 1 if labels else 0
        unused = [str(y) for y in range(n) if y not in labels]
        if unused:
            raise DataError(
                f"labels are not 0..{n - 1}; unused labels: {', '.join(unused[:10])}",
                path=path,
                expected="labels 0..n-1 with every label used, or a class-name list passed as classnames",
                fix="renumber the labels or pass classnames=<file or list>",
            )
        final_names = [names[y] for y in range(n)]
    if not parsed:
        raise DataError(
            "image list has no usable rows" + (f" ({len(skipped)} skipped)" if skipped else ""),
            path=path,
            expected=_LIST_FORMAT,
            fix="add rows" + ("; see the skipped rows in the log" if skipped else ""),
        )
    for reason in skipped:
        logger.warning("skipped row %s", reason)
    return LabeledData([d for _, d in parsed], list(final_names), skipped)


def unlabeled_folder(root: str | os.PathLike[str]) -> list[str]:
    """Absolute paths of all images (jpg/jpeg/png/bmp/webp/tif, any case) at any depth below ``root``, sorted."""
    root = _require_dir(root, "image folder")
    paths = _images_under(root)
    if not paths:
        raise DataError(
            "no images found",
            path=root,
            expected="image files (.jpg .jpeg .png .bmp .webp .tif .tiff) anywhere below this folder",
            fix="point at the folder that contains the images",
        )
    return paths


def make_splits(
    items: Sequence[Datum],
    classnames: Sequence[str],
    val_fraction: float = 0.2,
    test_fraction: float = 0.3,
    seed: int = 1,
    *,
    name: str = "custom",
    template: str = DEFAULT_TEMPLATE,
) -> DatasetSplits:
    """Deterministic per-class train/val/test split (CoOp's 50/20/30 rule by default).

    Per class, the items are sorted by path (so input order does not matter) and shuffled by a generator seeded
    with ``seed`` and the class's first path (so label order does not matter either); then
    n_train = round(n·(1 − val − test)), n_val = round(n·val), the rest is test. Every class keeps at least one
    training item, else DataError naming the class.
    """
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
        raise ValueError(
            f"need 0 <= val_fraction, test_fraction and val + test < 1, got {val_fraction}, {test_fraction}"
        )
    classnames = list(classnames)
    groups: dict[int, list[Datum]] = {}
    for d in items:
        if not 0 <= d.label < len(classnames):
            raise DataError(
                f"label {d.label} is outside 0..{len(classnames) - 1}",
                path=d.path,
                expected=f"labels indexing the {len(classnames)} class names",
                fix="pass the class names that belong to these items",
            )
        groups.setdefault(d.label, []).append(d)
    train: list[Datum] = []
    val: list[Datum] = []
    test: list[Datum] = []
    for label in sorted(groups):
        group = sorted(groups[label], key=lambda d: d.path)
        # seeded by the class's own files, not its label: a class list in another order gives the same split
        random.Random(f"{seed}|{group[0].path}|{len(group)}").shuffle(group)
        n = len(group)
        n_train = round(n * (1 - val_fraction - test_fraction))
        n_val = min(round(n * val_fraction), n - n_train)
        if n_train < 1:
            raise DataError(
                f"class {classnames[label]!r} (label {label}) has {n} images, too few for a training share of "
                f"{1 - val_fraction - test_fraction:.2f}",
                path=os.path.commonpath([d.path for d in group]),
                expected="enough images per class that each split fraction leaves at least one training image",
                fix="add images to this class or lower val_fraction/test_fraction",
            )
        train += group[:n_train]
        val += group[n_train : n_train + n_val]
        test += group[n_train + n_val :]
    paths = [d.path for d in items]
    root = os.path.commonpath(paths) if paths else ""
    if root and os.path.isfile(root):
        root = os.path.dirname(root)
    shares = "/".join(f"{round(100 * f)}" for f in (1 - val_fraction - test_fraction, val_fraction, test_fraction))
    note = f"images split per class {shares} into train/val/test by promptkd (CoOp's rule, seeded)"
    return DatasetSplits(
        name=name, classnames=classnames, train=train, val=val, test=test, template=template, root=root, notes=[note]
    )
