"""Core data types: labelled items, dataset splits, the image dataset and the data error.

Every data problem a user can fix (a missing folder, a bad split file, a corrupt image) raises :class:`DataError`,
whose message names the file (and line), what was expected and what to do next, so a run fails early and
explains itself instead of crashing deep inside a data loader.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch.utils.data
from PIL import Image

from promptkd.errors import PromptKDError

__all__ = [
    "IMAGE_EXTENSIONS",
    "DataError",
    "DatasetSplits",
    "Datum",
    "ImageDataset",
    "check_files",
    "format_list",
    "is_image_file",
    "load_rgb",
    "small_images",
]

logger = logging.getLogger(__name__)

#: File suffixes treated as images when folders are scanned (compared case-insensitively).
IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})

#: How many offending entries an error message lists before it only gives the count.
MAX_LISTED = 10


def is_image_file(name: str | os.PathLike[str]) -> bool:
    """True for a non-hidden file name with an image suffix; folder scans use it so stray files never become items."""
    base = os.path.basename(os.fspath(name))
    return not base.startswith(".") and os.path.splitext(base)[1].lower() in IMAGE_EXTENSIONS


def _rebuild_data_error(message: str, path: str | None, line: int | None) -> DataError:
    err = DataError(message)
    err.path, err.line = path, line
    return err


class DataError(PromptKDError, ValueError):
    """A problem with the user's data files that the user can fix (the CLI prints it without a traceback).

    The message is ``"<path>[:<line>]: <problem>"`` followed by what was expected and what to do. A single
    positional argument is also accepted (it is then the whole message) so that the error survives being
    re-raised by ``torch.utils.data`` worker processes.
    """

    def __init__(
        self,
        problem: str,
        *,
        path: str | os.PathLike[str] | None = None,
        line: int | None = None,
        expected: str | None = None,
        fix: str | None = None,
    ) -> None:
        self.path = None if path is None else os.fspath(path)
        self.line = line
        self.problem = problem
        self.expected = expected
        self.fix = fix
        message = problem
        if self.path is not None:
            location = self.path if line is None else f"{self.path}:{line}"
            message = f"{location}: {problem}"
        if expected:
            message += f"\n  expected: {expected}"
        if fix:
            message += f"\n  what to do: {fix}"
        super().__init__(message)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_data_error, (str(self), self.path, self.line))


def format_list(entries: Sequence[str], limit: int = MAX_LISTED) -> str:
    """Indented list of the first ``limit`` entries plus how many more there are, for error messages."""
    lines = [f"    {e}" for e in entries[:limit]]
    if len(entries) > limit:
        lines.append(f"    ... and {len(entries) - limit} more ({len(entries)} in total)")
    return "\n".join(lines)


@dataclass(frozen=True)
class Datum:
    """One labelled image: an absolute path, an integer label and the label's class name."""

    path: str
    label: int
    classname: str


@dataclass
class DatasetSplits:
    """A dataset's train/val/test item lists with the class names indexed by label.

    ``template`` is the dataset's single zero-shot prompt (``"{}"`` marks the class name). ``root`` is the folder
    the item paths live under; few-shot caches store paths relative to it so they survive moving the data.
    ``notes`` records protocol facts later code must not guess, e.g. that a dataset has no held-out validation
    split or is test-only.
    """

    name: str
    classnames: list[str]
    train: list[Datum]
    val: list[Datum]
    test: list[Datum]
    template: str = "a photo of a {}."
    root: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        """Number of classes (labels are ``0 .. num_classes - 1``)."""
        return len(self.classnames)

    @property
    def lab2cname(self) -> dict[int, str]:
        """Label → class name."""
        return dict(enumerate(self.classnames))

    @property
    def test_only(self) -> bool:
        """True when the dataset has no training items (the domain-shift ImageNet variants)."""
        return not self.train and not self.val

    def split(self, which: str) -> list[Datum]:
        """The item list named ``"train"``, ``"val"`` or ``"test"``."""
        if which not in ("train", "val", "test"):
            raise ValueError(f"unknown split {which!r}; expected 'train', 'val' or 'test'")
        return getattr(self, which)

    def summary(self) -> dict[str, Any]:
        """Counts for logs and results JSON."""
        return {
            "name": self.name,
            "num_classes": self.num_classes,
            "train": len(self.train),
            "val": len(self.val),
            "test": len(self.test),
            "notes": list(self.notes),
        }

    def validate(self) -> None:
        """Check every item's label is in range and matches its class name; raise DataError otherwise."""
        n = self.num_classes
        for which in ("train", "val", "test"):
            for d in self.split(which):
                if not 0 <= d.label < n:
                    raise DataError(
                        f"{which} item has label {d.label}, outside 0..{n - 1} ({self.name})",
                        path=d.path,
                        expected=f"labels 0..{n - 1} for the {n} classes",
                        fix="rebuild the splits from the dataset's split file",
                    )
                if d.classname != self.classnames[d.label]:
                    raise DataError(
                        f"{which} item has class name {d.classname!r} but label {d.label} is "
                        f"{self.classnames[d.label]!r} ({self.name})",
                        path=d.path,
                        expected="one class name per label",
                        fix="rebuild the splits from the dataset's split file",
                    )


