"""Worker for the two-process (gloo) test-time tuning test; importable by spawned processes."""

from __future__ import annotations

import os

import torch


def tta_config(dataset: str, out: str, method: str = "tpt", mode: str | None = None):
    from promptkd.tta.run import resolve_tta_config

    base = {
        "method": method,
        "mode": mode,
        "datasets": [dataset],
        "model": "pkd-tiny",
        "pretrained": "random",
        "batch_size": 2,
        "progress": False,
    }
    sets = ["method.n_views=6"] if method == "tpt" else []
    return resolve_tta_config(None, sets, {**base, "device": "cpu", "out": out})


def tta_ddp_worker(
    rank: int, world_size: int, port: int, dataset: str, out: str, method: str = "tpt", mode: str | None = None
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size), RANK=str(rank), LOCAL_RANK=str(rank)
    )
    import torch.distributed as dist

    from promptkd.tta.run import run_tta

    torch.set_num_threads(1)
    torch.manual_seed(0)  # the random-weight tiny model must be the same on every rank
    try:
        run_tta(tta_config(dataset, out, method, mode))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def assert_same_predictions(first: list[list[str]], second: list[list[str]]) -> None:
    """Predicted labels must match exactly; printed confidences only to their last digit.

    A different batch composition (shuffled order, another rank) changes the float summation
    order inside the encoders, so a confidence may land on the other side of a rounding edge.
    """
    assert len(first) == len(second)
    header_a, header_b = first[0], second[0]
    assert header_a == header_b
    numeric = {header_a.index("probability")}
    for row_a, row_b in zip(first[1:], second[1:], strict=True):
        for i, (cell_a, cell_b) in enumerate(zip(row_a, row_b, strict=True)):
            if i in numeric:
                assert abs(float(cell_a) - float(cell_b)) <= 2e-4, (row_a, row_b)
            else:
                assert cell_a == cell_b, (row_a, row_b)
