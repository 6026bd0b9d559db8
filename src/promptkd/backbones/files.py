"""Reading CLIP weight files of every format users have, with errors that name the file.

Formats: OpenAI TorchScript archives (``ViT-B-16.pt``), torch pickles of state dicts (``.pt``/``.pth``/``.bin``),
``.safetensors``. open_clip reads these too, but reports a truncated file, a TorchScript archive under
``weights_only=True`` or a wrong architecture with messages that do not name the file or say what to do.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from promptkd.errors import PromptKDError

logger = logging.getLogger(__name__)

# Keys that OpenAI's TorchScript archives carry next to the weights; not parameters.
_OPENAI_NON_WEIGHT_KEYS = ("input_resolution", "context_length", "vocab_size")


class WeightFileError(PromptKDError, RuntimeError):
    """A weight or checkpoint file that cannot be read or does not fit; the message names the file."""


@dataclass
class WeightFile:
    """A state dict read from disk plus what we learnt about its origin."""

    path: Path
    format: str  # "torchscript" | "safetensors" | "torch"
    state_dict: dict[str, torch.Tensor]
    sha256: str | None = None


_HASHES: dict[tuple[str, int, int, int], str] = {}


def sha256_of(path: str | Path, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file, streamed (ViT-L/14 weights are ~900 MB) and remembered per (path, size, mtime, inode), so
    a weight file that identifies a teacher, a cache and stored features is hashed once per process."""
    resolved = Path(path).expanduser().resolve()
    stat = resolved.stat()
    memo = (str(resolved), stat.st_size, stat.st_mtime_ns, stat.st_ino)
    if memo not in _HASHES:
        digest = hashlib.sha256()
        with open(resolved, "rb") as handle:
            while block := handle.read(chunk):
                digest.update(block)
        _HASHES[memo] = digest.hexdigest()
    return _HASHES[memo]


def detect_format(path: Path) -> str:
    """Tell TorchScript archives, torch zip pickles, legacy pickles and safetensors apart by content."""
    with open(path, "rb") as handle:
        head = handle.read(16)
    if len(head) < 8:
        raise WeightFileError(f"{path}: file is empty or truncated ({path.stat().st_size} bytes); re-download it.")
    if head[:2] == b"PK":
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except zipfile.BadZipFile as error:
            raise WeightFileError(
                f"{path}: looks like a torch zip archive but cannot be opened ({error}); "
                "the file is probably truncated or corrupt - re-download it."
            ) from error
        if any(name.endswith("constants.pkl") or "/code/" in name for name in names):
            return "torchscript"
        return "torch"
    header_len = int.from_bytes(head[:8], "little")
    if head[8:9] == b"{" and 0 < header_len < 100_000_000:
        return "safetensors"
    return "torch"  # legacy (non-zip) pickle


def _unwrap_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "module"):
            inner = obj.get(key)
            if isinstance(inner, dict) and inner and all(isinstance(k, str) for k in inner):
                obj = inner
                break
    if not isinstance(obj, dict) or not obj:
        raise WeightFileError(f"{path}: expected a state dict (name -> tensor), found {type(obj).__name__}.")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise WeightFileError(f"{path}: the file holds no tensors.")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module.") :]: v for k, v in tensors.items()}
    for key in _OPENAI_NON_WEIGHT_KEYS:
        tensors.pop(key, None)
    return tensors


def read_weight_file(path: str | Path, *, allow_torchscript: bool = True, compute_hash: bool = False) -> WeightFile:
    """Read any supported weight file into a plain state dict (CPU tensors)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightFileError(f"{path}: no such weight file.")
    fmt = detect_format(path)
    if fmt == "safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as error:
            raise WeightFileError(
                f"{path}: cannot read safetensors file ({error}); it is probably truncated - re-download it."
            ) from error
    elif fmt == "torchscript":
        if not allow_torchscript:
            raise WeightFileError(f"{path}: is a TorchScript archive; pass allow_torchscript=True to read it.")
        warnings.warn(
            f"{path} is a TorchScript archive (OpenAI's original format). Reading it runs code stored in the file "
            "(the equivalent of torch.load(weights_only=False)): only do this with files you trust. "
            "Convert it once to .safetensors with `promptkd convert-weights` to avoid this.",
            UserWarning,
            stacklevel=2,
        )
        try:
            module = torch.jit.load(str(path), map_location="cpu")
        except RuntimeError as error:
            raise WeightFileError(f"{path}: cannot load TorchScript archive ({error}); re-download it.") from error
        state = dict(module.state_dict())
    else:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except RuntimeError as error:
            message = str(error)
            if "zip archive" in message or "PytorchStreamReader" in message or "unexpected EOF" in message:
                raise WeightFileError(
                    f"{path}: the file is truncated or corrupt ({message.splitlines()[0]}); re-download it."
                ) from error
            raise WeightFileError(f"{path}: cannot be read as a torch checkpoint: {message.splitlines()[0]}") from error
        except (EOFError, ValueError) as error:
            raise WeightFileError(f"{path}: the file is truncated or corrupt ({error}); re-download it.") from error
        except Exception as error:  # pickle.UnpicklingError from weights_only
            raise WeightFileError(
                f"{path}: holds Python objects that torch.load(weights_only=True) refuses ({error}). "
                "If you trust the file, convert it in a trusted environment to .safetensors."
            ) from error
        state = obj
    tensors = _unwrap_state_dict(state, path)
    digest = sha256_of(path) if compute_hash else None
    return WeightFile(path=path, format=fmt, state_dict=tensors, sha256=digest)


def save_state_dict_safetensors(state_dict: dict[str, torch.Tensor], path: str | Path, metadata: dict | None = None):
    """Write weights as safetensors atomically (contiguous, aliasing broken by cloning)."""
    from safetensors.torch import save_file

    from promptkd.checkpoints.format import atomic_path

    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    meta = {"format": "pt"}
    if metadata:
        meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
