"""Tip-Adapter (training-free) and Tip-Adapter-F (learnable cache keys).

Zhang et al., "Tip-Adapter: Training-free Adaption of CLIP for Few-shot Classification" (ECCV 2022), method section;
reference code gaopengcuhk/Tip-Adapter (``utils.py::build_cache_model``, ``search_hp``; ``main.py``).

Cache (``prepare``): F = n(mean over ``augment_epochs`` augmented passes of f(x_i)) for the K-shot training images
(the reference averages the raw features of the passes, then normalises), values L = one_hot(y_i). Then

    logits = s * f @ W^T + alpha * exp(-beta * (1 - f @ F^T)) @ L,    f = n(f(x))

with s = exp(logit_scale) of the backbone: the reference hard-codes 100, which is the OpenAI weights' scale, so the
two agree there and other weights keep their own calibration.

alpha and beta are grid-searched on the VALIDATION batches (never on test data), with the reference's grid: for
a range [lo, hi) and n steps, value_i = lo + i * (hi - lo) / n, i = 0..n-1; defaults beta in [0.1, 7) with 200
steps and alpha in [0.1, 3) with 20 steps (the paper's ImageNet ``search_scale [7, 3]``, ``search_step [200, 20]``);
the first best pair (beta-major order) wins, as in ``search_hp``. Without validation data the initial values
(ImageNet: alpha 1.17, beta 1) are kept and a warning says so.

Tip-Adapter-F (``tip_adapter_f``): F becomes a parameter, trained with cross-entropy at the initial alpha, beta
(AdamW lr 1e-3, eps 1e-4, 20 epochs, batch 256, per-step cosine in the reference); alpha, beta are searched on
validation after training. The reference picks its best epoch on the test set (algorithms.md Sec. 12 #2); here the
engine's checkpoint selection applies (last epoch or validation).

Training views are the reference's (``main.py``): RandomResizedCrop with area scale (0.5, 1) + horizontal flip, for
the cache passes and for Tip-Adapter-F's training. Both are each class's ``train_defaults``, the bottom layer of a
run config (a preset or ``--set train.x=...`` overrides them), so Tip-Adapter-F run without a preset trains with its
recipe rather than the engine's Dassl SGD defaults.

Saved state (``learner.cache``): ``keys`` [NK, E], ``labels`` [NK] (L = one_hot(labels)), ``alpha``, ``beta``;
a checkpoint reproduces predictions. The cache is bound to its classes: ``set_classnames`` to others refuses.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from promptkd.backbones import Backbone
from promptkd.checkpoints import CheckpointError, check_state_fits
from promptkd.data.templates import DEFAULT_TEMPLATE
from promptkd.errors import PromptKDError
from promptkd.methods import register_method
from promptkd.methods.base import Batch, MethodConfig, StepOutput
from promptkd.methods.zeroshot import FixedTextMethod, check_templates, full_precision, require_labels

__all__ = [
    "CacheModel",
    "ClassBoundError",
    "TipAdapter",
    "TipAdapterConfig",
    "TipAdapterF",
    "search_grid",
]

logger = logging.getLogger(__name__)

BatchSource = Callable[[], Iterable[Batch]]


class ClassBoundError(PromptKDError, ValueError):
    """A class-bound learned part (Tip-Adapter's cache) asked to serve another class list."""


@dataclass
class TipAdapterConfig(MethodConfig):
    """Tip-Adapter's cache and hyper-parameter search; defaults are the reference's ImageNet config."""

    augment_epochs: int = field(default=10, metadata={"help": "augmented passes averaged into the cache keys"})
    init_alpha: float = field(default=1.17, metadata={"help": "alpha before (and without) the validation search"})
    init_beta: float = field(default=1.0, metadata={"help": "beta before (and without) the validation search"})
    search: bool = field(default=True, metadata={"help": "grid-search alpha, beta on the validation batches"})
    beta_range: tuple[float, float] = field(default=(0.1, 7.0), metadata={"help": "beta grid [lo, hi)"})
    beta_steps: int = field(default=200, metadata={"help": "beta grid points"})
    alpha_range: tuple[float, float] = field(default=(0.1, 3.0), metadata={"help": "alpha grid [lo, hi)"})
    alpha_steps: int = field(default=20, metadata={"help": "alpha grid points"})
    templates: list[str] = field(
        default_factory=lambda: [DEFAULT_TEMPLATE], metadata={"help": "text templates of the zero-shot classifier W"}
    )

    def __post_init__(self) -> None:
        if self.augment_epochs < 1:
            raise ValueError("augment_epochs must be at least 1")
        if self.beta_steps < 1 or self.alpha_steps < 1:
            raise ValueError("beta_steps and alpha_steps must be at least 1")
        for name in ("beta_range", "alpha_range"):
            lo, hi = getattr(self, name)
            if not lo < hi:
                raise ValueError(f"{name} must be (lo, hi) with lo < hi, got {(lo, hi)}")
        check_templates(self.templates)


def search_grid(lo: float, hi: float, steps: int) -> list[float]:
    """The reference's grid: lo + i * (hi - lo) / steps for i = 0..steps-1 (hi itself excluded)."""
    return [lo + i * (hi - lo) / steps for i in range(steps)]


class CacheModel(nn.Module):
    """Keys F [NK, E] (a buffer, or a parameter for Tip-Adapter-F), labels [NK], and the chosen alpha and beta."""

    NAMES = ("keys", "labels", "alpha", "beta")

    def __init__(self) -> None:
        super().__init__()
        for name in self.NAMES:
            self.register_buffer(name, None)

    @property
    def ready(self) -> bool:
        return self.keys is not None

    def fill(self, keys: torch.Tensor, labels: torch.Tensor, alpha: float, beta: float, *, learnable: bool) -> None:
        for name in self.NAMES:
            self._parameters.pop(name, None)
            self._buffers.pop(name, None)
        keys = keys.detach().float().clone()
        if learnable:
            self.keys = nn.Parameter(keys)
        else:
            self.register_buffer("keys", keys)
        self.register_buffer("labels", labels.detach().long().clone().to(keys.device))
        self.register_buffer("alpha", torch.tensor(float(alpha), device=keys.device))
        self.register_buffer("beta", torch.tensor(float(beta), device=keys.device))

    def set_hyperparameters(self, alpha: float, beta: float) -> None:
        self.alpha.fill_(float(alpha))
        self.beta.fill_(float(beta))


@register_method
class TipAdapter(FixedTextMethod):
    """Training-free: a key-value cache of few-shot features added to zero-shot CLIP; alpha, beta from validation."""

    name = "tip_adapter"
    config_class = TipAdapterConfig
    trains = False
    finetune: ClassVar[bool] = False
    #: The reference's cache views (RandomResizedCrop scale (0.5, 1)) and cache loader batch.
    train_defaults: ClassVar[dict[str, Any]] = {"crop_scale": [0.5, 1.0], "epochs": 0, "batch_size": 256}

    def __init__(self, backbone: Backbone, classnames: list[str], config: TipAdapterConfig | None = None):
        super().__init__(backbone, classnames, config)
        self.learner.cache = CacheModel()
        self._val_batches: BatchSource | None = None
        self.search_result: dict[str, Any] = {"source": "init"}

    # --- the method ------------------------------------------------------------------------------------------------
    @property
    def cache(self) -> CacheModel:
        cache = self.learner.cache
        if not cache.ready:
            raise PromptKDError(
                f"{self.name}: the cache is empty; call prepare(train_batches, val_batches) first "
                "(or load a checkpoint)."
            )
        return cache

    @torch.no_grad()
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """f = n(f(x)) in float32 (the frozen image tower)."""
        return F.normalize(self.clip.encode_image(images).float(), dim=-1)

    def cache_logits(self, affinity: torch.Tensor, beta: torch.Tensor | float) -> torch.Tensor:
        """exp(-beta * (1 - f @ F^T)) @ L, with L = one_hot(labels) applied as a scatter-add over the classes."""
        weights = torch.exp(-beta * (1.0 - affinity))
        out = weights.new_zeros(weights.shape[0], len(self.classnames))
        return out.index_add(1, self.cache.labels, weights)

    def tip_logits(
        self,
        features: torch.Tensor,
        alpha: torch.Tensor | float | None = None,
        beta: torch.Tensor | float | None = None,
    ) -> torch.Tensor:
        """s * f @ W^T + alpha * exp(-beta * (1 - f @ F^T)) @ L for normalised features f [B, E]."""
        cache = self.cache
        alpha = cache.alpha if alpha is None else alpha
        beta = cache.beta if beta is None else beta
        with full_precision(features.device):
            affinity = features.float() @ cache.keys.T
            return self.classify(features) + alpha * self.cache_logits(affinity, beta)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.tip_logits(self.image_features(images))

    def training_step(self, batch: Batch) -> StepOutput:
        if not self.finetune:
            raise PromptKDError(
                "tip_adapter is training-free (trains = False); use tip_adapter_f to fine-tune the cache keys."
            )
        labels = require_labels(batch, self.name)
        return StepOutput(F.cross_entropy(self.tip_logits(self.image_features(batch.images)), labels))

    def set_classnames(self, classnames: list[str]) -> None:
        if list(classnames) != self.classnames:
            raise ClassBoundError(
                f"{self.name}: the cache holds one-hot labels of the {len(self.classnames)} training classes "
                f"({', '.join(self.classnames[:4])}, ...) and cannot score {len(classnames)} other classes; "
                "build a new cache for them (prepare with their few-shot images)."
            )

    # --- cache and hyper-parameters ----------------------------------------------------------------------------------
    def prepare(self, train_batches: BatchSource, val_batches: BatchSource | None) -> None:
        """Build the cache from ``augment_epochs`` passes over the training batches; search alpha, beta on
        validation (Tip-Adapter-F searches after training, in ``on_train_end``)."""
        cfg: TipAdapterConfig = self.config
        keys, labels = self.build_cache(train_batches)
        self.learner.cache.fill(keys, labels, cfg.init_alpha, cfg.init_beta, learnable=self.finetune)
        self.search_result = {"source": "init"}
        self._val_batches = val_batches
        if not self.finetune:
            self.search_hyperparameters(val_batches)

    def on_train_end(self) -> None:
        if self.finetune:
            self.search_hyperparameters(self._val_batches)

    def _passes(self, batches: BatchSource) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """One pass: raw features [N, E], labels [N], and sample indices [N] (None if any batch lacks them)."""
        device = self.backbone.device
        feats, labels, index = [], [], []
        for batch in batches():
            batch = batch.to(device)
            labels.append(require_labels(batch, self.name))
            with torch.no_grad(), self.backbone.autocast():
                feats.append(self.clip.encode_image(batch.images).float())
            index.append(batch.index)
        if not feats:
            raise PromptKDError(f"{self.name}: the data source yielded no batches")
        ids = None if any(i is None for i in index) else torch.cat(index).to(device)
        return torch.cat(feats), torch.cat(labels), ids

    @torch.no_grad()
    def build_cache(self, train_batches: BatchSource) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys n(mean over passes of f(x_i)) [NK, E] and labels [NK].

        A sample's passes are matched by ``Batch.index`` (keys come sorted by it); a sample missing from some passes
        (e.g. dropped by ``drop_last`` under another shuffle) is averaged over the passes that hold it. Batches
        without an index must come in the same order on every pass.
        """
        cfg: TipAdapterConfig = self.config
        ids = sums = counts = labels = None
        by_position = False
        for epoch in range(cfg.augment_epochs):
            feats, pass_labels, index = self._passes(train_batches)
            if epoch == 0:
                by_position = index is None
            elif by_position != (index is None):
                raise PromptKDError(f"{self.name}: some training passes carry sample indices and some do not")
            if by_position:
                if epoch == 0:
                    sums, labels = feats, pass_labels
                    counts = torch.ones(len(feats), device=feats.device)
                elif not torch.equal(pass_labels, labels):
                    raise PromptKDError(
                        f"{self.name}: augmented pass {epoch + 1} yields the samples in another order than pass 1; "
                        "give the training batches a sample index (Batch.index) or a fixed order."
                    )
                else:
                    sums += feats
                    counts += 1
                continue
            if index.unique().numel() != index.numel():
                raise PromptKDError(f"{self.name}: a training pass yielded the same sample index twice")
            known = ids if ids is not None else index.new_empty(0)
            merged, inverse = torch.cat([known, index]).unique(return_inverse=True)  # sorted union
            old, new = inverse[: len(known)], inverse[len(known) :]
            merged_labels = torch.full_like(merged, -1)
            if labels is not None:
                merged_labels[old] = labels
            clash = (merged_labels[new] >= 0) & (merged_labels[new] != pass_labels)
            if bool(clash.any()):
                raise PromptKDError(
                    f"{self.name}: sample index {int(index[clash][0])} changed its label between passes"
                )
            merged_labels[new] = pass_labels
            merged_sums = feats.new_zeros(len(merged), feats.shape[1]).index_add(0, new, feats)
            merged_counts = feats.new_zeros(len(merged)).index_add(0, new, torch.ones_like(new, dtype=feats.dtype))
            if sums is not None:
                merged_sums.index_add_(0, old, sums)
                merged_counts.index_add_(0, old, counts)
            ids, sums, counts, labels = merged, merged_sums, merged_counts, merged_labels
        if int(labels.max()) >= len(self.classnames) or int(labels.min()) < 0:
            raise PromptKDError(f"{self.name}: a training label lies outside the {len(self.classnames)} classes")
        return F.normalize(sums / counts[:, None], dim=-1), labels

    @torch.no_grad()
    def search_hyperparameters(self, val_batches: BatchSource | None) -> dict[str, Any]:
        """Grid-search alpha, beta on validation data only; store them in the cache buffers; return the result."""
        cfg: TipAdapterConfig = self.config
        cache = self.cache
        if not cfg.search:
            self.search_result = {"source": "config", "alpha": float(cache.alpha), "beta": float(cache.beta)}
            return self.search_result
        if val_batches is None:
            warnings.warn(
                f"{self.name}: no validation data, so alpha and beta keep their initial values "
                f"({float(cache.alpha):g}, {float(cache.beta):g}); the test split is never used for the search.",
                UserWarning,
                stacklevel=2,
            )
            self.search_result = {"source": "init", "alpha": float(cache.alpha), "beta": float(cache.beta)}
            return self.search_result
        features, labels, _ = self._passes(val_batches)
        with full_precision(features.device):
            alpha, beta, accuracy = self._grid_search(F.normalize(features.float(), dim=-1), labels)
        cache.set_hyperparameters(alpha, beta)
        self.search_result = {
            "source": "validation",
            "alpha": alpha,
            "beta": beta,
            "val_accuracy": accuracy,
            "val_samples": int(labels.numel()),
        }
        logger.info(
            "%s: alpha %.4g, beta %.4g chosen on validation (accuracy %.2f%%)", self.name, alpha, beta, 100 * accuracy
        )
        return self.search_result

    def _grid_search(self, features: torch.Tensor, labels: torch.Tensor) -> tuple[float, float, float]:
        cfg: TipAdapterConfig = self.config
        betas = search_grid(*cfg.beta_range, cfg.beta_steps)
        alphas = search_grid(*cfg.alpha_range, cfg.alpha_steps)
        alpha_t = torch.tensor(alphas, device=features.device).view(-1, 1, 1)
        correct = torch.zeros(len(betas), len(alphas), dtype=torch.long, device=features.device)
        rows = max(1, (1 << 24) // (len(alphas) * len(self.classnames)))  # bounds the [A, rows, C] block
        keys = self.cache.keys
        for start in range(0, features.shape[0], rows):
            f, y = features[start : start + rows], labels[start : start + rows]
            clip_logits = self.classify(f).unsqueeze(0)
            affinity = f @ keys.T
            for i, beta in enumerate(betas):
                logits = clip_logits + alpha_t * self.cache_logits(affinity, beta).unsqueeze(0)
                correct[i] += (logits.argmax(-1) == y).sum(-1)
        best = int(correct.flatten().argmax())  # first maximum in beta-major order, as the reference's strict ">"
        i, j = divmod(best, len(alphas))
        return alphas[j], betas[i], float(correct[i, j]) / max(1, labels.numel())

    # --- checkpoints: the whole cache is state, trainable or not ----------------------------------------------------
    def trainable_state(self) -> dict[str, torch.Tensor]:
        return dict(self.learner.state_dict()) if self.learner.cache.ready else {}

    def load_trainable(self, tensors: dict[str, torch.Tensor], source: str | Path) -> None:
        keys = tensors.get("cache.keys")
        n = int(keys.shape[0]) if keys is not None and keys.dim() == 2 else 0
        expected = {
            "cache.keys": torch.empty(n, int(self.backbone.embed_dim)),
            "cache.labels": torch.empty(n),
            "cache.alpha": torch.empty(()),
            "cache.beta": torch.empty(()),
        }
        check_state_fits(expected, tensors, source)
        labels = tensors["cache.labels"].long()
        if n == 0 or int(labels.min()) < 0 or int(labels.max()) >= len(self.classnames):
            raise CheckpointError(f"{source}: cache labels do not fit the {len(self.classnames)} classes")
        device = self.backbone.device
        self.learner.cache.fill(
            tensors["cache.keys"].to(device),
            labels.to(device),
            float(tensors["cache.alpha"]),
            float(tensors["cache.beta"]),
            learnable=self.finetune,
        )

    def checkpoint_config(self) -> dict[str, Any]:
        return {**super().checkpoint_config(), "hyperparameter_search": dict(self.search_result)}


@register_method
class TipAdapterF(TipAdapter):
    """Tip-Adapter-F: the cache keys are fine-tuned with cross-entropy; alpha, beta searched on validation after."""

    name = "tip_adapter_f"
    trains = True
    finetune = True
    #: The reference's recipe (``main.py``): AdamW lr 1e-3, eps 1e-4 (torch's default decay 0.01), 20 epochs of batch
    #: 256, cosine annealing per step without warm-up, views cropped at scale (0.5, 1).
    train_defaults: ClassVar[dict[str, Any]] = {
        "crop_scale": [0.5, 1.0],
        "epochs": 20,
        "batch_size": 256,
        "optimizer": "adamw",
        "lr": 1e-3,
        "betas": [0.9, 0.999],
        "eps": 1e-4,
        "weight_decay": 0.01,
        "scheduler": "cosine",
        "schedule_per": "step",
        "warmup_epochs": 0,
        "warmup_type": "none",
    }
