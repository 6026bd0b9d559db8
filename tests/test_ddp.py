"""DDP on CPU (gloo): BatchNorm over the global batch, and `torchrun --nproc_per_node 2 ... distill --preset world`
against 1 process for every unlabelled source (a dataset's split, a folder, tar shards).

2 processes are not bit-identical to 1: each process sums its own rows first and all_reduce adds the partial sums
(of BatchNorm statistics and of gradients) in another order than one process summing all rows, so results differ
in the last bits of float32 and AdamW carries that on. Measured on these runs (4 steps): weights within 1e-6 with
the BatchNorm projector and 2e-8 with the linear one, student logits within 1e-5; the tests hold weights to
WEIGHT_ATOL.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from promptkd.checkpoints import load_checkpoint

TESTS = Path(__file__).parent
CLASSES = ["red star", "blue ring", "green cross", "yellow moon"]
#: How far a weight of a 2-process run may be from the 1-process run's (float32 rounding, summed in another order).
WEIGHT_ATOL = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- GlobalBatchNorm ----------------------------------------------------------------------------------------------
def _batchnorm_worker(rank: int, world_size: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from promptkd.engine.distributed import GlobalBatchNorm, use_global_batchnorm

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        results = {}
        for name, shape in (("1d", (8, 5)), ("2d", (8, 3, 2, 2))):
            x, target = _bn_inputs(shape)
            model = nn.Sequential(nn.BatchNorm1d(shape[1]) if len(shape) == 2 else nn.BatchNorm2d(shape[1]))
            swapped = use_global_batchnorm(model, model)
            assert isinstance(model[0], GlobalBatchNorm) and len(swapped) == 1
            mine = x[rank::world_size].clone().requires_grad_(True)  # the engine's striding rule
            (model(mine) * target[rank::world_size]).sum().backward()
            for param in model.parameters():
                dist.all_reduce(param.grad)  # what DDP does (it averages; the loss here is a sum)
            results[name] = {
                "grad_x": mine.grad,
                "weight_grad": model[0].weight.grad,
                "bias_grad": model[0].bias.grad,
                "running": torch.stack([model[0].running_mean, model[0].running_var]),
            }
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _bn_inputs(shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(len(shape))
    return torch.randn(shape, generator=gen) * 3 + 1, torch.randn(shape, generator=gen)


@pytest.mark.slow
def test_global_batchnorm_on_two_gloo_processes_equals_batchnorm_of_the_whole_batch(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_batchnorm_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for name, shape in (("1d", (8, 5)), ("2d", (8, 3, 2, 2))):
        x, target = _bn_inputs(shape)
        bn = nn.BatchNorm1d(shape[1]) if len(shape) == 2 else nn.BatchNorm2d(shape[1])
        x = x.requires_grad_(True)
        (bn(x) * target).sum().backward()
        for r in range(2):
            got = ranks[r][name]
            assert torch.allclose(got["grad_x"], x.grad[r::2], atol=1e-5), (name, r)
            assert torch.allclose(got["weight_grad"], bn.weight.grad, atol=1e-5), name
            assert torch.allclose(got["bias_grad"], bn.bias.grad, atol=1e-5), name
            assert torch.allclose(got["running"], torch.stack([bn.running_mean, bn.running_var]), atol=1e-6), name


def test_global_batchnorm_is_plain_batchnorm_outside_distributed_training():
    from promptkd.engine.distributed import GlobalBatchNorm, restore_batchnorm, use_global_batchnorm

    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    original = model[1]
    weight = original.weight
    swapped = use_global_batchnorm(model, model)
    assert isinstance(model[1], GlobalBatchNorm) and model[1].weight is weight  # the optimiser's tensors stay
    x = torch.randn(6, 4)
    reference = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    reference.load_state_dict(model.state_dict())
    assert torch.equal(model(x), reference(x))  # one process: BatchNorm's own kernel
    assert set(model.state_dict()) == set(reference.state_dict())
    restore_batchnorm(swapped)
    assert model[1] is original and torch.equal(original.running_mean, reference[1].running_mean)


# --- distillation: torchrun with 2 processes == 1 process ---------------------------------------------------------
@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, list[str]]:
    """16 unlabelled 32 px images as a dataset's train split, as a folder and as 4 tar shards (same images)."""
    root = tmp_path_factory.mktemp("ddp_data")
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    rng = np.random.default_rng(0)
    split: dict[str, list] = {"train": [], "val": [], "test": []}
    encoded = []
    for label, name in enumerate(CLASSES):
        for i in range(4):
            image = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
            relative = f"{name.replace(' ', '_')}/{i}.png"
            for folder in (root / "toy" / "images", root / "folder"):
                (folder / relative).parent.mkdir(parents=True, exist_ok=True)
                image.save(folder / relative)
            split["train"].append([relative, label, name])
            buffer = io.BytesIO()
            image.save(buffer, "PNG")
            encoded.append(buffer.getvalue())
    (root / "toy" / "split_zhou_Toy.json").write_text(json.dumps(split))
    (root / "shards").mkdir()
    for s in range(4):
        with tarfile.open(root / "shards" / f"s-{s:03d}.tar", "w") as tar:
            for i in range(4):
                info = tarfile.TarInfo(f"img_{s}_{i}.png")
                info.size = len(encoded[4 * s + i])
                tar.addfile(info, io.BytesIO(encoded[4 * s + i]))
    classnames = ["--classnames", str(root / "classes.txt")]
    return {
        "dataset": ["--dataset", str(root / "toy")],
        "folder": ["--unlabeled-folder", str(root / "folder"), *classnames],
        "shards": ["--unlabeled-shards", str(root / "shards" / "s-{000..003}.tar"), "--lanes", "2", *classnames],
    }


