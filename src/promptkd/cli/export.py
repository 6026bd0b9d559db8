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
    parser.add_argument(
        "--quantize",
        choices=["int8"],
        default=None,
        help="int8: an ONNX student quantised by ONNX Runtime (static, calibrated), refused below --min-agreement",
    )
    parser.add_argument(
        "--calibration",
        type=v.text,
        default=None,
        help="--quantize: a folder of unlabelled images like those it will see, or a dataset name (e.g. shapes)",
    )
    parser.add_argument(
        "--calibration-count", type=v.count, default=64, help="images to calibrate on (the check uses up to 4x)"
    )
    parser.add_argument(
        "--min-agreement",
        type=v.fraction,
        default=0.99,
        help="--quantize: the top-1 agreement with the fp32 student it must reach, else nothing is written",
    )


def _export_hub(args: argparse.Namespace) -> int:
    """--format hub: the folder a Hub model repo holds; loadable as it is, or as hf-hub:ORG/NAME once uploaded."""
    from promptkd.hub import HubError
    from promptkd.hub_export import export_hub

    given = [f for f in ("check_images", "quantize", "calibration") if getattr(args, f, None)]
    if given:  # a Hub folder holds the run's own files: nothing to check on images, nothing quantised
        flag = "--" + given[0].replace("_", "-")
        raise HubError(f"{flag} applies to --format torchscript/onnx; --format hub copies the run's own files.")
    config = export_hub(args.checkpoint, args.out, args.features)
    print(f"wrote {args.out}: {', '.join(sorted(config['sha256']))} + config.json + README.md (model card)")
    print(f"upload it: hf upload ORG/NAME {args.out} . ; then use it as hf-hub:ORG/NAME[@REVISION]")
    return 0


def run(args: argparse.Namespace) -> int:
    from promptkd.deploy import DeployError, export_student, image_paths

    if args.format == "hub":
        return _export_hub(args)

    images = image_paths(args.check_images) if args.check_images else None
    if args.quantize:
        return _export_int8(args, images)
    if args.calibration:
        raise DeployError("--calibration applies to --quantize int8; add --quantize int8 or leave it out.")
    manifest = export_student(args.checkpoint, args.out, args.features, check_images=images, fmt=args.format)
    check = manifest["check"]
    print(
        f"wrote {args.out}/{manifest['model_file']} + classnames.json + export.json; check on {check['images']} "
        f"images: same top-1 {check['same_top1']}, max |logit diff| {check['max_abs_logit_diff']:.2e}"
    )
    return 0


def _export_int8(args: argparse.Namespace, images: list[str] | None) -> int:
    """--quantize int8: an int8 ONNX student, written only if it agrees with the fp32 one (figures printed)."""
    from promptkd.deploy import DeployError, export_student

    if args.format == "hub":
        raise DeployError("--quantize int8 writes an ONNX student; use --format onnx (a Hub folder holds the run).")
    if not args.calibration:
        raise DeployError("--quantize int8 needs images to calibrate on: --calibration FOLDER_OR_DATASET.")
    manifest = export_student(
        args.checkpoint,
        args.out,
        args.features,
        check_images=images,
        fmt="onnx",
        quantize="int8",
        calibration=args.calibration,
        calibration_count=args.calibration_count,
        min_agreement=args.min_agreement,
    )
    check = manifest["quantization"]["check"]
    figures = [f"top-1 agreement with fp32 {100 * check['top1_agreement']:.2f}%"]
    if "hm_difference" in check:
        figures.append(f"HM {100 * check['hm_fp32']:.2f} -> {100 * check['hm_int8']:.2f}")
    elif "accuracy_difference" in check:
        figures.append(f"accuracy {100 * check['accuracy_fp32']:.2f} -> {100 * check['accuracy_int8']:.2f}")
    print(
        f"wrote {args.out}/{manifest['model_file']} + classnames.json + export.json; int8 check on "
        f"{check['images']} images: {', '.join(figures)}"
    )
    return 0
