"""`promptkd demo`: the whole PromptKD pipeline on the embedded world, in a few minutes on a laptop CPU.

For each dataset (default: the world's ``shapes``): zero-shot teacher and student; stage 1, a PromptSRC teacher
trained on 16 labelled shots of the base classes; a CoOp student trained the same way (the labelled baseline);
stage 2, the PromptKD student distilled from the teacher's stored class features on the unlabelled train split
(all classes, transductive, as in the paper); base and novel accuracy (each half scored among its own classes)
and HM. It prints the table, saves ``results.json`` and a bar chart, and runs ``predict`` with the distilled
student on a few test images. Real backbones and data go through the same flags (``--teacher-model``,
``--data-root``, ``--datasets``).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

HELP = "run the whole pipeline on the embedded world: zero-shot, PromptSRC teacher, CoOp and PromptKD students"

DEFAULT_DATASETS = ("shapes",)


def default_cache() -> Path:
    return Path(os.environ.get("PROMPTKD_CACHE", Path.home() / ".cache" / "promptkd"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from promptkd.cli.common import add_runtime_args

    parser.add_argument("--world-root", default=None, help="where the embedded world is built (default: cache)")
    parser.add_argument("--data-root", default=None, help="datasets folder for non-world --datasets")
    parser.add_argument("--out", default="runs/demo", help="output folder for results, chart and runs")
    parser.add_argument("--datasets", nargs="+", default=list(DEFAULT_DATASETS), help="datasets to use")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--shots", type=int, default=16, help="labelled shots per base class for stage 1 / CoOp")
    parser.add_argument("--teacher-model", default="pkd-world-teacher", help="teacher backbone (model name)")
    parser.add_argument("--teacher-pretrained", default=None, help="teacher weights (tag or file)")
    parser.add_argument("--student-model", default="pkd-world-student", help="student backbone (model name)")
    parser.add_argument("--student-pretrained", default=None, help="student weights (tag or file)")
    parser.add_argument("--teacher-preset", default="world", help="PromptSRC preset of the teacher")
    parser.add_argument("--coop-preset", default="world", help="CoOp preset of the labelled student baseline")
    parser.add_argument("--distill-preset", default="world", help="PromptKD preset of the distilled student")
    parser.add_argument("--zeroshot-only", action="store_true", help="stop after the zero-shot rows")
    add_runtime_args(parser)


def _weights(model: str, pretrained: str | None) -> str | None:
    from promptkd.backbones.weights import shipped_weights

    return pretrained or shipped_weights(model)


def _zeroshot_rows(args, role: str, model: str, pretrained: str | None, dataset: str, root: str) -> dict:
    from promptkd.backbones import load_backbone
    from promptkd.cli.common import resolve_device
    from promptkd.data.sampling import subsample_classes
    from promptkd.evaluation.datasets import resolve_dataset
    from promptkd.evaluation.zeroshot import evaluate_zeroshot

    backbone = load_backbone(model, pretrained, device=resolve_device(args.device), precision=args.precision).freeze()
    if pretrained is None:
        print(f"  note: {model} has no pre-trained weights here; it runs with random weights (chance accuracy)")
    splits = resolve_dataset(dataset, root)
    accuracy = {}
    for half in ("base", "new"):
        part = subsample_classes(splits, half)
        result = evaluate_zeroshot(backbone, part.test, part.classnames, [part.template], progress=False)
        accuracy[half] = result.metrics["acc1"]
    return _row(f"zero-shot {role}", model, dataset, accuracy["base"], accuracy["new"])


def _row(method: str, model: str, dataset: str, base: float, novel: float, seconds: float | None = None) -> dict:
    from promptkd.evaluation.metrics import harmonic_mean

    b, n = 100.0 * base, 100.0 * novel
    return {
        "method": method,
        "model": model,
        "dataset": dataset,
        "base": b,
        "novel": n,
        "hm": harmonic_mean(b, n),
        "seconds": seconds,
    }


def _accuracies(results: list[dict]) -> tuple[float, float]:
    by_half = {r["subsample"]: r["metrics"]["acc1"] for r in results}
    return by_half.get("base", float("nan")), by_half.get("new", float("nan"))


def run(args: argparse.Namespace) -> int:
    import json

    from promptkd.checkpoints import atomic_write_text
    from promptkd.cli.common import print_table
    from promptkd.data.world import build_world, list_datasets, load_manifest
    from promptkd.distill.run import resolve_distill_config, run_distillation
    from promptkd.engine.run import resolve_run_config, run_training

    start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    world_names = {d.name if hasattr(d, "name") else str(d) for d in list_datasets()}
    uses_world = any(name in world_names for name in args.datasets)
    world_root = Path(args.world_root) if args.world_root else default_cache() / "world"
    if uses_world:
        print(f"[1/5] embedded world at {world_root}")
        try:
            load_manifest(world_root)  # a finished world (any parameters) is used as it is
        except FileNotFoundError:
            build_world(world_root)
    teacher_w = _weights(args.teacher_model, args.teacher_pretrained)
    student_w = _weights(args.student_model, args.student_pretrained)
    rows: list[dict] = []
    quiet = ["train.progress=false"]
    for dataset in args.datasets:
        root = str(world_root) if dataset in world_names else args.data_root
        print(f"[2/5] {dataset}: zero-shot teacher and student")
        rows.append(_zeroshot_rows(args, "teacher", args.teacher_model, teacher_w, dataset, root))
        rows.append(_zeroshot_rows(args, "student", args.student_model, student_w, dataset, root))
        if args.zeroshot_only:
            continue
        common = {
            "dataset": dataset,
            "data_root": root,
            "shots": args.shots,
            "subsample": "base",
            "seed": args.seed,
            "device": args.device,
        }
        print(f"[3/5] {dataset}: stage 1, PromptSRC teacher on {args.shots} shots of the base classes")
        tic = time.perf_counter()
        teacher_cfg = resolve_run_config(
            "promptsrc",
            args.teacher_preset,
            quiet,
            {**common, "model": args.teacher_model, "pretrained": teacher_w, "out": str(out / dataset / "teacher")},
        )
        teacher = run_training(teacher_cfg)
        rows.append(
            _row(
                "PromptSRC teacher",
                args.teacher_model,
                dataset,
                *_accuracies(teacher.results),
                time.perf_counter() - tic,
            )
        )
        print(f"[4/5] {dataset}: CoOp student on the same labelled shots")
        tic = time.perf_counter()
        coop_cfg = resolve_run_config(
            "coop",
            args.coop_preset,
            quiet,
            {**common, "model": args.student_model, "pretrained": student_w, "out": str(out / dataset / "coop")},
        )
        coop = run_training(coop_cfg)
        rows.append(
            _row("CoOp student", args.student_model, dataset, *_accuracies(coop.results), time.perf_counter() - tic)
        )
        print(f"[5/5] {dataset}: stage 2, PromptKD student distilled on unlabelled images (no labels read)")
        tic = time.perf_counter()
        distill_cfg = resolve_distill_config(
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
        student = run_distillation(distill_cfg)
        rows.append(
            _row(
                "PromptKD student",
                args.student_model,
                dataset,
                *_accuracies(student.results),
                time.perf_counter() - tic,
            )
        )
    print_table(
        ["method", "dataset", "base", "novel", "HM", "seconds"],
        [
            (
                r["method"],
                r["dataset"],
                f"{r['base']:.1f}",
                f"{r['novel']:.1f}",
                f"{r['hm']:.1f}",
                f"{r['seconds']:.0f}" if r["seconds"] else "",
            )
            for r in rows
        ],
    )
    atomic_write_text(out / "results.json", json.dumps(rows, indent=2) + "\n")
    chart = _bar_chart(rows, out / "demo.png")
    print(f"wrote {out / 'results.json'} and {chart}")
    if not args.zeroshot_only and args.datasets:
        _predict_example(
            out / args.datasets[-1] / "promptkd", args.datasets[-1], world_root, world_names, args.data_root
        )
    print(f"demo finished in {time.perf_counter() - start:.0f} s")
    return 0


def _predict_example(run_dir: Path, dataset: str, world_root: Path, world_names: set[str], data_root) -> None:
    from promptkd.deploy import load_for_inference, predict, write_predictions_csv
    from promptkd.evaluation.datasets import resolve_dataset

    splits = resolve_dataset(dataset, str(world_root) if dataset in world_names else data_root)
    samples = splits.test[:: max(1, len(splits.test) // 5)][:5]
    method = load_for_inference(run_dir / "prompts.safetensors")
    predictions, _ = predict(method, [d.path for d in samples], top_k=3, progress=False)
    path = write_predictions_csv(predictions, run_dir / "predictions.csv")
    print(f"predict with the distilled student alone (no text encoder, no teacher) -> {path}:")
    for datum, p in zip(samples, predictions):
        guesses = ", ".join(f"{c} {s:.2f}" for c, s in zip(p.classes, p.scores))
        print(f"  {Path(datum.path).name:>10}  true: {datum.classname:<18} predicted: {guesses}")


def _bar_chart(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r["method"] for r in rows))
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), sharey=True)
    width = 0.8 / max(1, len(methods))
    for ax, key, title in zip(axes, ("base", "novel", "hm"), ("Base", "Novel", "HM")):
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
    plt.close(fig)
    return path
