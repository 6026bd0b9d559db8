"""Bad input at the command line: one message naming the value or file and what to do, exit code 2, nothing lost
(issue 13's list: random weights only when asked, unwritable outputs, devices, counts, tags, paths, hints)."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from promptkd.cli.main import main


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from promptkd.data.world import build_world

    root = tmp_path_factory.mktemp("world")
    build_world(root, scale=0.05, n_shift_test=20, n_pretrain=40, n_retrieval=40, workers=1)
    return ["--dataset", "shapes", "--data-root", str(root)]


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (32, 32), (40 * i, 90, 200)).save(folder / f"{i}.png")
    return folder


def run(argv, capsys):
    code = main(argv)
    return code, capsys.readouterr().err


def test_a_run_never_uses_random_weights_unless_asked(world, tmp_path, capsys):
    code, err = run(["zeroshot", *world, "--model", "pkd-tiny", "--out", str(tmp_path)], capsys)
    assert code == 2 and "--pretrained random to start from random weights on purpose" in err
    code, err = run(["train", "--method", "coop", *world, "--model", "pkd-tiny", "--out",
                     str(tmp_path / "t")], capsys)  # fmt: skip
    assert code == 2 and "pkd-tiny has no weights promptkd ships" in err
    code, err = run(["distill", "--teacher-model", "pkd-tiny-wide", "--student-model", "pkd-world-student",
                     *world, "--out", str(tmp_path / "d")], capsys)  # fmt: skip
    assert code == 2 and "--teacher-pretrained random" in err
    from promptkd.backbones.weights import run_weights

    assert run_weights("pkd-world-student", None) == "shipped"  # shipped weights are the default
    assert run_weights("pkd-tiny", "random") is None


def test_outputs_that_cannot_be_written_fail_before_any_work(world, tmp_path, images, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    code, err = run(["zeroshot", *world, "--model", "pkd-world-student", "--out", str(blocker)], capsys)
    assert code == 2 and "is a file, not a folder" in err
    code, err = run(["demo", "--out", str(blocker / "sub")], capsys)
    assert code == 2 and "cannot write to --out" in err
    code, err = run(["predict", "no-checkpoint", str(images), "--out", str(images)], capsys)
    assert code == 2 and "is a folder; give a file name" in err  # checked before the checkpoint is even read


def test_counts_devices_tags_and_paths(world, tmp_path, images, capsys):
    code, err = run(["predict", "ck", str(images), "--top-k", "0", "--out", str(tmp_path / "p.csv")], capsys)
    assert code == 2 and "--top-k must be at least 1, got 0" in err
    code, err = run(["linear-probe", *world, "--model", "pkd-world-student", "--shots", "-2",
                     "--out", str(tmp_path)], capsys)  # fmt: skip
    assert code == 2 and "--shots must be 0" in err
    if not torch.cuda.is_available():
        code, err = run(["zeroshot", *world, "--model", "pkd-world-student", "--device", "cuda",
                         "--out", str(tmp_path)], capsys)  # fmt: skip
        assert code == 2 and "--device cuda: this machine has no CUDA GPU" in err
    code, err = run(["zeroshot", *world, "--model", "pkd-world-student", "--pretrained", "shiped",
                     "--out", str(tmp_path)], capsys)  # fmt: skip
    assert code == 2 and "Did you mean 'shipped'" in err
    missing = tmp_path / "nope" / "weights.safetensors"
    code, err = run(["zeroshot", *world, "--model", "pkd-tiny", "--pretrained", str(missing), "--out",
                     str(tmp_path)], capsys)  # fmt: skip
    assert code == 2 and f"weight file {missing} does not exist" in err


def test_hints_use_the_cli_spelling(tmp_path, capsys):
    from promptkd.data.items import DataError, ImageDataset

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(DataError, match="--skip-bad"):
        ImageDataset([str(bad)], None)[0]


def test_resume_mismatch_lists_the_keys_that_differ():
    from promptkd.engine.trainer import _differences

    old = {"train": {"lr": 0.002, "epochs": 10}, "classnames": [f"c{i}" for i in range(64)]}
    new = {"train": {"lr": 0.01, "epochs": 10}, "classnames": [f"c{i}" for i in range(60)]}
    lines = _differences(old, new, "run")
    assert lines[0].startswith("run.classnames: ['c0', 'c1', 'c2', ... (64 items)] -> ")
    assert lines[1] == "run.train.lr: 0.002 -> 0.01" and len(lines) == 2
    json.dumps(lines)
