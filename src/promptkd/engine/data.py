"""Deterministic data feeding: the order and the augmentation of every sample are functions of (seed, epoch, index).

That is what makes a resumed run equal an uninterrupted one (an epoch replays exactly), and 2 processes equal 1
(rank r of W takes every W-th index of the same permutation, so a global batch holds the same samples, each
augmented the same way whichever process loads it).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from promptkd.data.transforms import seeded_cpu_rng
from promptkd.methods.base import Batch


def sample_seed(seed: int, epoch: int, index: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


class SeededDataset(Dataset):
    """Wraps a dataset returning (image, label, ...) and seeds torch's RNG per sample before its transform runs."""

    def __init__(self, base: Dataset, seed: int):
        self.base = base
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int):
        with seeded_cpu_rng(sample_seed(self.seed, self.epoch, index)):
            item = self.base[index]
        image, label = item[0], item[1]
        if len(item) > 2 and isinstance(item[2], str):  # a named sample (e.g. a stored view of the teacher cache)
            return image, label, index, item[2]
        if len(item) > 2 and isinstance(item[2], torch.Tensor):  # a captioned image: (image, label, caption tokens)
            return image, label, index, None, item[2]
        return image, label, index


class EpochSampler(Sampler[int]):
    """A seeded permutation per epoch, split across ranks by striding (rank r takes positions r, r+W, ...)."""

    def __init__(
        self,
        size: int,
        seed: int,
        *,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        drop_last_global: int = 0,
        batch_size: int = 0,
    ):
        self.size = size
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.skip = 0  # positions of this epoch's global order already trained on (a run resumed mid-epoch)
        self.global_batch = batch_size or drop_last_global or world_size
        # keep a multiple of the global batch so every rank runs the same number of steps
        self.usable = size - size % drop_last_global if drop_last_global and size >= drop_last_global else size
        if world_size > 1:
            self.usable -= self.usable % world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self) -> list[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, -1))
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = list(range(self.size))
        return order[: self.usable]

    def __iter__(self) -> Iterator[int]:
        return iter(self.order()[self.skip :][self.rank :: self.world_size])

    def __len__(self) -> int:
        return (self.usable - self.skip) // self.world_size


def collate(samples: Sequence[tuple]) -> Batch:
    images = torch.stack([s[0] for s in samples])
    labels = torch.tensor([int(s[1]) for s in samples], dtype=torch.long)
    index = torch.tensor([int(s[2]) for s in samples], dtype=torch.long)
    keys = [s[3] for s in samples] if len(samples[0]) > 3 and samples[0][3] is not None else None
    texts = torch.stack([s[4] for s in samples]) if len(samples[0]) > 4 else None
    return Batch(images, labels, index, keys, texts)


def make_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    seed: int,
    shuffle: bool,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    drop_last: bool = False,
) -> tuple[DataLoader, SeededDataset, EpochSampler]:
    """A loader whose per-rank batches are ``batch_size // world_size`` samples of the global batch."""
    if batch_size % world_size:
        raise ValueError(f"batch size {batch_size} is not divisible by the {world_size} processes")
    seeded = SeededDataset(dataset, seed)
    sampler = EpochSampler(
        len(seeded),
        seed,
        shuffle=shuffle,
        rank=rank,
        world_size=world_size,
        drop_last_global=batch_size if drop_last else 0,
        batch_size=batch_size,
    )
    loader = DataLoader(
        seeded,
        batch_size=batch_size // world_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        persistent_workers=False,
    )
    return loader, seeded, sampler


def set_epoch(seeded: SeededDataset, sampler: EpochSampler, epoch: int, skip_batches: int = 0) -> None:
    """Start ``epoch`` (after its first ``skip_batches`` global batches, for a run resumed mid-epoch); a dataset
    whose samples depend on the epoch (stored views) is told it too."""
    seeded.epoch = epoch
    if hasattr(seeded.base, "set_epoch"):
        seeded.base.set_epoch(epoch)
    sampler.set_epoch(epoch)
    sampler.skip = skip_batches * sampler.global_batch


BatchFactory = Callable[[], Iterator[Batch]]
