"""`promptkd demo`: the whole PromptKD pipeline on the embedded world, in a few minutes on a laptop CPU.

For each dataset (default: the world's ``shapes``): zero-shot teacher and student; stage 1, a PromptSRC teacher
trained on 16 labelled shots of the base classes; a CoOp student trained the same way (the labelled baseline);
stage 2, the PromptKD student distilled from the teacher's stored class features on the unlabelled train split
(all classes, transductive, as in the paper); base and novel accuracy (each half scored among its own classes),
HM and all-class accuracy; and the inference speed of every model (images/s, timed in interleaved rounds). It
prints the table, saves ``results.json``, a bar chart and a chart of HM against speed (the paper's story: the
distilled student near the teacher's accuracy at the student's speed), and runs ``predict`` with the distilled
student alone on a few test images, marked right or wrong. ``demo.html`` shows all of it on one offline page, with
the training curves, a confusion matrix and test images the student gets right, wrong, and unlike its teacher. Real
backbones and data go through the same flags (``--teacher-model``, ``--data-root``, ``--datasets``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from promptkd.cli import validate as v

HELP = "run the whole pipeline on the embedded world: zero-shot, PromptSRC teacher, CoOp and PromptKD students"

DEFAULT_DATASETS = ("shapes",)
TABLE_HEADERS = ("method", "dataset", "base", "novel", "HM", "all", "images/s", "train s")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from promptkd.cli.common import add_runtime_args

    parser.add_argument(
        "--world-root", type=v.output_folder, default=None, help="where the embedded world is built (default: cache)"
    )
    parser.add_argument(
        "--data-root", type=v.input_folder, default=None, help="datasets folder for non-world --datasets"
    )
    parser.add_argument(
        "--out", type=v.output_folder, default="runs/demo", help="output folder for results, chart and runs"
    )
    parser.add_argument(
        "--datasets",
        nargs="+",
        action=v.Repeatable,
        type=v.text,
        default=list(DEFAULT_DATASETS),
        help="datasets to use",
    )
    parser.add_argument("--seed", type=v.seed, default=1)
    parser.add_argument("--shots", type=v.count0, default=16, help="labelled shots per base class for stage 1 / CoOp")
    parser.add_argument(
        "--teacher-model", type=v.text, default="pkd-world-teacher", help="teacher backbone (model name)"
    )
    parser.add_argument("--teacher-pretrained", type=v.text, default=None, help="teacher weights (tag or file)")
    parser.add_argument(
        "--student-model", type=v.text, default="pkd-world-student", help="student backbone (model name)"
    )
    parser.add_argument("--student-pretrained", type=v.text, default=None, help="student weights (tag or file)")
    parser.add_argument("--teacher-preset", type=v.text, default="world", help="PromptSRC preset of the teacher")
    parser.add_argument(
        "--coop-preset", type=v.text, default="world", help="CoOp preset of the labelled student baseline"
    )
    parser.add_argument(
        "--distill-preset", type=v.text, default="world", help="PromptKD preset of the distilled student"
    )
    parser.add_argument("--zeroshot-only", action="store_true", help="stop after the zero-shot rows")
    parser.add_argument(
        "--no-progress", dest="progress", action="store_false", help="no progress bars inside the stages"
    )
    add_runtime_args(parser)


def _weights(model: str, pretrained: str | None) -> str | None:
    from promptkd.backbones.weights import shipped_weights

    return pretrained or shipped_weights(model)


def _zeroshot_row(args, role: str, model: str, pretrained: str | None, dataset: str, root: str) -> tuple[dict, object]:
    """Zero-shot base / novel / all accuracy of one CLIP (one pass over the test split), and the backbone."""
    from promptkd.backbones import load_backbone
    from promptkd.cli.common import resolve_device
    from promptkd.data.datasets import resolve_dataset
    from promptkd.evaluation.world_report import measure_backbone

    backbone = load_backbone(model, pretrained, device=resolve_device(args.device), precision=args.precision).freeze()
    if pretrained is None:
        print(f"  note: {model} has no pre-trained weights here; it runs with random weights (chance accuracy)")
    measured = measure_backbone(backbone, resolve_dataset(dataset, root), probe=False)["zeroshot"]
    row = _row(f"zero-shot {role}", model, dataset, measured["base"], measured["novel"], measured["all"])
    return row, backbone


def _row(
    method: str, model: str, dataset: str, base: float, novel: float, all_classes: float, seconds: float | None = None
) -> dict:
    """A table row; accuracies in %."""
    from promptkd.evaluation.metrics import harmonic_mean

    return {
        "method": method,
        "model": model,
        "dataset": dataset,
        "base": base,
        "novel": novel,
        "hm": harmonic_mean(base, novel),
        "all": all_classes,
        "seconds": seconds,
    }


def _accuracies(results: list[dict]) -> tuple[float, float, float]:
    """Base, novel and all-class top-1 (%) from a run's result JSONs."""
    by_half = {r["subsample"]: 100.0 * r["metrics"]["acc1"] for r in results}
    return by_half.get("base", float("nan")), by_half.get("new", float("nan")), by_half.get("all", float("nan"))


