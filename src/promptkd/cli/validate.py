"""The one set of argument checks every subcommand uses, as argparse ``type=`` callables.

A bad value (``--views 0``, ``--lr nan``, ``--max-images -5``, a file where a folder belongs, a class list that is not
UTF-8) is refused while the command line is parsed, before any model or image is loaded, with one message naming
the option and the value (argparse exits 2). Each check carries a ``kind`` so tests can walk the parsers and feed
every option the edge values of its kind; an option without one of these types is an option nobody validated.
Nothing here imports torch: ``promptkd --help`` and argument errors stay fast.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from promptkd.errors import PromptKDError

__all__ = [
    "KINDS",
    "Repeatable",
    "checkpoint",
    "count",
    "count0",
    "features",
    "finite_float",
    "fraction",
    "input_file",
    "input_folder",
    "input_path",
    "kind_of",
    "non_negative_float",
    "output_file",
    "output_folder",
    "positive_float",
    "probability",
    "seed",
    "teacher_checkpoint",
    "text",
    "text_file",
]

#: Counts above this are refused: no run has 2**31 images, views or steps, and larger values overflow tensors.
MAX_COUNT = 2**31 - 1
#: Seeds must fit every generator they reach (numpy takes 0 .. 2**32 - 1).
MAX_SEED = 2**32 - 1

Check = Callable[[str], Any]


def _kind(name: str, meaning: str) -> Callable[[Check], Check]:
    """Tag a check with its kind (walked by the tests) and a readable name (argparse's 'invalid <name> value')."""

    def tag(check: Check) -> Check:
        check.kind = name  # type: ignore[attr-defined]
        check.meaning = meaning  # type: ignore[attr-defined]
        check.__name__ = meaning
        return check

    return tag


def kind_of(check: Any) -> str | None:
    """The kind of a check made here, None for anything else (a raw ``int``, ``float`` or no type at all)."""
    return getattr(check, "kind", None)


def _integer(value: str, low: int, high: int, meaning: str) -> int:
    try:
        number = int(value.strip().replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {meaning}, got {value!r}") from None
    if not low <= number <= high:
        raise argparse.ArgumentTypeError(f"must be {meaning}, got {number}")
    return number


def _real(value: str, low: float, high: float, meaning: str, *, open_low: bool = False) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {meaning}, got {value!r}") from None
    if not math.isfinite(number) or number < low or number > high or (open_low and number == low):
        raise argparse.ArgumentTypeError(f"must be {meaning}, got {value}")
    return number


@_kind("count", "a whole number of at least 1")
def count(value: str) -> int:
    """Sizes that cannot be zero: batch sizes, views, K of top-k, epochs."""
    return _integer(value, 1, MAX_COUNT, "a whole number of at least 1")


@_kind("count0", "a whole number of at least 0")
def count0(value: str) -> int:
    """Counts where 0 has a documented meaning (0 = all images, 0 = in-process loading, 0 = one lane per shard)."""
    return _integer(value, 0, MAX_COUNT, "a whole number of at least 0")


@_kind("seed", f"a seed between 0 and {MAX_SEED}")
def seed(value: str) -> int:
    return _integer(value, 0, MAX_SEED, f"a seed between 0 and {MAX_SEED}")


@_kind("positive_float", "a finite number above 0")
def positive_float(value: str) -> float:
    return _real(value, 0.0, math.inf, "a finite number above 0", open_low=True)


@_kind("non_negative_float", "a finite number of at least 0")
def non_negative_float(value: str) -> float:
    return _real(value, 0.0, math.inf, "a finite number of at least 0")


@_kind("finite_float", "a finite number")
def finite_float(value: str) -> float:
    return _real(value, -math.inf, math.inf, "a finite number")


@_kind("fraction", "a number above 0 and at most 1")
def fraction(value: str) -> float:
    """Shares that must be something: a required agreement of 0 would accept anything."""
    return _real(value, 0.0, 1.0, "a number above 0 and at most 1", open_low=True)


@_kind("probability", "a number between 0 and 1")
def probability(value: str) -> float:
    return _real(value, 0.0, 1.0, "a number between 0 and 1")


@_kind("text", "a non-empty text")
def text(value: str) -> str:
    """Names, tags, devices, patterns: checked by what reads them, here only for being there at all."""
    if not value.strip() or "\x00" in value:
        raise argparse.ArgumentTypeError(f"must be {text.meaning}, got {value!r}")  # type: ignore[attr-defined]
    return value


def _path(value: str) -> Path:
    text(value)
    return Path(value).expanduser()


@_kind("input_path", "an existing file or folder")
def input_path(value: str) -> str:
    if not _path(value).exists():
        raise argparse.ArgumentTypeError(f"{value}: no such file or folder")
    return value


@_kind("input_file", "an existing file")
def input_file(value: str) -> str:
    path = _path(value)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{value} is a folder; give a file")
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{value}: no such file")
    return value


@_kind("input_folder", "an existing folder")
def input_folder(value: str) -> str:
    path = _path(value)
    if path.is_file():
        raise argparse.ArgumentTypeError(f"{value} is a file; give a folder")
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{value}: no such folder")
    return value


@_kind("text_file", "an existing UTF-8 text file")
def text_file(value: str) -> str:
    """Class lists and template files: read as UTF-8 everywhere, so a Latin-1 file is refused here, by name."""
    input_file(value)
    try:
        Path(value).expanduser().read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise argparse.ArgumentTypeError(
            f"{value} is not UTF-8 text (byte {error.object[error.start]:#04x} at offset {error.start}); save it "
            "as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from None
    except OSError as error:
        raise argparse.ArgumentTypeError(f"{value}: cannot be read ({error.strerror or error})") from None
    return value


def _checkpoint_check(role: str) -> Check:
    """The check of a checkpoint-like file that plays ``role`` (:data:`promptkd.hub.ROLES`): all share one kind."""

    @_kind("checkpoint", "a promptkd checkpoint (.safetensors, .json or their stem, a Hub folder or hf-hub:ORG/NAME)")
    def check(value: str) -> str:
        """A file given as its .safetensors, its .json or the stem they share; an ``hf-hub:ORG/NAME[@REVISION]``
        name or a folder in the Hub's layout (promptkd export --format hub) becomes the local file of ``role``."""
        from promptkd.hub import resolve_file

        _path(value)  # refuses an empty value
        try:
            value = resolve_file(value, role)
        except PromptKDError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
        path = _path(value)
        if path.is_dir():
            raise argparse.ArgumentTypeError(
                f"{value} is a folder; give a checkpoint file (e.g. {path / 'prompts'}) or a folder written by "
                "`promptkd export --format hub`"
            )
        stem = path.with_suffix("") if path.suffix in (".safetensors", ".json") else path
        tensors = stem.with_name(stem.name + ".safetensors")  # as promptkd.checkpoints.checkpoint_paths pairs them
        paired = (tensors, stem.with_name(stem.name + ".json"), stem.with_suffix(".safetensors"))  # tta sources
        if not (path.is_file() or any(candidate.is_file() for candidate in paired)):
            raise argparse.ArgumentTypeError(f"{value}: no such checkpoint (no {tensors})")
        return value

    return check


#: a checkpoint (a Hub folder or name: its main checkpoint, e.g. the distilled student)
checkpoint = _checkpoint_check("checkpoint")
#: a teacher's checkpoint (a Hub folder or name: the teacher it holds, or its checkpoint when that is the teacher)
teacher_checkpoint = _checkpoint_check("teacher")
#: stored teacher features (a Hub folder or name: the features file it holds)
features = _checkpoint_check("features")


def _can_write_in(folder: Path) -> bool:
    """Whether a file can be made in ``folder``, proved by making (and at once removing) one: permission bits
    say nothing for root, read-only mounts or /proc."""
    import tempfile  # here, not at the top: `promptkd --help` never needs it

    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def _writable_ancestor(path: Path, value: str) -> None:
    """The nearest existing folder above ``path`` must be a folder this process can write (nothing is left)."""
    parent = path.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"cannot write to {value}: {parent} is a file, not a folder")
    if not _can_write_in(parent):
        raise argparse.ArgumentTypeError(f"cannot write to {value}: {parent} is not writable; choose another place")


@_kind("output_folder", "a folder to write in")
def output_folder(value: str) -> str:
    path = _path(value)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{value} is a file, not a folder; name a folder for the outputs")
    if path.is_dir():
        if not _can_write_in(path):
            raise argparse.ArgumentTypeError(f"cannot write to {value}: not writable; choose another folder")
        return value
    _writable_ancestor(path, value)
    return value


@_kind("output_file", "a file to write")
def output_file(value: str) -> str:
    path = _path(value)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{value} is a folder; give a file name")
    if path.exists() and not os.access(path, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot write {value}; choose a file you can write")
    _writable_ancestor(path, value)
    return value


#: Every kind defined here (the edge-value test has values for each).
KINDS: tuple[str, ...] = (
    "count",
    "count0",
    "seed",
    "positive_float",
    "non_negative_float",
    "finite_float",
    "fraction",
    "probability",
    "text",
    "input_path",
    "input_file",
    "input_folder",
    "text_file",
    "checkpoint",
    "output_folder",
    "output_file",
)


class Repeatable(argparse.Action):
    """A list option that may be repeated: ``--set a=1 --set b=2`` keeps both (argparse's plain store keeps only the
    last, silently dropping the others). The first occurrence replaces the default list, later ones add to it."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:  # type: ignore[override]
        current = getattr(namespace, self.dest, None)
        if current is None or current is self.default:
            current = []
        setattr(namespace, self.dest, [*current, *values])
