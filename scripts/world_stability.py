"""Seed stability on the embedded world: which randomness moves base-to-novel results, and does averaging help.

    python scripts/world_stability.py --out runs/world_stability [--dataset shapes] [--method coop] [--seeds 5]
        [--average-last K] [--restarts R] [--set train.epochs=10 ...]

A promptkd run has three sources of randomness, each with its own seed: the few-shot sample (``split_seed``),
the method's initialisation (``init_seed``) and the data order / augmentation / in-training randomness
(``train.seed``). For each factor, N runs vary that seed alone (the others held at 1); then N full seeds (all
three moved together) of the plain recipe, of the same recipe with ``train.average_last_epochs: K`` and with
``restarts: R`` (R initialisations, the lowest last-epoch training loss kept): the two variance-reduction options,
no test or validation label involved. Every run writes its result JSONs under
``<out>/<dataset>/<method>/split<a>-init<b>-order<c>[-avg<K>]/`` (finished runs are skipped; the all-ones run is
shared by the three factors); the table is printed and written to ``<out>/stability.md`` and ``stability.json``.
Stds are population stds over seeds (as ``promptkd report``), intervals Student-t 95% with n−1 dof.

Note: a method whose prompt starts from a phrase (CoOp's world preset: "a photo of a") has a fixed
initialisation, so its init factor shows no spread; pass ``--set method.ctx_init=`` for a random start.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

STUDENT = "pkd-world-student"


def job_folder(
    out: Path, dataset: str, method: str, split: int, init: int, order: int, average: int, restarts: int = 1
) -> Path:
    name = f"split{split}-init{init}-order{order}" + (f"-avg{average}" if average else "")
    name += f"-restarts{restarts}" if restarts > 1 else ""
    return out / dataset / method / name


def jobs(n: int, average: int, restarts: int) -> dict[str, list[tuple[int, int, int, int, int]]]:
    """(split, init, order, average, restarts) per table row: one factor varied at a time, then full seeds."""
    seeds = range(1, n + 1)
    return {
        "split": [(s, 1, 1, 0, 1) for s in seeds],
        "init": [(1, s, 1, 0, 1) for s in seeds],
        "order": [(1, 1, s, 0, 1) for s in seeds],
        "full (plain)": [(s, s, s, 0, 1) for s in seeds],
        f"full (averaged last {average})": [(s, s, s, average, 1) for s in seeds],
        f"full (lowest-loss of {restarts} inits)": [(s, s, s, 0, restarts) for s in seeds],
    }


def read_accuracies(folder: Path) -> dict[str, float] | None:
    """Base and novel accuracy (%) of a finished run folder, or None when it has no results yet."""
    from promptkd.results import find_results

    if not folder.is_dir():
        return None
    found = {r.get("subsample"): r for r in find_results([folder]) if r.get("task") == "classification"}
    if not {"base", "new"} <= set(found):
        return None
    return {"base": 100 * found["base"]["metrics"]["acc1"], "novel": 100 * found["new"]["metrics"]["acc1"]}


def run_one(args: argparse.Namespace, root: str, seeds: tuple[int, int, int, int, int]) -> dict[str, float]:
    from promptkd.backbones.weights import shipped_weights
    from promptkd.engine.run import resolve_run_config, run_training

    split, init, order, average, restarts = seeds
    folder = job_folder(Path(args.out), args.dataset, args.method, *seeds)
    done = read_accuracies(folder)
    if done is not None:
        return {**done, "skipped": 1.0}
    overrides = [
        *args.set,
        f"split_seed={split}",
        f"init_seed={init}",
        f"train.seed={order}",
        "train.progress=false",
    ]
    if average:
        overrides.append(f"train.average_last_epochs={average}")
    if restarts > 1:
        overrides.append(f"restarts={restarts}")
    base = {
        "dataset": args.dataset,
        "data_root": root,
        "shots": args.shots,
        "subsample": "base",
        "seed": split,  # names the result files; split_seed / init_seed above say what each part used
        "model": args.model,
        "pretrained": args.pretrained or (shipped_weights(STUDENT) if args.model == STUDENT else None),
        "out": str(folder),
    }
    config = resolve_run_config(args.method, args.preset, overrides, base)
    tic = time.perf_counter()
    run_training(config)
    seconds = time.perf_counter() - tic
    accuracies = read_accuracies(folder)
    if accuracies is None:
        raise SystemExit(f"{folder}: the run wrote no base and novel results (a class-bound method?)")
    (folder / "stability_run.json").write_text(json.dumps({"seconds": seconds, **accuracies}) + "\n")
    return {**accuracies, "seconds": seconds}


def summarise(rows: dict[str, list[dict[str, float]]]) -> tuple[str, dict[str, Any]]:
    """The Markdown tables and their JSON: per factor the std of B, N and HM; plain vs averaged with intervals."""
    from promptkd.evaluation.metrics import harmonic_mean
    from promptkd.results import Stat

    data: dict[str, Any] = {}
    lines = [
        "| Varied | Runs | Base std | Novel std | HM std | HM mean |",
        "|--------|------|----------|-----------|--------|---------|",
    ]
    for name, runs in rows.items():
        hm = Stat.of([harmonic_mean(r["base"], r["novel"]) for r in runs])
        base, novel = Stat.of([r["base"] for r in runs]), Stat.of([r["novel"] for r in runs])
        data[name] = {"base": base.__dict__, "novel": novel.__dict__, "hm": hm.__dict__}
        lines.append(f"| {name} | {hm.n} | {base.std:.2f} | {novel.std:.2f} | {hm.std:.2f} | {hm.mean:.2f} |")
    lines += [
        "",
        "| Recipe | Seeds | HM mean ± std | HM 95% interval | Base | Novel |",
        "|--------|-------|---------------|-----------------|------|-------|",
    ]
    for name in [n for n in rows if n.startswith("full")]:
        hm = Stat(**data[name]["hm"])
        base, novel = Stat(**data[name]["base"]), Stat(**data[name]["novel"])
        lines.append(f"| {name} | {hm.n} | {hm.text()} | {hm.ci_text()} | {base.text()} | {novel.text()} |")
    return "\n".join(lines), data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/world_stability")
    parser.add_argument("--world-root", default=None)
    parser.add_argument("--dataset", default="shapes")
    parser.add_argument("--method", default="coop")
    parser.add_argument("--preset", default="world")
    parser.add_argument("--model", default=STUDENT)
    parser.add_argument("--pretrained", default=None, help="default: the shipped pkd-world-student weights")
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--seeds", type=int, default=5, help="runs per factor and per recipe (default 5)")
    parser.add_argument("--average-last", type=int, default=None, help="K for the averaged recipe (default E/2)")
    parser.add_argument("--restarts", type=int, default=3, help="initialisations per run of the restarts recipe")
    parser.add_argument("--set", nargs="*", default=[], help="extra overrides, e.g. train.epochs=10")
    args = parser.parse_args()
    if args.seeds < 2:
        parser.error("--seeds must be at least 2 (a spread needs two runs)")
    if args.restarts < 2:
        parser.error("--restarts must be at least 2 (one initialisation is the plain recipe)")
    from promptkd.data.world import ensure_world
    from promptkd.engine.run import resolve_run_config

    root = str(ensure_world(args.world_root))
    epochs = resolve_run_config(args.method, args.preset, list(args.set), {}).train.epochs
    average = min(epochs, args.average_last or max(2, epochs // 2))  # 1: averaging one epoch is the plain recipe
    rows: dict[str, list[dict[str, float]]] = {}
    ran, seconds = 0, []
    for name, plan in jobs(args.seeds, average, args.restarts).items():
        rows[name] = [run_one(args, root, seeds) for seeds in plan]
        ran += sum(1 for r in rows[name] if "seconds" in r)
        seconds += [r["seconds"] for r in rows[name] if "seconds" in r]
    text, data = summarise(rows)
    header = f"{args.method} on {args.dataset}, base-to-novel {args.shots} shots, {args.seeds} seeds per row"
    out = Path(args.out)
    (out / "stability.md").write_text(f"# Seed stability: {header}\n\n{text}\n")
    (out / "stability.json").write_text(json.dumps({"setting": header, "rows": data}, indent=2) + "\n")
    print(f"{header}\n\n{text}\n")
    timing = f", {sum(seconds) / len(seconds):.1f} s per run" if seconds else ""
    print(f"{ran} ran{timing}; wrote {out / 'stability.md'}")


if __name__ == "__main__":
    main()
