"""`promptkd attribute-search`: ATPrompt's differentiable search for a dataset's attributes.

Trains one CoOp-style prompt per combination of candidate attributes and the mixing weights α (prompts on training
batches, α on validation batches; :mod:`promptkd.prompts.attribute_search`), then writes ``attributes.json`` with
α's weights per combination and prints the ``--set method.attributes=...`` to paste into `promptkd train`.
"""

from __future__ import annotations

import argparse

from promptkd.cli import validate as v
from promptkd.cli.common import add_overrides_arg

HELP = "ATPrompt: search a dataset's prompt attributes among candidates (writes attributes.json)"

#: The reference's search: scripts/attribute_compute/main.sh (N_CTX = N_ATT = 4, 40 epochs, 16 shots, base classes).
SEARCH_EPOCHS = 40
SEARCH_CTX = 4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", type=v.text, required=True, help="dataset name (world or benchmark)")
    parser.add_argument("--data-root", type=v.input_folder, default=None, help="folder holding the datasets")
    parser.add_argument(
        "--candidates",
        type=v.text_file,
        default=None,
        metavar="FILE",
        help="candidate attributes, one per line (UTF-8); default: the built-in list of the dataset (world) or "
        "the generic list (no LLM is asked, unlike the reference)",
    )
    parser.add_argument(
        "--max-attributes", type=v.count, default=2, help="combinations of 1..K candidates are searched (default 2)"
    )
    parser.add_argument("--out", type=v.output_folder, required=True, help="folder for attributes.json")
    parser.add_argument("--preset", type=v.text, default=None, help="CoOp preset for data and optimiser (e.g. world)")
    parser.add_argument("--epochs", type=v.count, default=None, help=f"search epochs (default {SEARCH_EPOCHS})")
    parser.add_argument("--alpha-lr", type=v.positive_float, default=None, help="Adam lr of α (default 0.02)")
    parser.add_argument("--shots", type=v.count0, default=None, help="K labelled images per class (0 = all)")
    parser.add_argument("--seed", type=v.seed, default=None)
    parser.add_argument("--model", type=v.text, default=None, help="backbone model name")
    parser.add_argument("--pretrained", type=v.text, default=None, help="backbone weights (tag or file)")
    parser.add_argument("--device", type=v.text, default=None, help="cpu, cuda, ... (default: auto)")
    add_overrides_arg(parser, "train.lr=0.002 train.batch_size=32 method.n_ctx=4 method.attribute_ctx=4")


def _candidates(args: argparse.Namespace) -> tuple[str, ...]:
    from promptkd.prompts.attribute_search import BUILTIN_CANDIDATES, read_candidates

    if args.candidates is not None:
        return read_candidates(args.candidates)
    return BUILTIN_CANDIDATES.get(args.dataset, BUILTIN_CANDIDATES["generic"])


def run(args: argparse.Namespace) -> int:
    from promptkd.prompts.attribute_search import ALPHA_LR, attribute_combinations

    candidates = _candidates(args)  # bad files and too many combinations are refused before anything loads
    combinations = attribute_combinations(candidates, args.max_attributes)
    setup = _setup(args)
    return _search(args, setup, candidates, combinations, args.alpha_lr or ALPHA_LR)


def _setup(args: argparse.Namespace):
    """The run config (CoOp preset < options < --set) and its method config, as `promptkd train` resolves them."""
    from promptkd.engine.run import resolve_run_config
    from promptkd.methods import get_method
    from promptkd.methods.base import config_from

    base = {
        "dataset": args.dataset,
        "data_root": args.data_root,
        "shots": args.shots,
        "seed": args.seed,
        "model": args.model,
        "pretrained": args.pretrained,
        "device": args.device,
        "out": args.out,
    }
    config = resolve_run_config("coop", args.preset, args.overrides, base)
    if config.method_config.get("attributes"):
        from promptkd.errors import PromptKDError

        raise PromptKDError("attribute-search chooses method.attributes itself; drop it from --set or the preset.")
    method_config = config_from(get_method("coop"), config.method_config)
    return config, method_config


