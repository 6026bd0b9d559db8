"""The teacher's outputs computed once: stored views and cached soft labels (after FKD, Shen & Xing, ECCV 2022).

PromptKD's teacher is frozen, yet a plain distillation run evaluates its image tower on every augmented view of
every epoch, seed and sweep (60% of a step on the world pair, 64% with ViT-L/14). FKD's remedy: fix a set of views
per image and store the teacher's logits for each, then train any number of students from the store.

- :class:`ViewRecipe`: ``views`` crops per image (RandomResizedCrop + flip, at the student's input), each a pure
  function of (recipe seed, image key, view number). A run visits them as view ``(epoch + o) % views`` with
  ``o`` drawn from (run seed, image key): every image cycles through its views, and other seeds, learning rates,
  temperatures, prompt depths or projectors draw from the same stored views.
- :class:`TeacherCache`: a folder of teacher logits keyed by ``<image key>#<view>``, bound to one teacher (its
  identity), one set of stored class features (their hash), one class list and one recipe (``cache.json``); any
  other is refused with what differs. Entries are full logits (fp32 or fp16) or FKD's top-k form (values, indices
  and the log-sum-exp, from which the other classes share the remaining probability mass). Each write is one
  chunk file, renamed into place when complete and carrying a SHA-256 of its tensors, checked before any of its
  rows is served: a run killed mid-write, or a damaged file, costs a recomputation, never a wrong soft label.
  A cache that cannot be written (read-only, disk full, over its size limit) stops storing with one warning and
  the run goes on with the live teacher.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from promptkd.data.transforms import interpolation_mode, seeded_cpu_rng
from promptkd.errors import PromptKDError

__all__ = ["CACHE_FORMAT", "TeacherCache", "TeacherCacheError", "ViewRecipe", "features_sha256"]

logger = logging.getLogger(__name__)

CACHE_FORMAT = "promptkd-teacher-cache"
CACHE_VERSION = 1
#: Full logits are stored up to this many classes by default; beyond it, FKD's top-k form keeps the cache small.
FULL_MAX_CLASSES = 4096


class TeacherCacheError(PromptKDError, ValueError):
    """A cache folder made for another teacher, other features, other classes or another view recipe."""


def _digest(*parts: object) -> int:
    text = "\x1f".join(str(p) for p in parts)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") & 0x7FFF_FFFF_FFFF_FFFF


def features_sha256(features: torch.Tensor) -> str:
    """Hash of stored class features (their float32 bytes): another features file is another set of soft labels."""
    data = features.detach().float().cpu().contiguous()
    return hashlib.sha256(data.numpy().tobytes()).hexdigest()


@dataclass(frozen=True)
class ViewRecipe:
    """How the stored views of an image are made (everything that decides their pixels)."""

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True
    views: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        if self.views < 1:
            raise ValueError(f"views per image must be positive, got {self.views}")

    @classmethod
    def for_student(cls, preprocess: Any, scale: Sequence[float], views: int, seed: int = 0) -> ViewRecipe:
        return cls(
            size=int(preprocess.size),
            mean=tuple(float(v) for v in preprocess.mean),
            std=tuple(float(v) for v in preprocess.std),
            interpolation=str(preprocess.interpolation),
            scale=(float(scale[0]), float(scale[1])),
            views=int(views),
            seed=int(seed),
        )

    def describe(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    def view_number(self, key: str, epoch: int, run_seed: int) -> int:
        """The view a run visits in ``epoch``: each image steps through its views, from an offset the seed draws."""
        return (epoch + _digest("offset", run_seed, key)) % self.views

    def crop(self, image: Image.Image, key: str, view: int) -> torch.Tensor:
        """View ``view`` of ``image``: its crop box and flip are seeded by (recipe seed, key, view) alone."""
        with seeded_cpu_rng(_digest("view", self.seed, key, view)):
            top, left, height, width = T.RandomResizedCrop.get_params(image, list(self.scale), list(self.ratio))
            flip = self.hflip and bool(torch.rand(1) < 0.5)
        out = TF.resized_crop(
            image, top, left, height, width, [self.size, self.size], interpolation_mode(self.interpolation)
        )
        if flip:
            out = TF.hflip(out)
        return TF.normalize(TF.to_tensor(out), list(self.mean), list(self.std))

    def prepare(self, run_seed: int, epoch_of: Any) -> Any:
        """A ``prepare(image, key, position)`` for streamed sources: the run's view of the image, keyed by it."""

        def prepare(image: Image.Image, key: str, position: int) -> tuple[torch.Tensor, str]:
            view = self.view_number(key, epoch_of(position), run_seed)
            return self.crop(image, key, view), f"{key}#{view}"

        return prepare


