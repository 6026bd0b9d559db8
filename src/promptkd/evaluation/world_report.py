"""What a pair of CLIPs can do on a dataset: zero-shot and full-data linear probe, base / novel / HM / all, and speed.

The embedded world is only a faithful miniature of the real teacher-student setting when its CLIPs have the real
pair's properties: the student sees what the teacher sees and is several times cheaper, its frozen features carry
the classes (a linear probe trained on every labelled train image is far above its zero-shot), and zero-shot
leaves room (the student's is well below the teacher's, the teacher's well below its own probe). This module
measures those properties on any dataset in the split layout; ``promptkd world-report`` runs it on the world and
checks them (:func:`check_properties`).

Both classifiers score every test image among all classes once; "base" and "novel" then restrict the scores to the
first ``ceil(C/2)`` and the other classes and score each half's images among their own half (the papers' protocol,
identical to re-evaluating on :func:`~promptkd.data.sampling.subsample_classes`), and "all" is the full C-way
accuracy. The probe's regulariser is chosen on the validation split only (:mod:`~promptkd.evaluation.linear_probe`).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from promptkd.data.items import DatasetSplits, ImageDataset
from promptkd.data.sampling import base_new_labels
from promptkd.data.transforms import eval_transform
from promptkd.evaluation.features import FeatureSet, extract_features
from promptkd.evaluation.linear_probe import linear_probe
from promptkd.evaluation.metrics import harmonic_mean
from promptkd.evaluation.zeroshot import zeroshot_classifier, zeroshot_logits

__all__ = [
    "README_END",
    "README_START",
    "PairProperties",
    "check_properties",
    "half_accuracies",
    "images_per_second",
    "measure_backbone",
    "measure_pair",
    "report_markdown",
    "update_readme",
]


def half_accuracies(scores: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Top-1 % of base images among the base classes, novel among novel, their HM, and all-way accuracy."""
    num_classes = scores.shape[1]
    base, novel = base_new_labels(range(num_classes))
    out: dict[str, float] = {}
    for name, classes in (("base", base), ("novel", novel)):
        columns = torch.tensor(classes, dtype=torch.long)
        keep = torch.isin(labels, columns)
        if not keep.any():
            out[name] = math.nan
            continue
        predicted = columns[scores[keep][:, columns].argmax(dim=1)]
        out[name] = 100.0 * (predicted == labels[keep]).float().mean().item()
    out["hm"] = harmonic_mean(out["base"], out["novel"])
    out["all"] = 100.0 * (scores.argmax(dim=1) == labels).float().mean().item()
    return out


def _features(backbone: Any, splits: DatasetSplits, which: str, cache_dir: str | os.PathLike[str] | None) -> FeatureSet:
    dataset = ImageDataset(splits.split(which), eval_transform(backbone.preprocess))
    return extract_features(backbone, dataset, batch_size=256, cache_dir=cache_dir, progress=False, desc=which)


def measure_backbone(
    backbone: Any,
    splits: DatasetSplits,
    *,
    probe: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
) -> dict[str, dict[str, float]]:
    """Zero-shot (the dataset's single template) and, with ``probe``, full-data linear-probe accuracies.

    Returns ``{"zeroshot": {base, novel, hm, all}, "linear_probe": {base, novel, hm, all, C}}``.
    """
    test = _features(backbone, splits, "test", cache_dir)
    weights = zeroshot_classifier(backbone, splits.classnames, [splits.template])
    out = {"zeroshot": half_accuracies(zeroshot_logits(backbone, test.features, weights), test.labels)}
    if probe:
        train = _features(backbone, splits, "train", cache_dir)
        val = _features(backbone, splits, "val", cache_dir)
        result = linear_probe(train, val, test, num_classes=splits.num_classes)
        x = test.features.double()  # scored on the features the probe was fitted on (raw, as lpclip, by default)
        if result.selection["features"] == "normalized":
            x = torch.nn.functional.normalize(x, dim=-1)
        x = x.numpy()
        scores = torch.from_numpy(result.classifier.decision_function(x)).float()
        out["linear_probe"] = {**half_accuracies(scores, test.labels), "C": result.C}
    return out


