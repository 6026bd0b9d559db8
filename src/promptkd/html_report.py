"""One self-contained HTML page of results: tables, charts, training curves, a confusion matrix and an image gallery.

Why one file with nothing outside it: a report is mailed, attached to an issue or opened on a laptop offline, and
must look the same there. Every picture is a base64 PNG data URI, the CSS is inline, there is no script, and the
page's Content-Security-Policy forbids any other source, so a stray external reference fails loudly in a browser
(the browser test reads its console) instead of working on one machine only. Every string from a result, a log or
a CSV goes through :func:`esc` before it reaches the page.

Inputs are what runs already write: result JSONs (:mod:`promptkd.results`), the engine's ``metrics.jsonl`` /
``epochs.jsonl`` (training curves), and per-image predictions CSVs with ``path``, ``label`` and ``prediction``
columns (optionally ``probability`` and a reference model's ``teacher_prediction``, or TTA's ``base_prediction``):
the demo writes ``test-predictions.csv`` for its distilled student and teacher; ``promptkd tta`` writes its own.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from promptkd.checkpoints import atomic_path

__all__ = [
    "PREDICTIONS_FILE",
    "ImagePrediction",
    "Page",
    "curves_png",
    "esc",
    "find_predictions",
    "img_html",
    "markdown_html",
    "prediction_sections",
    "read_curves",
    "read_predictions",
    "report_page",
    "speed_png",
    "speed_points",
    "table_html",
    "write_predictions",
]

#: the file name the demo writes its per-image test predictions to (any ``*predictions.csv`` is read)
PREDICTIONS_FILE = "test-predictions.csv"
#: reference columns a predictions CSV may hold, with what the gallery calls that model
REFERENCES = {"teacher_prediction": "teacher", "base_prediction": "model before adaptation"}
GALLERY_PER_KIND = 8
MAX_CURVE_RUNS = 12
MAX_PREDICTION_FILES = 3
THUMBNAIL_PX = 96

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:2em auto;max-width:1200px;color:#222;
 padding:0 1em;line-height:1.4}
h1{border-bottom:2px solid #4a7;padding-bottom:.2em}h2{margin-top:1.6em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}th,td{border:1px solid #ccc;padding:.25em .6em;
 text-align:right}th{background:#eef3ee}td:first-child,th:first-child{text-align:left}
img.chart{max-width:100%;height:auto;border:1px solid #ddd;margin:.4em 0}
.gallery{display:flex;flex-wrap:wrap;gap:.6em}.card{border:1px solid #ccc;border-radius:4px;padding:.3em;
 width:128px;font-size:.72em;background:#fafafa}.card img{width:96px;height:96px;image-rendering:pixelated;
 display:block;margin:0 auto .2em}.right{border-color:#4a7}.wrong{border-color:#c44}.note{color:#666}
.path{color:#888;word-break:break-all}
"""
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def esc(value: Any) -> str:
    """Text made safe for HTML (element content and quoted attributes alike)."""
    return html.escape(str(value), quote=True)


@dataclass
class Page:
    """A titled page of sections (heading, HTML body); bodies are built by the helpers here, already escaped."""

    title: str
    intro: str = ""
    sections: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def add(self, heading: str, body: str) -> None:
        self.sections.append((heading, body))

    def render(self) -> str:
        parts = [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f'<meta http-equiv="Content-Security-Policy" content="{esc(_CSP)}">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            '<link rel="icon" href="data:,">',  # no favicon request
            f"<title>{esc(self.title)}</title><style>{_CSS}</style></head><body>",
            f"<h1>{esc(self.title)}</h1>",
        ]
        if self.intro:
            parts.append(f"<p>{esc(self.intro)}</p>")
        for heading, body in self.sections:
            parts.append(f"<section><h2>{esc(heading)}</h2>\n{body}\n</section>")
        if self.warnings:
            items = "".join(f"<li>{esc(w)}</li>" for w in self.warnings)
            parts.append(f"<section><h2>Notes</h2><ul>{items}</ul></section>")
        parts.append("</body></html>")
        return "\n".join(parts) + "\n"

    def write(self, path: str | Path) -> Path:
        """Write the page atomically (UTF-8)."""
        path = Path(path)
        with atomic_path(path) as tmp:
            tmp.write_text(self.render(), encoding="utf-8")
        return path


# ---------------------------------------------------------------------------------------------------------------
# Building blocks


