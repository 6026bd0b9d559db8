"""The one front door for CLIP backbones: ``load_backbone(name, pretrained)``.

Every model comes from open_clip (no fork). What this layer adds is what open_clip leaves to the user: one clear
error per bad input (unknown name or tag, offline tag, wrong architecture, truncated file), the QuickGELU decision
made explicitly and recorded with its reason, and the model's facts (widths, grid, preprocessing) exposed so that
no other module hard-codes 512/768/224.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.transform import PreprocessCfg
from torch import nn

from promptkd.backbones.architecture import (
    builtin_names_matching,
    describe_config,
    infer_clip_config,
    is_openai_layout_vit,
)
from promptkd.backbones.catalog import is_cached
from promptkd.backbones.files import WeightFileError, read_weight_file, sha256_of
from promptkd.backbones.registry import register_builtin_configs
from promptkd.backbones.types import Backbone, BackboneError, BackboneSpec, PreprocessInfo, autocast_for
from promptkd.backbones.weights import RANDOM, WeightsNotGivenError, shipped_weights
from promptkd.backbones.weights import SHIPPED_TAG as SHIPPED
from promptkd.hub import hub_reachable
from promptkd.precision import PRECISIONS

__all__ = [
    "PRECISIONS",
    "Backbone",
    "BackboneError",
    "BackboneSpec",
    "PreprocessInfo",
    "autocast_for",
    "check_model_name",
    "load_backbone",
    "load_recorded_backbone",
    "register_builtin_configs",
    "run_weights",
]

logger = logging.getLogger(__name__)


# --- name and tag resolution --------------------------------------------------------------------------------------
def normalise_model_name(name: str) -> str:
    """'ViT-B/16' (OpenAI spelling) -> 'ViT-B-16' (open_clip spelling)."""
    if name.startswith(("local-dir:", "hf-hub:")):
        return name
    return name.replace("/", "-")


def _did_you_mean(word: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(word, candidates, n=3, cutoff=0.5)
    return f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def check_model_name(name: str) -> str:
    register_builtin_configs()
    name = normalise_model_name(name)
    if name.startswith(("local-dir:", "hf-hub:")):
        return name
    if open_clip.get_model_config(name) is None:
        raise BackboneError(
            f"unknown model {name!r}.{_did_you_mean(name, open_clip.list_models())} "
            "Run `promptkd models` to list every name."
        )
    return name


def _tag_cfg(name: str, tag: str) -> dict | None:
    cfg = open_clip.get_pretrained_cfg(name, tag)
    return cfg or None


def _base_name(name: str) -> str:
    return name[: -len("-quickgelu")] if name.endswith("-quickgelu") else name


def _known_openai_hashes() -> dict[str, tuple[str, str]]:
    """sha256 -> (model name, tag) for OpenAI's TorchScript releases; the hash is part of their URLs."""
    found = {}
    for name, tag in open_clip.list_pretrained():
        cfg = open_clip.get_pretrained_cfg(name, tag)
        url = cfg.get("url", "") if cfg else ""
        parts = url.split("/")
        if "openaipublic" in url and len(parts) >= 2 and len(parts[-2]) == 64:
            found[parts[-2]] = (name, tag)
    return found


