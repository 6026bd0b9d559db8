"""PromptKD's distillation into any timm image model (beyond the paper; Li et al. distil into a prompted CLIP tower).

The student is a timm model's pooled features g(x) → the projector P → the teacher's embedding; its classifier is
the teacher's stored text features, its loss the same KD loss on the same augmented views, and no label is read:

    z_s = s_t · n(P(g(x))) · n(T_t)ᵀ,     L = w · τ² · KL(σ(z_t/τ) ‖ σ(z_s/τ)) / N

``train_layers`` says what trains besides the projector: ``all`` (every weight; the only choice for a student
initialised at random, which must learn everything), ``last:N`` (the last N of timm's coarse parameter groups:
stages of a CNN, blocks of a ViT, with the final norm; earlier BatchNorm statistics stay frozen) or ``none``
(frozen pretrained features + projector). The checkpoint holds what trained: a fully trained student holds all its
weights (``student.*``), so it rebuilds without the weights it started from.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from promptkd.config import ConfigError, apply_overrides, from_dict
from promptkd.errors import PromptKDError
from promptkd.methods import MethodConfig, register_method
from promptkd.methods.promptkd import DeployableStudent, PromptKD, PromptKDConfig, StudentKDConfig

__all__ = ["TimmKD", "TimmKDConfig", "apply_student_overrides", "frozen_modules", "split_student_overrides"]


@dataclass
class TimmKDConfig(StudentKDConfig):
    """The KD settings of PromptKD plus what trains in the timm student."""

    train_layers: str = field(
        default="all", metadata={"help": "all | last:N (timm's last N parameter groups) | none (projector only)"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.last_groups()  # validates

    def last_groups(self) -> int | None:
        """None for ``all``, 0 for ``none``, N for ``last:N``."""
        value = self.train_layers.strip()
        if value == "all":
            return None
        if value == "none":
            return 0
        if value.startswith("last:") and value[5:].isdigit() and int(value[5:]) >= 1:
            return int(value[5:])
        raise ValueError(f"train_layers must be 'all', 'none' or 'last:N' (N >= 1), not {self.train_layers!r}")


@register_method
class TimmKD(PromptKD):
    """A timm image model distilled from the teacher's soft labels (see the module docstring)."""

    name: ClassVar[str] = "promptkd_timm"
    config_class: ClassVar[type[MethodConfig]] = TimmKDConfig
    config: TimmKDConfig

    def check_student(self) -> None:
        from promptkd.backbones.timm_models import ImageBackbone

        if not isinstance(self.backbone, ImageBackbone):
            raise PromptKDError(
                f"promptkd_timm distils into timm models (--student-model timm:NAME); "
                f"{self.backbone.spec.model_name} is a CLIP, whose student method is promptkd."
            )
        last = self.config.last_groups()
        if last is not None and self.backbone.spec.source == "random":
            raise PromptKDError(
                f"the student {self.backbone.spec.model_name} starts from random weights, so every layer must train "
                f"(train_layers=all), not {self.config.train_layers!r}; give pretrained weights to train fewer."
            )

    def build_student(self) -> None:
        from timm.models import group_parameters

        tower = self.backbone.model.visual
        last = self.config.last_groups()
        self._frozen_modules: list[nn.Module] = []
        if last is None:
            tower.requires_grad_(True)
        elif last:
            groups = list(group_parameters(tower, tower.group_matcher(coarse=True)).values())
            names = {n for group in groups[-last:] for n in group}
            for name, param in tower.named_parameters():
                param.requires_grad_(name in names)
            self._frozen_modules = frozen_modules(tower)
        self.student_dim = self.backbone.embed_dim

    def train(self, mode: bool = True) -> TimmKD:
        super().train(mode)  # the frozen tower goes to eval
        if mode and self.config.last_groups() != 0:
            self.backbone.model.visual.train()  # BatchNorm of trained layers learns its statistics
            for module in self._frozen_modules:
                module.eval()
        return self

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """n(P(g(x))) [B, d_t], float32: the timm model's pooled features, projected to the teacher's space."""
        feature = self.backbone.model.visual(images)
        projector = self.learner.projector
        if projector.training and feature.shape[0] < 2 and hasattr(projector, "bn"):
            raise PromptKDError("the projector's BatchNorm needs training batches of at least 2 images")
        with torch.autocast(device_type=feature.device.type, enabled=False):
            return F.normalize(projector(feature.float()), dim=-1)

    def deployable(self) -> DeployableStudent:
        return DeployableStudent(
            self.backbone.model.visual,
            None,
            self.learner.projector,
            self.text_features,
            float(self.stored.logit_scale),
            list(self.classnames),
        )

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, student={self.backbone.spec.model_name}, train_layers={self.config.train_layers}"
        )