def table_html(headers: Sequence[Any], rows: Iterable[Sequence[Any]]) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _inline(text: str) -> str:
    """Escaped text with Markdown's **bold** and `code` (applied after escaping, so nothing else turns into tags)."""
    out = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", esc(text))
    return re.sub(r"`(.+?)`", r"<code>\1</code>", out)


def _md_table(lines: list[str]) -> str:
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines]
    body = [row for row in cells[1:] if not all(set(c) <= set("-: ") for c in row)]  # the |---| separator
    head = "".join(f"<th>{_inline(c)}</th>" for c in cells[0])
    rows = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in body)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def markdown_html(text: str) -> str:
    """The Markdown the reports print (headings, tables, lists, paragraphs) as HTML: the page shows the very tables
    of ``report.md``, so the two never disagree. Image lines are dropped (the page inlines its charts itself)."""
    out: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].rstrip()
        if line.startswith("|"):
            j = i
            while j < len(lines) and lines[j].startswith("|"):
                j += 1
            out.append(_md_table(lines[i:j]))
            i = j
            continue
        if line.startswith("- "):
            j = i
            while j < len(lines) and lines[j].startswith("- "):
                j += 1
            out.append("<ul>" + "".join(f"<li>{_inline(x[2:])}</li>" for x in lines[i:j]) + "</ul>")
            i = j
            continue
        heading = re.match(r"(#{1,4})\s+(.*)", line)
        if heading:
            level = min(6, len(heading.group(1)) + 2)  # the page's own h1/h2 sit above
            out.append(f"<h{level}>{_inline(heading.group(2))}</h{level}>")
        elif line and not line.startswith("!["):
            out.append(f"<p>{_inline(line)}</p>")
        i += 1
    return "\n".join(out)


def img_html(png: bytes, alt: str, css_class: str = "chart") -> str:
    """An ``<img>`` holding the PNG itself (a data URI)."""
    data = base64.b64encode(png).decode("ascii")
    return f'<img class="{esc(css_class)}" alt="{esc(alt)}" src="data:image/png;base64,{data}">'


def _mpl(text: Any) -> str:
    """Text as matplotlib draws it literally (a ``$`` in a class or run name would start mathtext and may fail)."""
    return str(text).replace("$", r"\$")


def _figure_png(fig: Any, dpi: int = 100) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def _thumbnail(path: Path) -> bytes | None:
    """A small PNG of an image file (None if it cannot be read: the gallery then says so instead of a broken img)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            return buffer.getvalue()
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------------------------
# Training curves


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut by an interrupted run
        if isinstance(record, dict):
            records.append(record)
    return records


def _label(folder: Path, root: Path) -> str:
    try:
        rel = folder.resolve().relative_to(root.resolve())
        return str(rel) if str(rel) != "." else folder.resolve().name
    except ValueError:
        return str(folder)


def read_curves(paths: Iterable[str | Path]) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Per training run folder under ``paths`` (labelled by its path under the folder given): its logged steps
    (``metrics.jsonl``) and epochs (``epochs.jsonl``)."""
    curves: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for entry in map(Path, paths):
        if not entry.is_dir():
            continue
        for log in sorted(entry.rglob("metrics.jsonl")):
            if any(part.startswith(".") for part in log.relative_to(entry).parts):
                continue
            epochs = log.with_name("epochs.jsonl")
            curves[_label(log.parent, entry)] = {
                "steps": _read_jsonl(log),
                "epochs": _read_jsonl(epochs) if epochs.is_file() else [],
            }
    return curves