# --- loading ------------------------------------------------------------------------------------------------------
def load_backbone(
    model_name: str | None,
    pretrained: str | None = None,
    *,
    quick_gelu: bool | None = None,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    cache_dir: str | None = None,
    allow_torchscript: bool = True,
    identify_file: bool = True,
) -> Backbone:
    """Build an open_clip CLIP by name + tag, from a local weight file, or from a ``local-dir:`` folder.

    Args:
        model_name: open_clip name (``ViT-B-16``; OpenAI spelling ``ViT-B/16`` accepted), ``local-dir:<folder>``,
            or None to infer the architecture from the weight file.
        pretrained: a pretrained tag of that model (``openai``, ``laion2b_s34b_b88k``), a weight file (OpenAI
            TorchScript ``.pt``, state dict ``.pt``/``.bin``, ``.safetensors``), or None for random weights.
        quick_gelu: force the activation; None decides from the evidence and records why in ``spec``.
        precision: compute precision (``fp32``, ``bf16`` autocast, ``fp16`` autocast on GPU).
    """
    if model_name is not None and model_name.startswith("timm:"):
        from promptkd.backbones.timm_models import load_timm_backbone

        return load_timm_backbone(model_name, pretrained, device=device, precision=precision)
    register_builtin_configs()
    if pretrained == "random":  # asked for by name (a run's --pretrained random)
        pretrained = None
    shipped = pretrained == SHIPPED
    if shipped:
        from promptkd.backbones.weights import shipped_weights

        pretrained = shipped_weights(model_name or "")
        if pretrained is None:
            raise BackboneError(f"promptkd ships no weights for {model_name!r}; only the embedded world's models.")
    if shipped or (pretrained and _is_shipped_file(pretrained)):
        from promptkd.backbones.weights import verify_shipped

        verify_shipped(pretrained, open_clip.get_model_config(_base_name(model_name)) if model_name else None)
    if precision not in PRECISIONS:
        raise BackboneError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}.")
    if model_name is None and not pretrained:
        raise BackboneError("give a model name, a weight file, or both.")
    if model_name is not None and model_name.startswith("local-dir:"):
        backbone = _load_local_dir(model_name, quick_gelu)
    elif pretrained and (tag_name := _resolve_tag(model_name, pretrained)):
        backbone = _load_tag(tag_name[0], tag_name[1], quick_gelu, cache_dir)
    elif pretrained:
        backbone = _load_file(model_name, pretrained, quick_gelu, allow_torchscript, identify_file)
    else:
        name = check_model_name(model_name)  # type: ignore[arg-type]
        qg = _decide_quick_gelu_from_name(name, quick_gelu)
        model = _create(name, qg[0])
        spec = BackboneSpec(model_name=name, source="random", quick_gelu=qg[0], quick_gelu_reason=qg[1])
        backbone = Backbone(model, make_tokenizer(name, _context_length(model)), spec, PreprocessInfo.from_model(model))
    if shipped or (pretrained and _is_shipped_file(pretrained)):
        backbone.spec.pretrained = SHIPPED  # portable: resolves to this installation's copy wherever it lives
    backbone.model.to(device)
    backbone.model.eval()
    backbone.precision = precision
    if precision == "fp16" and torch.device(device).type == "cpu":
        raise BackboneError("precision fp16 on the CPU is very slow (no fp16 matmul kernels); use bf16 or fp32.")
    return backbone


