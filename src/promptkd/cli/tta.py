"""`promptkd tta`: test-time adaptation (prompt tuning and training-free methods) over datasets, batched."""

from __future__ import annotations

import argparse

from promptkd.cli import validate as v

HELP = (
    "test-time adaptation of each test image (tpt, ctpt, promptalign, promptsync; training-free tda, zero, dpe, "
    "boostadapter), episodic or online, with accuracy, ECE, seconds per image and peak memory"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from promptkd.cli.common import add_backbone_args, add_runtime_args

    parser.add_argument(
        "--method", type=v.text, default="tpt", help="tpt, ctpt, promptalign, promptsync, tda, zero, dpe, boostadapter"
    )
    parser.add_argument(
        "--mode",
        choices=["episodic", "online"],
        default=None,
        help="episodic: state reset per image; online: carried across the test stream (order from --seed); default: "
        "the method's own (online for tda, dpe, boostadapter; episodic for the others)",
    )
    parser.add_argument("--orders", type=v.count, default=None, help="online: stream orders to run, seeds S..S+N-1 (1)")
    parser.add_argument(
        "--preset", type=v.text, default=None, help="settings preset of the method (e.g. default, world)"
    )
    parser.add_argument(
        "--datasets",
        nargs="+",
        action=v.Repeatable,
        type=v.text,
        default=None,
        help="datasets to adapt on (their test split)",
    )
    parser.add_argument(
        "--data-root", type=v.input_folder, default=None, help="datasets folder (world datasets: the world's folder)"
    )
    parser.add_argument("--split", type=v.text, default=None, help="split to adapt on (test)")
    parser.add_argument(
        "--base", type=v.checkpoint, default=None, help="CoOp or MaPLe checkpoint to start from (default: --init text)"
    )
    parser.add_argument(
        "--init", type=v.text, default=None, help="hand-written context without --base ('a photo of a')"
    )
    parser.add_argument(
        "--stats", type=v.checkpoint, default=None, help="token statistics file (promptalign; `promptkd tta-stats`)"
    )
    parser.add_argument(
        "--prototypes", type=v.checkpoint, default=None, help="class prototype file (promptsync; `promptkd tta-stats`)"
    )
    parser.add_argument("--batch-size", type=v.count, default=None, help="test images adapted together (8)")
    parser.add_argument(
        "--max-images", type=v.count0, default=None, help="adapt at most N images per dataset (0 = all)"
    )
    parser.add_argument(
        "--seed", type=v.seed, default=None, help="seed of the views (per image path) and of the online stream order"
    )
    parser.add_argument(
        "--allow-small-images", action="store_true", default=None, help="upsample images too small for the crops"
    )
    parser.add_argument("--workers", type=v.count0, default=None, help="data-loading worker processes (0)")
    parser.add_argument("--out", type=v.output_folder, default=None, help="output folder (runs/tta)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace earlier results of the same setting in --out, or discard an interrupted run there (refused)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--set",
        nargs="*",
        action=v.Repeatable,
        type=v.text,
        default=[],
        metavar="KEY=VALUE",
        help="override settings (method.lr=...)",
    )
    add_backbone_args(parser)
    add_runtime_args(parser)


def run(args: argparse.Namespace) -> int:
    from promptkd.tta.run import resolve_tta_config, run_tta

    base = {
        "method": args.method,
        "datasets": args.datasets,
        "data_root": args.data_root,
        "split": args.split,
        "model": args.model,
        "pretrained": args.pretrained,
        "quick_gelu": args.quick_gelu,
        "base": args.base,
        "init": args.init,
        "stats": args.stats,
        "prototypes": args.prototypes,
        "batch_size": args.batch_size,
        "max_images": args.max_images,
        "seed": args.seed,
        "mode": args.mode,
        "orders": args.orders,
        "allow_small_images": args.allow_small_images,
        "workers": args.workers,
        "out": args.out,
        "device": args.device,
        "precision": args.precision,
        "progress": False if args.no_progress else None,
    }
    config = resolve_tta_config(args.preset, list(args.set), base)
    run_tta(config, overwrite=args.overwrite)  # an earlier result (or interrupted run) is never replaced silently
    return 0
