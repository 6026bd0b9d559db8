"""`promptkd zeroshot`: zero-shot CLIP accuracy on a dataset split, written as a CLIP_benchmark-style result."""

from __future__ import annotations

import argparse
from dataclasses import asdict

from promptkd.cli import validate as v
from promptkd.cli._eval import add_data_args, add_eval_args, load_frozen_backbone, write_and_print
from promptkd.errors import PromptKDError

HELP = "zero-shot classification accuracy of a CLIP model (single, dataset or ensemble templates)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from promptkd.cli.common import add_backbone_args, add_runtime_args

    add_data_args(parser)
    group = parser.add_argument_group("zero-shot")
    group.add_argument(
        "--subsample",
        default="all",
        choices=("all", "base", "new"),
        help="evaluate all classes, or the base / new half (base-to-novel protocol)",
    )
    group.add_argument(
        "--split",
        default="test",
        choices=("test", "val", "train", "all"),
        help="split to score (test); your own folders and lists are split per class 50/20/30 into train/val/test "
        "(CoOp's rule), so 'all' scores every image of them",
    )
    group.add_argument(
        "--templates",
        type=v.text,
        default="dataset",
        help="single ('a photo of a {}.'), dataset (the dataset's template; default), ensemble (CoOp's "
        "ZeroshotCLIP2 set, or a world dataset's own templates), openai (80 ImageNet templates), or a JSON file "
        "(a list, or CLIP_benchmark's {dataset: [templates]})",
    )
    add_backbone_args(parser)
    add_runtime_args(parser)
    add_eval_args(parser, default_out="results")


def method_name(templates: str) -> str:
    """``zeroshot-<mode>`` (a template file gives ``zeroshot-<file stem>``)."""
    import os

    from promptkd.evaluation.zeroshot import TEMPLATE_MODES

    if templates in TEMPLATE_MODES:
        return f"zeroshot-{templates}"
    return f"zeroshot-{os.path.splitext(os.path.basename(templates))[0]}"


def split_items(splits, split: str) -> list:
    """The items of ``split``; ``all``: train, val and test together (each image once)."""
    if split == "all":
        return [*splits.train, *splits.val, *splits.test]
    return splits.split(split)


def scope_line(splits, split: str, scored: int) -> str:
    """How many of the dataset's images a run scores and why (a folder's test part is 30% of it)."""
    total = len(splits.train) + len(splits.val) + len(splits.test)
    if split == "all" or scored == total:
        return f"{splits.name}: scoring all {total} images"
    why = next((note for note in splits.notes if "split per class" in note), None)
    return (
        f"{splits.name}: scoring the {split} split, {scored} of its {total} images"
        + (f" ({why})" if why else "")
        + "; --split all scores every image"
    )


def run(args: argparse.Namespace) -> int:
    from promptkd.data.datasets import ensemble_for, resolve_dataset
    from promptkd.data.sampling import subsample_classes
    from promptkd.evaluation import evaluate_zeroshot, resolve_templates
    from promptkd.paths import writable_folder
    from promptkd.results import check_result_free

    writable_folder(args.out)  # before any work
    splits = resolve_dataset(args.dataset, args.data_root, classnames=args.classnames)
    splits = subsample_classes(splits, args.subsample)
    items = split_items(splits, args.split)
    if not items:
        raise PromptKDError(
            f"{splits.name} has no {args.split} items (subsample {args.subsample}); nothing to evaluate"
        )
    method = args.method or method_name(args.templates)
    naming = {"method": method, "dataset": splits.name, "subsample": args.subsample, "split": args.split}
    check_result_free(args.out, {**naming, "task": "zeroshot_classification"}, overwrite=args.overwrite)
    print(scope_line(splits, args.split, len(items)), flush=True)
    templates = resolve_templates(
        args.templates, splits.name, dataset_template_text=splits.template, ensemble=ensemble_for(splits.name)
    )
    backbone = load_frozen_backbone(args)
    outcome = evaluate_zeroshot(
        backbone,
        items,
        splits.classnames,
        templates,
        batch_size=args.batch_size,
        num_workers=args.workers,
        cache_dir=args.cache_dir,
        skip_bad=args.skip_bad,
        progress=not args.no_progress,
    )
    return _write(args, splits, backbone, outcome, method, len(items))


def _write(args: argparse.Namespace, splits, backbone, outcome, method: str, scored: int) -> int:
    from promptkd.results import make_result

    config = {
        "command": "zeroshot",
        "dataset": splits.name,
        "split": args.split,
        "subsample": args.subsample,
        "templates": args.templates,
        "model": backbone.spec.to_dict(),
        "precision": backbone.precision,
        "preprocess": asdict(backbone.preprocess),
    }
    total = len(splits.train) + len(splits.val) + len(splits.test)
    result = make_result(
        dataset=splits.name,
        task="zeroshot_classification",
        metrics=outcome.metrics,
        method=method,
        backbone=backbone,
        split=args.split,
        subsample=args.subsample,
        num_classes=outcome.num_classes,
        num_samples=outcome.num_samples,
        config=config,
        skipped_images=outcome.skipped,
        small_images=outcome.small,
        selection=None,
        classnames=splits.classnames,
        templates=outcome.templates,
        extra={"data_root": str(splits.root), "notes": list(splits.notes), "dataset_images": total},
    )
    shown = {
        "dataset": splits.name,
        "split": args.split,
        "subsample": args.subsample,
        "classes": outcome.num_classes,
        "images": f"{outcome.num_samples} of {total}" if scored < total else outcome.num_samples,
        **{k: outcome.metrics[k] for k in ("acc1", "acc5", "mean_per_class_recall", "ece")},
    }
    return write_and_print(result, args.out, shown)[1]
