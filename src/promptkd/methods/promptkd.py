"""PromptKD stage II: unsupervised prompt distillation (Li et al., "PromptKD: Unsupervised Prompt Distillation for
Vision-Language Models", CVPR 2024, arXiv 2403.02781; zhengli97/PromptKD ``trainers/promptkd.py``).

The student is a CLIP **image** encoder with deep visual prompts (n_v tokens, depth J; VPT-deep rule of §4.1 in
algorithms.md) and a projector P from the student's embedding (d_s) to the teacher's (d_t). Its classifier is the
teacher's pre-stored text features T_t (paper Alg. 1; :mod:`promptkd.distill.teacher`):

    z_s = s_t · n(P(g(x))) · n(T_t)ᵀ            (student, paper Eq. 2; s_t = the teacher's frozen logit scale)
    z_t = s_t · n(f_t(x)) · n(T_t)ᵀ             (teacher, no grad, on the SAME augmented view)
    L   = w · τ² · KL(σ(z_t/τ) ‖ σ(z_s/τ)) / N  (paper Eq. 3)

- P (``projector``): ``mlp`` = Linear(d_s→d_t) → BatchNorm1d(d_t) → ReLU → Linear(d_t→d_t), the reference's
  ``Feature_Trans_Module_two_layer`` (Conv1×1 → BN → ReLU → Conv1×1 on [B, d, 1, 1], which is the same map);
  ``linear`` = one Linear(d_s→d_t) (paper Table 12, "1 layer"). Computed in float32 (autocast off).
- ``kd_normalization``: ``batch`` (default) divides the class-summed KL by B — the paper's KL, a mean over samples;
  ``logits`` divides by B·C as the reference code does (``F.kl_div(..., reduction="sum") / output.numel()``).
- ``kd_weight`` (w): 1 by default, as the paper's Eq. 3 has no weight. The reference scripts pass ``KD_WEIGHT 1000``
  (200 for aircraft, flowers, DTD) together with the B·C normalisation, i.e. a per-sample weight of 1000/C; the
  reference-named presets reproduce that (pitfall 10: the weight lived only in the scripts).
- s_t: the teacher's scale (the reference multiplies by the student CLIP's own scale; both are 100 for OpenAI
  weights, and with differing scales the teacher's makes both logits live on the same range).
- No label is read in training (``uses_labels = False``); the text encoders never run in training or inference
  (pitfall 1: the reference re-encoded all C classes with the ViT-L text tower every step and test batch).
- ``mode``: ``transductive`` (the paper: unlabelled images of all classes, logits over all classes) or
  ``inductive`` (base-class images, logits over the base classes); the run's class list decides the logits, the
  mode is recorded in the config and results.

Trainable: ``visual.prompts`` [J, n_v, W_s] + ``projector.*`` (+ BN statistics); 27,648 + 986,112 on ViT-B/16 → L/14.
Inference needs only the student backbone, its checkpoint and the stored features (:meth:`PromptKD.from_checkpoint`,
:meth:`PromptKD.deployable`); the teacher is attached for training only.
"""

from __future__ import annotations

import copy
import logging
import types
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from promptkd.backbones import Backbone
from promptkd.checkpoints import CheckpointError, load_checkpoint, load_trainable_state, trainable_state
from promptkd.distill.teacher import Teacher, TeacherError, TeacherFeatures, TeacherInput, load_teacher
from promptkd.errors import PromptKDError
from promptkd.methods import MethodConfig, register_method
from promptkd.methods.base import Batch, Method, StepOutput
from promptkd.methods.prompted import PromptConfigError, check_depth, cosine_logits
from promptkd.prompts import PromptedImageEncoder, VisualPrompts

__all__ = ["DeployableStudent", "Projector", "PromptKD", "PromptKDConfig", "StudentKDConfig", "kd_loss"]

logger = logging.getLogger(__name__)


