"""ZERO (Farina et al., NeurIPS 2024; FarinaMatteo/zero ``ttas/zero.py``): test-time augmentation with zero
temperature — no prompt, no back-propagation, no state.

Per test image: score its views (the original + 63 TPT views) with the base prompts; keep the ``int(V · gamma)``
lowest-entropy views (gamma = 0.3 in the reference, "updated from 0.1"); each kept view votes for its argmax class
(a softmax at zero temperature); the prediction is the most voted class. A tie is broken as the reference does:
the first view from index ``int(V · gamma)`` on, in view order, whose argmax is one of the tied classes gets one more
vote (if none, the tied class with the higher logit on that first view).

Choice (docs/tta.md): the reference returns the vote counts as its output and reports no calibration; promptkd
returns ``log(vote share)`` (floored at 1e-12) so that the probabilities ECE is computed from are the vote shares.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from promptkd.tta.base import TTAError, register_tta_method
from promptkd.tta.losses import confident_views
from promptkd.tta.online import OnlineBatch, OnlineConfig, OnlineMethod


@dataclass
class ZEROConfig(OnlineConfig):
    n_views: int = field(default=64, metadata={"help": "views per test image, the original included (ZERO: 64)"})
    gamma: float = field(default=0.3, metadata={"help": "fraction of lowest-entropy views that vote (ZERO: 0.3)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.gamma <= 1:
            raise ValueError("gamma must be a fraction in (0, 1]")


def zero_votes(logits: torch.Tensor, gamma: float) -> torch.Tensor:
    """Vote counts [B, C] from view logits [B, V, C]: argmax votes of the confident views, ties broken greedily."""
    batch, n_views, n_cls = logits.shape
    k = int(n_views * gamma)
    kept = confident_views(logits, gamma)[:, :k]
    choice = logits.gather(1, kept.unsqueeze(-1).expand(-1, -1, n_cls)).argmax(-1)  # [B, k]
    votes = torch.zeros(batch, n_cls, device=logits.device).scatter_add_(1, choice, torch.ones_like(choice).float())
    top = votes.max(-1, keepdim=True).values
    tied = votes == top
    for b in (tied.sum(-1) > 1).nonzero().flatten().tolist():
        rest = logits[b, k:].argmax(-1)
        hits = rest[tied[b, rest]]
        if len(hits):
            winner = int(hits[0])
        else:
            first = logits[b, min(k, n_views - 1)].masked_fill(~tied[b], float("-inf"))
            winner = int(first.argmax())
        votes[b, winner] += 1
    return votes


@register_tta_method
class ZERO(OnlineMethod):
    name: ClassVar[str] = "zero"
    config_class: ClassVar[type] = ZEROConfig
    stateful: ClassVar[bool] = False
    default_mode: ClassVar[str] = "episodic"
    config: ZEROConfig

    def check_config(self) -> None:
        cfg = self.config
        if int(cfg.n_views * cfg.gamma) < 1:
            raise TTAError(
                f"zero: {cfg.n_views} views with gamma {cfg.gamma} leave no view to vote; use n_views >= "
                f"{int(1 / cfg.gamma) + 1}"
            )

    def predict(self, batch: OnlineBatch) -> torch.Tensor:
        votes = zero_votes(batch.clip_logits, self.config.gamma)
        return (votes / votes.sum(-1, keepdim=True)).clamp_min(1e-12).log()
