"""`promptkd linear-probe`: K-shot logistic regression on frozen CLIP features, C chosen on the validation split."""

from __future__ import annotations

import argparse
from dataclasses import asdict

from promptkd.cli import validate as v
from promptkd.cli._eval import add_data_args, add_eval_args, load_frozen_backbone, write_and_print

# The evaluation module's FEATURE_MODES and REFINE_STEPS, repeated so that building the parser imports no torch.
FEATURE_MODES = ("raw", "normalized")
REFINE_STEPS = 8

HELP = "linear probe (CoOp lpclip): logistic regression on frozen image features, C chosen on validation"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from promptkd.cli.common import add_backbone_args, add_runtime_args

    add_data_args(parser)
    group = parser.add_argument_group("linear probe")
    group.add_argument(
        "--shots", type=v.count0, default=16, help="training images per class (16; 0 = the full train split)"
    )
    group.add_argument("--seed", type=v.seed, default=1, help="seed of the few-shot sample (1)")
    group.add_argument(
        "--C",
        dest="C",
        type=v.positive_float,
        default=None,
        help="fixed inverse regularisation strength (skips the search)",
    )
    group.add_argument(
        "--refine-steps",
        type=v.count0,
        default=REFINE_STEPS,
        help=f"lpclip's bisection steps in log10(C) after the coarse sweep ({REFINE_STEPS})",
    )
    group.add_argument(
        "--features",
        choices=FEATURE_MODES,
        default="raw",
        help="fit the raw image features as lpclip and the CLIP paper (raw), or L2-normalised ones (normalized)",
    )
    group.add_argument("--max-iter", type=v.count, default=1000, help="lbfgs iterations per fit (1000)")
    group.add_argument(
        "--few-shot-cache",
        type=v.output_folder,
        default=None,
        help="store the few-shot selection here (outside the data folder)",
    )
    add_backbone_args(parser)
    add_runtime_args(parser)
    add_eval_args(parser, default_out="results")


def run(args: argparse.Namespace) -> int:
    from promptkd.data.datasets import resolve_dataset
    from promptkd.data.items import small_images
    from promptkd.data.sampling import few_shot_splits
    from promptkd.errors import PromptKDError
    from promptkd.evaluation import evaluate_linear_probe
    from promptkd.paths import writable_folder
    from promptkd.results import check_result_free, make_result

    writable_folder(args.out)  # before any work
    if args.shots < 0:
        raise PromptKDError(f"--shots must be 0 (the full train split) or a positive K, got {args.shots}.")
    splits = resolve_dataset(args.dataset, args.data_root, classnames=args.classnames)
    naming = {"method": args.method or "linear-probe", "dataset": splits.name, "task": "linear_probe"}
    naming |= {"num_shots": args.shots or None, "seed": args.seed if args.shots else None}
    check_result_free(args.out, naming, overwrite=args.overwrite)
    if args.shots > 0:
        splits = few_shot_splits(splits, args.shots, args.seed, cache_dir=args.few_shot_cache)
    backbone = load_frozen_backbone(args)
    outcome = evaluate_linear_probe(
        backbone,
        splits,
        C=args.C,
        batch_size=args.batch_size,
        num_workers=args.workers,
        cache_dir=args.cache_dir,
        skip_bad=args.skip_bad,
        progress=not args.no_progress,
        refine_steps=args.refine_steps,
        max_iter=args.max_iter,
        features=args.features,
    )
    shots = args.shots if args.shots > 0 else None
    config = {
        "command": "linear-probe",
        "dataset": splits.name,
        "shots": shots,
        "seed": args.seed,
        "C": args.C,
        "refine_steps": args.refine_steps,
        "max_iter": args.max_iter,
        "features": f"{args.features}, eval transform",
        "model": backbone.spec.to_dict(),
        "precision": backbone.precision,
        "preprocess": asdict(backbone.preprocess),
    }
    result = make_result(
        dataset=splits.name,
        task="linear_probe",
        metrics=outcome.metrics,
        method=args.method or "linear-probe",
        backbone=backbone,
        protocol="few_shot" if shots else "linear_probe",
        split="test",
        seed=args.seed if shots else None,
        num_shots=shots,
        num_classes=splits.num_classes,
        num_samples=outcome.num_test,
        config=config,
        skipped_images=outcome.skipped,
        small_images=small_images(
            [d.path for d in (*splits.train, *splits.val, *splits.test)], int(backbone.preprocess.size)
        ),
        selection=outcome.selection,
        classnames=splits.classnames,
        extra={
            "data_root": str(splits.root),
            "num_train": outcome.num_train,
            "num_val": outcome.num_val,
            "notes": list(splits.notes),
        },
    )
    shown = {
        "dataset": splits.name,
        "shots": shots or "all",
        "seed": args.seed,
        "train": outcome.num_train,
        "val": outcome.num_val,
        "test": outcome.num_test,
        "C": outcome.C,
        "lp_acc1": outcome.metrics["lp_acc1"],
        "lp_acc5": outcome.metrics["lp_acc5"],
    }
    return write_and_print(result, args.out, shown)[1]
