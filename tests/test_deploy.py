"""predict and export: a distilled student predicts from its checkpoint and stored features alone, and its
TorchScript export gives the same predictions."""

from __future__ import annotations

import argparse
import csv
import json

import pytest
import torch
from safetensors.torch import save_file

from promptkd.deploy import DeployError, ExportedStudent, export_student, image_paths, load_for_inference, predict
from test_promptkd import CLASSES, _write_split_folder, teacher_backbone, teacher_ckpt  # noqa: F401


def _run(module, argv):
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return module.run(parser.parse_args(argv))


@pytest.fixture(scope="module")
def student_run(teacher_ckpt, tiny_backbone, tmp_path_factory):  # noqa: F811
    from promptkd.cli import distill

    root = tmp_path_factory.mktemp("deploy")
    weights = root / "student.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_backbone.model.state_dict().items()}, str(weights))
    _write_split_folder(root / "toy")
    argv = [
        "--teacher",
        str(teacher_ckpt),
        "--student-model",
        "pkd-tiny",
        "--student-pretrained",
        str(weights),
        "--dataset",
        str(root / "toy"),
        "--out",
        str(root / "run"),
        "--no-eval",
        "--set",
        "train.epochs=1",
        "train.batch_size=4",
        "train.progress=false",
        "method.vision_depth=2",
    ]
    assert _run(distill, argv) == 0
    return root


def test_predict_writes_top_k_csv_from_student_alone(student_run, tmp_path):
    from promptkd.cli import predict as predict_cli

    out = tmp_path / "pred.csv"
    folder = student_run / "toy" / "images"
    assert (
        _run(
            predict_cli,
            [
                str(student_run / "run" / "prompts.safetensors"),
                str(folder),
                "--top-k",
                "3",
                "--out",
                str(out),
                "--no-progress",
            ],
        )
        == 0
    )
    rows = list(csv.reader(out.open()))
    header = ["path"] + [f"{kind}_{r}" for r in (1, 2, 3) for kind in ("class", "index", "score")]
    assert rows[0] == header
    assert len(rows) - 1 == len(image_paths([folder]))
    scores = [float(rows[1][i]) for i in (3, 6, 9)]
    assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
    assert {rows[1][1], rows[1][4], rows[1][7]} <= set(CLASSES)
    assert all(CLASSES[int(rows[1][i + 1])] == rows[1][i] for i in (1, 4, 7))  # each name with its row
    method = load_for_inference(student_run / "run" / "prompts.safetensors")
    assert method.teacher is None
    predictions, _ = predict(method, [rows[1][0]], top_k=1, progress=False)
    assert predictions[0].classes[0] == rows[1][1]


def test_predict_tells_repeated_class_names_apart(student_run, tmp_path, capsys):
    """A list that repeats a name (ImageNet's two 'missile' rows): the CSV carries each class's row and the printed
    table says '[#row]' for the repeated name, so the two can be told apart (issue 18, item 9)."""
    import csv

    from promptkd.deploy import write_predictions_csv

    method = load_for_inference(student_run / "run" / "prompts.safetensors")
    method.classnames = [CLASSES[0], *CLASSES[:-1]]  # row 1 repeats row 0's name; same number of rows
    images = image_paths([student_run / "toy" / "images"])
    predictions, _ = predict(method, images, top_k=len(CLASSES), progress=False)
    first = predictions[0]
    ranks = [r for r, name in enumerate(first.classes) if name == CLASSES[0]]
    assert len(ranks) == 2 and {first.indices[r] for r in ranks} == {0, 1}
    assert {first.label(r) for r in ranks} == {f"{CLASSES[0]} [#0]", f"{CLASSES[0]} [#1]"}
    other = next(r for r, name in enumerate(first.classes) if name != CLASSES[0])
    assert first.label(other) == first.classes[other]  # names used once stay bare
    rows = list(csv.reader(write_predictions_csv(predictions, tmp_path / "p.csv").open()))
    assert sorted(int(rows[1][3 * r + 2]) for r in ranks) == [0, 1]


def test_export_round_trip_gives_same_predictions(student_run, tmp_path):
    ckpt = student_run / "run" / "prompts.safetensors"
    images = image_paths([student_run / "toy" / "images"])
    manifest = export_student(ckpt, tmp_path / "export", check_images=images)
    assert manifest["check"]["same_top1"] and manifest["check"]["max_abs_logit_diff"] < 1e-4
    exported = ExportedStudent(tmp_path / "export")
    assert exported.classnames == CLASSES
    method = load_for_inference(ckpt)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(exported.logits(x), method.logits(x), atol=1e-4)
    assert json.loads((tmp_path / "export" / "export.json").read_text())["input"]["shape"] == [None, 3, 32, 32]


def test_bad_inputs(student_run, tmp_path, teacher_ckpt):  # noqa: F811
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(DeployError, match="not an image, a folder of images or a .txt list"):
        image_paths([tmp_path / "notes.md"])
    with pytest.raises(DeployError, match="export is for promptkd students"):
        export_student(teacher_ckpt, tmp_path / "e")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    method = load_for_inference(student_run / "run" / "prompts.safetensors")
    with pytest.raises(Exception, match="bad.png"):
        predict(method, [str(bad)], progress=False)
    predictions, skipped = predict(
        method, [str(bad), *image_paths([student_run / "toy" / "images"])[:2]], skip_bad=True, progress=False
    )
    assert len(predictions) == 2 and skipped == [str(bad)]