def encoder_of(model: Any, *, batch_size: int = 256) -> Callable[[], None]:
    """One inference batch of random images through a backbone's image tower, or through a method's ``logits``
    (prompts, projector and cached class features included: what a deployed model runs per image)."""
    backbone = model.backbone if hasattr(model, "logits") else model
    size = backbone.image_size
    x = torch.randn(batch_size, 3, size, size, device=backbone.device)
    forward = model.logits if hasattr(model, "logits") else backbone.model.encode_image
    if hasattr(model, "eval"):
        model.eval()
    backbone.model.eval()

    @torch.no_grad()
    def run() -> None:
        with backbone.autocast():
            forward(x)
        if backbone.device.type == "cuda":
            torch.cuda.synchronize()

    return run


def flops_per_image(backbone: Any) -> int:
    """Floating-point operations of one image through the image tower (torch's FLOP counter): a cost that, unlike
    images/s, does not depend on what else the machine is doing (the test of the pair's properties uses it)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 3, backbone.image_size, backbone.image_size, device=backbone.device)
    backbone.model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        backbone.model.encode_image(x)
    return int(counter.get_total_flops())


def images_per_second(
    models: Sequence[Any], *, batch_size: int = 256, rounds: int = 5, min_seconds: float = 0.5
) -> list[float]:
    """Inference throughput (images/s) of each backbone's image tower or method (see :func:`encoder_of`).

    The models are timed in interleaved rounds (A, B, A, B, ...) so that a machine slowing down or speeding up
    affects all of them alike, and each figure is the median over rounds: ratios from one call compare like with
    like. Threads and device are whatever the caller set.
    """
    runs = [encoder_of(m, batch_size=batch_size) for m in models]

    def rate(run: Callable[[], None]) -> float:
        count, start = 0, time.perf_counter()
        while True:
            run()
            count += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds:
                return count * batch_size / elapsed

    for run in runs:  # warm-up (and the methods' class-feature caches)
        rate(run)
    rates: list[list[float]] = [[] for _ in runs]
    for _ in range(rounds):
        for k, run in enumerate(runs):
            rates[k].append(rate(run))
    return [sorted(r)[len(r) // 2] for r in rates]


@dataclass
class PairProperties:
    """The checks of a teacher-student pair on one dataset (each a claim with the numbers behind it)."""

    dataset: str
    checks: dict[str, bool] = field(default_factory=dict)
    details: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(self.checks.values())


def check_properties(
    dataset: str,
    teacher: dict[str, dict[str, float]],
    student: dict[str, dict[str, float]],
    speed_ratio: float | None,
    *,
    probe_gain: float = 15.0,
    zeroshot_gap: float = 8.0,
    min_speed_ratio: float = 3.0,
) -> PairProperties:
    """The real pair's properties (issue 10), from :func:`measure_backbone` outputs of both CLIPs."""
    t_zs, t_lp = teacher["zeroshot"]["hm"], teacher["linear_probe"]["hm"]
    s_zs, s_lp = student["zeroshot"]["hm"], student["linear_probe"]["hm"]
    result = PairProperties(dataset)

    def claim(name: str, ok: bool, numbers: str) -> None:
        result.checks[name], result.details[name] = bool(ok), numbers

    claim(f"student probe >= its zero-shot + {probe_gain:g} HM", s_lp >= s_zs + probe_gain, f"{s_lp:.1f} vs {s_zs:.1f}")
    claim("student probe >= teacher zero-shot HM", s_lp >= t_zs, f"{s_lp:.1f} vs {t_zs:.1f}")
    claim(
        f"student zero-shot <= teacher zero-shot - {zeroshot_gap:g} HM",
        s_zs <= t_zs - zeroshot_gap,
        f"{s_zs:.1f} vs {t_zs:.1f}",
    )
    claim("teacher zero-shot < teacher probe", t_zs < t_lp, f"{t_zs:.1f} vs {t_lp:.1f}")
    if speed_ratio is not None:
        claim(f"student >= {min_speed_ratio:g}x faster", speed_ratio >= min_speed_ratio, f"{speed_ratio:.2f}x")
    return result


