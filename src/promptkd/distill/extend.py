"""Classes added after distillation (``promptkd features extend``): making the new rows count among the old ones.

A student distilled on base classes learnt to match the teacher on the base rows only, so its logits for those
rows run high: scored among all names (what ``predict`` does) most images of a new class go to an old one, even when
the student ranks the new classes well among themselves. Two remedies, neither reads a label:

- **calibration**: one scale and one bias per row group (the rows stored at distillation, and each extension's rows),
  fitted so that the student's softmax over all names matches the teacher's on unlabelled images (KL, the
  distillation loss itself, on 2G-1 numbers). It is stored beside the features (``<stem>.calibration.json``), bound by
  content to the features and to the student's trained tensors, and ``predict`` applies it.
- **a short distillation** on unlabelled images (of the new classes, best with some of the old ones replayed) with the
  teacher's logits over all names: the student itself learns the new rows (a new student checkpoint).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from promptkd.checkpoints import atomic_write_text, checkpoint_paths
from promptkd.distill.teacher import TeacherError, TeacherFeatures
from promptkd.errors import PromptKDError

__all__ = [
    "Calibration",
    "CalibrationError",
    "added_share",
    "calibrate",
    "calibration_for",
    "calibration_path",
    "calibrator",
    "distill_new_classes",
    "one_sided_warning",
    "row_groups",
    "student_sha256",
]

logger = logging.getLogger(__name__)

CALIBRATION_FORMAT = "promptkd-calibration"
CALIBRATION_SUFFIX = ".calibration.json"


class CalibrationError(PromptKDError, ValueError):
    pass


def row_groups(stored: TeacherFeatures) -> list[tuple[int, int]]:
    """[start, stop) of the rows stored at distillation and of each extension's rows, in order."""
    bounds = [int(e["num_classes_before"]) for e in stored.extensions] + [len(stored.classnames)]
    groups, start = [], 0
    for stop in bounds:
        if stop > start:
            groups.append((start, stop))
        start = stop
    return groups


