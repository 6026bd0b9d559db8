"""Arguments and helpers shared by the subcommands."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from promptkd.cli import validate as v
from promptkd.precision import PRECISIONS

if TYPE_CHECKING:
    from promptkd.backbones import Backbone


def add_backbone_args(
    parser: argparse.ArgumentParser, *, prefix: str = "", default_model: str | None = None, alias: bool = False
) -> None:
    """--model/--pretrained/--quick-gelu (optionally prefixed, e.g. --teacher-model; ``alias``: --student too)."""
    dash = f"--{prefix}-" if prefix else "--"
    dest = f"{prefix}_" if prefix else ""
    group = parser.add_argument_group(f"{prefix or 'model'} backbone")
    group.add_argument(
        f"{dash}model",
        *([f"--{prefix}"] if alias and prefix else []),
        dest=f"{dest}model",
        type=v.text,
        default=default_model,
        help="open_clip model name (ViT-B-16, ViT-L-14, pkd-tiny, ...) or local-dir:<folder>; "
        "omit to infer it from a weight file",
    )
    group.add_argument(
        f"{dash}pretrained",
        dest=f"{dest}pretrained",
        type=v.text,
        default=None,
        help="pretrained tag (openai, laion2b_s34b_b88k, ...) or a weight file (.pt/.bin/.safetensors)",
    )
    group.add_argument(
        f"{dash}quick-gelu",
        dest=f"{dest}quick_gelu",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="force QuickGELU on or off (default: decided from the weights)",
    )


def add_overrides_arg(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    example: str,
    *,
    flag: str = "--set",
    dest: str = "overrides",
    what: str = "overrides",
) -> None:
    """``--set KEY=VALUE ...``: config overrides applied after the preset and the options (``args.overrides``;
    ``flag``/``dest`` name another set, e.g. a protocol's teacher overrides). Repeating the flag adds to the list
    (argparse's default would keep only the last one, silently dropping the others)."""
    parser.add_argument(
        flag,
        dest=dest,
        nargs="*",
        action=v.Repeatable,
        type=v.text,
        default=[],
        metavar="KEY=VALUE",
        help=f"{what}, e.g. {example}",
    )


def add_runtime_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("runtime")
    group.add_argument(
        "--device", type=v.text, default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)"
    )
    group.add_argument(
        "--precision",
        default="fp32",
        choices=PRECISIONS,
        help="compute precision: fp32, bf16 autocast, fp16 autocast (GPU only)",
    )


def resolve_device(name: str) -> str:
    """``auto`` → cuda when a GPU is there, else cpu; a CUDA device this machine lacks is refused."""
    from promptkd.engine.distributed import resolve_device as resolve

    return resolve(name)


def check_positive(**values: int | None) -> None:
    """Refuse counts below 1 (``--top-k 0``, ``--batch-size -1``), naming the flag."""
    from promptkd.errors import PromptKDError

    for name, value in values.items():
        if value is not None and value < 1:
            raise PromptKDError(f"--{name.replace('_', '-')} must be at least 1, got {value}.")


def backbone_from_args(args: argparse.Namespace, *, prefix: str = "", require_weights: bool = True) -> Backbone:
    """The backbone the arguments name; a run gets the model's shipped weights by default and random weights only
    with ``--pretrained random`` (``require_weights=False``: tools that only read shapes, e.g. convert)."""
    from promptkd.backbones import load_backbone
    from promptkd.backbones.loading import run_weights

    dest = f"{prefix}_" if prefix else ""
    model, pretrained = getattr(args, f"{dest}model"), getattr(args, f"{dest}pretrained")
    if require_weights:
        pretrained = run_weights(model, pretrained, flag=f"--{prefix}-pretrained" if prefix else "--pretrained")
    return load_backbone(
        model,
        pretrained,
        quick_gelu=getattr(args, f"{dest}quick_gelu"),
        device=resolve_device(getattr(args, "device", "cpu")),
        precision=getattr(args, "precision", "fp32"),
    )


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], file=None) -> None:
    """A plain aligned text table (Markdown-compatible)."""
    file = file or sys.stdout
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for index, row in enumerate(cells):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |", file=file)
        if index == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|", file=file)


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))
