"""Arguments and the write-and-print step shared by the evaluation subcommands (zeroshot, linear-probe, retrieval)."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from promptkd.cli import validate as v


def add_data_args(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    group = parser.add_argument_group("data")
    group.add_argument(
        "--dataset",
        type=v.text,
        required=required,
        help="benchmark name (dtd, eurosat, imagenet, ...), embedded-world dataset (shapes, patterns, counts, "
        "shapes_v2, shapes_sketch, shapes_r, shapes_a, shapes_noise), a folder holding a split_zhou_<Name>.json, "
        "your folder of class folders, or your CSV/JSON image list",
    )
    group.add_argument(
        "--data-root",
        type=v.input_folder,
        default=None,
        help="folder holding the dataset folders (default: the world cache for world datasets, else $PROMPTKD_DATA "
        "or the current folder)",
    )
    group.add_argument(
        "--classnames",
        type=v.text_file,
        default=None,
        metavar="FILE",
        help="your data: class names (one per line, or JSON), matched to class folders by name",
    )
    group.add_argument(
        "--skip-bad", action="store_true", help="skip unreadable images (counted in the result) instead of failing"
    )


def add_eval_args(parser: argparse.ArgumentParser, *, default_out: str) -> None:
    group = parser.add_argument_group("evaluation")
    group.add_argument(
        "--out",
        type=v.output_folder,
        default=default_out,
        help=f"folder for the result JSON and runs.jsonl ({default_out})",
    )
    group.add_argument(
        "--method", type=v.text, default=None, help="method name recorded in the result (groups rows in reports)"
    )
    group.add_argument("--batch-size", type=v.count, default=64, help="images per forward pass (64)")
    group.add_argument("--workers", type=v.count0, default=2, help="data-loading worker processes (2; 0 = in-process)")
    group.add_argument(
        "--cache-dir",
        type=v.output_folder,
        default=None,
        help="cache image and text features here (keyed by model, files and transform)",
    )
    group.add_argument("--no-progress", action="store_true", help="no progress bars")
    group.add_argument(
        "--overwrite", action="store_true", help="replace an earlier result of the same setting in --out (refused)"
    )


def load_frozen_backbone(args: argparse.Namespace) -> Any:
    from promptkd.cli.common import backbone_from_args

    return backbone_from_args(args).freeze()


def write_and_print(
    result: Mapping[str, Any], out_dir: str, shown: Mapping[str, Any], *, digits: int = 2
) -> tuple[str, int]:
    """Write the result, print a one-row table of ``shown`` (fractions as %), return (path, exit code 0)."""
    from promptkd.cli.common import print_table
    from promptkd.results import write_result

    path = write_result(result, out_dir)  # the command checked before any work that it replaces nothing unasked
    cells = []
    for key, value in shown.items():
        if isinstance(value, float) and key not in ("C",):
            cells.append(f"{100 * value:.{digits}f}")
        elif isinstance(value, float):
            cells.append(f"{value:.4g}")
        else:
            cells.append(str(value))
    print_table(list(shown), [cells])
    if result.get("skipped_images"):
        print(f"{result['skipped_images']} unreadable images were skipped (listed in the result file).")
    if result.get("small_images"):
        print(
            f"{result['small_images']} images are far smaller than the model's input and were upsampled "
            "(counted in the result file as small_images)."
        )
    print(f"result: {path}")
    return str(path), 0
