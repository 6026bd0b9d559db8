"""`promptkd export`: the deployable PromptKD student as one TorchScript (or ONNX) file, checked against the method."""

from __future__ import annotations

import argparse

from promptkd.cli import validate as v

HELP = "export a distilled student (image tower + prompts + projector + stored features) and verify it"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=v.checkpoint, help="a promptkd student checkpoint")
    parser.add_argument(
        "--features", type=v.features, default=None, help="stored teacher features (default: next to the student)"
    )
    parser.add_argument("--out", type=v.output_folder, required=True, help="output folder")
    parser.add_argument(
        "--format",
        default="torchscript",
        choices=["torchscript", "onnx", "hub"],
        help="hub: the run's files + config.json + model card in the Hugging Face Hub's layout (upload the folder)",
    )
    parser.add_argument(
        "--check-images",
        nargs="*",
        action=v.Repeatable,
        type=v.input_path,
        default=None,
        help="images (files/folders) to compare predictions on (default: random inputs)",
    )


def _export_hub(args: argparse.Namespace) -> int:
    """--format hub: the folder a Hub model repo holds; loadable as it is, or as hf-hub:ORG/NAME once uploaded."""
    from promptkd.hub import HubError
    from promptkd.hub_export import export_hub

    if args.check_images:
        raise HubError("--check-images applies to --format torchscript/onnx; a Hub folder holds the run's own files.")
    config = export_hub(args.checkpoint, args.out, args.features)
    print(f"wrote {args.out}: {', '.join(sorted(config['sha256']))} + config.json + README.md (model card)")
    print(f"upload it: hf upload ORG/NAME {args.out} . ; then use it as hf-hub:ORG/NAME[@REVISION]")
    return 0


def run(args: argparse.Namespace) -> int:
    from promptkd.deploy import export_student, image_paths

    if args.format == "hub":
        return _export_hub(args)

    images = image_paths(args.check_images) if args.check_images else None
    manifest = export_student(args.checkpoint, args.out, args.features, check_images=images, fmt=args.format)
    check = manifest["check"]
    print(
        f"wrote {args.out}/{manifest['model_file']} + classnames.json + export.json; check on {check['images']} "
        f"images: same top-1 {check['same_top1']}, max |logit diff| {check['max_abs_logit_diff']:.2e}"
    )
    return 0
