"""Streamed training data: any amount of images from tar shards, split across ranks and workers, resumable anywhere.

A :class:`StreamSource` turns the lanes of :class:`~promptkd.data.shards.ShardLanes` into training batches. The
stream is a fixed sequence of positions (position ``p`` is sample ``p // L`` of lane ``p % L``); what happens to a
sample is a function of its position and key only (its augmentation is seeded by (seed, position)), so:

- with ``W`` processes, rank ``r`` takes the positions ``p % W == r`` of each global batch (the engine's striding
  rule for sized datasets), reading only its own lanes; ``n`` data-loader workers split a rank's positions again
  (worker ``k`` takes the rank's ``k``-th, ``(n+k)``-th, ... position from the start, so it reads the lanes
  ``l ≡ first_k (mod n·W)``) and the loader's round-robin (worker 0 first) restores the rank's order from any start
  — so 2 processes give the same global batches as 1, and no sample is read twice;
- an epoch is ``epoch_samples`` positions; training resumed at step ``s`` of epoch ``e`` starts reading at position
  ``(e · steps + s) · B``, decoding nothing before it.

Samples that do not decode are a DataError naming shard and member, or, with ``skip_bad``, left out of their batch
(that step trains on the rest) and counted.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset

from promptkd.data.items import DataError
from promptkd.data.shards import ShardLanes, ShardSample, decode_image
from promptkd.data.transforms import seeded_cpu_rng
from promptkd.methods.base import Batch

__all__ = ["StreamSource", "stream_batches"]

logger = logging.getLogger(__name__)

#: ``prepare(image, key, position) -> (tensor, key)``: what a sample becomes (e.g. a seeded random crop, or one of
#: the stored views of the image for the teacher cache, whose key then names the view).
Prepare = Callable[[Any, str, int], tuple[torch.Tensor, str]]
#: ``companion(sample, position) -> (label, caption tokens or None)``: what a sample's other members say (its
#: ``.cls`` label, its ``.txt`` caption); a DataError names the member (or, with ``skip_bad``, skips the sample).
Companion = Callable[[ShardSample, int], tuple[int, torch.Tensor | None]]


@dataclass
class StreamSource:
    """Tar shards as an endless, deterministic training stream (see the module docstring).

    Attributes:
        lanes: the shards dealt to lanes.
        transform: the training transform, run under a generator seeded by (seed, position); or ``prepare``.
        epoch_samples: samples per epoch (default: every image member of the shards once).
        skip_bad: leave undecodable members out (counted in ``skipped``) instead of stopping.
        companion: reads a sample's label and caption from its companion members (the lanes must read them).
    """

    lanes: ShardLanes
    transform: Callable[[Any], torch.Tensor] | None = None
    seed: int = 1
    epoch_samples: int = 0
    skip_bad: bool = False
    prepare: Prepare | None = None
    companion: Companion | None = None
    skipped: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.epoch_samples <= 0:
            self.epoch_samples = self.lanes.total
        if (self.transform is None) == (self.prepare is None):
            raise ValueError("give a StreamSource exactly one of transform or prepare")

    def __len__(self) -> int:
        return self.epoch_samples

    def summary(self) -> dict[str, Any]:
        """What the run streams; the image count only when it is known (counting opens every shard, and a run with
        ``epoch_samples`` never needs it)."""
        summary: dict[str, Any] = {
            "source": f"{len(self.lanes.shards)} tar shards, streamed",
            "lanes": self.lanes.lanes,
            "epoch_samples": self.epoch_samples,
        }
        if self.lanes.counted():
            summary["images"] = self.lanes.total
        return summary

    def prepare_sample(self, image: Any, key: str, position: int) -> tuple[torch.Tensor, str]:
        if self.prepare is not None:
            return self.prepare(image, key, position)
        from promptkd.engine.data import sample_seed

        with seeded_cpu_rng(sample_seed(self.seed, -3, position)):
            return self.transform(image), key  # type: ignore[misc]


class _Positions(IterableDataset):
    """The positions ``p >= start`` with ``p % slots == slot`` of one (rank, worker):
    (tensor | None, p, key, where, label, caption tokens | None)."""

    def __init__(self, source: StreamSource, start: int, rank: int, world_size: int) -> None:
        super().__init__()
        self.source, self.start, self.rank, self.world_size = source, start, rank, world_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor | None, int, str, str]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        lanes = self.source.lanes
        slots = self.world_size * workers
        if lanes.lanes % slots:
            raise DataError(
                f"{lanes.lanes} lanes cannot be split evenly over {self.world_size} processes x {workers} "
                "data-loader workers",
                path=lanes.shards[0],
                fix=f"set the number of lanes (--lanes) to a multiple of {slots}, at most the number of shards",
            )
        # The loader takes one item from worker 0, then 1, ...: worker k starts at the rank's k-th position from
        # ``start`` on, whatever ``start`` is, so a resumed stream comes out in the uninterrupted order.
        first = self.start + (self.rank - self.start) % self.world_size + worker * self.world_size
        total = lanes.lanes
        streams = {
            lane: lanes.lane(lane, max(0, -(-(first - lane) // total))) for lane in range(first % slots, total, slots)
        }
        position = first
        while True:
            sample = next(streams[position % total])
            try:
                image = decode_image(sample.data, sample.where)
                label, text = (
                    self.source.companion(sample, position) if self.source.companion is not None else (-1, None)
                )
            except DataError:
                if not self.source.skip_bad:
                    raise
                yield None, position, sample.key, sample.where, -1, None
            else:
                tensor, key = self.source.prepare_sample(image, sample.key, position)
                yield tensor, position, key, sample.where, label, text
            position += slots


def stream_batches(
    source: StreamSource,
    *,
    batch_size: int,
    start: int = 0,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
) -> Iterator[Batch]:
    """This rank's share (``batch_size // world_size`` samples) of consecutive global batches from ``start`` on."""
    if batch_size % world_size:
        raise ValueError(f"batch size {batch_size} is not divisible by the {world_size} processes")
    per_rank = batch_size // world_size
    loader = DataLoader(
        _Positions(source, start, rank, world_size),
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=False,
    )
    items = iter(loader)
    while True:
        images, positions, keys, labels, texts = [], [], [], [], []
        for _ in range(per_rank):
            tensor, position, key, where, label, text = next(items)
            if tensor is None:
                source.skipped.append(where)
                logger.warning("skipping unreadable tar member %s", where)
                continue
            images.append(tensor)
            positions.append(int(position))
            keys.append(key)
            labels.append(int(label))
            texts.append(text)
        if not images:
            raise DataError(
                f"every sample of a batch is unreadable (the last: {where})",
                path=where.split(":")[0],
                fix="check the shards (are they image archives at all?) and remove the broken ones",
            )
        yield Batch(
            torch.stack(images),
            torch.tensor(labels, dtype=torch.long),
            torch.tensor(positions, dtype=torch.long),
            keys,
            torch.stack(texts) if texts[0] is not None else None,
        )