def curves_png(curves: Mapping[str, Mapping[str, list[dict[str, Any]]]]) -> bytes | None:
    """Training loss per step of each run and, where logged, validation accuracy per epoch."""
    from matplotlib.figure import Figure

    runs = [(name, c) for name, c in curves.items() if any("loss" in r for r in c["steps"])][:MAX_CURVE_RUNS]
    if not runs:
        return None
    with_val = any("val_acc1" in e for _, c in runs for e in c["epochs"])
    fig = Figure(figsize=(11 if with_val else 7, 3.6))
    axes = fig.subplots(1, 2 if with_val else 1, squeeze=False)[0]
    for name, c in runs:
        steps = [r for r in c["steps"] if isinstance(r.get("loss"), (int, float))]
        x = [r.get("global_step", i + 1) for i, r in enumerate(steps)]
        axes[0].plot(x, [r["loss"] for r in steps], label=_mpl(name), linewidth=1.2)
        if with_val:
            val = [e for e in c["epochs"] if isinstance(e.get("val_acc1"), (int, float))]
            axes[1].plot([e["epoch"] for e in val], [100 * e["val_acc1"] for e in val], marker="o", label=_mpl(name))
    axes[0].set(title="training loss", xlabel="step", ylabel="loss")
    if with_val:
        axes[1].set(title="validation accuracy", xlabel="epoch", ylabel="top-1 (%)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return _figure_png(fig)


# ---------------------------------------------------------------------------------------------------------------
# Accuracy against speed


def _speed_of(result: Mapping[str, Any]) -> float | None:
    """Inference images/s a result carries (``images_per_second``, or TTA's ``ms_per_image``), else None."""
    metrics = result.get("metrics") or {}
    for value in (metrics.get("images_per_second"), result.get("images_per_second")):
        if isinstance(value, (int, float)) and value > 0:
            return float(value)
    ms = metrics.get("ms_per_image")
    return 1000.0 / ms if isinstance(ms, (int, float)) and ms > 0 else None


def speed_points(report: Any, results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One point per report row whose results carry a speed: HM for base-to-novel rows, else the headline metric."""
    by_path = {str(r.get("_path", "")): r for r in results}
    points = []
    for row in report.rows:
        speeds = [s for s in (_speed_of(by_path.get(f, {})) for f in row.files) if s is not None]
        keys = report.headline.get(row.protocol, [])
        score = (
            row.hm if row.hm is not None else (row.metrics[keys[0]].mean if keys and keys[0] in row.metrics else None)
        )
        if speeds and score is not None and not math.isnan(score):
            name = f"{row.method} ({row.model})"
            points.append(
                {"method": name, "dataset": row.dataset, "hm": score, "images_per_second": sum(speeds) / len(speeds)}
            )
    return points


def demo_speed_points(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """The rows of ``promptkd demo``'s ``results.json`` files under ``paths`` (each model's HM and images/s)."""
    points = []
    for entry in (Path(p) for p in paths if Path(p).is_dir()):
        for file in sorted(entry.rglob("results.json")):
            try:
                rows = json.loads(file.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(rows, list):
                points += [r for r in rows if _is_point(r)]
    return points


def _is_point(row: Any) -> bool:
    """A demo row that can be drawn: a finite HM and a positive speed (the axis is logarithmic)."""
    if not isinstance(row, dict) or not {"method", "dataset", "hm", "images_per_second"} <= set(row):
        return False
    hm, rate = row["hm"], row["images_per_second"]
    return isinstance(hm, (int, float)) and math.isfinite(hm) and isinstance(rate, (int, float)) and rate > 0


def speed_png(points: Sequence[Mapping[str, Any]], ylabel: str = "HM / top-1 (%)") -> bytes | None:
    """Accuracy against inference speed (log scale), one panel per dataset, each point labelled."""
    from matplotlib.figure import Figure

    if not points:
        return None
    datasets = list(dict.fromkeys(str(p["dataset"]) for p in points))
    fig = Figure(figsize=(6.5 * len(datasets), 4.2))
    for ax, dataset in zip(fig.subplots(1, len(datasets), squeeze=False)[0], datasets):
        mine = [p for p in points if str(p["dataset"]) == dataset]
        for k, p in enumerate(mine):
            ax.scatter(p["images_per_second"], p["hm"], s=60, color=f"C{k % 10}", zorder=3)
            ax.annotate(
                _mpl(p["method"]),
                (p["images_per_second"], p["hm"]),
                textcoords="offset points",
                xytext=(6, -3),
                fontsize=7.5,
            )
        rates = [p["images_per_second"] for p in mine]
        ax.set_xscale("log")
        ax.set_xlim(min(rates) / 1.6, max(rates) * 3.5)
        ax.set(title=_mpl(f"{dataset}: accuracy vs speed"), xlabel="images/s (log scale)", ylabel=ylabel)
        ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return _figure_png(fig)


# ---------------------------------------------------------------------------------------------------------------
# Per-image predictions: confusion matrix and gallery


@dataclass(frozen=True)
class ImagePrediction:
    """One test image: its true class, the model's prediction, and a reference model's (teacher), if stored."""

    path: str
    label: str
    prediction: str
    probability: float | None = None
    reference: str | None = None


def write_predictions(
    records: Sequence[ImagePrediction], path: str | Path, reference: str = "teacher_prediction"
) -> Path:
    """The predictions CSV the page reads (``reference``: the column name of the reference model's predictions)."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "prediction", "probability", reference])
        for r in records:
            probability = "" if r.probability is None else f"{r.probability:.4f}"
            writer.writerow([r.path, r.label, r.prediction, probability, r.reference or ""])
    return path


def read_predictions(path: str | Path) -> tuple[list[ImagePrediction], str | None]:
    """The rows of a predictions CSV and what its reference column is called; ValueError if it lacks a column."""
    path = Path(path)
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        columns = set(reader.fieldnames or [])
        if not {"path", "label", "prediction"} <= columns:
            found = ", ".join(sorted(columns)) or "none"
            raise ValueError(f"{path}: no true labels (needs path, label and prediction columns; found {found})")
        ref = next((c for c in REFERENCES if c in columns), None)
        records = []
        for row in reader:
            image = Path(row["path"])
            probability = row.get("probability") or ""
            records.append(
                ImagePrediction(
                    str(image if image.is_absolute() else path.parent / image),
                    row["label"],
                    row["prediction"],
                    float(probability) if probability else None,
                    (row.get(ref) or None) if ref else None,
                )
            )
    return records, (REFERENCES[ref] if ref else None)


def find_predictions(paths: Iterable[str | Path]) -> list[Path]:
    """Every ``*predictions.csv`` under the given folders (files given directly count too), hidden ones skipped."""
    found: list[Path] = []
    for entry in map(Path, paths):
        if entry.is_file() and entry.name.endswith("predictions.csv"):
            found.append(entry)
        elif entry.is_dir():
            found += [
                p
                for p in sorted(entry.rglob("*predictions.csv"))
                if not any(part.startswith(".") for part in p.relative_to(entry).parts)
            ]
    return list(dict.fromkeys(found))


def _confusion_png(records: Sequence[ImagePrediction], title: str) -> bytes:
    """Row-normalised confusion matrix (true class × predicted class), counts written in when the classes are few."""
    from matplotlib.figure import Figure

    classes = sorted({r.label for r in records} | {r.prediction for r in records})
    index = {c: i for i, c in enumerate(classes)}
    n = len(classes)
    counts = [[0] * n for _ in range(n)]
    for r in records:
        counts[index[r.label]][index[r.prediction]] += 1
    shares = [[c / max(1, sum(row)) for c in row] for row in counts]
    side = min(12.0, max(4.0, 0.16 * n + 2.5))
    fig = Figure(figsize=(side + 1.2, side))
    ax = fig.subplots()
    shown = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(shown, ax=ax, fraction=0.046, label="share of the true class")
    if n <= 64:
        size = 8 if n <= 16 else 5
        ax.set_xticks(range(n), [_mpl(c) for c in classes], rotation=90, fontsize=size)
        ax.set_yticks(range(n), [_mpl(c) for c in classes], fontsize=size)
    if n <= 16:
        for i in range(n):
            for j in range(n):
                if counts[i][j]:
                    colour = "white" if shares[i][j] > 0.6 else "black"
                    ax.text(j, i, str(counts[i][j]), ha="center", va="center", fontsize=7, color=colour)
    ax.set(title=_mpl(title), xlabel="predicted", ylabel="true")
    fig.tight_layout()
    return _figure_png(fig)


def _spread(items: list[ImagePrediction], count: int) -> list[ImagePrediction]:
    """``count`` items evenly spaced through the list (test splits are in class order: many classes, not one)."""
    if len(items) <= count:
        return items
    step = len(items) / count
    return [items[int(k * step)] for k in range(count)]


def _shown_path(path: Path, root: Path | None) -> str:
    """An image's path under ``root``, else its class folder and name (test files repeat names across classes)."""
    if root is not None:
        try:
            return str(path.resolve().relative_to(root.resolve()))
        except ValueError:
            pass
    return str(Path(path.parent.name) / path.name)


def _card(record: ImagePrediction, ref_name: str | None, root: Path | None) -> str:
    right = record.prediction == record.label
    lines = [f"true: <b>{esc(record.label)}</b>", f"predicted: <b>{esc(record.prediction)}</b>"]
    if record.probability is not None:
        lines[-1] += f" ({record.probability:.2f})"
    if ref_name and record.reference:
        lines.append(f"{esc(ref_name)}: {esc(record.reference)}")
    shown = _shown_path(Path(record.path), root)
    png = _thumbnail(Path(record.path))
    picture = (
        img_html(png, f"{record.label}: {Path(record.path).name}", "thumb")
        if png
        else "<p class=note>(image not found)</p>"
    )
    return (
        f'<div class="card {"right" if right else "wrong"}">{picture}{"<br>".join(lines)}'
        f'<div class="path">{esc(shown)}</div></div>'
    )


def _gallery(records: Sequence[ImagePrediction], ref_name: str | None, root: Path | None) -> tuple[str, int]:
    """Right, wrong and (with a reference model) disagreeing images; returns the HTML and the images shown."""
    kinds = [
        ("right", [r for r in records if r.prediction == r.label]),
        ("wrong", [r for r in records if r.prediction != r.label]),
    ]
    if ref_name:
        kinds.append(
            (f"disagrees with the {ref_name}", [r for r in records if r.reference and r.reference != r.prediction])
        )
    parts, shown = [], 0
    for kind, items in kinds:
        picked = _spread(items, GALLERY_PER_KIND)
        parts.append(
            f"<h4>{esc(kind)}: {len(items)} of {len(records)} images"
            + (f", {len(picked)} shown" if items else "")
            + "</h4>"
        )
        if picked:
            parts.append('<div class="gallery">' + "".join(_card(r, ref_name, root) for r in picked) + "</div>")
            shown += len(picked)
    return "\n".join(parts), shown


def prediction_sections(
    page: Page,
    files: Sequence[Path],
    root: Path | None = None,
    model: str = "the model",
    names: Sequence[str] | None = None,
) -> None:
    """A confusion matrix and a gallery per predictions file (the first few; others are listed in the notes), each
    named by ``names`` or else by its path under ``root``."""
    for k, path in enumerate(files[:MAX_PREDICTION_FILES]):
        try:
            records, ref_name = read_predictions(path)
        except (OSError, ValueError, UnicodeDecodeError) as error:
            page.warnings.append(f"predictions not shown: {error}")
            continue
        if not records:
            page.warnings.append(f"{path}: no predictions in it")
            continue
        name = names[k] if names else (_label(path, root) if root else str(path))
        right = sum(r.prediction == r.label for r in records)
        summary = (
            f"{name}: {model} gets {right} of {len(records)} test images right ({100 * right / len(records):.1f}%)"
        )
        if ref_name:
            agree = sum(r.reference == r.prediction for r in records if r.reference)
            summary += f"; it agrees with the {ref_name} on {agree} of them"
        matrix = img_html(_confusion_png(records, name), f"confusion matrix of {name}")
        page.add(f"Confusion matrix: {name}", f"<p>{esc(summary)}.</p>{matrix}")
        body, _ = _gallery(records, ref_name, root)
        page.add(f"Test images: {name}", body)
    for path in files[MAX_PREDICTION_FILES:]:
        page.warnings.append(f"{path}: predictions not shown (the page shows the first {MAX_PREDICTION_FILES} files)")


# ---------------------------------------------------------------------------------------------------------------
# `promptkd report --html`


def report_page(
    markdown: str,
    report: Any,
    results: Sequence[Mapping[str, Any]],
    run_dirs: Sequence[str | Path],
    charts: Mapping[str, Path],
) -> Page:
    """The page of ``promptkd report``: its Markdown tables, bar charts, accuracy against speed (where results carry
    a speed), training curves and the predictions CSVs found under the run folders."""
    page = Page("promptkd report", f"{report.num_results} result files from {', '.join(map(str, run_dirs))}.")
    page.add("Results", markdown_html(re.sub(r"\A# Results\n", "", markdown)))  # the section's own heading
    for protocol, path in charts.items():
        page.add(f"Chart: {protocol}", img_html(Path(path).read_bytes(), f"bar chart of {protocol}"))
    speed = speed_png(speed_points(report, results) + demo_speed_points(run_dirs))
    if speed:
        page.add("Accuracy vs speed", img_html(speed, "accuracy against inference speed"))
    curves = read_curves(run_dirs)
    chart = curves_png(curves)
    if chart:
        page.add("Training curves", img_html(chart, "training curves"))
        if len(curves) > MAX_CURVE_RUNS:
            page.warnings.append(f"training curves: the first {MAX_CURVE_RUNS} of {len(curves)} runs shown")
    root = Path(run_dirs[0]) if len(run_dirs) == 1 and Path(run_dirs[0]).is_dir() else None
    files = find_predictions(run_dirs)
    prediction_sections(page, files, root)
    if not files:
        page.warnings.append(
            "no per-image predictions (*predictions.csv with path, label and prediction columns) under these runs: "
            "no confusion matrix or gallery (`promptkd demo` and `promptkd tta` write them)"
        )
    return page
