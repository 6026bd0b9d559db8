"""Import checkpoints written by the public CoOp / CoCoOp / MaPLe / PromptSRC / PromptKD code (Dassl format).

A Dassl checkpoint (``model.pth.tar-N``, ``model-best.pth.tar``) is a torch pickle of
``{"state_dict", "epoch", "optimizer", "scheduler", "val_result"}``. Its scheduler holds Dassl classes, so plain
``torch.load(weights_only=True)`` refuses it and ``weights_only=False`` would need Dassl installed and would run
pickled code. We read it with a restricted unpickler instead: torch's tensor rebuilders and plain containers are
real, every other class becomes an inert stub. Nothing from the file is executed.

Key mapping onto promptkd's names (``promptkd.prompts.learners``):

=====================================================================  ===========================================
reference key                                                          promptkd key
=====================================================================  ===========================================
``prompt_learner.ctx`` (or ``ctx`` in CoOp's prompt-learner files)     ``text.ctx``
``text_encoder.transformer.resblocks.{i}.VPT_shallow``                 ``text.deep[i-1]``
``prompt_learner.compound_prompts_text.{k}`` (MaPLe)                   ``text.deep[k]``
``image_encoder.VPT``                                                  ``visual.prompts[0]``
``image_encoder.transformer.resblocks.{i}.VPT_shallow``                ``visual.prompts[i]``
``prompt_learner.proj.*`` (MaPLe)                                      ``coupling.layers.0.*``
``prompt_learner.compound_prompt_projections.{k}.*`` (MaPLe)           ``coupling.layers.{k+1}.*``
``prompt_learner.meta_net.linear{1,2}.*`` (CoCoOp)                     ``meta_net.linear{1,2}.*``
``VPT_image_trans.conv1.{0,1,3}.*`` (PromptKD student projector)       ``projector.{fc1,bn,fc2}.*``
=====================================================================  ===========================================

Ignored, and reported: the ``token_prefix``/``token_suffix`` buffers (rebuilt from the current class names), the
frozen CLIP weights that PromptSRC/MaPLe/PromptKD files also carry (checked against the backbone's shapes when one
is given), and PromptSRC's frozen ``ZS_image_encoder`` copy.

The written config holds the method's own config keys (:func:`method_config_for`), so the checkpoint loads wherever
promptkd checkpoints do (``predict``, a test-time ``--base``, a PromptKD teacher); what the tensors say (widths,
depths) is kept under ``converted_from.settings``.
"""

from __future__ import annotations

import pickle
import re
import types
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from promptkd.checkpoints.format import CheckpointError

# --- restricted unpickling ------------------------------------------------------------------------------------------
_SAFE_BUILTINS = {
    "set",
    "frozenset",
    "slice",
    "complex",
    "dict",
    "list",
    "tuple",
    "int",
    "float",
    "bool",
    "str",
    "bytes",
    "bytearray",
    "range",
}
_SAFE_GLOBALS = {
    ("collections", "OrderedDict"),
    ("_codecs", "encode"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("torch.serialization", "_get_layout"),
}


class _Stub:
    """Stands in for any class the file names that is not torch/numpy/containers (e.g. Dassl schedulers)."""

    qualified_name = "?"

    def __init__(self, *args: Any, **kwargs: Any):
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _RestrictedUnpickler(pickle.Unpickler):
    """Real objects only for tensor rebuilding and plain containers; a stub for every other global."""

    def find_class(self, module: str, name: str) -> Any:
        if (module == "builtins" and name in _SAFE_BUILTINS) or (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        if module.split(".")[0] == "torch":
            obj = super().find_class(module, name)
            if isinstance(obj, type) or name.startswith("_rebuild"):
                return obj
        return type(name, (_Stub,), {"qualified_name": f"{module}.{name}"})


_restricted_pickle = types.ModuleType("promptkd_restricted_pickle")
_restricted_pickle.Unpickler = _RestrictedUnpickler  # type: ignore[attr-defined]
_restricted_pickle.load = pickle.load  # type: ignore[attr-defined]
_restricted_pickle.__name__ = "pickle"


def read_reference_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, metadata such as epoch) of a Dassl checkpoint, without executing anything from the file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file.")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception:  # Dassl pickles scheduler objects; fall back to the stub unpickler
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=False, pickle_module=_restricted_pickle)
        except Exception as error:
            raise CheckpointError(
                f"{path}: cannot be read as a Dassl/torch checkpoint ({type(error).__name__}: {error}); "
                "the file may be truncated or not a checkpoint."
            ) from error
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        state = obj["state_dict"]
        meta = {k: obj[k] for k in ("epoch", "val_result") if k in obj and isinstance(obj[k], (int, float))}
    elif isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state, meta = obj, {}
    else:
        raise CheckpointError(
            f"{path}: expected a dict with 'state_dict' (Dassl checkpoint); found {type(obj).__name__}."
        )
    tensors = {
        k[len("module.") :] if k.startswith("module.") else k: v
        for k, v in state.items()
        if isinstance(v, torch.Tensor)
    }
    return tensors, meta


