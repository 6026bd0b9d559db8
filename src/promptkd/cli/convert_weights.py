"""`promptkd convert-weights`: CLIP weights in any format -> an open_clip local-dir folder (safetensors + config)."""

from __future__ import annotations

import argparse

from promptkd.cli import validate as v

HELP = "convert CLIP weights (e.g. OpenAI's TorchScript ViT-B-16.pt) into a safe open_clip local-dir folder"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from promptkd.cli.common import add_backbone_args

    add_backbone_args(parser)
    parser.add_argument(
        "--out", type=v.output_folder, required=True, help="output folder (loads later with --model local-dir:OUT)"
    )


def run(args: argparse.Namespace) -> int:
    from promptkd.backbones.export import save_local_dir
    from promptkd.cli.common import backbone_from_args

    backbone = backbone_from_args(args)
    folder = save_local_dir(backbone, args.out)
    print(
        f"wrote {folder} (quick_gelu={backbone.spec.quick_gelu}: {backbone.spec.quick_gelu_reason}); "
        f"load it with --model local-dir:{folder}"
    )
    return 0