class _DropRandomInitNotice(logging.Filter):
    """open_clip logs 'No pretrained weights loaded' on the root logger; random init is what we asked for."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


def run_weights(model_name: str | None, pretrained: str | None, *, flag: str = "--pretrained") -> str | None:
    """The weights a run starts from: the given tag or file; ``random`` (None: random init, asked for); when none
    is given, the model's shipped weights. A model with neither is refused: a run never trains or evaluates random
    weights by accident."""
    if pretrained == RANDOM:
        logger.warning("%s starts from RANDOM weights (%s random)", model_name, flag)
        return None
    if pretrained:
        if model_name and not model_name.startswith(("local-dir:", "timm:")) and _tag_cfg(model_name, pretrained):
            _require_cached_or_online(model_name, pretrained, _tag_cfg(model_name, pretrained), None, flag=flag)
        return pretrained
    if model_name and shipped_weights(model_name) is not None:
        return SHIPPED
    if model_name is None or model_name.startswith("local-dir:"):
        return None  # load_backbone refuses a call with neither; a local-dir folder holds its weights
    if not model_name.startswith("timm:"):
        check_model_name(model_name)  # a typo gets "did you mean" first
    raise WeightsNotGivenError(
        f"{model_name} has no weights promptkd ships, and {flag} was not given. Give {flag} TAG (e.g. openai; "
        f"`promptkd models` lists tags and what is cached), {flag} FILE, or {flag} random to start from random "
        "weights on purpose."
    )


def _is_shipped_file(path: str) -> bool:
    from promptkd.backbones.weights import WEIGHTS_DIR

    try:
        return Path(path).resolve().parent == WEIGHTS_DIR.resolve()
    except OSError:
        return False


def _create(name: str, quick_gelu: bool, **kwargs: Any) -> nn.Module:
    """Random-weight model from a config name; ``quick_gelu`` overrides whatever the config says."""
    root, notice_filter = logging.getLogger(), _DropRandomInitNotice()
    root.addFilter(notice_filter)
    try:
        return open_clip.create_model(_base_name(name), pretrained=None, quick_gelu=quick_gelu, **kwargs)
    finally:
        root.removeFilter(notice_filter)


TOKENIZER_FILE = "tokenizer_bpe.txt.gz"


def make_tokenizer(name: str, context_length: int, folder: Path | None = None):
    """open_clip's tokenizer for ``name``; world models use the world vocabulary; a folder may carry its own BPE."""
    if folder is not None and (folder / TOKENIZER_FILE).is_file():
        tokenizer = open_clip.SimpleTokenizer(bpe_path=str(folder / TOKENIZER_FILE), context_length=context_length)
        tokenizer.bpe_path = str(folder / TOKENIZER_FILE)  # remembered so an export carries the vocabulary along
        return tokenizer
    if _base_name(name).startswith("pkd-world"):
        from promptkd.backbones.vocab import world_tokenizer

        return world_tokenizer(context_length)
    if name.startswith("file:") or name.startswith("local-dir:"):
        return open_clip.SimpleTokenizer(context_length=context_length)
    return open_clip.get_tokenizer(_base_name(name), context_length=context_length)


def _context_length(model: nn.Module) -> int:
    tower = model.text if hasattr(model, "text") else model
    return int(tower.positional_embedding.shape[0])


def _decide_quick_gelu_from_name(name: str, forced: bool | None) -> tuple[bool, str]:
    if forced is not None:
        return forced, "set explicitly"
    cfg = open_clip.get_model_config(_base_name(name)) or {}
    if name.endswith("-quickgelu"):
        return True, f"model name {name!r} ends in -quickgelu"
    return bool(cfg.get("quick_gelu", False)), f"model config {name!r}"


def _resolve_tag(model_name: str | None, pretrained: str) -> tuple[str, str] | None:
    """(name, tag) when ``pretrained`` is a registered tag; raises on a name/tag that is neither tag nor file."""
    if model_name is None:
        return None
    name = check_model_name(model_name)
    if _tag_cfg(name, pretrained) is not None:
        return name, pretrained
    if os.path.exists(os.path.expanduser(pretrained)):
        return None
    if os.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors", ".tar")):
        raise BackboneError(f"weight file {pretrained} does not exist; check the path (for a tag, give its name).")
    tags = open_clip.list_pretrained_tags_by_model(name)
    base_tags = open_clip.list_pretrained_tags_by_model(_base_name(name) + "-quickgelu") if tags == [] else []
    available = tags or base_tags
    from promptkd.backbones.weights import RANDOM, shipped_weights

    words = [*available, RANDOM, *([SHIPPED] if shipped_weights(name) else [])]
    raise BackboneError(
        f"{pretrained!r} is neither a pretrained tag of {name!r} nor an existing file."
        f"{_did_you_mean(pretrained, words)} Tags of {name}: {', '.join(available) or 'none'}"
        f"{'; its shipped weights: shipped' if shipped_weights(name) else ''}; random weights: random."
    )


