"""Reproduce the README's embedded-world tables: base-to-novel per method, PromptKD (its protocol), test-time tuning.

    python scripts/world_results.py --out runs/world_results [--datasets shapes patterns counts] [--seeds 1 2 3]
        [--parts methods promptkd tta]

Every part writes result JSONs under --out (finished runs are skipped on a re-run); aggregate them with
`promptkd report <out>/methods/base2new` and `python scripts/world_tta.py --out <out>/tta --table-only`. The pair's
own table (zero-shot and full-data probe of both CLIPs, inference speed) comes from `promptkd world-report`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from promptkd.backbones.weights import shipped_weights
from promptkd.data.world import ensure_world

TEACHER, STUDENT = "pkd-world-teacher", "pkd-world-student"
METHODS = ("coop", "cocoop", "vpt", "ivlp", "maple", "promptsrc", "vp", "clip_adapter", "tip_adapter_f")


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
    """`promptkd protocol base2new --method promptkd --preset world` on every dataset and seed (finished stages are
    reused): PromptSRC teacher on 16 shots of the base classes, its stored features, the student distilled on the
    unlabelled train split; the report's PromptKD section (teacher, zero-shot and distilled student, gap closed,
    spread over seeds) is returned and written to <out>/promptkd/base2new/report.md."""
    import time

    from promptkd.protocols import ProtocolSpec, run_protocol

    tic = time.perf_counter()
    spec = ProtocolSpec(
        "base2new", "promptkd", "world", datasets, seeds, str(out / "promptkd"), data_root=root, progress=False
    )
    summary = run_protocol(spec)
    text = Path(summary["report"]["markdown"]).read_text(encoding="utf-8")
    section = text[text.index("## PromptKD") :] if "## PromptKD" in text else text
    return [section, f"promptkd part: {time.perf_counter() - tic:.0f} s ({summary})"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/world_results")
    parser.add_argument("--world-root", default=None)
    parser.add_argument("--datasets", nargs="+", default=["shapes", "patterns", "counts"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--parts", nargs="+", default=["methods", "promptkd", "tta"])
    args = parser.parse_args()
    root = str(ensure_world(args.world_root))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if "methods" in args.parts:
        methods_report(root, args.datasets, args.seeds, out, args.methods)
    if "promptkd" in args.parts:
        print("\n".join(promptkd_runs(root, args.datasets, args.seeds, out)))
    if "tta" in args.parts:
        from world_tta import ALL_METHODS, MAX_IMAGES, run_seed  # scripts/world_tta.py: every test-time method

        for seed in args.seeds:
            run_seed(root, seed, out / "tta", MAX_IMAGES, list(ALL_METHODS))


if __name__ == "__main__":
    main()
