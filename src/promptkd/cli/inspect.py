"""`promptkd inspect`: what a checkpoint holds (tensors, shapes, method, backbone, classes)."""

from __future__ import annotations

import argparse

HELP = "show what a promptkd checkpoint holds"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a promptkd checkpoint (.safetensors with its .json)")
    parser.add_argument("--json", action="store_true", help="print the JSON config as well")


def run(args: argparse.Namespace) -> int:
    from promptkd.checkpoints import load_checkpoint
    from promptkd.cli.common import print_json, print_table

    tensors, config = load_checkpoint(args.checkpoint)
    backbone = config.get("backbone") or {}
    print(f"method: {config.get('method')}   library {config.get('library_version')}   created {config.get('created')}")
    if backbone:
        print(
            f"backbone: {backbone.get('model_name')} / {backbone.get('pretrained') or 'random'} "
            f"(quick_gelu={backbone.get('quick_gelu')})"
        )
    classnames = config.get("classnames")
    if classnames:
        shown = ", ".join(classnames[:8]) + (", ..." if len(classnames) > 8 else "")
        print(f"classes ({len(classnames)}): {shown}")
    rows = [(name, list(t.shape), str(t.dtype).replace("torch.", ""), t.numel()) for name, t in sorted(tensors.items())]
    print_table(["tensor", "shape", "dtype", "values"], rows)
    print(f"total trainable values: {sum(t.numel() for t in tensors.values()):,}")
    if args.json:
        print_json(config)
    return 0
