"""Training-free and online test-time methods (TDA, ZERO, DPE, BoostAdapter): the plug-in interface.

How a method plugs in (subclass :class:`OnlineMethod`, decorate with ``register_tta_method`` and list its module in
``base.BUILTIN_TTA_METHODS``):

- **Settings**: ``config_class`` is a dataclass subclassing :class:`OnlineConfig` (``n_views``, ``augmix``,
  ``min_crop_scale``; add the method's own fields with defaults from its reference code). ``n_views`` is the view
  need: 1 = the evaluation view only (TDA on ImageNet, DPE), > 1 = the original + ``n_views - 1`` augmented views
  (ZERO, BoostAdapter, TDA on the ImageNet shifts). :meth:`check_config` refuses impossible values (TTAError).
- **Per batch** the engine encodes all B·V views once, without gradients, with the base prompts (hand-written
  context or a CoOp/MaPLe checkpoint) and calls :meth:`OnlineMethod.predict` with an :class:`OnlineBatch`:
  ``features`` [B, V, E] (normalised; view 0 = the original image), ``text`` [C, E] (normalised class features of
  the base prompts), ``logit_scale`` (float), ``clip_logits`` [B, V, C] = logit_scale · features @ textᵀ, and
  ``views`` [B, V, 3, H, W] (the pixels, only for methods that set ``needs_pixels``; else None).
- **What it does**: implement either :meth:`predict_one` (one sample: its [V, E] features and [V, C] logits ->
  [C] logits, reading and updating ``self`` state) or, for a method without state, override :meth:`predict` to be
  vectorised over B. The default :meth:`predict` runs the samples **in stream order** (row 0 first): sample b sees
  the state after samples < b in online mode, and a fresh :meth:`reset_state` in episodic mode.
  Return logits [B, C] comparable to CLIP's (softmax gives the probabilities ECE is computed from).
- **State**: :meth:`reset_state` builds the empty state (called once at the start of a run in online mode, and
  before every sample in episodic mode); :meth:`state_dict` returns it as a flat ``dict[str, Tensor]`` (fixed-size
  tensors plus counters as 0-d tensors; no Python objects) and :meth:`load_state_dict` restores it exactly. The
  engine saves it with the predictions so far after every batch (``<out>/<label>-<dataset>-seed<S>.progress``) and
  an interrupted run resumes bit-identically from it. Methods must be deterministic given (state, batch): no global
  RNG (use a ``torch.Generator`` kept in the state if randomness is unavoidable).
- ``stateful = False`` (ZERO) declares that nothing carries over: episodic and online give the same predictions.
  ``default_mode`` is the mode a run uses without ``--mode`` ("online" here; ZERO sets "episodic").
- Learned prompt bases: the engine gives base-prompt features, so every method here works on zero-shot CLIP and on
  a CoOp / MaPLe checkpoint without change. :meth:`predict` runs under ``torch.no_grad()``; a method that optimises
  its own small tensors (DPE's residuals) wraps that part in ``torch.enable_grad()``, never the CLIP towers.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

from promptkd.config import NON_NEGATIVE
from promptkd.tta.base import AdaptResult, TTAError, TTAMethod
from promptkd.tta.model import PromptedCLIP

__all__ = [
    "MODES",
    "OnlineBatch",
    "OnlineConfig",
    "OnlineMethod",
    "ScaledCacheConfig",
    "entropy",
    "max_entropy",
]

MODES = ("episodic", "online")


@dataclass
class OnlineConfig:
    """Settings every training-free / online method has (the view need and how views are made)."""

    n_views: int = field(default=1, metadata={"help": "views per test image, the original included (1 = no views)"})
    min_crop_scale: float = field(default=0.08, metadata={"help": "smallest area fraction of the random crops"})
    augmix: Literal["auto", "on", "off"] = field(
        default="auto", metadata={"help": "AugMix views: auto = on for TPT's fine-grained datasets"}
    )

    def __post_init__(self) -> None:
        if self.n_views < 1:
            raise ValueError("n_views must be at least 1 (the original image)")
        if not 0 < self.min_crop_scale <= 1:
            raise ValueError("min_crop_scale must be in (0, 1]")


@dataclass
class ScaledCacheConfig(OnlineConfig):
    """Settings of the cache methods that pool confident views and compute at a chosen CLIP scale (DPE,
    BoostAdapter): their thresholds were tuned at CLIP's fixed scale 100, a small model's learned one differs."""

    selection: float = field(default=0.1, metadata={"help": "fraction of lowest-entropy views kept (0.1)"})
    logit_scale: float = field(
        default=0.0,
        metadata={
            "help": "CLIP logit scale inside the method: 0 = the model's learned one; 100 = the reference's fixed one",
            "rule": NON_NEGATIVE,
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.selection <= 1:
            raise ValueError("selection must be a fraction in (0, 1]")
        if self.n_views > 1 and int(self.n_views * self.selection) < 1:  # the reference would average no view
            raise ValueError(
                f"{self.n_views} views with selection {self.selection} keep no view; use n_views >= "
                f"{math.ceil(1 / self.selection)} or n_views=1"
            )


@dataclass
class OnlineBatch:
    """What the engine hands a training-free method for B test images (see the module docstring)."""

    features: torch.Tensor  # [B, V, E] normalised view features, base prompts; view 0 = original
    text: torch.Tensor  # [C, E] normalised class text features, base prompts
    logit_scale: float
    clip_logits: torch.Tensor  # [B, V, C]
    views: torch.Tensor | None = None  # [B, V, 3, H, W] when the method sets needs_pixels

    @property
    def batch(self) -> int:
        return self.features.shape[0]


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of softmax(logits) over the last axis."""
    log_p = logits.float().log_softmax(-1)
    return -(log_p.exp() * log_p).sum(-1)


