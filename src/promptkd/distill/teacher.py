"""PromptKD stage I artefacts: the teacher and its pre-stored class text features (Li et al., CVPR 2024, Alg. 1).

A teacher is any registered method whose classifier is CLIP's rule ``z_t = s_t · n(f_t(x)) · n(T_t)ᵀ`` with class
text features ``T_t`` that do not depend on the image: zero-shot CLIP, CoOp, IVLP, MaPLe, PromptSRC, VPT-deep, VP and
CLIP-Adapter. CoCoOp (image-conditioned prompts) and Tip-Adapter (cache logits) do not fit and are refused.

:func:`load_teacher` rebuilds the teacher from a promptkd checkpoint of any of those methods (native or made by
``promptkd convert`` from the reference code) with the backbone its JSON names, loads the prompts **strictly**
(pitfall 3: the reference used ``strict=False`` and a hard-coded depth 9), freezes it and keeps it in eval mode.

:class:`TeacherFeatures` holds ``T_t`` [C, E_t] (L2-normalised, float32) and ``s_t``, bound to the class list
(hash), the teacher's identity (method, method config, backbone spec) and the sha256 of the teacher's prompt file.
They are computed **once, after** the teacher's prompts are loaded; computing them from untrained prompts cost the
reference ImageNet 79.1/73.6 → 75.2/70.8 (PromptKD issue #33), so :meth:`Teacher.compute_features` refuses a
teacher whose prompts were not loaded. The reference recomputes ``T_t`` with the ViT-L text encoder at every training
step and every test batch (pitfall 1, issue #28); here training and inference only read the stored file.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from promptkd.backbones import Backbone, PreprocessInfo
from promptkd.checkpoints import (
    CheckpointError,
    atomic_path,
    atomic_write_text,
    checkpoint_paths,
    classnames_hash,
    file_sha256,
)
from promptkd.config import to_dict
from promptkd.errors import PromptKDError

__all__ = [
    "FEATURES_FORMAT",
    "TEACHER_METHODS",
    "Teacher",
    "TeacherError",
    "TeacherFeatures",
    "TeacherInput",
    "build_teacher",
    "converted_method_config",
    "file_sha256",
    "load_teacher",
    "same_teacher",
    "state_sha256",
    "teacher_description",
    "teacher_differences",
    "teacher_identity",
    "zero_shot_teacher",
]

logger = logging.getLogger(__name__)

FEATURES_FORMAT = "promptkd-teacher-features"
FEATURES_VERSION = 1

#: Methods that can teach: their logits are s · n(f(x)) · n(T)ᵀ with image-independent class features T.
TEACHER_METHODS = ("zeroshot", "coop", "ivlp", "maple", "promptsrc", "vpt", "vp", "clip_adapter")
_REFUSED = {
    "cocoop": "its class prompts depend on each image (meta-net), so no class features can be pre-stored",
    "tip_adapter": "its logits add a cache-model term to the CLIP classifier",
    "tip_adapter_f": "its logits add a cache-model term to the CLIP classifier",
    "promptkd": "a PromptKD student has no text features of its own (it reuses its teacher's)",
    "promptkd_timm": "a distilled student has no text features of its own (it reuses its teacher's)",
}
#: how identities are recorded: 2 = by content (weight and checkpoint hashes; paths only under ``about``)
IDENTITY_VERSION = 2


class TeacherError(PromptKDError, ValueError):
    """A teacher or a stored-features file that cannot be used for this run; the message names both sides."""


def state_sha256(module: nn.Module) -> str:
    """SHA-256 of a module's state (names, dtypes, shapes, bytes): the content of weights that have no file of
    their own (an open_clip tag's, or random weights)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        data = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{data.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(memoryview(data.view(torch.uint8).numpy()) if data.numel() else b"")
    return digest.hexdigest()


def _folder_sha256(folder: Path) -> str:
    """A local-dir model: the hashes of every file in its folder (config, weights, tokenizer files)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        digest.update(f"{path.name}:{file_sha256(path)}\n".encode())
    return digest.hexdigest()


def _sidecar_settings(path: Path) -> str:
    """The settings a config next to a weight file gives the loader (architecture, preprocessing), as the loader
    finds it; the rest of such a file (a provenance record) does not change the teacher."""
    for sidecar in (path.with_suffix(".json"), path.parent / "open_clip_config.json"):
        try:
            data = json.loads(sidecar.read_text(encoding="utf-8")) if sidecar.is_file() else None
        except (OSError, ValueError):
            data = None
        if isinstance(data, dict) and "model_cfg" in data:
            used = {k: data.get(k) for k in ("model_cfg", "preprocess_cfg")}
            return json.dumps(used, sort_keys=True, default=str)
    return ""


def _weights(backbone: Backbone) -> tuple[str, str, dict[str, Any]]:
    """(architecture name, sha256 of the weights' content, what is only information) of a loaded backbone."""
    from promptkd.backbones.weights import shipped_weights

    spec = backbone.spec
    name, about = spec.model_name, {"weights": spec.pretrained, "weights_source": spec.source}
    if spec.source == "local-dir":
        folder = Path(name.split(":", 1)[1]).expanduser()
        return "local-dir", _folder_sha256(folder), {**about, "folder": str(folder)}
    if spec.source == "file":
        path = shipped_weights(name) if spec.pretrained == "shipped" else spec.pretrained
        digest = hashlib.sha256(file_sha256(str(path)).encode())
        digest.update(_sidecar_settings(Path(str(path))).encode())
        return ("file" if name.startswith("file:") else name), digest.hexdigest(), {**about, "path": str(path)}
    return name, state_sha256(backbone.model), about  # a tag's weights, or random ones: their loaded content


def teacher_identity(
    method: nn.Module, backbone: Backbone, checkpoint: str | Path | None = None, *, seed: int | None = None
) -> dict[str, Any]:
    """A teacher's identity by content, the one record the teacher cache, stored features and ``features extend``
    compare: method and its config, sha256 of the prompt checkpoint, and the backbone's architecture, activation and
    weights (sha256 of the weight file, of a local-dir folder's files, or of the loaded state for a tag or random
    weights). Paths, tags and the seed that drew random weights are kept under ``about`` and never compared: the
    same teacher named by a relative or absolute path, or moved to another machine, is the same teacher."""
    name, weights, about = _weights(backbone)
    if backbone.spec.source == "random":
        about["seed"] = seed
    if checkpoint is not None:
        about["checkpoint"] = str(checkpoint)
    return {
        "identity_version": IDENTITY_VERSION,
        "method": getattr(method, "name", type(method).__name__),
        "method_config": to_dict(method.config),
        "checkpoint_sha256": file_sha256(checkpoint) if checkpoint is not None else None,
        "backbone": {"model_name": name, "quick_gelu": bool(backbone.spec.quick_gelu), "weights_sha256": weights},
        "about": about,
    }


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted fields of an identity (nested dicts flattened), leaving out ``about`` (information only)."""
    if not isinstance(value, dict):
        return {prefix: value}
    out: dict[str, Any] = {}
    for key, item in value.items():
        if not prefix and key == "about":
            continue
        out.update(_flat(item, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _short(value: Any) -> str:
    if isinstance(value, str) and len(value) == 64:  # a sha256
        return value[:12] + "..."
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def teacher_differences(a: dict[str, Any] | None, b: dict[str, Any] | None) -> list[str]:
    """What differs between two teacher identities, one phrase per field (``backbone.weights_sha256: 3f2a... vs
    9b1c...``); empty when they name the same teacher. Every field is compared except ``about`` (paths, tags,
    the seed that drew random weights): same content, same teacher."""
    a, b = a or {}, b or {}
    if a.get("identity_version") != b.get("identity_version"):
        old = a if a.get("identity_version") != IDENTITY_VERSION else b
        return [
            f"identity_version: {old.get('identity_version') or 1} vs {IDENTITY_VERSION} (recorded by an older "
            "promptkd, by paths rather than content)"
        ]
    fa, fb = (_flat(json.loads(json.dumps(x, default=str))) for x in (a, b))  # as stored: tuples read as lists
    differ = sorted(k for k in {*fa, *fb} if fa.get(k) != fb.get(k))
    return [f"{k}: {_short(fa.get(k))} vs {_short(fb.get(k))}" for k in differ]


def same_teacher(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    """True when two identities name the same teacher by content (see :func:`teacher_identity`)."""
    return bool(a) and bool(b) and not teacher_differences(a, b)


def teacher_description(identity: dict[str, Any] | None) -> str:
    """One line naming a teacher: method, backbone, weights and prompt-file hashes."""
    if not identity:
        return "an unknown teacher"
    bb = identity.get("backbone") or {}
    weights = bb.get("weights_sha256") or bb.get("file_sha256") or bb.get("pretrained") or "unknown weights"
    weights = f"weights sha256 {weights[:12]}" if isinstance(weights, str) and len(weights) == 64 else weights
    sha = identity.get("checkpoint_sha256")
    return f"{identity.get('method')} on {bb.get('model_name')} ({weights}), " + (
        f"prompts sha256 {sha[:12]}" if sha else "no prompt checkpoint"
    )


def duplicate_names(classnames: Sequence[str]) -> dict[str, int]:
    """Names used more than once, with their counts (empty for a list of distinct names)."""
    counts: dict[str, int] = {}
    for name in classnames:
        counts[name] = counts.get(name, 0) + 1
    return {name: count for name, count in counts.items() if count > 1}


# --- stored features ------------------------------------------------------------------------------------------------
@dataclass
class TeacherFeatures:
    """The teacher's class text features n(T_t) [C, E_t] (float32) and logit scale s_t, bound to classes and teacher."""

    features: torch.Tensor
    logit_scale: float
    classnames: list[str]
    teacher: dict[str, Any] = field(default_factory=dict)
    source: str = "<memory>"
    #: one record per `extend`: rows added, class-list hash before, the teacher that computed them
    extensions: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.features.dim() != 2 or self.features.shape[0] != len(self.classnames):
            raise TeacherError(
                f"{self.source}: teacher features of shape {tuple(self.features.shape)} for "
                f"{len(self.classnames)} classes; expected [C, E] with one row per class."
            )
        repeated = duplicate_names(self.classnames)
        if repeated:  # real lists have them (ImageNet's CLIP names: 'missile', 'sunglasses'); rows go by position
            logger.warning(
                "%s: the class list repeats %s; rows are addressed by position (a repeated name's k-th use in a "
                "subset reads its k-th stored row)",
                self.source,
                ", ".join(f"{name!r} ({count}x)" for name, count in repeated.items()),
            )

    @property
    def embed_dim(self) -> int:
        return int(self.features.shape[1])

    @property
    def classnames_sha256(self) -> str:
        return classnames_hash(self.classnames)

    def rows(self, classnames: Sequence[str]) -> torch.Tensor:
        """The rows of ``classnames`` (a subset of the stored classes, any order), e.g. base or novel classes."""
        classnames = list(classnames)
        if classnames == self.classnames:
            return self.features
        index: dict[str, list[int]] = {}
        for i, name in enumerate(self.classnames):
            index.setdefault(name, []).append(i)
        missing = [c for c in classnames if c not in index]
        if missing:
            raise TeacherError(
                f"{self.source}: no stored teacher features for {len(missing)} classes "
                f"({', '.join(map(repr, missing[:5]))}{', ...' if len(missing) > 5 else ''}); the file holds "
                f"{len(self.classnames)} classes ({', '.join(map(repr, self.classnames[:5]))}, ...). Compute features "
                "for these classes with the teacher (promptkd distill writes them for every class of the dataset)."
            )
        used: dict[str, int] = {}
        positions = []
        for name in classnames:  # the k-th use of a repeated name reads its k-th row (the last one past that)
            k = used.get(name, 0)
            used[name] = k + 1
            positions.append(index[name][min(k, len(index[name]) - 1)])
        return self.features[positions]

    def check(self, *, classnames: Sequence[str] | None = None, teacher: dict[str, Any] | None = None) -> None:
        """Refuse another class list (order-sensitive hash) or another teacher; the message names both."""
        if classnames is not None and classnames_hash(list(classnames)) != self.classnames_sha256:
            raise TeacherError(
                f"{self.source}: stored teacher features are for {len(self.classnames)} classes "
                f"({', '.join(map(repr, self.classnames[:4]))}, ...; hash {self.classnames_sha256}), but this run "
                f"has {len(classnames)} classes ({', '.join(map(repr, list(classnames)[:4]))}, ...; hash "
                f"{classnames_hash(list(classnames))}). Use the features computed for this dataset's class list, "
                "or drop --teacher-features to compute them."
            )
        differ = teacher_differences(self.teacher, teacher) if teacher is not None else []
        if differ:
            raise TeacherError(
                f"{self.source}: stored teacher features come from {teacher_description(self.teacher)}, but this "
                f"run's teacher is {teacher_description(teacher)}; they differ in {'; '.join(differ)} (stored vs "
                "this run). Features of another teacher give the student wrong targets; recompute them with this "
                "teacher (drop --teacher-features)."
            )

    def extends(self, classnames_sha256: str) -> bool:
        """True when this list is, or was extended from, the class list with hash ``classnames_sha256``."""
        return classnames_sha256 == self.classnames_sha256 or any(
            e.get("from_classnames_sha256") == classnames_sha256 for e in self.extensions
        )

    def extend(self, teacher: Teacher, classnames: Sequence[str]) -> TeacherFeatures:
        """These features plus the teacher's rows for ``classnames`` (new names only), appended; existing rows are
        copied bit for bit. Refuses another teacher (its rows would not match the student's targets) and names
        already stored."""
        new = list(classnames)
        if not new:
            raise TeacherError("no class names to add; give the new names, one per line, with --classes FILE.")
        differ = teacher_differences(self.teacher, teacher.identity)
        if differ:
            raise TeacherError(
                f"{self.source}: stored features come from {teacher_description(self.teacher)}, but the teacher "
                f"given is {teacher_description(teacher.identity)}; they differ in {'; '.join(differ)} (stored vs "
                "given). Extend them with the teacher that computed them (its checkpoint and weights), or distil "
                "again with the new teacher."
            )
        present = sorted(set(new) & set(self.classnames))
        if present:
            raise TeacherError(
                f"{self.source}: {len(present)} of the names to add are stored already "
                f"({', '.join(map(repr, present[:5]))}{', ...' if len(present) > 5 else ''}); give only new names."
            )
        added = teacher.compute_features(new)
        record = {
            "from_classnames_sha256": self.classnames_sha256,
            "num_classes_before": len(self.classnames),
            "added": len(new),
            "teacher": dict(teacher.identity),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        return TeacherFeatures(
            torch.cat([self.features, added.features.to(self.features.dtype)]),
            self.logit_scale,
            [*self.classnames, *new],
            dict(self.teacher),
            source=self.source,
            extensions=[*self.extensions, record],
        )

    # --- files -------------------------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write ``<stem>.safetensors`` (tensor ``features``) and ``<stem>.json`` atomically; returns the first."""
        from safetensors.torch import save_file

        tensor_path, config_path = checkpoint_paths(path)
        meta = {
            "format": FEATURES_FORMAT,
            "format_version": FEATURES_VERSION,
            "num_classes": len(self.classnames),
            "embed_dim": self.embed_dim,
            "logit_scale": float(self.logit_scale),
            "classnames": list(self.classnames),
            "classnames_sha256": self.classnames_sha256,
            "teacher": self.teacher,
            "extensions": self.extensions,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        with atomic_path(tensor_path) as tmp:
            save_file({"features": self.features.detach().float().cpu().contiguous()}, str(tmp))
        meta["features_sha256"] = file_sha256(tensor_path)
        atomic_write_text(config_path, json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
        return tensor_path

    @classmethod
    def load(cls, path: str | Path) -> TeacherFeatures:
        """Read a features file; refuses other formats and a tensor file that does not match its JSON."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        tensor_path, config_path = checkpoint_paths(path)
        for needed in (tensor_path, config_path):
            if not needed.is_file():
                raise TeacherError(
                    f"{needed}: no such file; stored teacher features are a .safetensors file plus its .json "
                    "(written by promptkd distill as teacher_features.*)."
                )
        try:
            meta = json.loads(config_path.read_text())
            tensors = load_file(str(tensor_path), device="cpu")
        except (json.JSONDecodeError, SafetensorError, OSError, ValueError) as error:
            raise TeacherError(f"{tensor_path}: cannot be read ({error}).") from error
        if meta.get("format") != FEATURES_FORMAT:
            raise TeacherError(
                f"{config_path}: not a teacher-features file (format={meta.get('format')!r}); a prompt checkpoint "
                "goes to --teacher, its features to --teacher-features."
            )
        if set(tensors) != {"features"}:
            raise TeacherError(f"{tensor_path}: expected one tensor 'features', found {sorted(tensors)}.")
        recorded = meta.get("features_sha256")
        if recorded and recorded != file_sha256(tensor_path):
            raise TeacherError(f"{tensor_path}: does not match {config_path.name} (sha256 differs); re-create both.")
        classnames = list(meta.get("classnames") or [])
        if meta.get("classnames_sha256") and classnames_hash(classnames) != meta["classnames_sha256"]:
            raise TeacherError(f"{config_path}: the class list does not match its recorded hash.")
        teacher = dict(meta.get("teacher") or {})
        extensions = list(meta.get("extensions") or [])
        for record in extensions:
            differ = teacher_differences(teacher, record.get("teacher"))
            if differ:
                start = int(record.get("num_classes_before", 0))
                raise TeacherError(
                    f"{config_path}: rows {start}..{start + int(record.get('added', 0)) - 1} were added by "
                    f"{teacher_description(record.get('teacher'))}, not by this file's teacher "
                    f"({teacher_description(teacher)}; they differ in {'; '.join(differ)}); a student cannot score "
                    "them. Recompute the features with one teacher (promptkd features extend refuses another)."
                )
        return cls(
            tensors["features"].float(),
            float(meta["logit_scale"]),
            classnames,
            teacher,
            source=str(tensor_path),
            extensions=extensions,
        )


# --- preprocessing bridge -------------------------------------------------------------------------------------------
_MODES = {"bicubic": "bicubic", "bilinear": "bilinear", "nearest": "nearest"}


class TeacherInput:
    """Turns the student's normalised batch into the teacher's input (same augmented view, paper §3.2).

    Identity when both models share size, mean and std (the paper's ViT-L/14 → ViT-B/16 pair: 224 px, CLIP stats).
    Otherwise: x·std_s + mean_s (back to [0, 1]), resize to the teacher's size (its interpolation, antialiased,
    clamped to [0, 1]), then (x − mean_t) / std_t.
    """

    def __init__(self, student: PreprocessInfo, teacher: PreprocessInfo):
        if len(student.mean) != len(student.std) or len(teacher.mean) != len(teacher.std):
            raise TeacherError("preprocessing mean and std must have one value per channel")
        if len(student.mean) != len(teacher.mean):
            raise TeacherError(
                f"the student's images have {len(student.mean)} channels and the teacher's {len(teacher.mean)}: "
                "the student's batch cannot be turned into the teacher's input."
            )
        self.student, self.teacher = student, teacher
        self.same_stats = tuple(student.mean) == tuple(teacher.mean) and tuple(student.std) == tuple(teacher.std)
        self.same_size = int(student.size) == int(teacher.size)
        self.mode = _MODES.get(str(teacher.interpolation).lower(), "bilinear")

    @property
    def identity(self) -> bool:
        return self.same_stats and self.same_size

    def describe(self) -> str:
        s, t = self.student, self.teacher
        if self.identity:
            return f"teacher and student share the input ({s.size} px, mean {tuple(s.mean)}, std {tuple(s.std)})"
        return (
            f"student batch {s.size} px, mean {tuple(s.mean)}, std {tuple(s.std)} -> teacher input: un-normalised, "
            + (f"resized to {t.size} px ({self.mode}), " if not self.same_size else "")
            + f"re-normalised with mean {tuple(t.mean)}, std {tuple(t.std)}"
        )

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.identity:
            return images
        if images.dim() != 4 or images.shape[1] != len(self.student.mean):
            raise TeacherError(
                f"student batch of shape {tuple(images.shape)} cannot be converted for the teacher "
                f"(expected [B, {len(self.student.mean)}, H, W])."
            )

        def stats(values: Sequence[float]) -> torch.Tensor:
            return torch.tensor(values, device=images.device, dtype=torch.float32).view(1, -1, 1, 1)

        with torch.autocast(device_type=images.device.type, enabled=False):
            x = images.float() * stats(self.student.std) + stats(self.student.mean)
            if not self.same_size:
                size = (int(self.teacher.size), int(self.teacher.size))
                antialias = self.mode in ("bilinear", "bicubic")
                x = F.interpolate(x, size=size, mode=self.mode, antialias=antialias, align_corners=None)
                x = x.clamp(0.0, 1.0)
            return (x - stats(self.teacher.mean)) / stats(self.teacher.std)


# --- the teacher ----------------------------------------------------------------------------------------------------
def _image_features_fn(method: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The (unnormalised) image feature f_t(x) that the method's classifier scores, per method family."""
    from promptkd.methods.prompted import PromptedMethod

    name = method.name
    if isinstance(method, PromptedMethod):
        return lambda images: method.image_encoder(images, method.visual_prompts())
    if name == "zeroshot":
        return lambda images: method.clip.encode_image(images)
    if name == "vpt":
        return lambda images: method.image_encoder(images, method.learner.visual())
    if name == "vp":
        return lambda images: method.clip.encode_image(method.prompt_images(images))
    if name == "clip_adapter":
        return lambda images: method.adapt(method.clip.encode_image(images))
    raise TeacherError(f"method {name!r} cannot be a PromptKD teacher")


class Teacher(nn.Module):
    """A frozen, eval-mode teacher method with its identity; use :func:`load_teacher` or :func:`zero_shot_teacher`.

    ``loaded`` says the method's trained parts were loaded from its checkpoint (or it has none, zero-shot CLIP);
    :meth:`compute_features` refuses otherwise (issue #33).
    """

    def __init__(self, method: nn.Module, identity: dict[str, Any], *, loaded: bool):
        super().__init__()
        name = getattr(method, "name", type(method).__name__)
        if name in _REFUSED:
            raise TeacherError(f"method {name!r} cannot be a PromptKD teacher: {_REFUSED[name]}.")
        if name not in TEACHER_METHODS:
            raise TeacherError(f"method {name!r} cannot be a PromptKD teacher; teachers: {', '.join(TEACHER_METHODS)}.")
        self.method = method
        self.identity = identity
        self.loaded = loaded
        self._image_features = _image_features_fn(method)
        method.requires_grad_(False)
        self.eval()

    @property
    def backbone(self) -> Backbone:
        return self.method.backbone

    @property
    def preprocess(self) -> PreprocessInfo:
        return self.method.backbone.preprocess

    @property
    def embed_dim(self) -> int:
        return int(self.method.backbone.embed_dim)

    def train(self, mode: bool = True) -> Teacher:
        """A teacher never trains: it stays in eval mode whatever the enclosing module does."""
        return super().train(False)

    def logit_scale(self) -> float:
        """s_t = exp(logit_scale) of the teacher's CLIP (frozen)."""
        return float(self.method.clip.logit_scale.detach().float().exp())

    @torch.no_grad()
    def text_features(self, classnames: Sequence[str]) -> torch.Tensor:
        """n(T_t) [C, E_t] for ``classnames`` in float32 (autocast off): runs the teacher's text encoder."""
        if not self.loaded:
            raise TeacherError(
                "the teacher's prompts are not loaded: text features computed before loading the checkpoint come "
                "from untrained prompts (PromptKD issue #33). Build the teacher with load_teacher()."
            )
        from promptkd.methods.prompted import PromptedMethod

        method = self.method
        device = method.backbone.device
        with torch.autocast(device_type=device.type, enabled=False):
            if list(method.classnames) != list(classnames):
                method.set_classnames(list(classnames))
            # FixedTextMethod: W was computed for the class list by set_classnames / the constructor
            features = method.text_features() if isinstance(method, PromptedMethod) else method.text_features
            return F.normalize(features.detach().float(), dim=-1)

    def compute_features(self, classnames: Sequence[str]) -> TeacherFeatures:
        """The pre-stored features of ``classnames`` (once per run, after the prompts were loaded)."""
        features = self.text_features(classnames).cpu()
        return TeacherFeatures(features, self.logit_scale(), list(classnames), dict(self.identity), "<computed>")

    @torch.no_grad()
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """n(f_t(x)) [B, E_t], float32, no grad; ``images`` already in the teacher's input format."""
        return F.normalize(self._image_features(images).float(), dim=-1)

    @torch.no_grad()
    def logits(self, images: torch.Tensor, text_features: torch.Tensor, logit_scale: float) -> torch.Tensor:
        """z_t = s_t · n(f_t(x)) · n(T_t)ᵀ with the *stored* T_t (float32; no text encoder runs here)."""
        image = self.image_features(images)
        with torch.autocast(device_type=image.device.type, enabled=False):
            return logit_scale * image @ text_features.to(image.device).float().t()


def converted_method_config(method: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Method config of a checkpoint converted from the reference code (``promptkd convert`` records the prompt
    shapes it found, not a method config). The reference's ``CTX_INIT "a photo of a"`` is assumed for IVLP,
    PromptSRC and MaPLe (it fixes the token layout when fewer than 4 tokens are learnt)."""
    s = dict(settings)
    if method in ("ivlp", "promptsrc"):
        out = {
            "n_ctx_text": int(s.get("n_ctx", 4)),
            "text_depth": int(s.get("text_depth", 1)),
            "n_ctx_vision": int(s.get("n_vision_tokens", 0)),
            "vision_depth": int(s.get("vision_depth", 0)),
            "ctx_init": "a photo of a",
        }
        if method == "promptsrc":
            out["gpa"] = False  # nothing is trained further; GPA only matters while training
        return out
    if method == "maple":
        return {"n_ctx": int(s.get("n_ctx", 2)), "depth": int(s.get("depth", 1)), "ctx_init": "a photo of a"}
    if method == "coop":
        return {"n_ctx": int(s.get("n_ctx", 16)), "class_specific": bool(s.get("class_specific", False))}
    if method == "vpt":
        return {"n_tokens": int(s.get("n_vision_tokens", 8)), "depth": int(s.get("vision_depth", 1))}
    raise TeacherError(f"converted checkpoints of method {method!r} cannot be PromptKD teachers.")


def _resolve_weights(spec: dict[str, Any], where: Path) -> str | None:
    """The weights a checkpoint records; a recorded weight file that is missing here is an error, never replaced
    by other weights (another file gives other soft labels, and the identity would name weights never used)."""
    from promptkd.backbones.weights import shipped_weights

    pretrained = spec.get("pretrained")
    if pretrained and pretrained != "shipped" and spec.get("source") == "file" and not Path(pretrained).is_file():
        shipped = shipped_weights(str(spec.get("model_name")))
        hint = (
            f"; promptkd ships weights for {spec.get('model_name')}: if the teacher was trained on them, pass "
            "--teacher-pretrained shipped"
            if shipped
            else ""
        )
        raise TeacherError(
            f"{where}: the teacher's backbone weights {pretrained} (recorded in its .json) do not exist here. Give "
            f"the weight file with --teacher-pretrained FILE{hint}."
        )
    return pretrained


def load_teacher(
    checkpoint: str | Path,
    *,
    model: str | None = None,
    pretrained: str | None = None,
    quick_gelu: bool | None = None,
    classnames: Sequence[str] | None = None,
    backbone: Backbone | None = None,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    seed: int | None = None,
) -> Teacher:
    """Build the teacher from a promptkd checkpoint of any teacher method and load it strictly.

    The method, its config and the backbone come from the checkpoint's JSON; ``model``/``pretrained`` override the
    backbone (e.g. a local weight file), or ``backbone`` gives one already loaded. Converted reference checkpoints
    without a recorded backbone need one of these.
    """
    from promptkd.backbones import load_backbone
    from promptkd.checkpoints import checkpoint_paths as _paths
    from promptkd.checkpoints import load_checkpoint
    from promptkd.methods import get_method
    from promptkd.methods.base import config_from

    tensors, config = load_checkpoint(checkpoint)
    tensor_path = _paths(checkpoint)[0]
    name = str(config.get("method"))
    if name in _REFUSED:
        raise TeacherError(f"{tensor_path}: a {name} checkpoint cannot be a PromptKD teacher: {_REFUSED[name]}.")
    if name not in TEACHER_METHODS:
        raise TeacherError(
            f"{tensor_path}: checkpoint of method {name!r}; PromptKD teachers are {', '.join(TEACHER_METHODS)}."
        )
    method_cls = get_method(name)
    raw_config = config.get("method_config") or {}
    if "converted_from" in config and "settings" not in config["converted_from"]:  # converted before the fix
        raw_config = converted_method_config(name, raw_config)
    method_config = config_from(method_cls, raw_config)
    spec = dict(config.get("backbone") or {})
    model_name = model or spec.get("model_name")
    weights = pretrained
    if weights is None and (not model or model == spec.get("model_name")):
        weights = _resolve_weights(spec, tensor_path)
    if backbone is None:
        if not model_name and not weights:
            raise TeacherError(
                f"{tensor_path}: the checkpoint records no backbone (converted without --model); give the teacher's "
                "backbone with --teacher-model/--teacher-pretrained."
            )
        backbone = load_backbone(
            model_name,
            weights,
            quick_gelu=quick_gelu if quick_gelu is not None else spec.get("quick_gelu"),
            device=device,
            precision=precision,
        )
    if spec and not backbone.spec.same_identity(spec):
        logger.warning(
            "teacher backbone %s (%s) differs from the one recorded in %s (%s, %s)",
            backbone.spec.model_name,
            backbone.spec.pretrained,
            tensor_path,
            spec.get("model_name"),
            spec.get("pretrained"),
        )
    stored = config.get("classnames")
    classes = list(stored or classnames or ["object"])
    try:
        method = method_cls(backbone, classes, method_config)
        method.load_trainable(tensors, tensor_path)
    except CheckpointError as error:
        raise TeacherError(
            f"teacher checkpoint {tensor_path} ({name}) does not fit the teacher backbone "
            f"{backbone.spec.model_name} ({backbone.spec.pretrained or 'random weights'}):\n{error}"
        ) from error
    identity = teacher_identity(method, backbone, tensor_path, seed=seed)
    teacher = Teacher(method, identity, loaded=True)
    if classnames is not None and list(classnames) != classes:
        method.set_classnames(list(classnames))
    logger.info("teacher: %s", teacher_description(identity))
    return teacher


def build_teacher(
    checkpoint: str | Path | None,
    *,
    model: str | None = None,
    pretrained: str | None = None,
    quick_gelu: bool | None = None,
    classnames: Sequence[str] | None = None,
    templates: Sequence[str] | None = None,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    seed: int | None = None,
) -> Teacher:
    """The teacher a run names: a checkpoint (``model``/``pretrained`` override its recorded backbone), or else
    zero-shot CLIP on ``model`` with ``pretrained`` weights (shipped by default; random only when asked).
    ``seed`` seeds torch first, so random weights are a function of it (the identity records it under ``about``:
    ``features extend`` of a random teacher passes it back to draw the same weights)."""
    if seed is not None:
        torch.manual_seed(seed)
    if checkpoint:
        return load_teacher(
            checkpoint,
            model=model,
            pretrained=pretrained,
            quick_gelu=quick_gelu,
            classnames=classnames,
            device=device,
            precision=precision,
            seed=seed,
        )
    from promptkd.backbones import load_backbone
    from promptkd.backbones.loading import run_weights

    if not model:
        raise TeacherError("give the teacher: a checkpoint (--teacher CKPT), or --teacher-model for zero-shot CLIP")
    weights = run_weights(model, pretrained, flag="--teacher-pretrained")
    backbone = load_backbone(model, weights, quick_gelu=quick_gelu, device=device, precision=precision)
    return zero_shot_teacher(backbone, templates, seed=seed)


def zero_shot_teacher(
    backbone: Backbone, templates: Sequence[str] | None = None, *, seed: int | None = None
) -> Teacher:
    """Zero-shot CLIP as the teacher (paper Table 6, "CLIP" row): no checkpoint, hand-crafted text features.
    ``seed``: the one that drew random weights, recorded with the identity (for information)."""
    from promptkd.methods import get_method
    from promptkd.methods.base import config_from

    cls = get_method("zeroshot")
    cfg = config_from(cls, {"templates": list(templates)} if templates else {})
    method = cls(backbone, ["object"], cfg)
    return Teacher(method, teacher_identity(method, backbone, seed=seed), loaded=True)
