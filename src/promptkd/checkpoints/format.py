"""promptkd checkpoints: trainable tensors in ``<stem>.safetensors`` plus a JSON config in ``<stem>.json``.

Only what was trained is written (prompts, projectors, meta-nets, coupling layers and their persistent buffers);
the frozen backbone is rebuilt from its recorded identity. Loading is strict: any missing, unexpected or mis-shaped
key is reported by name, and nothing is loaded partially. Writes go to a temporary file that is renamed into place,
so an interrupted save never leaves a half-written checkpoint.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from promptkd._version import __version__
from promptkd.backbones.files import sha256_of as file_sha256
from promptkd.errors import PromptKDError
from promptkd.hub import in_hub_cache

FORMAT_NAME = "promptkd-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(PromptKDError, RuntimeError):
    """A checkpoint that cannot be read or does not fit the model; the message names file and keys."""


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in the target folder; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    if in_hub_cache(path):
        raise CheckpointError(
            f"{path} is in the Hugging Face Hub cache (a downloaded repo, kept as its commit has it); promptkd does "
            "not write there: write to another file (e.g. with --out)."
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if tmp.exists():  # mkstemp makes it 0600: give the file the permissions any new file would get
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def checkpoint_paths(path: str | Path) -> tuple[Path, Path]:
    """``out/prompts``, ``out/prompts.safetensors`` or ``out/prompts.json`` -> (tensor file, config file)."""
    path = Path(path)
    stem = path.with_suffix("") if path.suffix in (".safetensors", ".json") else path
    return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")


def classnames_hash(classnames: list[str]) -> str:
    """Order-sensitive hash of a class list: stored features and checkpoints are bound to it."""
    return hashlib.sha256("\n".join(classnames).encode()).hexdigest()[:16]


def save_checkpoint(path: str | Path, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> Path:
    """Write ``tensors`` (trainable state only) and ``config`` atomically; returns the tensor file path."""
    tensor_path, config_path = checkpoint_paths(path)
    clean = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    meta = dict(config)
    meta.setdefault("format", FORMAT_NAME)
    meta.setdefault("format_version", FORMAT_VERSION)
    meta.setdefault("library_version", __version__)
    meta.setdefault("created", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    meta["tensors"] = {
        k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")} for k, v in clean.items()
    }
    if "classnames" in meta and meta["classnames"] is not None:
        meta["classnames_sha256"] = classnames_hash(list(meta["classnames"]))
    save_tensor_record(tensor_path, config_path, clean, meta, metadata={"format": "pt", "promptkd": FORMAT_NAME})
    return tensor_path


def save_tensor_record(
    tensor_path: Path, record_path: Path, tensors: Mapping[str, torch.Tensor], record: dict[str, Any], **options: Any
) -> None:
    """Write tensors (safetensors) and their JSON record, each atomically; the record holds the tensor file's
    SHA-256 so a later reader can tell a damaged or swapped file (safetensors itself carries no checksum)."""
    from safetensors.torch import save_file

    with atomic_path(tensor_path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), **options)
        record = {**record, "tensors_sha256": file_sha256(tmp)}
    atomic_write_text(record_path, json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")


def load_tensor_record(tensor_path: Path, record_path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read what :func:`save_tensor_record` wrote; CheckpointError for a missing, unreadable or damaged pair (a
    record without a digest, written before digests were added, is accepted as it is)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not tensor_path.is_file():
        raise CheckpointError(f"{tensor_path}: no such file.")
    if not record_path.is_file():
        raise CheckpointError(f"{record_path}: missing; the tensors of {tensor_path.name} come with this JSON record.")
    try:
        tensors = load_file(str(tensor_path), device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{tensor_path}: cannot be read ({error}); the file is truncated or corrupt.") from error
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as error:
        raise CheckpointError(f"{record_path}: not valid JSON ({error}).") from error
    if not isinstance(record, dict):
        raise CheckpointError(f"{record_path}: not a promptkd record (a JSON object is expected).")
    listed = set(record.get("tensors") or {})
    if listed and listed != set(tensors):
        raise CheckpointError(
            f"{tensor_path}: tensors {sorted(set(tensors) ^ listed)} disagree with {record_path.name}; "
            "the two files come from different saves."
        )
    recorded = record.get("tensors_sha256")
    if recorded is not None and file_sha256(tensor_path) != recorded:
        raise CheckpointError(
            f"{tensor_path}: damaged or altered (its SHA-256 differs from the one {record_path.name} records); it "
            "was not used. Re-create it, or restore both files from the same save."
        )
    return tensors, record


DIGEST_MAGIC = b"promptkd-sha256\n"


def write_with_digest(path: str | Path, data: bytes) -> None:
    """Write ``data`` atomically behind a header holding its SHA-256, so a damaged file is recognised on reading
    (torch's zip archives carry no checksum that ``torch.load`` verifies: flipped bytes load as other numbers)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(DIGEST_MAGIC + hashlib.sha256(data).digest() + data)


def read_with_digest(path: str | Path) -> bytes:
    """The payload written by :func:`write_with_digest`, verified; a file without the header is returned whole
    (written before digests were added); a payload that does not match its digest is refused."""
    raw = Path(path).read_bytes()
    if not raw.startswith(DIGEST_MAGIC):
        return raw
    start = len(DIGEST_MAGIC) + 32
    digest, payload = raw[len(DIGEST_MAGIC) : start], raw[start:]
    if hashlib.sha256(payload).digest() != digest:
        raise CheckpointError(
            f"{path}: damaged (its content does not match the SHA-256 stored with it); it was not used. Delete it "
            "to start that part again, or restore it from a backup."
        )
    return payload


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a promptkd checkpoint; both files must exist, agree and match the recorded digest."""
    tensor_path, config_path = checkpoint_paths(path)
    if not tensor_path.is_file():
        raise CheckpointError(f"{tensor_path}: no such checkpoint file.")
    if not config_path.is_file():
        raise CheckpointError(
            f"{config_path}: missing; a promptkd checkpoint is a .safetensors file plus its .json config. "
            "To import a checkpoint of the CoOp/MaPLe/PromptSRC/PromptKD code, use `promptkd convert`."
        )
    tensors, config = load_tensor_record(tensor_path, config_path)
    if config.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{config_path}: not a promptkd checkpoint config (format={config.get('format')!r}).")
    return tensors, config


def trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The state that a checkpoint holds: parameters with requires_grad plus persistent buffers of trainable modules.

    Buffers such as BatchNorm running statistics belong to a trainable module and are needed at inference; fixed
    token buffers (``token_prefix``/``token_suffix``) are registered non-persistent and never appear here.
    """
    state = module.state_dict()
    params = dict(module.named_parameters())
    keep = {}
    trainable_prefixes = {
        name.rsplit(".", 1)[0] if "." in name else "" for name, p in params.items() if p.requires_grad
    }
    for key, value in state.items():
        if key in params:
            if params[key].requires_grad:
                keep[key] = value
        else:  # a buffer: keep it when its owning module has trainable parameters
            owner = key.rsplit(".", 1)[0] if "." in key else ""
            if owner in trainable_prefixes:
                keep[key] = value
    return keep


def check_state_fits(
    expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor], source: str | Path
) -> None:
    """Raise CheckpointError naming missing, unexpected and mis-shaped keys; silent when they match exactly."""
    missing = sorted(k for k in expected if k not in found)
    unexpected = sorted(k for k in found if k not in expected)
    mis_shaped = sorted(
        f"{k} (checkpoint {tuple(found[k].shape)}, model {tuple(expected[k].shape)})"
        for k in expected
        if k in found and tuple(found[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or mis_shaped:
        lines = [f"{source}: checkpoint does not fit the model; nothing was loaded."]
        for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mis_shaped)):
            if items:  # a few names and the count: another architecture differs in every one of ~140 keys
                more = f", ... ({len(items) - 8} more, {len(items)} in all)" if len(items) > 8 else ""
                lines.append(f"  {label} keys: {', '.join(items[:8])}{more}")
        lines.append(
            "  Check that the method, backbone and prompt settings match the ones the checkpoint was made with."
        )
        raise CheckpointError("\n".join(lines))


def load_trainable_state(module: nn.Module, tensors: Mapping[str, torch.Tensor], source: str | Path) -> None:
    """Strictly load checkpoint tensors into the trainable part of ``module`` (all or nothing)."""
    expected = trainable_state(module)
    check_state_fits(expected, tensors, source)
    current = module.state_dict()
    with torch.no_grad():
        for key, value in tensors.items():
            current[key].copy_(value.to(dtype=current[key].dtype, device=current[key].device))
