"""`promptkd pretrain`: contrastive pre-training of a small CLIP from captioned images, through the shared engine
(resumable after a kill by running the same command again; multi-process under torchrun)."""

from __future__ import annotations

import argparse

from promptkd.cli import validate as v
from promptkd.cli.common import add_overrides_arg

HELP = "pre-train a small CLIP contrastively on captioned images (e.g. the embedded world's corpus)"

# Command-line options that set a field of the method config or of the training config; left unset, the preset's
# value holds (configs/contrastive/<preset>.yaml), so building the parser does not import torch.
_METHOD_OPTIONS = ("objective", "hflip", "translate", "zoom", "noise")
_TRAIN_OPTIONS = (
    "epochs",
    "batch_size",
    "lr",
    "weight_decay",
    "warmup_epochs",
    "grad_clip",
    "seed",
    "precision",
    "log_every",
    "checkpoint_every",
    "num_workers",
)
_RUN_OPTIONS = ("eval", "eval_every", "eval_per_class", "lanes", "epoch_samples")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data",
        type=v.text,
        required=True,
        help="world (the embedded world's corpus, built on first use), a world root, a captions.jsonl "
        "(one {image, caption, label?, classname?} a line), a COCO captions .json, or WebDataset shards "
        "('shards/{000..099}.tar': <key>.jpg + <key>.txt, optional <key>.cls)",
    )
    parser.add_argument(
        "--build-world",
        action="store_true",
        help="if --data is a folder without a world, build the embedded world there first",
    )
    parser.add_argument(
        "--model",
        type=v.text,
        default="pkd-world-student",
        help="open_clip model name (pkd-world-student, pkd-world-teacher, pkd-tiny, ViT-B-16, ...; random weights "
        "unless --pretrained) or local-dir:<folder> (continues from the folder's weights) (default: %(default)s)",
    )
    parser.add_argument(
        "--pretrained",
        type=v.text,
        default="random",
        help="random (from scratch, the default) or a tag / weight file to continue pre-training from (not with a "
        "local-dir model, which carries its own weights)",
    )
    parser.add_argument(
        "--out",
        type=v.output_folder,
        required=True,
        help="run folder: the model (open_clip local-dir), history, curve, logs",
    )
    parser.add_argument("--overwrite", action="store_true", help="train again over a finished model in --out")
    parser.add_argument(
        "--preset",
        type=v.text,
        default=None,
        help="recipe from configs/contrastive/ (default: 'default', the world-notes probe; 'world': the shipped "
        "world CLIPs) or a .yaml path",
    )
    add_overrides_arg(parser, "train.lr=0.0005 method.noise=4 train.warmup_epochs=2")

    train = parser.add_argument_group("training (defaults: the preset)")
    train.add_argument("--objective", choices=("clip", "itl"), help="clip: image-text InfoNCE; itl: image-text-label")
    train.add_argument("--epochs", type=v.count, help="passes over the data (shards: of --epoch-samples)")
    train.add_argument("--batch-size", type=v.count, help="image-caption pairs per step, over all processes")
    train.add_argument("--lr", type=v.positive_float, help="peak learning rate (linear warm-up, cosine decay per step)")
    train.add_argument(
        "--weight-decay", type=v.non_negative_float, help="AdamW decay on matrices (not gains, biases, scale)"
    )
    train.add_argument("--warmup-epochs", type=v.count0, help="epochs of linear warm-up")
    train.add_argument("--grad-clip", type=v.positive_float, help="max global gradient norm")
    train.add_argument("--hflip", action=argparse.BooleanOptionalAction, help="random horizontal flips")
    train.add_argument(
        "--translate", type=v.non_negative_float, help="random shifts up to this fraction of the image side"
    )
    train.add_argument(
        "--zoom",
        type=v.positive_float,
        nargs=2,
        metavar=("LOW", "HIGH"),
        help="random content scale range, e.g. 0.5 1.0",
    )
    train.add_argument("--noise", type=v.non_negative_float, help="std of Gaussian pixel noise in 0-255 units")
    train.add_argument("--seed", type=v.seed, help="initialisation, data order and augmentation")
    train.add_argument(
        "--precision",
        choices=("fp32", "bf16", "fp16"),
        help="bf16 autocast pays off on GPUs and CPUs with AVX512-BF16/AMX; fp16 on GPUs only",
    )
    train.add_argument("--device", type=v.text, default="auto", help="cpu, cuda, ... (default: cuda if available)")
    train.add_argument("--num-workers", type=v.count0, help="data-loader worker processes")
    train.add_argument("--lanes", type=v.count0, help="shards: lanes of the stream (default one per shard)")
    train.add_argument(
        "--epoch-samples",
        type=v.count0,
        help="shards: samples per epoch (default every image once, which needs the shards counted first: each "
        "process reads its own shards' headers, decompressing .tar.gz ones; give N to start without counting)",
    )
    train.add_argument("--skip-bad", action="store_true", help="skip and count unreadable images / captionless samples")

    report = parser.add_argument_group("evaluation and logging")
    report.add_argument(
        "--eval",
        choices=("auto", "world", "none"),
        help="zero-shot accuracy on the world's compositions (seen / held out), rendered in memory; "
        "auto (default) = when --data is an embedded world",
    )
    report.add_argument("--eval-every", type=v.count0, help="epochs between evaluations, 0 = only after the last")
    report.add_argument("--eval-per-class", type=v.count, help="images per class and style (default 10)")
    report.add_argument("--log-every", type=v.count, help="steps per loss record")
    report.add_argument("--checkpoint-every", type=v.count0, help="also save the resume point every N steps")
    report.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")
    report.add_argument("--json", action="store_true", help="print the final summary as JSON")


