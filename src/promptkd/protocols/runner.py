"""The papers' evaluation protocols, each one command over datasets x seeds (x shots), resumable.

- ``few_shot`` (CoOp): K in {1, 2, 4, 8, 16} labelled images per class, all classes, full test split.
- ``base2new`` (CoCoOp/MaPLe/PromptSRC): 16 shots of the base half; scored on base and new test halves, HM.
- ``cross_dataset``: train on a source with all classes (16 shots), evaluate zero-shot transfer on targets (the
  class-token buffers are rebuilt from each target's class names).
- ``domain_generalization``: the source-trained model evaluated on shifted variants of the source (same classes;
  ImageNet-A/-R style 200-class subsets are just their own class lists).

Every run lives in ``<out>/<protocol>/<dataset>/<method>/<shots|seed>/`` and is skipped when its result files
exist; an interrupted run resumes from its last epoch. The protocol's report (Markdown table in the papers' layout
and bar/curve plots) is rebuilt from all result files at the end.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from promptkd.errors import PromptKDError

if TYPE_CHECKING:
    from promptkd.engine.run import RunConfig

logger = logging.getLogger(__name__)

PROTOCOLS = ("few_shot", "base2new", "cross_dataset", "domain_generalization")


class ProtocolError(PromptKDError, ValueError):
    pass


@dataclass
class ProtocolSpec:
    protocol: str
    method: str
    preset: str | None
    datasets: list[str]
    seeds: list[int]
    out: str
    data_root: str | None = None
    shots: list[int] | None = None
    targets: list[str] | None = None
    model: str | None = None
    pretrained: str | None = None
    device: str | None = None
    overrides: list[str] | None = None
    # --method promptkd only: where the teacher comes from, how the student sees images, what is kept
    teacher: str | None = None  # folder of per-dataset (per-seed) teacher checkpoints; None: trained per seed
    teacher_preset: str | None = None
    teacher_model: str | None = None
    teacher_pretrained: str | None = None
    teacher_overrides: list[str] | None = None
    mode: str = "transductive"
    teacher_cache: bool = False
    progress: bool = True


def _results_exist(folder: Path) -> bool:
    """A run is finished when its folder holds at least one result JSON (written after the test evaluation).

    A JSON file that cannot be read (truncated, not UTF-8) is never passed over in silence: a damaged result is
    moved aside to ``<name>.corrupt`` (kept, and out of the report's way) with a warning that the run will be
    recomputed; a damaged file beside a checkpoint (its config) is only named, for the run's resume to judge."""
    import json

    from promptkd.results import is_result

    if not folder.is_dir():
        return False
    found = False
    for path in sorted(folder.glob("*.json")):
        try:
            found = found or is_result(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError) as error:
            _set_aside(path, error)
    return found


def _set_aside(path: Path, error: Exception) -> None:
    if path.with_suffix(".safetensors").exists():
        logger.warning("%s cannot be read (%s); the run in %s is checked by its resume", path, error, path.parent)
        return
    kept = path.with_name(path.name + ".corrupt")
    path.replace(kept)
    logger.warning(
        "%s cannot be read (%s): kept as %s; if it was this run's result, the run is recomputed", path, error, kept
    )


def _base_config(spec: ProtocolSpec, dataset: str, seed: int, shots: int, subsample: str, out: Path) -> RunConfig:
    base = {
        "dataset": dataset,
        "data_root": spec.data_root,
        "shots": shots,
        "subsample": subsample,
        "seed": seed,
        "model": spec.model,
        "pretrained": spec.pretrained,
        "device": spec.device,
        "out": str(out),
    }
    from promptkd.engine.run import resolve_run_config

    return resolve_run_config(spec.method, spec.preset, per_run_overrides(spec.overrides, dataset, seed), base)


def per_run_overrides(overrides: Sequence[str] | None, dataset: str, seed: int) -> list[str]:
    """``--set`` values with ``{dataset}`` and ``{seed}`` filled in per run, so a stage over earlier runs names
    each one (e.g. DPC: ``method.base=runs/coop/base2new/{dataset}/coop/seed_{seed}``)."""
    return [item.replace("{dataset}", dataset).replace("{seed}", str(seed)) for item in overrides or []]


def run_protocol(spec: ProtocolSpec) -> dict[str, Any]:
    """Run every (dataset, seed[, shots]) of a protocol that has no results yet; then write the report."""
    from promptkd.results import aggregate, find_results, write_report

    if spec.protocol not in PROTOCOLS:
        raise ProtocolError(f"unknown protocol {spec.protocol!r}; expected one of {', '.join(PROTOCOLS)}")
    if spec.method == "promptkd":  # teacher -> stored features -> student, per dataset and seed
        if spec.protocol == "few_shot":
            raise ProtocolError(
                "promptkd has no few_shot protocol (the paper: base2new, cross_dataset, domain_generalization)"
            )
        from promptkd.protocols.promptkd import run_promptkd_protocol

        return run_promptkd_protocol(spec)
    _refuse_teacher_options(spec)
    if spec.protocol in ("cross_dataset", "domain_generalization") and not spec.targets:
        raise ProtocolError(f"{spec.protocol} needs --targets (datasets to evaluate the source-trained model on)")
    root = Path(spec.out) / spec.protocol
    done, skipped = 0, 0
    jobs = _jobs(spec, root)
    for config, targets in jobs:
        folder = Path(config.out)
        if _results_exist(folder) and (not targets or all(_results_exist(folder / "targets" / t) for t in targets)):
            skipped += 1
            continue
        logger.info("%s: %s on %s seed %d -> %s", spec.protocol, spec.method, config.dataset, config.seed, folder)
        from promptkd.engine.run import run_training

        outcome = run_training(config)
        if targets:
            _evaluate_targets(config, outcome, targets, spec.protocol)
        done += 1
    results = [r for r in find_results([root]) if r.get("method")]
    report = aggregate(results)
    paths = write_report(report, root) if results else {}
    return {"runs": len(jobs), "ran": done, "skipped": skipped, "report": {k: str(v) for k, v in paths.items()}}


def _refuse_teacher_options(spec: ProtocolSpec) -> None:
    """Teacher and distillation options mean nothing to other methods: refused rather than ignored."""
    given = [
        name
        for name, value in (
            ("--teacher", spec.teacher),
            ("--teacher-preset", spec.teacher_preset),
            ("--teacher-model", spec.teacher_model),
            ("--teacher-pretrained", spec.teacher_pretrained),
            ("--teacher-set", spec.teacher_overrides),
            ("--teacher-cache", spec.teacher_cache),
            ("--mode", spec.mode != "transductive"),
        )
        if value
    ]
    if given:
        raise ProtocolError(f"{', '.join(given)} apply to --method promptkd only, not {spec.method}")


def _jobs(spec: ProtocolSpec, root: Path) -> list[tuple[RunConfig, list[str]]]:
    jobs: list[tuple[RunConfig, list[str]]] = []
    for dataset in spec.datasets:
        for seed in spec.seeds:
            if spec.protocol == "few_shot":
                for shots in spec.shots or [1, 2, 4, 8, 16]:
                    out = root / dataset / spec.method / f"shots_{shots}" / f"seed_{seed}"
                    jobs.append((_base_config(spec, dataset, seed, shots, "all", out), []))
            elif spec.protocol == "base2new":
                out = root / dataset / spec.method / f"seed_{seed}"
                jobs.append((_base_config(spec, dataset, seed, (spec.shots or [16])[0], "base", out), []))
            else:
                out = root / dataset / spec.method / f"seed_{seed}"
                jobs.append(
                    (_base_config(spec, dataset, seed, (spec.shots or [16])[0], "all", out), list(spec.targets or []))
                )
    return jobs


def _evaluate_targets(config: RunConfig, outcome, targets: Sequence[str], protocol: str) -> None:
    """Score the trained method on each target dataset's test split with the target's class names."""
    from promptkd.backbones import load_backbone
    from promptkd.backbones.loading import run_weights
    from promptkd.config import to_dict
    from promptkd.data.datasets import resolve_dataset
    from promptkd.data.items import ImageDataset
    from promptkd.data.transforms import build_transform
    from promptkd.engine.trainer import predict_logits
    from promptkd.evaluation.metrics import classification_metrics
    from promptkd.methods import get_method
    from promptkd.methods.base import config_from
    from promptkd.results import make_result, write_result

    method_cls = get_method(config.method)
    backbone = load_backbone(config.model, run_weights(config.model, config.pretrained), quick_gelu=config.quick_gelu)
    stored = outcome.train.checkpoint
    for target in targets:
        splits = resolve_dataset(target, config.data_root)
        method = method_cls(backbone, _source_classes(stored), config_from(method_cls, config.method_config))
        method.load(stored)
        method.set_classnames(splits.classnames)  # class-bound methods (CoOp CSC, Tip-Adapter) refuse here
        test_set = ImageDataset(splits.test, build_transform(backbone.preprocess, train=False))
        logits, labels = predict_logits(method, test_set, precision=config.train.precision)
        metrics = classification_metrics(logits, labels)
        result = make_result(
            dataset=target,
            task="classification",
            metrics=metrics,
            method=method.name,
            backbone=backbone,
            protocol=protocol,
            seed=config.seed,
            num_shots=config.shots,
            num_classes=len(splits.classnames),
            num_samples=len(labels),
            config={**to_dict(config), "source": config.dataset},
            selection=outcome.train.selection,
            extra={"source": config.dataset},
        )
        write_result(result, Path(config.out) / "targets" / target)


def _source_classes(checkpoint) -> list[str]:
    from promptkd.checkpoints import load_checkpoint

    return list(load_checkpoint(checkpoint)[1].get("classnames") or [])