def _load_tag(name: str, tag: str, forced: bool | None, cache_dir: str | None) -> Backbone:
    cfg = _tag_cfg(name, tag) or {}
    tag_qg = bool(cfg.get("quick_gelu", False)) or name.endswith("-quickgelu")
    if forced is not None and forced != tag_qg:
        warnings.warn(
            f"quick_gelu={forced} was forced, but tag {tag!r} of {name} was trained with quick_gelu={tag_qg}: "
            "expect lower accuracy.",
            UserWarning,
            stacklevel=3,
        )
    quick_gelu = tag_qg if forced is None else forced
    _require_cached_or_online(name, tag, cfg, cache_dir)
    reason = "set explicitly" if forced is not None else f"pretrained tag {tag!r} records quick_gelu={tag_qg}"
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="QuickGELU mismatch")
            model, _, _ = open_clip.create_model_and_transforms(
                _base_name(name), pretrained=tag, force_quick_gelu=quick_gelu, cache_dir=cache_dir
            )
    except RuntimeError as error:
        raise BackboneError(
            f"weights for {name} / {tag} are not in the local cache and could not be downloaded ({error}). "
            f"On a connected machine run `promptkd models --download {name} {tag}` (or open_clip.create_model) and "
            "copy the Hugging Face cache, then set HF_HUB_OFFLINE=1; or pass the weight file itself with "
            "--pretrained /path/to/weights (.pt, .bin or .safetensors)."
        ) from error
    spec = BackboneSpec(
        model_name=_base_name(name), pretrained=tag, source="tag", quick_gelu=quick_gelu, quick_gelu_reason=reason
    )
    return Backbone(model, make_tokenizer(name, _context_length(model)), spec, PreprocessInfo.from_model(model))


def _require_cached_or_online(
    name: str, tag: str, cfg: dict, cache_dir: str | None, *, flag: str = "--pretrained"
) -> None:
    """``flag``: how the command spells the weights option (--teacher-pretrained for distill's teacher), so the
    hint names an option that exists; :func:`run_weights` checks here first, where the spelling is known."""
    if is_cached(cfg, cache_dir) or hub_reachable():
        return
    raise BackboneError(
        f"weights for {name} / {tag} are not in the local cache and this machine is offline. "
        f"On a connected machine run `promptkd models --download {name} {tag}` and copy the Hugging Face cache "
        f"(~/.cache/huggingface) here; or pass the weight file itself: {flag} /path/to/weights "
        f"(.pt, .bin or .safetensors), or a converted folder: {flag.replace('pretrained', 'model')} "
        "local-dir:/path/to/folder."
    )


def _sidecar_config(path: Path) -> dict | None:
    """An open_clip-style config next to a weight file (``open_clip_config.json`` or ``<file>.json``)."""
    for candidate in (path.with_suffix(".json"), path.parent / "open_clip_config.json"):
        if candidate.is_file():
            try:
                data = json.loads(candidate.read_text())
            except json.JSONDecodeError as error:
                raise BackboneError(f"{candidate}: not valid JSON ({error}).") from error
            if isinstance(data, dict) and "model_cfg" in data:
                return data
    return None


