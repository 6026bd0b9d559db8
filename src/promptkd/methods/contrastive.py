"""Contrastive pre-training of a whole CLIP (image-text InfoNCE or image-text-label) as a method of the engine.

Radford et al., "Learning Transferable Visual Models From Natural Language Supervision" (CLIP, 2021) and Yang et
al., "Unified Contrastive Learning in Image-Text-Label Space" (UniCL, 2022); the losses are
:mod:`promptkd.pretraining.losses`. Unlike every other method nothing is frozen: the learner *is* the CLIP, and a
batch is captioned images (``Batch.texts``). The engine supplies data, precision, checkpoints, exact resume, DDP and
logging; `promptkd pretrain` (:mod:`promptkd.pretraining.run`) drives it.

- **Distributed**: image and text features of every process are gathered (with their gradients) and each process
  computes the loss of the whole global batch, as open_clip's ``ClipLoss(gather_with_grad=True)``; DDP's gradient
  average then equals the single-process gradient, so 2 processes train the same model as 1. Processes may hold
  different numbers of rows (``--skip-bad`` drops unreadable samples from a batch): rows are padded for the gather
  and the padding dropped, so the global batch is exactly the readable samples, as in 1 process.
- **Text tower on the captions' own length**: under the causal mask with end-of-text pooling, padding after the
  last token cannot change the pooled feature, so a batch's token rows are cut to its longest caption (captions of
  the world take ~16 of 40-77 positions: 2-4x less text compute). Other text towers get the full rows.
- **Weight decay** as open_clip: none on gains, biases, 1-d tensors and the logit scale. The logit scale is clamped
  to ln 100 before every step (CLIP clamps after each update: the same sequence of values) and once at the end.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.distributed as dist
import torch.nn.functional as F
from open_clip.transformer import text_global_pool
from torch import nn

from promptkd.backbones import Backbone
from promptkd.data.templates import DEFAULT_TEMPLATE
from promptkd.errors import PromptKDError
from promptkd.methods import register_method
from promptkd.methods.base import Batch, Method, MethodConfig, StepOutput
from promptkd.pretraining.losses import OBJECTIVES, clamp_logit_scale_, objective_loss

__all__ = ["ContrastiveConfig", "ContrastivePretraining", "encode_text", "trimmed_tokens"]


@dataclass
class ContrastiveConfig(MethodConfig):
    """The objective and the views it trains on (the world recipe's defaults: see configs/contrastive/world.yaml)."""

    objective: str = "itl"  # clip: image-text InfoNCE; itl: image-text-label (same class = positive, UniCL)
    hflip: bool = True  # random horizontal flips
    translate: float = 0.0  # random shifts up to this fraction of the image side
    zoom: tuple[float, float] = (1.0, 1.0)  # random content scale range; below 1 shrinks objects (edge padding)
    noise: float = 0.0  # std of Gaussian pixel noise, in 0-255 units

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}; expected one of {', '.join(OBJECTIVES)}")
        self.zoom = (float(self.zoom[0]), float(self.zoom[1]))
        if not 0 < self.zoom[0] <= self.zoom[1]:
            raise ValueError(f"zoom must be a range 0 < low <= high, got {list(self.zoom)}")
        if self.translate < 0 or self.noise < 0:
            raise ValueError(f"translate and noise must be >= 0, got {self.translate} and {self.noise}")


def _can_trim(model: nn.Module) -> bool:
    """A causal text tower pooled at the end-of-text token: positions after it never influence the feature."""
    return (
        isinstance(model, open_clip.CLIP)
        and getattr(model, "attn_mask", None) is not None
        and model.text_pool_type in ("argmax", "eos")
    )


