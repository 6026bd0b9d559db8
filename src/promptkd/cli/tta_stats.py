"""`promptkd tta-stats`: source token statistics (PromptAlign) and class prototypes (PromptSync) on a proxy set."""

from __future__ import annotations

import argparse

from promptkd.cli import validate as v

HELP = "compute PromptAlign token statistics and PromptSync class prototypes on a proxy source set"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from promptkd.cli.common import add_backbone_args, add_runtime_args

    parser.add_argument(
        "--dataset", type=v.text, required=True, help="proxy source dataset (e.g. imagenet; its train split)"
    )
    parser.add_argument("--data-root", type=v.input_folder, default=None, help="datasets folder")
    parser.add_argument("--split", default="train", choices=("train", "val"), help="split of the proxy set")
    parser.add_argument(
        "--base", type=v.checkpoint, default=None, help="the MaPLe / CoOp checkpoint the test-time run starts from"
    )
    parser.add_argument("--init", type=v.text, default="a photo of a", help="hand-written context without --base")
    parser.add_argument("--stats", type=v.output_file, default=None, help="write token statistics here (PromptAlign)")
    parser.add_argument(
        "--layers", type=v.count0, nargs="+", action=v.Repeatable, default=[0, 1, 2], help="visual block inputs (0 1 2)"
    )
    parser.add_argument(
        "--prototypes", type=v.output_file, default=None, help="write class prototypes here (PromptSync)"
    )
    parser.add_argument("--augmented", type=v.count, default=8, help="augmented views per proxy image (prototypes)")
    parser.add_argument("--views-per-class", type=v.count, default=16, help="stored view features per class")
    parser.add_argument("--max-images", type=v.count0, default=0, help="use at most N proxy images (0 = all)")
    parser.add_argument("--seed", type=v.seed, default=0)
    parser.add_argument("--batch-size", type=v.count, default=64)
    parser.add_argument("--workers", type=v.count0, default=0)
    add_backbone_args(parser)
    add_runtime_args(parser)


def run(args: argparse.Namespace) -> int:
    from promptkd.cli.common import backbone_from_args, resolve_device
    from promptkd.config import ConfigError
    from promptkd.data.datasets import resolve_dataset
    from promptkd.tta.model import build_model
    from promptkd.tta.run import subset_items
    from promptkd.tta.sources import compute_prototypes, compute_stats

    if not args.stats and not args.prototypes:
        raise ConfigError("nothing to compute: give --stats FILE and/or --prototypes FILE")
    splits = resolve_dataset(args.dataset, args.data_root)
    items = subset_items(splits.split(args.split), args.max_images)
    device = resolve_device(args.device)
    backbone = None if args.base else backbone_from_args(args)
    model, description = build_model(
        splits.classnames,
        backbone=backbone,
        checkpoint=args.base,
        init=args.init,
        device=device,
        precision=args.precision,
    )
    model.eval()
    print(f"proxy {splits.name} {args.split}: {len(items)} images; base: {description}")
    if args.stats:
        stats = compute_stats(
            model, items, args.layers, proxy=splits.name, batch_size=args.batch_size, workers=args.workers
        )
        print(f"token statistics of layers {args.layers} -> {stats.save(args.stats)}")
    if args.prototypes:
        prototypes = compute_prototypes(
            model,
            items,
            splits.classnames,
            n_augmented=args.augmented,
            views_per_class=args.views_per_class,
            proxy=splits.name,
            seed=args.seed,
            batch_size=max(1, args.batch_size // (1 + args.augmented)),
            workers=args.workers,
        )
        print(f"prototypes of {len(splits.classnames)} classes -> {prototypes.save(args.prototypes)}")
    return 0
