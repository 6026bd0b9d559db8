"""torch.distributed set-up for `torchrun` (nccl on GPU, gloo on CPU) and the few collectives the engine needs."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


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


def gather_lists(items: list, info: DistInfo) -> list:
    """Every process's list, joined in rank order (e.g. the samples each one skipped, for the run's record)."""
    if not info.enabled:
        return list(items)
    parts: list = [None] * info.world_size
    dist.all_gather_object(parts, list(items))
    return [item for part in parts for item in part]


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


class _SumOverProcesses(torch.autograd.Function):
    """all_reduce(SUM) with a gradient: every process's loss depends on every process's part of the sum, so the
    gradient of each part is the sum of the gradients over processes (all_reduce again)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        total = tensor.detach().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        total = grad.contiguous().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the global batch (every process's rows), on any backend.

    torch's SyncBatchNorm does the same on CUDA only; this one runs two small all_reduces (sum with the row count,
    then the centred sum of squares) on gloo and nccl alike, so 2 processes normalise exactly the rows 1 process
    would. Outside training, or in a single process, it is plain BatchNorm. Its state dict is BatchNorm's.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an input of at least 2 dimensions (batch, channels), got {input.dim()}")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and _distributed()):
            return super().forward(input)
        self._check_input_dim(input)
        x = input.float()
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        first = _SumOverProcesses.apply(torch.cat([x.sum(dims), x.new_tensor([x.numel() // x.shape[1]])]))
        count = first[-1].detach()
        if float(count) < 2:
            raise ValueError("BatchNorm needs more than 1 value per channel over all processes in training")
        mean = first[:-1] / count
        centred = x - mean.view(shape)
        var = _SumOverProcesses.apply((centred * centred).sum(dims)) / count
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            self._update_running(mean.detach(), var.detach() * count / (count - 1))
        return out.to(input.dtype)

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
        """As BatchNorm: an exponential average with ``momentum`` (a cumulative one when momentum is None)."""
        self.num_batches_tracked.add_(1)  # type: ignore[union-attr]
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.mul_(1 - factor).add_(factor * mean.to(self.running_mean.dtype))  # type: ignore[union-attr]
        self.running_var.mul_(1 - factor).add_(factor * unbiased_var.to(self.running_var.dtype))  # type: ignore[union-attr]


def use_global_batchnorm(model: nn.Module, learner: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """Put :class:`GlobalBatchNorm` in place of every BatchNorm that trains (those of ``learner``, and any whose
    weights require gradients), keeping its parameters and buffers (the optimiser's tensors stay the same).
    Returns what :func:`restore_batchnorm` needs to put the originals back."""
    inside = {id(m) for m in learner.modules()}
    swapped = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            trains = id(child) in inside or any(p.requires_grad for p in child.parameters(recurse=False))
            if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, GlobalBatchNorm) and trains:
                replacement = GlobalBatchNorm(
                    child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats
                )
                replacement._parameters = child._parameters  # the same tensors: the optimiser keeps its state
                replacement._buffers = child._buffers
                replacement.train(child.training)
                setattr(parent, name, replacement)
                swapped.append((parent, name, child))
    return swapped


def restore_batchnorm(swapped: list[tuple[nn.Module, str, nn.Module]]) -> None:
    """Put the original BatchNorm modules back (after training: inference and export see plain BatchNorm)."""
    for parent, name, original in reversed(swapped):
        original.train(getattr(parent, name).training)
        setattr(parent, name, original)
