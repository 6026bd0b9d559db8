"""PromptKD's own protocols in one command: teacher -> stored features -> distilled student, scored as the paper does.

Per dataset and seed, under ``<out>/<protocol>/<dataset>/promptkd/seed_<s>/``:

- ``recipe.json``: what the folder's runs were made with (written before any of them; another recipe is refused);
- ``teacher/``: a PromptSRC teacher trained on 16 shots (the base classes for base-to-novel, all classes for
  transfer), or the checkpoint taken from ``--teacher DIR`` (a reference Dassl file is converted here on the fly);
- ``teacher_features.safetensors``: its class text features, computed once (TeacherFeatures, bound to the teacher);
- ``student/``: the PromptKD student distilled on the unlabelled train images (all classes, transductive, as in the
  paper; base classes only with ``mode=inductive``);
- ``targets/<t>/`` (cross-dataset, domain generalisation): teacher, student and zero-shot student on each target.

The zero-shot student is scored once per dataset (``<dataset>/promptkd/zeroshot_student/``). Each stage is skipped
when its output exists and fits (results written, features of this teacher, the engine's resume for unfinished
runs), so a killed run resumes with the same command. The report adds the share of the teacher-student gap closed
and the spread over seeds to the usual protocol table (:func:`distillation_section`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from promptkd.protocols.runner import ProtocolError, ProtocolSpec, _results_exist

logger = logging.getLogger(__name__)

RECIPE = "recipe.json"
STUDENT_METHODS = ("promptkd", "promptkd_timm")
#: the paper's pair and presets (ViT-L/14 PromptSRC teacher, ViT-B/16 student) and the embedded world's
PAPER = {
    "teacher_model": "ViT-L-14",
    "teacher_pretrained": "openai",
    "teacher_preset": "vit_l14_c2_ep20_batch8_4+4ctx",
    "student_model": "ViT-B-16",
    "student_pretrained": "openai",
    "base2new": "vit_b16_c2_ep20_batch8_4+4ctx",
    "transfer": "vit_b16_c2_ep20_batch8_4+4ctx_cross_datasets",
}
WORLD = {"teacher_model": "pkd-world-teacher", "student_model": "pkd-world-student", "teacher_preset": "world"}
PAPER_CROSS = ("caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101", "fgvc_aircraft")
PAPER_CROSS += ("sun397", "dtd", "eurosat", "ucf101")
PAPER_DG = ("imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r")
#: recipe fields that name places, not recipes (a moved folder or data root is the same recipe)
_PLACES = {"out", "device", "data_root", "teacher", "teacher_features", "teacher_cache", "progress"}
_PLACES |= {"teacher_checkpoint"}


@dataclass
class Job:
    """One (dataset, seed) of a PromptKD protocol and the configs of its stages."""

    dataset: str
    seed: int
    folder: Path
    teacher_run: Any = None  # RunConfig of a trained teacher
    teacher_file: Path | None = None  # a given teacher (native or Dassl)
    distill: Any = None  # DistillRunConfig
    targets: list[str] = field(default_factory=list)

    @property
    def teacher_dir(self) -> Path:
        return self.folder / "teacher"

    @property
    def features(self) -> Path:
        return self.folder / "teacher_features.safetensors"


def default_targets(protocol: str, source: str) -> list[str]:
    """The paper's targets for ImageNet, the world's analogues for ``shapes``; none known otherwise."""
    from promptkd.data.world.spec import WORLD_DATASETS, shift_datasets

    if protocol == "cross_dataset":
        if source == "imagenet":
            return list(PAPER_CROSS)
        if source in WORLD_DATASETS:
            return [n for n, d in WORLD_DATASETS.items() if not d.test_only and n != source]
    if protocol == "domain_generalization":
        if source == "imagenet":
            return list(PAPER_DG)
        return shift_datasets(source)  # the ImageNet-like shifts; stress sets (shapes_noise) only when named
    return []


def _pair(spec: ProtocolSpec) -> dict[str, Any]:
    """Models, weights and presets of teacher and student: given values, else the world pair (preset ``world``) or
    the paper's (any other preset)."""
    world = spec.preset == "world"
    student_preset = spec.preset or PAPER["base2new" if spec.protocol == "base2new" else "transfer"]
    return {
        "teacher_model": spec.teacher_model or (WORLD if world else PAPER)["teacher_model"],
        "teacher_pretrained": spec.teacher_pretrained or (None if world else PAPER["teacher_pretrained"]),
        "teacher_preset": spec.teacher_preset or (WORLD if world else PAPER)["teacher_preset"],
        "student_model": spec.model or (WORLD if world else PAPER)["student_model"],
        "student_pretrained": spec.pretrained or (None if world else PAPER["student_pretrained"]),
        "student_preset": student_preset,
    }


