"""Reproduce the README's embedded-world tables (zero-shot, linear probe, base-to-novel per method, PromptKD, TTA).

    python scripts/world_results.py --out runs/world_results [--datasets shapes patterns counts] [--seeds 1 2 3]
        [--parts zeroshot linear_probe methods promptkd tta]

(The pair's own table, zero-shot and full-data probe of both CLIPs, comes from `promptkd world-report`.)

Every part writes result JSONs under --out and prints a Markdown table; finished runs are skipped on a re-run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from promptkd.backbones import load_backbone
from promptkd.backbones.weights import shipped_weights
from promptkd.data.sampling import few_shot_splits, subsample_classes
from promptkd.data.world import build_world, default_world_root
from promptkd.evaluation.datasets import resolve_dataset
from promptkd.evaluation.metrics import harmonic_mean
from promptkd.evaluation.zeroshot import evaluate_zeroshot

TEACHER, STUDENT = "pkd-world-teacher", "pkd-world-student"
METHODS = ("coop", "cocoop", "vpt", "ivlp", "maple", "promptsrc", "vp", "clip_adapter", "tip_adapter_f")


def zeroshot_table(root: str, datasets: list[str]) -> list[str]:
    lines = ["| model | dataset | base | novel | HM | all classes |", "|---|---|---|---|---|---|"]
    for model in (TEACHER, STUDENT):
        backbone = load_backbone(model, shipped_weights(model)).freeze()
        for name in datasets:
            splits = resolve_dataset(name, root)
            acc = {}
            for half in ("base", "new", "all"):
                part = subsample_classes(splits, half)
                acc[half] = (
                    100
                    * evaluate_zeroshot(backbone, part.test, part.classnames, [part.template], progress=False).metrics[
                        "acc1"
                    ]
                )
            lines.append(
                f"| {model} | {name} | {acc['base']:.1f} | {acc['new']:.1f} | "
                f"{harmonic_mean(acc['base'], acc['new']):.1f} | {acc['all']:.1f} |"
            )
    return lines


def linear_probe_table(root: str, datasets: list[str], seeds: list[int], out: Path) -> list[str]:
    from promptkd.evaluation.linear_probe import evaluate_linear_probe

    lines = [
        "| model | dataset | 16-shot linear probe (all classes, mean ± std over seeds) | zero-shot |",
        "|---|---|---|---|",
    ]
    for model in (TEACHER, STUDENT):
        backbone = load_backbone(model, shipped_weights(model)).freeze()
        for name in datasets:
            splits = resolve_dataset(name, root)
            accs = []
            for seed in seeds:
                few = few_shot_splits(splits, 16, seed, cache_dir=out / "split_fewshot")
                result = evaluate_linear_probe(backbone, few, progress=False)
                accs.append(100 * result.metrics["lp_acc1"])
            zs = (
                100
                * evaluate_zeroshot(
                    backbone, splits.test, splits.classnames, [splits.template], progress=False
                ).metrics["acc1"]
            )
            mean = sum(accs) / len(accs)
            std = (sum((a - mean) ** 2 for a in accs) / len(accs)) ** 0.5
            lines.append(f"| {model} | {name} | {mean:.1f} ± {std:.1f} | {zs:.1f} |")
    return lines


def methods_report(root: str, datasets: list[str], seeds: list[int], out: Path, methods: list[str]) -> None:
    from promptkd.protocols import ProtocolSpec, run_protocol

    for method in methods:
        spec = ProtocolSpec(
            "base2new",
            method,
            "world",
            datasets,
            seeds,
            str(out / "methods"),
            data_root=root,
            model=STUDENT,
            pretrained=shipped_weights(STUDENT),
            overrides=["train.progress=false"],
        )
        summary = run_protocol(spec)
        print(method, summary)


def promptkd_runs(root: str, datasets: list[str], seeds: list[int], out: Path) -> list[str]:
    import argparse as ap

    from promptkd.cli import demo

    rows = []
    for seed in seeds:
        parser = ap.ArgumentParser()
        demo.add_arguments(parser)
        args = parser.parse_args(
            [
                "--world-root",
                root,
                "--out",
                str(out / "promptkd" / f"seed_{seed}"),
                "--seed",
                str(seed),
                "--datasets",
                *datasets,
            ]
        )
        demo.run(args)
        rows.extend({**r, "seed": seed} for r in json.loads((Path(args.out) / "results.json").read_text()))
    table = ["| method | dataset | base | novel | HM (of mean B, N) |", "|---|---|---|---|---|"]
    keys = list(dict.fromkeys((r["method"], r["dataset"]) for r in rows))
    for method, dataset in keys:
        group = [r for r in rows if r["method"] == method and r["dataset"] == dataset]
        b = [r["base"] for r in group]
        n = [r["novel"] for r in group]

        def stat(v):
            m = sum(v) / len(v)
            return m, (sum((x - m) ** 2 for x in v) / len(v)) ** 0.5

        (mb, sb), (mn, sn) = stat(b), stat(n)
        table.append(
            f"| {method} | {dataset} | {mb:.1f} ± {sb:.1f} | {mn:.1f} ± {sn:.1f} | {harmonic_mean(mb, mn):.1f} |"
        )
    return table


def tta_runs(root: str, seeds: list[int], out: Path, max_images: int = 128) -> None:
    """TPT and C-TPT from "a photo of a"; PromptAlign and PromptSync from a MaPLe base trained on 16 shots of clean
    `shapes` (all 64 classes) per seed, with statistics and prototypes from 640 clean train images; all on the
    teacher, over the domain-shifted test sets. Aggregate with `promptkd report <out>/tta`."""
    from promptkd.cli.main import main as cli

    sets = ["shapes_noise", "shapes_sketch"]
    teacher = ["--model", TEACHER, "--pretrained", "shipped"]
    common = ["--preset", "world", "--datasets", *sets, "--data-root", root, "--max-images", str(max_images)]
    for seed in seeds:
        folder = out / "tta" / f"seed_{seed}"
        for method in ("tpt", "ctpt"):
            cli(["tta", "--method", method, *common, *teacher, "--seed", str(seed), "--out", str(folder / method)])
        base = folder / "maple"
        if not (base / "prompts.safetensors").is_file():
            cli(
                [
                    "train",
                    "--method",
                    "maple",
                    "--preset",
                    "world",
                    "--dataset",
                    "shapes",
                    "--data-root",
                    root,
                    *teacher,
                    "--shots",
                    "16",
                    "--seed",
                    str(seed),
                    "--out",
                    str(base),
                    "--set",
                    "subsample=all",
                ]
            )
        stats, protos = folder / "stats", folder / "prototypes"
        if not stats.with_suffix(".safetensors").is_file():
            cli(
                [
                    "tta-stats",
                    "--base",
                    str(base / "prompts.safetensors"),
                    "--dataset",
                    "shapes",
                    "--data-root",
                    root,
                    "--max-images",
                    "640",
                    "--stats",
                    str(stats),
                    "--prototypes",
                    str(protos),
                    "--seed",
                    str(seed),
                ]
            )
        for method, extra in (("promptalign", ["--stats", str(stats)]), ("promptsync", ["--prototypes", str(protos)])):
            cli(
                [
                    "tta",
                    "--method",
                    method,
                    *common,
                    "--base",
                    str(base / "prompts.safetensors"),
                    *extra,
                    "--seed",
                    str(seed),
                    "--out",
                    str(folder / method),
                ]
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/world_results")
    parser.add_argument("--world-root", default=None)
    parser.add_argument("--datasets", nargs="+", default=["shapes", "patterns", "counts"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--parts", nargs="+", default=["zeroshot", "linear_probe", "methods", "promptkd", "tta"])
    args = parser.parse_args()
    root = args.world_root or str(default_world_root())
    build_world(root)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if "zeroshot" in args.parts:
        print("\n".join(zeroshot_table(root, args.datasets)))
    if "linear_probe" in args.parts:
        print("\n".join(linear_probe_table(root, args.datasets, args.seeds, out)))
    if "methods" in args.parts:
        methods_report(root, args.datasets, args.seeds, out, args.methods)
    if "promptkd" in args.parts:
        print("\n".join(promptkd_runs(root, args.datasets, args.seeds, out)))
    if "tta" in args.parts:
        tta_runs(root, args.seeds, out)


if __name__ == "__main__":
    main()
