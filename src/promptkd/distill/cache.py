"""The teacher's outputs computed once: stored views and cached soft labels (after FKD, Shen & Xing, ECCV 2022).

PromptKD's teacher is frozen, yet a plain distillation run evaluates its image tower on every augmented view of
every epoch, seed and sweep (60% of a step on the world pair, 64% with ViT-L/14). FKD's remedy: fix a set of views
per image and store the teacher's logits for each, then train any number of students from the store.

- :class:`ViewRecipe`: ``views`` crops per image (RandomResizedCrop + flip, at the student's input), each a pure
  function of (recipe seed, image key, view number). A run visits them as view ``(epoch + o) % views`` with
  ``o`` drawn from (run seed, image key): every image cycles through its views, and other seeds, learning rates,
  temperatures, prompt depths or projectors draw from the same stored views.
- :class:`TeacherCache`: a folder of teacher logits keyed by ``<image key>#<view>`` **and the fingerprint of the
  image's content** (BLAKE2b of its encoded bytes, taken from the one read that decodes it), bound to one teacher
  (its identity by content: :func:`~promptkd.distill.teacher.teacher_identity`), one set of stored class features
  (their hash), the class list its logits cover and one recipe (``cache.json``); another is refused with what
  differs. Another image under a stored name (a folder with the same file names, an edited file) is a miss: its
  views are recomputed, stored beside the old rows (nothing stored is lost) and counted. Entries are full logits
  (fp32 or fp16) or FKD's top-k form (values, indices and the log-sum-exp, from which the other classes share the
  remaining probability mass). Each write is one chunk file, renamed into place when complete and carrying a
  SHA-256 of its tensors, checked before any of its rows is served: a run killed mid-write, or a damaged file,
  costs a recomputation, never a wrong soft label.
  A damaged chunk is set aside (renamed ``damaged-*``) and its rows are stored again when recomputed, so a fill
  repairs the cache. A cache that cannot be written (read-only, disk full, over its size limit) stops storing
  with one warning and the run goes on with the live teacher.
"""

from __future__ import annotations

import contextlib
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
from safetensors import SafetensorError
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from promptkd.data.transforms import interpolation_mode, seeded_cpu_rng
from promptkd.errors import PromptKDError

__all__ = [
    "CACHE_FORMAT",
    "ENCODED_INFO",
    "TeacherCache",
    "TeacherCacheError",
    "ViewRecipe",
    "content_fingerprint",
    "features_sha256",
    "image_fingerprint",
    "split_name",
    "view_name",
]

logger = logging.getLogger(__name__)

CACHE_FORMAT = "promptkd-teacher-cache"
CACHE_VERSION = 2  # 2: every entry bound to its image's content fingerprint
#: where :func:`promptkd.data.shards.decode_image` leaves a member's encoded bytes on the decoded image
ENCODED_INFO = "promptkd.encoded"
_SEP = "\x1f"  # between a view entry's name and its content fingerprint (never in a file or member name)
#: Full logits are stored up to this many classes by default; beyond it, FKD's top-k form keeps the cache small.
FULL_MAX_CLASSES = 4096


class TeacherCacheError(PromptKDError, ValueError):
    """A cache folder made for another teacher, other features, other classes or another view recipe."""


def _digest(*parts: object) -> int:
    text = "\x1f".join(str(p) for p in parts)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") & 0x7FFF_FFFF_FFFF_FFFF


