"""TDA (Karmanov et al., CVPR 2024; kdiAAA/TDA ``tda_runner.py``): a training-free dynamic adapter.

Two key-value caches of test features, filled as the stream goes, with no back-propagation:

- **positive**: per predicted class, the ``shot_capacity`` lowest-entropy test features seen so far; a new feature
  enters when the class has room, or replaces the class's highest-entropy entry when its entropy is lower;
- **negative**: only for uncertain samples (normalised entropy strictly between ``entropy_lower`` and
  ``entropy_upper``), per predicted class; its value is the mask of classes whose probability lies strictly inside
  (``mask_lower``, ``mask_upper``) — the classes the sample probably is *not*.

Each sample first enters the caches, then is predicted:
``logits = clip + α⁺·exp(−β⁺(1 − f·K⁺))·onehot(K⁺) − α⁻·exp(−β⁻(1 − f·K⁻))·mask(K⁻)``.
With views (the reference's ImageNet-A/V/R/Sketch pipeline: 63 AugMix views + the original) the sample's feature,
logits and probabilities are the means over the 10% lowest-entropy views and its entropy is the entropy of those
views' averaged probabilities; with one view they are the view's own.

Choices: the cache logits are added to the model's logits as the reference adds them to CLIP's (its logits are
100·cos because CLIP learnt a scale of 100; a model that learnt another scale, such as the world's tiny CLIPs,
s ≈ 20, has proportionally larger cosine gaps for the same confidence). ``clip_units=true`` instead scales them
by s/100 (the reference's decision in cosine units); measured on the world teacher, full test sets, 1 view, seed 1:
shapes_a / _r / _v2 / _sketch +0.3 / +1.0 / +1.1 / +2.4 over zero-shot as is, +0.3 / +0.05 / +0.6 / +0.6 scaled
(ECE up by 5-9 and 2-3 points). The normalised entropy is the reference's
``H (nats) / log2(C)``, kept as is because its thresholds (0.2, 0.5) were tuned with it; the mean feature is not
renormalised (as in the reference); affinities and cache values are float32 here (float16 on the reference's GPU).
Defaults are the reference's ImageNet values (``configs/imagenet.yaml``): positive 3 shots, α 2.0, β 5.0; negative
2 shots, α 0.117, β 1.0, entropy (0.2, 0.5), mask (0.03, 1.0). The reference tunes α⁺/β⁺ per set (e.g. Sketch
2.363/7.45, V2 1.0/8.0); promptkd does not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from promptkd.tta.base import TTAError, register_tta_method
from promptkd.tta.losses import confident_views
from promptkd.tta.online import OnlineBatch, OnlineConfig, OnlineMethod, entropy

#: the logit scale TDA's α values were set for (CLIP's 100 · cosine)
CLIP_LOGIT_SCALE = 100.0
#: the caches' largest allowed size (keys and negative masks), far above any real setting
MAX_CACHE_MB = 4096.0


@dataclass
class TDAConfig(OnlineConfig):
    selection: float = field(default=0.1, metadata={"help": "fraction of lowest-entropy views averaged (TDA: 0.1)"})
    positive: bool = field(default=True, metadata={"help": "use the positive cache"})
    pos_shots: int = field(default=3, metadata={"help": "positive cache entries per class (shot capacity)"})
    pos_alpha: float = field(default=2.0, metadata={"help": "weight of the positive cache logits"})
    pos_beta: float = field(default=5.0, metadata={"help": "sharpness of the positive affinities"})
    negative: bool = field(default=True, metadata={"help": "use the negative cache"})
    neg_shots: int = field(default=2, metadata={"help": "negative cache entries per class"})
    neg_alpha: float = field(default=0.117, metadata={"help": "weight of the negative cache logits"})
    neg_beta: float = field(default=1.0, metadata={"help": "sharpness of the negative affinities"})
    entropy_lower: float = field(default=0.2, metadata={"help": "a sample enters the negative cache above this"})
    entropy_upper: float = field(default=0.5, metadata={"help": "... and below this normalised entropy"})
    mask_lower: float = field(default=0.03, metadata={"help": "negative mask: classes with probability above"})
    mask_upper: float = field(default=1.0, metadata={"help": "... and below this"})
    clip_units: bool = field(
        default=False, metadata={"help": "cache logits scaled by s/100 (α in units of 100·cos); false: α as is"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.selection <= 1:
            raise ValueError("selection must be a fraction in (0, 1]")
        if self.pos_shots < 1 or self.neg_shots < 1:
            raise ValueError(
                f"cache shot capacities must be >= 1; got pos_shots={self.pos_shots}, "
                f"neg_shots={self.neg_shots} (disable a cache with positive=false / negative=false)"
            )
        if min(self.pos_alpha, self.neg_alpha, self.pos_beta, self.neg_beta) < 0:
            raise ValueError("cache alphas and betas must be >= 0")
        if not self.entropy_lower < self.entropy_upper:
            raise ValueError("entropy_lower must be below entropy_upper")
        if not self.mask_lower < self.mask_upper:
            raise ValueError("mask_lower must be below mask_upper")


@register_tta_method
class TDA(OnlineMethod):
    name: ClassVar[str] = "tda"
    config_class: ClassVar[type] = TDAConfig
    config: TDAConfig

    def check_config(self) -> None:
        cfg = self.config
        if cfg.n_views > 1 and int(cfg.n_views * cfg.selection) < 1:
            raise TTAError(
                f"tda: {cfg.n_views} views with selection {cfg.selection} keep no view; use n_views >= "
                f"{math.ceil(1 / cfg.selection)} or n_views=1"
            )
        n_cls, width = len(self.model.classnames), int(self.model.initial_text_features().shape[-1])
        floats = n_cls * (cfg.pos_shots * (width + 1) + cfg.neg_shots * (width + 1 + n_cls))
        if floats * 4 / 2**20 > MAX_CACHE_MB:
            raise TTAError(
                f"tda: caches of {cfg.pos_shots}+{cfg.neg_shots} shots x {n_cls} classes need "
                f"{floats * 4 / 2**20:.0f} MB (limit {MAX_CACHE_MB:.0f}); lower method.pos_shots / method.neg_shots"
            )

    def reset_state(self) -> None:
        cfg, device = self.config, self.model.device
        n_cls, width = len(self.model.classnames), int(self.model.initial_text_features().shape[-1])
        inf = float("inf")
        self.state = {
            "pos_keys": torch.zeros(n_cls, cfg.pos_shots, width, device=device),
            "pos_entropy": torch.full((n_cls, cfg.pos_shots), inf, device=device),
            "neg_keys": torch.zeros(n_cls, cfg.neg_shots, width, device=device),
            "neg_entropy": torch.full((n_cls, cfg.neg_shots), inf, device=device),
            "neg_probs": torch.zeros(n_cls, cfg.neg_shots, n_cls, device=device),
        }

    def summarise(self, features: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(feature [E], logits [C], entropy, probabilities [C]) of one sample, over its confident views."""
        if features.shape[0] > 1:
            keep = confident_views(logits.unsqueeze(0), self.config.selection)[0]
            chosen = logits[keep]
            log_p = chosen.float().log_softmax(-1)
            mean_log_p = torch.logsumexp(log_p, 0) - math.log(chosen.shape[0])
            return features[keep].mean(0), chosen.mean(0), -(mean_log_p.exp() * mean_log_p).sum(), log_p.exp().mean(0)
        return features[0], logits[0], entropy(logits[0]), logits[0].softmax(-1)

    def insert(self, prefix: str, label: int, key: torch.Tensor, ent: torch.Tensor, probs: torch.Tensor | None) -> None:
        """Put (key, entropy) in class ``label``'s slots: a free slot, else the worst if this one is better."""
        entropies = self.state[f"{prefix}_entropy"][label]
        free = torch.isinf(entropies).nonzero()
        if len(free):
            slot = int(free[0])
        else:
            slot = int(entropies.argmax())  # the highest-entropy entry (the reference's last after sorting)
            if not bool(ent < entropies[slot]):
                return
        self.state[f"{prefix}_keys"][label, slot] = key
        entropies[slot] = ent
        if probs is not None:
            self.state[f"{prefix}_probs"][label, slot] = probs

    def cache_logits(self, prefix: str, feature: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
        keys = self.state[f"{prefix}_keys"]
        n_cls, shots = keys.shape[:2]
        filled = torch.isfinite(self.state[f"{prefix}_entropy"]).flatten().float()
        weights = torch.exp(-beta * (1 - keys.flatten(0, 1) @ feature)) * filled
        if prefix == "pos":
            return alpha * weights.view(n_cls, shots).sum(1)
        probs = self.state["neg_probs"].flatten(0, 1)
        mask = ((probs > self.config.mask_lower) & (probs < self.config.mask_upper)).float()
        return alpha * (weights @ mask)

    def predict_one(self, features: torch.Tensor, clip_logits: torch.Tensor, batch: OnlineBatch) -> torch.Tensor:
        cfg = self.config
        feature, logits, ent, probs = self.summarise(features, clip_logits)
        label = int(logits.argmax())
        normalised = float(ent) / math.log2(logits.shape[-1])  # the reference's nats / log2(C), see the docstring
        if cfg.positive:
            self.insert("pos", label, feature, ent, None)
        if cfg.negative and cfg.entropy_lower < normalised < cfg.entropy_upper:
            self.insert("neg", label, feature, ent, probs)
        out = logits.clone()
        ratio = batch.logit_scale / CLIP_LOGIT_SCALE if cfg.clip_units else 1.0  # see the module docstring
        if cfg.positive:
            out = out + ratio * self.cache_logits("pos", feature, cfg.pos_alpha, cfg.pos_beta)
        if cfg.negative and bool(torch.isfinite(self.state["neg_entropy"]).any()):
            out = out - ratio * self.cache_logits("neg", feature, cfg.neg_alpha, cfg.neg_beta)
        return out

    def diagnostics(self) -> dict[str, float]:
        return {
            "pos": float(torch.isfinite(self.state["pos_entropy"]).sum()),
            "neg": float(torch.isfinite(self.state["neg_entropy"]).sum()),
        }
