"""`promptkd pretrain`: contrastive pre-training of a small CLIP from captioned images (e.g. the embedded world)."""

from __future__ import annotations

import argparse

HELP = "pre-train a small CLIP contrastively on captioned images (e.g. the embedded world's corpus)"

# Shown in --help; the values themselves come from PretrainConfig (options left unset are not passed), so that
# building the parser does not import torch. tests/test_pretraining.py checks the two agree.
HELP_DEFAULTS = {
    "objective": "itl",
    "steps": 600,
    "batch_size": 128,
    "lr": 0.001,
    "weight_decay": 0.1,
    "schedule": "onecycle",
    "warmup": 0.1,
    "grad_clip": 1.0,
    "translate": 0.0,
    "noise": 0.0,
    "seed": 0,
    "eval_every": 100,
    "log_every": 25,
}
_CONFIG_OPTIONS = (*HELP_DEFAULTS, "hflip", "zoom", "precision")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = HELP_DEFAULTS
    parser.add_argument(
        "--model",
        default="pkd-world-student",
        help="open_clip model name to build with random weights (pkd-world-student, pkd-world-teacher, "
        "pkd-tiny, ...) or local-dir:<folder> to continue from (default: %(default)s)",
    )
    parser.add_argument("--pretrained", default=None, help="start from this weight file or tag instead of random")
    parser.add_argument(
        "--data",
        required=True,
        help="an embedded-world root, a captions.jsonl (one {image, caption, label?, classname?} "
        "a line) or a COCO captions .json",
    )
    parser.add_argument(
        "--build-world",
        action="store_true",
        help="if --data is a folder without a world, build the embedded world there first",
    )
    parser.add_argument("--out", required=True, help="output folder: open_clip local-dir model + history + curve")
    parser.add_argument("--overwrite", action="store_true", help="replace a model already in --out")

    train = parser.add_argument_group("training")
    train.add_argument(
        "--objective",
        choices=("clip", "itl"),
        help=f"clip: image-text InfoNCE; itl: image-text-label (same class = positive); default {d['objective']}",
    )
    train.add_argument("--steps", type=int, help=f"optimiser steps (default {d['steps']})")
    train.add_argument("--batch-size", type=int, help=f"image-caption pairs per step (default {d['batch_size']})")
    train.add_argument("--lr", type=float, help=f"peak learning rate (default {d['lr']})")
    train.add_argument("--weight-decay", type=float, help=f"AdamW weight decay (default {d['weight_decay']})")
    train.add_argument("--schedule", choices=("onecycle", "cosine"), help=f"default {d['schedule']}")
    train.add_argument("--warmup", type=float, help=f"fraction of the steps spent warming up (default {d['warmup']})")
    train.add_argument("--grad-clip", type=float, help=f"max gradient norm, 0 = off (default {d['grad_clip']})")
    train.add_argument("--hflip", action=argparse.BooleanOptionalAction, help="random horizontal flips (default on)")
    train.add_argument(
        "--translate",
        type=float,
        help=f"random shifts up to this fraction of the image side (default {d['translate']})",
    )
    train.add_argument(
        "--zoom",
        type=float,
        nargs=2,
        metavar=("LOW", "HIGH"),
        help="random content scale range, e.g. 0.6 1.0 to also show smaller objects (default 1 1)",
    )
    train.add_argument("--noise", type=float, help=f"std of Gaussian pixel noise in 0-255 units (default {d['noise']})")
    train.add_argument("--seed", type=int, help=f"initialisation, batch order and augmentation (default {d['seed']})")
    train.add_argument(
        "--precision",
        choices=("fp32", "bf16"),
        help="default fp32; bf16 autocast pays off only on GPUs and CPUs with AVX512-BF16/AMX",
    )
    train.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda if available)")

    report = parser.add_argument_group("evaluation and logging")
    report.add_argument(
        "--eval",
        choices=("auto", "world", "none"),
        default="auto",
        help="zero-shot accuracy on the world's compositions (seen / held out), rendered in memory; "
        "auto = when --data is an embedded world",
    )
    report.add_argument(
        "--eval-every", type=int, help=f"steps between evaluations, 0 = only at the end (default {d['eval_every']})"
    )
    report.add_argument("--eval-per-class", type=int, default=10, help="images per class and style (default 10)")
    report.add_argument("--log-every", type=int, help=f"steps per loss record (default {d['log_every']})")
    report.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm progress bar")
    report.add_argument("--json", action="store_true", help="print the final summary as JSON")


def _is_world(path) -> bool:
    from pathlib import Path

    from promptkd.data.world import MANIFEST_NAME

    path = Path(path)
    candidates = [path] if path.is_dir() else [path.parent.parent]
    return any((p / MANIFEST_NAME).is_file() for p in candidates)


def run(args: argparse.Namespace) -> int:
    import logging
    from pathlib import Path

    import torch

    from promptkd.backbones import load_backbone
    from promptkd.cli.common import print_json, resolve_device
    from promptkd.errors import PromptKDError
    from promptkd.pretraining import (
        PretrainConfig,
        ZeroShotEvaluator,
        load_caption_dataset,
        pretrain,
        world_zero_shot_sets,
    )

    log = logging.getLogger("promptkd.cli.pretrain")
    out = Path(args.out).expanduser()
    if (out / "open_clip_config.json").exists() and not args.overwrite:
        raise PromptKDError(f"{out} already holds a model; pass --overwrite to replace it, or choose another --out.")
    try:
        options = {k: getattr(args, k) for k in _CONFIG_OPTIONS if getattr(args, k) is not None}
        if options.get("grad_clip") == 0:
            options["grad_clip"] = None
        config = PretrainConfig(**options, progress=args.progress)
    except ValueError as error:
        raise PromptKDError(str(error)) from error

    data = Path(args.data).expanduser()
    if args.build_world and not _is_world(data) and (not data.exists() or data.is_dir()):
        from promptkd.data.world import build_world

        log.info("building the embedded world at %s", data)
        build_world(data)

    torch.manual_seed(config.seed)  # the random initialisation is part of the run's identity
    backbone = load_backbone(args.model, args.pretrained, device=resolve_device(args.device))
    dataset = load_caption_dataset(data, backbone.image_size)
    evaluate = None
    if args.eval == "world" or (args.eval == "auto" and _is_world(data)):
        sets = world_zero_shot_sets(backbone.image_size, per_class=args.eval_per_class)
        evaluate = ZeroShotEvaluator(sets)
    try:
        history = pretrain(backbone, dataset, config, evaluate=evaluate, out_dir=out)
    except ValueError as error:
        raise PromptKDError(str(error)) from error

    summary = {
        "out": str(out),
        "model": backbone.spec.model_name,
        "steps": config.steps,
        "train_seconds": round(history.train_seconds, 1),
        "seconds_per_step": round(history.seconds_per_step, 4),
        "final_loss": round(history.final_loss, 4),
        "zero_shot": {k: round(v, 2) for k, v in history.final_eval.items() if k != "step"},
    }
    if args.json:
        print_json(summary)
        return 0
    print(
        f"pre-trained {summary['model']} for {config.steps} steps in {summary['train_seconds']} s "
        f"({summary['seconds_per_step']} s/step); final {config.objective} loss {summary['final_loss']}"
    )
    headline = {k: v for k, v in summary["zero_shot"].items() if k.split("/")[0] in ("clean", "scene")}
    for key, value in headline.items():
        print(f"  zero-shot {key}: {value:.1f}%")
    print(f"wrote {out} (pretrain_history.json, pretrain_curve.png); use it with --model local-dir:{out}")
    return 0
