"""`promptkd inspect`: what a checkpoint holds (tensors, shapes, method, backbone, classes).

With ``--nearest K`` a learned text context (``text.ctx``, [M, W] or class-specific [C, M, W]) is read the way CoOp
(Zhou et al., IJCV 2022, "interpreting the learned prompts") reads it: for every context vector, the K
vocabulary words whose token embeddings are nearest in Euclidean distance. This rebuilds the checkpoint's backbone.
"""

from __future__ import annotations

import argparse
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from promptkd.cli import validate as v

if TYPE_CHECKING:
    import torch


HELP = "show what a promptkd checkpoint holds"

CONTEXT_KEY = "text.ctx"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=v.checkpoint, help="a promptkd checkpoint (.safetensors with its .json)")
    parser.add_argument("--json", action="store_true", help="print the JSON config as well")
    parser.add_argument(
        "--nearest",
        type=v.count,
        nargs="?",
        const=3,
        default=None,
        metavar="K",
        help=f"for a learned text context ({CONTEXT_KEY}), list the K nearest vocabulary words of every context "
        "vector by Euclidean distance in the token-embedding space (default K: 3); rebuilds the backbone",
    )


def module_totals(tensors: dict[str, torch.Tensor]) -> list[tuple[str, int, int]]:
    """(module prefix, tensors, values) per top-level module of the learner (``text``, ``visual``, ...)."""
    totals: OrderedDict[str, list[int]] = OrderedDict()
    for name, tensor in sorted(tensors.items()):
        prefix = name.split(".", 1)[0] if "." in name else "(root)"
        entry = totals.setdefault(prefix, [0, 0])
        entry[0] += 1
        entry[1] += tensor.numel()
    return [(prefix, count, values) for prefix, (count, values) in totals.items()]


def nearest_words(
    ctx: torch.Tensor, token_embedding: torch.Tensor, decoder: dict[int, str], k: int
) -> list[list[tuple[str, float]]]:
    """For each row of ctx [N, W], the k nearest tokens of the embedding table [V, W]: (word, distance) pairs.

    Only ids the tokenizer can decode are candidates (world models have unused rows past their vocabulary).
    """
    import torch

    ids = torch.tensor(sorted(i for i in decoder if i < token_embedding.shape[0]), dtype=torch.long)
    table = token_embedding.detach().float()[ids]
    distances = torch.cdist(ctx.detach().float(), table)  # [N, V']
    k = min(k, table.shape[0])
    values, positions = distances.topk(k, dim=-1, largest=False)
    return [
        [(decoder[int(ids[p])].replace("</w>", ""), float(v)) for p, v in zip(row_pos, row_val)]
        for row_pos, row_val in zip(positions.tolist(), values.tolist())
    ]


def _load_backbone(spec: dict[str, Any]):
    from promptkd.backbones import load_backbone
    from promptkd.errors import PromptKDError

    name = spec.get("model_name")
    if not name:
        raise PromptKDError("the checkpoint config records no backbone; --nearest needs its token embeddings.")
    if name.startswith("file:"):
        name = None  # architecture inferred from the weight file, as when it was first loaded
    return load_backbone(name, spec.get("pretrained"), quick_gelu=spec.get("quick_gelu"))


def print_nearest(tensors: dict[str, torch.Tensor], config: dict[str, Any], k: int) -> None:
    from promptkd.cli.common import print_table
    from promptkd.errors import PromptKDError

    if k < 1:
        raise PromptKDError(f"--nearest needs K >= 1, got {k}.")
    ctx = tensors.get(CONTEXT_KEY)
    if ctx is None:
        print(f"nearest words: this checkpoint holds no learned text context ({CONTEXT_KEY}).")
        return
    if ctx.dim() not in (2, 3):
        raise PromptKDError(f"{CONTEXT_KEY} has shape {list(ctx.shape)}; expected [M, W] or [C, M, W].")
    spec = config.get("backbone") or {}
    if spec.get("source") == "random" or not spec.get("pretrained"):
        print(
            "warning: the checkpoint's backbone has random weights; rebuilding it gives other token embeddings, "
            "so the words below are not meaningful."
        )
    backbone = _load_backbone(spec)
    table = backbone.text_tower.token_embedding.weight
    if table.shape[1] != ctx.shape[-1]:
        raise PromptKDError(
            f"{CONTEXT_KEY} has width {ctx.shape[-1]} but the token embeddings of {spec.get('model_name')} have "
            f"width {table.shape[1]}; the checkpoint does not belong to this backbone."
        )
    rows = ctx.reshape(-1, ctx.shape[-1])
    words = nearest_words(rows, table, backbone.tokenizer.decoder, k)
    classnames = config.get("classnames") or []
    n_ctx = ctx.shape[-2]
    table_rows = []
    for index, neighbours in enumerate(words):
        cls, pos = divmod(index, n_ctx)
        where = f"{pos + 1}" if ctx.dim() == 2 else f"{classnames[cls] if cls < len(classnames) else cls}:{pos + 1}"
        table_rows.append((where, ", ".join(f"{w} ({d:.3f})" for w, d in neighbours)))
    print(f"nearest words of {CONTEXT_KEY} (Euclidean distance in the token-embedding space, k={k}):")
    print_table(["context", "nearest words (distance)"], table_rows)


def run(args: argparse.Namespace) -> int:
    from promptkd.checkpoints import load_checkpoint
    from promptkd.cli.common import print_json, print_table

    tensors, config = load_checkpoint(args.checkpoint)
    backbone = config.get("backbone") or {}
    print(f"method: {config.get('method')}   library {config.get('library_version')}   created {config.get('created')}")
    if backbone:
        print(
            f"backbone: {backbone.get('model_name')} / {backbone.get('pretrained') or 'random'} "
            f"(quick_gelu={backbone.get('quick_gelu')})"
        )
    classnames = config.get("classnames")
    if classnames:
        shown = ", ".join(classnames[:8]) + (", ..." if len(classnames) > 8 else "")
        print(f"classes ({len(classnames)}): {shown}")
    rows = [(name, list(t.shape), str(t.dtype).replace("torch.", ""), t.numel()) for name, t in sorted(tensors.items())]
    print_table(["tensor", "shape", "dtype", "values"], rows)
    print(f"total trainable values: {sum(t.numel() for t in tensors.values()):,}")
    if tensors:
        print_table(["module", "tensors", "values"], [(p, n, f"{v:,}") for p, n, v in module_totals(tensors)])
    if args.nearest is not None:
        print_nearest(tensors, config, args.nearest)
    if args.json:
        print_json(config)
    return 0
