"""`promptkd export`: the deployable PromptKD student as one TorchScript (or ONNX) file, checked against the method."""

from __future__ import annotations

import argparse

from promptkd.cli import validate as v

HELP = "export a distilled student (image tower + prompts + projector + stored features) and verify it"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=v.checkpoint, help="a promptkd student checkpoint")
    parser.add_argument(
        "--features", type=v.checkpoint, default=None, help="stored teacher features (default: next to the student)"
    )
    parser.add_argument("--out", type=v.output_folder, required=True, help="output folder")
    parser.add_argument("--format", default="torchscript", choices=["torchscript", "onnx"])
    parser.add_argument(
        "--check-images",
        nargs="*",
        action=v.Repeatable,
        type=v.input_path,
        default=None,
        help="images (files/folders) to compare predictions on (default: random inputs)",
    )


def run(args: argparse.Namespace) -> int:
    from promptkd.deploy import export_student, image_paths

    images = image_paths(args.check_images) if args.check_images else None
    manifest = export_student(args.checkpoint, args.out, args.features, check_images=images, fmt=args.format)
    check = manifest["check"]
    print(
        f"wrote {args.out}/{manifest['model_file']} + classnames.json + export.json; check on {check['images']} "
        f"images: same top-1 {check['same_top1']}, max |logit diff| {check['max_abs_logit_diff']:.2e}"
    )
    return 0