def plan(spec: ProtocolSpec) -> list[Job]:
    """Every (dataset, seed) with its resolved stage configs (unknown presets and keys refused here, before work)."""
    from promptkd.distill.run import resolve_distill_config
    from promptkd.engine.run import resolve_run_config

    pair = _pair(spec)
    root = Path(spec.out) / spec.protocol
    transfer = spec.protocol != "base2new"
    quiet = ["train.progress=false"] if not spec.progress else []
    jobs = []
    for dataset in spec.datasets:
        targets = list(spec.targets or default_targets(spec.protocol, dataset)) if transfer else []
        if transfer and not targets:
            raise ProtocolError(
                f"{spec.protocol} from {dataset!r} needs --targets (defaults exist for imagenet and the world's "
                "shapes only)"
            )
        for seed in spec.seeds:
            folder = root / dataset / "promptkd" / f"seed_{seed}"
            job = Job(dataset, seed, folder, targets=targets)
            common = {"dataset": dataset, "data_root": spec.data_root, "seed": seed, "device": spec.device}
            if not spec.teacher:
                base = {**common, "shots": (spec.shots or [16])[0], "subsample": "all" if transfer else "base"}
                base.update(model=pair["teacher_model"], pretrained=pair["teacher_pretrained"], evaluate=not transfer)
                job.teacher_run = resolve_run_config(
                    "promptsrc",
                    pair["teacher_preset"],
                    [*quiet, *(spec.teacher_overrides or [])],
                    {**base, "out": str(job.teacher_dir)},
                )
            student = {
                **common,
                "student_model": pair["student_model"],
                "student_pretrained": pair["student_pretrained"],
            }
            student.update(
                teacher=str(job.teacher_dir / "prompts.safetensors"),
                teacher_features=str(job.features),
                teacher_cache=str(job.folder / "teacher_cache") if spec.teacher_cache else None,
                evaluate=not transfer,
                protocol="base2new",
                out=str(job.folder / "student"),
                mode=spec.mode,
            )
            job.distill = resolve_distill_config(pair["student_preset"], [*quiet, *(spec.overrides or [])], student)
            jobs.append(job)
    return jobs


# --- the recipe a folder was made with ------------------------------------------------------------------------------
def _recipe_view(value: Any) -> Any:
    """A config as compared between runs: places (paths, device, progress bars) left out."""
    if isinstance(value, dict):
        return {k: _recipe_view(v) for k, v in value.items() if k not in _PLACES}
    return value


def recipe(spec: ProtocolSpec, job: Job, teacher_sha: str | None) -> dict[str, Any]:
    from promptkd.config import to_dict

    return json.loads(
        json.dumps(
            {
                "protocol": spec.protocol,
                "dataset": job.dataset,
                "seed": job.seed,
                "mode": spec.mode,
                "teacher": (
                    {"trained": _recipe_view(to_dict(job.teacher_run))}
                    if job.teacher_run is not None
                    else {"given_sha256": teacher_sha}
                ),
                "teacher_cache": bool(spec.teacher_cache),
                "student": _recipe_view(to_dict(job.distill)),
                "targets": job.targets,
            },
            default=str,
        )
    )


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted({*old, *new})
        return [line for k in keys for line in _differences(old.get(k), new.get(k), f"{prefix}{k}.")]
    if old != new:
        return [f"{prefix.rstrip('.')}: {json.dumps(old, default=str)} -> {json.dumps(new, default=str)}"]
    return []


def check_recipe(job: Job, wanted: dict[str, Any]) -> None:
    """Refuse a folder holding runs of another recipe (or runs this protocol did not make), naming what differs."""
    path = job.folder / RECIPE
    if path.is_file():
        try:
            held = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise ProtocolError(f"{path} cannot be read ({error}); move the folder away to start it over") from error
        changes = _differences(held, wanted)
        if changes:
            shown = "\n".join(f"  {line}" for line in changes[:12])
            more = f"\n  ... and {len(changes) - 12} more" if len(changes) > 12 else ""
            raise ProtocolError(
                f"{job.folder} holds runs of another recipe (folder's value -> this command's):\n{shown}{more}\n"
                "Nothing was run. Use another --out, run with the folder's settings to resume it, or move the folder "
                "away to start over."
            )
    elif job.folder.is_dir() and any(job.folder.iterdir()):
        raise ProtocolError(
            f"{job.folder} holds files but no {RECIPE}: runs this protocol did not make. Nothing was run; use "
            "another --out or move the folder away."
        )


# --- teachers given in a folder -------------------------------------------------------------------------------------
@dataclass
class GivenTeacher:
    path: Path
    kind: str  # "native" (a promptkd checkpoint) or "dassl" (the reference code's, converted here)
    sha256: str


def _names_dataset(folder_name: str, dataset: str) -> bool:
    """A teacher folder may name a dataset as promptkd does, or by a benchmark's Dassl name, folder or alias."""
    from promptkd.data.benchmarks import UnknownDatasetError, _key, resolve_name

    if _key(folder_name) == _key(dataset):
        return True
    try:
        return resolve_name(folder_name) == dataset
    except UnknownDatasetError:
        return False