@dataclass
class StudentKDConfig(MethodConfig):
    """What every distilled student shares: projector, KD loss, mode and the teacher (paper defaults)."""

    projector: Literal["mlp", "linear"] = field(
        default="mlp", metadata={"help": "mlp = Linear-BN-ReLU-Linear (paper); linear = one Linear (Table 12)"}
    )
    temperature: float = field(default=1.0, metadata={"help": "KD temperature τ (TEMPERATURE)"})
    kd_weight: float = field(default=1.0, metadata={"help": "w of the KD loss; paper 1, reference scripts 1000"})
    kd_normalization: Literal["batch", "logits"] = field(
        default="batch", metadata={"help": "divide the summed KL by B (paper) or by B·C (reference code)"}
    )
    mode: Literal["transductive", "inductive"] = field(
        default="transductive", metadata={"help": "unlabelled images of all classes, or of the base classes only"}
    )
    teacher_checkpoint: str = field(default="", metadata={"help": "promptkd checkpoint of the teacher (any method)"})
    teacher_model: str = field(default="", metadata={"help": "override the teacher backbone name of its checkpoint"})
    teacher_pretrained: str = field(default="", metadata={"help": "override the teacher weights (tag or file)"})
    teacher_features: str = field(default="", metadata={"help": "stored teacher features file (.safetensors)"})

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError("temperature must be positive")
        if self.kd_weight <= 0:
            raise ValueError("kd_weight must be positive")


@dataclass
class PromptKDConfig(StudentKDConfig):
    """PromptKD stage-II hyper-parameters; defaults follow the paper (see the module docstring for the reference).
    ``lora_rank`` and ``unfreeze_blocks`` go beyond the paper: they also train the student tower itself."""

    n_ctx_vision: int = field(default=4, metadata={"help": "visual prompt tokens n_v (N_CTX_VISION)"})
    vision_depth: int = field(
        default=9, metadata={"help": "prompted student blocks J (PROMPT_DEPTH_VISION: 9 base2new, 3 cross-dataset)"}
    )
    init_std: float = field(default=0.02, metadata={"help": "std of the N(0, std²) prompt init"})
    lora_rank: int = field(default=0, metadata={"help": "LoRA rank on the student's attention (0: none; needs peft)"})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA scale numerator (scale = alpha / rank)"})
    unfreeze_blocks: int = field(default=0, metadata={"help": "train the student's last N blocks too (0: frozen)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_ctx_vision < 1 or self.vision_depth < 1:
            raise ValueError("n_ctx_vision and vision_depth must be at least 1")
        if self.init_std <= 0:
            raise ValueError("init_std must be positive")
        if self.lora_rank < 0 or self.unfreeze_blocks < 0:
            raise ValueError("lora_rank and unfreeze_blocks must be >= 0")


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    normalization: Literal["batch", "logits"] = "batch",
    weight: float = 1.0,
) -> torch.Tensor:
    """w · τ² · Σ_{b,c} p_t (log p_t − log p_s) / N with p = softmax(z/τ); N = B (``batch``) or B·C (``logits``).

    Forward KL with the teacher as target (paper Eq. 3); computed in float32.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"logit shapes differ: student {tuple(student_logits.shape)}, teacher {teacher_logits.shape}")
    if normalization not in ("batch", "logits"):
        raise ValueError(f"kd normalization must be 'batch' or 'logits', not {normalization!r}")
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        log_ps = F.log_softmax(student_logits.float() / temperature, dim=-1)
        log_pt = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
        summed = F.kl_div(log_ps, log_pt, reduction="sum", log_target=True)
        denominator = student_logits.shape[0] * (student_logits.shape[1] if normalization == "logits" else 1)
        return weight * temperature**2 * summed / denominator


class Projector(nn.Module):
    """P: student embedding d_s → teacher embedding d_t (``fc1``, ``bn``, ReLU, ``fc2``; or ``fc1`` alone)."""

    def __init__(self, d_in: int, d_out: int, kind: Literal["mlp", "linear"] = "mlp"):
        super().__init__()
        self.kind = kind
        self.fc1 = nn.Linear(d_in, d_out)
        if kind == "mlp":
            self.bn = nn.BatchNorm1d(d_out)
            self.fc2 = nn.Linear(d_out, d_out)
        elif kind != "linear":
            raise ValueError(f"projector must be 'mlp' or 'linear', not {kind!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind != "mlp":
            return self.fc1(x)
        # The BatchNorm after fc1 cancels fc1's bias in training, so the bias's exact gradient is 0; autograd's is
        # rounding noise, which AdamW would turn into lr-sized steps that differ between runs on 1 and 2 processes.
        # ``0 * bias`` gives it the exact gradient (and keeps it in DDP's graph); its value still enters the
        # running mean, as in the reference. Inference (and export) sees plain fc1.
        bias = self.fc1.bias
        x = F.linear(x, self.fc1.weight, bias.detach()) + 0.0 * bias if self.training else self.fc1(x)
        return self.fc2(F.relu(self.bn(x)))


def add_lora(module: nn.Module, rank: int, alpha: float) -> None:
    """LoRA (rank r, scale alpha/r) on every attention of a CLIP image tower, through peft (in place)."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as error:
        raise PromptKDError("LoRA students need peft: pip install 'promptkd[lora]'") from error
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=["attn"], lora_dropout=0.0)
    inject_adapter_in_model(config, module)