def student_sha256(method: Any) -> str:
    """Hash of what the student trained (its checkpoint's tensors): a calibration fits one student only."""
    digest = hashlib.sha256()
    for key, value in sorted(method.trainable_state().items()):
        digest.update(key.encode())
        digest.update(value.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _features_sha256(stored: TeacherFeatures) -> str:
    from promptkd.distill.cache import features_sha256

    return features_sha256(stored.features)


def calibration_path(features: str | Path) -> Path:
    """``<stem>.calibration.json`` beside a features file (given as its ``.safetensors``, ``.json`` or stem)."""
    tensor_path = checkpoint_paths(features)[0]
    return tensor_path.with_name(tensor_path.stem + CALIBRATION_SUFFIX)


@dataclass
class Calibration:
    """z'[:, g] = scale_g · z[:, g] + bias_g for each row group g of the stored features (see the module docstring)."""

    groups: list[tuple[int, int]]
    scale: list[float]
    bias: list[float]
    features_sha256: str
    classnames_sha256: str
    student_sha256: str
    fitted: dict[str, Any] = field(default_factory=dict)  # images, objective, teacher: how it was fitted (no labels)

    def vectors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row scale and bias [C] over the stored class list."""
        size = self.groups[-1][1]
        scale, bias = torch.ones(size), torch.zeros(size)
        for (start, stop), s, b in zip(self.groups, self.scale, self.bias):
            scale[start:stop], bias[start:stop] = s, b
        return scale, bias

    def describe(self) -> str:
        return ", ".join(
            f"rows {a}-{b - 1}: x{s:.3f} {c:+.3f}" for (a, b), s, c in zip(self.groups, self.scale, self.bias)
        )

    def apply(self, logits: torch.Tensor, positions: Sequence[int] | None = None) -> torch.Tensor:
        """Calibrated logits; ``positions``: the stored rows of the logits' columns (default: every row, in order)."""
        scale, bias = self.vectors()
        if positions is not None:
            index = torch.as_tensor(list(positions), dtype=torch.long)
            scale, bias = scale[index], bias[index]
        return logits * scale.to(logits.device, logits.dtype) + bias.to(logits.device, logits.dtype)

    def save(self, path: str | Path) -> Path:
        data = {"format": CALIBRATION_FORMAT, **asdict(self)}
        data["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        atomic_write_text(Path(path), json.dumps(data, indent=2) + "\n")
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CalibrationError(f"{path}: cannot be read as a calibration ({error}); fit it again.") from error
        if not isinstance(data, dict) or data.get("format") != CALIBRATION_FORMAT:
            raise CalibrationError(f"{path}: not a promptkd calibration file; fit it again or delete it.")
        try:
            groups = [(int(a), int(b)) for a, b in data["groups"]]
            return cls(
                groups,
                [float(x) for x in data["scale"]],
                [float(x) for x in data["bias"]],
                str(data["features_sha256"]),
                str(data["classnames_sha256"]),
                str(data["student_sha256"]),
                dict(data.get("fitted") or {}),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise CalibrationError(f"{path}: incomplete calibration ({error}); fit it again.") from error

    def check(self, stored: TeacherFeatures, student: str, where: str | Path) -> None:
        """Refuse a calibration fitted for other features (other rows) or another student, saying which."""
        if self.classnames_sha256 != stored.classnames_sha256 or self.features_sha256 != _features_sha256(stored):
            raise CalibrationError(
                f"{where}: fitted for other class features than {stored.source} ({len(stored.classnames)} classes "
                "now; extended since?). Fit it again: promptkd features calibrate ... (or delete the file)."
            )
        if self.student_sha256 != student:
            raise CalibrationError(
                f"{where}: fitted for another student than the one predicting (its trained tensors differ). Fit it "
                "for this student (promptkd features calibrate --student CKPT), or delete the file."
            )


def stored_positions(stored: TeacherFeatures, classnames: Sequence[str]) -> list[int]:
    """The stored row of each name (the k-th use of a repeated name is its k-th row, as in ``rows``)."""
    index: dict[str, list[int]] = {}
    for i, name in enumerate(stored.classnames):
        index.setdefault(name, []).append(i)
    used: dict[str, int] = {}
    out = []
    for name in classnames:
        if name not in index:
            raise TeacherError(f"{stored.source}: no stored row for {name!r}.")
        k = used.get(name, 0)
        used[name] = k + 1
        out.append(index[name][min(k, len(index[name]) - 1)])
    return out


def calibration_for(method: Any) -> Calibration | None:
    """The calibration stored beside a student's features, checked against them and the student; None when the
    file has none (``predict`` then scores uncalibrated, as before)."""
    stored = getattr(method, "stored", None)
    if stored is None or stored.source == "<memory>":
        return None
    path = calibration_path(stored.source)
    if not path.is_file():
        return None
    calibration = Calibration.load(path)
    calibration.check(stored, student_sha256(method), path)
    logger.info("applying the calibration %s (row groups %s)", path, calibration.groups)
    return calibration


def calibrator(method: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """What ``predict`` applies to a method's logits over its current classes: the stored calibration (checked),
    or nothing."""
    calibration = calibration_for(method)
    if calibration is None:
        return lambda logits: logits
    positions = stored_positions(method.stored, method.classnames)
    return lambda logits: calibration.apply(logits, positions)


# --- fitting -------------------------------------------------------------------------------------------------------
@torch.no_grad()
def paired_logits(
    method: Any, teacher: Any, paths: Sequence[str], *, batch_size: int = 128
) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher logits [N, C] over every stored row, on the eval view of each image (no label read)."""
    from promptkd.data.items import ImageDataset
    from promptkd.data.transforms import build_transform
    from promptkd.distill.teacher import TeacherInput

    stored = method.stored
    device = method.all_text_features.device
    dataset = ImageDataset(list(paths), build_transform(method.backbone.preprocess, train=False))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
    convert = TeacherInput(method.backbone.preprocess, teacher.preprocess)
    text = stored.features.float().to(device)
    student_rows = stored_positions(stored, method.classnames)
    if student_rows != list(range(len(stored.classnames))):
        raise CalibrationError("the student must score every stored class (its class list is a subset)")
    was_training = method.training
    method.eval()
    student, reference = [], []
    for images, _ in loader:
        images = images.to(device)
        student.append(method.logits(images).float().cpu())
        reference.append(teacher.logits(convert(images), text, float(stored.logit_scale)).float().cpu())
    method.train(was_training)
    return torch.cat(student), torch.cat(reference)


def fit_affine(
    student: torch.Tensor, teacher: torch.Tensor, groups: list[tuple[int, int]], *, steps: int = 300
) -> tuple[list[float], list[float]]:
    """Scale and bias per row group minimising KL(teacher ‖ calibrated student) over the images (the first group's
    bias stays 0: softmax ignores a shift shared by all rows). Deterministic (full batch, L-BFGS)."""
    size = groups[-1][1]
    member = torch.zeros(len(groups), size)
    for g, (start, stop) in enumerate(groups):
        member[g, start:stop] = 1.0
    log_scale = torch.zeros(len(groups), requires_grad=True)
    free_bias = torch.zeros(len(groups) - 1, requires_grad=True)
    target = teacher.log_softmax(-1)
    optimizer = torch.optim.LBFGS([log_scale, free_bias], lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

    def rows() -> tuple[torch.Tensor, torch.Tensor]:
        bias = torch.cat([torch.zeros(1), free_bias])
        return log_scale.exp() @ member, bias @ member

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        scale, bias = rows()
        calibrated = (student * scale + bias).log_softmax(-1)
        loss = (target.exp() * (target - calibrated)).sum(-1).mean()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return log_scale.exp().tolist(), torch.cat([torch.zeros(1), free_bias]).tolist()


def added_share(reference: torch.Tensor, groups: list[tuple[int, int]]) -> float:
    """Share of the images whose teacher top-1 is a row added after distillation: near 1, the images show the new
    classes only (a short distillation on them forgets the old classes, and a calibration on them favours the new
    rows); about (added rows / all rows) for images of every class."""
    return (reference.argmax(-1) >= groups[0][1]).float().mean().item()


def one_sided_warning(share: float, groups: list[tuple[int, int]]) -> str | None:
    """A warning when the teacher puts far more of the images in added rows than their share of the rows."""
    added = (groups[-1][1] - groups[0][1]) / groups[-1][1]
    if share <= added + 0.15:  # on the world: 50-56% for images of every class, 61-80% for new-class images only
        return None
    return (
        f"the teacher puts {100 * share:.0f}% of these images in the added classes ({100 * added:.0f}% of the names): "
        "they look like images of the new classes only. A short distillation on them forgets the old classes and "
        "a calibration on them favours the new rows (on the world, all-class accuracy fell instead of rising); "
        "add unlabelled images of the old classes too, e.g. those the student was distilled on."
    )


def calibrate(method: Any, teacher: Any, paths: Sequence[str], *, images: str = "") -> Calibration:
    """Fit the student's calibration on unlabelled images (see the module docstring); ``images`` names them."""
    stored = method.stored
    groups = row_groups(stored)
    if len(groups) < 2:
        raise CalibrationError(
            f"{stored.source} holds only the classes the student was distilled on; calibration weighs rows added "
            "later (promptkd features extend) against them, so extend the features first."
        )
    if not paths:
        raise CalibrationError("no unlabelled images to fit the calibration on; give them with --images DIR.")
    student, reference = paired_logits(method, teacher, paths)
    scale, bias = fit_affine(student, reference, groups)
    before = (student.argmax(-1) == reference.argmax(-1)).float().mean().item()
    calibration = Calibration(groups, scale, bias, _features_sha256(stored), stored.classnames_sha256, "")
    after = (calibration.apply(student).argmax(-1) == reference.argmax(-1)).float().mean().item()
    fitted = {
        "objective": "KL(teacher || calibrated student) over all stored classes; no labels",
        "images": len(paths),
        "source": images,
        "teacher": dict(stored.teacher),
        "teacher_agreement": {"before": round(before, 4), "after": round(after, 4)},
        "teacher_added_share": round(added_share(reference, groups), 4),
    }
    return replace(calibration, student_sha256=student_sha256(method), fitted=fitted)


# --- a short distillation on the new classes ---------------------------------------------------------------------
def distill_new_classes(
    method: Any,
    teacher: Any,
    paths: Sequence[str],
    out: str | Path,
    *,
    epochs: int = 2,
    seed: int = 1,
    settings: dict[str, Any] | None = None,
) -> Path:
    """Distil ``method`` (scoring every stored class) for a few epochs on unlabelled ``paths`` with the teacher's
    logits over all names; the run folder ``out`` gets the new student and a copy of its features. ``settings``: the
    student's own training settings (its checkpoint's ``train``), kept without warm-up; returns the checkpoint."""
    from promptkd.config import from_dict
    from promptkd.data.items import ImageDataset
    from promptkd.data.transforms import train_transform
    from promptkd.engine.config import TrainConfig
    from promptkd.engine.trainer import Trainer

    if epochs < 1:
        raise CalibrationError(f"--distill-epochs must be at least 1 for a short distillation, not {epochs}.")
    if not paths:
        raise CalibrationError("no unlabelled images to distil on; give them with --images DIR.")
    stored = method.stored
    if stored_positions(stored, method.classnames) != list(range(len(stored.classnames))):
        raise CalibrationError("the student must score every stored class (its class list is a subset)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    features = stored.save(out / "teacher_features")
    method.config.teacher_features = str(features.resolve())
    train = from_dict(
        TrainConfig, {**(settings or {}), "epochs": epochs, "warmup_epochs": 0, "seed": seed}, where="train"
    )
    method.attach_teacher(teacher)
    data = ImageDataset(list(paths), train_transform(method.backbone.preprocess, scale=train.crop_scale))
    trainer = Trainer(method, train, out, device=method.all_text_features.device, run_config={"extend": True})
    result = trainer.fit(data)
    method.detach_teacher()
    method.eval()
    return Path(result.checkpoint)