class StoredViews(torch.utils.data.Dataset):
    """Images of a sized source seen through a recipe's stored views: ``[i]`` → (view, -1, "<key>#<view>").

    The engine sets the epoch (``set_epoch``) before each pass, so the view of an image follows the run's cycle.
    """

    def __init__(self, items: Sequence[Any], keys: Sequence[str], recipe: ViewRecipe, run_seed: int, load) -> None:
        if len(items) != len(keys):
            raise ValueError("one key per item")
        self.items, self.keys, self.recipe, self.run_seed, self.load = list(items), list(keys), recipe, run_seed, load
        self.epoch = 0
        self.skipped: list[str] = []

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, str]:
        key = self.keys[index]
        view = self.recipe.view_number(key, self.epoch, self.run_seed)
        return self.recipe.crop(self.load(self.items[index]), key, view), -1, f"{key}#{view}"


# ----------------------------------------------------------------------------------------------------------------------
# The cache folder
# ----------------------------------------------------------------------------------------------------------------------


def _tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class TeacherCache:
    """Teacher logits per ``<image key>#<view>`` in ``folder`` (see the module docstring).

    Args:
        folder: the cache folder (created if missing).
        identity: what the logits depend on: ``teacher`` (identity dict), ``features_sha256``,
            ``classnames_sha256``, ``num_classes``, ``logit_scale`` and ``recipe`` (``ViewRecipe.describe()``).
        storage: ``full`` logits or ``topk`` (values, indices, log-sum-exp); ``topk`` is the ``k`` of it.
        dtype: ``fp32`` or ``fp16`` values (top-k indices are int32, the log-sum-exp fp32).
        max_gb: stop writing beyond this size (0: no limit).
        writer: a name for this process's chunk files (ranks write their own).
    """

    def __init__(
        self,
        folder: str | os.PathLike[str],
        identity: dict[str, Any],
        *,
        storage: Literal["full", "topk"] = "full",
        topk: int = 10,
        dtype: Literal["fp32", "fp16"] = "fp32",
        max_gb: float = 0.0,
        writer: str = "0",
        flush_every: int = 512,
        memory_mb: int = 512,
    ) -> None:
        self.folder = Path(folder).expanduser()
        num_classes = int(identity["num_classes"])
        if storage == "full" and num_classes > FULL_MAX_CLASSES:
            raise TeacherCacheError(
                f"{num_classes} classes: full logits would make {4 * num_classes} bytes per view; store the top-k "
                f"(--teacher-cache-topk K) instead, as FKD does (full logits are kept up to {FULL_MAX_CLASSES} classes)"
            )
        if storage == "topk" and not 0 < topk < num_classes:
            raise TeacherCacheError(f"top-k needs 0 < k < {num_classes} classes, got k = {topk}")
        self.storage, self.topk, self.dtype = storage, int(topk), dtype
        self.identity = {
            "format": CACHE_FORMAT,
            "version": CACHE_VERSION,
            **identity,
            "storage": {"form": storage, "topk": self.topk if storage == "topk" else None, "dtype": dtype},
        }
        self.max_bytes = int(max_gb * 1e9) if max_gb else 0
        self.writer = f"{writer}-{uuid.uuid4().hex[:8]}"
        self.flush_every = flush_every
        self.memory = memory_mb * 2**20
        self.writable = True
        self._pending: dict[str, torch.Tensor] = {}
        self._chunks_written = 0
        self._index: dict[str, tuple[str, int]] = {}
        self._loaded: OrderedDict[str, dict[str, torch.Tensor] | None] = OrderedDict()
        self._loaded_bytes = 0
        self.stats = {"hits": 0, "misses": 0, "written": 0, "bad_chunks": 0}
        self._open()

    # --- identity ----------------------------------------------------------------------------------------------------
    def _open(self) -> None:
        record = self.folder / "cache.json"
        if record.is_file():
            try:
                found = json.loads(record.read_text(encoding="utf-8"))
            except (OSError, ValueError) as error:
                raise TeacherCacheError(f"{record}: unreadable cache record ({error}); delete the folder") from None
            self._check(found)
        else:
            self._try(lambda: self._create(record))
        self._scan()
        if self.writable:
            self._try(self._probe)

    def _create(self, record: Path) -> None:
        from promptkd.checkpoints import atomic_write_text

        self.folder.mkdir(parents=True, exist_ok=True)
        if any(self.folder.iterdir()):
            raise TeacherCacheError(f"{self.folder} is not empty and holds no teacher cache; use an empty folder")
        atomic_write_text(record, json.dumps(self.identity, indent=2, default=str) + "\n")

    def _check(self, found: dict[str, Any]) -> None:
        if found.get("format") != CACHE_FORMAT:
            raise TeacherCacheError(f"{self.folder} is not a teacher cache (no {CACHE_FORMAT} record)")
        reasons = {
            "teacher": "another teacher (method, weights or prompts)",
            "features_sha256": "other stored class features",
            "classnames_sha256": "another class list",
            "num_classes": "another number of classes",
            "logit_scale": "another logit scale",
            "recipe": "another view recipe (size, crop range, flip, views per image or seed)",
            "storage": "another storage form (full or top-k, dtype)",
            "version": "another cache version",
        }
        ours = json.loads(json.dumps(self.identity, default=str))
        differ = [key for key in reasons if found.get(key) != ours.get(key)]
        if differ:
            detail = "; ".join(f"{reasons[k]} ({k})" for k in differ)
            raise TeacherCacheError(
                f"{self.folder} caches the logits of {detail}, not of this run's; use another --teacher-cache "
                "folder (or delete this one to start over)"
            )

    # --- writing -----------------------------------------------------------------------------------------------------
    def _try(self, action) -> None:
        """Run a write; on failure stop writing for good, with one warning (the run goes on with the live teacher)."""
        if not self.writable:
            return
        try:
            action()
        except OSError as error:
            self.writable = False
            self._pending.clear()
            logger.warning(
                "teacher cache %s cannot be written (%s): continuing with the live teacher; nothing more is stored",
                self.folder,
                error.strerror or error,
            )

    def _probe(self) -> None:
        probe = self.folder / f".probe-{self.writer}"
        probe.write_bytes(b"ok")
        probe.unlink()

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.folder.glob("chunk-*.safetensors"))

    def put(self, keys: Sequence[str], logits: torch.Tensor) -> None:
        """Store the teacher's logits [n, C] of ``keys`` (written in chunks of ``flush_every`` rows)."""
        if not self.writable:
            return
        for key, row in zip(keys, logits.detach().float().cpu()):
            if key not in self._index:
                self._pending[key] = row
        if len(self._pending) >= self.flush_every:
            self.flush()

    def as_stored(self, logits: torch.Tensor) -> torch.Tensor:
        """What a later read of these logits returns (fp16 rounding, top-k reconstruction; full fp32: the same
        values). A run trains on this even when it computes the logits itself, so a cold run, a warm run and a run
        resumed half-way through filling the cache see the same soft labels."""
        rows = logits.detach().float().cpu()
        if self.storage == "full" and self.dtype == "fp32":
            return rows
        encoded = self._encode(rows)
        return torch.stack([self._decode(encoded, r) for r in range(len(rows))]) if len(rows) else rows

    def _encode(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        dtype = torch.float16 if self.dtype == "fp16" else torch.float32
        if self.storage == "full":
            return {"values": rows.to(dtype)}
        values, indices = rows.topk(self.topk, dim=-1)
        return {"values": values.to(dtype), "indices": indices.to(torch.int32), "lse": rows.logsumexp(-1)}

    def flush(self) -> None:
        """Write the pending rows as one chunk file (atomically)."""
        if not self._pending or not self.writable:
            return
        keys = list(self._pending)
        tensors = self._encode(torch.stack([self._pending[k] for k in keys]))
        if self.max_bytes and self.size_bytes() + sum(t.numel() * t.element_size() for t in tensors.values()) > (
            self.max_bytes
        ):
            self.writable = False
            self._pending.clear()
            logger.warning(
                "teacher cache %s reached its size limit (%.2f GB): continuing with the live teacher; nothing more "
                "is stored",
                self.folder,
                self.max_bytes / 1e9,
            )
            return

        def write() -> None:
            from safetensors.torch import save_file

            from promptkd.checkpoints import atomic_path

            name = f"chunk-{self.writer}-{self._chunks_written:06d}.safetensors"
            metadata = {"keys": json.dumps(keys), "sha256": _tensor_digest(tensors)}
            with atomic_path(self.folder / name) as tmp:
                save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
            self._chunks_written += 1
            for row, key in enumerate(keys):
                self._index[key] = (name, row)
            self._remember(name, tensors)
            self.stats["written"] += len(keys)

        self._try(write)
        self._pending.clear()

    # --- reading -----------------------------------------------------------------------------------------------------
    def _scan(self) -> None:
        """Index every complete chunk by its keys (headers only; tensors are read and verified on first use)."""
        from safetensors import safe_open

        for path in sorted(self.folder.glob("chunk-*.safetensors")):
            try:
                with safe_open(str(path), "pt") as handle:
                    keys = json.loads((handle.metadata() or {})["keys"])
            except Exception as error:  # a damaged header: never served
                self.stats["bad_chunks"] += 1
                logger.warning("teacher cache: ignoring unreadable chunk %s (%s)", path.name, error)
                continue
            for row, key in enumerate(keys):
                self._index.setdefault(key, (path.name, row))

    def _remember(self, name: str, tensors: dict[str, torch.Tensor] | None) -> None:
        self._loaded[name] = tensors
        self._loaded_bytes += sum(t.numel() * t.element_size() for t in (tensors or {}).values())
        while self._loaded_bytes > self.memory and len(self._loaded) > 1:
            _, old = self._loaded.popitem(last=False)
            self._loaded_bytes -= sum(t.numel() * t.element_size() for t in (old or {}).values())

    def _chunk(self, name: str) -> dict[str, torch.Tensor] | None:
        if name in self._loaded:
            self._loaded.move_to_end(name)
            return self._loaded[name]
        from safetensors import safe_open

        tensors: dict[str, torch.Tensor] | None
        try:
            with safe_open(str(self.folder / name), "pt") as handle:
                expected = (handle.metadata() or {}).get("sha256")
                tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118 (a safetensors handle)
            if expected != _tensor_digest(tensors):
                raise ValueError("its tensors do not match their SHA-256")
        except Exception as error:
            self.stats["bad_chunks"] += 1
            logger.warning("teacher cache: ignoring damaged chunk %s (%s); its views are recomputed", name, error)
            tensors = None
        self._remember(name, tensors)
        return tensors

    def _decode(self, tensors: dict[str, torch.Tensor], row: int) -> torch.Tensor:
        values = tensors["values"][row].float()
        if self.storage == "full":
            return values
        num_classes = int(self.identity["num_classes"])
        lse = tensors["lse"][row].float()
        rest = (1.0 - (values - lse).exp().sum()).clamp(min=1e-12) / (num_classes - self.topk)
        out = torch.full((num_classes,), float(lse + rest.log()))
        out[tensors["indices"][row].long()] = values
        return out

    def get(self, keys: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(found [n] bool, logits [n, C] float32 with the found rows filled) for ``keys``."""
        n, num_classes = len(keys), int(self.identity["num_classes"])
        found = torch.zeros(n, dtype=torch.bool)
        out = torch.zeros(n, num_classes)
        for i, key in enumerate(keys):
            where = self._index.get(key)
            if where is None:
                pending = self._pending.get(key)
                if pending is not None:
                    out[i], found[i] = self._decode(self._encode(pending[None]), 0), True
                continue
            tensors = self._chunk(where[0])
            if tensors is None:
                continue
            out[i], found[i] = self._decode(tensors, where[1]), True
        hits = int(found.sum())
        self.stats["hits"] += hits
        self.stats["misses"] += n - hits
        return found, out

    def summary(self) -> dict[str, Any]:
        return {
            "folder": str(self.folder),
            "storage": self.identity["storage"],
            "entries": len(self._index),
            "writable": self.writable,
            **self.stats,
        }