def frozen_modules(tower: nn.Module) -> list[nn.Module]:
    """The modules that stay in eval mode while a partly trained tower trains: those whose parameters all stay
    frozen (their BatchNorm statistics too), and parameter-free ones (Dropout, DropPath) whose nearest ancestor with
    parameters is not trained entirely, i.e. that lie outside the trained stages (inside them they must train)."""
    frozen: list[nn.Module] = []
    trained: dict[str, bool] = {}  # module name -> every parameter in it trains (modules with parameters)
    for name, module in tower.named_modules():  # parents before children
        params = list(module.parameters())
        if params:
            trained[name] = all(p.requires_grad for p in params)
            if not any(p.requires_grad for p in params):
                frozen.append(module)
            continue
        ancestor = name
        while ancestor and ancestor not in trained:
            ancestor = ancestor.rpartition(".")[0]
        if not trained.get(ancestor, False):
            frozen.append(module)
    return frozen


def _student_keys() -> tuple[set[str], set[str]]:
    """(keys only a CLIP student takes, keys only a timm student takes) of the method config."""
    clip = {f.name for f in dataclasses.fields(PromptKDConfig)}
    timm = {f.name for f in dataclasses.fields(TimmKDConfig)}
    return clip - timm, timm - clip


def _method_key(item: str) -> str | None:
    key = item.partition("=")[0].strip()
    for prefix in ("method.", "method_config."):
        if key.startswith(prefix):
            return key[len(prefix) :]
    return None


def split_student_overrides(student_model: str | None, overrides: list[str]) -> tuple[list[str], list[str]]:
    """``--set`` overrides → (those the promptkd preset layer checks, a timm student's own method keys).

    The distill config is layered on the CLIP student's (promptkd) presets, whose keys a timm student does not all
    share: its own keys (``train_layers``) are applied afterwards by :func:`apply_student_overrides`, and a key of
    the other kind of student is refused here, naming the student it belongs to."""
    clip_only, timm_only = _student_keys()
    is_timm = str(student_model or "").startswith("timm:")
    rest: list[str] = []
    own: list[str] = []
    for item in overrides:
        key = _method_key(item)
        if is_timm and key in clip_only:
            raise ConfigError(
                f"--set {item}: method.{key} applies to CLIP students (promptkd: prompts, LoRA, unfrozen blocks); "
                f"the timm student {student_model} takes method.train_layers=all|last:N|none instead."
            )
        if not is_timm and key in timm_only:
            raise ConfigError(
                f"--set {item}: method.{key} applies to timm students (--student timm:NAME); the CLIP student "
                f"{student_model or '(none given)'} trains its prompts, plus method.lora_rank=R or "
                "method.unfreeze_blocks=N."
            )
        (own if key in timm_only else rest).append(item)
    return rest, own


def apply_student_overrides(method_config: dict, own: list[str]) -> dict:
    """``method_config`` with a timm student's own ``--set`` keys applied, checked against :class:`TimmKDConfig`
    (the promptkd preset's prompt settings in it are left for the run to drop)."""
    if not own:
        return method_config
    renamed = ["method." + item.partition(".")[2] for item in own]
    data = apply_overrides({"method": dict(method_config)}, renamed)["method"]
    known = {f.name for f in dataclasses.fields(TimmKDConfig)}
    from_dict(TimmKDConfig, {k: v for k, v in data.items() if k in known}, where="promptkd_timm config")
    return data
