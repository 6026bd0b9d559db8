"""The contract between methods and the engine.

A method reads like a paper's method section: a config dataclass with the paper's defaults, the trainable parts
in ``self.learner`` (everything a checkpoint holds), ``training_step`` returning the loss, and ``logits`` for
inference. Data, loops, precision, checkpoints, distribution and logging live in the engine.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from promptkd.backbones import Backbone
from promptkd.checkpoints import (
    CheckpointError,
    classnames_hash,
    load_checkpoint,
    load_trainable_state,
    save_checkpoint,
    trainable_state,
)
from promptkd.config import to_dict


@dataclass
class MethodConfig:
    """Base of every method's config; subclasses add the paper's hyper-parameters with their defaults."""

    #: why a key other methods take is not one of this method's (added to the unknown-key message)
    unknown_key_hints: ClassVar[dict[str, str]] = {
        key: "ATPrompt attributes go into a learned text prompt: methods coop, cocoop, maple and promptsrc take them."
        for key in ("attributes", "attribute_ctx", "attribute_init_std")
    }


@dataclass
class Batch:
    """One training or evaluation batch. ``labels`` is None for unlabeled data (distillation); ``keys`` names each
    sample where the source has stable names (image keys of streamed shards, stored views of the teacher cache);
    ``texts`` holds each image's caption tokens where the data is captioned (pre-training)."""

    images: torch.Tensor
    labels: torch.Tensor | None = None
    index: torch.Tensor | None = None
    keys: list[str] | None = None
    texts: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            self.images.to(device, non_blocking=True),
            None if self.labels is None else self.labels.to(device, non_blocking=True),
            None if self.index is None else self.index.to(device),
            self.keys,
            None if self.texts is None else self.texts.to(device, non_blocking=True),
        )


@dataclass
class StepOutput:
    """A training step's loss and the named components the engine logs."""

    loss: torch.Tensor
    logs: dict[str, float] = field(default_factory=dict)


class Method(nn.Module):
    """Frozen CLIP + trainable ``learner``. Subclasses set ``name``, ``config_class`` and the three hooks."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    uses_labels: ClassVar[bool] = True
    trains: ClassVar[bool] = True  # False for training-free methods (zero-shot, Tip-Adapter without -F)
    #: What the method learns from: "classification" (labelled or unlabelled images and a class list) or
    #: "pretraining" (captioned images; run by `promptkd pretrain`, refused by the classification commands).
    task: ClassVar[str] = "classification"

    def __init__(self, backbone: Backbone, classnames: list[str], config: MethodConfig | None = None):
        super().__init__()
        backbone.freeze()
        self.backbone = backbone
        self.clip = backbone.model  # registered so .to(device) moves it; frozen, never saved
        self.config = config if config is not None else self.config_class()
        self.classnames = list(classnames)
        self.learner = nn.Module()

    # --- what a method implements --------------------------------------------------------------------------------
    def training_step(self, batch: Batch) -> StepOutput:
        raise NotImplementedError

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Class scores [B, C] for the current class list (inference; the engine wraps it in no_grad)."""
        raise NotImplementedError

    def set_classnames(self, classnames: list[str]) -> None:
        """Switch to another class list (base -> new, cross-dataset); methods with class-bound parts refuse."""
        self.classnames = list(classnames)

    def prepare(self, train_batches: Callable[[], Iterable[Batch]], val_batches: Callable[[], Iterable[Batch]] | None):
        """Called once before training with re-iterable data (e.g. Tip-Adapter builds its cache, picks alpha/beta
        on validation). ``train_batches()`` yields augmented training batches, ``val_batches()`` validation ones."""

    def on_epoch_end(self, epoch: int, total_epochs: int) -> None:
        """Called after the last step of every epoch (1-based ``epoch``), e.g. for PromptSRC's GPA."""

    def on_train_end(self) -> None:
        """Called once after the last epoch, before the final checkpoint is written."""

    def epoch_metrics(self, epoch: int, total_epochs: int) -> dict[str, float]:
        """Measurements to record with epoch ``epoch`` (1-based), e.g. a pre-trained CLIP's zero-shot accuracy; the
        engine calls it on the main process after :meth:`on_epoch_end` and logs what it returns."""
        return {}

    def resume_state(self) -> dict[str, torch.Tensor]:
        """Extra tensors a resumed run needs (e.g. a GPA accumulator); not part of the final checkpoint."""
        return {}

    def load_resume_state(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise CheckpointError(f"{self.name}: unexpected resume state {sorted(state)}")

    # --- shared behaviour --------------------------------------------------------------------------------------------
    def forward(self, batch: Batch) -> StepOutput:
        """DDP calls forward: one training step's loss."""
        return self.training_step(batch)

    def train(self, mode: bool = True) -> Method:
        super().train(mode)
        self.clip.eval()  # the frozen CLIP never switches to training behaviour (dropout, patch dropout)
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.learner.parameters() if p.requires_grad]

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Optimiser parameter groups; one group with the run's weight decay unless a method needs more (e.g.
        pre-training exempts gains, biases and the logit scale from decay)."""
        return [{"params": self.trainable_parameters(), "weight_decay": weight_decay}]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return trainable_state(self.learner)

    def load_trainable(self, tensors: dict[str, torch.Tensor], source: str | Path) -> None:
        load_trainable_state(self.learner, tensors, source)

    def checkpoint_config(self) -> dict[str, Any]:
        return {
            "method": self.name,
            "method_config": to_dict(self.config),
            "backbone": self.backbone.spec.to_dict(),
            "classnames": self.classnames,
        }

    def save(self, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
        return save_checkpoint(path, self.trainable_state(), {**self.checkpoint_config(), **(extra or {})})

    def load(self, path: str | Path, *, check_classnames: bool = True) -> dict[str, Any]:
        """Load a checkpoint of this method strictly; refuses another method or, for class-bound methods, classes."""
        tensors, config = load_checkpoint(path)
        if config.get("method") != self.name:
            raise CheckpointError(
                f"{path}: checkpoint of method {config.get('method')!r}, but this is {self.name!r}; "
                f"use --method {config.get('method')}."
            )
        stored = config.get("classnames")
        if check_classnames and stored is not None and classnames_hash(stored) != classnames_hash(self.classnames):
            raise CheckpointError(
                f"{path}: checkpoint was trained on {len(stored)} classes ({', '.join(stored[:4])}, ...) which differ "
                f"from the {len(self.classnames)} current classes ({', '.join(self.classnames[:4])}, ...)."
            )
        self.load_trainable(tensors, path)
        return config

    def extra_repr(self) -> str:
        n = sum(p.numel() for p in self.trainable_parameters())
        return f"method={self.name}, classes={len(self.classnames)}, trainable={n:,}"


def config_from(method_cls: type[Method], data: dict[str, Any] | None) -> MethodConfig:
    from promptkd.config import from_dict

    return from_dict(method_cls.config_class, data, where=f"{method_cls.name} config")


def describe_config(config: MethodConfig) -> dict[str, Any]:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
