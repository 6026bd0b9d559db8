"""The world's CLIP pair as a miniature of the real one: report command, shipped-weight records, world versions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from promptkd.data import world
from promptkd.data.items import DataError
from promptkd.evaluation.world_report import check_properties, half_accuracies, update_readme

MICRO = {"scale": 0.01}
SMALL = {"scale": 0.1, "n_pretrain": 10, "n_retrieval": 1, "n_shift_test": 10}  # 4 train / 1 val / 3 test per class


@pytest.fixture(scope="module")
def small_world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pair") / "world"
    world.build_world(root, **SMALL)
    return root


def test_half_accuracies_score_each_half_among_its_own_classes():
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(200, 7, generator=generator)
    labels = torch.randint(0, 7, (200,), generator=generator)
    out = half_accuracies(scores, labels)
    base, novel = [0, 1, 2, 3], [4, 5, 6]  # base = first ceil(7 / 2) labels, as the benchmarks split them
    for name, classes in (("base", base), ("novel", novel)):
        keep = [i for i in range(200) if int(labels[i]) in classes]
        right = sum(classes[int(scores[i, classes].argmax())] == int(labels[i]) for i in keep)
        assert out[name] == pytest.approx(100.0 * right / len(keep))
    assert out["hm"] == pytest.approx(2 * out["base"] * out["novel"] / (out["base"] + out["novel"]))
    assert out["all"] == pytest.approx(100.0 * float((scores.argmax(1) == labels).float().mean()))


def test_half_accuracies_equal_a_zero_shot_run_on_each_subsample(small_world):
    from promptkd.backbones import load_backbone
    from promptkd.data.datasets import resolve_dataset
    from promptkd.data.sampling import subsample_classes
    from promptkd.evaluation.world_report import measure_backbone
    from promptkd.evaluation.zeroshot import evaluate_zeroshot

    backbone = load_backbone("pkd-world-student", "shipped").freeze()
    splits = resolve_dataset("counts", small_world)
    measured = measure_backbone(backbone, splits, probe=False)["zeroshot"]
    for half, key in (("base", "base"), ("new", "novel")):
        part = subsample_classes(splits, half)
        result = evaluate_zeroshot(backbone, part.test, part.classnames, [part.template], progress=False)
        assert measured[key] == pytest.approx(100 * result.metrics["acc1"])


def test_property_checks_name_the_numbers():
    teacher = {"zeroshot": {"hm": 60.0}, "linear_probe": {"hm": 80.0}}
    student = {"zeroshot": {"hm": 50.0}, "linear_probe": {"hm": 66.0}}
    good = check_properties("shapes", teacher, student, 4.0)
    assert good.ok and len(good.checks) == 5
    weak = check_properties("shapes", teacher, {"zeroshot": {"hm": 55.0}, "linear_probe": {"hm": 58.0}}, 2.5)
    failed = {name for name, ok in weak.checks.items() if not ok}
    assert failed == {
        "student probe >= its zero-shot + 15 HM",
        "student probe >= teacher zero-shot HM",
        "student zero-shot <= teacher zero-shot - 8 HM",
        "student >= 3x faster",
    }
    assert weak.details["student >= 3x faster"] == "2.50x"


def test_world_report_writes_json_markdown_and_the_readme_section(small_world, tmp_path, capsys):
    from promptkd.cli.main import main

    readme = tmp_path / "README.md"
    readme.write_text("# x\n\nbefore\n<!-- world-report:start -->\nold table\n<!-- world-report:end -->\nafter\n")
    out = tmp_path / "report"
    base = ["world-report", "--world-root", str(small_world), "--datasets", "counts", "--out", str(out)]
    code = main([*base, "--readme", str(readme), "--no-speed"])
    assert code == 0
    report = json.loads((out / "world_report.json").read_text())
    for role in ("teacher", "student"):
        measured = report["models"][role]["results"]["counts"]
        assert set(measured) == {"zeroshot", "linear_probe"}
        assert 0 <= measured["linear_probe"]["hm"] <= 100 and measured["linear_probe"]["C"] > 0
    assert set(report["checks"]["counts"]["checks"]) == {
        "student probe >= its zero-shot + 15 HM",
        "student probe >= teacher zero-shot HM",
        "student zero-shot <= teacher zero-shot - 8 HM",
        "teacher zero-shot < teacher probe",
    }
    text = readme.read_text()
    assert "old table" not in text and text.startswith("# x\n\nbefore\n<!-- world-report:start -->\n| model |")
    assert text.endswith("<!-- world-report:end -->\nafter\n") and "pkd-world-student" in text
    assert (out / "world_report.md").read_text().strip() in text
    capsys.readouterr()
    # A README without the markers is an error that says what to add; a non-world dataset is refused up front.
    (tmp_path / "plain.md").write_text("# plain\n")
    assert not update_readme(tmp_path / "plain.md", ["x"])
    assert main([*base, "--readme", str(tmp_path / "plain.md"), "--no-speed", "--no-probe"]) == 2
    assert "<!-- world-report:start -->" in capsys.readouterr().err
    assert main(["world-report", "--world-root", str(small_world), "--datasets", "dtd"]) == 2
    assert "not world datasets: dtd" in capsys.readouterr().err


def test_images_per_second_times_towers_and_methods_alike(tiny_backbone):
    from promptkd.evaluation.world_report import images_per_second
    from promptkd.methods import get_method

    coop = get_method("coop")(tiny_backbone, ["a", "b", "c"])
    rates = images_per_second([tiny_backbone, coop], batch_size=8, rounds=2, min_seconds=0.05)
    assert len(rates) == 2 and all(rate > 0 for rate in rates)


# ----------------------------------------------------------------------------------------------------------------------
# World versions: an older world is never used silently
# ----------------------------------------------------------------------------------------------------------------------


def _age(root: Path, version: int) -> None:
    path = root / world.MANIFEST_NAME
    manifest = json.loads(path.read_text())
    manifest["version"] = version
    path.write_text(json.dumps(manifest))


def test_an_older_world_is_refused_where_named_and_rebuilt_in_the_cache(tmp_path, monkeypatch):
    from promptkd.data.datasets import resolve_dataset

    named = tmp_path / "mine"
    world.build_world(named, **MICRO)
    _age(named, world.WORLD_VERSION - 1)
    with pytest.raises(DataError, match=f"version {world.WORLD_VERSION - 1}, but this promptkd renders version"):
        resolve_dataset("shapes", named)
    with pytest.raises(world.WorldMismatchError, match="Delete the folder or name another one"):
        world.ensure_world(named)
    assert json.loads((named / world.MANIFEST_NAME).read_text())["version"] == world.WORLD_VERSION - 1  # untouched

    monkeypatch.setenv("PROMPTKD_CACHE", str(tmp_path / "cache"))
    cache = world.default_world_root()
    assert cache == tmp_path / "cache" / "world"
    world.build_world(cache, **MICRO)
    _age(cache, world.WORLD_VERSION - 1)
    with pytest.raises(DataError, match="run `promptkd demo` once"):
        resolve_dataset("shapes", cache)
    assert world.ensure_world() == cache  # promptkd's own cache: rebuilt, with a warning
    assert world.load_manifest(cache)["version"] == world.WORLD_VERSION
    assert resolve_dataset("shapes", cache).num_classes == 64


def test_a_world_with_other_parameters_is_used_as_it_is(tmp_path):
    root = tmp_path / "small"
    world.build_world(root, **MICRO)
    assert world.ensure_world(root) == root and world.load_manifest(root)["params"]["scale"] == MICRO["scale"]


# ----------------------------------------------------------------------------------------------------------------------
# Shipped weights: a file that does not match its record is refused
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture()
def shipped_copy(tmp_path, monkeypatch) -> Path:
    from promptkd.backbones import weights

    folder = tmp_path / "weights"
    shutil.copytree(weights.WEIGHTS_DIR, folder)
    monkeypatch.setattr(weights, "WEIGHTS_DIR", folder)
    return folder


def test_shipped_weights_carry_a_record_that_matches():
    from promptkd.backbones import load_backbone
    from promptkd.backbones.files import sha256_of
    from promptkd.backbones.weights import WEIGHTS_DIR, shipped_record

    for model in ("pkd-world-teacher", "pkd-world-student"):
        path = WEIGHTS_DIR / f"{model}.safetensors"
        record = shipped_record(path)
        assert record["sha256"] == sha256_of(path) and record["world_version"] == world.PRETRAIN_VERSION
        assert record["pretrain"]["command"] == "python scripts/pretrain_world.py"
        assert load_backbone(model, "shipped").spec.pretrained == "shipped"


def test_edited_or_unrecorded_shipped_weights_are_refused(shipped_copy):
    from promptkd.backbones import load_backbone
    from promptkd.backbones.weights import ShippedWeightsError

    path = shipped_copy / "pkd-world-student.safetensors"
    assert load_backbone("pkd-world-student", "shipped").spec.pretrained == "shipped"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ShippedWeightsError, match="does not match its record"):
        load_backbone("pkd-world-student", "shipped")
    with pytest.raises(ShippedWeightsError, match="does not match its record"):
        load_backbone("pkd-world-student", str(path))  # the file by its path is the same file

    record_path = shipped_copy / "pkd-world-teacher.json"
    record = json.loads(record_path.read_text())
    for stale in (world.PRETRAIN_VERSION - 1, world.WORLD_VERSION + 1, None):
        record_path.write_text(json.dumps({**record, "world_version": stale}))
        with pytest.raises(ShippedWeightsError, match=f"pre-trained on world version {stale}, .* dates from version"):
            load_backbone("pkd-world-teacher", "shipped")
    record_path.write_text(json.dumps({**record, "model_cfg": {**record["model_cfg"], "embed_dim": 7}}))
    with pytest.raises(ShippedWeightsError, match="another architecture .*embed_dim"):
        load_backbone("pkd-world-teacher", "shipped")
    record_path.unlink()
    with pytest.raises(ShippedWeightsError, match="without their record"):
        load_backbone("pkd-world-teacher", "shipped")


# ----------------------------------------------------------------------------------------------------------------------
# The shipped pair keeps the real pair's properties (a future world or weight change cannot silently break them)
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_shipped_pair_has_the_real_pairs_properties_on_a_world_subset(tmp_path):
    """The world's train and validation images with half its test images (same seed, so the same images as in the
    README's report): student probe >= its zero-shot + 15 HM and >= the teacher's zero-shot, student zero-shot >= 8
    HM below the teacher's, teacher zero-shot below its probe, student >= 3x cheaper. Every dataset, the thresholds of
    `promptkd world-report`. Cost is counted in FLOPs here (images/s depends on what else the machine runs; the
    report measures images/s)."""
    from promptkd.backbones import load_backbone
    from promptkd.evaluation.world_report import flops_per_image, measure_pair

    root = tmp_path / "world"
    world.build_world(root, n_test=15, n_pretrain=1, n_retrieval=1, n_shift_test=1)
    teacher = load_backbone("pkd-world-teacher", "shipped").freeze()
    student = load_backbone("pkd-world-student", "shipped").freeze()
    report = measure_pair(teacher, student, root, ["shapes", "patterns", "counts"], speed=False)
    assert flops_per_image(teacher) >= 3 * flops_per_image(student)
    failed = {
        dataset: {name: result["details"][name] for name, ok in result["checks"].items() if not ok}
        for dataset, result in report["checks"].items()
        if not result["ok"]
    }
    assert not failed, f"the shipped world CLIPs lost properties of the real pair: {failed}"


def test_weights_of_any_world_version_with_todays_pretraining_corpus_are_valid(shipped_copy):
    # Version 4 changed only test-only sets: weights pre-trained on version 3 (the shipped ones) or 4 load.
    from promptkd.backbones import load_backbone

    record_path = shipped_copy / "pkd-world-teacher.json"
    record = json.loads(record_path.read_text())
    assert world.PRETRAIN_VERSION < world.WORLD_VERSION
    for version in range(world.PRETRAIN_VERSION, world.WORLD_VERSION + 1):
        record_path.write_text(json.dumps({**record, "world_version": version}))
        assert load_backbone("pkd-world-teacher", "shipped").spec.pretrained == "shipped"


def test_unlabelled_images_of_another_world_version_are_refused_by_name(tmp_path):
    out = world.render_unlabeled("shapes_sketch", 3, tmp_path / "u", workers=1)
    assert world.render_unlabeled("shapes_sketch", 3, tmp_path / "u", workers=1) == out  # same rendering: reused
    record = json.loads((out / "render.json").read_text())
    (out / "render.json").write_text(json.dumps({**record, "world_version": world.WORLD_VERSION - 1}))
    with pytest.raises(world.WorldMismatchError, match=f"rendered by world version {world.WORLD_VERSION - 1}, but"):
        world.render_unlabeled("shapes_sketch", 3, tmp_path / "u", workers=1)


@pytest.mark.slow
def test_world_report_shows_the_shift_table(small_world, tmp_path, capsys):
    from promptkd.cli.main import main
    from promptkd.cli.world_report import shift_markdown

    out = tmp_path / "report"
    args = ["world-report", "--world-root", str(small_world), "--datasets", "shapes", "--no-probe", "--no-speed"]
    assert main([*args, "--out", str(out)]) == 0
    rows = json.loads((out / "world_report.json").read_text())["shifts"]
    assert [r["set"] for r in rows] == [*world.shift_datasets("shapes"), "shapes_noise"]
    for row in rows:
        assert row["images"] == 64 and row["stress"] == (row["set"] == "shapes_noise")
        for role in ("teacher", "student"):
            r = row[role]
            assert r["retention"] == pytest.approx(r["zeroshot"] / r["clean"])
    text = capsys.readouterr().out
    assert "| shift | of | images | teacher zero-shot | teacher retention |" in text
    assert "| shapes_noise (stress) | shapes | 64 |" in text
    row = {"set": "s", "source": "x", "stress": False, "images": 9}
    row["teacher"] = {"zeroshot": 0.0, "clean": 0.0, "retention": None}
    assert shift_markdown([row])[-1] == "| s | x | 9 | 0.0 | n/a |"
    assert main([*args, "--no-shifts", "--out", str(out)]) == 0
    assert "shifts" not in json.loads((out / "world_report.json").read_text())
