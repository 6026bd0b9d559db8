"""`promptkd retrieval`: zero-shot image<->text recall@K on a COCO- or Flickr30k-style caption set."""

from __future__ import annotations

import argparse
import os
from dataclasses import asdict

from promptkd.cli import validate as v
from promptkd.cli._eval import add_eval_args, load_frozen_backbone, write_and_print
from promptkd.errors import PromptKDError

HELP = "zero-shot image-text retrieval recall@K (COCO captions JSON, Flickr30k results.csv / .token)"

WORLD_ANNOTATIONS = os.path.join("retrieval", "captions_coco.json")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from promptkd.cli.common import add_backbone_args, add_runtime_args

    group = parser.add_argument_group("data")
    group.add_argument(
        "--annotations",
        type=v.input_file,
        default=None,
        help="COCO captions JSON, or Flickr30k results.csv / results_20130124.token",
    )
    group.add_argument(
        "--images",
        type=v.input_folder,
        default=None,
        help="image folder (default: images/ or flickr30k-images/ beside it)",
    )
    group.add_argument(
        "--data-root",
        type=v.input_folder,
        default=None,
        help=f"an embedded-world root: uses <root>/{WORLD_ANNOTATIONS} when --annotations is not given",
    )
    group.add_argument(
        "--dataset", type=v.text, default=None, help="name recorded in the result (default: from the file)"
    )
    group.add_argument(
        "--recall-k",
        type=v.count,
        nargs="+",
        action=v.Repeatable,
        default=[1, 5, 10],
        help="K values of recall@K (1 5 10)",
    )
    group.add_argument("--skip-bad", action="store_true", help="skip unreadable images (and their captions)")
    add_backbone_args(parser)
    add_runtime_args(parser)
    add_eval_args(parser, default_out="results")


def _annotations(args: argparse.Namespace) -> tuple[str, str]:
    """(annotation file, dataset name)."""
    if args.annotations:
        stem = os.path.splitext(os.path.basename(args.annotations))[0]
        return args.annotations, args.dataset or stem
    if args.data_root:
        path = os.path.join(args.data_root, WORLD_ANNOTATIONS)
        if not os.path.isfile(path):
            raise PromptKDError(
                f"{path} not found: expected the embedded world's retrieval set there "
                "(build the world first), or pass --annotations FILE"
            )
        return path, args.dataset or "world_retrieval"
    raise PromptKDError("give --annotations FILE (COCO JSON or Flickr30k csv/token) or --data-root WORLD_ROOT")


def run(args: argparse.Namespace) -> int:
    from promptkd.data.items import small_images
    from promptkd.evaluation import evaluate_retrieval, read_captions
    from promptkd.paths import writable_folder
    from promptkd.results import check_result_free, make_result

    writable_folder(args.out)  # before any work
    path, dataset = _annotations(args)
    naming = {"method": args.method or "zeroshot", "dataset": dataset, "task": "zeroshot_retrieval"}
    check_result_free(args.out, naming, overwrite=args.overwrite)
    captions = read_captions(path, args.images)
    backbone = load_frozen_backbone(args)
    outcome = evaluate_retrieval(
        backbone,
        captions,
        ks=args.recall_k,
        batch_size=args.batch_size,
        num_workers=args.workers,
        cache_dir=args.cache_dir,
        skip_bad=args.skip_bad,
        progress=not args.no_progress,
    )
    config = {
        "command": "retrieval",
        "dataset": dataset,
        "recall_k": list(args.recall_k),
        "model": backbone.spec.to_dict(),
        "precision": backbone.precision,
        "preprocess": asdict(backbone.preprocess),
    }
    result = make_result(
        dataset=dataset,
        task="zeroshot_retrieval",
        metrics=outcome.metrics,
        method=args.method or "zeroshot",
        backbone=backbone,
        protocol="retrieval",
        num_samples=outcome.num_images,
        config=config,
        skipped_images=outcome.skipped,
        small_images=small_images(captions.images, int(backbone.preprocess.size)),
        extra={
            "annotations": os.path.abspath(path),
            "num_images": outcome.num_images,
            "num_captions": outcome.num_captions,
        },
    )
    shown: dict[str, object] = {"dataset": dataset, "images": outcome.num_images, "captions": outcome.num_captions}
    for k in sorted(set(args.recall_k)):
        shown[f"text->image R@{k}"] = outcome.metrics[f"image_retrieval_recall@{k}"]
        shown[f"image->text R@{k}"] = outcome.metrics[f"text_retrieval_recall@{k}"]
    return write_and_print(result, args.out, shown)[1]