# --- key mapping ----------------------------------------------------------------------------------------------------
_TEXT_DEEP = re.compile(r"^text_encoder\.transformer\.resblocks\.(\d+)\.VPT_shallow$")
_IMAGE_DEEP = re.compile(r"^image_encoder\.transformer\.resblocks\.(\d+)\.VPT_shallow$")
_MAPLE_TEXT = re.compile(r"^prompt_learner\.compound_prompts_text\.(\d+)$")
_MAPLE_PROJ = re.compile(r"^prompt_learner\.compound_prompt_projections\.(\d+)\.(weight|bias)$")
_PROJECTOR = {"0": "fc1", "1": "bn", "3": "fc2"}
_IGNORED_BUFFERS = re.compile(r"^prompt_learner\.token_(prefix|suffix)\d*$")
_FROZEN_PREFIXES = (
    "image_encoder.",
    "text_encoder.",
    "prompt_learner.ZS_image_encoder.",
    "logit_scale",
    "token_embedding.",
    "positional_embedding",
    "visual.",
    "transformer.",
    "ln_final.",
    "text_projection",
)


@dataclass
class ConversionReport:
    """What a conversion mapped, ignored and inferred, for the user to read."""

    source: str
    method: str = ""
    mapped: list[tuple[str, str, tuple[int, ...]]] = field(default_factory=list)
    ignored_buffers: list[str] = field(default_factory=list)
    frozen_weights: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)  # what the tensors say (widths, depths)
    method_config: dict[str, Any] = field(default_factory=dict)  # what the method is rebuilt with
    meta: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        lines = [
            f"{self.source}: detected {self.method} checkpoint"
            + (f" (epoch {self.meta['epoch']})" if "epoch" in self.meta else "")
        ]
        lines.append("  settings: " + ", ".join(f"{k}={v}" for k, v in self.settings.items()))
        lines.append("  method config: " + ", ".join(f"{k}={v!r}" for k, v in self.method_config.items()))
        if self.method_config.get("ctx_init") and self.settings.get("n_ctx", 0) < 4:
            lines.append(
                f"  CTX_INIT {self.method_config['ctx_init']!r}: its words after the first {self.settings['n_ctx']} "
                "context tokens stay fixed text, as in the reference's prompts (checked against the file's token "
                "buffers when a backbone is given; --ctx-init sets another)"
            )
        for src, dst, shape in self.mapped:
            lines.append(f"  {src} -> {dst} {list(shape)}")
        if self.ignored_buffers:
            lines.append(
                f"  ignored {len(self.ignored_buffers)} token buffers (rebuilt from class names): "
                + ", ".join(self.ignored_buffers)
            )
        if self.frozen_weights:
            lines.append(
                f"  ignored {len(self.frozen_weights)} frozen CLIP tensors stored in the file "
                "(the backbone is loaded from its own weights)"
            )
        return "\n".join(lines)


def _stack_layers(layers: dict[int, torch.Tensor], first: int, what: str, source: str) -> torch.Tensor:
    indices = sorted(layers)
    expected = list(range(first, first + len(indices)))
    if indices != expected:
        raise CheckpointError(f"{source}: {what} prompts exist for layers {indices}; expected consecutive {expected}.")
    shapes = {tuple(layers[i].shape) for i in indices}
    if len(shapes) != 1:
        raise CheckpointError(f"{source}: {what} prompts have different shapes per layer: {sorted(shapes)}")
    return torch.stack([layers[i] for i in indices])


