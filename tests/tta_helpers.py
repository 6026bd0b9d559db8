"""Worker for the two-process (gloo) test-time tuning test; importable by spawned processes."""

from __future__ import annotations

import os

import torch


def tta_config(dataset: str, out: str):
    from promptkd.tta.run import resolve_tta_config

    base = {
        "method": "tpt",
        "datasets": [dataset],
        "model": "pkd-tiny",
        "pretrained": "random",
        "batch_size": 2,
        "progress": False,
    }
    return resolve_tta_config(None, ["method.n_views=6"], {**base, "device": "cpu", "out": out})


def tta_ddp_worker(rank: int, world_size: int, port: int, dataset: str, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size), RANK=str(rank), LOCAL_RANK=str(rank)
    )
    import torch.distributed as dist

    from promptkd.tta.run import run_tta

    torch.set_num_threads(1)
    torch.manual_seed(0)  # the random-weight tiny model must be the same on every rank
    try:
        run_tta(tta_config(dataset, out))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