def run(args: argparse.Namespace) -> int:
    import json

    from promptkd.checkpoints import atomic_write_text
    from promptkd.cli.common import print_table
    from promptkd.data.world import default_world_root, ensure_world, list_datasets
    from promptkd.paths import writable_folder

    start = time.perf_counter()
    out = writable_folder(args.out)  # before any work
    world_names = set(list_datasets())
    world_root = Path(args.world_root).expanduser() if args.world_root else default_world_root()
    if any(name in world_names for name in args.datasets):
        print(f"[1/6] embedded world at {world_root}")
        ensure_world(args.world_root)  # built if absent; another world version is rebuilt (cache) or refused
    rows: list[dict] = []
    for dataset in args.datasets:
        root = str(world_root) if dataset in world_names else args.data_root
        rows += _run_dataset(args, dataset, root, out)
    print_table(list(TABLE_HEADERS), [_cells(r) for r in rows])
    atomic_write_text(out / "results.json", json.dumps(rows, indent=2) + "\n")
    bars = _bar_chart(rows, out / "demo.png")
    speed = _speed_chart(rows, out / "demo_speed.png")
    page = write_page(rows, out)
    print(f"wrote {out / 'results.json'}, {bars}, {speed} and {page} (one page to open in a browser)")
    if not args.zeroshot_only and args.datasets:
        dataset = args.datasets[-1]
        _predict_example(out / dataset / "promptkd", dataset, world_root if dataset in world_names else args.data_root)
    print(f"demo finished in {time.perf_counter() - start:.0f} s")
    return 0


def _run_dataset(args: argparse.Namespace, dataset: str, root: str | None, out: Path) -> list[dict]:
    """Every row of one dataset, each with the inference speed of the model it describes."""
    from promptkd.deploy import load_for_inference
    from promptkd.distill.run import resolve_distill_config, run_distillation
    from promptkd.engine.run import resolve_run_config, run_training
    from promptkd.evaluation.world_report import images_per_second

    teacher_w = _weights(args.teacher_model, args.teacher_pretrained)
    student_w = _weights(args.student_model, args.student_pretrained)
    quiet = [] if getattr(args, "progress", True) else ["train.progress=false"]  # bars with an ETA per stage
    print(f"[2/6] {dataset}: zero-shot teacher and student")
    rows, models = [], []
    for role, model, weights in (
        ("teacher", args.teacher_model, teacher_w),
        ("student", args.student_model, student_w),
    ):
        row, backbone = _zeroshot_row(args, role, model, weights, dataset, root)
        rows.append(row)
        models.append(backbone)
    if not args.zeroshot_only:
        common = {
            "dataset": dataset,
            "data_root": root,
            "shots": args.shots,
            "subsample": "base",
            "seed": args.seed,
            "device": args.device,
        }
        print(f"[3/6] {dataset}: stage 1, PromptSRC teacher on {args.shots} shots of the base classes")
        tic = time.perf_counter()
        teacher = run_training(
            resolve_run_config(
                "promptsrc",
                args.teacher_preset,
                quiet,
                {**common, "model": args.teacher_model, "pretrained": teacher_w, "out": str(out / dataset / "teacher")},
            )
        )
        rows.append(_row("PromptSRC teacher", args.teacher_model, dataset, *_accuracies(teacher.results), _since(tic)))
        models.append(load_for_inference(teacher.train.checkpoint, device=_device(args)))
        print(f"[4/6] {dataset}: CoOp student on the same labelled shots")
        tic = time.perf_counter()
        coop = run_training(
            resolve_run_config(
                "coop",
                args.coop_preset,
                quiet,
                {**common, "model": args.student_model, "pretrained": student_w, "out": str(out / dataset / "coop")},
            )
        )
        rows.append(_row("CoOp student", args.student_model, dataset, *_accuracies(coop.results), _since(tic)))
        models.append(load_for_inference(coop.train.checkpoint, device=_device(args)))
        print(f"[5/6] {dataset}: stage 2, PromptKD student distilled on unlabelled images (no labels read)")
        tic = time.perf_counter()
        student = run_distillation(
            resolve_distill_config(
                args.distill_preset,
                quiet,
                {
                    "teacher": str(teacher.train.checkpoint),
                    "student_model": args.student_model,
                    "student_pretrained": student_w,
                    "dataset": dataset,
                    "data_root": root,
                    "seed": args.seed,
                    "device": args.device,
                    "out": str(out / dataset / "promptkd"),
                },
            )
        )
        rows.append(_row("PromptKD student", args.student_model, dataset, *_accuracies(student.results), _since(tic)))
        models.append(load_for_inference(student.checkpoint, device=_device(args)))
    print(f"[6/6] {dataset}: inference speed of every model (images/s, batch 256, interleaved rounds)")
    for row, rate in zip(rows, images_per_second(models, rounds=3, min_seconds=0.4)):
        row["images_per_second"] = rate
    if not args.zeroshot_only:  # after the timing: all-class scoring changes the teacher's class count
        from promptkd.html_report import PREDICTIONS_FILE

        _test_predictions(models[2], models[-1], dataset, root, out / dataset / PREDICTIONS_FILE)
    return rows


