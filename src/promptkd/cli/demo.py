"""`promptkd demo`: the main job on the embedded world.

Stage reached so far: build the world (cached), load the world teacher and student CLIPs, and evaluate them
zero-shot on every downstream dataset's base and novel halves (base-to-novel protocol, HM), printing the table and
saving the JSON and a bar chart. Prompt learning, distillation and prediction join this job as they land.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

HELP = "run the main job on the embedded world (zero-shot teacher and student, base/novel/HM table and chart)"

DEFAULT_DATASETS = ("shapes", "patterns", "counts")


def default_cache() -> Path:
    return Path(os.environ.get("PROMPTKD_CACHE", Path.home() / ".cache" / "promptkd"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from promptkd.cli.common import add_runtime_args

    parser.add_argument("--world-root", default=None, help="where the embedded world is built (default: cache)")
    parser.add_argument("--out", default="runs/demo", help="output folder for results.json, the table and the chart")
    parser.add_argument("--datasets", nargs="+", default=list(DEFAULT_DATASETS), help="world datasets to use")
    parser.add_argument("--teacher-model", default="pkd-world-teacher", help="teacher backbone (model name)")
    parser.add_argument("--teacher-pretrained", default=None, help="teacher weights (tag or file)")
    parser.add_argument("--student-model", default="pkd-world-student", help="student backbone (model name)")
    parser.add_argument("--student-pretrained", default=None, help="student weights (tag or file)")
    add_runtime_args(parser)


def _load(model: str, pretrained: str | None, device: str, precision: str):
    from promptkd.backbones import load_backbone
    from promptkd.backbones.weights import shipped_weights

    if pretrained is None:
        pretrained = shipped_weights(model)
    backbone = load_backbone(model, pretrained, device=device, precision=precision).freeze()
    return backbone, pretrained is not None


def run(args: argparse.Namespace) -> int:
    import json

    from promptkd.checkpoints import atomic_write_text
    from promptkd.cli.common import print_table, resolve_device
    from promptkd.data.sampling import subsample_classes
    from promptkd.data.world import build_world
    from promptkd.evaluation.datasets import resolve_dataset
    from promptkd.evaluation.metrics import harmonic_mean
    from promptkd.evaluation.zeroshot import evaluate_zeroshot

    world_root = Path(args.world_root) if args.world_root else default_cache() / "world"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"[1/3] embedded world at {world_root}")
    build_world(world_root)
    device = resolve_device(args.device)
    results: list[dict] = []
    print("[2/3] zero-shot evaluation (base and novel halves scored among their own classes)")
    for role, model, pretrained in (
        ("teacher", args.teacher_model, args.teacher_pretrained),
        ("student", args.student_model, args.student_pretrained),
    ):
        backbone, trained = _load(model, pretrained, device, args.precision)
        if not trained:
            print(f"  note: no pre-trained weights for {model}; it runs with random weights (chance accuracy)")
        for name in args.datasets:
            splits = resolve_dataset(name, world_root)
            accuracy = {}
            for half in ("base", "new"):
                part = subsample_classes(splits, half)
                result = evaluate_zeroshot(backbone, part.test, part.classnames, [part.template], progress=False)
                accuracy[half] = 100.0 * result.metrics["acc1"]
            results.append(
                {
                    "method": f"zero-shot {role}",
                    "model": backbone.spec.model_name,
                    "pretrained": backbone.spec.pretrained,
                    "dataset": name,
                    "base": accuracy["base"],
                    "novel": accuracy["new"],
                    "hm": harmonic_mean(accuracy["base"], accuracy["new"]),
                }
            )
    print("[3/3] results")
    rows = [(r["method"], r["dataset"], f"{r['base']:.1f}", f"{r['novel']:.1f}", f"{r['hm']:.1f}") for r in results]
    print_table(["method", "dataset", "base", "novel", "HM"], rows)
    atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    chart = _bar_chart(results, out / "demo.png")
    print(f"wrote {out / 'results.json'} and {chart}")
    return 0


def _bar_chart(results: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = sorted({r["method"] for r in results})
    datasets = list(dict.fromkeys(r["dataset"] for r in results))
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), sharey=True)
    width = 0.8 / max(1, len(methods))
    for ax, key, title in zip(axes, ("base", "novel", "hm"), ("Base", "Novel", "HM")):
        for i, method in enumerate(methods):
            values = [
                next((r[key] for r in results if r["method"] == method and r["dataset"] == d), 0.0) for d in datasets
            ]
            ax.bar([x + i * width for x in range(len(datasets))], values, width, label=method)
        ax.set_xticks([x + width * (len(methods) - 1) / 2 for x in range(len(datasets))], datasets)
        ax.set_title(title)
        ax.set_ylim(0, 100)
    axes[0].set_ylabel("accuracy (%)")
    axes[-1].legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