def _overrides(args: argparse.Namespace) -> list[str]:
    """The options given on the command line as ``--set`` entries (before the user's own ``--set``)."""
    import json

    given = []
    for section, names in (("method", _METHOD_OPTIONS), ("train", _TRAIN_OPTIONS)):
        for name in names:
            value = getattr(args, name)
            if value is not None:
                given.append(f"{section}.{name}={json.dumps(value)}")
    if args.skip_bad:
        given.append("skip_bad=true")
    if not args.progress:
        given.append("train.progress=false")
    return [*given, *args.overrides]


def run(args: argparse.Namespace) -> int:
    import logging
    from pathlib import Path

    from promptkd.cli.common import check_positive, print_json
    from promptkd.pretraining.run import resolve_pretrain_config, run_pretraining

    log = logging.getLogger("promptkd.cli.pretrain")
    check_positive(epochs=args.epochs, batch_size=args.batch_size, eval_per_class=args.eval_per_class)
    data = Path(args.data).expanduser()
    building = args.build_world and args.data != "world" and (not data.exists() or data.is_dir())
    if building and not (data / "world.json").is_file():
        from promptkd.data.world import build_world

        log.info("building the embedded world at %s", data)
        build_world(data)
    base = {
        "data": args.data,
        "model": args.model,
        "pretrained": args.pretrained,
        "device": args.device,
        "out": args.out,
    }
    base.update({name: getattr(args, name) for name in _RUN_OPTIONS if getattr(args, name) is not None})
    config = resolve_pretrain_config(args.preset, _overrides(args), base)
    outcome = run_pretraining(config, overwrite=args.overwrite)
    history = outcome.history
    if not history:  # not the main process
        return 0
    summary = {
        "out": str(outcome.out),
        "model": history["model"]["model_name"],
        "init": history["init"],
        "epochs": config.train.epochs,
        "steps": history["steps"],
        "train_seconds": round(history["train_seconds"], 1),
        "images_per_second": round(history["images_per_second"], 1),
        "final_loss": round(history["final_loss"], 4),
        "zero_shot": {k: round(v, 2) for k, v in history["zero_shot"].items()},
    }
    if args.json:
        print_json(summary)
        return 0
    print(
        f"pre-trained {summary['model']} ({summary['init']} init) for {summary['steps']} steps in "
        f"{summary['train_seconds']} s ({summary['images_per_second']} images/s); final "
        f"{config.method_config.get('objective', 'itl')} loss {summary['final_loss']}"
    )
    for key, value in summary["zero_shot"].items():
        if key.split("/")[0] in ("clean", "scene"):
            print(f"  zero-shot {key}: {value:.1f}%")
    print(
        f"wrote {outcome.out} (pretrain_history.json, pretrain_curve.png); use it with --model local-dir:{outcome.out}"
    )
    return 0