def _search(args, setup, candidates, combinations, alpha_lr: float) -> int:
    import json
    import time
    from pathlib import Path

    import torch

    from promptkd.checkpoints import atomic_write_text
    from promptkd.engine.trainer import build_optimizer, learning_rate
    from promptkd.prompts.attribute_search import candidates_sha256, run_search

    config, method_config = setup
    epochs = args.epochs or SEARCH_EPOCHS
    n_ctx = method_config.n_ctx if "n_ctx" in config.method_config else SEARCH_CTX
    backbone, device, model, splits = _model(config, combinations, n_ctx, method_config.attribute_ctx or n_ctx)
    train_set, val_set = _data(config, backbone, splits)
    groups = [{"params": model.prompt_parameters(), "weight_decay": config.train.weight_decay}]
    optimizer = build_optimizer(config.train, groups)
    train_batches, val_batches, steps = _loaders(config, train_set, val_set, device)
    image_encoder = backbone.model

    @torch.no_grad()
    def features(images: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(image_encoder.encode_image(images).float(), dim=-1)

    train_cfg = config.train
    train_cfg.epochs = epochs  # the schedule spans the search's epochs
    started = time.perf_counter()
    history = run_search(
        model,
        features,
        float(backbone.model.logit_scale.detach().exp()),
        train_batches,
        val_batches,
        optimizer,
        epochs=epochs,
        lr_at=lambda epoch, step: learning_rate(train_cfg, epoch, step, steps),
        alpha_lr=alpha_lr,
        progress=config.train.progress,
    )
    seconds = time.perf_counter() - started
    record = _record(args, config, model, candidates, candidates_sha256(candidates), history, seconds, n_ctx)
    record["epochs"], record["alpha_lr"] = epochs, alpha_lr
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "attributes.json", json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    _report(record, out)
    return 0


def _model(config, combinations, n_ctx: int, attribute_ctx: int):
    """Backbone, device, the search model and the dataset's splits; prompts that do not fit the context length
    are refused here, before any image is read."""
    import torch

    from promptkd.backbones import load_backbone
    from promptkd.backbones.loading import run_weights
    from promptkd.engine.distributed import init_distributed
    from promptkd.prompts import PromptedTextEncoder
    from promptkd.prompts.attribute_search import AttributeSearch

    weights = run_weights(config.model, config.pretrained)
    _, device = init_distributed(config.device)
    backbone = load_backbone(config.model, weights, quick_gelu=config.quick_gelu, device=device, precision="fp32")
    splits, classnames = _classes(config)
    model = AttributeSearch(
        PromptedTextEncoder(backbone.model).to(device),
        backbone.tokenizer,
        classnames,
        combinations,
        n_ctx=n_ctx,
        attribute_ctx=attribute_ctx,
        generator=torch.Generator().manual_seed(config.seed),
    ).to(device)
    return backbone, device, model, splits


def _classes(config):
    """The dataset's splits and the class list searched on (the reference searches on the base classes)."""
    from promptkd.data.datasets import resolve_dataset
    from promptkd.data.sampling import subsample_classes

    splits = resolve_dataset(config.dataset, config.data_root, classnames=config.classnames)
    return splits, subsample_classes(splits, config.subsample).classnames


def _data(config, backbone, splits):
    from promptkd.data.items import ImageDataset
    from promptkd.data.sampling import few_shot_splits, subsample_classes
    from promptkd.data.transforms import build_transform, train_transform
    from promptkd.errors import PromptKDError

    if config.shots > 0:
        splits = few_shot_splits(splits, config.shots, config.seed, cache_dir=None, strict=config.strict_shots)
    part = subsample_classes(splits, config.subsample)
    if not part.val:
        raise PromptKDError(f"{config.dataset} has no validation images; the search updates α on validation batches.")
    train_tf = train_transform(backbone.preprocess, scale=config.train.crop_scale)
    eval_tf = build_transform(backbone.preprocess, train=False)
    return ImageDataset(part.train, train_tf), ImageDataset(part.val, eval_tf)


def _loaders(config, train_set, val_set, device):
    from promptkd.engine.data import make_loader, set_epoch

    batch = config.train.batch_size
    train_loader, seeded, sampler = make_loader(train_set, batch_size=batch, seed=config.seed, shuffle=True)
    val_loader, _, _ = make_loader(val_set, batch_size=batch, seed=config.seed + 1, shuffle=True)

    def pairs(loader):
        for b in loader:
            yield b.images.to(device), b.labels.to(device)

    def train_batches(epoch: int):
        set_epoch(seeded, sampler, epoch)
        return pairs(train_loader)

    return train_batches, lambda: pairs(val_loader), len(train_loader)


def _record(args, config, model, candidates, sha, history, seconds, n_ctx) -> dict:
    import shlex

    weights = model.weights().detach().cpu().tolist()
    alpha = model.alpha.detach().cpu().tolist()
    rows = sorted(
        ({"attributes": list(c), "weight": w, "alpha": a} for c, w, a in zip(model.combinations, weights, alpha)),
        key=lambda row: -row["weight"],
    )
    chosen = list(model.best())
    value = "[" + ", ".join(f'"{a}"' for a in chosen) + "]"
    return {
        "dataset": config.dataset,
        "seed": config.seed,
        "shots": config.shots,
        "model": config.model,
        "candidates": list(candidates),
        "candidates_file": args.candidates,
        "candidates_sha256": sha,
        "candidates_file_sha256": _file_sha256(args.candidates),
        "max_attributes": args.max_attributes,
        "n_ctx": n_ctx,
        "chosen": chosen,
        "combinations": rows,
        "history": history,
        "seconds": round(seconds, 3),
        "paste": f"--set {shlex.quote('method.attributes=' + value)}",
    }


def _file_sha256(path: str | None) -> str | None:
    """SHA-256 of the candidate file's bytes (what `sha256sum FILE` prints); None for a built-in list."""
    import hashlib
    from pathlib import Path

    return None if path is None else hashlib.sha256(Path(path).expanduser().read_bytes()).hexdigest()


def _report(record: dict, out) -> None:
    from promptkd.cli.common import print_table

    rows = [(" + ".join(r["attributes"]), f"{r['weight']:.4f}") for r in record["combinations"][:10]]
    print_table(["attributes", "softmax(α)"], rows)
    print(f"chosen: {', '.join(record['chosen'])}  ({record['seconds']:.1f} s, written to {out / 'attributes.json'})")
    print(f"train with: {record['paste']}")