def convert_reference_state_dict(
    state: dict[str, torch.Tensor], source: str = "<state dict>"
) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """Map a reference state dict onto promptkd keys; unknown keys are an error (never silently dropped)."""
    if state and not any(
        k.startswith(("prompt_learner.", "image_encoder.", "text_encoder.", "VPT_image_trans.")) for k in state
    ):
        # CoOp/CoCoOp save the prompt learner alone: keys are 'ctx', 'token_prefix', 'meta_net.linear1.weight'.
        state = {f"prompt_learner.{k}": v for k, v in state.items()}
    report = ConversionReport(source=source)
    out: dict[str, torch.Tensor] = {}
    text_deep: dict[int, torch.Tensor] = {}
    visual: dict[int, torch.Tensor] = {}
    unknown: list[str] = []
    sources: dict[str, list[str]] = defaultdict(list)
    for key, value in state.items():
        if _IGNORED_BUFFERS.match(key):
            report.ignored_buffers.append(key)
        elif key == "prompt_learner.ctx":
            out["text.ctx"] = value
            sources["text.ctx"].append(key)
        elif m := _TEXT_DEEP.match(key):
            text_deep[int(m.group(1))] = value
            sources["text.deep"].append(key)
        elif m := _MAPLE_TEXT.match(key):
            text_deep[int(m.group(1)) + 1] = value
            sources["text.deep"].append(key)
        elif key == "image_encoder.VPT":
            visual[0] = value
            sources["visual.prompts"].append(key)
        elif m := _IMAGE_DEEP.match(key):
            visual[int(m.group(1))] = value
            sources["visual.prompts"].append(key)
        elif m := re.match(r"^prompt_learner\.proj\.(weight|bias)$", key):
            out[f"coupling.layers.0.{m.group(1)}"] = value
            sources[f"coupling.layers.0.{m.group(1)}"].append(key)
        elif m := _MAPLE_PROJ.match(key):
            name = f"coupling.layers.{int(m.group(1)) + 1}.{m.group(2)}"
            out[name] = value
            sources[name].append(key)
        elif m := re.match(r"^prompt_learner\.meta_net\.(linear[12])\.(weight|bias)$", key):
            name = f"meta_net.{m.group(1)}.{m.group(2)}"
            out[name] = value
            sources[name].append(key)
        elif m := re.match(r"^VPT_image_trans\.conv1\.(\d)\.(\w+)$", key):
            if m.group(1) not in _PROJECTOR:
                unknown.append(key)
                continue
            name = f"projector.{_PROJECTOR[m.group(1)]}.{m.group(2)}"
            out[name] = value.flatten(1) if value.dim() == 4 else value
            sources[name].append(key)
        elif key.startswith(_FROZEN_PREFIXES):
            report.frozen_weights.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(
            f"{source}: {len(unknown)} keys are not known reference prompt keys: {', '.join(sorted(unknown)[:12])}. "
            "Supported: CoOp, CoCoOp, VPT-deep, IVLP, MaPLe, PromptSRC and PromptKD checkpoints."
        )
    if text_deep:
        out["text.deep"] = _stack_layers(text_deep, 1, "text deep", source)
    if visual:
        if 0 not in visual:
            raise CheckpointError(f"{source}: deep visual prompts without the input-layer image_encoder.VPT.")
        out["visual.prompts"] = _stack_layers(visual, 0, "visual", source)
    if not out:
        raise CheckpointError(f"{source}: no prompt tensors found (only {len(report.frozen_weights)} frozen weights).")
    report.method, report.settings = _describe(out, report, state)
    report.method_config = method_config_for(report.method, report.settings)
    for name in sorted(out):
        report.mapped.append(
            (", ".join(sources[name][:2]) + (" ..." if len(sources[name]) > 2 else ""), name, tuple(out[name].shape))
        )
    return out, report


def _describe(out: dict[str, torch.Tensor], report: ConversionReport, state: dict) -> tuple[str, dict[str, Any]]:
    settings: dict[str, Any] = {}
    if "text.ctx" in out:
        ctx = out["text.ctx"]
        settings["n_ctx"] = int(ctx.shape[-2])
        settings["class_specific"] = ctx.dim() == 3
        settings["text_width"] = int(ctx.shape[-1])
    if "text.deep" in out:
        settings["text_depth"] = int(out["text.deep"].shape[0]) + 1
    if "visual.prompts" in out:
        settings["n_vision_tokens"] = int(out["visual.prompts"].shape[1])
        settings["vision_depth"] = int(out["visual.prompts"].shape[0])
        settings["vision_width"] = int(out["visual.prompts"].shape[2])
    if any(k.startswith("projector.") for k in out):
        settings["projector_in"] = int(out["projector.fc1.weight"].shape[1])
        settings["projector_out"] = int(out["projector.fc2.weight"].shape[0])
        return "promptkd", settings
    if any(k.startswith("coupling.") for k in out):
        settings["vision_width"] = int(out["coupling.layers.0.weight"].shape[0])
        settings["depth"] = len({k.split(".")[2] for k in out if k.startswith("coupling.")})
        return "maple", settings
    if any(k.startswith("meta_net.") for k in out):
        return "cocoop", settings
    if "text.ctx" in out and "visual.prompts" in out:
        promptsrc = any(k.startswith("prompt_learner.ZS_image_encoder.") for k in report.frozen_weights)
        return ("promptsrc" if promptsrc else "ivlp"), settings
    if "visual.prompts" in out:
        return "vpt", settings
    return "coop", settings


