"""torch.distributed set-up for `torchrun` (nccl on GPU, gloo on CPU) and the few collectives the engine needs."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str) -> str:
    """``auto`` → cuda when a GPU is there, else cpu; a CUDA device this machine lacks is refused (one message)."""
    from promptkd.errors import PromptKDError

    name = str(name)
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise PromptKDError(
                f"--device {name}: this machine has no CUDA GPU (or torch was built without CUDA); use --device cpu, "
                "or --device auto to take a GPU when there is one."
            )
        index = name.split(":", 1)[1] if ":" in name else "0"
        if index.isdigit() and int(index) >= torch.cuda.device_count():
            raise PromptKDError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s).")
    return name


def init_distributed(device: str = "auto") -> tuple[DistInfo, torch.device]:
    """Join the process group torchrun describes in the environment; a plain run is rank 0 of 1."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if str(device) != "auto":
        resolve_device(str(device))  # refuses a GPU this machine lacks, before the process group is joined
    use_cuda = (torch.cuda.is_available() and device in ("auto", "cuda")) or str(device).startswith("cuda")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        target = torch.device("cuda", local_rank)
    else:
        target = torch.device("cpu" if device == "auto" else device)
    return DistInfo(rank, world_size, local_rank), target


def all_reduce_mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if not info.enabled:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / info.world_size


def gather_concat(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Concatenate a tensor of varying first dimension from every rank, in rank order."""
    if not info.enabled:
        return tensor
    size = torch.tensor([tensor.shape[0]], device=tensor.device)
    sizes = [torch.zeros_like(size) for _ in range(info.world_size)]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    padded[: tensor.shape[0]] = tensor
    chunks = [torch.zeros_like(padded) for _ in range(info.world_size)]
    dist.all_gather(chunks, padded)
    return torch.cat([chunk[: int(s.item())] for chunk, s in zip(chunks, sizes)])


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
