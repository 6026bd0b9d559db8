"""`promptkd train`: train one method on one dataset (works under torchrun for multi-process DDP)."""

from __future__ import annotations

import argparse

from promptkd.cli import validate as v
from promptkd.cli.common import add_overrides_arg

HELP = "train a prompt-learning method on a dataset (few-shot, base classes or all), then evaluate on test"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--method", type=v.text, required=True, help="coop, cocoop, vpt, ivlp, maple, promptsrc, vp, ..."
    )
    parser.add_argument(
        "--preset", type=v.text, default=None, help="YAML preset name of the method (e.g. world) or a .yaml path"
    )
    parser.add_argument(
        "--dataset", type=v.text, default=None, help="dataset name (world or benchmark) or split-file folder"
    )
    parser.add_argument(
        "--data-root", type=v.input_folder, default=None, help="folder holding the datasets (world: the world cache)"
    )
    parser.add_argument(
        "--classnames",
        type=v.text_file,
        default=None,
        metavar="FILE",
        help="your data: class names, matched to class folders by name",
    )
    parser.add_argument("--shots", type=v.count0, default=None, help="K labelled images per class (0 = all)")
    parser.add_argument(
        "--subsample",
        choices=["all", "base"],
        default=None,
        help="train on all classes or on the base half (then scored on base and new)",
    )
    parser.add_argument("--seed", type=v.seed, default=None)
    parser.add_argument("--model", type=v.text, default=None, help="backbone model name")
    parser.add_argument("--pretrained", type=v.text, default=None, help="backbone weights (tag or file)")
    parser.add_argument("--device", type=v.text, default=None, help="cpu, cuda, ... (default: auto)")
    parser.add_argument(
        "--out", type=v.output_folder, default=None, help="run folder (an existing run there is resumed)"
    )
    add_overrides_arg(parser, "train.lr=0.002 train.epochs=5 method.n_ctx=8")
    parser.add_argument("--list-presets", action="store_true", help="list the method's presets and exit")


def run(args: argparse.Namespace) -> int:
    from promptkd.cli.common import print_table
    from promptkd.config import list_presets
    from promptkd.engine.run import resolve_run_config, run_training
    from promptkd.methods import get_method

    if args.list_presets:
        print("\n".join(list_presets(get_method(args.method).name)))
        return 0
    base = {
        "dataset": args.dataset,
        "data_root": args.data_root,
        "classnames": args.classnames,
        "shots": args.shots,
        "subsample": args.subsample,
        "seed": args.seed,
        "model": args.model,
        "pretrained": args.pretrained,
        "device": args.device,
        "out": args.out,
    }
    config = resolve_run_config(args.method, args.preset, args.overrides, base)
    outcome = run_training(config)
    rows = [
        (r["dataset"], r["subsample"], f"{100 * r['metrics']['acc1']:.2f}", r["num_samples"]) for r in outcome.results
    ]
    if rows:
        print_table(["dataset", "classes", "acc1 (%)", "images"], rows)
    print(f"run folder: {outcome.out} (selection: {outcome.train.selection})")
    return 0
