"""`promptkd protocol ... --method promptkd`: teacher -> stored features -> student per dataset and seed, resumed at
stage boundaries, teachers from a folder (Dassl files converted), bad input refused before any work, and the report's
distillation section. Tiny world (scale 0.2), teacher pkd-tiny-wide and student pkd-tiny with random weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from promptkd.checkpoints import file_sha256
from promptkd.data.world import build_world
from promptkd.protocols import ProtocolError, ProtocolSpec, run_protocol
from promptkd.protocols import promptkd as kd
from test_reference_import import ivlp_teacher_state, save_dassl

FAST = ["train.epochs=1", "train.progress=false", "train.batch_size=16"]
STUDENT = [*FAST, "method.vision_depth=2", "max_per_class=2"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    build_world(root, scale=0.2, n_retrieval=8, n_pretrain=4)
    return root


def _spec(world, out, protocol="base2new", **kwargs):
    values = {
        "protocol": protocol,
        "method": "promptkd",
        "preset": "world",
        "datasets": ["counts"],
        "seeds": [1],
        "out": str(out),
        "data_root": str(world),
        "shots": [2],
        "model": "pkd-tiny",
        "pretrained": "random",
        "teacher_model": "pkd-tiny-wide",
        "teacher_pretrained": "random",
        "overrides": STUDENT,
        "teacher_overrides": FAST,
        "progress": False,
    }
    values.update(kwargs)
    return ProtocolSpec(**values)


def _seed_folder(out, protocol="base2new", dataset="counts", seed=1) -> Path:
    return Path(out) / protocol / dataset / "promptkd" / f"seed_{seed}"


class Killed(Exception):
    pass


@pytest.mark.slow
def test_base2new_killed_at_a_stage_boundary_resumes_and_reports(world, tmp_path, monkeypatch):
    """Killed after the teacher and its features: the rerun trains only the student; a third run does nothing."""
    spec = _spec(world, tmp_path)
    real = kd.student_stage
    monkeypatch.setattr(kd, "student_stage", lambda job, info: (_ for _ in ()).throw(Killed()))
    with pytest.raises(Killed):
        run_protocol(spec)
    folder = _seed_folder(tmp_path)
    teacher_sha = file_sha256(folder / "teacher" / "prompts.safetensors")
    features_sha = file_sha256(folder / "teacher_features.safetensors")
    monkeypatch.setattr(kd, "student_stage", real)
    second = run_protocol(spec)
    assert (second["teachers"], second["features"], second["students"]) == (0, 0, 1)
    assert file_sha256(folder / "teacher" / "prompts.safetensors") == teacher_sha
    assert file_sha256(folder / "teacher_features.safetensors") == features_sha
    third = run_protocol(spec)
    assert (third["teachers"], third["features"], third["students"], third["scored"]) == (0, 0, 0, 0)
    report = json.loads(Path(third["report"]["json"]).read_text())
    row = report["distillation"]["base2new"]["datasets"]["counts"]
    assert set(row) >= {"teacher", "student", "zeroshot_student", "gap_closed"}
    assert row["student"]["seeds"] == row["teacher"]["seeds"] == 1
    markdown = Path(third["report"]["markdown"]).read_text()
    assert "## PromptKD (base2new)" in markdown and "all classes, transductive" in markdown


@pytest.mark.slow
def test_teacher_folder_of_dassl_files_is_converted_and_used(world, tmp_path, wide_backbone):
    """A released-style teacher folder (<dataset>/model-best.pth.tar, one for every seed) converted on the fly; the
    student distilled inductively from a teacher cache."""
    torch.manual_seed(0)  # the teacher's random backbone as the protocol draws it (seed 1) does not matter here
    teachers = tmp_path / "teachers" / "counts" / "MultiModalPromptLearner"
    teachers.mkdir(parents=True)
    save_dassl(teachers / "model-best.pth.tar", ivlp_teacher_state(wide_backbone, n_cls=12))
    spec = _spec(world, tmp_path / "out", teacher=str(tmp_path / "teachers"), mode="inductive", teacher_cache=True)
    summary = run_protocol(spec)
    folder = _seed_folder(tmp_path / "out")
    assert summary["teachers"] == 0 and summary["students"] == 1
    assert any((folder / "teacher_cache").iterdir())  # per dataset and seed, on request
    assert "the base classes only, inductive" in Path(summary["report"]["markdown"]).read_text()
    converted = json.loads((folder / "teacher" / "prompts.json").read_text())
    assert converted["method"] == "promptsrc" and converted["converted_from"]
    assert json.loads((folder / "teacher" / "source.json").read_text())["kind"] == "dassl"
    roles = {kd.result_role(json.loads(p.read_text()) | {"_path": str(p)}) for p in folder.rglob("*seed1*.json")}
    assert {"teacher", "student"} <= roles
    again = run_protocol(spec)
    assert again["students"] == 0 and again["scored"] == 0


@pytest.mark.slow
def test_domain_generalisation_scores_targets_with_their_features(world, tmp_path):
    summary = run_protocol(
        _spec(world, tmp_path, "domain_generalization", datasets=["shapes"], targets=["shapes_sketch"], shots=[1])
    )
    folder = _seed_folder(tmp_path, "domain_generalization", "shapes")
    assert (folder / "targets" / "shapes_sketch" / "teacher_features.safetensors").is_file()
    section = json.loads(Path(summary["report"]["json"]).read_text())["distillation"]["domain_generalization"]
    assert section["datasets"]["shapes"]["source"] and not section["datasets"]["shapes_sketch"]["source"]
    assert section["average"] is not None


def test_default_targets_follow_the_paper_and_the_world():
    assert kd.default_targets("domain_generalization", "imagenet") == list(kd.PAPER_DG)
    assert len(kd.default_targets("cross_dataset", "imagenet")) == 10
    shifts = ["shapes_v2", "shapes_sketch", "shapes_r", "shapes_a"]
    assert kd.default_targets("domain_generalization", "shapes") == shifts  # the stress set only when named
    assert kd.default_targets("cross_dataset", "shapes") == ["patterns", "counts"]


# --- bad input: one message, before any work ---------------------------------------------------------------------
def test_teacher_folder_missing_a_seed_is_refused_by_the_cli(world, tmp_path, wide_backbone, capsys):
    from promptkd.cli.main import main

    (tmp_path / "teachers" / "counts" / "seed_1").mkdir(parents=True)
    save_dassl(tmp_path / "teachers" / "counts" / "seed_1" / "model.pth.tar-20", ivlp_teacher_state(wide_backbone))
    args = ["protocol", "base2new", "--method", "promptkd", "--preset", "world", "--datasets", "counts", "patterns"]
    args += ["--seeds", "1", "2", "--data-root", str(world), "--teacher", str(tmp_path / "teachers")]
    args += ["--out", str(tmp_path / "out")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "counts seed 2: no seed 2" in err and "patterns seed 1: no folder for 'patterns'" in err
    assert "Traceback" not in err and not (tmp_path / "out" / "base2new").exists()


def test_dassl_teacher_of_other_classes_is_refused(world, tmp_path, wide_backbone):
    (tmp_path / "teachers" / "counts").mkdir(parents=True)
    save_dassl(tmp_path / "teachers" / "counts" / "model-best.pth.tar", ivlp_teacher_state(wide_backbone, n_cls=5))
    with pytest.raises(ProtocolError, match="trained on 5 classes, not counts's 12 base classes"):
        run_protocol(_spec(world, tmp_path / "out", teacher=str(tmp_path / "teachers")))
    assert not (tmp_path / "out" / "base2new").exists()


def test_teacher_of_another_backbone_is_refused(world, tmp_path, tiny_backbone):
    from promptkd.data.datasets import resolve_dataset
    from promptkd.data.sampling import subsample_classes
    from promptkd.methods import get_method
    from promptkd.methods.base import config_from

    base = subsample_classes(resolve_dataset("counts", str(world)), "base").classnames
    cls = get_method("promptsrc")
    method = cls(tiny_backbone, list(base), config_from(cls, {"text_depth": 2, "vision_depth": 2}))
    method.save(tmp_path / "teachers" / "counts" / "prompts")
    with pytest.raises(ProtocolError, match="trained on backbone pkd-tiny, not pkd-tiny-wide"):
        run_protocol(_spec(world, tmp_path / "out", teacher=str(tmp_path / "teachers")))


def test_student_preset_that_cannot_take_the_student_is_refused(world, tmp_path):
    with pytest.raises(ProtocolError, match="student preset cannot take.*vision_depth=3"):
        run_protocol(_spec(world, tmp_path, overrides=FAST))  # the world preset prompts 3 blocks; pkd-tiny has 2
    assert not (tmp_path / "base2new").exists()


def test_folder_of_another_recipe_is_refused_and_kept(world, tmp_path):
    old = _spec(world, tmp_path, teacher_overrides=[*FAST, "train.lr=0.5"])
    (job,) = kd.plan(old)
    job.folder.mkdir(parents=True)
    (job.folder / kd.RECIPE).write_text(json.dumps(kd.recipe(old, job, None)))
    (job.folder / "teacher").mkdir()
    (job.folder / "teacher" / "prompts.safetensors").write_bytes(b"trained")
    with pytest.raises(ProtocolError, match=r"another recipe.*\n  teacher.trained.train.lr: 0.5 -> 0.02"):
        run_protocol(_spec(world, tmp_path))
    assert (job.folder / "teacher" / "prompts.safetensors").read_bytes() == b"trained"
    (job.folder / kd.RECIPE).unlink()
    with pytest.raises(ProtocolError, match="holds files but no recipe.json"):
        run_protocol(_spec(world, tmp_path))


def test_teacher_options_are_refused_for_other_methods(tmp_path):
    spec = ProtocolSpec("base2new", "coop", "world", ["counts"], [1], str(tmp_path), teacher=str(tmp_path))
    with pytest.raises(ProtocolError, match="--teacher apply to --method promptkd only"):
        run_protocol(spec)


# --- the report ------------------------------------------------------------------------------------------------------
def _result(role, seed, base, new, method="promptsrc"):
    return [
        {
            "dataset": "d",
            "task": "classification",
            "protocol": "base2new",
            "method": method,
            "role": role,
            "seed": seed,
            "subsample": half,
            "metrics": {"acc1": value / 100},
        }
        for half, value in (("base", base), ("new", new))
    ]


def test_summary_gap_closed_and_spread_over_seeds():
    results = [*_result("zeroshot_student", None, 50, 50, "zeroshot")]
    results += _result("teacher", 1, 80, 80) + _result("teacher", 2, 90, 90)
    results += _result("student", 1, 70, 70, "promptkd") + _result("student", 2, 80, 80, "promptkd")
    row = kd.distillation_summary(results)["base2new"]["datasets"]["d"]
    assert row["teacher"]["score"] == pytest.approx(85) and row["student"]["score"] == pytest.approx(75)
    assert row["gap_closed"] == pytest.approx(100 * 25 / 35)
    assert row["gap_closed_std"] == pytest.approx(abs(100 * 20 / 30 - 100 * 30 / 40) / 2)
    assert row["student"]["std"] == pytest.approx(5)
    assert "71%" in kd.distillation_section(kd.distillation_summary(results))


def test_promptkd_has_no_few_shot_protocol_and_inductive_is_base2new_only(world, tmp_path):
    with pytest.raises(ProtocolError, match="promptkd has no few_shot protocol"):
        run_protocol(_spec(world, tmp_path, "few_shot"))
    with pytest.raises(ProtocolError, match="--mode inductive applies to base2new"):
        run_protocol(_spec(world, tmp_path, "cross_dataset", datasets=["shapes"], mode="inductive"))


def test_teacher_folders_are_found_by_any_name_of_the_dataset(tmp_path):
    released = tmp_path / "DescribableTextures" / "VLPromptLearner"
    released.mkdir(parents=True)
    for name in ("model.pth.tar-20", "model-best.pth.tar"):
        (released / name).write_bytes(b"x")
    assert kd.locate_teacher(tmp_path, "dtd", 2) == (released / "model-best.pth.tar", "")
    seeded = tmp_path / "fgvc" / "seed1"
    seeded.mkdir(parents=True)
    (seeded / "a.pth").write_bytes(b"x")
    (seeded / "b.pth").write_bytes(b"x")
    path, why = kd.locate_teacher(tmp_path, "fgvc_aircraft", 1)
    assert path is None and "2 checkpoints (a.pth, b.pth)" in why
    assert kd.locate_teacher(tmp_path, "fgvc_aircraft", 3)[1].startswith("no seed 3")