def _checkpoint_files(folder: Path) -> list[Path]:
    """promptkd checkpoints (``*.safetensors`` with a ``.json``) and reference files (``*.pth*``) under ``folder``."""
    found = [p for p in folder.rglob("*.safetensors") if p.with_suffix(".json").is_file()]
    found = [p for p in found if "teacher_features" not in p.name]
    found += [p for p in folder.rglob("*") if p.is_file() and ".pth" in p.name]
    return sorted(found)


def locate_teacher(folder: Path, dataset: str, seed: int) -> tuple[Path | None, str]:
    """The teacher file for (dataset, seed): ``<folder>/<dataset>/[seed_<s>|seed<s>/]...`` (one file; a Dassl
    folder's ``model-best.pth.tar`` when it also holds epoch files). Returns (file, why not found)."""

    dirs = [d for d in sorted(folder.iterdir()) if d.is_dir() and _names_dataset(d.name, dataset)]
    if not dirs:
        return None, f"no folder for {dataset!r}"
    base = dirs[0]
    seeded = [base / f"seed_{seed}", base / f"seed{seed}"]
    where = next((d for d in seeded if d.is_dir()), None)
    if where is None:
        if any(d.is_dir() and d.name.startswith("seed") for d in base.iterdir()):
            return None, f"no seed {seed} in {base}"
        where = base  # one teacher for every seed (how the released teachers come)
    files = _checkpoint_files(where)
    best = [p for p in files if p.name == "model-best.pth.tar"]
    if len(files) > 1 and len(best) == 1:
        files = best
    if len(files) != 1:
        what = "no checkpoint" if not files else f"{len(files)} checkpoints ({', '.join(p.name for p in files[:4])})"
        return None, f"{what} in {where}"
    return files[0], ""


def find_given_teachers(spec: ProtocolSpec, jobs: list[Job]) -> dict[tuple[str, int], GivenTeacher]:
    """Every job's teacher file, or one message naming every (dataset, seed) missing."""
    from promptkd.checkpoints import file_sha256

    folder = Path(str(spec.teacher)).expanduser()
    if not folder.is_dir():
        raise ProtocolError(
            f"--teacher {spec.teacher}: not a folder (give a folder of per-dataset teacher checkpoints)"
        )
    found, missing = {}, []
    for job in jobs:
        path, why = locate_teacher(folder, job.dataset, job.seed)
        if path is None:
            missing.append(f"{job.dataset} seed {job.seed}: {why}")
            continue
        kind = "native" if path.suffix == ".safetensors" else "dassl"
        found[(job.dataset, job.seed)] = GivenTeacher(path, kind, file_sha256(path))
    if missing:
        raise ProtocolError(
            f"--teacher {folder} lacks teachers for {len(missing)} runs:\n"
            + "\n".join(f"  {m}" for m in missing[:12])
            + "\nExpected <folder>/<dataset>/[seed_<s>/]<checkpoint> (promptkd .safetensors + .json, or a Dassl "
            "model*.pth.tar). Nothing was run."
        )
    return found


def _expected_classes(spec: ProtocolSpec, dataset: str) -> list[str]:
    """The classes a teacher of this protocol was trained on: the base half, or all classes for transfer."""
    from promptkd.data.datasets import resolve_dataset
    from promptkd.data.sampling import subsample_classes

    splits = resolve_dataset(dataset, spec.data_root, check=False)
    return list(splits.classnames if spec.protocol != "base2new" else subsample_classes(splits, "base").classnames)


def check_given_teacher(spec: ProtocolSpec, job: Job, given: GivenTeacher, backbone: Any) -> None:
    """Refuse a teacher of another method, other classes or another backbone, before any work."""
    from promptkd.checkpoints import (
        CheckpointError,
        convert_reference_state_dict,
        load_checkpoint,
        read_reference_checkpoint,
    )
    from promptkd.checkpoints.reference import check_fits_backbone
    from promptkd.distill.teacher import TEACHER_METHODS

    classes = _expected_classes(spec, job.dataset)
    what = "base classes" if spec.protocol == "base2new" else "classes"
    if given.kind == "native":
        _, meta = load_checkpoint(given.path)
        if meta.get("method") not in TEACHER_METHODS:
            raise ProtocolError(f"{given.path}: a {meta.get('method')!r} checkpoint cannot be a PromptKD teacher")
        recorded = meta.get("classnames")
        if recorded and list(recorded) != classes:
            raise ProtocolError(
                f"{given.path}: the teacher was trained on {len(recorded)} other classes ({', '.join(recorded[:3])}, "
                f"...), not {job.dataset}'s {len(classes)} {what} ({', '.join(classes[:3])}, ...). Nothing was run."
            )
        model = (meta.get("backbone") or {}).get("model_name")
        if model and model != backbone.spec.model_name:
            raise ProtocolError(
                f"{given.path}: the teacher was trained on backbone {model}, not {backbone.spec.model_name}; pass "
                f"--teacher-model {model} if that is the teacher you mean. Nothing was run."
            )
        return
    state, _ = read_reference_checkpoint(given.path)
    tensors, report = convert_reference_state_dict(state, str(given.path))
    prefix = state.get("prompt_learner.token_prefix")
    if prefix is not None and int(prefix.shape[0]) != len(classes):
        raise ProtocolError(
            f"{given.path}: the teacher was trained on {int(prefix.shape[0])} classes, not {job.dataset}'s "
            f"{len(classes)} {what}. Nothing was run."
        )
    try:
        check_fits_backbone(tensors, report, backbone, {k: state[k] for k in report.frozen_weights})
    except CheckpointError as error:
        raise ProtocolError(f"{error} Nothing was run.") from error


