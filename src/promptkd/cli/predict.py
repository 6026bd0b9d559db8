"""`promptkd predict`: top-k classes for image files from a checkpoint (a PromptKD student needs no teacher)."""

from __future__ import annotations

import argparse

from promptkd.cli import validate as v

HELP = "predict top-k classes for images (folder, list file or files) and write a CSV"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint", type=v.checkpoint, help="promptkd checkpoint (e.g. a distilled student's prompts.safetensors)"
    )
    parser.add_argument(
        "images", nargs="+", type=v.input_path, help="image files, folders (any nesting) or .txt lists of paths"
    )
    parser.add_argument(
        "--features", type=v.features, default=None, help="stored teacher features (default: next to the student)"
    )
    parser.add_argument("--top-k", type=v.count, default=5)
    parser.add_argument("--batch-size", type=v.count, default=64)
    parser.add_argument("--out", type=v.output_file, default="predictions.csv", help="CSV to write")
    parser.add_argument("--skip-bad", action="store_true", help="skip unreadable images (listed at the end)")
    parser.add_argument("--device", type=v.text, default="cpu")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from promptkd.cli.common import print_table, resolve_device
    from promptkd.deploy import image_paths, load_for_inference, predict, write_predictions_csv
    from promptkd.paths import writable_file

    writable_file(args.out)  # before any prediction is made
    paths = image_paths(args.images)
    method = load_for_inference(args.checkpoint, args.features, device=resolve_device(args.device))
    predictions, skipped = predict(
        method,
        paths,
        top_k=args.top_k,
        batch_size=args.batch_size,
        skip_bad=args.skip_bad,
        progress=not args.no_progress,
    )
    path = write_predictions_csv(predictions, args.out)
    rows = [(p.path[-48:], p.label(0), f"{p.scores[0]:.3f}") for p in predictions[:10]]
    print_table(["image", "top-1 class", "score"], rows)
    if predictions and predictions[0].repeated:
        shown = ", ".join(sorted(predictions[0].repeated)[:5])
        print(f"the class list repeats names ({shown}); [#row] and the CSV's index columns say which row is meant")
    print(
        f"{len(predictions)} images -> {path}"
        + (f"; skipped {len(skipped)} unreadable: {skipped[:5]}" if skipped else "")
    )
    return 0