#: CTX_INIT of the reference configs; their prompt learners use it only when N_CTX <= 4 (else random context)
REFERENCE_CTX_INIT = "a photo of a"


def _ctx_init(n_ctx: int) -> str:
    """The init phrase that gives the reference's prompt layout: with N_CTX < 4 its last words stay fixed text."""
    return REFERENCE_CTX_INIT if n_ctx <= 4 else ""


def method_config_for(method: str, settings: dict[str, Any]) -> dict[str, Any]:
    """The promptkd method config that rebuilds a checkpoint's tensors exactly (the keys its config class accepts).

    ``settings`` describe the tensors (widths, depths); the config names what the method builds. CoOp/CoCoOp use
    their whole init phrase as context, so a random init ('') of the same length has the same prompt layout. MaPLe,
    IVLP and PromptSRC keep the words of "a photo of a" after the first N_CTX tokens fixed: the file does not say
    which CTX_INIT was used, and the reference configs' one is assumed (reported by the converter).
    """
    n_ctx = settings.get("n_ctx", 0)
    if method == "coop":
        return {"n_ctx": n_ctx, "class_specific": bool(settings["class_specific"]), "ctx_init": ""}
    if method == "cocoop":
        return {"n_ctx": n_ctx, "ctx_init": ""}
    if method == "maple":
        return {"n_ctx": n_ctx, "depth": settings["depth"], "ctx_init": _ctx_init(n_ctx)}
    if method in ("ivlp", "promptsrc"):
        config = {
            "n_ctx_text": n_ctx,
            "text_depth": settings.get("text_depth", 1),
            "n_ctx_vision": settings.get("n_vision_tokens", 0),
            "vision_depth": settings.get("vision_depth", 0),
            "ctx_init": _ctx_init(n_ctx),
        }
        return config | ({"gpa": False} if method == "promptsrc" else {})  # GPA acts during training only
    if method == "vpt":
        return {"n_tokens": settings["n_vision_tokens"], "depth": settings["vision_depth"]}
    return {"n_ctx_vision": settings["n_vision_tokens"], "vision_depth": settings["vision_depth"]}  # promptkd


def check_init_layout(state: dict[str, torch.Tensor], report: ConversionReport, backbone: Any) -> None:
    """Refuse a file whose token buffers contradict the assumed CTX_INIT: the words an init phrase keeps fixed after
    the first N_CTX tokens ("of a" for N_CTX 2) must open every stored ``token_suffix`` row, else the prompts would
    be rebuilt with other text, silently. Nothing to check without the buffers or with an all-learnt context."""
    from promptkd.prompts import PromptedTextEncoder

    init = report.method_config.get("ctx_init") or ""
    suffix = state.get("prompt_learner.token_suffix")
    if not init or suffix is None:
        return
    encoder = PromptedTextEncoder(backbone.model)
    ids = backbone.tokenize([init]).to(encoder.positional_embedding.device)
    n_ctx, n_init = int(report.settings["n_ctx"]), int(encoder.pool_positions(ids)[0]) - 1
    if n_init < n_ctx:
        raise CheckpointError(
            f"{report.source}: CTX_INIT {init!r} has {n_init} tokens, fewer than the file's {n_ctx} context tokens; "
            "pass the phrase it was trained with to --ctx-init ('random' for random context)."
        )
    if n_init == n_ctx:
        return
    with torch.no_grad():
        words = encoder.embed_tokens(ids)[0, 1 + n_ctx : 1 + n_init].float().cpu()
    stored = suffix[:, : n_init - n_ctx].float()
    if stored.shape[1:] != words.shape or not torch.allclose(stored, words.expand_as(stored), rtol=1e-2, atol=1e-3):
        fixed = " ".join(init.split()[n_ctx:]) if len(init.split()) == n_init else "the rest of the phrase"
        raise CheckpointError(
            f"{report.source}: its prompts do not continue with {fixed!r} after the {n_ctx} learnt tokens, so it was "
            f"not trained with CTX_INIT {init!r}. Pass --ctx-init with the CTX_INIT of its config ('random' for "
            "random context)."
        )