def _item_path(item: Datum | str | os.PathLike[str]) -> str:
    return item.path if isinstance(item, Datum) else os.fspath(item)


def check_files(
    items: Iterable[Datum | str | os.PathLike[str]],
    source: str | os.PathLike[str] | None = None,
    fix: str | None = None,
) -> None:
    """Raise one DataError listing every missing file (first 10 + count), so users fix them all in one go.

    ``source`` names the file or folder the items were read from (the split file); it becomes the error's path.
    """
    paths = [_item_path(i) for i in items]
    missing = [p for p in paths if not os.path.isfile(p)]
    if not missing:
        return
    raise DataError(
        f"{len(missing)} of {len(paths)} listed image files do not exist:\n{format_list(missing)}",
        path=source if source is not None else os.path.dirname(missing[0]),
        expected="every listed image to exist on disk",
        fix=fix or "check the dataset was fully downloaded and extracted into the expected folder",
    )


_LOAD_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def check_images(paths: Sequence[str], *, skip_bad: bool = False, source: str | None = None) -> list[str]:
    """Read every image's file once, up front (PIL's ``verify``: headers and checksums, no full decode), so a corrupt
    file is reported before training even when an epoch's sampling would never reach it. Without ``skip_bad`` one
    DataError lists them all; with it the bad paths are returned (to leave out and count)."""
    bad: list[str] = []
    for path in paths:
        try:
            with Image.open(path) as im:
                im.verify()
        except (*_LOAD_ERRORS, Image.UnidentifiedImageError):
            bad.append(path)
    if bad and not skip_bad:
        raise DataError(
            f"{len(bad)} of {len(paths)} images cannot be read:\n{format_list(bad)}",
            path=source or os.path.dirname(bad[0]),
            expected="every image in the folder to be a readable image",
            fix="replace or remove the listed files, or leave them out and count them with --skip-bad",
        )
    return bad


