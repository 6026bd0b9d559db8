"""Classes added after distillation: the label-free calibration of old against new rows (fitted against the teacher,
stored beside the features, bound to them and to the student, applied by predict) and the short distillation on
unlabelled images. Teacher: a zero-shot pkd-tiny-wide with weights in a file; student: pkd-tiny."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from promptkd.backbones import load_backbone
from promptkd.distill import zero_shot_teacher
from promptkd.distill.extend import (
    Calibration,
    CalibrationError,
    added_share,
    calibrate,
    calibration_path,
    fit_affine,
    one_sided_warning,
    row_groups,
    student_sha256,
)
from promptkd.methods.promptkd import PromptKD, PromptKDConfig

BASE = ["red star", "blue ring", "green cross"]
NEW = ["yellow moon", "purple square"]


@pytest.fixture(scope="module")
def setup(wide_backbone, tiny_backbone, tmp_path_factory):
    """A teacher (weights in a file), base features, a student checkpoint on the base classes, features extended
    with NEW, and a folder of unlabelled images (flat: no class anywhere in the paths)."""
    root = tmp_path_factory.mktemp("extend")
    teacher_weights, student_weights = root / "wide.safetensors", root / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in wide_backbone.model.state_dict().items()}, str(teacher_weights))
    save_file({k: v.contiguous() for k, v in tiny_backbone.model.state_dict().items()}, str(student_weights))
    teacher = zero_shot_teacher(load_backbone("pkd-tiny-wide", str(teacher_weights)).freeze())
    base = teacher.compute_features(BASE)
    base.save(root / "run" / "teacher_features")
    torch.manual_seed(0)
    student = PromptKD(
        load_backbone("pkd-tiny", str(student_weights)), BASE, PromptKDConfig(vision_depth=2), features=base
    )
    checkpoint = student.save(root / "run" / "prompts")
    base.extend(teacher, NEW).save(root / "extended" / "teacher_features")
    images = root / "images"
    images.mkdir()
    for i in range(6):
        pixels = (np.random.default_rng(i).random((32, 32, 3)) * 255).astype("uint8")
        Image.fromarray(pixels).save(images / f"{i:02d}.png")
    return {
        "root": root,
        "teacher": teacher,
        "teacher_weights": str(teacher_weights),
        "checkpoint": checkpoint,
        "extended": root / "extended" / "teacher_features.safetensors",
        "images": sorted(str(p) for p in images.iterdir()),
        "folder": images,
    }


def extended_student(setup):
    from promptkd.deploy import load_for_inference

    return load_for_inference(setup["checkpoint"], setup["extended"])


def test_calibration_fits_the_teacher_without_labels_and_round_trips(setup, tmp_path):
    student = extended_student(setup)
    assert student.classnames == BASE + NEW and row_groups(student.stored) == [(0, 3), (3, 5)]
    calibration = calibrate(student, setup["teacher"], setup["images"], images="images")
    again = calibrate(student, setup["teacher"], setup["images"], images="images")
    assert calibration.scale == again.scale and calibration.bias == again.bias  # deterministic
    assert calibration.bias[0] == 0.0 and len(calibration.scale) == 2
    assert calibration.fitted["images"] == 6 and "no labels" in calibration.fitted["objective"]
    # label-free: the same images filed under (wrong) class folders give the same calibration
    filed = []
    for k, path in enumerate(setup["images"]):
        target = tmp_path / (BASE + NEW)[k % 5] / f"{k}.png"
        target.parent.mkdir(exist_ok=True)
        target.write_bytes(Path(path).read_bytes())
        filed.append(str(target))
    relabelled = calibrate(student, setup["teacher"], filed)
    assert relabelled.scale == pytest.approx(calibration.scale) and relabelled.bias == pytest.approx(calibration.bias)
    saved = Calibration.load(calibration.save(tmp_path / "c.calibration.json"))
    assert saved.groups == calibration.groups and saved.scale == calibration.scale and saved.bias == calibration.bias
    with pytest.raises(CalibrationError, match="extend the features first"):
        base_student = extended_student({**setup, "extended": setup["root"] / "run" / "teacher_features"})
        calibrate(base_student, setup["teacher"], setup["images"])
    # the fit lowers the KL to the teacher (what it minimises) on logits whose new rows run low
    torch.manual_seed(0)
    teacher = torch.randn(64, 5) * 3
    student = teacher.clone()
    student[:, 3:] = 0.5 * student[:, 3:] - 4.0
    scale, bias = fit_affine(student, teacher, [(0, 3), (3, 5)])
    assert scale[1] == pytest.approx(2.0, rel=1e-3) and bias[1] == pytest.approx(8.0, rel=1e-3)
    # images the teacher puts almost all in the added rows (new classes only) are flagged, a mix is not
    groups = [(0, 3), (3, 6)]
    only_new = torch.nn.functional.one_hot(torch.tensor([3, 4, 5, 3, 4, 5, 3, 0]), 6).float()
    mixed = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 3, 4, 5, 3, 0]), 6).float()
    assert added_share(only_new, groups) == 7 / 8 and "new classes only" in one_sided_warning(7 / 8, groups)
    assert one_sided_warning(added_share(mixed, groups), groups) is None


def test_predict_applies_the_stored_calibration_and_refuses_a_foreign_one(setup):
    from promptkd.deploy import load_for_inference, predict

    student = extended_student(setup)
    path = calibration_path(setup["extended"])
    plain, _ = predict(student, setup["images"], top_k=1, progress=False)
    fitted = calibrate(student, setup["teacher"], setup["images"])
    pushed = Calibration(fitted.groups, [1.0, 1.0], [0.0, -50.0], fitted.features_sha256,
                         fitted.classnames_sha256, fitted.student_sha256)  # fmt: skip
    pushed.save(path)
    try:
        reloaded = load_for_inference(setup["checkpoint"], setup["extended"])
        calibrated, _ = predict(reloaded, setup["images"], top_k=1, progress=False)
        assert all(p.classes[0] in BASE for p in calibrated)  # the -50 bias on the new rows reached predict
        assert any(p.classes[0] in NEW for p in plain)
        Calibration(pushed.groups, pushed.scale, pushed.bias, pushed.features_sha256, pushed.classnames_sha256,
                    "0" * 64).save(path)  # fmt: skip
        with pytest.raises(CalibrationError, match="another student"):
            predict(reloaded, setup["images"], progress=False)
        Calibration(pushed.groups, pushed.scale, pushed.bias, "0" * 64, pushed.classnames_sha256,
                    student_sha256(reloaded)).save(path)  # fmt: skip
        with pytest.raises(CalibrationError, match="other class features"):
            predict(reloaded, setup["images"], progress=False)
    finally:
        path.unlink()


def test_export_folds_the_stored_calibration_in(setup, tmp_path):
    """An exported student predicts as `promptkd predict` does: the calibration of the added rows is in the model."""
    from promptkd.deploy import ExportedStudent, export_student, load_for_inference

    path = calibration_path(setup["extended"])
    student = extended_student(setup)
    fitted = calibrate(student, setup["teacher"], setup["images"])
    Calibration(fitted.groups, [1.0, 2.0], [0.0, -3.0], fitted.features_sha256, fitted.classnames_sha256,
                fitted.student_sha256).save(path)  # fmt: skip
    try:
        manifest = export_student(setup["checkpoint"], tmp_path / "export", setup["extended"])
        assert manifest["calibration"] == "folded into the logits"
        exported = ExportedStudent(tmp_path / "export")
        reloaded = load_for_inference(setup["checkpoint"], setup["extended"])
        images = torch.randn(3, 3, reloaded.backbone.image_size, reloaded.backbone.image_size)
        with torch.no_grad():
            raw = reloaded.logits(images)
        expected = torch.cat([raw[:, :3], raw[:, 3:] * 2.0 - 3.0], dim=1)
        torch.testing.assert_close(exported.logits(images), expected, atol=1e-4, rtol=1e-4)
    finally:
        path.unlink()


@pytest.mark.slow
def test_cli_extend_calibrates_and_distils_briefly(setup, tmp_path):
    """features extend --student --images writes the calibration predict uses; with --distill-epochs a new student
    (scoring every name, with its features copy and calibration) is written to --student-out."""
    from promptkd.cli.main import main as cli
    from promptkd.deploy import load_for_inference

    (tmp_path / "new.txt").write_text("\n".join(NEW) + "\n")
    teacher = ["--teacher-model", "pkd-tiny-wide", "--teacher-pretrained", setup["teacher_weights"]]
    base = str(setup["root"] / "run" / "teacher_features")
    common = ["features", "extend", base, *teacher, "--classes", str(tmp_path / "new.txt")]
    student = ["--student", str(setup["checkpoint"]), "--images", str(setup["folder"])]
    assert cli([*common, "--out", str(tmp_path / "x"), "--student", str(setup["checkpoint"])]) == 2
    assert not (tmp_path / "x.safetensors").exists()  # refused before anything was written
    assert cli([*common, "--out", str(tmp_path / "ext" / "teacher_features"), *student]) == 0
    calibration = tmp_path / "ext" / "teacher_features.calibration.json"
    first = Calibration.load(calibration)
    calibration.unlink()
    assert cli(["features", "calibrate", str(tmp_path / "ext" / "teacher_features"), *teacher, *student]) == 0
    assert Calibration.load(calibration).scale == first.scale  # the same fit, by the calibrate action
    out = tmp_path / "predictions.csv"
    argv = [
        "predict",
        str(setup["checkpoint"]),
        str(setup["folder"]),
        "--features",
        str(tmp_path / "ext" / "teacher_features"),
    ]
    assert cli([*argv, "--out", str(out)]) == 0
    assert (
        cli(
            [
                *common,
                "--out",
                str(tmp_path / "b" / "teacher_features"),
                *student,
                "--distill-epochs",
                "1",
                "--student-out",
                str(tmp_path / "brief"),
            ]
        )
        == 0
    )
    brief = load_for_inference(tmp_path / "brief" / "prompts")
    assert brief.classnames == BASE + NEW and (tmp_path / "brief" / "teacher_features.calibration.json").is_file()
    before = load_for_inference(setup["checkpoint"], tmp_path / "ext" / "teacher_features")
    pairs = zip(brief.learner.state_dict().values(), before.learner.state_dict().values())
    assert any(not torch.equal(a, b) for a, b in pairs)  # it trained
