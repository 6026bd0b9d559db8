"""A test-time run's saved progress (resume exactly after an interruption) and its peak-memory measure.

``<out>/tta-progress/run.json`` holds the run's identity — method and settings, mode, seed and number of orders,
the base by content (sha256 of the checkpoint, or model / weights tag / hand-written context), the source files by
content, each dataset's image set, batch size, world size — and the streams already finished. Each rank saves, per
stream (dataset × order), its rows so far and the method's state (``state_dict``) in ``<stream>-rank<r>.pt``
(SHA-256 checked on reading). A new run whose identity differs is refused, listing what differs, unless it discards
the old one (``--overwrite``); the folder is removed when the run completes.
"""

from __future__ import annotations

import hashlib
import io
import json
import resource
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from promptkd.tta.base import TTAError

__all__ = ["PeakMemory", "RunProgress", "SavedStream", "order_hash", "run_identity", "stream_key"]

FOLDER = "tta-progress"


def stream_key(dataset: str, seed: int) -> str:
    return f"{dataset}-seed{seed}"


def order_hash(items: list, order: list[int]) -> str:
    """sha256 of the image paths in stream order (what the result records as the order)."""
    digest = hashlib.sha256()
    for i in order:
        digest.update(f"{items[i].path}\0".encode())
    return digest.hexdigest()


def _items_hash(items: list) -> str:
    digest = hashlib.sha256()
    for path, label in sorted((str(item.path), int(item.label)) for item in items):
        digest.update(f"{path}\0{label}\n".encode())
    return digest.hexdigest()


def _file_hash(path: str | None) -> str | None:
    if path is None:
        return None
    from promptkd.checkpoints import file_sha256
    from promptkd.checkpoints.format import checkpoint_paths

    files = [Path(path)] if Path(path).is_file() else list(checkpoint_paths(path))
    return hashlib.sha256("".join(file_sha256(str(f)) for f in files).encode()).hexdigest()


def run_identity(config: Any, datasets: dict[str, tuple[Any, list]], world_size: int) -> dict[str, Any]:
    """What a resumed run must share with the interrupted one (by content where a file is named)."""
    from promptkd.config import from_dict, to_dict
    from promptkd.tta.base import get_tta_method

    method_config = from_dict(get_tta_method(config.method).config_class, config.method_config)
    return {
        "method": config.method,
        "mode": config.mode,
        "seed": config.seed,
        "orders": config.orders,
        "method_config": json.loads(json.dumps(to_dict(method_config), default=str)),
        "base_sha256": _file_hash(config.base),
        "model": None
        if config.base
        else [config.model, config.pretrained, config.quick_gelu, config.init, config.n_ctx],
        "stats_sha256": _file_hash(config.stats),
        "prototypes_sha256": _file_hash(config.prototypes),
        "images": {key: _items_hash(items) for key, (_, items) in datasets.items()},
        "split": config.split,
        "batch_size": config.batch_size,
        "precision": config.precision,
        "allow_small_images": config.allow_small_images,
        "world_size": world_size,
    }


@dataclass
class SavedStream:
    rows: torch.Tensor
    state: dict[str, torch.Tensor]
    seconds: float
    adapt_seconds: float
    cpu_seconds: float


