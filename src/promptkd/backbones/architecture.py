"""Architecture facts read from weights, so a file can be checked against (or used to pick) a model config."""

from __future__ import annotations

import re
from typing import Any

import open_clip
import torch

_BLOCK = re.compile(r"^(visual\.transformer|transformer)\.resblocks\.(\d+)\.")


def _count_blocks(state_dict: dict[str, torch.Tensor], tower: str) -> int:
    indices = {int(m.group(2)) for k in state_dict if (m := _BLOCK.match(k)) and m.group(1) == tower}
    return max(indices) + 1 if indices else 0


def is_openai_layout_vit(state_dict: dict[str, torch.Tensor]) -> bool:
    """True for OpenAI-layout ViT CLIP weights (flat text tower, ``visual.conv1`` patchifier)."""
    needed = ("visual.conv1.weight", "visual.class_embedding", "token_embedding.weight", "positional_embedding")
    return all(k in state_dict for k in needed)


def infer_clip_config(state_dict: dict[str, torch.Tensor]) -> dict[str, Any]:
    """open_clip model config of an OpenAI-layout ViT CLIP, from tensor shapes alone.

    Attention heads are not visible in the weights; OpenAI's convention (64-wide heads) is assumed, as open_clip's
    ``build_model_from_openai_state_dict`` does.
    """
    if not is_openai_layout_vit(state_dict):
        raise ValueError("not an OpenAI-layout ViT CLIP state dict (no visual.conv1 / token_embedding keys)")
    conv = state_dict["visual.conv1.weight"]
    vision_width, patch = conv.shape[0], conv.shape[-1]
    n_pos = state_dict["visual.positional_embedding"].shape[0]
    grid = round((n_pos - 1) ** 0.5)
    text_width = state_dict["ln_final.weight"].shape[0]
    text_projection = state_dict.get("text_projection")
    embed_dim = text_projection.shape[1] if text_projection is not None else state_dict["visual.proj"].shape[1]
    return {
        "embed_dim": int(embed_dim),
        "vision_cfg": {
            "image_size": int(grid * patch),
            "layers": _count_blocks(state_dict, "visual.transformer"),
            "width": int(vision_width),
            "patch_size": int(patch),
        },
        "text_cfg": {
            "context_length": int(state_dict["positional_embedding"].shape[0]),
            "vocab_size": int(state_dict["token_embedding.weight"].shape[0]),
            "width": int(text_width),
            "heads": max(1, int(text_width) // 64),
            "layers": _count_blocks(state_dict, "transformer"),
        },
    }


def describe_config(cfg: dict[str, Any]) -> str:
    """One line a user can compare: 'vision 768w x 12L patch 16 @224px, text 512w x 12L, embed 512'."""
    v, t = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
    return (
        f"vision {v.get('width')}w x {v.get('layers')}L patch {v.get('patch_size')} @{v.get('image_size')}px, "
        f"text {t.get('width')}w x {t.get('layers')}L ctx {t.get('context_length', 77)}, embed {cfg.get('embed_dim')}"
    )


def _shape_signature(cfg: dict[str, Any]) -> tuple:
    v, t = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
    image_size = v.get("image_size")
    if isinstance(image_size, (list, tuple)):
        image_size = image_size[0]
    return (
        bool(cfg.get("custom_text", False)),
        cfg.get("embed_dim"),
        image_size,
        v.get("layers"),
        v.get("width"),
        v.get("patch_size"),
        t.get("context_length", 77),
        t.get("vocab_size", 49408),
        t.get("width"),
        t.get("layers"),
    )


def builtin_names_matching(cfg: dict[str, Any]) -> list[str]:
    """open_clip model names whose tensor shapes equal ``cfg`` (e.g. ViT-B-16 and ViT-B-16-quickgelu)."""
    target = _shape_signature(cfg)
    matches = []
    for name in open_clip.list_models():
        other = open_clip.get_model_config(name)
        if (
            not other
            or "timm_model_name" in other.get("vision_cfg", {})
            or "hf_model_name" in other.get("text_cfg", {})
        ):
            continue
        if _shape_signature(other) == target:
            matches.append(name)
    return matches
