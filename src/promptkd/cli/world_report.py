"""`promptkd world-report`: does the embedded world's CLIP pair have the real teacher-student pair's properties?

For every world dataset: zero-shot and full-data linear probe of the teacher and the student (base / novel / HM and
all-class accuracy), the image towers' inference speed (images/s, same machine, same run) and the checks of
:func:`promptkd.evaluation.world_report.check_properties`; then the shift table: each CLIP's zero-shot (all-way) on
every test-only shift of a measured dataset and its retention (shift / clean accuracy; real CLIP ViT-B/16 keeps
0.69-1.11 of ImageNet's on V2, Sketch, A and R). Prints the table, writes ``world_report.json`` and
``world_report.md`` under ``--out`` and, with ``--readme``, replaces the README's world-report section.
"""

from __future__ import annotations

import argparse
from typing import Any

from promptkd.cli import validate as v

HELP = "measure the embedded world's teacher and student CLIPs: zero-shot, linear probe, speed, pair properties"

DEFAULT_DATASETS = ("shapes", "patterns", "counts")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from promptkd.cli.common import add_runtime_args

    parser.add_argument(
        "--world-root",
        type=v.output_folder,
        default=None,
        help="the embedded world (default: promptkd's cache; built if absent)",
    )
    parser.add_argument(
        "--datasets",
        nargs="+",
        action=v.Repeatable,
        type=v.text,
        default=list(DEFAULT_DATASETS),
        help="world datasets to measure",
    )
    parser.add_argument("--teacher-model", type=v.text, default="pkd-world-teacher")
    parser.add_argument(
        "--teacher-pretrained", type=v.text, default="shipped", help="teacher weights (default: shipped)"
    )
    parser.add_argument("--student-model", type=v.text, default="pkd-world-student")
    parser.add_argument(
        "--student-pretrained", type=v.text, default="shipped", help="student weights (default: shipped)"
    )
    parser.add_argument(
        "--out", type=v.output_folder, default="runs/world-report", help="folder for world_report.json / .md"
    )
    parser.add_argument(
        "--readme", type=v.input_file, default=None, help="README to update between its world-report markers"
    )
    parser.add_argument("--no-probe", action="store_true", help="zero-shot only (no linear probe, no checks)")
    parser.add_argument("--no-speed", action="store_true", help="skip the inference-speed measurement")
    parser.add_argument("--no-shifts", action="store_true", help="skip the shift table (zero-shot on test-only sets)")
    add_runtime_args(parser)


def measure_shifts(models: dict[str, Any], root: Any, report: dict[str, Any]) -> list[dict[str, Any]]:
    """Zero-shot (all-way) of each model on every test-only shift of a measured dataset, and its retention ratio."""
    from promptkd.data.datasets import resolve_dataset
    from promptkd.data.world import WORLD_DATASETS, shift_datasets
    from promptkd.evaluation.world_report import measure_backbone

    rows = []
    for source in report["datasets"]:
        for name in shift_datasets(source, include_stress=True):
            splits = resolve_dataset(name, root)
            row: dict[str, Any] = {"set": name, "source": source, "stress": WORLD_DATASETS[name].stress}
            row["images"] = len(splits.split("test"))
            for role, backbone in models.items():
                clean = report["models"][role]["results"][source]["zeroshot"]["all"]
                shifted = measure_backbone(backbone, splits, probe=False)["zeroshot"]["all"]
                row[role] = {"zeroshot": shifted, "clean": clean, "retention": shifted / clean if clean else None}
            rows.append(row)
    return rows


def shift_markdown(rows: list[dict[str, Any]]) -> list[str]:
    """The shift table: per test-only set, each model's zero-shot and its retention of the clean accuracy."""
    roles = [r for r in ("teacher", "student") if rows and r in rows[0]]
    head = "| shift | of | images | " + " | ".join(f"{r} zero-shot | {r} retention" for r in roles) + " |"
    lines = [
        "Shifted test sets (zero-shot, all-way %; retention = shift / clean; CLIP ViT-B/16 on ImageNet's: 0.69-1.11):",
        "",
        head,
        "|---|---|---|" + "---|---|" * len(roles),
    ]
    for row in rows:
        cells = [f"{row['set']}{' (stress)' if row['stress'] else ''}", row["source"], str(row["images"])]
        for role in roles:
            r = row[role]
            retention = "n/a" if r["retention"] is None else f"{r['retention']:.2f}"
            cells += [f"{r['zeroshot']:.1f}", retention]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from promptkd.backbones import load_backbone
    from promptkd.checkpoints import atomic_write_text
    from promptkd.cli.common import resolve_device
    from promptkd.data.world import ensure_world, list_datasets
    from promptkd.errors import PromptKDError
    from promptkd.evaluation.world_report import checks_markdown, measure_pair, report_markdown, update_readme

    unknown = [d for d in args.datasets if d not in list_datasets()]
    if unknown:
        raise PromptKDError(f"not world datasets: {', '.join(unknown)}; choose from {', '.join(list_datasets())}.")
    if args.readme and not Path(args.readme).is_file():
        raise PromptKDError(f"--readme {args.readme}: no such file.")
    root = ensure_world(args.world_root)
    device = resolve_device(args.device)
    teacher = load_backbone(args.teacher_model, args.teacher_pretrained, device=device, precision=args.precision)
    student = load_backbone(args.student_model, args.student_pretrained, device=device, precision=args.precision)
    report = measure_pair(
        teacher.freeze(),
        student.freeze(),
        root,
        args.datasets,
        probe=not args.no_probe,
        speed=not args.no_speed,
        progress=lambda message: print(f"  {message}", flush=True),
    )
    if not args.no_shifts:
        report["shifts"] = measure_shifts({"teacher": teacher, "student": student}, root, report)
    lines = report_markdown(report)
    if report.get("speed_ratio"):
        lines += [
            "",
            f"Student vs teacher inference: {report['speed_ratio']:.2f}x the images/s (image towers, batch 256, "
            f"fp32, {report['threads']} threads, CPU capability {report['cpu_capability']}).",
        ]
    if report["checks"]:
        lines += ["", "Properties of the real pair, checked:", *checks_markdown(report)]
    if report.get("shifts"):
        lines += ["", *shift_markdown(report["shifts"])]
    print("\n".join(lines))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "world_report.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(out / "world_report.md", "\n".join(lines) + "\n")
    print(f"wrote {out / 'world_report.json'} and {out / 'world_report.md'}")
    if args.readme:
        if not update_readme(args.readme, lines):
            raise PromptKDError(
                f"{args.readme} has no world-report section; add the lines '<!-- world-report:start -->' and "
                "'<!-- world-report:end -->' where the table belongs."
            )
        print(f"updated {args.readme}")
    failed = [name for name, result in report["checks"].items() if not result["ok"]]
    if failed:
        print(f"warning: the pair lacks some properties of the real pair on {', '.join(failed)} (see above)")
    return 0