def measure_pair(
    teacher: Any,
    student: Any,
    data_root: str | os.PathLike[str],
    datasets: Sequence[str],
    *,
    probe: bool = True,
    speed: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Everything ``promptkd world-report`` shows: both CLIPs on every dataset, their speed and the checks."""
    from promptkd.data.datasets import resolve_dataset

    report: dict[str, Any] = {"models": {}, "datasets": list(datasets), "checks": {}}
    for role, backbone in (("teacher", teacher), ("student", student)):
        report["models"][role] = {"spec": backbone.spec.to_dict(), "results": {}}
    for name in datasets:
        splits = resolve_dataset(name, data_root)
        for role, backbone in (("teacher", teacher), ("student", student)):
            if progress is not None:
                progress(f"{name}: {role} zero-shot{' and linear probe' if probe else ''}")
            report["models"][role]["results"][name] = measure_backbone(
                backbone, splits, probe=probe, cache_dir=cache_dir
            )
    ratio = None
    if speed:
        if progress is not None:
            progress("inference speed of both image towers")
        t_rate, s_rate = images_per_second([teacher, student])
        report["models"]["teacher"]["images_per_second"] = t_rate
        report["models"]["student"]["images_per_second"] = s_rate
        ratio = s_rate / t_rate
        report["speed_ratio"] = ratio
        report["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        report["threads"] = torch.get_num_threads()
    if probe:
        for name in datasets:
            checks = check_properties(
                name,
                report["models"]["teacher"]["results"][name],
                report["models"]["student"]["results"][name],
                ratio,
            )
            report["checks"][name] = {"ok": checks.ok, "checks": checks.checks, "details": checks.details}
    return report


def report_markdown(report: dict[str, Any]) -> list[str]:
    """The README's table: per model and dataset, zero-shot and full-data probe (B / N, HM, all), images/s."""
    probe = any("linear_probe" in r for m in report["models"].values() for r in m["results"].values())
    head = "| model | dataset | zero-shot B / N | HM | all |"
    rule = "|---|---|---|---|---|"
    if probe:
        head += " linear probe B / N | HM | all |"
        rule += "---|---|---|"
    lines = [head + " images/s |", rule + "---|"]
    for role, model in report["models"].items():
        name = model["spec"].get("model_name", role)
        rate = model.get("images_per_second")
        for k, dataset in enumerate(report["datasets"]):
            r = model["results"][dataset]
            z = r["zeroshot"]
            label = name if k == 0 else ""
            row = f"| {label} | {dataset} | {z['base']:.1f} / {z['novel']:.1f} | {z['hm']:.1f} | {z['all']:.1f} |"
            if probe:
                p = r["linear_probe"]
                row += f" {p['base']:.1f} / {p['novel']:.1f} | {p['hm']:.1f} | {p['all']:.1f} |"
            row += f" {rate:.0f} |" if (rate and k == 0) else " |"
            lines.append(row)
    return lines


def checks_markdown(report: dict[str, Any]) -> list[str]:
    """One line per dataset: each property with its numbers, met or not."""
    lines = []
    for dataset, result in report["checks"].items():
        parts = [
            f"{name} ({result['details'][name]}) {'yes' if ok else '**NO**'}" for name, ok in result["checks"].items()
        ]
        lines.append(f"- `{dataset}`: " + "; ".join(parts))
    return lines


README_START = "<!-- world-report:start -->"
README_END = "<!-- world-report:end -->"


def update_readme(path: str | os.PathLike[str], lines: Sequence[str]) -> bool:
    """Replace the text between the world-report markers of a README; False when the markers are missing."""
    from promptkd.checkpoints import atomic_write_text

    with open(path, encoding="utf-8") as f:
        text = f.read()
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        return False
    body = "\n".join([README_START, *lines, README_END])
    atomic_write_text(path, text[:start] + body + text[end + len(README_END) :])
    return True