def trimmed_tokens(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Token rows cut after the last column any row uses, where :func:`encode_text` gives the same features."""
    if not _can_trim(model) or tokens.numel() == 0:
        return tokens
    used = (tokens != 0).any(dim=0).nonzero()
    return tokens[:, : int(used.max()) + 1] if len(used) else tokens


def encode_text(model: nn.Module, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """``model.encode_text`` for token rows that may be shorter than the context length (see the module docstring).

    The same computation as ``CLIP.encode_text`` on fewer positions; anything else (CustomTextCLIP, other pooling,
    full-length rows) goes to ``model.encode_text``.
    """
    length = tokens.shape[1]
    if not _can_trim(model) or length == model.positional_embedding.shape[0]:
        return model.encode_text(tokens, normalize=normalize)
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype) + model.positional_embedding[:length].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = text_global_pool(x, tokens, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
    if model.text_projection is not None:
        x = model.text_projection(x) if isinstance(model.text_projection, nn.Linear) else x @ model.text_projection
    return F.normalize(x, dim=-1) if normalize else x


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _gather_rows(tensors: list[torch.Tensor], *, grad: list[bool]) -> list[torch.Tensor]:
    """Every process's rows of each tensor, in rank order (gradients flow back to each process's own rows where
    ``grad`` says so). Processes may hold different numbers of rows (unreadable samples skipped with --skip-bad):
    each pads to the longest first, as all_gather needs equal shapes, and the padding is dropped after."""
    from torch.distributed.nn.functional import all_gather

    rows = tensors[0].shape[0]
    sizes = [torch.zeros(1, dtype=torch.long, device=tensors[0].device) for _ in range(_world_size())]
    dist.all_gather(sizes, torch.tensor([rows], dtype=torch.long, device=tensors[0].device))
    counts = [int(size) for size in sizes]
    longest = max(counts)
    gathered = []
    for tensor, with_grad in zip(tensors, grad):
        padded = torch.cat([tensor, tensor.new_zeros((longest - rows, *tensor.shape[1:]))]).contiguous()
        if with_grad:
            parts = list(all_gather(padded))
        else:
            parts = [torch.empty_like(padded) for _ in counts]
            dist.all_gather(parts, padded)
        gathered.append(torch.cat([part[:count] for part, count in zip(parts, counts)]))
    return gathered


@register_method
class ContrastivePretraining(Method):
    """Trains every weight of a CLIP on captioned images with :func:`~promptkd.pretraining.losses.objective_loss`."""

    name = "contrastive"
    config_class = ContrastiveConfig
    task = "pretraining"

    def __init__(self, backbone: Backbone, classnames: list[str], config: ContrastiveConfig | None = None):
        super().__init__(backbone, classnames, config)
        for param in self.clip.parameters():  # nothing is frozen: the learner is the whole CLIP
            param.requires_grad_(True)
        self.learner = self.clip
        #: Called with the backbone at epoch ends (every ``eval_every`` epochs and the last): zero-shot metrics.
        self.evaluate: Callable[[Backbone], dict[str, float]] | None = None
        self.eval_every = 1
        self._classifier: tuple[list[str], torch.Tensor] | None = None

    def train(self, mode: bool = True) -> ContrastivePretraining:
        nn.Module.train(self, mode)  # the CLIP itself trains (dropout, patch dropout where the model has them)
        if mode:
            self._classifier = None  # the text tower is about to change
        return self

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        decay, no_decay = [], []
        for name, param in self.clip.named_parameters():
            if not param.requires_grad:
                continue
            exempt = param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
            (no_decay if exempt else decay).append(param)
        return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]

    def training_step(self, batch: Batch) -> StepOutput:
        if batch.texts is None:
            raise PromptKDError("contrastive pre-training needs captioned images (batches with caption tokens)")
        labels = batch.labels
        if self.config.objective == "itl" and (labels is None or bool((labels < 0).any())):
            raise PromptKDError(
                "objective 'itl' needs a class label for every image; add 'label' or 'classname' to the captions "
                "(a .cls member in shards), or use --objective clip"
            )
        clamp_logit_scale_(self.clip)
        image_features = self.clip.encode_image(batch.images, normalize=True)
        text_features = encode_text(self.clip, trimmed_tokens(self.clip, batch.texts))
        if _world_size() > 1:
            if labels is None:
                image_features, text_features = _gather_rows([image_features, text_features], grad=[True, True])
            else:
                image_features, text_features, labels = _gather_rows(
                    [image_features, text_features, labels], grad=[True, True, False]
                )
        loss = objective_loss(
            self.config.objective,
            image_features.float(),
            text_features.float(),
            self.clip.logit_scale.float(),
            labels if self.config.objective == "itl" else None,
        )
        return StepOutput(loss, {"logit_scale": float(self.clip.logit_scale.detach().exp())})

    def on_train_end(self) -> None:
        clamp_logit_scale_(self.clip)

    def epoch_metrics(self, epoch: int, total_epochs: int) -> dict[str, float]:
        if self.evaluate is None or not (epoch % max(1, self.eval_every) == 0 or epoch == total_epochs):
            return {}
        was_training = self.training
        self.eval()
        try:
            return {f"zero_shot/{k}": v for k, v in self.evaluate(self.backbone).items()}
        finally:
            self.train(was_training)

    def save(self, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """The final checkpoint of pre-training is the CLIP itself, every weight trained: an open_clip ``local-dir``
        folder (``open_clip_model.safetensors`` + ``open_clip_config.json``) in the run folder, loadable with
        ``--model local-dir:<folder>`` (the run's settings are in its config.yaml and pretrain_history.json)."""
        from promptkd.backbones.export import save_local_dir

        return save_local_dir(self.backbone, Path(path).parent)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Zero-shot scores of the CLIP as it stands over the current class list ("a photo of a {}.")."""
        from promptkd.evaluation.zeroshot import zeroshot_classifier

        if self._classifier is None or self._classifier[0] != self.classnames:
            weights = zeroshot_classifier(self.backbone, self.classnames, [DEFAULT_TEMPLATE], use_cache=False)
            self._classifier = (list(self.classnames), weights)
        features = F.normalize(self.clip.encode_image(images).float(), dim=-1)
        return self.clip.logit_scale.exp().float() * features @ self._classifier[1].to(features.device)

    def set_classnames(self, classnames: list[str]) -> None:
        super().set_classnames(classnames)
        self._classifier = None