def install_given_teacher(spec: ProtocolSpec, job: Job, given: GivenTeacher, backbone: Any) -> None:
    """Put the teacher at ``<seed folder>/teacher/prompts.*``: a promptkd checkpoint copied, a Dassl file converted
    (``promptkd convert``'s machinery); redone only when the source's content changed."""
    import shutil

    from promptkd.checkpoints import atomic_write_text, convert_reference_checkpoint

    marker = job.teacher_dir / "source.json"
    if marker.is_file() and json.loads(marker.read_text(encoding="utf-8")).get("sha256") == given.sha256:
        return
    job.teacher_dir.mkdir(parents=True, exist_ok=True)
    target = job.teacher_dir / "prompts"
    if given.kind == "native":
        shutil.copyfile(given.path, target.with_suffix(".safetensors"))
        shutil.copyfile(given.path.with_suffix(".json"), target.with_suffix(".json"))
    else:
        classes = _expected_classes(spec, job.dataset)
        _, report = convert_reference_checkpoint(given.path, target, backbone=backbone, classnames=classes)
        logger.info("%s", report.summary())
    record = {"source": str(given.path), "kind": given.kind, "sha256": given.sha256}
    atomic_write_text(marker, json.dumps(record, indent=2) + "\n")


# --- stages ---------------------------------------------------------------------------------------------------------
def _done(folder: Path, checkpoint: Path) -> bool:
    """A training stage is finished when its ``done.json`` names the checkpoint's current content."""
    from promptkd.checkpoints import file_sha256

    marker = folder / "done.json"
    if not (marker.is_file() and checkpoint.is_file()):
        return False
    try:
        return json.loads(marker.read_text(encoding="utf-8")).get("sha256") == file_sha256(checkpoint)
    except (OSError, ValueError):
        return False


def _mark_done(folder: Path, checkpoint: Path, info: Any) -> None:
    from promptkd.checkpoints import atomic_write_text, file_sha256
    from promptkd.engine.distributed import barrier

    if info.is_main:
        atomic_write_text(folder / "done.json", json.dumps({"sha256": file_sha256(checkpoint)}) + "\n")
    barrier(info)


def teacher_stage(job: Job, info: Any) -> bool:
    """Train the PromptSRC teacher unless finished (the engine resumes an unfinished one); True when it ran."""
    from promptkd.engine.run import run_training

    checkpoint = job.teacher_dir / "prompts.safetensors"
    if job.teacher_run is None or _done(job.teacher_dir, checkpoint):
        return False
    logger.info("teacher: promptsrc on %s seed %d -> %s", job.dataset, job.seed, job.teacher_dir)
    run_training(job.teacher_run)  # joins the process group torchrun describes, as distillation does
    _mark_done(job.teacher_dir, checkpoint, info)
    return True


def build_job_teacher(job: Job, device: Any) -> tuple[Any, Any]:
    """(teacher, dataset splits): the teacher built exactly as the distillation builds it (same identity)."""
    from promptkd.data.datasets import resolve_dataset
    from promptkd.distill.teacher import build_teacher

    cfg = job.distill
    splits = resolve_dataset(job.dataset, cfg.data_root)
    teacher = build_teacher(
        cfg.teacher,
        quick_gelu=cfg.teacher_quick_gelu,
        classnames=list(splits.classnames),
        templates=[splits.template],
        device=device,
        precision=cfg.train.precision,
        seed=cfg.seed,
    )
    return teacher, splits


def stored_features(teacher: Any, classnames: list[str], path: Path, info: Any) -> tuple[Any, bool]:
    """The teacher's features of ``classnames`` from ``path`` when they are this teacher's, else computed once and
    stored there; (features, computed)."""
    from promptkd.distill.teacher import TeacherError, TeacherFeatures
    from promptkd.engine.distributed import barrier

    barrier(info)  # every process judges the same file (no rank reads what another is writing)
    if path.is_file():
        try:
            features = TeacherFeatures.load(path)
            features.check(classnames=classnames, teacher=teacher.identity)
            barrier(info)
            return features, False
        except TeacherError as error:
            logger.info("recomputing teacher features %s (%s)", path, error)
    features = teacher.compute_features(classnames)
    barrier(info)
    if info.is_main:
        features.save(path)
    barrier(info)
    return features, True