def check_fits_backbone(
    tensors: dict[str, torch.Tensor], report: ConversionReport, backbone: Any, frozen: dict[str, torch.Tensor] | None
) -> None:
    """Fail with one message when prompt widths/depths or stored frozen weights disagree with ``backbone``."""
    problems = []
    s = report.settings
    if "text_width" in s and s["text_width"] != backbone.text_width:
        problems.append(f"text context width {s['text_width']} (backbone text width {backbone.text_width})")
    if "text_depth" in s and s["text_depth"] > backbone.text_layers:
        problems.append(f"text prompt depth {s['text_depth']} (backbone has {backbone.text_layers} text blocks)")
    if "vision_width" in s and s["vision_width"] != backbone.vision_width:
        problems.append(f"visual prompt width {s['vision_width']} (backbone vision width {backbone.vision_width})")
    if "vision_depth" in s and s["vision_depth"] > backbone.vision_layers:
        problems.append(f"visual prompt depth {s['vision_depth']} (backbone has {backbone.vision_layers} blocks)")
    if "projector_out" in s and s["projector_out"] != s.get("teacher_embed_dim", s["projector_out"]):
        problems.append("projector output width does not match the teacher")
    if "projector_in" in s and s["projector_in"] != backbone.embed_dim:
        problems.append(f"projector input width {s['projector_in']} (student embed dim {backbone.embed_dim})")
    if frozen:
        own = backbone.model.state_dict()
        renames = (("image_encoder.", "visual."), ("text_encoder.", ""))
        for key in sorted(frozen):
            target = key
            for old, new in renames:
                if key.startswith(old):
                    target = new + key[len(old) :]
                    break
            if target in own and tuple(own[target].shape) != tuple(frozen[key].shape):
                problems.append(
                    f"stored CLIP weight {key} has shape {list(frozen[key].shape)}, backbone {list(own[target].shape)}"
                )
                break
    if problems:
        raise CheckpointError(
            f"{report.source}: this {report.method} checkpoint does not fit backbone "
            f"{backbone.spec.model_name} ({backbone.spec.pretrained or 'random weights'}): "
            + "; ".join(problems)
            + ". Pass the backbone the checkpoint was trained with (e.g. --model ViT-L-14 --pretrained openai)."
        )


def convert_reference_checkpoint(
    path: str | Path,
    out: str | Path,
    *,
    backbone: Any | None = None,
    classnames: list[str] | None = None,
    ctx_init: str | None = None,
) -> tuple[Path, ConversionReport]:
    """Convert a reference checkpoint into a promptkd checkpoint at ``out`` (``.safetensors`` + ``.json``).

    ``ctx_init``: the CTX_INIT the MaPLe/IVLP/PromptSRC file was trained with ('' = random context), when it is not
    the reference configs' "a photo of a"; with a backbone, the file's token buffers are checked against it.
    """
    from promptkd.checkpoints.format import save_checkpoint

    state, meta = read_reference_checkpoint(path)
    tensors, report = convert_reference_state_dict(state, str(path))
    report.meta = meta
    if ctx_init is not None:
        if report.method not in ("maple", "ivlp", "promptsrc"):
            raise CheckpointError(
                f"{path}: --ctx-init applies to MaPLe, IVLP and PromptSRC files; this is a {report.method} checkpoint "
                "(its whole init phrase is learnt context, so the phrase does not change its prompts)."
            )
        report.method_config["ctx_init"] = ctx_init.strip()
    if backbone is not None:
        frozen = {k: state[k] for k in report.frozen_weights}
        check_fits_backbone(tensors, report, backbone, frozen)
        check_init_layout(state, report, backbone)
    if report.settings.get("class_specific") and classnames is not None:
        n_classes = int(tensors["text.ctx"].shape[0])
        if n_classes != len(classnames):
            raise CheckpointError(
                f"{path}: class-specific context for {n_classes} classes, but {len(classnames)} class names given."
            )
    config = {
        "method": report.method,
        "method_config": report.method_config,
        "backbone": backbone.spec.to_dict() if backbone is not None else None,
        "classnames": classnames,
        "converted_from": {"path": str(path), **meta, "settings": report.settings},
    }
    written = save_checkpoint(out, tensors, config)
    return written, report
