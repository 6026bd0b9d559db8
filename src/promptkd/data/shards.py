"""WebDataset-style tar shards as deterministic, splittable, resumable streams of images.

A shard is a ``.tar`` (optionally ``.tar.gz``/``.tgz``) whose image members (``.jpg``/``.png``/...) are samples;
other members (``.cls``, ``.json``, ...) are ignored, and a member's key is ``<shard file name>/<member name>``.

**Lanes.** The shards are dealt to ``L`` lanes (lane ``l`` owns the shards ``s`` with ``s % L == l``). A lane is an
endless sequence: cycle ``c`` visits the lane's shards in an order seeded by (seed, lane, c), members in file order.
The stream of a run interleaves the lanes round-robin, so global position ``p`` is the ``p // L``-th sample of lane
``p % L``. That makes the stream a function of (shards, L, seed) alone:

- a process (or data-loader worker) that needs positions ``p`` with ``p % S == s`` for ``S`` dividing ``L`` reads
  only the lanes ``l % S == s``: ranks and workers never open each other's shards;
- any position can be reached without decoding what comes before (whole shards are skipped by their member
  count, members by their headers), so a run resumes at any step; a stream from the start counts nothing (a
  ``.tar.gz`` shard is decompressed only as it is read);
- with equal-sized shards and ``L`` dividing their number, ``N`` = all samples is exactly one cycle of every lane:
  an epoch of ``N`` samples sees each sample once.

Unreadable members yield ``None`` instead of an image (the caller counts or refuses them), so positions stay fixed;
a truncated shard raises a :class:`~promptkd.data.items.DataError` naming the shard and the member it broke at.
"""

from __future__ import annotations

import glob
import hashlib
import io
import os
import re
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property

from PIL import Image

from promptkd.data.items import DataError, is_image_file

__all__ = ["ShardLanes", "ShardSample", "decode_image", "expand_shards", "sample_stem"]

_BRACES = re.compile(r"\{(\d+)\.\.(\d+)\}")
_EXPECTED = "WebDataset-style .tar shards (e.g. shards/train-{000000..000009}.tar)"


def expand_shards(patterns: str | Sequence[str]) -> list[str]:
    """Shard paths from WebDataset brace ranges (``shard-{000..009}.tar``), globs, or plain paths; ``::`` or a
    sequence joins several patterns. A pattern that matches nothing, or a missing shard, is a DataError."""
    if isinstance(patterns, str):
        patterns = [p for p in patterns.split("::") if p]
    out: list[str] = []
    for pattern in patterns:
        expanded = [pattern]
        while any(_BRACES.search(p) for p in expanded):
            nxt = []
            for p in expanded:
                m = _BRACES.search(p)
                if m is None:
                    nxt.append(p)
                    continue
                lo, hi, width = int(m.group(1)), int(m.group(2)), len(m.group(1))
                nxt += [p[: m.start()] + str(i).zfill(width) + p[m.end() :] for i in range(lo, hi + 1)]
            expanded = nxt
        for p in expanded:
            matches = sorted(glob.glob(p)) if any(ch in p for ch in "*?[") else [p]
            missing = [m for m in matches if not os.path.isfile(m)]
            if not matches or missing:
                raise DataError(
                    "tar shard not found" if matches else "no tar shard matches the pattern",
                    path=missing[0] if missing else p,
                    expected=_EXPECTED,
                    fix="check the path and the brace range; quote the pattern so the shell leaves the braces alone",
                )
            out += matches
    if not out:
        raise DataError("no tar shards given", expected="at least one .tar shard")
    return out


def decode_image(data: bytes, where: str) -> Image.Image:
    """RGB image from encoded bytes; a DataError naming ``where`` (shard and member) when they do not decode.
    The bytes stay on the image (``info["promptkd.encoded"]``, a reference): the teacher cache fingerprints them."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            image = im.convert("RGB")
            image.info["promptkd.encoded"] = data
            return image
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise DataError(f"cannot decode image member ({type(error).__name__}: {error})", path=where) from error


@dataclass(frozen=True)
class ShardSample:
    """One image member: its stable key, its encoded bytes, where it came from (for messages) and, when the lanes
    read companions, the other members of its WebDataset sample by extension (``{"txt": b"a caption", ...}``)."""

    key: str
    data: bytes
    where: str
    extras: dict[str, bytes] = field(default_factory=dict)


def sample_stem(name: str) -> str:
    """WebDataset's sample key of a member: its path up to the first dot of its file name (``a/b.x.png``: ``a/b``)."""
    folder, _, base = name.rpartition("/")
    stem = base.split(".", 1)[0]
    return f"{folder}/{stem}" if folder else stem