def student_stage(job: Job, info: Any) -> bool:
    """Distil the student unless finished (the engine resumes an unfinished run); True when it ran."""
    from promptkd.distill.run import run_distillation

    folder = Path(job.distill.out)
    checkpoint = folder / "prompts.safetensors"
    if _done(folder, checkpoint):
        return False
    logger.info("student: promptkd on %s seed %d -> %s", job.dataset, job.seed, folder)
    run_distillation(job.distill)
    _mark_done(folder, checkpoint, info)
    return True


# --- scoring --------------------------------------------------------------------------------------------------------
def score(method: Any, splits: Any, halves: list[str], precision: str, info: Any) -> list[tuple[str, Any, dict, int]]:
    """(half, part, metrics, images) for each half of the test split that has images, each among its own classes."""
    from promptkd.data.items import ImageDataset
    from promptkd.data.sampling import subsample_classes
    from promptkd.data.transforms import build_transform
    from promptkd.engine.trainer import predict_logits
    from promptkd.evaluation.metrics import classification_metrics

    transform = build_transform(method.backbone.preprocess, train=False)
    out = []
    for half in halves:
        part = subsample_classes(splits, half) if half != "all" else splits
        if not part.test:
            continue
        method.set_classnames(list(part.classnames))
        logits, labels = predict_logits(
            method, ImageDataset(part.test, transform), precision=precision, device=method.backbone.device, info=info
        )
        out.append((half, part, classification_metrics(logits, labels), len(labels)))
    return out


def write_scores(
    scored: list, method: Any, folder: Path, *, protocol: str, seed: int | None, role: str, info: Any, **extra: Any
) -> None:
    from promptkd.engine.distributed import barrier
    from promptkd.results import make_result, write_result

    for half, part, metrics, count in scored if info.is_main else []:
        result = make_result(
            dataset=part.name,
            task="classification",
            metrics=metrics,
            method=method.name,
            backbone=method.backbone,
            protocol=protocol,
            subsample=half,
            seed=seed,
            num_classes=len(part.classnames),
            num_samples=count,
            extra={"role": role, **extra},
        )
        write_result(result, folder)
    barrier(info)  # the next check for finished results sees the same files on every process


def zeroshot_student(spec: ProtocolSpec, job: Job, splits: Any, device: Any, info: Any, folder: Path) -> bool:
    """Score the student's zero-shot CLIP (the dataset's template) on the job's halves, or source and targets."""
    from promptkd.backbones import load_backbone
    from promptkd.backbones.loading import run_weights
    from promptkd.data.datasets import resolve_dataset
    from promptkd.methods import get_method
    from promptkd.methods.base import config_from

    places = _places(spec, job, splits, folder)
    if all(_results_exist(where) for _, where, _ in places):
        return False
    cfg = job.distill
    weights = run_weights(cfg.student_model, cfg.student_pretrained, flag="--student-pretrained")
    backbone = load_backbone(cfg.student_model, weights, device=device, precision=cfg.train.precision).freeze()
    cls = get_method("zeroshot")
    for name, where, halves in places:
        if _results_exist(where):
            continue
        part = splits if name == job.dataset else resolve_dataset(name, cfg.data_root)
        method = cls(backbone, list(part.classnames), config_from(cls, {"templates": [part.template]}))
        scored = score(method, part, halves, cfg.train.precision, info)
        write_scores(scored, method, where, protocol=spec.protocol, seed=None, role="zeroshot_student", info=info)
    return True


def _places(spec: ProtocolSpec, job: Job, splits: Any, folder: Path) -> list[tuple[str, Path, list[str]]]:
    """(dataset, result folder, halves) scored for a job: base / novel / all of the dataset (base-to-novel), or the
    source's and each target's classes (transfer)."""
    if spec.protocol == "base2new":
        return [(job.dataset, folder, ["base", "new", "all"])]
    return [(name, folder / "targets" / name, ["all"]) for name in [job.dataset, *job.targets]]


def score_teacher(spec: ProtocolSpec, job: Job, teacher: Any, splits: Any, info: Any) -> bool:
    """The teacher's rows: a given teacher on base and novel, or any teacher on the transfer source and targets (a
    trained base-to-novel teacher was scored by its own run)."""
    from promptkd.data.datasets import resolve_dataset

    if spec.protocol == "base2new" and job.teacher_run is not None:
        return False
    ran = False
    for name, where, halves in _places(spec, job, splits, job.teacher_dir):
        if _results_exist(where):
            continue
        part = splits if name == job.dataset else resolve_dataset(name, job.distill.data_root)
        scored = score(teacher.method, part, halves, job.distill.train.precision, info)
        extra = {"source": job.dataset} if spec.protocol != "base2new" else {}
        write_scores(
            scored, teacher.method, where, protocol=spec.protocol, seed=job.seed, role="teacher", info=info, **extra
        )
        ran = True
    teacher.method.set_classnames(list(splits.classnames))
    return ran