class RunProgress:
    """The progress folder of one run (see the module docstring)."""

    def __init__(self, folder: Path, identity: dict[str, Any], info: Any, done: set[str], discard: bool):
        self.folder, self.identity, self.info, self.done, self.discard = folder, identity, info, done, discard

    @classmethod
    def open(cls, out: Path, identity: dict[str, Any], info: Any, *, overwrite: bool) -> RunProgress:
        """Read an interrupted run in ``out``: resume it if it is this setting, refuse (or discard) it if not."""
        folder = Path(out) / FOLDER
        record = folder / "run.json"
        if not record.exists():
            return cls(folder, identity, info, set(), discard=folder.exists())
        try:
            old = json.loads(record.read_text(encoding="utf-8"))
            old_identity, done = old["identity"], set(old["done"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise TTAError(f"{record}: unreadable progress of an interrupted run ({error}); delete {folder}") from None
        old_flat, new_flat = _flat(old_identity), _flat(identity)
        differ = [k for k in sorted({*old_flat, *new_flat}) if old_flat.get(k) != new_flat.get(k)]
        if not differ and not overwrite:
            return cls(folder, identity, info, done, discard=False)
        if differ and not overwrite:
            listed = "; ".join(f"{k}: {_short(old_flat.get(k))} then, {_short(new_flat.get(k))} now" for k in differ)
            raise TTAError(
                f"{folder} holds an interrupted {old_identity.get('method')} run ({old_identity.get('mode')}) of "
                f"another setting ({listed}). Rerun its own command to resume it, choose another --out, or pass "
                "--overwrite to discard it."
            )
        return cls(folder, identity, info, set(), discard=True)

    def start(self) -> None:
        """Main rank: write the identity (after discarding an old run when told)."""
        if self.discard and self.folder.exists():
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._write()

    def _write(self) -> None:
        from promptkd.checkpoints import atomic_write_text

        text = json.dumps({"identity": self.identity, "done": sorted(self.done)}, indent=1)
        atomic_write_text(self.folder / "run.json", text)

    def is_done(self, key: str) -> bool:
        return key in self.done

    def _path(self, key: str, rank: int) -> Path:
        return self.folder / f"{key}-rank{rank}.pt"

    def load_stream(self, key: str, rank: int) -> SavedStream | None:
        from promptkd.checkpoints import read_with_digest

        path = self._path(key, rank)
        if not path.exists():
            return None
        data = torch.load(io.BytesIO(read_with_digest(path)), map_location="cpu", weights_only=True)
        times = (float(data["seconds"]), float(data["adapt_seconds"]), float(data["cpu_seconds"]))
        return SavedStream(data["rows"], dict(data["state"]), *times)

    def save_stream(
        self,
        key: str,
        rank: int,
        rows: torch.Tensor,
        state: dict[str, torch.Tensor],
        seconds: float,
        adapt: float,
        cpu: float,
    ) -> None:
        from promptkd.checkpoints import write_with_digest

        buffer = io.BytesIO()
        payload = {"rows": rows, "state": state, "seconds": seconds, "adapt_seconds": adapt, "cpu_seconds": cpu}
        torch.save(payload, buffer)
        write_with_digest(self._path(key, rank), buffer.getvalue())

    def mark_done(self, key: str) -> None:
        self.done.add(key)
        if self.info.is_main:
            self._write()
        self._path(key, self.info.rank).unlink(missing_ok=True)

    def finish(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted fields of a nested identity (``method_config.n_views``), so a refusal names exactly what differs."""
    if not isinstance(value, dict):
        return {prefix: value}
    out: dict[str, Any] = {}
    for key, item in value.items():
        out.update(_flat(item, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _short(value: Any) -> str:
    if isinstance(value, str) and len(value) == 64:
        return value[:12] + "..."
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


class PeakMemory:
    """Peak memory of a stream. CUDA: ``max_memory_allocated`` (weights included, as TTA-VLM reports it). CPU: the
    process's peak resident set size during the stream (weights and runtime included; Linux resets the peak
    through /proc/self/clear_refs, elsewhere it is the lifetime peak) and, as ``delta_mb``, that peak minus the
    resident size at the stream's start — what the stream added, 0 when it reused memory an earlier stream took."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.measure = "cuda_max_memory_allocated"
            self.start = torch.cuda.memory_allocated(self.device) / 2**20
            return
        self.start = _rss_kb() / 1024
        self.measure = "cpu_peak_rss" if _reset_peak_rss() else "cpu_lifetime_peak_rss"

    def peak_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return _peak_rss_kb() / 1024

    def delta_mb(self) -> float:
        return max(0.0, self.peak_mb() - self.start)


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _rss_kb() -> int:
    value = _status_kb("VmRSS")
    return value if value is not None else _peak_rss_kb()


def _peak_rss_kb() -> int:
    value = _status_kb("VmHWM")
    if value is not None:
        return value
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False