def _seeded_order(items: Sequence[int], *parts: object) -> list[int]:
    """A permutation of ``items`` that depends only on ``parts`` (stable across processes and Python versions)."""

    def rank(item: int) -> bytes:
        return hashlib.blake2b(repr((*parts, item)).encode(), digest_size=8).digest()

    return sorted(items, key=rank)


def _truncated(shard: str, after: str | None, error: BaseException) -> DataError:
    return DataError(
        f"the tar shard is truncated or corrupt ({type(error).__name__}: {error}); it broke "
        + (f"after member {after!r}" if after else "before its first member"),
        path=shard,
        expected="a complete tar archive",
        fix="re-create or re-download the shard, or leave it out of the shard list",
    )


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    handle = tar.extractfile(member)
    data = handle.read() if handle is not None else b""
    if len(data) != member.size:
        raise tarfile.ReadError(f"member data ends after {len(data)} of {member.size} bytes")
    return data


def _with_extras(sample: ShardSample, extras: dict[str, bytes]) -> ShardSample:
    return ShardSample(sample.key, sample.data, sample.where, dict(extras))


class ShardLanes:
    """The lanes of a shard list (see the module docstring); ``lanes=0`` means one lane per shard."""

    def __init__(
        self,
        shards: str | Sequence[str],
        *,
        lanes: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        companions: Sequence[str] = (),
    ) -> None:
        self.shards = expand_shards(shards)
        self.companions = tuple(c.lower().lstrip(".") for c in companions)  # e.g. ("txt", "json", "cls")
        self.lanes = lanes or len(self.shards)
        if self.lanes < 1:
            raise ValueError(f"lanes must be positive, got {self.lanes}")
        if self.lanes > len(self.shards):
            raise DataError(
                f"{self.lanes} lanes but only {len(self.shards)} shards: every lane needs a shard",
                path=self.shards[0],
                fix=f"use at most {len(self.shards)} lanes, or split the data into more shards",
            )
        self.seed, self.shuffle = seed, shuffle
        self._counts: dict[int, int] = {}

    # --- sizes -------------------------------------------------------------------------------------------------------
    def lane_shards(self, lane: int) -> list[int]:
        return list(range(lane, len(self.shards), self.lanes))

    def count(self, shard: int) -> int:
        """Image members of a shard (read from the headers once, then remembered)."""
        if shard not in self._counts:
            self._counts[shard] = sum(1 for _ in self._members(shard, read=False))
        return self._counts[shard]

    @cached_property
    def total(self) -> int:
        """Image members over all shards (an epoch of this many samples visits each lane's shards once when the
        shards are equal in size).

        Counting reads every shard's headers (a ``.tar.gz`` is decompressed to do it). Under torchrun each process
        counts only the shards of its own lanes and one all_reduce adds the counts, so no shard is opened by two
        processes; every process must then ask for ``total`` (as :class:`~promptkd.engine.stream.StreamSource` does).
        """
        rank, world_size = _process_share()
        if world_size == 1 or self.lanes % world_size:
            return sum(self.count(s) for s in range(len(self.shards)))
        import torch
        import torch.distributed as dist

        own = sum(self.count(s) for lane in range(rank, self.lanes, world_size) for s in self.lane_shards(lane))
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
        counted = torch.tensor([own], dtype=torch.long, device=device)
        dist.all_reduce(counted)
        return int(counted.item())

    def counted(self) -> bool:
        """Whether :attr:`total` is known without reading any shard."""
        return "total" in self.__dict__

    def cycle(self, lane: int, c: int) -> list[int]:
        """The shard order of ``lane`` in its ``c``-th cycle."""
        own = self.lane_shards(lane)
        return _seeded_order(own, "cycle", self.seed, lane, c) if self.shuffle else own

    # --- reading -----------------------------------------------------------------------------------------------------
    def _members(self, shard: int, *, read: bool, skip: int = 0) -> Iterator[ShardSample]:
        """Image members of one shard in file order, after skipping ``skip`` of them (headers only)."""
        path = self.shards[shard]
        name = os.path.basename(path)
        last: str | None = None
        seen = 0
        try:
            with tarfile.open(path, "r:*") as tar:
                # An uncompressed archive is read by seeking over member data, which does not notice a file cut
                # short; its size is checked against each member instead (compressed data fails as it is read).
                plain_size = os.path.getsize(path) if isinstance(tar.fileobj, io.BufferedReader) else None
                pending: tuple[str, ShardSample] | None = None  # an image waiting for its following companions
                current, extras = "", {}  # the sample key the collected companions belong to
                while True:
                    member = tar.next()
                    if member is None:
                        if plain_size is not None and tar.offset >= plain_size:  # no end-of-archive blocks
                            raise tarfile.ReadError("the file ends without the tar end-of-archive marker")
                    elif plain_size is not None and member.offset_data + member.size > plain_size:
                        raise tarfile.ReadError(f"member {member.name!r} ends past the end of the file")
                    if pending is not None and (member is None or sample_stem(member.name) != pending[0]):
                        yield _with_extras(pending[1], extras)
                        pending, extras = None, {}
                    if member is None:
                        self._counts.setdefault(shard, seen)  # read to the end: its size is known for free
                        break
                    if not member.isfile():
                        continue
                    if not is_image_file(member.name):
                        extension = member.name.rsplit(".", 1)[-1].lower() if "." in member.name else ""
                        if read and extension in self.companions:
                            stem = sample_stem(member.name)
                            if stem != current:
                                current, extras = stem, {}
                            extras[extension] = _read_member(tar, member)
                        continue
                    last = member.name
                    seen += 1
                    if seen <= skip:
                        continue
                    if not read:
                        yield ShardSample(f"{name}/{member.name}", b"", f"{path}:{member.name}")
                        continue
                    sample = ShardSample(f"{name}/{member.name}", _read_member(tar, member), f"{path}:{member.name}")
                    if not self.companions:
                        yield sample
                        continue
                    stem = sample_stem(member.name)
                    if stem != current:
                        current, extras = stem, {}
                    pending = (stem, sample)  # its companions may follow it (WebDataset keeps a sample together)
        except (tarfile.TarError, EOFError, OSError, zlib.error) as error:
            raise _truncated(path, last, error) from None

    def members(self, shard: int) -> Iterator[ShardSample]:
        """The image members of shard number ``shard``, in file order."""
        return self._members(shard, read=True)

    def lane(self, lane: int, start: int = 0) -> Iterator[ShardSample]:
        """Lane ``lane`` from its ``start``-th sample on, endlessly (cycling).

        Shards are counted only to be skipped (a resume past them), so a stream from the start decompresses no
        ``.tar.gz`` shard just to size it; once a cycle's sizes are known, whole cycles are skipped at once.
        """
        own = self.lane_shards(lane)
        c, offset = 0, start
        while True:
            if offset and all(s in self._counts for s in own):
                per_cycle = sum(self._counts[s] for s in own)
                c, offset = (c + offset // per_cycle, offset % per_cycle) if per_cycle else (c, offset)
            found = 0
            for shard in self.cycle(lane, c):
                if offset:
                    n = self.count(shard)
                    found += n
                    if offset >= n:
                        offset -= n
                        continue
                for sample in self._members(shard, read=True, skip=offset):
                    found += 1
                    yield sample
                offset = 0
            if not found:
                raise DataError(
                    f"lane {lane} of {self.lanes} has shards but no image members",
                    path=self.shards[own[0]],
                    expected="image members (.jpg, .png, ...) in every shard",
                )
            c += 1


def _process_share() -> tuple[int, int]:
    """(rank, processes) of a torch.distributed run in progress, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
