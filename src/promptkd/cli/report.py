"""`promptkd report`: aggregate result JSONs (seeds, datasets, base-to-novel HM) into Markdown, JSON and charts,
and with ``--html`` one self-contained page of them (see :mod:`promptkd.html_report`)."""

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
    parser.add_argument(
        "--html",
        type=v.output_file,
        default=None,
        metavar="FILE",
        help="also write one self-contained HTML page (tables, charts, training curves, confusion matrix, gallery)",
    )


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
    if args.html:
        from promptkd.html_report import report_page

        markdown = format_markdown(report) + ("\n" + distillation_section(summary) if summary else "")
        charts = {k.split(":", 1)[1]: v for k, v in paths.items() if k.startswith("plot:")}
        page = report_page(markdown, report, results, args.run_dirs, charts)
        print(f"wrote {page.write(args.html)}")
    return 0
