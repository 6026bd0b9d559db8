"""`promptkd predict`: top-k classes for image files from a checkpoint (a PromptKD student needs no teacher), or from
an exported student folder run by ONNX Runtime (`--engine onnx`). Images are decoded in parallel (`--workers`) and
the CSV is written batch by batch: a folder of a million images is never held in memory."""

from __future__ import annotations

import argparse
from pathlib import Path

from promptkd.cli import validate as v

HELP = "predict top-k classes for images (folder, list file or files) and write a CSV"


def model_source(value: str) -> str:
    """A checkpoint (as every command takes one) or a folder: an export folder for --engine onnx, a Hub folder for
    --engine torch; which of the two is checked in ``run``, once the engine is known."""
    if Path(v.text(value)).expanduser().is_dir():
        return value
    return v.checkpoint(value)


model_source.kind = v.input_path.kind  # type: ignore[attr-defined]  # refuses what input_path refuses, by name
model_source.meaning = "a promptkd checkpoint or an export folder"  # type: ignore[attr-defined]
model_source.__name__ = model_source.meaning  # type: ignore[attr-defined]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint",
        type=model_source,
        help="promptkd checkpoint (e.g. a distilled student's prompts.safetensors), or with --engine onnx the "
        "folder `promptkd export --format onnx` wrote",
    )
    parser.add_argument(
        "images", nargs="+", type=v.input_path, help="image files, folders (any nesting) or .txt lists of paths"
    )
    parser.add_argument(
        "--engine",
        choices=["torch", "onnx"],
        default="torch",
        help="torch: the checkpoint's method in PyTorch; onnx: an exported student in ONNX Runtime (fp32 or int8)",
    )
    parser.add_argument(
        "--features", type=v.features, default=None, help="stored teacher features (default: next to the student)"
    )
    parser.add_argument("--top-k", type=v.count, default=5)
    parser.add_argument("--batch-size", type=v.count, default=64)
    parser.add_argument("--workers", type=v.count0, default=2, help="processes decoding images (0: in-process)")
    parser.add_argument("--out", type=v.output_file, default="predictions.csv", help="CSV to write")
    parser.add_argument("--skip-bad", action="store_true", help="skip unreadable images (counted at the end)")
    parser.add_argument("--device", type=v.text, default="cpu")
    parser.add_argument("--no-progress", action="store_true")


def _predictor(args: argparse.Namespace):
    """The engine the options name, with any mismatch between engine and model refused by name."""
    from promptkd.cli.common import resolve_device
    from promptkd.deploy import DeployError, OnnxPredictor, TorchPredictor, load_for_inference

    if args.engine == "onnx":
        if args.features is not None:
            raise DeployError("--features applies to --engine torch; an export folder holds its class features.")
        return OnnxPredictor(args.checkpoint, beside_decoders=args.workers > 0)
    checkpoint = args.checkpoint
    if Path(checkpoint).is_dir():
        if (Path(checkpoint) / "export.json").is_file():
            raise DeployError(f"{checkpoint} is an export folder; run it with --engine onnx.")
        try:
            checkpoint = v.checkpoint(checkpoint)  # a Hub folder: its checkpoint
        except argparse.ArgumentTypeError as error:
            raise DeployError(str(error)) from None
    method = load_for_inference(checkpoint, args.features, device=resolve_device(args.device))
    return TorchPredictor(method)


def run(args: argparse.Namespace) -> int:
    from promptkd.cli.common import print_table
    from promptkd.deploy import PredictionsCSV, PredictStats, count_images, iter_predictions
    from promptkd.paths import writable_file

    writable_file(args.out)  # before any prediction is made
    total = count_images(args.images)  # every source checked here, before a loader worker starts
    predictor = _predictor(args)
    stats, first = PredictStats(), []
    k = min(args.top_k, len(predictor.classnames))
    batches = iter_predictions(
        predictor,
        args.images,
        top_k=args.top_k,
        batch_size=args.batch_size,
        workers=args.workers,
        skip_bad=args.skip_bad,
        progress=not args.no_progress,
        total=total,
        stats=stats,
    )
    with PredictionsCSV(args.out, k) as out:
        for batch in batches:
            out.write(batch)
            first.extend(batch[: 10 - len(first)])
    print_table(["image", "top-1 class", "score"], [(p.path[-48:], p.label(0), f"{p.scores[0]:.3f}") for p in first])
    if first and first[0].repeated:
        shown = ", ".join(sorted(first[0].repeated)[:5])
        print(f"the class list repeats names ({shown}); [#row] and the CSV's index columns say which row is meant")
    skipped = f"; skipped {len(stats.skipped)} unreadable: {stats.skipped[:5]}" if stats.skipped else ""
    print(f"{stats.predicted} images -> {args.out}{skipped}")
    return 0