def _load_file(
    model_name: str | None, pretrained: str, forced: bool | None, allow_torchscript: bool, identify_file: bool
) -> Backbone:
    path = Path(pretrained).expanduser()
    try:
        weights = read_weight_file(path, allow_torchscript=allow_torchscript)
    except WeightFileError as error:
        raise BackboneError(str(error)) from error
    state = weights.state_dict
    sidecar = _sidecar_config(path)
    digest = None
    identified: tuple[str, str] | None = None
    if weights.format == "torchscript" and identify_file:
        digest = sha256_of(path)
        identified = _known_openai_hashes().get(digest)

    found_cfg = infer_clip_config(state) if is_openai_layout_vit(state) else None
    if model_name is None:
        if sidecar is not None:
            model_cfg = dict(sidecar["model_cfg"])
            name = f"file:{path.name}"
        elif found_cfg is not None:
            matches = builtin_names_matching(found_cfg)
            if not matches:
                model_cfg, name = found_cfg, f"file:{path.name}"
            else:
                name = next((m for m in matches if not m.endswith("-quickgelu")), matches[0])
                model_cfg = None
        else:
            raise BackboneError(
                f"{path}: cannot infer the architecture from this file (not an OpenAI-layout ViT CLIP); "
                "pass the model name, e.g. --model ViT-B-16."
            )
    else:
        name = check_model_name(model_name)
        model_cfg = None

    # --- QuickGELU: explicit flag > sidecar > OpenAI archive > name; ambiguous OpenAI-shaped files get a warning ---
    if forced is not None:
        quick_gelu, reason = forced, "set explicitly"
    elif sidecar is not None and "quick_gelu" in sidecar["model_cfg"]:
        quick_gelu, reason = bool(sidecar["model_cfg"]["quick_gelu"]), "config file next to the weights"
    elif identified is not None:
        quick_gelu, reason = True, f"file is OpenAI's {identified[0]} release (sha256 match)"
    elif weights.format == "torchscript":
        quick_gelu, reason = True, "TorchScript archive: OpenAI release format, trained with QuickGELU"
    elif model_cfg is not None:
        quick_gelu, reason = bool(model_cfg.get("quick_gelu", False)), "inferred config"
    else:
        quick_gelu, reason = _decide_quick_gelu_from_name(name, None)
        if not quick_gelu and open_clip.list_pretrained_tags_by_model(name + "-quickgelu"):
            warnings.warn(
                f"{path}: the file does not say whether its weights were trained with QuickGELU (OpenAI's CLIP "
                f"weights were; most LAION weights were not). Using plain GELU from the name {name!r}. If these are "
                "OpenAI weights, pass quick_gelu=True (--quick-gelu) or the name with -quickgelu: the wrong "
                "activation silently costs accuracy.",
                UserWarning,
                stacklevel=3,
            )
    if forced is not None and weights.format == "torchscript" and not forced:
        warnings.warn(f"{path}: OpenAI archive loaded with quick_gelu=False; expect lower accuracy.", stacklevel=3)

    if model_cfg is not None:
        model = _create_from_cfg(model_cfg, quick_gelu)
        size = model_cfg.get("vision_cfg", {}).get("image_size", 224)
        preprocess = {**asdict(PreprocessCfg()), "size": size}
        if sidecar is not None:
            preprocess.update(sidecar.get("preprocess_cfg", {}))
        open_clip.set_model_preprocess_cfg(model, preprocess)
    else:
        model = _create(name, quick_gelu)
    if identified is not None:
        tag_cfg = open_clip.get_pretrained_cfg(*identified)
        pre = {k: tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag_cfg}
        open_clip.set_model_preprocess_cfg(model, {**model.visual.preprocess_cfg, **pre})
    _load_state_checked(model, state, path, name, found_cfg)
    spec = BackboneSpec(
        model_name=name,
        pretrained=str(path),
        source="file",
        quick_gelu=quick_gelu,
        quick_gelu_reason=reason,
        file_sha256=digest,
    )
    tokenizer = make_tokenizer(name, _context_length(model), path.parent if sidecar is not None else None)
    return Backbone(model, tokenizer, spec, PreprocessInfo.from_model(model))


def _create_from_cfg(model_cfg: dict[str, Any], quick_gelu: bool) -> nn.Module:
    cfg = {k: v for k, v in model_cfg.items() if k not in ("custom_text",)}
    cfg["quick_gelu"] = quick_gelu
    cls = open_clip.CustomTextCLIP if model_cfg.get("custom_text") else open_clip.CLIP
    return cls(**cfg)


