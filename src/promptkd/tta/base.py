"""Episodic test-time prompt tuning for a batch of test images at once; the methods subclass :class:`TTAMethod`.

One adaptation of B test images (each with V views, view 0 the original):
1. encode all B·V views once, without gradients, with the initial prompts (shared by every sample at step 0), and
   score them against the initial class text features (computed once per class list);
2. keep each sample's ``int(V · selection)`` lowest-entropy views (TPT's confidence selection; indices fixed after
   step 0 as in the reference);
3. per-sample prompts start from the base prompts (reset for every image: predictions never depend on the test
   order); ``steps`` optimiser steps on the sum of per-sample losses — one AdamW over the stack equals B
   independent AdamWs because it acts element by element;
4. predict from view 0 with each sample's adapted prompts. When the tuned prompts do not reach the image tower
   (CoOp-style text context), view features come from step 1 and only the selected views are ever re-encoded
   when they do (MaPLe-style coupled prompts), so back-propagation runs through the selected views only.

``mode = "online"`` (set by the engine) carries the adapted prompts from one test image to the next instead of
resetting them: the images of a batch are then adapted one after another, in stream order, and the carried prompts
are the method's saved state (:meth:`TTAMethod.state_dict`). Training-free methods subclass
:class:`promptkd.tta.online.OnlineMethod` instead (the interface is described there).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

from promptkd.config import NON_NEGATIVE
from promptkd.errors import PromptKDError
from promptkd.tta.losses import confident_views, marginal_entropy
from promptkd.tta.model import PromptedCLIP, PromptParams

__all__ = [
    "AdaptContext",
    "AdaptResult",
    "TTAConfig",
    "TTAError",
    "TTAMethod",
    "get_tta_method",
    "list_tta_methods",
    "register_tta_method",
]


class TTAError(PromptKDError, ValueError):
    """Test-time tuning settings or inputs that cannot work."""


@dataclass
class TTAConfig:
    """Settings shared by every test-time method (TPT defaults: 64 views, 10% kept, AdamW 5e-3, 1 step)."""

    n_views: int = field(default=64, metadata={"help": "views per test image, the original included"})
    selection: float = field(default=0.1, metadata={"help": "fraction of lowest-entropy views kept (TPT: 0.1)"})
    steps: int = field(default=1, metadata={"help": "optimiser steps per test image"})
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = 5e-3
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    momentum: float = 0.0
    min_crop_scale: float = field(
        default=0.08, metadata={"help": "smallest area fraction of the random resized crops (TPT: 0.08)"}
    )
    augmix: Literal["auto", "on", "off"] = field(
        default="auto", metadata={"help": "AugMix views: auto = on for TPT's fine-grained datasets"}
    )
    logit_scale: float = field(
        default=0.0,
        metadata={
            "help": "CLIP logit scale of every logit the method computes (loss, view selection, reported "
            "confidence): 0 = the model's learned one; 100 = CLIP's, at which the papers tuned their settings",
            "rule": NON_NEGATIVE,
        },
    )

    def __post_init__(self) -> None:
        if self.n_views < 2:
            raise ValueError("n_views must be at least 2 (the original and one augmented view)")
        if not 0 < self.selection <= 1:
            raise ValueError("selection must be a fraction in (0, 1]")
        if not 0 < self.min_crop_scale <= 1:
            raise ValueError("min_crop_scale must be in (0, 1]")
        if self.steps < 0:
            raise ValueError("steps must be >= 0 (0 = no adaptation)")
        if self.lr < 0:
            raise ValueError("lr must be >= 0")
        self.betas = tuple(self.betas)  # type: ignore[assignment]


@dataclass
class AdaptResult:
    logits: torch.Tensor  # [B, C] from view 0 with the adapted prompts
    initial_logits: torch.Tensor  # [B, C] from view 0 with the initial prompts (the zero-shot / base prediction)
    params: PromptParams  # adapted per-sample prompts (detached)
    selected: torch.Tensor  # [B, k] confident view indices
    losses: dict[str, float]  # mean over samples of the last step's loss terms
    seconds: float


class AdaptContext:
    """What a loss needs about the batch: the views, the selection and the step-0 features, plus helpers."""

    def __init__(self, model: PromptedCLIP, views: torch.Tensor, selection: float, tuned: tuple[str, ...]):
        self.model = model
        self.views = views
        self.batch, self.n_views = views.shape[:2]
        with torch.no_grad():
            self.view_features = model.encode_many(views.flatten(0, 1)).view(self.batch, self.n_views, -1)
            self.initial_text = model.initial_text_features()
            self.initial_logits = model.logits(self.view_features, self.initial_text)
        self.selected = confident_views(self.initial_logits, selection)
        self.k = self.selected.shape[1]
        self.dynamic_visual = model.visual_depends_on(tuned)
        rows = torch.arange(self.batch, device=views.device).unsqueeze(1)
        self._rows = rows
        self.selected_views = views[rows, self.selected] if self.dynamic_visual else None

    def selected_features(
        self, params: PromptParams, *, block_hook: Callable | None = None, normalize: bool = True
    ) -> torch.Tensor:
        """[B, k, E] features of the selected views: re-encoded with each sample's prompts when they reach the image
        tower (or when a hook or unnormalised features are wanted), else the step-0 features."""
        if self.dynamic_visual or block_hook is not None or not normalize:
            views = self.views[self._rows, self.selected] if self.selected_views is None else self.selected_views
            features = self.model.encode_images(
                views.flatten(0, 1),
                params if self.dynamic_visual else None,
                views_per_sample=self.k,
                block_hook=block_hook,
                normalize=normalize,
            )
            return features.view(self.batch, self.k, -1)
        return self.view_features[self._rows, self.selected]

    def predict(self, params: PromptParams) -> torch.Tensor:
        """[B, C] logits of view 0 with the per-sample prompts (no gradients)."""
        with torch.no_grad():
            text = self.model.text_features(params, grad=False)
            if self.dynamic_visual:
                image = self.model.encode_images(self.views[:, 0], params)
            else:
                image = self.view_features[:, 0]
            if text.dim() == 2:
                return self.model.logits(image, text)
            return self.model.logits(image.unsqueeze(1), text).squeeze(1)


_REGISTRY: dict[str, type[TTAMethod]] = {}


def register_tta_method(cls: type[TTAMethod]) -> type[TTAMethod]:
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise TTAError(f"test-time method {cls.name!r} is registered twice")
    _REGISTRY[cls.name] = cls
    return cls


#: built-in test-time methods by name -> module (imported on first use; each registers itself)
BUILTIN_TTA_METHODS: dict[str, str] = {
    "tpt": "promptkd.tta.methods.tpt",
    "ctpt": "promptkd.tta.methods.ctpt",
    "promptalign": "promptkd.tta.methods.promptalign",
    "promptsync": "promptkd.tta.methods.promptsync",
    # training-free / online methods (promptkd.tta.online.OnlineMethod)
    "tda": "promptkd.tta.methods.tda",
    "zero": "promptkd.tta.methods.zero",
    "dpe": "promptkd.tta.methods.dpe",
    "boostadapter": "promptkd.tta.methods.boostadapter",
}


def _load_builtins() -> None:
    import importlib

    for module in BUILTIN_TTA_METHODS.values():
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as error:  # a listed method whose module has not landed yet; its own imports fail
            if error.name != module:
                raise


def list_tta_methods() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def get_tta_method(name: str) -> type[TTAMethod]:
    _load_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise TTAError(f"unknown test-time method {name!r}; choose one of {', '.join(sorted(_REGISTRY))}") from None


class TTAMethod:
    """A test-time method: which prompts it tunes and its per-sample loss; :meth:`adapt` does the rest."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type[TTAConfig]] = TTAConfig
    tuned: ClassVar[tuple[str, ...]] = ("ctx",)
    #: the source files it needs: "stats" (PromptAlign) and/or "prototypes" (PromptSync)
    needs: ClassVar[tuple[str, ...]] = ()
    #: the mode a run uses unless told (--mode): prompt tuning resets per image, cache methods carry their caches
    default_mode: ClassVar[str] = "episodic"

    def __init__(self, model: PromptedCLIP, config: TTAConfig | None = None, sources: dict[str, Any] | None = None):
        self.model = model
        self.config = config or self.config_class()
        self.sources = dict(sources or {})
        missing = [need for need in self.needs if need not in self.sources]
        if missing:
            raise TTAError(
                f"{self.name} needs source {' and '.join(missing)} computed offline on a proxy source set: run "
                "`promptkd tta-stats` and pass the file(s) with --stats / --prototypes."
            )
        self.check_sources()
        if isinstance(self.config, TTAConfig) and self.config.logit_scale > 0:  # cache methods rescale inside
            self.model.logit_scale = float(self.config.logit_scale)
        self.mode = "episodic"  # "online": prompts carried from one test image to the next (set by the engine)
        self.reset_state()

    # --- online state (prompt-tuning methods: the prompts carried across the stream) ---------------------------
    def reset_state(self) -> None:
        self._carried: PromptParams | None = None

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {} if self._carried is None else {f"prompt.{k}": v.detach().cpu() for k, v in self._carried.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        unknown = [k for k in state if not k.startswith("prompt.") or k[7:] not in self.tuned_keys()]
        if unknown:
            raise TTAError(f"{self.name}: the saved run state has {unknown}, not prompts this method tunes")
        carried = {k[7:]: v.to(self.model.device) for k, v in state.items()}
        self._carried = carried or None

    def tuned_keys(self) -> tuple[str, ...]:
        """The tuned prompts the base model has (a MaPLe base has deep prompts and coupling maps, CoOp only ctx)."""
        return tuple(k for k in self.tuned if k in self.model.base)

    def check_sources(self) -> None:
        """Refuse source files that do not fit the model or the class list (before adaptation starts)."""

    # --- the per-method part ------------------------------------------------------------------------------------
    def loss(self, params: PromptParams, ctx: AdaptContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-sample loss [B] and its named terms ([B] each)."""
        raise NotImplementedError

    def entropy(self, params: PromptParams, ctx: AdaptContext, features: torch.Tensor | None = None) -> torch.Tensor:
        """H(p̄) over the selected views with the sample's prompts: [B]."""
        features = ctx.selected_features(params) if features is None else features
        text = self.model.text_features(params)
        return marginal_entropy(self.model.logits(features, text) if text.dim() == 3 else features @ text.t())

    # --- the shared part ----------------------------------------------------------------------------------------
    def make_optimizer(self, params: PromptParams) -> torch.optim.Optimizer:
        cfg = self.config
        tensors = list(params.values())
        if cfg.optimizer == "adamw":
            return torch.optim.AdamW(tensors, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
        return torch.optim.SGD(tensors, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)

    def run_steps(self, params: PromptParams, ctx: AdaptContext) -> dict[str, float]:
        """``steps`` optimiser steps on the summed per-sample loss; returns the last step's mean loss terms."""
        optimizer = self.make_optimizer(params)
        terms: dict[str, float] = {}
        for _ in range(self.config.steps):
            optimizer.zero_grad(set_to_none=True)
            loss, parts = self.loss(params, ctx)
            if not torch.isfinite(loss).all():
                bad = (~torch.isfinite(loss)).nonzero().flatten().tolist()
                raise TTAError(f"{self.name}: non-finite test-time loss for batch samples {bad}; lower --lr")
            loss.sum().backward()
            optimizer.step()
            terms = {"loss": float(loss.detach().mean())} | {k: float(v.detach().mean()) for k, v in parts.items()}
        return terms

    def adapt(self, views: torch.Tensor) -> AdaptResult:
        """Adapt and predict for views [B, V, 3, H, W] (view 0 = the original image of each sample).

        Episodic: B independent episodes from the base prompts, batched. Online: one image at a time in row order,
        each starting from the prompts the previous image ended with (a fresh optimiser per image).
        """
        if views.dim() != 5:
            raise TTAError(f"views must be [B, V, 3, H, W]; got {tuple(views.shape)}")
        tic = time.perf_counter()
        views = views.to(self.model.device)
        if self.mode != "online":
            result = self._episode(views, None)
        else:
            parts = []
            for b in range(views.shape[0]):
                parts.append(self._episode(views[b : b + 1], self._carried))
                self._carried = {k: v.detach().clone() for k, v in parts[-1].params.items()}
            result = AdaptResult(
                logits=torch.cat([p.logits for p in parts]),
                initial_logits=torch.cat([p.initial_logits for p in parts]),
                params={k: torch.cat([p.params[k] for p in parts]) for k in parts[0].params},
                selected=torch.cat([p.selected for p in parts]),
                losses=parts[-1].losses,
                seconds=0.0,
            )
        result.seconds = time.perf_counter() - tic
        return result

    def _episode(self, views: torch.Tensor, start: PromptParams | None) -> AdaptResult:
        model = self.model
        ctx = AdaptContext(model, views, self.config.selection, self.tuned_keys())
        if start is None:
            params = model.initial_params(ctx.batch, self.tuned_keys())
        else:
            params = {k: v.detach().clone().requires_grad_(True) for k, v in start.items()}
        terms = self.run_steps(params, ctx) if self.config.steps > 0 else {}
        logits = ctx.predict(params)
        return AdaptResult(
            logits=logits,
            initial_logits=ctx.initial_logits[:, 0],
            params={k: v.detach() for k, v in params.items()},
            selected=ctx.selected,
            losses=terms,
            seconds=0.0,
        )
