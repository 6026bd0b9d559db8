"""Seed stability: the split, init and order seeds each move only their own part of a run; averaging the last
epochs' trainable tensors is their exact mean and survives an interruption; the analysis script runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from engine_helpers import NoisyImages, make_method
from promptkd.engine import TrainConfig, Trainer
from promptkd.engine.config import stable_dict

ROOT = Path(__file__).resolve().parents[1]


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(
        **{"epochs": 4, "batch_size": 8, "lr": 0.05, "seed": 7, "progress": False, "warmup_epochs": 0, **kw}
    )


def _fit(out, method=None, **kw):
    method = method or make_method()
    result = Trainer(method, _cfg(**kw), out).fit(NoisyImages(), NoisyImages(n=9))
    return method, result


def test_average_last_epochs_is_the_mean_of_the_saved_epoch_ends(tmp_path):
    method = make_method()
    ends: list[dict[str, torch.Tensor]] = []
    method.on_epoch_end = lambda epoch, total: ends.append(  # type: ignore[method-assign]
        {k: v.detach().clone() for k, v in method.trainable_state().items()}
    )
    _, result = _fit(tmp_path / "avg", method, average_last_epochs=3)
    assert len(ends) == 4 and result.selection == {"on": "average_last_epochs", "epochs": [2, 3, 4]}
    final = method.trainable_state()
    for key, value in final.items():
        expected = torch.stack([e[key].double() for e in ends[1:]]).sum(0).div(3).to(value.dtype)
        assert torch.equal(value, expected), key
        assert not torch.equal(value, ends[-1][key])  # not simply the last epoch
    plain, _ = _fit(tmp_path / "plain")
    for key, value in plain.trainable_state().items():  # the averaging changes nothing before the end
        assert torch.equal(value, ends[-1][key]), key


class _Interrupt(Exception):
    pass


def _interrupting(method, at_call: int):
    real, calls = method.training_step, [0]

    def step(batch):
        calls[0] += 1
        if calls[0] == at_call:
            raise _Interrupt
        return real(batch)

    method.training_step = step  # type: ignore[method-assign]
    return method


@pytest.mark.parametrize("at_call", [8, 10])  # after epoch 2 ends (3 steps an epoch), and mid-epoch 4
def test_average_resumed_run_equals_uninterrupted(tmp_path, at_call):
    reference, _ = _fit(tmp_path / "full", average_last_epochs=3, checkpoint_every=1)
    out = tmp_path / "cut"
    with pytest.raises(_Interrupt):
        _fit(out, _interrupting(make_method(), at_call), average_last_epochs=3, checkpoint_every=1)
    resumed, result = _fit(out, average_last_epochs=3, checkpoint_every=1)
    assert result.epochs_run < 4
    for key, value in reference.trainable_state().items():
        assert torch.equal(value, resumed.trainable_state()[key]), key


def test_new_settings_at_default_leave_records_unchanged():
    record = stable_dict(_cfg())
    assert "average_last_epochs" not in record and stable_dict(_cfg(average_last_epochs=2))["average_last_epochs"] == 2
    with pytest.raises(ValueError, match="average_last_epochs"):
        _cfg(average_last_epochs=5)
    with pytest.raises(ValueError, match="select: val"):
        _cfg(average_last_epochs=2, select="val")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from promptkd.data.world import build_world

    root = tmp_path_factory.mktemp("world")
    build_world(root, scale=0.2, n_retrieval=8, n_pretrain=4)
    return root


def _run_parts(world, out, monkeypatch, overrides):
    """(few-shot train paths, initial trainable tensors, final tensors) of one tiny CoOp run."""
    from promptkd.engine import run as run_module
    from promptkd.engine.run import resolve_run_config, run_training

    seen: dict = {}
    real_fit = run_module.Trainer.fit

    def fit(self, train_set, val_set=None):
        seen["paths"] = [d.path for d in train_set.items]
        seen["init"] = {k: v.detach().clone() for k, v in self.method.trainable_state().items()}
        return real_fit(self, train_set, val_set)

    monkeypatch.setattr(run_module.Trainer, "fit", fit)
    base = {"dataset": "counts", "data_root": str(world), "shots": 2, "model": "pkd-tiny", "pretrained": "random"}
    fast = ["train.epochs=1", "train.progress=false", "train.batch_size=4", "evaluate=false", "method.ctx_init="]
    config = resolve_run_config("coop", "world", [*fast, *overrides], {**base, "out": str(out)})
    torch.manual_seed(0)  # the random-weight backbone draws from the global generator
    outcome = run_training(config)
    monkeypatch.setattr(run_module.Trainer, "fit", real_fit)
    return seen["paths"], seen["init"], outcome


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_split_init_and_order_seeds_each_change_only_their_part(world, tmp_path, monkeypatch):
    ref_paths, ref_init, ref = _run_parts(world, tmp_path / "ref", monkeypatch, [])
    default = [*_run_parts(world, tmp_path / "explicit", monkeypatch, ["split_seed=1", "init_seed=1"])]
    assert default[0] == ref_paths and _same(default[1], ref_init)  # the defaults are the run seed
    from promptkd.checkpoints import load_checkpoint

    final = load_checkpoint(ref.train.checkpoint)[0]
    assert _same(load_checkpoint(default[2].train.checkpoint)[0], final)

    paths, init, _ = _run_parts(world, tmp_path / "split", monkeypatch, ["split_seed=2"])
    assert paths != ref_paths and _same(init, ref_init)
    paths, init, _ = _run_parts(world, tmp_path / "init", monkeypatch, ["init_seed=2"])
    assert paths == ref_paths and not _same(init, ref_init)
    paths, init, order = _run_parts(world, tmp_path / "order", monkeypatch, ["train.seed=2"])
    assert paths == ref_paths and _same(init, ref_init)
    assert not _same(load_checkpoint(order.train.checkpoint)[0], final)  # only the data order moved it


@pytest.mark.slow
def test_world_stability_script_smoke(world, tmp_path):
    out = tmp_path / "stability"
    command = [
        sys.executable,
        str(ROOT / "scripts" / "world_stability.py"),
        "--world-root",
        str(world),
        "--dataset",
        "counts",
        "--model",
        "pkd-tiny",
        "--pretrained",
        "random",
        "--seeds",
        "2",
        "--shots",
        "2",
        "--set",
        "train.epochs=2",
        "train.batch_size=4",
        "--average-last",
        "2",
        "--out",
        str(out),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    first = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert first.returncode == 0, first.stderr[-2000:]
    table = (out / "stability.md").read_text()
    assert "split" in table and "init" in table and "order" in table and "averaged" in table and "lowest-loss" in table
    again = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert again.returncode == 0 and "0 ran" in again.stdout


def _ddp_average_worker(rank: int, world_size: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from promptkd.engine.distributed import DistInfo

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size), RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        method = make_method()
        Trainer(method, _cfg(epochs=3, average_last_epochs=2), out, info=DistInfo(rank, world_size, rank)).fit(
            NoisyImages(), NoisyImages(n=9)
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_average_under_two_process_ddp_equals_one_process(tmp_path):
    import socket

    import torch.multiprocessing as mp

    from promptkd.checkpoints import load_checkpoint

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_ddp_average_worker, args=(2, port, str(tmp_path / "ddp")), nprocs=2, join=True)
    single, result = _fit(tmp_path / "single", epochs=3, average_last_epochs=2)
    tensors, record = load_checkpoint(tmp_path / "ddp" / "prompts")
    assert record["selection"] == result.selection == {"on": "average_last_epochs", "epochs": [2, 3]}
    for key, value in single.trainable_state().items():
        assert torch.allclose(tensors[key], value, atol=1e-5), key


def test_one_seed_moves_the_data_order_too_unless_set_apart():
    """As in the references (one seed sets every generator): ``seed`` is train.seed's default, here and in distill."""
    from promptkd.distill.run import resolve_distill_config
    from promptkd.engine.run import resolve_run_config

    assert resolve_run_config("coop", "world", [], {"seed": 3}).train.seed == 3
    assert resolve_run_config("coop", "world", ["train.seed=7"], {"seed": 3}).train.seed == 7
    assert resolve_distill_config("world", [], {"seed": 2}).train.seed == 2


