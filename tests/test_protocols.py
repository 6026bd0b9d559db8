"""Protocol runners on a tiny embedded world: every protocol runs, skips finished runs, and writes its report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from promptkd.data.world import build_world
from promptkd.protocols import ProtocolError, ProtocolSpec, run_protocol

FAST = ["train.epochs=1", "train.progress=false", "train.batch_size=16"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    build_world(root, scale=0.2, n_retrieval=8, n_pretrain=4)
    return root


def _spec(world, tmp_path, protocol, **kwargs):
    return ProtocolSpec(
        protocol=protocol,
        method="coop",
        preset="world",
        seeds=[1],
        out=str(tmp_path),
        data_root=str(world),
        model="pkd-tiny",
        pretrained="random",
        overrides=FAST,
        **kwargs,
    )


@pytest.mark.slow
def test_base2new_runs_then_skips_and_reports(world, tmp_path, monkeypatch):
    from promptkd.data import transforms

    scales = []
    real = transforms.train_transform
    monkeypatch.setattr(transforms, "train_transform", lambda p, scale: scales.append(scale) or real(p, scale=scale))
    spec = _spec(world, tmp_path, "base2new", datasets=["counts"], shots=[2])
    first = run_protocol(spec)
    assert first["ran"] == 1 and first["skipped"] == 0
    assert scales == [(0.5, 1.0)]  # the world preset's crop range reaches the training views
    report = json.loads(Path(first["report"]["json"]).read_text())
    assert "counts" in json.dumps(report) and "coop" in json.dumps(report)
    markdown = Path(first["report"]["markdown"]).read_text()
    assert "HM" in markdown and "All classes" in markdown  # base runs are also scored on all classes at once
    (row,) = [r for r in report["rows"] if r["method"] == "coop"]
    assert row["base"]["n"] == row["novel"]["n"] == row["metrics"]["acc1"]["n"] == 1
    again = run_protocol(spec)
    assert again["ran"] == 0 and again["skipped"] == 1


@pytest.mark.slow
def test_few_shot_cross_dataset_and_domain_generalisation(world, tmp_path):
    few = run_protocol(_spec(world, tmp_path, "few_shot", datasets=["counts"], shots=[1, 2]))
    assert few["ran"] == 2
    cross = run_protocol(_spec(world, tmp_path, "cross_dataset", datasets=["counts"], targets=["patterns"], shots=[2]))
    target_results = list((tmp_path / "cross_dataset").rglob("targets/patterns/*.json"))
    assert cross["ran"] == 1 and target_results
    result = json.loads(target_results[0].read_text())
    assert result["dataset"] == "patterns" and result["source"] == "counts" and result["num_classes"] == 32
    dg = run_protocol(
        _spec(
            world,
            tmp_path,
            "domain_generalization",
            datasets=["shapes"],
            targets=["shapes_sketch", "shapes_noise"],
            shots=[1],
        )
    )
    assert dg["ran"] == 1
    assert len(list((tmp_path / "domain_generalization").rglob("targets/shapes_*/*.json"))) >= 2


def test_transfer_protocols_need_targets(tmp_path):
    with pytest.raises(ProtocolError, match="cross_dataset needs --targets"):
        run_protocol(ProtocolSpec("cross_dataset", "coop", "world", ["shapes"], [1], str(tmp_path)))
    with pytest.raises(ProtocolError, match="unknown protocol"):
        run_protocol(ProtocolSpec("zero_shot", "coop", "world", ["shapes"], [1], str(tmp_path)))
