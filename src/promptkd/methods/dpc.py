"""DPC: Dual-Prompt Collaboration (Li et al., "DPC: Dual-Prompt Collaboration for Tuning Vision-Language Models",
CVPR 2025; JREion/DPC ``trainers/sple_coop.py``), a second stage over a tuned prompt.

The tuned prompt P (a CoOp, IVLP or PromptSRC text prompt, or a PromptKD student's projector) stays frozen. A
parallel prompt P' starts as an exact copy of P and is trained on the base classes only, with a contrastive
image-text loss over a mini-batch widened with hard negatives:

- for every image, the top-K (``hard_negatives``, 8) base classes of the *tuned* model, less the true class, keep
  those no other image of the widened batch already holds (the reference's "non-repeat"); when fewer than two are
  left, classes absent from the batch are drawn at random until there are two;
- one training image is drawn per negative class; image i of the widened batch and the text of its class j form
  the logits ``s · n(f_i) · n(g_j)ᵀ`` and the loss is the symmetric cross-entropy on the diagonal
  (CLIP's loss; ``(CE(L, I) + CE(Lᵀ, I)) / 2``).

Inference mixes the two prompts, class by class: ``ω_b·P' + (1−ω_b)·P`` for a class DPC was trained on (base) and
``ω_n·P' + (1−ω_n)·P`` for any other (new), ``weight_base`` / ``weight_new`` = 0.5 / 0.2 (the paper's defaults;
the authors use 0.2 / 0.0 over PromptKD). Only the class side changes, so the image tower runs once per image:
inference costs what the tuned model's does (for a PromptKD student, one more projector matmul when the classes
mix base and new ones).

As the reference's ``converse`` mode, the trainable tensor is the base mixture M = ω_b·P' + (1−ω_b)·P (starting at
P) and training sees P' = P + (M − P)/ω_b, so P' moves 1/ω_b² as fast as M under SGD (4× at 0.5); the checkpoint
holds M as ``parallel.*`` with the ω_b it was trained with, and any ω_b or ω_n can be applied when it is loaded.

Choices (docs/plugins.md): the image side of the wrapped model is frozen (its visual prompts are not copied; the
paper's P' is textual); for a PromptKD student, whose classifier is the teacher's stored text features, P' is a
copy of its projector (the map into the teacher's text space) and its BatchNorm keeps P's statistics. Hard-negative
images come from a bank of the training images' frozen features, one augmented view each, taken once before
training (the reference re-reads and re-augments a random file each step). The random extra classes are drawn
uniformly from those absent from the batch (the reference's ``randint(1, C − 2)`` never picks the first or the
last class). The DPC checkpoint holds the tuned model's tensors too (``base.*``, bound to the tuned checkpoint's
SHA-256), so it predicts without the first stage's files.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from promptkd.backbones import Backbone
from promptkd.checkpoints import CheckpointError, checkpoint_paths, load_checkpoint, load_trainable_state
from promptkd.config import FRACTION, Rule
from promptkd.errors import PromptKDError
from promptkd.methods import MethodConfig, get_method, register_method
from promptkd.methods.base import Batch, Method, StepOutput, config_from
from promptkd.methods.prompted import PromptedMethod, cosine_logits

__all__ = ["DPC", "DPCConfig", "DPCError"]

logger = logging.getLogger(__name__)

#: methods whose tuned prompt DPC copies: text-prompt methods (their text prompt) and PromptKD (its projector)
TEXT_METHODS = ("coop", "ivlp", "promptsrc")
STUDENT_METHODS = ("promptkd",)
_REFUSED = {
    "cocoop": "its text prompt depends on each image (the meta-net), so a class-side copy cannot be mixed per class",
    "maple": "its visual prompts are projected from the text prompts, so a parallel text prompt changes the images",
    "promptkd_timm": "its image tower is not a prompted CLIP tower; distil a promptkd (CLIP) student for DPC",
}
MIN_NEGATIVES = 2  # the reference's floor of hard negatives per image (random classes fill up to it)


class DPCError(PromptKDError, ValueError):
    """A tuned checkpoint DPC cannot wrap, or one that does not fit the run."""


@dataclass
class DPCConfig(MethodConfig):
    """DPC hyper-parameters (reference ``SPLE.*``)."""

    base: str = field(default="", metadata={"help": "the tuned prompt: a checkpoint file or its run folder"})
    # ω_b > 0: P' is trained through the base mixture ω_b·P' + (1−ω_b)·P
    weight_base: float = field(
        default=0.5, metadata={"help": "ω_b, P' share for base classes (STACK.WEIGHT)", "rule": FRACTION}
    )
    weight_new: float = field(
        default=0.2, metadata={"help": "ω_n, P' share for new classes (WEIGHT_FOR_NEW)", "rule": Rule(0.0, 1.0)}
    )
    hard_negatives: int = field(
        default=8, metadata={"help": "top-K classes of the tuned model per image (INFER_TOPK)", "rule": Rule(2.0)}
    )

    def __post_init__(self) -> None:
        if self.base:  # refused with the config, before any data is read or any file written
            wrappable_method(base_checkpoint(self.base))


def base_checkpoint(path: str | Path) -> Path:
    """The tensor file a ``base`` setting names: a checkpoint (``prompts``, ``.safetensors``, ``.json``) or a run
    folder holding ``prompts.safetensors``."""
    given = Path(path)
    tensor_path, config_path = checkpoint_paths(given / "prompts" if given.is_dir() else given)
    if not tensor_path.is_file() or not config_path.is_file():
        raise DPCError(
            f"method.base={given}: no such run folder or checkpoint (expected {tensor_path.name} and "
            f"{config_path.name} there); give the tuned prompt's run folder or its prompts.safetensors."
        )
    return tensor_path


def wrappable_method(tensor_path: Path) -> str:
    """The method of a tuned checkpoint DPC can wrap (read from its JSON alone); any other is refused, saying why."""
    config_path = checkpoint_paths(tensor_path)[1]
    try:
        name = str(json.loads(config_path.read_text(encoding="utf-8")).get("method"))
    except (OSError, ValueError, AttributeError) as error:
        raise DPCError(f"{config_path}: not a readable promptkd checkpoint record ({error}).") from None
    if name in _REFUSED:
        raise DPCError(f"{tensor_path}: DPC cannot wrap a {name} checkpoint: {_REFUSED[name]}.")
    if name not in TEXT_METHODS + STUDENT_METHODS:
        raise DPCError(
            f"{tensor_path}: a {name!r} checkpoint has no tuned prompt for DPC to copy; DPC wraps "
            f"{', '.join(TEXT_METHODS + STUDENT_METHODS)}."
        )
    return name


@register_method
class DPC(Method):
    """DPC over a tuned checkpoint (see the module docstring): ``base`` (frozen P) + ``learner.parallel`` (M)."""

    name: ClassVar[str] = "dpc"
    config_class: ClassVar[type[MethodConfig]] = DPCConfig
    config: DPCConfig

    def __init__(
        self,
        backbone: Backbone,
        classnames: list[str],
        config: DPCConfig | None = None,
        *,
        base: tuple[dict[str, torch.Tensor], dict[str, Any], str] | None = None,
        features: Any = None,
        trained_weight_base: float | None = None,
    ):
        super().__init__(backbone, classnames, config)
        if base is None:
            if not self.config.base:
                raise DPCError("dpc needs the tuned prompt to start from: --set method.base=RUN_FOLDER_OR_CHECKPOINT")
            tensor_path = base_checkpoint(self.config.base)
            tensors, meta = load_checkpoint(tensor_path)
            base = (tensors, meta, str(tensor_path))
        tensors, meta, source = base
        self.base_record = self._base_record(meta, source)
        self.base = self._build_base(backbone, tensors, meta, source, features)
        self.base_state = {k: v.detach().clone() for k, v in self.base.trainable_state().items()}  # kept in ours
        self.base.requires_grad_(False)
        self.trained_classes = list(classnames)
        self.trained_weight_base = float(trained_weight_base or self.config.weight_base)
        owner = self.base.learner.projector if self.kind == "student" else self.base.learner.text
        self.tuned = {n: p.detach().clone() for n, p in owner.named_parameters()}
        self.learner.parallel = nn.ParameterDict({_key(n): nn.Parameter(p.clone()) for n, p in self.tuned.items()})
        self.learner.to(backbone.device)
        self.base.set_classnames(self.classnames)
        self.bank: dict[int, torch.Tensor] = {}
        self._class_cache: dict[tuple, torch.Tensor] = {}

    # --- the tuned model ---------------------------------------------------------------------------------------------
    def _base_record(self, meta: dict[str, Any], source: str) -> dict[str, Any]:
        name = str(meta.get("method"))
        if name in _REFUSED or name not in TEXT_METHODS + STUDENT_METHODS:
            raise DPCError(
                f"{source}: DPC cannot wrap a {name!r} checkpoint; it wraps {', '.join(TEXT_METHODS)} "
                f"and {', '.join(STUDENT_METHODS)}."
            )
        self.kind = "student" if name in STUDENT_METHODS else "text"
        recorded = dict(meta.get("base_checkpoint") or {})  # a DPC checkpoint being reloaded
        sha256 = recorded.get("sha256") or (_sha256(source) if Path(source).is_file() else None)
        return {"method": name, "sha256": sha256, "source": recorded.get("source", source), "config": meta}

    def _build_base(
        self, backbone: Backbone, tensors: dict[str, torch.Tensor], meta: dict[str, Any], source: str, features: Any
    ) -> Method:
        spec = meta.get("backbone") or {}
        if spec and not backbone.spec.same_identity(spec):
            raise DPCError(
                f"{source}: the tuned prompt was trained on {spec.get('model_name')} ({spec.get('pretrained')}) but "
                f"this run loads {backbone.spec.model_name} ({backbone.spec.pretrained}); run DPC with --model "
                f"{spec.get('model_name')} (and its --pretrained)."
            )
        cls = get_method(self.base_record["method"])
        classes = list(meta.get("classnames") or self.classnames)
        config = config_from(cls, meta.get("method_config"))
        if self.kind == "student":
            features = _student_features(meta, source, features)
            self.features_file = str(Path(features).resolve()) if isinstance(features, str | Path) else None
            method = cls(backbone, classes, config, features=features)
        else:
            method = cls(backbone, classes, config)
        method.load_trainable(tensors, source)
        method.eval()
        return method

    # --- prompts: the tuned P, the parallel P' and their mixtures ---------------------------------------------------
    def parallel_prompt(self) -> dict[str, torch.Tensor]:
        """P' = P + (M − P)/ω_b, from the trained base mixture M (with grad while training)."""
        w = self.trained_weight_base
        return {n: p + (self.learner.parallel[_key(n)] - p) / w for n, p in self._tuned_on_device().items()}

    def mixed_prompt(self, weight: float) -> dict[str, torch.Tensor]:
        """ω·P' + (1 − ω)·P."""
        tuned = self._tuned_on_device()
        return {n: weight * q + (1.0 - weight) * tuned[n] for n, q in self.parallel_prompt().items()}

    def _tuned_on_device(self) -> dict[str, torch.Tensor]:
        device = next(iter(self.learner.parallel.values())).device
        if next(iter(self.tuned.values())).device != device:
            self.tuned = {n: t.to(device) for n, t in self.tuned.items()}
        return self.tuned

    # --- features -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def frozen_features(self, images: torch.Tensor) -> torch.Tensor:
        """The image side, which DPC never changes: normalised prompted image features (text methods) or the
        student's prompted tower output before its projector (PromptKD)."""
        base = self.base
        if self.kind == "student":
            return base.image_encoder(images, base.learner.visual()).float()
        return base.image_features(images)

    def image_side(self, frozen: torch.Tensor, prompt: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.kind == "text":
            return frozen
        projector = self.base.learner.projector
        with torch.autocast(device_type=frozen.device.type, enabled=False):
            return F.normalize(functional_call(projector, prompt, (frozen.float(),)), dim=-1)

    def class_side(self, prompt: dict[str, torch.Tensor] | None) -> torch.Tensor:
        """Normalised class features [C, E] of the current classes under ``prompt`` (None: the tuned P)."""
        if self.kind == "student":
            return self.base.text_features
        assert isinstance(self.base, PromptedMethod)
        if prompt is None:
            return self.base._inference_text_features()
        return _text_features_with(self.base, prompt)

    def logit_scale(self) -> torch.Tensor:
        if self.kind == "student":
            return self.base.teacher_logit_scale
        return self.base.logit_scale()

    # --- training -------------------------------------------------------------------------------------------------
    def prepare(self, train_batches: Any, val_batches: Any) -> None:
        """The hard-negative bank: each training image's frozen features (one augmented view), by class."""
        rows: dict[int, list[torch.Tensor]] = {}
        for batch in train_batches():
            batch = batch.to(self.backbone.device)
            for feature, label in zip(self.frozen_features(batch.images), batch.labels.tolist()):
                rows.setdefault(int(label), []).append(feature.detach())
        self.bank = {label: torch.stack(found) for label, found in rows.items()}
        logger.info("dpc: hard-negative bank of %d images over %d classes", sum(map(len, rows.values())), len(rows))

    def hard_negatives(self, tuned_logits: torch.Tensor, labels: torch.Tensor) -> list[list[int]]:
        """Per image, the tuned model's top-K classes less the true one, none repeated in the widened batch."""
        k = min(self.config.hard_negatives, tuned_logits.shape[1])
        in_batch = set(labels.tolist())
        chosen: list[list[int]] = []
        for scores, label in zip(tuned_logits, labels.tolist()):
            ranked = [c for c in scores.topk(k).indices.tolist() if c != label][: k - 1]
            picked = [c for c in ranked if c not in in_batch and c in self.bank]
            in_batch.update(picked)
            if len(picked) < MIN_NEGATIVES:
                free = [c for c in self.bank if c not in in_batch]
                for index in torch.randperm(len(free)).tolist()[: MIN_NEGATIVES - len(picked)]:
                    picked.append(free[index])
                    in_batch.add(free[index])
            chosen.append(picked)
        return chosen

    def widened_batch(self, frozen: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each image followed by one bank image of each of its hard negatives: (features [N, ·], classes [N])."""
        if not self.bank:
            raise DPCError("dpc: the hard-negative bank is empty; prepare() runs before training.")
        tuned = cosine_logits(
            self.logit_scale(), self.image_side(frozen, self._tuned_on_device()), self.class_side(None)
        )
        features, classes = [], []
        for feature, label, negatives in zip(frozen, labels.tolist(), self.hard_negatives(tuned, labels)):
            features.append(feature[None])
            classes.append(label)
            for negative in negatives:
                stored = self.bank[negative]
                features.append(stored[int(torch.randint(len(stored), ()))][None].to(frozen.device))
                classes.append(negative)
        return torch.cat(features), torch.tensor(classes, device=frozen.device)

    def training_step(self, batch: Batch) -> StepOutput:
        if batch.labels is None:
            raise DPCError("dpc trains on labelled base-class images (labels is None).")
        with torch.no_grad():
            features, classes = self.widened_batch(self.frozen_features(batch.images), batch.labels)
        parallel = self.parallel_prompt()
        images = self.image_side(features, parallel)
        texts = self.class_side(parallel)[classes]
        logits = cosine_logits(self.logit_scale(), images, texts)
        target = torch.arange(len(classes), device=logits.device)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
        return StepOutput(loss, {"contrastive": float(loss.detach()), "widened": float(len(classes))})

    # --- inference ------------------------------------------------------------------------------------------------
    def is_base(self) -> torch.Tensor:
        trained = set(self.trained_classes)
        return torch.tensor([name in trained for name in self.classnames], device=self.backbone.device)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Class by class: base classes scored with ω_b·P' + (1−ω_b)·P, the others with ω_n·P' + (1−ω_n)·P."""
        frozen = self.frozen_features(images)
        base = self.is_base()
        scale = self.logit_scale()
        parts = []
        for weight, columns in ((self.config.weight_base, base), (self.config.weight_new, ~base)):
            if bool(columns.any()):
                prompt = self.mixed_prompt(weight)
                features = self.image_side(frozen, prompt)
                parts.append((columns, cosine_logits(scale, features, self._class_features(weight, prompt))))
        if len(parts) == 1:
            return parts[0][1]
        (base_columns, base_logits), (_, new_logits) = parts
        return torch.where(base_columns[None], base_logits, new_logits)

    def _class_features(self, weight: float, prompt: dict[str, torch.Tensor]) -> torch.Tensor:
        """Class features under a mixture, cached at inference (they do not depend on the images)."""
        if self.kind == "student" or torch.is_grad_enabled():
            return self.class_side(prompt)
        key = (weight, tuple(self.classnames), tuple((p.data_ptr(), p._version) for p in self.learner.parameters()))
        if key not in self._class_cache:  # entries of other class lists or older tensors are dropped
            self._class_cache = {k: v for k, v in self._class_cache.items() if k[1:] == key[1:]}
            self._class_cache[key] = self.class_side(prompt)
        return self._class_cache[key]

    def set_classnames(self, classnames: list[str]) -> None:
        self.base.set_classnames(list(classnames))
        super().set_classnames(classnames)

    def train(self, mode: bool = True) -> DPC:
        super().train(mode)
        self.base.eval()  # the tuned model is frozen, BatchNorm statistics included
        return self

    # --- checkpoints ----------------------------------------------------------------------------------------------
    def trainable_state(self) -> dict[str, torch.Tensor]:
        state = super().trainable_state()
        state.update({f"base.{k}": v for k, v in self.base_state.items()})
        return state

    def load_trainable(self, tensors: dict[str, torch.Tensor], source: str | Path) -> None:
        base = {k[5:]: v for k, v in tensors.items() if k.startswith("base.")}
        own = {k: v for k, v in tensors.items() if not k.startswith("base.")}
        load_trainable_state(self.learner, own, source)
        mine = self.base_state
        differ = sorted(k for k, v in base.items() if k in mine and not torch.equal(v.cpu(), mine[k].cpu()))
        if set(base) != set(mine) or differ:
            raise CheckpointError(
                f"{source}: its tuned prompt (base.*) is not the one this DPC wraps "
                f"({', '.join(differ[:4]) or 'other tensors'}); load it with DPC.from_checkpoint."
            )

    def checkpoint_config(self) -> dict[str, Any]:
        config = super().checkpoint_config()
        record = self.base_record
        config["base_checkpoint"] = {"method": record["method"], "sha256": record["sha256"], "source": record["source"]}
        config["base_config"] = record["config"]
        config["trained_weight_base"] = self.trained_weight_base
        if self.kind == "student":
            config["teacher"] = record["config"].get("teacher")
            config["teacher_features_file"] = self.features_file
        return config

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str | Path,
        features: Any = None,
        *,
        backbone: Backbone | None = None,
        classnames: Sequence[str] | None = None,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        weight_base: float | None = None,
        weight_new: float | None = None,
    ) -> DPC:
        """DPC for inference from its checkpoint alone (the tuned prompt is inside it); ``weight_base`` /
        ``weight_new`` replace the stored inference weights; ``features``: a PromptKD base's stored teacher features
        (default: the file it recorded, else ``teacher_features.safetensors`` beside the checkpoint)."""
        from promptkd.backbones import load_recorded_backbone

        tensors, meta = load_checkpoint(checkpoint)
        if meta.get("method") != cls.name:
            raise CheckpointError(f"{checkpoint}: a {meta.get('method')!r} checkpoint, not a dpc one.")
        raw = dict(meta.get("method_config") or {})
        raw.update({k: v for k, v in (("weight_base", weight_base), ("weight_new", weight_new)) if v is not None})
        raw["base"] = ""  # the tuned prompt is inside the checkpoint; its first file may be gone
        config = config_from(cls, raw)
        if backbone is None:
            backbone = load_recorded_backbone(meta.get("backbone") or {}, device=device, precision=precision)
        base_meta = {**meta["base_config"], "base_checkpoint": meta.get("base_checkpoint")}
        recorded = meta.get("teacher_features_file")
        beside = checkpoint_paths(checkpoint)[0].with_name("teacher_features.safetensors")
        if features is None and not beside.is_file() and recorded and Path(recorded).is_file():
            features = recorded  # the file the tuned student was distilled with (checked against its teacher)
        base_tensors = {k[5:]: v for k, v in tensors.items() if k.startswith("base.")}
        source = str(checkpoint_paths(checkpoint)[0])
        method = cls(
            backbone,
            list(meta.get("classnames") or []),
            config,
            base=(base_tensors, base_meta, source),
            features=features,
            trained_weight_base=meta.get("trained_weight_base"),
        )
        method.load(checkpoint)
        if classnames is not None:
            method.set_classnames(list(classnames))
        method.to(backbone.device)
        method.eval()
        return method

    def deployable(self) -> nn.Module:
        """A self-contained copy for export (PromptKD students only: text methods are not exported)."""
        if self.kind != "student":
            raise DPCError("export is for promptkd students; this DPC wraps a text prompt (use predict).")
        from promptkd.methods.promptkd import DeployableStudent

        base = self.base
        projectors = {}
        for weight in (self.config.weight_base, self.config.weight_new):
            projector = copy.deepcopy(base.learner.projector)
            with torch.no_grad():
                for name, value in self.mixed_prompt(weight).items():
                    projector.get_parameter(name).copy_(value)
            projectors[weight] = projector
        student = DeployableStudent(
            self.clip.visual,
            base.learner.visual().detach(),
            projectors[self.config.weight_base],
            base.text_features,
            float(base.stored.logit_scale),
            list(self.classnames),
        )
        return _MixedStudent(student, projectors[self.config.weight_new], self.is_base().cpu())

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, base={self.base_record['method']}, weights={self.config.weight_base}/"
            f"{self.config.weight_new}"
        )