def score_student_transfer(spec: ProtocolSpec, job: Job, teacher: Any, splits: Any, info: Any) -> bool:
    """The distilled student on the source and every target, with the teacher's stored features of each one's
    classes (computed once per target, beside its results)."""
    from promptkd.data.datasets import resolve_dataset
    from promptkd.distill.run import student_method
    from promptkd.methods import get_method

    cfg = job.distill
    ran = False
    for name, where, halves in _places(spec, job, splits, Path(cfg.out)):
        if _results_exist(where):
            continue
        part = splits if name == job.dataset else resolve_dataset(name, cfg.data_root)
        path = job.features if name == job.dataset else job.folder / "targets" / name / "teacher_features.safetensors"
        features, _ = stored_features(teacher, list(part.classnames), path, info)
        student = get_method(student_method(cfg.student_model)).from_checkpoint(
            Path(cfg.out) / "prompts.safetensors",
            features,
            classnames=list(part.classnames),
            device=teacher.backbone.device,
            precision=cfg.train.precision,
        )
        scored = score(student, part, halves, cfg.train.precision, info)
        write_scores(
            scored, student, where, protocol=spec.protocol, seed=job.seed, role="student", info=info, source=job.dataset
        )
        ran = True
    return ran


# --- the protocol ---------------------------------------------------------------------------------------------------
def _backbone(model: str, pretrained: str | None, flag: str, device: Any) -> Any:
    from promptkd.backbones import load_backbone
    from promptkd.backbones.loading import run_weights

    return load_backbone(model, run_weights(model, pretrained, flag=flag), device=device).freeze()


def check_student_preset(job: Job, device: Any) -> None:
    """Refuse a student preset whose prompts do not fit the student (e.g. the paper's depth 9 on a 3-block
    student), before any teacher is trained."""
    from promptkd.distill.run import student_method
    from promptkd.methods.prompted import PromptConfigError, check_depth
    from promptkd.prompts import PromptedImageEncoder

    cfg = job.distill
    if student_method(cfg.student_model) != "promptkd":
        return
    backbone = _backbone(cfg.student_model, cfg.student_pretrained, "--pretrained", device)
    depth = int(cfg.method_config.get("vision_depth", 9))
    try:
        check_depth("promptkd", "vision_depth", depth, PromptedImageEncoder(backbone.model).n_blocks, "image", backbone)
    except PromptConfigError as error:
        raise ProtocolError(f"the student preset cannot take this student: {error} Nothing was run.") from error


def preflight(spec: ProtocolSpec, jobs: list[Job], device: Any, info: Any) -> dict[tuple[str, int], GivenTeacher]:
    """Every check that can refuse the command, before any work: teacher files, student preset, folders' recipes."""
    given: dict[tuple[str, int], GivenTeacher] = {}
    teacher_backbone = None
    if spec.teacher:
        given = find_given_teachers(spec, jobs)
        pair = _pair(spec)
        teacher_backbone = _backbone(pair["teacher_model"], pair["teacher_pretrained"], "--teacher-pretrained", device)
        for job in jobs:
            check_given_teacher(spec, job, given[(job.dataset, job.seed)], teacher_backbone)
    check_student_preset(jobs[0], device)
    for job in jobs:
        sha = given[(job.dataset, job.seed)].sha256 if spec.teacher else None
        check_recipe(job, recipe(spec, job, sha))
    from promptkd.checkpoints import atomic_write_text
    from promptkd.engine.distributed import barrier

    for job in jobs:  # only now: the recipes, then converted teachers (nothing above wrote a file)
        if info.is_main:
            sha = given[(job.dataset, job.seed)].sha256 if spec.teacher else None
            atomic_write_text(job.folder / RECIPE, json.dumps(recipe(spec, job, sha), indent=2) + "\n")
            if spec.teacher:
                install_given_teacher(spec, job, given[(job.dataset, job.seed)], teacher_backbone)
    barrier(info)
    return given


def run_promptkd_protocol(spec: ProtocolSpec) -> dict[str, Any]:
    """Teacher, stored features, zero-shot student and distilled student for every (dataset, seed) not finished;
    then the report (the protocol's table plus the distillation summary)."""
    from promptkd.engine.distributed import init_distributed

    if spec.mode not in ("transductive", "inductive"):
        raise ProtocolError(f"--mode {spec.mode!r}: expected transductive or inductive")
    if spec.mode == "inductive" and spec.protocol != "base2new":
        raise ProtocolError("--mode inductive applies to base2new (transfer students see all source classes)")
    jobs = plan(spec)
    info, device = init_distributed(spec.device or "auto")
    preflight(spec, jobs, device, info)
    ran = {"teachers": 0, "features": 0, "students": 0, "scored": 0}
    for job in jobs:
        ran["teachers"] += teacher_stage(job, info)
        teacher, splits = build_job_teacher(job, device)
        ran["features"] += stored_features(teacher, list(splits.classnames), job.features, info)[1]
        ran["scored"] += score_teacher(spec, job, teacher, splits, info)
        zs = job.folder.parent / "zeroshot_student"
        ran["scored"] += zeroshot_student(spec, job, splits, device, info, zs)
        del teacher  # the distillation builds its own
        ran["students"] += student_stage(job, info)
        if spec.protocol != "base2new":
            teacher, splits = build_job_teacher(job, device)
            ran["scored"] += score_student_transfer(spec, job, teacher, splits, info)
    return {"runs": len(jobs), **ran, "report": write_protocol_report(Path(spec.out) / spec.protocol, info)}