def max_entropy(n_classes: int) -> float:
    import math

    return math.log(n_classes)


class OnlineMethod(TTAMethod):
    """Base of the training-free methods: no prompt tuning; a per-sample rule over cached features and state."""

    config_class: ClassVar[type] = OnlineConfig  # type: ignore[assignment]
    tuned: ClassVar[tuple[str, ...]] = ()
    stateful: ClassVar[bool] = True
    default_mode: ClassVar[str] = "online"
    needs_pixels: ClassVar[bool] = False

    def __init__(self, model: PromptedCLIP, config: Any = None, sources: dict[str, Any] | None = None):
        super().__init__(model, config, sources)  # checks sources and config, then reset_state(); mode "episodic"

    def check_sources(self) -> None:
        self.check_config()

    # --- what a method implements -------------------------------------------------------------------------------
    def check_config(self) -> None:
        """Refuse settings that cannot work for this model / class list (TTAError), before any work."""

    def reset_state(self) -> None:
        """Empty state (a fresh cache)."""

    #: the carried state: None, a dict of tensors, or an object with ``state_dict()`` / ``load_state_dict()``
    state: Any = None

    def _tensors(self) -> dict[str, torch.Tensor]:
        if self.state is None:
            return {}
        return dict(self.state if isinstance(self.state, dict) else self.state.state_dict())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The state as flat CPU tensors (saved with the run's progress)."""
        return {k: v.detach().cpu().clone() for k, v in self._tensors().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore a saved state exactly; one of another shape (other classes or settings) is refused."""
        expected = {k: tuple(v.shape) for k, v in self._tensors().items()}
        got = {k: tuple(v.shape) for k, v in state.items()}
        if got != expected:
            raise TTAError(
                f"{self.name}: the saved state {got} does not fit this run's {expected} "
                "(another class list or settings)"
            )
        restored = {k: v.to(self.model.device).clone() for k, v in state.items()}
        if isinstance(self.state, dict):
            self.state = restored
        elif self.state is not None:
            self.state.load_state_dict(restored)

    def predict_one(self, features: torch.Tensor, clip_logits: torch.Tensor, batch: OnlineBatch) -> torch.Tensor:
        """Logits [C] for one sample from its view features [V, E] and logits [V, C]; may update the state."""
        raise NotImplementedError

    # --- the shared part ----------------------------------------------------------------------------------------
    def predict(self, batch: OnlineBatch) -> torch.Tensor:
        """[B, C] logits, samples in stream order; episodic mode resets the state before each one."""
        rows = []
        for b in range(batch.batch):
            if self.mode == "episodic":
                self.reset_state()
            rows.append(self.predict_one(batch.features[b], batch.clip_logits[b], batch))
        return torch.stack(rows)

    def make_batch(self, views: torch.Tensor) -> OnlineBatch:
        """Encode B·V views once with the base prompts (no gradients) and score them against the class texts."""
        model = self.model
        batch, n_views = views.shape[:2]
        with torch.no_grad():
            features = model.encode_many(views.flatten(0, 1)).view(batch, n_views, -1)
            text = model.initial_text_features()
            logits = model.logits(features, text)
        return OnlineBatch(features, text, model.logit_scale, logits, views if self.needs_pixels else None)

    def adapt(self, views: torch.Tensor) -> AdaptResult:
        """The engine's entry point (same as the prompt-tuning methods'): views [B, V, 3, H, W] -> AdaptResult."""
        if views.dim() != 5:
            raise TTAError(f"views must be [B, V, 3, H, W]; got {tuple(views.shape)}")
        tic = time.perf_counter()
        batch = self.make_batch(views.to(self.model.device))
        with torch.no_grad():
            logits = self.predict(batch)
        return AdaptResult(
            logits=logits.detach().float(),
            initial_logits=batch.clip_logits[:, 0],
            params={},
            selected=torch.zeros(batch.batch, 0, dtype=torch.long),
            losses=self.diagnostics(),
            seconds=time.perf_counter() - tic,
        )

    def diagnostics(self) -> dict[str, float]:
        """Numbers shown on the progress bar (e.g. cache fill)."""
        return {}
