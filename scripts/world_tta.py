"""Test-time adaptation on the world's shifted `shapes` sets: every method, its accuracy, ECE and time per image.

    python scripts/world_tta.py --out runs/world_tta [--seeds 1 2 3] [--max-images 200] [--methods ...]

On the shipped teacher, over `shapes_v2`, `shapes_sketch`, `shapes_r` and `shapes_a` (the ImageNet-V2/-Sketch/-R/-A
analogues; `--max-images` evenly spaced images of each, the same images for every method and seed):
- from the hand-written context "a photo of a" (zero-shot CLIP): TPT, C-TPT (episodic), TDA, DPE, BoostAdapter
  (online, the stream's order from the seed) and ZERO (episodic);
- from a MaPLe base trained on 16 shots of clean `shapes` per seed, with PromptAlign's statistics and PromptSync's
  prototypes from 640 clean train images: PromptAlign and PromptSync.
Finished results are kept (a re-run only runs what is missing). It prints a Markdown table (mean over seeds of the
shift average, ± the std over seeds) and writes `<out>/tta_table.md`, `<out>/tta_table.json` and
`<out>/tta_speed.png` (accuracy against seconds per image, log time axis).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from pathlib import Path

from promptkd.data.world import ensure_world

TEACHER = "pkd-world-teacher"
SETS = ("shapes_v2", "shapes_sketch", "shapes_r", "shapes_a")
ZERO_SHOT_METHODS = ("tpt", "ctpt", "tda", "dpe", "boostadapter", "zero")
MAPLE_METHODS = ("promptalign", "promptsync")
ALL_METHODS = (*ZERO_SHOT_METHODS, *MAPLE_METHODS)
MAX_IMAGES = 200  # per set: 800 images a seed; the expensive methods (64-128 views each) bound what a CPU can do


def _done(folder: Path) -> bool:
    return len(list(folder.glob("*-test_time_classification.json"))) >= len(SETS)


def _tta(cli, method: str, seed: int, common: list[str], base: list[str], folder: Path) -> None:
    if not _done(folder):
        code = cli(["tta", "--method", method, *common, *base, "--seed", str(seed), "--out", str(folder)])
        if code:
            raise SystemExit(f"tta --method {method} (seed {seed}) failed with exit code {code}")


def _maple_base(cli, root: str, seed: int, folder: Path) -> tuple[Path, Path, Path]:
    """MaPLe on 16 shots of clean `shapes` (all classes) and its source statistics / prototypes."""
    base = folder / "maple"
    train = ["train", "--method", "maple", "--preset", "world", "--dataset", "shapes", "--data-root", root]
    train += ["--model", TEACHER, "--pretrained", "shipped", "--shots", "16", "--seed", str(seed)]
    train += ["--out", str(base), "--set", "subsample=all"]
    if not (base / "prompts.safetensors").is_file() and cli(train):
        raise SystemExit(f"MaPLe base (seed {seed}) failed")
    stats, protos = folder / "stats", folder / "prototypes"
    sources = ["tta-stats", "--base", str(base / "prompts.safetensors"), "--dataset", "shapes", "--data-root", root]
    sources += ["--max-images", "640", "--stats", str(stats), "--prototypes", str(protos), "--seed", str(seed)]
    if not stats.with_suffix(".safetensors").is_file() and cli(sources):
        raise SystemExit(f"tta-stats (seed {seed}) failed")
    return base / "prompts.safetensors", stats.with_suffix(".safetensors"), protos.with_suffix(".safetensors")


def run_seed(root: str, seed: int, out: Path, max_images: int, methods: list[str]) -> None:
    from promptkd.cli.main import main as cli

    folder = out / f"seed_{seed}"
    common = ["--preset", "world", "--datasets", *SETS, "--data-root", root, "--max-images", str(max_images)]
    common.append("--no-progress")
    teacher = ["--model", TEACHER, "--pretrained", "shipped"]
    for method in (m for m in ZERO_SHOT_METHODS if m in methods):
        _tta(cli, method, seed, common, teacher, folder / method)
    wanted = [m for m in MAPLE_METHODS if m in methods]
    if wanted:
        base, stats, protos = _maple_base(cli, root, seed, folder)
        sources = {"promptalign": ["--stats", str(stats)], "promptsync": ["--prototypes", str(protos)]}
        for method in wanted:
            _tta(cli, method, seed, common, ["--base", str(base), *sources[method]], folder / method)


#: one setting changed at a time from each method's world preset, to find what limits it on the world (seed 1)
ABLATIONS = {
    "tpt": {
        "preset": [],
        "crops >= 0.5 of the image": ["method.min_crop_scale=0.5"],
        "AugMix views": ["method.augmix=on"],
        "lr x10": ["method.lr=0.05"],
        "4 steps": ["method.steps=4"],
        "4 steps, lr x10": ["method.steps=4", "method.lr=0.05"],
        "CLIP's logit scale (100) in the loss": ["method.logit_scale=100"],
    },
    "promptalign": {
        "preset": [],
        "no alignment (β = 0: TPT on the MaPLe base)": ["method.align_weight=0"],
        "TPT's lr (5e-3)": ["method.lr=0.005"],
    },
    "promptsync": {
        "preset": [],
        "entropy only (no discrimination, no alignment)": [
            "method.discrimination_weight=0",
            "method.alignment_weight=0",
        ],
        "TPT's lr (5e-3, inner and outer)": ["method.lr=0.005", "method.inner_lr=0.005"],
        "views chosen once": ["method.view_selection=initial"],
    },
}


def ablation(method: str, root: str, out: Path, max_images: int, seed: int = 1) -> str:
    """``method`` with one setting changed at a time, on the same images and views; a Markdown table."""
    from promptkd.cli.main import main as cli

    common = ["--preset", "world", "--datasets", *SETS, "--data-root", root, "--max-images", str(max_images)]
    common.append("--no-progress")
    base = ["--model", TEACHER, "--pretrained", "shipped"]
    if method in MAPLE_METHODS:
        prompts, stats, protos = _maple_base(cli, root, seed, out / f"seed_{seed}")
        base = ["--base", str(prompts), *(["--stats", str(stats)] if method == "promptalign" else [])]
        base += ["--prototypes", str(protos)] if method == "promptsync" else []
    name = "TPT" if method == "tpt" else {"promptalign": "PromptAlign", "promptsync": "PromptSync"}[method]
    lines = [f"| {name} variant | shift average | % changed / fixed / broken | ECE | ms / image |", "|" + "---|" * 5]
    for index, (variant, overrides) in enumerate(ABLATIONS[method].items()):
        folder = out / ("tpt_sweep" if method == "tpt" else f"{method}_sweep") / f"variant_{index}"
        extra = ["--set", *overrides] if overrides else []
        _tta(cli, method, seed, [*common, *extra], base, folder)
        records = [json.loads(p.read_text()) for p in folder.glob("*-test_time_classification.json")]
        acc, ece, sec = (_row(records, key)["mean"] for key in ("acc1", "ece", "seconds_per_image"))
        start = _row(records, "base_acc1")["mean"]
        moved = "{:.1f} / {:.1f} / {:.1f}".format(*_flips(folder))
        lines.append(f"| {variant} | {acc:.1f} ({acc - start:+.1f}) | {moved} | {ece:.1f} | {1000 * sec:.0f} |")
    return "\n".join(lines)


#: the cache methods that are cheap enough per image to adapt over every test image of every set
FULL_STREAM_METHODS = ("tda", "dpe")


def full_stream(root: str, out: Path, orders: int = 3, seed: int = 1) -> str:
    """The online cache methods over the whole 1,920-image sets, ``orders`` stream orders each (seeds S..S+N-1):
    the setting they are built for (their caches fill over the stream); a Markdown table with the spread over
    orders."""
    from promptkd.cli.main import main as cli

    common = ["--preset", "world", "--datasets", *SETS, "--data-root", root, "--max-images", "0", "--no-progress"]
    common += ["--model", TEACHER, "--pretrained", "shipped", "--mode", "online", "--orders", str(orders)]
    header = "| method | " + " | ".join(SETS) + " | shift average (± over orders) | ECE | ms / image |"
    lines = [header, "|" + "---|" * (len(SETS) + 4)]
    for method in FULL_STREAM_METHODS:
        folder = out / "full_stream" / method
        finished = len(list(folder.glob("*-test_time_classification.json"))) >= len(SETS) * orders
        if not finished and cli(["tta", "--method", method, *common, "--seed", str(seed), "--out", str(folder)]):
            raise SystemExit(f"tta --method {method} (full stream) failed")
        records = [json.loads(p.read_text()) for p in folder.glob("*-test_time_classification.json")]
        for record in records:  # group by stream order, as _row groups by seed
            record["seed"] = record["stream"]["order_seed"]
        if method == FULL_STREAM_METHODS[0]:
            per_set = _per_set(records, "base_acc1")
            acc = _row(records, "base_acc1")
            cells = " | ".join(f"{per_set[name]:.1f}" for name in SETS)
            ece = _row(records, "base_ece")["mean"]
            lines.append(f"| zero-shot CLIP | {cells} | {acc['mean']:.1f} | {ece:.1f} | – |")
        per_set, acc = _per_set(records, "acc1"), _row(records, "acc1")
        ece, sec = _row(records, "ece")["mean"], _row(records, "seconds_per_image")["mean"]
        cells = " | ".join(f"{per_set[name]:.1f}" for name in SETS)
        lines.append(
            f"| {method} (online) | {cells} | {acc['mean']:.1f} ± {acc['std']:.1f} | {ece:.1f} | {1000 * sec:.1f} |"
        )
    return "\n".join(lines)


def _flips(folder: Path) -> tuple[float, float, float]:
    """% of test images whose prediction the adaptation changed, fixed (wrong -> right) and broke (right -> wrong)."""
    changed = fixed = broken = total = 0
    for path in folder.glob("*-predictions.csv"):
        with path.open(newline="") as handle:
            for row in csv.DictReader(handle):
                before, after = row["base_prediction"] == row["label"], row["prediction"] == row["label"]
                changed += row["prediction"] != row["base_prediction"]
                fixed += after and not before
                broken += before and not after
                total += 1
    return tuple(100.0 * count / max(total, 1) for count in (changed, fixed, broken))


def _records(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("seed_*/*/*-test_time_classification.json"))]


def _row(records: list[dict], key: str) -> dict[str, float]:
    """Per seed, the shift average of ``key``; then mean and std over seeds."""
    by_seed: dict[int, list[float]] = {}
    for record in records:
        by_seed.setdefault(record["seed"], []).append(record["metrics"][key])
    averages = [
        100 * statistics.fmean(v) if key != "seconds_per_image" else statistics.fmean(v) for v in by_seed.values()
    ]
    spread = statistics.stdev(averages) if len(averages) > 1 else 0.0
    return {"mean": statistics.fmean(averages), "std": spread, "seeds": len(averages)}


def table(out: Path) -> list[dict]:
    """One row per method (and per base: zero-shot CLIP, MaPLe), shift-averaged."""
    records = _records(out)
    rows: list[dict] = []
    groups: dict[str, list[dict]] = {}
    for record in records:
        groups.setdefault(record["method"], []).append(record)
    for base_name, source in (("zero-shot CLIP", "tpt"), ("MaPLe (base)", "promptalign")):
        base_records = [r for r in groups.get(source, [])]
        if base_records:
            rows.append(
                {
                    "method": base_name,
                    "acc": _row(base_records, "base_acc1"),
                    "ece": _row(base_records, "base_ece"),
                    "per_set": _per_set(base_records, "base_acc1"),
                    "seconds": None,
                }
            )
    for method, group in sorted(groups.items()):
        rows.append(
            {
                "method": method,
                "acc": _row(group, "acc1"),
                "ece": _row(group, "ece"),
                "per_set": _per_set(group, "acc1"),
                "seconds": _row(group, "seconds_per_image"),
            }
        )
    return rows


def _per_set(records: list[dict], key: str) -> dict[str, float]:
    values: dict[str, list[float]] = {}
    for record in records:
        values.setdefault(record["dataset"], []).append(100 * record["metrics"][key])
    return {name: statistics.fmean(v) for name, v in sorted(values.items())}


def markdown(rows: list[dict]) -> str:
    lines = [
        "| method | " + " | ".join(SETS) + " | shift average | ECE | ms / image | seeds |",
        "|---|" + "---|" * (len(SETS) + 4),
    ]
    for row in rows:
        acc, ece, sec = row["acc"], row["ece"], row["seconds"]
        cells = [f"{row['per_set'].get(name, float('nan')):.1f}" for name in SETS]
        time = f"{1000 * sec['mean']:.1f}" if sec else "–"
        lines.append(
            f"| {row['method']} | {' | '.join(cells)} | {acc['mean']:.1f} ± {acc['std']:.1f} | "
            f"{ece['mean']:.1f} ± {ece['std']:.1f} | {time} | {acc['seeds']} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 4.2))
    axes = figure.add_subplot()
    for row in rows:
        if not row["seconds"]:
            axes.axhline(row["acc"]["mean"], linestyle=":", color="grey", linewidth=1)
            axes.annotate(
                f"{row['method']} (no adaptation)",
                (0.42, row["acc"]["mean"]),
                xycoords=("axes fraction", "data"),
                ha="center",
                va="top",
                fontsize=8,
                color="grey",
            )
            continue
        x, y = row["seconds"]["mean"], row["acc"]["mean"]
        axes.errorbar(x, y, yerr=row["acc"]["std"], fmt="o", capsize=3)
        axes.annotate(row["method"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    axes.set_xscale("log")
    axes.set_xlabel("seconds per image (log)")
    axes.set_ylabel("accuracy, shift average (%)")
    axes.set_title("Test-time adaptation on the world's shifted shapes sets")
    axes.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/world_tta")
    parser.add_argument("--world-root", default=None)
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--max-images", type=int, default=MAX_IMAGES, help="images per set (0: all 1,920)")
    parser.add_argument("--methods", nargs="+", default=list(ALL_METHODS))
    parser.add_argument("--table-only", action="store_true", help="aggregate what is there, run nothing")
    parser.add_argument(
        "--ablate", choices=sorted(ABLATIONS), help="only this method, one setting changed at a time (seed 1)"
    )
    parser.add_argument(
        "--full-stream", action="store_true", help="only TDA and DPE online over all 1,920 images, 3 stream orders"
    )
    args = parser.parse_args()
    if args.full_stream:
        text = full_stream(str(ensure_world(args.world_root)), Path(args.out))
        (Path(args.out) / "full_stream.md").write_text(text + "\n")
        print(text)
        return
    if args.ablate:
        text = ablation(args.ablate, str(ensure_world(args.world_root)), Path(args.out), args.max_images)
        (Path(args.out) / f"{args.ablate}_sweep.md").write_text(text + "\n")
        print(text)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.table_only:
        root = str(ensure_world(args.world_root))
        for seed in args.seeds:
            run_seed(root, seed, out, args.max_images, args.methods)
    rows = table(out)
    text = markdown(rows)
    (out / "tta_table.md").write_text(text + "\n")
    (out / "tta_table.json").write_text(json.dumps(rows, indent=1))
    plot(rows, out / "tta_speed.png")
    print(text)


if __name__ == "__main__":
    main()