class _MixedStudent(nn.Module):
    """A deployable PromptKD student whose new-class columns come from the ω_n projector."""

    def __init__(self, student: nn.Module, new_projector: nn.Module, is_base: torch.Tensor):
        super().__init__()
        self.student = student
        self.new_projector = new_projector.eval().requires_grad_(False)
        self.register_buffer("is_base", is_base.clone())
        self.classnames = student.classnames

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        s = self.student
        feature = s.encoder(images, s.prompts)
        with torch.autocast(device_type=feature.device.type, enabled=False):
            base = F.normalize(s.projector(feature.float()), dim=-1)
            new = F.normalize(self.new_projector(feature.float()), dim=-1)
            logits_base = s.logit_scale * base @ s.text_features.t()
            logits_new = s.logit_scale * new @ s.text_features.t()
        return torch.where(self.is_base[None], logits_base, logits_new)


def _key(name: str) -> str:
    return name.replace(".", "__")


def _sha256(path: str | Path) -> str:
    from promptkd.backbones.files import sha256_of

    return sha256_of(path)


def _text_features_with(method: PromptedMethod, prompt: dict[str, torch.Tensor]) -> torch.Tensor:
    """The method's class text features with its text-prompt tensors replaced by ``prompt`` (grad flows to it)."""
    return functional_call(_TextTower(method), {f"method.learner.text.{n}": t for n, t in prompt.items()}, ())


class _TextTower(nn.Module):
    """A view whose forward is the method's text features, so ``functional_call`` can swap its prompt tensors."""

    def __init__(self, method: PromptedMethod):
        super().__init__()
        self.method = method

    def forward(self) -> torch.Tensor:
        return self.method.text_features()


def _student_features(meta: dict[str, Any], source: str, features: Any) -> Any:
    """A PromptKD base's stored teacher features: given, else the recorded file, else beside the checkpoint."""
    if features is not None:
        return features
    recorded = (meta.get("method_config") or {}).get("teacher_features")
    if recorded and Path(recorded).is_file():
        return recorded
    beside = Path(source).with_name("teacher_features.safetensors")
    if beside.is_file():
        return beside
    raise DPCError(
        f"{source}: a promptkd student needs its teacher's stored features; none recorded or beside it "
        "(give features=..., or put teacher_features.safetensors beside the checkpoint)."
    )