def content_fingerprint(data: bytes) -> str:
    """128-bit BLAKE2b of an image's encoded bytes (~1 GB/s): binds a cache entry to the image it was computed on."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def image_fingerprint(image: Image.Image) -> str:
    """The content fingerprint of a decoded image: of the encoded bytes its decoder left in ``info`` (shard
    members), else of its pixels (slower, but never wrong)."""
    data = image.info.get(ENCODED_INFO)
    if isinstance(data, (bytes, bytearray)):
        return content_fingerprint(bytes(data))
    return "px-" + content_fingerprint(f"{image.mode}{image.size}".encode() + image.tobytes())


def view_name(key: str, view: int, content: str) -> str:
    """The cache entry of view ``view`` of image ``key`` whose content fingerprint is ``content``."""
    return f"{key}#{view}{_SEP}{content}"


def split_name(name: str) -> tuple[str, str]:
    """(``<key>#<view>``, content fingerprint) of an entry name ("" when the name carries none)."""
    entry, sep, content = name.rpartition(_SEP)
    return (entry, content) if sep else (name, "")


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
            return self.crop(image, key, view), view_name(key, view, image_fingerprint(image))

        return prepare


class StoredViews(torch.utils.data.Dataset):
    """Images of a sized source seen through a recipe's stored views: ``[i]`` → (view, -1, entry name).

    ``load(item) -> (image, content fingerprint)`` reads each file once (see
    :func:`promptkd.distill.data.read_image`). The engine sets the epoch (``set_epoch``) before each pass, so the
    view of an image follows the run's cycle.
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
        image, content = self.load(self.items[index])
        return self.recipe.crop(image, key, view), -1, view_name(key, view, content)


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


class _DamagedChunk(Exception):
    """A chunk whose header or tensors do not hold what it says (its rows are recomputed, never served)."""


#: what reading a chunk raises when the file is damaged (torn, truncated, flipped bits, unreadable); anything else
#: is a programming error and propagates
_DAMAGED = (_DamagedChunk, SafetensorError, OSError, json.JSONDecodeError, UnicodeDecodeError)

Location = tuple[str, int]
Entry = tuple[str, str]  # (<image key>#<view>, fingerprint of the image's content)


def _what_differs(key: str, stored: Any, ours: Any) -> str:
    """``key.field: stored vs ours`` for the fields of a record entry that differ (hashes abridged)."""

    def short(value: Any) -> str:
        text = json.dumps(value, default=str) if not isinstance(value, str) else value
        return text[:12] + "..." if len(text) > 40 else text

    if isinstance(stored, dict) and isinstance(ours, dict):
        fields = sorted(k for k in {*stored, *ours} if stored.get(k) != ours.get(k))
        return ", ".join(f"{key}.{k}: {short(stored.get(k))} vs {short(ours.get(k))}" for k in fields)
    return f"{key}: {short(stored)} vs {short(ours)}"


class TeacherCache:
    """Teacher logits per view entry in ``folder``, each bound to its image's content (see the module docstring).

    Entries are named ``view_name(key, view, content)``: a lookup finds a row only when the image's content
    fingerprint matches the one stored with it, so another image under the same name is a miss (recomputed, stored
    beside the old row and counted as ``content_changed``).

    Args:
        folder: the cache folder (created if missing).
        identity: what the logits depend on: ``teacher`` (:func:`~promptkd.distill.teacher.teacher_identity`),
            ``features_sha256`` (of the rows used), ``classnames_sha256`` and ``num_classes`` (the classes the
            logits cover), ``logit_scale`` and ``recipe`` (``ViewRecipe.describe()``).
        storage: ``full`` logits or ``topk`` (values, indices, log-sum-exp); ``topk`` is the ``k`` of it.
        dtype: ``fp32`` or ``fp16`` values (top-k indices are int32, the log-sum-exp fp32).
        max_gb: stop writing beyond this size (0: no limit).
        writer: a name for this process's chunk files (ranks write their own).
        must_write: a cache that cannot store (unwritable, full, over ``max_gb``) is a TeacherCacheError rather
            than a warning (``promptkd teacher-cache``, whose only product is what it stores).
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
        must_write: bool = False,
    ) -> None:
        self.folder = Path(folder).expanduser()
        self.must_write = must_write
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
        self.unwritable_reason = ""
        self._pending: dict[Entry, torch.Tensor] = {}
        self._chunks_written = 0
        self._index: dict[Entry, Location] = {}
        self._spare: dict[Entry, list[Location]] = {}  # further copies of an entry (a repaired row), in file order
        self._content: dict[str, str] = {}  # view entry -> the content fingerprint last indexed for it
        self._changed: set[Entry] = set()
        self._loaded: OrderedDict[str, dict[str, torch.Tensor] | None] = OrderedDict()
        self._loaded_bytes = 0
        self.stats = {"hits": 0, "misses": 0, "written": 0, "bad_chunks": 0, "content_changed": 0}
        self._open()

    # --- identity ----------------------------------------------------------------------------------------------------
    def _open(self) -> None:
        record = self.folder / "cache.json"
        if record.is_file():
            self._check(self._read_record(record))
        else:
            self._try(lambda: self._create(record))
        self._scan()
        if self.writable:
            self._try(self._probe)

    def _read_record(self, record: Path) -> dict[str, Any]:
        try:
            return json.loads(record.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise TeacherCacheError(f"{record}: unreadable cache record ({error}); delete the folder") from None

    def _create(self, record: Path) -> None:
        """Write ``cache.json`` unless another process (a rank of the same run) did first: the record appears
        whole or not at all (a hard link of a complete file), and whoever loses the race checks the winner's."""
        self.folder.mkdir(parents=True, exist_ok=True)
        # list first, then look for the record: a record another process links meanwhile (with chunks after it) is
        # then seen, so only files that no cache put there make the folder foreign
        foreign = [p for p in self.folder.iterdir() if not p.name.startswith(".") and p.name != record.name]
        if foreign and not record.is_file():
            raise TeacherCacheError(f"{self.folder} is not empty and holds no teacher cache; use an empty folder")
        tmp = self.folder / f".cache.json.{self.writer}.tmp"
        try:
            tmp.write_text(json.dumps(self.identity, indent=2, default=str) + "\n", encoding="utf-8")
            try:
                os.link(tmp, record)  # fails if the record exists: never overwrites another process's
            except FileExistsError:
                pass
            except OSError:  # a file system without hard links
                if not record.is_file():
                    os.replace(tmp, record)
        finally:
            tmp.unlink(missing_ok=True)
        self._check(self._read_record(record))

    def _check(self, found: dict[str, Any]) -> None:
        from promptkd.distill.teacher import teacher_differences

        if found.get("format") != CACHE_FORMAT:
            raise TeacherCacheError(f"{self.folder} is not a teacher cache (no {CACHE_FORMAT} record)")
        if found.get("version") != CACHE_VERSION:
            raise TeacherCacheError(
                f"{self.folder} was made by another promptkd (cache version {found.get('version')}, this one reads "
                f"{CACHE_VERSION}: entries bound to each image's content); use another --teacher-cache folder"
            )
        reasons = {
            "features_sha256": "other stored class features",
            "classnames_sha256": "another class list (the classes its logits cover)",
            "num_classes": "another number of classes",
            "logit_scale": "another logit scale",
            "recipe": "another view recipe (size, crop range, flip, views per image or seed)",
            "storage": "another storage form (full or top-k, dtype)",
        }
        ours = json.loads(json.dumps(self.identity, default=str))
        differ = [
            f"{reasons[k]} ({_what_differs(k, found.get(k), ours.get(k))})"
            for k in reasons
            if found.get(k) != ours.get(k)
        ]
        teacher = teacher_differences(found.get("teacher"), ours.get("teacher"))
        if teacher:
            differ.insert(0, f"another teacher ({'; '.join(teacher)}; stored vs this run)")
        if differ:
            raise TeacherCacheError(
                f"{self.folder} caches the logits of {'; '.join(differ)}, not of this run's; use another "
                "--teacher-cache folder (or delete this one to start over)"
            )

    # --- writing -----------------------------------------------------------------------------------------------------
    def _try(self, action) -> None:
        """Run a write; on failure stop writing for good, with one warning (the run goes on with the live teacher)."""
        if not self.writable:
            return
        try:
            action()
        except OSError as error:
            self._stop(f"cannot be written ({error.strerror or error})")

    def _stop(self, reason: str) -> None:
        if self.must_write:
            raise TeacherCacheError(
                f"teacher cache {self.folder} {reason}: {self.stats['written']} views stored, the rest cannot be; "
                "give a writable --teacher-cache folder with room (or a larger --teacher-cache-max-gb)"
            )
        self.writable = False
        self.unwritable_reason = reason
        self._pending.clear()
        logger.warning(
            "teacher cache %s %s: continuing with the live teacher; nothing more is stored", self.folder, reason
        )

    def _probe(self) -> None:
        probe = self.folder / f".probe-{self.writer}"
        probe.write_bytes(b"ok")
        probe.unlink()

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.folder.glob("chunk-*.safetensors"))

    def contains(self, name: str) -> bool:
        """True when the view entry ``name`` (with its content fingerprint) is stored or waiting to be (no count)."""
        entry = split_name(name)
        if entry in self._index or entry in self._pending:
            return True
        self._note_changed(entry)
        return False

    def _note_changed(self, entry: Entry) -> None:
        """Count an entry missing because its name is stored for other image content (once per entry)."""
        if self._content.get(entry[0], entry[1]) != entry[1] and entry not in self._changed:
            self._changed.add(entry)
            self.stats["content_changed"] += 1

    def put(self, names: Sequence[str], logits: torch.Tensor) -> None:
        """Store the teacher's logits [n, C] of the view entries ``names`` (written in chunks of ``flush_every``)."""
        if not self.writable:
            return
        for name, row in zip(names, logits.detach().float().cpu()):
            entry = split_name(name)
            if entry not in self._index:
                self._pending[entry] = row
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
        entries = list(self._pending)
        tensors = self._encode(torch.stack([self._pending[e] for e in entries]))
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if self.max_bytes and self.size_bytes() + size > self.max_bytes:
            self._stop(f"reached its size limit ({self.max_bytes / 1e9:.2f} GB)")
            return

        def write() -> None:
            from safetensors.torch import save_file

            from promptkd.checkpoints import atomic_path

            name = f"chunk-{self.writer}-{self._chunks_written:06d}.safetensors"
            metadata = {
                "keys": json.dumps([e[0] for e in entries]),
                "content": json.dumps([e[1] for e in entries]),
                "sha256": _tensor_digest(tensors),
            }
            with atomic_path(self.folder / name) as tmp:
                save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
            self._chunks_written += 1
            for row, entry in enumerate(entries):
                self._index[entry] = (name, row)
                self._content[entry[0]] = entry[1]
            self._remember(name, tensors)
            self.stats["written"] += len(entries)

        self._try(write)
        self._pending.clear()

    # --- reading -----------------------------------------------------------------------------------------------------
    def _scan(self) -> None:
        """Index every complete chunk by its entries (headers only; tensors are read and verified on first use)."""
        from safetensors import safe_open

        for path in sorted(self.folder.glob("chunk-*.safetensors")):
            try:
                with safe_open(str(path), "pt") as handle:
                    meta = handle.metadata() or {}
                if "keys" not in meta or "content" not in meta:
                    raise _DamagedChunk("no entry names or content fingerprints in its header")
                keys, content = json.loads(meta["keys"]), json.loads(meta["content"])
                if not isinstance(keys, list) or not isinstance(content, list) or len(keys) != len(content):
                    raise _DamagedChunk("its entries and their content fingerprints do not pair up")
            except _DAMAGED as error:  # a damaged header: never served
                self._set_aside(path.name, f"unreadable header: {error}")
                continue
            for row, entry in enumerate(zip(keys, content)):
                if entry in self._index:
                    self._spare.setdefault(entry, []).append((path.name, row))
                else:
                    self._index[entry] = (path.name, row)
                self._content[entry[0]] = entry[1]

    def _set_aside(self, name: str, why: str) -> None:
        """A damaged chunk: counted, its entries forgotten (so their recomputed rows are stored again, which
        repairs the cache) and, where the folder is writable, renamed ``damaged-*`` so it is not read again."""
        self.stats["bad_chunks"] += 1
        logger.warning("teacher cache: ignoring damaged chunk %s (%s); its views are recomputed", name, why)
        for entry in [e for e, where in self._index.items() if where[0] == name]:
            spares = [s for s in self._spare.pop(entry, []) if s[0] != name]
            if spares:
                self._index[entry] = spares.pop(0)
                if spares:
                    self._spare[entry] = spares
            else:
                del self._index[entry]
        if self.writable:
            with contextlib.suppress(OSError):
                os.replace(self.folder / name, self.folder / f"damaged-{name}")

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

        try:
            with safe_open(str(self.folder / name), "pt") as handle:
                expected = (handle.metadata() or {}).get("sha256")
                tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118 (a safetensors handle)
            if expected != _tensor_digest(tensors):
                raise _DamagedChunk("its tensors do not match their SHA-256")
        except _DAMAGED as error:
            self._set_aside(name, str(error))
            return None
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

    def _lookup(self, entry: Entry) -> torch.Tensor | None:
        """The stored row of ``entry``, or None (not stored, or only in a damaged chunk)."""
        while (where := self._index.get(entry)) is not None:
            tensors = self._chunk(where[0])
            if tensors is not None:
                return self._decode(tensors, where[1])
        pending = self._pending.get(entry)
        return self._decode(self._encode(pending[None]), 0) if pending is not None else None

    def get(self, names: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(found [n] bool, logits [n, C] float32 with the found rows filled) for the view entries ``names``.

        An entry stored for other image content (same name, another fingerprint) is a miss, counted once in
        ``content_changed``."""
        n, num_classes = len(names), int(self.identity["num_classes"])
        found = torch.zeros(n, dtype=torch.bool)
        out = torch.zeros(n, num_classes)
        for i, name in enumerate(names):
            entry = split_name(name)
            row = self._lookup(entry)
            if row is not None:
                out[i], found[i] = row, True
            else:
                self._note_changed(entry)
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

    def report(self) -> str | None:
        """One line on what was recomputed because the cache held something else (None when nothing was)."""
        parts = []
        if self.stats["content_changed"]:
            parts.append(f"{self.stats['content_changed']} entries recomputed: image content changed")
        if self.stats["bad_chunks"]:
            parts.append(f"{self.stats['bad_chunks']} damaged chunks set aside, their views recomputed")
        return f"teacher cache {self.folder}: " + "; ".join(parts) if parts else None
