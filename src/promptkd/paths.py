"""Output folders checked up front: a run that cannot write its results fails before any work, with what to do."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from promptkd.errors import PromptKDError

__all__ = ["OutputPathError", "writable_file", "writable_folder"]


class OutputPathError(PromptKDError, OSError):
    """An output path that cannot be written."""


def writable_folder(path: str | os.PathLike[str], flag: str = "--out") -> Path:
    """Create ``path`` (and parents) if needed and prove a file can be written there; returns it."""
    folder = Path(path).expanduser()
    if folder.exists() and not folder.is_dir():
        raise OutputPathError(f"{flag} {folder} is a file, not a folder; name a folder for the run's outputs.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise OutputPathError(
            f"cannot write to {flag} {folder} ({error.strerror or error}); choose a folder you can write to."
        ) from error
    return folder


def writable_file(path: str | os.PathLike[str], flag: str = "--out") -> Path:
    """A file path whose folder can be written and which is not itself a folder (checked before any work)."""
    target = Path(path).expanduser()
    if target.is_dir():
        raise OutputPathError(f"{flag} {target} is a folder; give a file name, e.g. {target / 'predictions.csv'}.")
    writable_folder(target.parent if str(target.parent) else ".", flag=f"{flag} {target.name}: its folder")
    return target
