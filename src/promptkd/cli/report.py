"""`promptkd report`: aggregate result JSONs (seeds, datasets, base-to-novel HM) into Markdown, JSON and charts."""

from __future__ import annotations

import argparse
import os

from promptkd.cli import validate as v

HELP = "aggregate result files into a Markdown table, report.json and bar charts (HM from seed-averaged B and N)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "run_dirs",
        nargs="+",
        type=v.input_path,
        metavar="RUN_DIR",
        help="result folders (searched recursively) or files",
    )
    parser.add_argument(
        "--out",
        type=v.output_folder,
        default=None,
        help="folder for report.md, report.json and the PNG charts (default: the first RUN_DIR)",
    )
    parser.add_argument("--no-plot", action="store_true", help="skip the bar charts")


def run(args: argparse.Namespace) -> int:
    from promptkd.protocols.promptkd import distillation_section, distillation_summary, write_report_with_distillation
    from promptkd.results import ResultError, aggregate, find_results, format_markdown

    results = find_results(args.run_dirs)
    if not results:
        raise ResultError(
            f"no result JSON files (with 'dataset', 'task' and 'metrics') under {', '.join(args.run_dirs)}"
        )
    report = aggregate(results)
    first = args.run_dirs[0]
    out = args.out or (first if os.path.isdir(first) else os.path.dirname(os.path.abspath(first)))
    paths = write_report_with_distillation(report, results, out, plot=not args.no_plot)  # PromptKD protocol runs too
    images = {k.split(":", 1)[1]: v.name for k, v in paths.items() if k.startswith("plot:")}
    print(format_markdown(report, images))
    summary = distillation_summary(results)
    if summary:
        print(distillation_section(summary))
    print(f"wrote {paths['markdown']}, {paths['json']}" + "".join(f", {v}" for k, v in paths.items() if ":" in k))
    return 0