def _distill_args(source: list[str], out: Path, projector: str) -> list[str]:
    return [
        "distill",
        "--teacher-model",
        "pkd-world-teacher",
        "--student-model",
        "pkd-world-student",
        "--preset",
        "world",
        *source,
        "--out",
        str(out),
        "--no-eval",
        "--device",
        "cpu",
        "--set",
        "train.epochs=2",
        "train.batch_size=8",
        "train.progress=false",
        f"method.projector={projector}",
    ]


@pytest.mark.slow
@pytest.mark.parametrize(("source", "projector"), [("dataset", "mlp"), ("folder", "linear"), ("shards", "mlp")])
def test_torchrun_two_processes_distil_the_student_one_process_does(sources, tmp_path, source, projector):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    runs = {}
    for procs in (1, 2):
        out = tmp_path / f"procs{procs}"
        launcher = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port())]
        command = [sys.executable, *(launcher if procs == 2 else []), "-m", "promptkd.cli.main"]
        done = subprocess.run(
            [*command, *_distill_args(sources[source], out, projector)], env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr[-3000:]
        runs[procs], _ = load_checkpoint(out / "prompts")
    assert set(runs[1]) == set(runs[2]) and ("projector.bn.running_var" in runs[1]) == (projector == "mlp")
    for key, value in runs[1].items():
        assert torch.allclose(runs[2][key].float(), value.float(), rtol=0, atol=WEIGHT_ATOL), key


# --- DPC: its shipped world preset under torchrun ------------------------------------------------------------------
@pytest.mark.slow
def test_torchrun_two_processes_train_dpc_with_the_world_preset(sources, tmp_path):
    """A CoOp prompt (one process), then DPC over it on 2 gloo processes: the ranks' hard-negative batches differ in
    size, the parallel prompt moves, the tuned one is kept inside the DPC checkpoint unchanged."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    common = [*sources["dataset"], "--shots", "0", "--device", "cpu", "--set", "evaluate=false", "train.progress=false"]
    cli = [sys.executable, "-m", "promptkd.cli.main", "train", "--preset", "world"]
    coop = tmp_path / "coop"
    done = subprocess.run(
        [*cli, "--method", "coop", "--out", str(coop), *common, "train.epochs=1"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port())]
    ddp = [sys.executable, *launcher, "-m", "promptkd.cli.main", "train", "--preset", "world"]
    out = tmp_path / "dpc"
    done = subprocess.run(
        [*ddp, "--method", "dpc", "--out", str(out), *common, "train.epochs=2", f"method.base={coop}"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    tuned, _ = load_checkpoint(coop / "prompts")
    stage, record = load_checkpoint(out / "prompts")
    assert record["method"] == "dpc" and record["base_checkpoint"]["method"] == "coop"
    assert torch.equal(stage["base.text.ctx"], tuned["text.ctx"])
    assert not torch.allclose(stage["parallel.ctx"], tuned["text.ctx"])
