"""Training settings shared by every method (the Dassl defaults the papers use, made explicit)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from promptkd.config import SEED, Rule, to_dict

#: Settings added after runs were already stored: left out of records and resume identities while at these
#: defaults, so every earlier run resumes and hashes exactly as before.
OPTIONAL_DEFAULTS: dict[str, Any] = {"average_last_epochs": 0, "split_seed": None, "init_seed": None, "restarts": 1}


def stable_dict(obj: Any) -> dict[str, Any]:
    """``to_dict`` without the :data:`OPTIONAL_DEFAULTS` that are at their default (at any depth)."""

    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {
                k: strip(v)
                for k, v in value.items()
                if not (k in OPTIONAL_DEFAULTS and v == OPTIONAL_DEFAULTS[k] and type(v) is type(OPTIONAL_DEFAULTS[k]))
            }
        return value

    return strip(to_dict(obj))


@dataclass
class TrainConfig:
    """Optimisation and run settings; method presets override the paper-specific ones."""

    epochs: int = 10
    batch_size: int = 32
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    scheduler: Literal["cosine", "constant"] = "cosine"
    schedule_per: Literal["epoch", "step"] = "epoch"  # Dassl steps the scheduler once per epoch
    warmup_epochs: int = 1
    # "open_clip": lr·(s+1)/W over the first W steps, then the schedule over the remaining steps (open_clip's and
    # visual prompting's cosine_lr; per step only).
    warmup_type: Literal["constant", "linear", "none", "open_clip"] = "constant"
    warmup_lr: float = 1e-5
    # Per-step schedules: the warm-up length W in optimizer steps when > 0 (replaces warmup_epochs).
    warmup_steps: int = field(default=0, metadata={"rule": Rule(0.0)})
    # RandomResizedCrop's area range for training views (Dassl's default (0.08, 1)); tiny images may need more.
    crop_scale: tuple[float, float] = (0.08, 1.0)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    grad_clip: float | None = None
    # Data order, augmentation and in-training randomness. None (the default): the run's own seed, as the
    # references' one seed moves everything; a run config fills it in when it is built.
    seed: int | None = field(default=None, metadata={"rule": SEED})
    num_workers: int = 0
    log_every: int = 20
    checkpoint_every: int = 0  # also write the resume file every N steps within an epoch (0: at epoch ends only)
    select: Literal["last", "val"] = "last"  # checkpoint selection: last epoch, or best on the validation split
    # Variance reduction needing no labels beyond training: the final trainable tensors are the mean of their
    # values at the ends of the last K epochs (SWA-style; 0 = off, the last epoch's values).
    average_last_epochs: int = field(default=0, metadata={"rule": Rule(0.0)})
    eval_every: int = 0  # evaluate on validation every N epochs (0: only when select == "val", every epoch)
    tensorboard: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.batch_size < 1:
            raise ValueError("epochs must be >= 0 and batch_size >= 1")
        if self.lr <= 0:
            raise ValueError("lr must be positive")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.schedule_per == "epoch" and (self.warmup_steps > 0 or self.warmup_type == "open_clip"):
            raise ValueError("warmup_steps and warmup_type 'open_clip' count optimizer steps: set schedule_per: step")
        if self.average_last_epochs < 0 or self.average_last_epochs > max(self.epochs, 1):
            raise ValueError(
                f"average_last_epochs must be between 0 and epochs ({self.epochs}), got {self.average_last_epochs}"
            )
        if self.average_last_epochs > 1 and self.select == "val":
            raise ValueError("average_last_epochs and select: val both choose the final prompts: use one of them")
        self.crop_scale = (float(self.crop_scale[0]), float(self.crop_scale[1]))
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError(f"crop_scale must be an area range 0 < low <= high <= 1, got {list(self.crop_scale)}")