def merge_lora(module: nn.Module) -> nn.Module:
    """Fold peft's LoRA adapters into the attention weights and drop the wrappers (for export); in place."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # no peft, so no adapters to fold
        return module
    for block in getattr(getattr(module, "transformer", None), "resblocks", []):
        attn = block.attn
        if isinstance(attn, BaseTunerLayer):
            attn.merge()
            attn = attn.get_base_layer()
            if isinstance(attn.out_proj, BaseTunerLayer):
                if not attn.out_proj.merged:
                    attn.out_proj.merge()
                attn.out_proj = attn.out_proj.get_base_layer()
            block.attn = attn
    return module


def _features_from(value: TeacherFeatures | str | Path) -> TeacherFeatures:
    return value if isinstance(value, TeacherFeatures) else TeacherFeatures.load(value)


@register_method
class PromptKD(Method):
    """The PromptKD student (see the module docstring): ``learner.visual`` prompts + ``learner.projector``.

    Construct with stored ``features`` (a :class:`TeacherFeatures` or its file) and, for training, a ``teacher``
    (:class:`~promptkd.distill.teacher.Teacher`); without them the config's ``teacher_features`` and
    ``teacher_checkpoint`` are used (the teacher is then loaded at ``prepare``, right before training, unless it is
    needed to compute the features). The stored features may cover more classes than ``classnames`` (e.g. base and
    novel): the current class list selects its rows.
    """

    name: ClassVar[str] = "promptkd"
    config_class: ClassVar[type[MethodConfig]] = PromptKDConfig
    uses_labels: ClassVar[bool] = False
    config: PromptKDConfig

    def __init__(
        self,
        backbone: Backbone,
        classnames: list[str],
        config: PromptKDConfig | None = None,
        *,
        features: TeacherFeatures | str | Path | None = None,
        teacher: Teacher | None = None,
    ):
        super().__init__(backbone, classnames, config)
        cfg = self.config
        self.teacher: Teacher | None = None
        self._teacher_input: TeacherInput | None = None
        self.cache: Any | None = None  # a TeacherCache while training from stored views
        self.check_student()
        if features is None and cfg.teacher_features:
            features = cfg.teacher_features
        if features is not None:
            stored = _features_from(features)
        else:
            if teacher is None:
                teacher = self._load_configured_teacher()
            stored = teacher.compute_features(self.classnames)  # once, after the teacher's prompts were loaded
        self.stored = stored
        self.register_buffer("all_text_features", stored.features.float().to(backbone.device), persistent=False)
        rows = stored.rows(self.classnames).float().to(backbone.device)
        self.register_buffer("text_features", rows, persistent=False)
        self.register_buffer(
            "teacher_logit_scale", torch.tensor(float(stored.logit_scale), device=backbone.device), persistent=False
        )
        self.build_student()
        self.learner.projector = Projector(self.student_dim, stored.embed_dim, cfg.projector)
        self.learner.to(backbone.device)
        if teacher is not None:
            self.attach_teacher(teacher)

    # --- the student (a subclass may use another image model) --------------------------------------------------------
    def check_student(self) -> None:
        """Refuse a student this method cannot prompt, before the teacher's features are computed."""
        cfg = self.config
        self.image_encoder = PromptedImageEncoder(self.backbone.model)  # a view of the frozen student tower
        # UnsupportedModelError above for towers without prompts (ResNet)
        check_depth(self.name, "vision_depth", cfg.vision_depth, self.image_encoder.n_blocks, "image", self.backbone)
        if cfg.unfreeze_blocks > self.image_encoder.n_blocks:
            raise PromptConfigError(
                f"promptkd: unfreeze_blocks={cfg.unfreeze_blocks}, but the student has "
                f"{self.image_encoder.n_blocks} blocks."
            )

    def build_student(self) -> None:
        """The paper's visual prompts, plus LoRA on the attention and/or the last blocks unfrozen when asked."""
        cfg = self.config
        self.learner.visual = VisualPrompts(
            cfg.n_ctx_vision, cfg.vision_depth, self.image_encoder.width, init_std=cfg.init_std
        )
        visual = self.backbone.model.visual
        if cfg.lora_rank:  # first: peft marks everything but its adapters as frozen
            add_lora(visual, cfg.lora_rank, cfg.lora_alpha)
        if cfg.unfreeze_blocks:
            for block in list(visual.transformer.resblocks)[-cfg.unfreeze_blocks :]:
                block.requires_grad_(True)
            for module in (getattr(visual, "ln_post", None),):
                if module is not None:
                    module.requires_grad_(True)
            if isinstance(getattr(visual, "proj", None), nn.Parameter):
                visual.proj.requires_grad_(True)
        self.student_dim = self.backbone.embed_dim

    def student_modules(self) -> dict[str, nn.Module]:
        """Backbone modules whose trainable tensors the checkpoint holds (``student.*`` keys)."""
        return {"student": self.backbone.model.visual}

    def trainable_parameters(self) -> list[nn.Parameter]:
        extra = [p for m in self.student_modules().values() for p in m.parameters() if p.requires_grad]
        return [*super().trainable_parameters(), *extra]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        state = super().trainable_state()
        for prefix, module in self.student_modules().items():
            state.update({f"{prefix}.{k}": v for k, v in trainable_state(module).items()})
        return state

    def load_trainable(self, tensors: dict[str, torch.Tensor], source: str | Path) -> None:
        prefixes = tuple(f"{p}." for p in self.student_modules())
        super().load_trainable({k: v for k, v in tensors.items() if not k.startswith(prefixes)}, source)
        for prefix, module in self.student_modules().items():
            part = {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
            load_trainable_state(module, part, source)

    # --- teacher -----------------------------------------------------------------------------------------------------
    def _load_configured_teacher(self) -> Teacher:
        cfg = self.config
        if not cfg.teacher_checkpoint:
            raise PromptKDError(
                "promptkd needs the teacher's stored text features (method.teacher_features, or features=...) for "
                "inference, and a teacher (method.teacher_checkpoint, or teacher=...) for training."
            )
        return load_teacher(
            cfg.teacher_checkpoint,
            model=cfg.teacher_model or None,
            pretrained=cfg.teacher_pretrained or None,
            device=self.backbone.device,
            precision=self.backbone.precision,
        )

    def attach_teacher(self, teacher: Teacher) -> None:
        """Attach the (frozen) teacher for training; refuses a teacher other than the stored features' one."""
        self.stored.check(teacher=teacher.identity)
        if teacher.embed_dim != self.stored.embed_dim:
            raise TeacherError(
                f"teacher embedding {teacher.embed_dim} differs from the stored features' {self.stored.embed_dim}"
            )
        self.teacher = teacher.to(self.backbone.device)
        self._teacher_input = TeacherInput(self.backbone.preprocess, teacher.preprocess)
        logger.info("promptkd: %s", self._teacher_input.describe())

    def detach_teacher(self) -> None:
        """Drop the teacher (after training); inference never needs it."""
        self.teacher = None
        self._teacher_input = None

    def prepare(self, train_batches: Any, val_batches: Any) -> None:
        if self.teacher is None:
            self.attach_teacher(self._load_configured_teacher())

    def train(self, mode: bool = True) -> PromptKD:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    # --- student -----------------------------------------------------------------------------------------------------
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """n(P(g(x))) [B, d_t], float32: prompted student image feature, projected to the teacher's space."""
        feature = self.image_encoder(images, self.learner.visual())
        projector = self.learner.projector
        if projector.training and feature.shape[0] < 2 and hasattr(projector, "bn"):
            raise PromptKDError("the projector's BatchNorm needs training batches of at least 2 images")
        with torch.autocast(device_type=feature.device.type, enabled=False):
            return F.normalize(projector(feature.float()), dim=-1)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """z_s = s_t · n(P(g(x))) · n(T_t)ᵀ over the current classes (stored features; no text encoder)."""
        return cosine_logits(self.teacher_logit_scale, self.image_features(images), self.text_features)

    def teacher_logits(self, images: torch.Tensor, keys: Sequence[str] | None = None) -> torch.Tensor:
        """z_t on the student's batch (converted to the teacher's input format), no grad. With a teacher cache and
        the views' ``keys``, stored logits are read and only the views not stored yet run the teacher (and are
        stored)."""
        cache = self.cache if keys is not None else None
        if cache is not None:
            found, cached = cache.get(keys)
            if bool(found.all()):
                return cached.to(images.device)
        if self.teacher is None or self._teacher_input is None:
            raise PromptKDError(
                "promptkd training needs the teacher: attach_teacher(), or set method.teacher_checkpoint."
            )
        with torch.no_grad():
            if cache is None:
                return self.teacher.logits(
                    self._teacher_input(images), self.text_features, float(self.stored.logit_scale)
                )
            missing = (~found).nonzero().flatten()
            live = self.teacher.logits(
                self._teacher_input(images[missing.to(images.device)]),
                self.text_features,
                float(self.stored.logit_scale),
            )
            cache.put([keys[int(i)] for i in missing], live)
            cached = cached.to(images.device)
            cached[missing.to(images.device)] = cache.as_stored(live).to(images.device)
            return cached

    def attach_cache(self, cache: Any | None) -> None:
        """Read and write the teacher's logits through a :class:`~promptkd.distill.cache.TeacherCache` (training)."""
        self.cache = cache

    def training_step(self, batch: Batch) -> StepOutput:
        """One distillation step on ``batch.images``; ``batch.labels`` is never read."""
        cfg = self.config
        teacher_logits = self.teacher_logits(batch.images, batch.keys)
        student_logits = self.logits(batch.images)
        loss = kd_loss(student_logits, teacher_logits, cfg.temperature, cfg.kd_normalization, cfg.kd_weight)
        with torch.no_grad():
            agree = (student_logits.argmax(-1) == teacher_logits.argmax(-1)).float().mean()
        return StepOutput(loss, {"kd": float(loss.detach()), "agreement": float(agree)})

    def set_classnames(self, classnames: list[str]) -> None:
        """Score another class list: its rows of the stored features (refused for classes not stored)."""
        rows = self.stored.rows(classnames)
        super().set_classnames(classnames)
        self.text_features = rows.float().to(self.all_text_features.device)

    # --- checkpoints and deployment ----------------------------------------------------------------------------------
    def checkpoint_config(self) -> dict[str, Any]:
        config = super().checkpoint_config()
        config["teacher"] = dict(self.stored.teacher)
        config["teacher_features"] = {
            "classnames_sha256": self.stored.classnames_sha256,
            "num_classes": len(self.stored.classnames),
            "embed_dim": self.stored.embed_dim,
            "logit_scale": float(self.stored.logit_scale),
        }
        config["mode"] = self.config.mode
        return config

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str | Path,
        features: TeacherFeatures | str | Path | None = None,
        *,
        backbone: Backbone | None = None,
        classnames: Sequence[str] | None = None,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
    ) -> PromptKD:
        """A student for inference from its checkpoint and the stored features alone (no teacher is loaded).

        ``features`` defaults to the file the checkpoint's config names, else ``teacher_features.safetensors`` beside
        the checkpoint; it must come from the teacher the student was distilled from (checked). ``backbone``
        defaults to the one the checkpoint records; ``classnames`` to the checkpoint's class list, or to the whole
        stored list when the features were extended since distillation (``promptkd features extend``).
        """
        from promptkd.backbones import load_recorded_backbone
        from promptkd.checkpoints import checkpoint_paths
        from promptkd.methods.base import config_from

        _, meta = load_checkpoint(checkpoint)
        if meta.get("method") != cls.name:
            raise CheckpointError(f"{checkpoint}: a {meta.get('method')!r} checkpoint, not a promptkd student.")
        method_config = dict(meta.get("method_config") or {})
        if features is None:
            beside = checkpoint_paths(checkpoint)[0].with_name("teacher_features.safetensors")
            recorded_file = method_config.get("teacher_features")
            features = recorded_file if recorded_file and Path(recorded_file).is_file() else beside
        stored = _features_from(features)
        recorded = meta.get("teacher")
        if recorded:
            stored.check(teacher=recorded)
        if backbone is None:
            backbone = load_recorded_backbone(meta.get("backbone") or {}, device=device, precision=precision)
        config = config_from(cls, method_config)
        trained = list(meta.get("classnames") or stored.classnames)
        recorded_hash = (meta.get("teacher_features") or {}).get("classnames_sha256")
        if classnames is not None:
            names = list(classnames)
        elif recorded_hash and recorded_hash != stored.classnames_sha256 and stored.extends(recorded_hash):
            names = list(stored.classnames)  # classes added after distillation (promptkd features extend)
        else:
            names = trained
        method = cls(backbone, names, config, features=stored)
        method.load(checkpoint, check_classnames=False)
        method.eval()
        return method

    def deployable(self) -> DeployableStudent:
        """A self-contained copy for inference/export: prompted image tower + projector + stored features."""
        return DeployableStudent(
            self.clip.visual,
            self.learner.visual().detach(),
            self.learner.projector,
            self.text_features,
            float(self.stored.logit_scale),
            list(self.classnames),
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mode={self.config.mode}, teacher={'attached' if self.teacher else 'none'}"


class DeployableStudent(nn.Module):
    """forward(images [B, 3, H, W]) → logits [B, C]: s_t · n(P(g(x; prompts))) · n(T_t)ᵀ; eval mode, no grad.

    Holds copies (not views) of the student's image tower, prompts, projector and the stored class features, so it
    can be traced (``torch.jit.trace``) or exported without the method, the text towers or the teacher. LoRA adapters
    are folded into the weights. With ``prompts=None`` the tower is any image model called as ``visual(images)``.
    """

    def __init__(
        self,
        visual: nn.Module,
        prompts: torch.Tensor | None,
        projector: nn.Module,
        text_features: torch.Tensor,
        logit_scale: float,
        classnames: list[str],
    ):
        super().__init__()
        tower = merge_lora(copy.deepcopy(visual))
        self.prompted = prompts is not None
        self.encoder = PromptedImageEncoder(types.SimpleNamespace(visual=tower)) if self.prompted else tower
        self.projector = copy.deepcopy(projector)
        self.register_buffer("prompts", prompts.detach().clone().float() if prompts is not None else torch.zeros(0))
        self.register_buffer("text_features", F.normalize(text_features.detach().float().clone(), dim=-1))
        self.register_buffer("logit_scale", torch.tensor(float(logit_scale)))
        self.classnames = list(classnames)
        self.requires_grad_(False)
        self.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        feature = self.encoder(images, self.prompts) if self.prompted else self.encoder(images)
        with torch.autocast(device_type=feature.device.type, enabled=False):
            projected = F.normalize(self.projector(feature.float()), dim=-1)
            return self.logit_scale * projected @ self.text_features.t()