# --- the report -----------------------------------------------------------------------------------------------------
ROLES = {"teacher": "Teacher", "zeroshot_student": "Zero-shot student", "student": "PromptKD student"}


def result_role(result: dict[str, Any]) -> str | None:
    """teacher / student / zero-shot student of a PromptKD protocol result (a trained teacher's results are those in
    its run folder ``teacher/``); None for results of other runs."""
    if result.get("role") in ROLES:
        return str(result["role"])
    if result.get("method") in STUDENT_METHODS:
        return "student"
    path = Path(str(result.get("_path", "")))
    return "teacher" if path.parent.name == "teacher" and path.parent.parent.name.startswith("seed_") else None


def _collect(results: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, dict[Any, dict[str, float]]]]:
    """(protocol, dataset) -> role -> seed -> {subsample: top-1 %}."""
    table: dict[tuple[str, str], dict[str, dict[Any, dict[str, float]]]] = {}
    for r in results:
        role = result_role(r)
        if role is None or "acc1" not in r.get("metrics", {}):
            continue
        key = (str(r.get("protocol")), str(r["dataset"]))
        cell = table.setdefault(key, {}).setdefault(role, {}).setdefault(r.get("seed"), {})
        cell[str(r.get("subsample") or "all")] = 100.0 * float(r["metrics"]["acc1"])
    return table


def _stats(values: list[float]) -> tuple[float, float]:
    from promptkd.results import Stat

    stat = Stat.of(values)
    return stat.mean, stat.std


def _role_summary(seeds: dict[Any, dict[str, float]], b2n: bool) -> dict[str, Any]:
    """Means and std over seeds; for base-to-novel the HM of the mean base and novel (the papers' rule) and the std
    of the per-seed HMs."""
    from promptkd.evaluation.metrics import harmonic_mean

    if not b2n:
        values = [s["all"] for s in seeds.values() if "all" in s]
        mean, std = _stats(values)
        return {
            "score": mean,
            "std": std,
            "seeds": len(values),
            "per_seed": {str(k): s.get("all") for k, s in seeds.items()},
        }
    pairs = {k: (s["base"], s["new"]) for k, s in seeds.items() if "base" in s and "new" in s}
    (base, base_std), (novel, novel_std) = (_stats([p[i] for p in pairs.values()]) for i in (0, 1))
    per_seed = {str(k): harmonic_mean(b, n) for k, (b, n) in pairs.items()}
    return {
        "base": base,
        "base_std": base_std,
        "novel": novel,
        "novel_std": novel_std,
        "score": harmonic_mean(base, novel) if pairs else float("nan"),
        "std": _stats(list(per_seed.values()))[1],
        "seeds": len(pairs),
        "per_seed": per_seed,
    }


def _gap(student: float, teacher: float, zeroshot: float) -> float | None:
    """Share of the teacher - zero-shot student gap the student closes, in %."""
    return None if abs(teacher - zeroshot) < 1e-9 else 100.0 * (student - zeroshot) / (teacher - zeroshot)


