"""predict and export: a distilled student predicts from its checkpoint and stored features alone, and its
TorchScript export gives the same predictions."""

from __future__ import annotations

import argparse
import csv
import json
import shutil

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


# --- issue 21: int8 export, ONNX engine, streamed predictions ------------------------------------------------------
def _main(argv: list[str]) -> tuple[int, str]:
    """The CLI as a user runs it: exit code and what it printed to stderr (one message for bad input)."""
    import io
    from contextlib import redirect_stderr

    from promptkd.cli.main import main

    err = io.StringIO()
    with redirect_stderr(err):
        code = main(argv)
    return code, err.getvalue()


@pytest.fixture(scope="module")
def onnx_exports(student_run, tmp_path_factory):
    """The fixture student exported twice: fp32 ONNX, and int8 calibrated on the toy images (the tiny random
    student's int8 agreement is not the point here: its threshold is set low)."""
    ckpt = student_run / "run" / "prompts.safetensors"
    root = tmp_path_factory.mktemp("exports")
    export_student(ckpt, root / "fp32", fmt="onnx")
    manifest = export_student(
        ckpt,
        root / "int8",
        fmt="onnx",
        quantize="int8",
        calibration=str(student_run / "toy" / "images"),
        calibration_count=4,
        min_agreement=1e-6,
    )
    return root, manifest