def _cells(row: dict) -> tuple[str, ...]:
    """One row of the demo's table as printed and as shown on demo.html."""
    return (
        row["method"],
        row["dataset"],
        f"{row['base']:.1f}",
        f"{row['novel']:.1f}",
        f"{row['hm']:.1f}",
        f"{row['all']:.1f}",
        f"{row['images_per_second']:.0f}",
        f"{row['seconds']:.0f}" if row["seconds"] else "",
    )


def _test_predictions(teacher, student, dataset: str, root, path: Path) -> Path:
    """The distilled student's and its teacher's top-1 on every test image among all classes (what a deployed model
    faces): demo.html's confusion matrix and gallery of right, wrong and disagreeing images read them."""
    from promptkd.data.datasets import resolve_dataset
    from promptkd.data.items import ImageDataset
    from promptkd.data.transforms import build_transform
    from promptkd.engine.trainer import predict_logits
    from promptkd.html_report import ImagePrediction, write_predictions

    splits = resolve_dataset(dataset, root)
    names = list(splits.classnames)
    probs = []
    for method in (student, teacher):
        method.set_classnames(names)
        data = ImageDataset(splits.test, build_transform(method.backbone.preprocess, train=False))
        probs.append(predict_logits(method, data)[0].softmax(-1))
    records = [
        ImagePrediction(d.path, d.classname, names[int(p.argmax())], float(p.max()), names[int(q.argmax())])
        for d, p, q in zip(splits.test, *probs)
    ]
    return write_predictions(records, path)


def write_page(rows: list[dict], out: Path) -> Path:
    """``demo.html`` beside the demo's outputs: the table, both charts, the training curves and each dataset's test
    predictions (confusion matrix; images the student gets right, wrong, and where it disagrees with its teacher)."""
    from promptkd.html_report import (
        PREDICTIONS_FILE,
        Page,
        curves_png,
        img_html,
        prediction_sections,
        read_curves,
        table_html,
    )

    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    page = Page("promptkd demo", f"PromptKD on {', '.join(datasets)}: accuracies in %, speed in images/s.")
    page.add("Results", table_html(TABLE_HEADERS, [_cells(r) for r in rows]))
    for name, heading in (("demo.png", "Accuracy per method"), ("demo_speed.png", "Accuracy vs speed")):
        if (out / name).is_file():
            page.add(heading, img_html((out / name).read_bytes(), heading))
    chart = curves_png(read_curves([out]))
    if chart:
        page.add("Training curves", img_html(chart, "training curves of the demo's stages"))
    shown = [d for d in datasets if (out / d / PREDICTIONS_FILE).is_file()]
    prediction_sections(page, [out / d / PREDICTIONS_FILE for d in shown], out, "the distilled student", shown)
    return page.write(out / "demo.html")


def _since(tic: float) -> float:
    return time.perf_counter() - tic


def _device(args: argparse.Namespace) -> str:
    from promptkd.cli.common import resolve_device

    return resolve_device(args.device)


