"""The training engine: schedule, reproducibility, resume after a kill, NaN guard, selection, 2-process DDP."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from engine_helpers import NoisyImages, make_method, train
from promptkd.checkpoints import load_checkpoint, read_with_digest
from promptkd.engine import TrainConfig, Trainer, TrainingDivergedError, learning_rate
from promptkd.engine.trainer import RESUME_FILE, ResumeError

TESTS = Path(__file__).parent


def test_learning_rate_schedule_is_dassl_constant_warmup_then_cosine():
    cfg = TrainConfig(epochs=4, lr=0.1, warmup_epochs=1, warmup_lr=1e-5)
    assert [learning_rate(cfg, e, 0, 10) for e in range(4)] == pytest.approx(
        [1e-5, 0.05 * (1 + 2**-0.5), 0.05, 0.05 * (1 - 2**-0.5)]
    )
    step_cfg = TrainConfig(epochs=2, lr=0.1, warmup_epochs=0, schedule_per="step")
    assert learning_rate(step_cfg, 1, 0, 10) == pytest.approx(0.05)
    assert learning_rate(TrainConfig(scheduler="constant", warmup_epochs=0, lr=0.3), 5, 3, 10) == 0.3


def test_training_lowers_loss_and_writes_run_files(tmp_path):
    _, result = train(tmp_path, epochs=4, warmup_epochs=0)
    losses = [entry["loss"] for entry in result.history]
    assert losses[-1] < losses[0]
    tensors, config = load_checkpoint(tmp_path / "prompts")
    assert set(tensors) == {"visual.prompts", "head.weight", "head.bias"}
    assert config["method"] == "toy" and config["selection"] == {"on": "last_epoch", "epoch": 4}
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 4 * 3  # 24 images / batch 8, log every step
    assert (tmp_path / RESUME_FILE).is_file()


def test_cpu_run_is_bit_reproducible(tmp_path):
    first, _ = train(tmp_path / "a")
    second, _ = train(tmp_path / "b")
    for key, value in first.trainable_state().items():
        assert torch.equal(value, second.trainable_state()[key]), key


def test_resume_after_kill_equals_uninterrupted_run(tmp_path):
    reference, _ = train(tmp_path / "full", epochs=4)
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    process = subprocess.Popen([sys.executable, str(TESTS / "engine_helpers.py"), str(out), "0.15"], env=env)
    try:
        deadline = time.time() + 120
        while not (out / "epochs.jsonl").is_file() or (out / "epochs.jsonl").read_text().count("\n") < 2:
            assert process.poll() is None and time.time() < deadline, "training subprocess ended early"
            time.sleep(0.05)
        time.sleep(0.2)  # well inside epoch 3 (3 steps of 0.15 s)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert not (out / "prompts.safetensors").exists()
    resumed, result = train(out, epochs=4, method_config={"sleep": 0.15})
    assert result.epochs_run < 4
    for key, value in reference.trainable_state().items():
        assert torch.equal(value, resumed.trainable_state()[key]), key


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    with pytest.raises(TrainingDivergedError, match=r"loss is nan at epoch 2, step 1.*after epoch 1\) is unchanged"):
        train(tmp_path, epochs=3, method_config={"nan_at_epoch": 2})
    state = torch.load(io.BytesIO(read_with_digest(tmp_path / RESUME_FILE)), weights_only=True)
    assert state["epoch"] == 1 and all(torch.isfinite(v).all() for v in state["learner"].values())
    assert not (tmp_path / "prompts.safetensors").exists()


def test_resume_folder_of_another_run_is_refused(tmp_path):
    train(tmp_path, epochs=1)
    method = make_method(n_tokens=3)
    cfg = TrainConfig(epochs=1, batch_size=8, lr=0.05, seed=7, progress=False)
    with pytest.raises(
        ResumeError, match=r"other settings \(folder.s value -> this run.s\):\n  method_config.n_tokens: \d+ -> 3"
    ):
        Trainer(method, cfg, tmp_path).fit(NoisyImages())


def test_validation_selection_is_recorded(tmp_path):
    _, result = train(tmp_path, epochs=3, select="val")
    assert result.selection["on"] == "val" and 1 <= result.selection["epoch"] <= 3
    best = max(result.history, key=lambda e: e["val_acc1"])
    assert result.selection["val_acc1"] == best["val_acc1"]
    _, config = load_checkpoint(tmp_path / "prompts")
    assert config["selection"]["on"] == "val"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_gloo_ddp_equals_one_process(tmp_path):
    import torch.multiprocessing as mp

    from engine_helpers import ddp_worker

    mp.spawn(ddp_worker, args=(2, _free_port(), str(tmp_path / "ddp")), nprocs=2, join=True)
    single, _ = train(tmp_path / "single", epochs=2)
    tensors, _ = load_checkpoint(tmp_path / "ddp" / "prompts")
    for key, value in single.trainable_state().items():
        assert torch.allclose(tensors[key], value, atol=1e-5), key


def test_seeded_cpu_rng_matches_manual_seed_and_restores_the_stream():
    from promptkd.data.transforms import seeded_cpu_rng

    torch.manual_seed(5)
    expected = torch.rand(4)
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    with seeded_cpu_rng(5):
        inside = torch.rand(4)
    assert torch.equal(inside, expected)  # the same stream as torch.manual_seed on the CPU
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's stream is untouched


def test_crop_scale_is_checked_and_world_presets_keep_half_the_image():
    from promptkd.engine.config import TrainConfig
    from promptkd.engine.run import resolve_run_config

    with pytest.raises(ValueError, match="crop_scale"):
        TrainConfig(crop_scale=(0.0, 1.0))
    with pytest.raises(ValueError, match="crop_scale"):
        TrainConfig(crop_scale=(0.9, 0.5))
    assert TrainConfig().crop_scale == (0.08, 1.0)  # Dassl's default for the papers' presets
    assert resolve_run_config("coop", "world", [], {}).train.crop_scale == (0.5, 1.0)
    assert resolve_run_config("coop", "vit_b16", [], {}).train.crop_scale == (0.08, 1.0)


def test_resume_identity_binds_files_by_content_not_spelling(tmp_path, monkeypatch):
    """A resumed run given another spelling of the same teacher file is the same run; another file is not."""
    from promptkd.engine.trainer import _bound_to_content

    (tmp_path / "teacher.safetensors").write_bytes(b"one")
    monkeypatch.chdir(tmp_path)
    relative = _bound_to_content({"teacher": "teacher.safetensors", "root": ".", "name": "coop"})
    absolute = _bound_to_content({"teacher": str(tmp_path / "teacher.safetensors"), "root": str(tmp_path)})
    assert relative["teacher"] == absolute["teacher"] and relative["root"] == absolute["root"]
    assert relative["name"] == "coop"
    (tmp_path / "teacher.safetensors").write_bytes(b"other")  # another size: the hash memo cannot answer
    assert _bound_to_content("teacher.safetensors") != relative["teacher"]