def test_restarts_keep_the_lowest_loss_start_and_retrain_it_alone(world, tmp_path):
    """Two starts (init seeds 3 and 1003) trained without testing; the lower last-epoch loss is trained again in the
    run folder, identical to its trial, and recorded as the run's init seed; restarts=1 is the plain run."""
    from promptkd.backbones.weights import shipped_weights
    from promptkd.checkpoints import load_checkpoint
    from promptkd.engine.run import resolve_run_config, run_training

    def run(out, overrides):
        base = {"dataset": "counts", "data_root": str(world), "shots": 2, "out": str(out)}
        base.update(model="pkd-world-student", pretrained=shipped_weights("pkd-world-student"))
        fast = ["train.epochs=1", "train.progress=false", "train.batch_size=4", "evaluate=false", "method.ctx_init="]
        run_training(resolve_run_config("coop", "world", [*fast, *overrides], base))

    run(tmp_path / "r", ["restarts=2", "init_seed=3"])
    record = json.loads((tmp_path / "r" / "restarts.json").read_text())
    losses = {int(k): v for k, v in record["losses"].items()}
    assert set(losses) == {3, 1003} and record["chosen"] == min(losses, key=losses.get)
    kept, _ = load_checkpoint(tmp_path / "r" / "prompts")
    trial, _ = load_checkpoint(tmp_path / "r" / "restarts" / f"init_{record['chosen']}" / "prompts")
    assert _same(kept, trial)
    config = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert config["restarts"] == 2 and config["init_seed"] == record["chosen"]
    assert not list((tmp_path / "r" / "restarts").glob("*/*classification.json"))  # trials are never tested
    run(tmp_path / "plain", [])
    assert not (tmp_path / "plain" / "restarts").exists()
    assert "restarts" not in yaml.safe_load((tmp_path / "plain" / "config.yaml").read_text())


@pytest.mark.parametrize("value", ["0", "-1", "nan", "two"])
def test_bad_restarts_are_refused_by_the_shared_rules(value):
    from promptkd.config import ConfigError
    from promptkd.engine.run import resolve_run_config

    with pytest.raises(ConfigError, match="restarts"):
        resolve_run_config("coop", "world", [f"restarts={value}"], {})