def _predict_example(run_dir: Path, dataset: str, data_root, count: int = 6) -> None:
    """``predict`` with the distilled student alone on a few test images, each marked right or wrong."""
    from promptkd.data.datasets import resolve_dataset
    from promptkd.deploy import load_for_inference, predict, write_predictions_csv

    splits = resolve_dataset(dataset, data_root)
    samples = splits.test[:: max(1, len(splits.test) // count)][:count]
    method = load_for_inference(run_dir / "prompts.safetensors")
    predictions, _ = predict(method, [d.path for d in samples], top_k=3, progress=False)
    path = write_predictions_csv(predictions, run_dir / "predictions.csv")
    right = sum(p.classes[0] == d.classname for d, p in zip(samples, predictions))
    root = Path(data_root) if data_root else Path(splits.root)
    shown = [shown_path(d.path, root) for d in samples]
    width = max(len(name) for name in shown)
    print(f"predict with the distilled student alone (no text encoder, no teacher) -> {path}")
    print(f"  {right} of {len(samples)} right (images under {root}):")
    for datum, name, p in zip(samples, shown, predictions):
        verdict = "right" if p.classes[0] == datum.classname else "WRONG"
        guesses = ", ".join(f"{p.label(r)} {s:.2f}" for r, s in enumerate(p.scores))
        print(f"  {verdict:>5}  {name:<{width}}  true: {datum.classname:<18} predicted: {guesses}")


def shown_path(path: str, root: Path) -> str:
    """An image's path as a user can open it: relative to the data root it lives under (file names repeat across
    class folders: every class has a 0050.png), else the full path."""
    try:
        return str(Path(path).resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def _bar_chart(rows: list[dict], path: Path) -> Path:
    """Base, novel, HM and all-class accuracy per method and dataset."""
    from matplotlib.figure import Figure

    methods = list(dict.fromkeys(r["method"] for r in rows))
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    fig = Figure(figsize=(15, 3.8))
    axes = fig.subplots(1, 4, sharey=True)
    width = 0.8 / max(1, len(methods))
    for ax, key, title in zip(axes, ("base", "novel", "hm", "all"), ("Base", "Novel", "HM", "All classes")):
        for i, method in enumerate(methods):
            values = [
                next((r[key] for r in rows if r["method"] == method and r["dataset"] == d), 0.0) for d in datasets
            ]
            ax.bar([x + i * width for x in range(len(datasets))], values, width, label=method)
        ax.set_xticks([x + width * (len(methods) - 1) / 2 for x in range(len(datasets))], datasets)
        ax.set_title(title)
        ax.set_ylim(0, 100)
    axes[0].set_ylabel("accuracy (%)")
    axes[-1].legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def _speed_chart(rows: list[dict], path: Path) -> Path:
    """HM against inference speed, one point per model and dataset, values labelled: the paper's story at a glance
    (the distilled student should sit near the teacher's accuracy at the student's speed)."""
    from matplotlib.figure import Figure

    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    fig = Figure(figsize=(6.5 * len(datasets), 4.6))
    axes = fig.subplots(1, len(datasets), squeeze=False)[0]
    styles = {"teacher": ("s", "C3"), "student": ("o", "C0")}
    for ax, dataset in zip(axes, datasets):
        for r in (r for r in rows if r["dataset"] == dataset):
            marker, colour = styles["teacher" if "teacher" in r["method"] else "student"]
            if r["method"].startswith("PromptKD"):
                colour = "C2"
            ax.scatter(r["images_per_second"], r["hm"], marker=marker, s=70, color=colour, zorder=3)
            ax.annotate(
                f"{r['method']}\nHM {r['hm']:.1f}, {r['images_per_second']:.0f} img/s",
                (r["images_per_second"], r["hm"]),
                textcoords="offset points",
                xytext=(7, -4),
                fontsize=7.5,
            )
        points = {r["method"]: (r["images_per_second"], r["hm"]) for r in rows if r["dataset"] == dataset}
        if "PromptSRC teacher" in points and "PromptKD student" in points:
            ax.annotate(
                "",
                xy=points["PromptKD student"],
                xytext=points["PromptSRC teacher"],
                arrowprops={"arrowstyle": "->", "color": "C2", "linestyle": "--", "shrinkA": 8, "shrinkB": 8},
            )
        ax.set_xscale("log")
        ax.set_xlabel("inference speed (images/s, log scale)")
        ax.set_ylabel("HM of base and novel accuracy (%)")
        ax.set_title(f"{dataset}: accuracy vs speed")
        ax.grid(alpha=0.3, which="both")
        lo = min(r["images_per_second"] for r in rows if r["dataset"] == dataset)
        hi = max(r["images_per_second"] for r in rows if r["dataset"] == dataset)
        ax.set_xlim(lo / 1.6, hi * 3.5)  # room for the labels on the right
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path