def distillation_summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per protocol and dataset: teacher, zero-shot student and student (mean and spread over seeds), the gap closed
    (from the mean scores, and its spread over seeds), and the averages over datasets."""
    out: dict[str, Any] = {}
    for (protocol, dataset), roles in sorted(_collect(results).items()):
        if not {"teacher", "student", "zeroshot_student"} <= set(roles):
            continue
        b2n = protocol == "base2new"
        row = {role: _role_summary(roles[role], b2n) for role in ROLES}
        zs = row["zeroshot_student"]["score"]
        row["gap_closed"] = _gap(row["student"]["score"], row["teacher"]["score"], zs)
        teacher_seeds = row["teacher"]["per_seed"]
        per_seed = [
            _gap(v, teacher_seeds[k], zs)
            for k, v in row["student"]["per_seed"].items()
            if v is not None and teacher_seeds.get(k) is not None
        ]
        valid = [g for g in per_seed if g is not None]
        row["gap_closed_std"] = _stats(valid)[1] if len(valid) > 1 else None
        out.setdefault(protocol, {"datasets": {}})["datasets"][dataset] = row
    sources = {(str(r.get("protocol")), str(r.get("source"))) for r in results if r.get("source")}
    for protocol, block in out.items():
        for dataset, row in block["datasets"].items():
            row["source"] = (protocol, dataset) in sources
        targets = [row for row in block["datasets"].values() if not row["source"]]  # transfer: the targets' mean
        block["average"] = _average(targets, protocol == "base2new") if targets else None
        modes = {r.get("mode") for r in results if result_role(r) == "student" and r.get("protocol") == protocol}
        block["mode"] = ", ".join(sorted(str(m) for m in modes if m)) or "transductive"
    return out


def _average(rows: list[dict[str, Any]], b2n: bool) -> dict[str, Any]:
    from promptkd.evaluation.metrics import harmonic_mean

    avg: dict[str, Any] = {}
    for role in ROLES:
        if b2n:
            base = sum(r[role]["base"] for r in rows) / len(rows)
            novel = sum(r[role]["novel"] for r in rows) / len(rows)
            avg[role] = {"base": base, "novel": novel, "score": harmonic_mean(base, novel)}
        else:
            avg[role] = {"score": sum(r[role]["score"] for r in rows) / len(rows)}
    avg["gap_closed"] = _gap(avg["student"]["score"], avg["teacher"]["score"], avg["zeroshot_student"]["score"])
    return avg


def _cell(summary: dict[str, Any], b2n: bool) -> str:
    def pm(value: float, std: float | None) -> str:
        return f"{value:.1f}" + (f" ± {std:.1f}" if std else "")

    if b2n:
        return (
            f"{pm(summary['base'], summary.get('base_std'))} / {pm(summary['novel'], summary.get('novel_std'))} / "
            f"{summary['score']:.1f}"
        )
    return pm(summary["score"], summary.get("std"))


def distillation_section(summary: dict[str, Any]) -> str:
    """Markdown in the paper's layout: one line per dataset, teacher / zero-shot student / student, gap closed."""
    lines: list[str] = []
    for protocol, block in summary.items():
        b2n = protocol == "base2new"
        what = "base / novel / HM" if b2n else "top-1"
        mode = block["mode"]
        images = "all classes, transductive" if mode == "transductive" else f"{mode}"
        if mode == "inductive":
            images = "the base classes only, inductive"
        lines += [
            f"## PromptKD ({protocol})",
            "",
            f"Students distilled on the unlabelled training images of {images}; {what} in %, mean ± std over seeds"
            + ("; HM of the mean base and novel" if b2n else "")
            + "; gap closed = (student - zero-shot student) / (teacher - zero-shot student), ± over seeds.",
            "",
        ]
        head = ["Dataset", *(f"{ROLES[r]} {what}" for r in ROLES), "Student HM std" if b2n else "Seeds", "Gap closed"]
        body = []
        for dataset, row in block["datasets"].items():
            spread = f"{row['student']['std']:.1f}" if b2n else str(row["student"]["seeds"])
            gap = "–" if row["gap_closed"] is None else f"{row['gap_closed']:.0f}%"
            if row["gap_closed"] is not None and row.get("gap_closed_std") is not None:
                gap += f" ± {row['gap_closed_std']:.0f}"
            name = f"{dataset} (source)" if row["source"] else dataset
            body.append([name, *(_cell(row[r], b2n) for r in ROLES), spread, gap])
        avg = block["average"]
        if avg is not None and (not b2n or len(block["datasets"]) > 1):
            gap = "–" if avg["gap_closed"] is None else f"{avg['gap_closed']:.0f}%"
            count = sum(not row["source"] for row in block["datasets"].values())
            label = f"**Average** ({count})" if b2n else f"**Average of the {count} targets**"
            body.append([label, *(_cell(avg[r], b2n) for r in ROLES), "", gap])
        from promptkd.results import _markdown_table

        lines += [*_markdown_table(head, body), ""]
    return "\n".join(lines)


def write_protocol_report(root: Path, info: Any) -> dict[str, str]:
    """The protocol's usual report (``report.md`` / ``report.json`` / charts) with the PromptKD section added."""
    from promptkd.results import aggregate, find_results

    if not info.is_main:
        return {}
    results = find_results([root])
    paths = write_report_with_distillation(aggregate([r for r in results if r.get("method")]), results, root)
    return {k: str(v) for k, v in paths.items()}


def write_report_with_distillation(
    report: Any, results: list[dict[str, Any]], out: str | Path, *, plot: bool = True
) -> dict[str, Path]:
    """``write_report`` plus, when the results hold PromptKD protocol runs, their section in ``report.md`` and
    ``report.json`` (``promptkd report`` calls this too: one report)."""
    from promptkd.checkpoints import atomic_write_text
    from promptkd.results import write_report

    paths = write_report(report, out, plot=plot)
    summary = distillation_summary(results)
    if summary:
        md = Path(paths["markdown"])
        atomic_write_text(md, md.read_text(encoding="utf-8").rstrip("\n") + "\n\n" + distillation_section(summary))
        data = json.loads(Path(paths["json"]).read_text(encoding="utf-8"))
        data["distillation"] = summary
        atomic_write_text(Path(paths["json"]), json.dumps(data, indent=2, default=str) + "\n")
    return paths