def _to_rgb(im: Image.Image) -> Image.Image:
    """RGB with 8 bits per channel. 16-bit and 32-bit greyscale (medical, scientific, depth PNGs) are scaled to
    0..255: PIL's own convert clips them, so nearly every pixel of a 16-bit image would become white."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        import numpy as np

        values = np.asarray(im, dtype=np.float64)
        if im.mode == "F":
            top = 1.0 if values.size and values.max() <= 1.0 else 65535.0
        else:
            top = 65535.0 if im.mode.startswith("I;16") or (values.size and values.max() > 255) else 255.0
        scaled = np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(scaled, mode="L").convert("RGB")
    return im.convert("RGB")


#: an image whose shorter side is below this fraction of the model's input is warned about (and counted)
SMALL_IMAGE_FRACTION = 0.5


def small_images(paths: Iterable[str], input_size: int) -> list[str]:
    """The paths whose shorter side is below ``SMALL_IMAGE_FRACTION`` of ``input_size``, read from the file headers
    only (no pixel is decoded); unreadable files are left to the readers that report them."""
    found = []
    for path in paths:
        try:
            with Image.open(path) as image:
                if min(image.size) < SMALL_IMAGE_FRACTION * input_size:
                    found.append(path)
        except (OSError, ValueError, Image.DecompressionBombError):
            continue
    return found


def load_rgb(path: str) -> Image.Image:
    """Open an image fully decoded in RGB; raise DataError naming the file if it is missing or unreadable."""
    try:
        with Image.open(path) as im:
            return _to_rgb(im)
    except FileNotFoundError as e:
        raise DataError(
            "image file does not exist",
            path=path,
            expected="a readable image file",
            fix="restore the file or remove it from the split / list file",
        ) from e
    except _LOAD_ERRORS as e:
        raise DataError(
            f"cannot read image ({type(e).__name__}: {e})",
            path=path,
            expected="a readable JPEG/PNG/... image",
            fix="replace the corrupt file, or skip and count unreadable images (--skip-bad; skip_bad=True in Python)",
        ) from e


class ImageDataset(torch.utils.data.Dataset):
    """Images from a list of :class:`Datum` (labelled) or plain paths (unlabelled; label ``-1``).

    ``__getitem__`` returns ``(image, label)`` or, with ``return_index=True``, ``(image, label, index)``.

    A missing or corrupt image raises :class:`DataError`. With ``skip_bad=True`` it is replaced by the next good
    item (wrapping around) and its path is appended to :attr:`skipped`, so the count can be reported rather than
    dropped silently. With ``num_workers > 0`` each worker holds its own ``skipped`` list; call :meth:`verify`
    first to find bad images up front in the main process.
    """

    def __init__(
        self,
        items: Sequence[Datum | str | os.PathLike[str]],
        transform: Callable[[Image.Image], Any] | None = None,
        *,
        skip_bad: bool = False,
        return_index: bool = False,
    ) -> None:
        self.items: list[Datum | str] = [i if isinstance(i, Datum) else os.fspath(i) for i in items]
        self.transform = transform
        self.skip_bad = skip_bad
        self.return_index = return_index
        self.skipped: list[str] = []
        self._small: tuple[int, list[str]] | None = None  # (items scanned, small paths), see :attr:`small`
        self._warned_small = False
        self._bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.items)

    @property
    def small(self) -> list[str]:
        """Images far smaller than the model's input (upsampled), found from the image headers of every item, so
        the count is right whatever the loader's worker processes saw (they cannot report back) or a feature
        cache skipped; empty when the transform does not name an input size."""
        size = getattr(self.transform, "input_size", None)
        if not size:
            return []
        if self._small is None or self._small[0] != len(self.items):
            self._small = (len(self.items), small_images([self.path(i) for i in range(len(self.items))], size))
        return list(self._small[1])

    def path(self, index: int) -> str:
        """Image path of item ``index``."""
        return _item_path(self.items[index])

    def label(self, index: int) -> int:
        """Label of item ``index`` (``-1`` for unlabelled paths)."""
        item = self.items[index]
        return item.label if isinstance(item, Datum) else -1

    @property
    def labels(self) -> list[int]:
        """All labels in item order (``-1`` for unlabelled), e.g. for class-balanced samplers."""
        return [self.label(i) for i in range(len(self.items))]

    def _mark_bad(self, index: int, error: DataError) -> None:
        if index not in self._bad:
            self._bad.add(index)
            self.skipped.append(self.path(index))
            logger.warning("skipping unreadable image %s (%s)", self.path(index), error.problem)

    def _load(self, index: int) -> tuple[Image.Image, int]:
        n = len(self.items)
        for offset in range(n):
            j = (index + offset) % n
            if j in self._bad:
                continue
            try:
                return load_rgb(self.path(j)), j
            except DataError as e:
                if not self.skip_bad:
                    raise
                self._mark_bad(j, e)
        raise DataError(
            f"all {n} images are unreadable ({len(self.skipped)} skipped)",
            path=os.path.dirname(self.path(index)),
            expected="at least one readable image",
            fix="check the image files and the paths in the split / list file",
        )

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        if not 0 <= index < len(self.items):
            raise IndexError(f"index {index} out of range for {len(self.items)} items")
        image, j = self._load(index)
        size = getattr(self.transform, "input_size", None)
        if size and min(image.size) < SMALL_IMAGE_FRACTION * size and not self._warned_small:
            self._warned_small = True
            logger.warning(
                "%s is %dx%d px, far smaller than the model's %d px input: it is upsampled and details are "
                "invented (every such image is counted in the results, as small_images)",
                self.path(j),
                *image.size,
                size,
            )
        out = self.transform(image) if self.transform is not None else image
        if self.return_index:
            return out, self.label(j), j
        return out, self.label(j)

    def verify(self) -> list[str]:
        """Decode every image once, up front.

        Without ``skip_bad`` all unreadable images are reported in one DataError; with it they are removed from
        :attr:`items` and recorded in :attr:`skipped`. Returns the paths found bad by this call.
        """
        bad: list[tuple[int, DataError]] = []
        for i in range(len(self.items)):
            try:
                load_rgb(self.path(i)).close()
            except DataError as e:
                bad.append((i, e))
        if not bad:
            return []
        paths = [self.path(i) for i, _ in bad]
        if not self.skip_bad:
            raise DataError(
                f"{len(bad)} of {len(self.items)} images are missing or unreadable:\n"
                f"{format_list([e.args[0] for _, e in bad])}",
                path=os.path.commonpath(paths) if len(paths) > 1 else paths[0],
                expected="every image to decode",
                fix="replace or remove the listed files, or skip and count them (--skip-bad; skip_bad=True in Python)",
            )
        for i, e in bad:
            logger.warning("skipping unreadable image %s (%s)", self.path(i), e.problem)
        drop = {i for i, _ in bad}
        self.items = [item for i, item in enumerate(self.items) if i not in drop]
        self._bad.clear()
        self.skipped.extend(paths)
        return paths
