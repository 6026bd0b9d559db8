"""A frozen prompted CLIP whose prompts are *per test sample*: the batched core of every test-time method.

Test-time prompt tuning adapts one prompt per test image. Instead of looping over images (the reference code), the
prompts of B images are stacked along a leading batch axis and trained together; because AdamW and SGD act element
by element and no operation couples samples (ViTs have no batch norm, losses are summed per sample), one optimiser
over the stack equals B independent optimisers (algorithms.md §13).

Tunable tensors (``PromptParams``, a dict), each with a leading sample axis B:
- ``ctx`` [B, M, Wt]: the shared text context (CoOp / TPT / MaPLe's layer-0 text prompt);
- ``deep`` [B, J-1, M, Wt]: deep text prompts (MaPLe), optional;
- ``coupling_weight`` [B, J, Wv, Wt] and ``coupling_bias`` [B, J, Wv]: MaPLe's text→vision maps, optional.
A tensor that is not tuned stays shared (no sample axis) in :attr:`PromptedCLIP.base`.

Text features for B samples × C classes are computed in chunks of sequences sized to a memory budget, each chunk
truncated to the longest EOT position of the class list; with gradients, chunks beyond one are checkpointed
(recomputed in backward), which bounds the activation memory of 1000-class prompts (about 37 MB per class for the
reference's full-length, single-chunk graph).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from promptkd.backbones import Backbone
from promptkd.errors import PromptKDError
from promptkd.prompts import PromptedImageEncoder, PromptedTextEncoder, TextPromptLearner

__all__ = [
    "PROMPT_KEYS",
    "PromptParams",
    "PromptedCLIP",
    "StudentFeatures",
    "TTAModelError",
    "base_from_method",
    "build_model",
]

PromptParams = dict[str, torch.Tensor]
PROMPT_KEYS = ("ctx", "deep", "coupling_weight", "coupling_bias")

#: activations kept per token, per text block, in units of the text width (attention, MLP, norms, residuals)
_ACTIVATION_FLOATS_PER_WIDTH = 16


class TTAModelError(PromptKDError, ValueError):
    """A base model or prompt set that test-time tuning cannot use."""


@dataclass
class _TextPlan:
    length: int
    sequences_per_chunk: int


class PromptedCLIP(torch.nn.Module):
    """Frozen CLIP towers + a class list + initial prompts; features for per-sample prompt stacks.

    ``base`` holds the initial prompts (no sample axis): ``ctx`` always, ``deep`` / ``coupling_*`` for MaPLe-style
    bases. ``fixed_visual`` are VPT/IVLP-style visual prompts that do not depend on the text prompts (not tuned).
    """

    def __init__(
        self,
        backbone: Backbone,
        learner: TextPromptLearner,
        base: PromptParams,
        *,
        fixed_visual: torch.Tensor | None = None,
        text_memory_mb: float = 1024.0,
    ):
        super().__init__()
        self.backbone = backbone
        self.text_encoder = PromptedTextEncoder(backbone.model)
        self.image_encoder = PromptedImageEncoder(backbone.model)
        object.__setattr__(self, "learner", learner)  # holds the class token buffers; its ctx is not used
        unknown = set(base) - set(PROMPT_KEYS)
        if unknown or "ctx" not in base:
            raise TTAModelError(f"base prompts need 'ctx' and only {PROMPT_KEYS}; got {sorted(base)}")
        if ("coupling_weight" in base) != ("coupling_bias" in base):
            raise TTAModelError("coupling_weight and coupling_bias come together")
        self.base = {k: v.detach().float().clone() for k, v in base.items()}
        self.fixed_visual = None if fixed_visual is None else fixed_visual.detach().float().clone()
        self.text_memory_mb = float(text_memory_mb)
        self.logit_scale = float(backbone.logit_scale)
        self._initial_text: torch.Tensor | None = None
        self._initial_key: tuple[Any, int] = (None, -1)
        self.image_chunk = 256  # views per no-grad image forward (bounds activation memory for large batches)

    # --- facts --------------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.base["ctx"].device

    @property
    def classnames(self) -> list[str]:
        return list(self.learner.classnames)

    @property
    def has_coupling(self) -> bool:
        return "coupling_weight" in self.base

    def visual_depends_on(self, tuned: tuple[str, ...]) -> bool:
        """Whether tuning ``tuned`` changes the image features (MaPLe: vision prompts are maps of text prompts)."""
        return self.has_coupling and bool(set(tuned) & set(PROMPT_KEYS))

    def set_classnames(self, classnames: list[str]) -> None:
        self.learner.set_classnames(classnames)
        self._initial_text = None

    def to(self, *args: Any, **kwargs: Any) -> PromptedCLIP:
        super().to(*args, **kwargs)
        device = torch.empty(0).to(*args, **kwargs).device
        self.base = {k: v.to(device) for k, v in self.base.items()}
        if self.fixed_visual is not None:
            self.fixed_visual = self.fixed_visual.to(device)
        self.learner.to(device)
        self._initial_text = None
        return self

    # --- prompts ------------------------------------------------------------------------------------------------
    def initial_params(self, batch: int, tuned: tuple[str, ...]) -> PromptParams:
        """Fresh per-sample copies of the tuned base tensors (the episodic reset), leaves with grad."""
        missing = [k for k in tuned if k not in self.base]
        if missing:
            raise TTAModelError(f"the base model has no {', '.join(missing)} prompts to tune (tuned: {tuned})")
        return {
            k: self.base[k].unsqueeze(0).repeat(batch, *([1] * self.base[k].dim())).requires_grad_(True) for k in tuned
        }

    def _get(self, params: PromptParams | None, key: str) -> tuple[torch.Tensor | None, bool]:
        """(tensor, per_sample) for a prompt key: the tuned stack if given, else the shared base (or None)."""
        if params is not None and key in params:
            return params[key], True
        return self.base.get(key), False

    def visual_layers(self, params: PromptParams | None) -> list[torch.Tensor] | None:
        """Vision prompts per layer, each [n, Wv] (shared) or [B, n, Wv] (per sample); None without prompts."""
        if self.has_coupling:
            ctx, ctx_ps = self._get(params, "ctx")
            deep, deep_ps = self._get(params, "deep")
            weight, w_ps = self._get(params, "coupling_weight")
            bias, _ = self._get(params, "coupling_bias")
            layers = []
            n_layers = weight.shape[-3]
            for k in range(n_layers):
                if k == 0:
                    text, text_ps = ctx, ctx_ps
                else:
                    text, text_ps = (deep[:, k - 1], True) if deep_ps else (deep[k - 1], False)
                w = weight[:, k] if w_ps else weight[k]
                b = bias[:, k] if w_ps else bias[k]
                if text_ps or w_ps:
                    if not text_ps:
                        text = text.unsqueeze(0).expand(w.shape[0], -1, -1)
                    if not w_ps:
                        w, b = w.unsqueeze(0).expand(text.shape[0], -1, -1), b.unsqueeze(0).expand(text.shape[0], -1)
                    layers.append(torch.baddbmm(b.unsqueeze(1), text, w.transpose(1, 2)))
                else:
                    layers.append(F.linear(text, w, b))
            return layers
        if self.fixed_visual is not None:
            return list(self.fixed_visual.unbind(0))
        return None

    # --- image side ---------------------------------------------------------------------------------------------
    def encode_many(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised features of many images with the base prompts, no gradients, ``image_chunk`` at a time."""
        with torch.no_grad():
            return torch.cat([self.encode_images(chunk) for chunk in images.split(self.image_chunk)])

    def encode_images(
        self,
        images: torch.Tensor,
        params: PromptParams | None = None,
        *,
        views_per_sample: int = 1,
        block_hook=None,
        normalize: bool = True,
    ) -> torch.Tensor:
        """Image features [N, E] (normalised unless told) of images [N, 3, H, W], ``views_per_sample`` per sample."""
        layers = self.visual_layers(params)
        if layers is not None:
            layers = [
                layer.repeat_interleave(views_per_sample, dim=0) if layer.dim() == 3 else layer for layer in layers
            ]
        with self.backbone.autocast():
            features = self.image_encoder(images, layers, block_hook=block_hook).float()
        return F.normalize(features, dim=-1) if normalize else features

    # --- text side ----------------------------------------------------------------------------------------------
    def _plan(self) -> _TextPlan:
        length = self.learner.eot_length
        per_sequence = length * self.text_encoder.n_blocks * self.text_encoder.width * _ACTIVATION_FLOATS_PER_WIDTH * 4
        budget = self.text_memory_mb * 2**20
        return _TextPlan(length, max(1, int(budget // per_sequence)))

    def _text_chunk(
        self, ctx: torch.Tensor, deep_layers: list[torch.Tensor], classes: slice, per_sample: bool, length: int
    ) -> torch.Tensor:
        """Features of samples × classes[classes]: ctx [b, M, W] (per sample) or [M, W] -> [b·c, E] or [c, E]."""
        learner = self.learner
        if per_sample:
            n_b = ctx.shape[0]
            embeddings = learner.build(ctx, batched=True, classes=classes, length=length).flatten(0, 1)
            n_c = embeddings.shape[0] // n_b
            deep = [d.repeat_interleave(n_c, dim=0) if d.dim() == 3 else d for d in deep_layers]
            ids = learner.token_ids[classes, :length].repeat(n_b, 1)
        else:
            embeddings = learner.build(ctx, classes=classes, length=length)
            deep = deep_layers
            ids = learner.token_ids[classes, :length]
        with self.backbone.autocast():
            features = self.text_encoder(embeddings, ids, deep or None, deep_offset=learner.deep_offset)
        return F.normalize(features.float(), dim=-1)

    def text_features(self, params: PromptParams | None = None, *, grad: bool | None = None) -> torch.Tensor:
        """Normalised class text features: [B, C, E] for per-sample ``params`` (with ``ctx`` or ``deep``), else
        [C, E]. Chunked to the memory budget; chunks are checkpointed when gradients flow and there is more than one.
        """
        ctx, ctx_ps = self._get(params, "ctx")
        deep, deep_ps = self._get(params, "deep")
        per_sample = ctx_ps or deep_ps
        batch = (ctx if ctx_ps else deep).shape[0] if per_sample else 1
        if per_sample and not ctx_ps:
            ctx = ctx.unsqueeze(0).expand(batch, -1, -1)
        if deep is None:
            deep_layers: list[torch.Tensor] = []
        else:
            deep_layers = list(deep.unbind(1)) if deep_ps else list(deep.unbind(0))
        n_cls = self.learner.n_classes
        plan = self._plan()
        grad = torch.is_grad_enabled() if grad is None else grad
        # chunk over samples first (whole class lists), then over classes when one sample's classes do not fit
        classes_per_chunk = min(n_cls, plan.sequences_per_chunk)
        samples_per_chunk = max(1, plan.sequences_per_chunk // n_cls) if classes_per_chunk == n_cls else 1
        chunks = [
            (slice(b, min(batch, b + samples_per_chunk)), slice(c, min(n_cls, c + classes_per_chunk)))
            for b in range(0, batch, samples_per_chunk)
            for c in range(0, n_cls, classes_per_chunk)
        ]
        rows: list[torch.Tensor] = []
        with torch.set_grad_enabled(grad):
            for number, (samples, classes) in enumerate(chunks):
                # the last chunk's activations stay for backward; earlier ones are recomputed there
                use_checkpoint = grad and number < len(chunks) - 1
                c_ctx = ctx[samples] if per_sample else ctx
                c_deep = [d[samples] if d.dim() == 3 else d for d in deep_layers]
                args = (c_ctx, c_deep, classes, per_sample, plan.length)
                if use_checkpoint:
                    out = checkpoint(self._text_chunk, *args, use_reentrant=False)
                else:
                    out = self._text_chunk(*args)
                n_b = (samples.stop - samples.start) if per_sample else 1
                rows.append(out.view(n_b, -1, out.shape[-1]))
        if not per_sample:
            return torch.cat(rows, dim=1)[0]
        n_sample_chunks = math.ceil(batch / samples_per_chunk)
        per_class_chunks = len(chunks) // n_sample_chunks
        grouped = [
            torch.cat(rows[i * per_class_chunks : (i + 1) * per_class_chunks], dim=1) for i in range(n_sample_chunks)
        ]
        return torch.cat(grouped, dim=0)

    def initial_text_features(self) -> torch.Tensor:
        """[C, E] with the initial prompts, computed once per class list (shared by every test sample at step 0)."""
        key = (self.learner.token_ids, self.base["ctx"]._version)
        if self._initial_text is None or self._initial_key[0] is not key[0] or self._initial_key[1] != key[1]:
            with torch.no_grad():
                self._initial_text = self.text_features(None, grad=False)
            self._initial_key = key
        return self._initial_text

    def logits(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """s · cos: image [..., E] with text [C, E] (shared) or image [B, V, E] with text [B, C, E] (per sample)."""
        if text_features.dim() == 2:
            return self.logit_scale * image_features @ text_features.t()
        return self.logit_scale * torch.bmm(image_features, text_features.transpose(1, 2))


class StudentFeatures(torch.nn.Module):
    """A PromptKD student as a frozen feature model for the training-free methods (TDA, ZERO, ...): its projected
    image features and the teacher's stored class features, at the teacher's logit scale. It has no text prompts,
    so prompt-tuning methods cannot adapt it; classes must be among the stored features (the student's own check).
    """

    def __init__(self, method: Any):
        super().__init__()
        self.method = method
        self.backbone = method.backbone
        self.base: PromptParams = {}
        self.logit_scale = float(method.teacher_logit_scale)
        self.image_chunk = 256

    @property
    def device(self) -> torch.device:
        return next(self.method.parameters()).device

    @property
    def classnames(self) -> list[str]:
        return list(self.method.classnames)

    def set_classnames(self, classnames: list[str]) -> None:
        self.method.set_classnames(list(classnames))

    def visual_depends_on(self, tuned: tuple[str, ...]) -> bool:
        return False

    def encode_many(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([self.method.image_features(chunk).float() for chunk in images.split(self.image_chunk)])

    def initial_text_features(self) -> torch.Tensor:
        return self.method.text_features.float()

    def logits(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        return self.logit_scale * image_features @ text_features.t()


def base_from_method(method: Any) -> tuple[TextPromptLearner, PromptParams, torch.Tensor | None]:
    """(class-token learner, initial prompts, fixed visual prompts) of a loaded zero-shot, CoOp or MaPLe model.

    Class-specific context (CoOp-CSC) and conditional context (CoCoOp) have no single prompt per image to tune.
    """
    learner = getattr(method, "learner", None)
    text = getattr(learner, "text", None) if learner is not None else None
    if not isinstance(text, TextPromptLearner):
        raise TTAModelError(
            f"{getattr(method, 'name', type(method).__name__)} has no text prompt learner; test-time tuning starts "
            "from zero-shot ('a photo of a'), CoOp or MaPLe prompts."
        )
    if text.class_specific:
        raise TTAModelError("class-specific CoOp context (CSC) cannot be tuned per image; use a shared-context CoOp.")
    if hasattr(learner, "meta_net"):
        raise TTAModelError("CoCoOp's image-conditional context is not supported; start from CoOp or MaPLe prompts.")
    base: PromptParams = {"ctx": text.ctx.detach()}
    if text.deep is not None:
        base["deep"] = text.deep.detach()
    coupling = getattr(learner, "coupling", None)
    if coupling is not None:
        base["coupling_weight"] = torch.stack([layer.weight.detach() for layer in coupling.layers])
        base["coupling_bias"] = torch.stack([layer.bias.detach() for layer in coupling.layers])
    visual = getattr(learner, "visual", None)
    fixed = visual().detach() if visual is not None and coupling is None else None
    return text, base, fixed


def build_model(
    classnames: list[str],
    *,
    backbone: Backbone | None = None,
    checkpoint: str | None = None,
    init: str = "a photo of a",
    n_ctx: int = 4,
    device: str = "cpu",
    precision: str = "fp32",
    text_memory_mb: float = 1024.0,
    features_only: bool = False,
) -> tuple[PromptedCLIP, str]:
    """The frozen base model for test-time tuning and a description of its prompts.

    From ``checkpoint`` (a CoOp, IVLP or MaPLe checkpoint; its class list is replaced by ``classnames``) or from
    ``backbone`` with the hand-written context ``init`` (TPT's "a photo of a", n_ctx of its tokens). With
    ``features_only`` (training-free methods) a PromptKD student checkpoint is accepted too (:class:`StudentFeatures`,
    with the stored features the checkpoint names or that lie beside it).
    """
    if checkpoint is not None:
        from promptkd.checkpoints import load_checkpoint
        from promptkd.deploy import load_for_inference

        _, meta = load_checkpoint(checkpoint)
        students = ("promptkd", "promptkd_timm")
        if features_only and meta.get("method") in students:
            student = load_for_inference(checkpoint, device=device, precision=precision)
            student.set_classnames(list(classnames))
            return StudentFeatures(student).to(device), f"{meta.get('method')} student from {checkpoint}"
        if meta.get("method") in (*students, "zeroshot"):
            also = (
                " (training-free methods such as tda and zero can use a student)" if meta["method"] in students else ""
            )
            raise TTAModelError(
                f"{checkpoint}: a {meta.get('method')} checkpoint has no text prompts to tune; use a CoOp or MaPLe "
                f"checkpoint, or no --base for 'a photo of a'{also}."
            )
        method = load_for_inference(checkpoint, device=device, precision=precision)
        learner, base, fixed = base_from_method(method)
        learner.set_classnames(classnames)
        model = PromptedCLIP(method.backbone, learner, base, fixed_visual=fixed, text_memory_mb=text_memory_mb)
        return model.to(device), f"{meta.get('method')} prompts from {checkpoint}"
    if backbone is None:
        raise TTAModelError("give a backbone (--model) or a base checkpoint (--base)")
    encoder = PromptedTextEncoder(backbone.model)
    try:
        learner = TextPromptLearner(encoder, backbone.tokenizer, classnames, n_ctx=n_ctx, init=init)
    except ValueError as error:
        raise TTAModelError(f"init phrase: {error}") from error
    model = PromptedCLIP(backbone, learner, {"ctx": learner.ctx.detach()}, text_memory_mb=text_memory_mb)
    return model.to(device), f"hand-written context {init!r}"
