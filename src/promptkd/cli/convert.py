"""`promptkd convert`: turn a CoOp/MaPLe/PromptSRC/PromptKD reference checkpoint into a promptkd checkpoint."""

from __future__ import annotations

import argparse

from promptkd.cli import validate as v

HELP = "convert a reference (Dassl) prompt checkpoint into promptkd's format and report what was mapped"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from promptkd.cli.common import add_backbone_args

    parser.add_argument(
        "checkpoint", type=v.input_file, help="reference checkpoint, e.g. model-best.pth.tar or model.pth.tar-20"
    )
    parser.add_argument(
        "--out", type=v.output_file, required=True, help="output stem: writes OUT.safetensors and OUT.json"
    )
    parser.add_argument(
        "--classnames",
        type=v.text_file,
        default=None,
        help="text file with one class name per line, bound to the checkpoint (optional)",
    )
    parser.add_argument(
        "--ctx-init",
        type=v.text,
        default=None,
        help="CTX_INIT a MaPLe/IVLP/PromptSRC file was trained with, when not the reference's 'a photo of a' "
        "('random' for random context)",
    )
    add_backbone_args(parser)


def run(args: argparse.Namespace) -> int:
    from promptkd.checkpoints import convert_reference_checkpoint
    from promptkd.cli.common import backbone_from_args

    backbone = backbone_from_args(args, require_weights=False) if (args.model or args.pretrained) else None
    classnames = None
    if args.classnames:
        from promptkd.data.userdata import read_classnames

        classnames = read_classnames(args.classnames)
    ctx_init = None if args.ctx_init is None else ("" if args.ctx_init.strip().lower() == "random" else args.ctx_init)
    written, report = convert_reference_checkpoint(
        args.checkpoint, args.out, backbone=backbone, classnames=classnames, ctx_init=ctx_init
    )
    print(report.summary())
    if backbone is None:
        print("  (no --model given: prompt shapes were not checked against a backbone)")
    print(f"wrote {written} and {written.with_suffix('.json')}")
    return 0