def _load_state_checked(
    model: nn.Module, state: dict[str, torch.Tensor], path: Path, name: str, found_cfg: dict | None
) -> None:
    """Strict load with a message naming the file, the expected architecture and what the file holds."""
    if hasattr(model, "text") and not any(k.startswith("text.") for k in state):
        from open_clip.model import convert_to_custom_text_state_dict

        state = convert_to_custom_text_state_dict(state)
    expected = model.state_dict()
    non_persistent = {name for name, _ in model.named_buffers()} - set(expected)
    state = {k: v for k, v in state.items() if k not in non_persistent}  # e.g. attn_mask in TorchScript archives
    missing = sorted(k for k in expected if k not in state)
    unexpected = sorted(k for k in state if k not in expected)
    mis_shaped = sorted(
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    )
    if missing or unexpected or mis_shaped:
        expected_desc = (
            describe_config(open_clip.get_model_config(_base_name(name)) or {})
            if not name.startswith("file:")
            else "the inferred architecture"
        )
        found_desc = describe_config(found_cfg) if found_cfg else "an unrecognised layout"
        hint = ""
        if found_cfg:
            matches = [m for m in builtin_names_matching(found_cfg) if not m.endswith("-quickgelu")]
            if matches:
                hint = f" The file matches {', '.join(matches)}: pass that model name (or omit the name)."
        raise BackboneError(
            f"{path}: weights do not fit model {name!r}. Expected {expected_desc}; the file holds {found_desc}."
            f"{hint}\n" + _format_key_problems(missing, unexpected, mis_shaped)
        )
    with torch.no_grad():
        model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)


def _format_key_problems(missing: list[str], unexpected: list[str], mis_shaped: list[str], limit: int = 8) -> str:
    lines = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mis_shaped)):
        if items:
            shown = ", ".join(items[:limit]) + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
            lines.append(f"  {label} keys ({len(items)}): {shown}")
    return "\n".join(lines)


def _load_local_dir(model_name: str, forced: bool | None) -> Backbone:
    folder = Path(model_name[len("local-dir:") :]).expanduser()
    config_path = folder / "open_clip_config.json"
    if not folder.is_dir():
        raise BackboneError(f"{folder}: no such folder (from {model_name!r}).")
    if not config_path.is_file():
        raise BackboneError(
            f"{folder}: a local-dir model needs open_clip_config.json with 'model_cfg' (and optionally "
            "'preprocess_cfg') next to open_clip_model.safetensors or open_clip_pytorch_model.bin."
        )
    config = json.loads(config_path.read_text())
    cfg_qg = bool(config.get("model_cfg", {}).get("quick_gelu", False))
    quick_gelu = cfg_qg if forced is None else forced
    try:
        model, _, _ = open_clip.create_model_and_transforms(model_name, force_quick_gelu=quick_gelu)
    except (RuntimeError, ValueError, FileNotFoundError) as error:
        raise BackboneError(f"{folder}: cannot build the local model: {error}") from error
    spec = BackboneSpec(
        model_name=model_name,
        source="local-dir",
        quick_gelu=quick_gelu,
        quick_gelu_reason="set explicitly" if forced is not None else "open_clip_config.json",
    )
    return Backbone(
        model, make_tokenizer(model_name, _context_length(model), folder), spec, PreprocessInfo.from_model(model)
    )


def load_recorded_backbone(
    spec: dict[str, Any], *, device: str | torch.device = "cpu", precision: str = "fp32"
) -> Backbone:
    """The backbone a checkpoint's recorded :class:`BackboneSpec` (``to_dict()``) names: model, weights, QuickGELU."""
    if str(spec.get("model_name") or "").startswith("timm:"):
        from promptkd.backbones.timm_models import load_timm_backbone, timm_options

        return load_timm_backbone(
            spec["model_name"],
            spec.get("pretrained"),
            device=device,
            precision=precision,
            announce_random=False,  # a fully trained student's checkpoint holds every weight
            **timm_options(spec),
        )
    return load_backbone(
        spec.get("model_name"),
        spec.get("pretrained"),
        quick_gelu=spec.get("quick_gelu"),
        device=device,
        precision=precision,
    )