def test_int8_export_is_checked_against_fp32_and_records_it(onnx_exports, student_run):
    import onnx

    root, manifest = onnx_exports
    stored = json.loads((root / "int8" / "export.json").read_text())
    assert stored == json.loads(json.dumps(manifest)) and stored["model_file"] == "student.int8.onnx"
    assert sorted(p.name for p in (root / "int8").iterdir()) == ["classnames.json", "export.json", "student.int8.onnx"]
    quant = stored["quantization"]
    assert quant["calibration"]["images"] == 4 and len(quant["calibration"]["sha256"]) == 64
    assert quant["check"]["images"] == 16 and 0 <= quant["check"]["top1_agreement"] <= 1
    ops = {node.op_type for node in onnx.load(str(root / "int8" / "student.int8.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # int8 weights and activations, not an fp32 copy


def test_onnx_export_writes_attention_batch_first(onnx_exports):
    """The exported graph holds the attention as promptkd writes it for export (per block: the QKV permute, the key
    transpose, the transpose back; nn.MultiheadAttention's own export has 8): those layout shuffles were a third of
    ONNX Runtime's time on the world student."""
    import onnx

    root, _ = onnx_exports
    nodes = onnx.load(str(root / "fp32" / "student.onnx")).graph.node
    attention = [n for n in nodes if "/attn/" in n.name]
    blocks = {n.name.split("/attn/")[0] for n in attention}
    transposes = sum(n.op_type == "Transpose" for n in attention)
    assert blocks and transposes <= 3 * len(blocks)


def test_int8_check_scores_hm_and_accuracy_where_labels_and_split_are_known():
    from promptkd.deploy import CheckImages, _int8_check

    fp32 = torch.eye(4)[[0, 1, 2, 3, 0, 1]] * 5  # right on every image
    int8 = fp32.clone()
    int8[2] = torch.tensor([0.0, 0.0, 0.0, 6.0])  # a novel image (class 2) taken for class 3
    images = CheckImages("toy", [], ["x"] * 6, labels=[0, 1, 2, 3, 0, 1], base=[0, 1])
    check = _int8_check(fp32, int8, images)
    assert check["top1_agreement"] == pytest.approx(5 / 6)
    assert check["accuracy_fp32"] == 1 and check["accuracy_difference"] == pytest.approx(-1 / 6)
    assert check["hm_fp32"] == 1 and check["hm_int8"] == pytest.approx(2 * 1 * 0.5 / 1.5)  # novel half 1 of 2
    unlabelled = _int8_check(fp32, int8, CheckImages("folder", [], ["x"] * 6))
    assert set(unlabelled) == {"images", "top1_agreement"}


def test_int8_below_min_agreement_is_refused_and_writes_nothing(onnx_exports, student_run, tmp_path, monkeypatch):
    import promptkd.deploy as deploy

    ckpt = str(student_run / "run" / "prompts.safetensors")
    out = tmp_path / "export"
    shutil.copytree(onnx_exports[0] / "fp32", out)  # a previous export, which a refused one must leave whole
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    original = deploy.int8_logits
    monkeypatch.setattr(deploy, "int8_logits", lambda model, images: -original(model, images))  # disagrees
    argv = ["export", ckpt, "--out", str(out), "--quantize", "int8", "--calibration", str(student_run / "toy")]
    code, err = _main([*argv, "--calibration-count", "4"])
    assert code == 2 and "agrees with the fp32 student on" in err and "below --min-agreement 0.99" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the previous export whole, no staging left
    assert not list(tmp_path.glob(".export.*"))
    code, err = _main([*argv, "--min-agreement", "0"])
    assert code == 2 and "--min-agreement" in err and "above 0 and at most 1" in err


def test_predict_onnx_engine_streams_the_same_predictions_as_torch(onnx_exports, student_run, tmp_path, monkeypatch):
    import promptkd.deploy as deploy

    root, _ = onnx_exports
    ckpt, folder = str(student_run / "run" / "prompts.safetensors"), str(student_run / "toy" / "images")
    writes = []
    write = deploy.PredictionsCSV.write
    monkeypatch.setattr(
        deploy.PredictionsCSV, "write", lambda self, rows: writes.append(len(rows)) or write(self, rows)
    )
    common = [folder, "--top-k", "2", "--batch-size", "5", "--workers", "2", "--no-progress"]
    assert _main(["predict", str(root / "fp32"), "--engine", "onnx", *common, "--out", str(tmp_path / "o.csv")])[0] == 0
    assert writes == [5, 5, 5, 5, 4]  # row batch by row batch, in input order, never the whole list at once
    in_process = [*common[:-2], "0", "--no-progress"]  # the same rows whether decoded in workers or not
    assert _main(["predict", ckpt, *in_process, "--out", str(tmp_path / "t.csv")])[0] == 0
    onnx_rows, torch_rows = (list(csv.reader((tmp_path / n).open())) for n in ("o.csv", "t.csv"))
    assert [r[:3] for r in onnx_rows] == [r[:3] for r in torch_rows] and len(onnx_rows) == 25
    assert [r[0] for r in onnx_rows[1:]] == image_paths([folder])
    assert max(abs(float(a[3]) - float(b[3])) for a, b in zip(onnx_rows[1:], torch_rows[1:])) < 1e-4
    assert (
        _main(["predict", str(root / "int8"), "--engine", "onnx", *in_process, "--out", str(tmp_path / "q.csv")])[0]
        == 0
    )
    assert len(list(csv.reader((tmp_path / "q.csv").open()))) == 25


def test_onnx_threads_sleep_only_beside_decoding_workers(onnx_exports):
    """With decoders in other processes, ONNX Runtime's spinning threads would take their cores; alone, they may."""
    import argparse

    from promptkd.cli.predict import _predictor

    root, _ = onnx_exports
    key = "session.intra_op.allow_spinning"
    for workers in (2, 0):
        args = argparse.Namespace(engine="onnx", features=None, checkpoint=str(root / "fp32"), workers=workers)
        options = _predictor(args).session.get_session_options()
        if workers:
            assert options.get_session_config_entry(key) == "0"
        else:
            with pytest.raises(Exception, match=key):  # ONNX Runtime's default: spinning allowed
                options.get_session_config_entry(key)


def test_predict_bad_input_is_one_message(onnx_exports, student_run, tmp_path):
    root, _ = onnx_exports
    images = tmp_path / "images"
    images.mkdir()
    for i, path in enumerate(image_paths([student_run / "toy" / "images"])[:3]):
        shutil.copy(path, images / f"{i}.png")
    (images / "1b.png").write_bytes(b"not a png")
    out = tmp_path / "p.csv"
    argv = ["predict", str(root / "fp32"), str(images), "--engine", "onnx", "--batch-size", "2", "--out", str(out)]
    code, err = _main([*argv, "--workers", "2", "--no-progress"])
    assert code == 2 and "1b.png: cannot decode this image" in err and "--skip-bad" in err
    assert "Traceback" not in err and not out.exists()  # nothing half-written
    assert _main([*argv, "--workers", "0", "--skip-bad", "--no-progress"])[0] == 0
    assert [r[0] for r in csv.reader(out.open())][1:] == [str(images / f"{i}.png") for i in range(3)]
    code, err = _main(["predict", str(images), str(images), "--engine", "onnx", "--out", str(out)])
    assert code == 2 and "not an export folder (no export.json)" in err
    code, err = _main(["predict", str(root / "fp32"), str(images), "--out", str(out)])
    assert code == 2 and "is an export folder; run it with --engine onnx" in err
