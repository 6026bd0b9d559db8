"""`promptkd report --html` and the demo's demo.html: one self-contained page (no network), every string escaped.

The runs here are fixture files (result JSONs, training logs, a predictions CSV over a few tiny PNGs): no model is
built, so the page is tested in well under a second. tests/test_html_browser.py loads the same page in Chromium.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from PIL import Image

from promptkd.cli.main import main

HOSTILE = '<img src=x onerror="alert(1)">'  # a class name that must reach the page as text


def make_runs(root: Path) -> Path:
    """Two runs of a base-to-novel experiment with training logs and speed, and a predictions CSV over 6 images."""
    from promptkd.html_report import ImagePrediction, write_predictions
    from promptkd.results import make_result, write_result

    runs = root / "runs"
    for method, accs, speed in (("coop", (0.8, 0.5), 900.0), ("promptkd", (0.85, 0.7), 3600.0)):
        out = runs / "shapes" / method
        for half, acc in zip(("base", "new"), accs):
            result = make_result(
                dataset="shapes",
                task="classification",
                metrics={"acc1": acc},
                method=method,
                model="pkd-world-student",
                subsample=half,
                seed=1,
                num_shots=16,
                extra={"images_per_second": speed},
            )
            write_result(result, out)
        steps = [
            {"epoch": 1 + s // 5, "step": s % 5 + 1, "global_step": s + 1, "loss": 2.0 / (s + 1)} for s in range(10)
        ]
        (out / "metrics.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps) + '{"cut', encoding="utf-8")
        epochs = [{"epoch": e, "loss": 1.0 / e, "val_acc1": 0.4 + 0.1 * e} for e in (1, 2)]
        (out / "epochs.jsonl").write_text("".join(json.dumps(e) + "\n" for e in epochs), encoding="utf-8")
    images = root / "images"
    images.mkdir()
    classes = ["red circle", r"blue $\q{ square$", HOSTILE]  # matplotlib would read $...$ as maths, and fail
    records = []
    for i in range(6):
        path = images / f"{i}.png"
        Image.new("RGB", (24, 24), (40 * i, 200 - 30 * i, 90)).save(path)
        label = classes[i % 3]
        prediction = label if i < 4 else classes[(i + 1) % 3]
        reference = label if i != 2 else classes[0]
        records.append(ImagePrediction(str(path), label, prediction, 0.5 + 0.05 * i, reference))
    write_predictions(records, runs / "shapes" / "test-predictions.csv")  # where the demo writes it
    return runs


def build_report_page(tmp_path: Path) -> Path:
    runs = make_runs(tmp_path)
    page = tmp_path / "page" / "report.html"
    assert main(["report", str(runs), "--html", str(page)]) == 0
    return page


def test_report_html_holds_every_part_inline_and_escaped(tmp_path, capsys):
    page = build_report_page(tmp_path)
    assert f"wrote {page}" in capsys.readouterr().out
    text = page.read_text(encoding="utf-8")
    for heading in ("Results", "Chart: base2new", "Accuracy vs speed", "Training curves", "Confusion matrix"):
        assert f"<h2>{heading}" in text, heading
    assert "<td>shapes</td>" in text and "disagrees with the teacher: 3 of 6 images" in text
    assert "right: 4 of 6 images" in text and "wrong: 2 of 6 images" in text
    sources = re.findall(r'<img [^>]*src="([^"]*)"', text)
    assert len(sources) >= 5 + 6 and all(s.startswith("data:image/png;base64,") for s in sources)  # charts + cards
    assert HOSTILE not in text and "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in text
    assert "<script" not in text and not re.search(r"(src|href)=\"(https?:|//|file:)", text)
    assert "default-src &#x27;none&#x27;" in text  # the browser itself refuses anything from outside the page


def test_report_html_without_predictions_or_speed_says_what_is_missing(tmp_path):
    from promptkd.results import make_result, write_result

    write_result(
        make_result(dataset="pets", task="zeroshot_classification", metrics={"acc1": 0.5}, method="zs"), tmp_path
    )
    page = tmp_path / "r.html"
    assert main(["report", str(tmp_path), "--no-plot", "--html", str(page)]) == 0
    text = page.read_text(encoding="utf-8")
    assert "<td>pets</td>" in text and "no per-image predictions" in text
    assert "Accuracy vs speed" not in text and "Training curves" not in text and "<img" not in text
    (tmp_path / "predictions.csv").write_text("path,class_1,index_1,score_1\na.png,cat,0,0.9\n")  # `predict`'s
    assert main(["report", str(tmp_path), "--no-plot", "--html", str(page)]) == 0
    text = page.read_text(encoding="utf-8")
    assert "predictions.csv: no true labels (needs path, label and prediction columns" in text
    rows = [{"method": "PromptKD student", "dataset": "pets", "hm": 70.0, "images_per_second": 900.0}]
    (tmp_path / "results.json").write_text(json.dumps(rows))  # the demo's table: each model's HM and speed
    assert main(["report", str(tmp_path), "--no-plot", "--html", str(page)]) == 0
    assert "<h2>Accuracy vs speed</h2>" in page.read_text(encoding="utf-8")


def test_report_html_into_a_folder_is_refused(tmp_path, capsys):
    make_runs(tmp_path)
    assert main(["report", str(tmp_path / "runs"), "--html", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--html" in err and "is a folder; give a file name" in err


def test_demo_writes_demo_html_beside_its_outputs(tmp_path):
    from promptkd.cli import demo

    runs = make_runs(tmp_path)
    out = runs  # the demo's --out: results.json, charts and <dataset>/<stage> folders
    rows = [
        {"method": m, "model": "pkd-world-student", "dataset": "shapes", "base": b, "novel": n, "hm": h, "all": a}
        | {"seconds": None, "images_per_second": s}
        for m, b, n, h, a, s in (
            ("PromptSRC teacher", 90, 70, 78.8, 75, 800),
            ("PromptKD student", 85, 68, 75.6, 70, 3600),
        )
    ]
    demo._bar_chart(rows, out / "demo.png")
    demo._speed_chart(rows, out / "demo_speed.png")
    page = demo.write_page(rows, out)
    assert page == out / "demo.html"
    text = page.read_text(encoding="utf-8")
    assert "<td>PromptKD student</td>" in text and "<td>3600</td>" in text
    for heading in ("Accuracy per method", "Accuracy vs speed", "Training curves", "Confusion matrix: shapes"):
        assert f"<h2>{heading}" in text, heading
    assert HOSTILE not in text and text.count('src="data:image/png;base64,') >= 4 + 6
