"""Result files, the per-folder run table, and the report that aggregates seeds and datasets as the papers do.

Every evaluation writes one JSON file that CLIP_benchmark's ``build`` step can read (``dataset``, ``model``,
``pretrained``, ``task``, ``metrics``, ``language``), extended with what prompt-learning results need to be
grouped and traced: ``method``, ``protocol``, ``split``, ``subsample`` (all/base/new), ``seed``, ``num_shots``,
``config`` + ``config_hash``, ``skipped_images`` and ``selection`` (how any hyper-parameter was chosen). Metric
values are fractions in [0, 1], as in CLIP_benchmark; reports show percentages. Writes are atomic, and each run
also appends one line to ``runs.jsonl`` in its output folder, a history that survives reruns.

Aggregation (:func:`aggregate`) follows protocols.md §3: results are grouped by (protocol, method, model,
dataset); seeds are summarised as mean ± population std; base-to-novel HM is computed from the seed-**averaged**
base and novel accuracies (never as the mean of per-seed HMs); the "Average" row over datasets takes arithmetic
means of B and N and the HM of those means (other protocols: the arithmetic mean of the headline metric).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from promptkd.checkpoints import atomic_write_text
from promptkd.errors import PromptKDError
from promptkd.evaluation.metrics import harmonic_mean

__all__ = [
    "HEADLINE_METRICS",
    "RESULT_FORMAT",
    "RESULT_VERSION",
    "RUN_TABLE",
    "AverageRow",
    "Report",
    "ReportRow",
    "ResultError",
    "Stat",
    "aggregate",
    "check_poolable",
    "config_hash",
    "find_results",
    "format_markdown",
    "is_result",
    "make_result",
    "noise_note",
    "plot_report",
    "protocol_label",
    "read_result",
    "recipe",
    "result_filename",
    "t_critical",
    "t_two_sided_p",
    "welch_test",
    "write_report",
    "write_result",
]

logger = logging.getLogger(__name__)

RESULT_FORMAT = "promptkd-result"
RESULT_VERSION = 1
RUN_TABLE = "runs.jsonl"
REPORT_FORMAT = "promptkd-report"

#: The metric shown for each task in reports (first one) and the others shown beside it.
HEADLINE_METRICS: dict[str, tuple[str, ...]] = {
    "zeroshot_classification": ("acc1",),
    "classification": ("acc1",),
    # TTA-VLM reports accuracy, ECE, time and memory per method; online runs show the spread over stream orders (seeds)
    "test_time_classification": ("acc1", "ece", "base_acc1", "base_ece", "ms_per_image", "peak_memory_mb"),
    "linear_probe": ("lp_acc1",),
    "zeroshot_retrieval": ("image_retrieval_recall@1", "text_retrieval_recall@1"),
}

_FRACTION_KEY = re.compile(r"(^|_)(acc\d*|mean_per_class_recall|recall@\d+)$")


class ResultError(PromptKDError, ValueError):
    """A result file or report request that cannot be used (missing folder, no results, malformed file)."""


# ---------------------------------------------------------------------------------------------------------------
# Writing results


def config_hash(config: Mapping[str, Any] | None) -> str:
    """Order-independent hash of a run configuration (16 hex digits)."""
    text = json.dumps(config or {}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _check_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            out[key] = value
            continue
        value = float(value)
        if _FRACTION_KEY.search(key) and not math.isnan(value) and not -1e-9 <= value <= 1 + 1e-9:
            raise ValueError(f"metric {key}={value} is not a fraction in [0, 1] (results store fractions, not %)")
        out[key] = None if math.isnan(value) else value
    return out


def make_result(
    *,
    dataset: str,
    task: str,
    metrics: Mapping[str, Any],
    method: str,
    backbone: Any = None,
    model: str | None = None,
    pretrained: str | None = None,
    protocol: str | None = None,
    split: str = "test",
    subsample: str = "all",
    seed: int | None = None,
    num_shots: int | None = None,
    num_classes: int | None = None,
    num_samples: int | None = None,
    config: Mapping[str, Any] | None = None,
    skipped_images: Sequence[str] = (),
    small_images: Sequence[str] = (),
    selection: Mapping[str, Any] | None = None,
    classnames: Sequence[str] | None = None,
    templates: Any = None,
    language: str = "en",
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A result dict in CLIP_benchmark's schema plus promptkd's fields; metrics are fractions in [0, 1].

    ``backbone`` (a :class:`~promptkd.backbones.Backbone`) fills ``model``/``pretrained`` and the full spec.
    ``subsample`` is ``all``, ``base`` or ``new`` (one result per half, headline metric = ``acc1``), or
    ``base2new`` for one run that measured both halves and stores ``base_acc1`` and ``new_acc1``.
    ``protocol`` defaults to ``base2new`` for base/new subsamples, ``few_shot`` when ``num_shots`` is set, and
    the task otherwise. ``selection`` records how hyper-parameters were chosen (e.g. the linear probe's C search);
    it must never involve the test split.
    """
    spec = backbone.spec.to_dict() if backbone is not None else None
    if spec is not None:
        model = model or spec.get("model_name")
        pretrained = pretrained if pretrained is not None else spec.get("pretrained")
    if subsample not in ("all", "base", "new", "base2new"):
        raise ValueError(f"subsample must be 'all', 'base' or 'new', not {subsample!r}")
    if protocol is None:
        protocol = "base2new" if subsample != "all" else ("few_shot" if num_shots else task)
    from promptkd import __version__

    skipped = list(skipped_images)
    result: dict[str, Any] = {
        "dataset": dataset,
        "model": model,
        "pretrained": pretrained,
        "task": task,
        "metrics": _check_metrics(metrics),
        "language": language,
        "method": method,
        "protocol": protocol,
        "split": split,
        "subsample": subsample,
        "seed": seed,
        "num_shots": num_shots,
        "num_classes": num_classes,
        "num_samples": num_samples,
        "skipped_images": len(skipped),
        "skipped_image_paths": skipped[:100],
        "small_images": len(set(small_images)),  # far smaller than the model's input: upsampled
        "selection": dict(selection) if selection is not None else None,
        "config": dict(config or {}),
        "config_hash": config_hash(config),
        "backbone": spec,
        "format": RESULT_FORMAT,
        "format_version": RESULT_VERSION,
        "promptkd_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if classnames is not None:
        result["classnames"] = list(classnames)
    if templates is not None:
        result["templates"] = templates
    if extra:
        result.update(extra)
    return result


def _slug(text: Any) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", str(text)).strip("_") or "x"


def result_filename(result: Mapping[str, Any]) -> str:
    """``<method>-<dataset>[-<subsample>][-<K>shot][-seed<S>]-<task>.json``: reruns of one setting replace it."""
    parts = [_slug(result.get("method") or "run"), _slug(result["dataset"])]
    if result.get("subsample") not in (None, "all"):
        parts.append(_slug(result["subsample"]))
    if result.get("split") not in (None, "test"):  # a val or all-images score never replaces the test score
        parts.append(_slug(result["split"]))
    if result.get("num_shots"):
        parts.append(f"{int(result['num_shots'])}shot")
    if result.get("seed") is not None:
        parts.append(f"seed{result['seed']}")
    parts.append(_slug(result.get("task") or "eval"))
    return "-".join(parts) + ".json"


def _table_row(result: Mapping[str, Any], filename: str) -> dict[str, Any]:
    keys = ("dataset", "method", "protocol", "task", "split", "subsample", "seed", "num_shots", "model", "pretrained")
    row: dict[str, Any] = {"time": result.get("created"), "file": filename}
    row.update({k: result.get(k) for k in keys})
    row["config_hash"] = result.get("config_hash")
    row["metrics"] = {k: v for k, v in result.get("metrics", {}).items() if isinstance(v, (int, float))}
    row["skipped_images"] = result.get("skipped_images", 0)
    return row


def check_result_free(out_dir: str | os.PathLike[str], result: Mapping[str, Any], *, overwrite: bool = False) -> Path:
    """The path ``result`` (or the fields that name it) will be written to; refuses, before any work, to replace an
    earlier result there unless ``overwrite`` (the evaluation commands' --overwrite, like pretrain's)."""
    path = Path(out_dir) / result_filename(result)
    if path.exists() and not overwrite:
        raise ResultError(
            f"{path} already holds a result of this setting (created {_created(path)}); pass --overwrite to replace "
            "it, --method NAME to keep both, or another --out."
        )
    return path


def _created(path: Path) -> str:
    try:
        return str(json.loads(path.read_text(encoding="utf-8")).get("created") or "?")
    except (OSError, ValueError, AttributeError):
        return "?, unreadable"


def write_result(result: Mapping[str, Any], out_dir: str | os.PathLike[str], filename: str | None = None) -> Path:
    """Write the result JSON atomically into ``out_dir`` and append a line to ``out_dir/runs.jsonl``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = filename or result_filename(result)
    path = out / name
    atomic_write_text(path, json.dumps(result, indent=2, default=str) + "\n")
    line = json.dumps(_table_row(result, name), default=str) + "\n"
    with open(out / RUN_TABLE, "a", encoding="utf-8") as f:  # one short append per run
        f.write(line)
    logger.info("wrote %s", path)
    return path


# ---------------------------------------------------------------------------------------------------------------
# Reading results


def is_result(data: Any) -> bool:
    """True for a promptkd or CLIP_benchmark result dict (``dataset``, ``task`` and a ``metrics`` mapping)."""
    return isinstance(data, dict) and "dataset" in data and "task" in data and isinstance(data.get("metrics"), dict)


def read_result(path: str | os.PathLike[str]) -> dict[str, Any]:
    """One result file; raises ResultError if it is not a result."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ResultError(f"{path}: cannot read result JSON ({error})") from error
    if not is_result(data):
        raise ResultError(f"{path}: not a result file (needs 'dataset', 'task' and a 'metrics' object)")
    data.setdefault("_path", str(path))
    return data


def find_results(paths: Iterable[str | os.PathLike[str]]) -> list[dict[str, Any]]:
    """Every result JSON in the given files and folders (folders searched recursively, hidden files skipped)."""
    found: list[dict[str, Any]] = []
    seen: set[str] = set()
    for entry in paths:
        entry = Path(entry)
        if not entry.exists():
            raise ResultError(f"{entry}: no such file or folder")
        files = [entry] if entry.is_file() else sorted(entry.rglob("*.json"))
        for file in files:
            if any(part.startswith(".") for part in file.relative_to(entry).parts) and file != entry:
                continue
            real = str(file.resolve())
            if real in seen:
                continue
            seen.add(real)
            try:
                data = json.loads(file.read_text(encoding="utf-8"))
            except (OSError, ValueError) as error:
                if file == entry:
                    raise ResultError(f"{file}: cannot read result JSON ({error})") from error
                logger.warning("skipping unreadable JSON %s (%s)", file, error)
                continue
            if is_result(data):
                data.setdefault("_path", str(file))
                found.append(data)
            elif file == entry:
                raise ResultError(f"{file}: not a result file (needs 'dataset', 'task' and a 'metrics' object)")
    return found


# ---------------------------------------------------------------------------------------------------------------
# Aggregation


def t_two_sided_p(t: float, df: float) -> float:
    """Two-sided p-value of Student's t with ``df`` (possibly fractional) degrees of freedom."""
    from scipy import stats

    if math.isnan(t) or df <= 0:
        return float("nan")
    return float(2.0 * stats.t.sf(abs(t), df))


def t_critical(df: float, level: float = 0.95) -> float:
    """The t value whose two-sided tail is ``1 - level`` (12.706 for 1 dof, 4.303 for 2, 1.960 in the limit)."""
    from scipy import stats

    if df <= 0:
        return float("nan")
    return float(stats.t.ppf(0.5 + level / 2.0, df))


@dataclass
class Stat:
    """Mean, population std (as the references' parse_test_res.py) and a 95% Student-t interval over seeds.

    The interval is mean ± t(0.975, n−1)·s/√n with the *sample* std s (n−1 divisor); one seed has none."""

    mean: float
    std: float
    n: int
    values: list[float] = field(default_factory=list)
    ci95: list[float] | None = None

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat:
        vals = [float(v) for v in values]
        if not vals:
            return cls(float("nan"), float("nan"), 0, [])
        mean = sum(vals) / len(vals)
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals))  # population std, as parse_test_res.py
        stat = cls(mean, std, len(vals), vals)
        if len(vals) > 1:
            half = t_critical(len(vals) - 1) * stat.sample_std / math.sqrt(len(vals))
            stat.ci95 = [mean - half, mean + half]
        return stat

    @property
    def sample_std(self) -> float:
        """The std with the n−1 divisor (what the interval and the Welch test use)."""
        if self.n < 2:
            return float("nan")
        return math.sqrt(sum((v - self.mean) ** 2 for v in self.values) / (self.n - 1))

    def text(self, digits: int = 2) -> str:
        if self.n == 0 or math.isnan(self.mean):
            return "–"
        if self.n == 1:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"

    def ci_text(self, digits: int = 2) -> str:
        if self.n == 0 or math.isnan(self.mean):
            return "–"
        if self.ci95 is None:
            return "1 seed, no interval"
        return f"[{self.ci95[0]:.{digits}f}, {self.ci95[1]:.{digits}f}]"


def welch_test(a: Stat, b: Stat) -> tuple[float, float, float] | None:
    """Welch's unequal-variance t test of two seed samples: (t, dof, two-sided p); None below 2 seeds each.

    Two identical constant samples give p = 1; two different constant samples p = 0."""
    if a.n < 2 or b.n < 2:
        return None
    va, vb = a.sample_std**2 / a.n, b.sample_std**2 / b.n
    diff = a.mean - b.mean
    if va + vb == 0:
        return (0.0, float("inf"), 1.0) if diff == 0 else (math.copysign(math.inf, diff), float("inf"), 0.0)
    t = diff / math.sqrt(va + vb)
    df = (va + vb) ** 2 / ((va**2 / (a.n - 1) if va else 0.0) + (vb**2 / (b.n - 1) if vb else 0.0))
    return t, df, t_two_sided_p(t, df)


def noise_note(best: Stat, other: Stat, level: float = 0.95) -> str:
    """How ``other`` compares with the best row: its difference and whether Welch's test (95%) tells them apart."""
    if other is best:
        return "best"
    diff = other.mean - best.mean
    test = welch_test(other, best)
    if test is None:
        return f"{diff:+.2f} (too few seeds to test)"
    if test[2] >= 1.0 - level:
        return f"{diff:+.2f} ≈ best, within noise (p {test[2]:.2f})"
    return f"{diff:+.2f} (p {test[2]:.3f})"


@dataclass
class ReportRow:
    """One (protocol, method, model, dataset) group."""

    protocol: str
    method: str
    model: str
    dataset: str
    seeds: list[Any]
    metrics: dict[str, Stat]
    base: Stat | None = None
    novel: Stat | None = None
    hm: float | None = None
    files: list[str] = field(default_factory=list)
    hm_seeds: Stat | None = None  # the per-seed HMs: their spread and interval (the cell itself is HM of means)
    vs_best: str = ""


@dataclass
class AverageRow:
    """Over datasets, for one (protocol, method, model)."""

    protocol: str
    method: str
    model: str
    datasets: list[str]
    metrics: dict[str, float]
    base: float | None = None
    novel: float | None = None
    hm: float | None = None
    # over seeds of the per-seed averages across datasets (only seeds every dataset has): "base", "novel", "hm" or
    # the headline metrics
    seed_stats: dict[str, Stat] = field(default_factory=dict)
    vs_best: str = ""


@dataclass
class Report:
    """Aggregated results: per-dataset rows and per-method averages, grouped by protocol."""

    rows: list[ReportRow]
    averages: list[AverageRow]
    headline: dict[str, list[str]]  # protocol -> metrics shown
    num_results: int = 0
    warnings: list[str] = field(default_factory=list)

    @property
    def protocols(self) -> list[str]:
        return list(dict.fromkeys(r.protocol for r in self.rows))

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": REPORT_FORMAT,
            "units": "percent",
            "num_results": self.num_results,
            "headline": self.headline,
            "rows": [asdict(r) for r in self.rows],
            "averages": [asdict(a) for a in self.averages],
            "warnings": list(self.warnings),
        }


def protocol_label(result: Mapping[str, Any]) -> str:
    """``zeroshot_classification``, ``base2new``, ``few_shot (4-shot)``, ...: what results are compared by."""
    protocol = result.get("protocol")
    if not protocol:
        subsample = result.get("subsample") or "all"
        shots = result.get("num_shots")
        protocol = "base2new" if subsample != "all" else ("few_shot" if shots else result.get("task", "eval"))
    shots = result.get("num_shots")
    # K-shot few-shot results are different experiments per K; base-to-novel is one protocol (CLIP's zero-shot row
    # sits in the same table as the 16-shot prompt learners).
    return f"{protocol} ({int(shots)}-shot)" if shots and protocol == "few_shot" else str(protocol)


def _model_label(result: Mapping[str, Any]) -> str:
    model = str(result.get("model") or "?")
    pretrained = result.get("pretrained")
    if not pretrained:
        return model
    pretrained = str(pretrained)
    if os.sep in pretrained or "/" in pretrained:
        pretrained = os.path.basename(pretrained.rstrip("/"))
    return f"{model}/{pretrained}"


def _headline(task: str, metrics: Mapping[str, Any]) -> tuple[str, ...]:
    if task in HEADLINE_METRICS:
        return HEADLINE_METRICS[task]
    if "acc1" in metrics:
        return ("acc1",)
    numeric = [k for k, v in metrics.items() if isinstance(v, (int, float))]
    return tuple(numeric[:1])


def _percent(key: str, value: float) -> float:
    return 100.0 * value if _FRACTION_KEY.search(key) or key.endswith("ece") else value


def _dedupe(results: list[dict[str, Any]], warnings: list[str]) -> list[dict[str, Any]]:
    """One result per (group, subsample, seed): the newest wins (reruns replace earlier runs)."""
    latest: dict[tuple, dict[str, Any]] = {}
    for r in results:
        key = (
            protocol_label(r),
            r.get("method") or r.get("task"),
            _model_label(r),
            r["dataset"],
            r.get("subsample") or "all",
            r.get("split") or "test",
            r.get("task"),
            r.get("seed"),
        )
        if key in latest:
            older, newer = sorted([latest[key], r], key=lambda x: str(x.get("created") or ""))
            warnings.append(
                f"two results for {key[1]} on {key[3]} ({key[4]}, seed {key[7]}): using {newer.get('_path', '?')}, "
                f"ignoring {older.get('_path', '?')}"
            )
            latest[key] = newer
        else:
            latest[key] = r
    return list(latest.values())


#: Config keys that may differ between seeds of one experiment: the seeds themselves, where/how a run ran, and
#: what a per-seed stage produced (a PromptKD student's teacher trained with the same seed: its file's hash;
#: ``about`` holds paths and tags, never compared by the teacher identity either).
POOL_IGNORED_KEYS = frozenset(
    {
        "seed",
        "split_seed",
        "init_seed",
        "order_seed",
        "out",
        "device",
        "data_root",
        "progress",
        "num_workers",
        "workers",
        "log_every",
        "checkpoint_every",
        "eval_every",
        "tensorboard",
        "evaluate",
        "checkpoint_sha256",
        "about",
    }
)
#: Settings added later, absent from older records: equal to their default when absent.
_OPTIONAL_DEFAULTS: dict[str, Any] = {"average_last_epochs": 0, "restarts": 1}
_SEED_IN_PATH = re.compile(r"(?<![A-Za-z])seed[_-]?\d+")


def recipe(config: Any) -> Any:
    """A result's resolved config less the seeds and the run's place (``POOL_IGNORED_KEYS`` at any depth; a
    ``seed_<s>`` folder inside a path, as the protocols name per-seed stages, reads ``seed_*``)."""
    if isinstance(config, Mapping):
        return {
            k: recipe(v)
            for k, v in config.items()
            if k not in POOL_IGNORED_KEYS and not (k in _OPTIONAL_DEFAULTS and v == _OPTIONAL_DEFAULTS[k])
        }
    if isinstance(config, list):
        return [recipe(v) for v in config]
    if isinstance(config, str):
        return _SEED_IN_PATH.sub("seed_*", config)
    return config


def _flat(value: Any, where: str = "") -> dict[str, str]:
    if isinstance(value, Mapping):
        out: dict[str, str] = {}
        for k, v in value.items():
            out.update(_flat(v, f"{where}.{k}" if where else str(k)))
        return out
    return {where: json.dumps(value, sort_keys=True, default=str)}


def _fingerprint(result: Mapping[str, Any]) -> dict[str, Any]:
    """What must be equal for two results to be seeds of one experiment (per subsample)."""
    classes = result.get("classnames")
    return {
        "method": result.get("method"),
        "classes": list(classes) if classes is not None else result.get("num_classes"),
        "images": result.get("num_samples"),
        "recipe": recipe(result.get("config") or {}),
    }


def _pool_difference(a: Mapping[str, Any], b: Mapping[str, Any]) -> str:
    fa, fb = _fingerprint(a), _fingerprint(b)
    if fa["method"] != fb["method"]:
        return f"method {fa['method']} vs {fb['method']}"
    if fa["classes"] != fb["classes"]:
        ca, cb = fa["classes"], fb["classes"]
        if isinstance(ca, list) and isinstance(cb, list):
            only = sorted(set(ca) ^ set(cb))[:4]
            detail = f"{len(ca)} vs {len(cb)} classes" + (f", differing {only}" if only else ", other order")
        else:
            detail = f"{ca} vs {cb} classes"
        return f"class list ({detail})"
    if fa["images"] != fb["images"]:
        return f"number of test images ({fa['images']} vs {fb['images']})"
    ra, rb = _flat(fa["recipe"]), _flat(fb["recipe"])
    keys = [k for k in sorted(set(ra) | set(rb)) if ra.get(k) != rb.get(k)]
    shown = ", ".join(f"{k} {ra.get(k, 'absent')} vs {rb.get(k, 'absent')}" for k in keys[:3])
    return "recipe (" + shown + (f", and {len(keys) - 3} more" if len(keys) > 3 else "") + ")"


def check_poolable(items: Sequence[Mapping[str, Any]]) -> None:
    """Refuse (ResultError, before anything is written) a group whose results are not seeds of one experiment:
    another method, class list, recipe (resolved config except the seeds) or number of test images."""
    problems: list[str] = []
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for r in items:
        groups.setdefault((*_group_key(r), r.get("subsample") or "all", r.get("split") or "test"), []).append(r)
    for key, members in groups.items():
        first = members[0]
        for other in members[1:]:
            if _fingerprint(other) != _fingerprint(first):
                problems.append(
                    f"{key[1]} on {key[3]} ({key[0]}, {key[4]}): {_pool_difference(first, other)} — "
                    f"{first.get('_path', 'seed ' + str(first.get('seed')))} vs "
                    f"{other.get('_path', 'seed ' + str(other.get('seed')))}"
                )
                break
    if problems:
        raise ResultError(
            "these results are not seeds of one experiment, so they are not pooled into mean ± std:\n"
            + "\n".join(f"  {line}" for line in problems[:8])
            + (f"\n  ... and {len(problems) - 8} more groups" if len(problems) > 8 else "")
            + "\nReport them from separate folders, or name the variants apart (e.g. --method NAME). Nothing was "
            "written."
        )


def _group_key(r: Mapping[str, Any]) -> tuple[str, str, str, str]:
    return (protocol_label(r), str(r.get("method") or r.get("task")), _model_label(r), str(r["dataset"]))


def aggregate(results: Iterable[Mapping[str, Any]]) -> Report:
    """Group results and summarise seeds and datasets (see the module docstring for the rules); raises
    ResultError when a group mixes results that are not seeds of one experiment (:func:`check_poolable`)."""
    warnings: list[str] = []
    items = _dedupe([dict(r) for r in results], warnings)
    check_poolable(items)
    groups: dict[tuple[str, str, str, str], list[dict[str, Any]]] = {}
    for r in items:
        groups.setdefault(_group_key(r), []).append(r)

    headline: dict[str, list[str]] = {}
    rows: list[ReportRow] = []
    for (protocol, method, model, dataset), members in groups.items():
        members.sort(key=lambda r: (str(r.get("subsample")), str(r.get("seed"))))
        shown = headline.setdefault(protocol, [])
        for r in members:
            for key in _headline(str(r.get("task")), r["metrics"]):
                if key not in shown:
                    shown.append(key)
        rows.append(_group_row(protocol, method, model, dataset, members, warnings))
    rows.sort(key=lambda r: (r.protocol, r.dataset, r.method, r.model))
    averages = _averages(rows, headline)
    _mark_vs_best(rows, averages, headline)
    return Report(rows, averages, headline, num_results=len(items), warnings=warnings)


def _group_row(
    protocol: str, method: str, model: str, dataset: str, members: list[dict[str, Any]], warnings: list[str]
) -> ReportRow:
    values: dict[str, dict[Any, float]] = {}
    base_vals: dict[Any, float] = {}
    novel_vals: dict[Any, float] = {}
    for r in members:
        heads = _headline(str(r.get("task")), r["metrics"])
        main = r["metrics"].get(heads[0]) if heads else None
        subsample, seed = r.get("subsample") or "all", r.get("seed")
        if subsample == "base" and main is not None:
            base_vals[seed] = _percent(heads[0], float(main))
        elif subsample == "new" and main is not None:
            novel_vals[seed] = _percent(heads[0], float(main))
        elif subsample == "base2new":
            for name, bucket in (("base_acc1", base_vals), ("new_acc1", novel_vals)):
                if r["metrics"].get(name) is not None:
                    bucket[seed] = _percent("acc1", float(r["metrics"][name]))
        if subsample == "all":
            for k, v in r["metrics"].items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    values.setdefault(k, {})[seed] = _percent(k, float(v))
    row = ReportRow(
        protocol=protocol,
        method=method,
        model=model,
        dataset=dataset,
        seeds=sorted({r.get("seed") for r in members}, key=str),
        metrics={k: _seed_stat(v) for k, v in values.items()},
        files=[str(r.get("_path", "")) for r in members],
    )
    if base_vals or novel_vals:
        row.base, row.novel = _seed_stat(base_vals), _seed_stat(novel_vals)
        if base_vals and novel_vals:
            row.hm = harmonic_mean(row.base.mean, row.novel.mean)  # from seed-averaged B and N
            paired = sorted(set(base_vals) & set(novel_vals), key=str)
            row.hm_seeds = Stat.of([harmonic_mean(base_vals[s], novel_vals[s]) for s in paired])
        if len(base_vals) != len(novel_vals):
            warnings.append(
                f"{method} on {dataset} ({protocol}): {len(base_vals)} base but {len(novel_vals)} novel results"
            )
    row._per_seed = {"base": base_vals, "novel": novel_vals, **values}  # type: ignore[attr-defined]
    return row


def _seed_stat(by_seed: Mapping[Any, float]) -> Stat:
    return Stat.of([by_seed[s] for s in sorted(by_seed, key=str)])


def _averages(rows: list[ReportRow], headline: dict[str, list[str]]) -> list[AverageRow]:
    by_method: dict[tuple[str, str, str], list[ReportRow]] = {}
    for row in rows:
        by_method.setdefault((row.protocol, row.method, row.model), []).append(row)
    out: list[AverageRow] = []
    for (protocol, method, model), members in by_method.items():
        avg = AverageRow(protocol, method, model, [r.dataset for r in members], {})
        for key in headline.get(protocol, []):
            means = [r.metrics[key].mean for r in members if key in r.metrics and r.metrics[key].n]
            if means:
                avg.metrics[key] = sum(means) / len(means)
        b = [r.base.mean for r in members if r.base is not None and r.base.n]
        n = [r.novel.mean for r in members if r.novel is not None and r.novel.n]
        if b:
            avg.base = sum(b) / len(b)
        if n:
            avg.novel = sum(n) / len(n)
        if b and n:
            avg.hm = harmonic_mean(avg.base, avg.novel)  # HM of the averaged B and N (the papers' Average row)
        avg.seed_stats = _average_seed_stats(members, headline.get(protocol, []))
        out.append(avg)
    return out


def _average_seed_stats(members: list[ReportRow], keys: list[str]) -> dict[str, Stat]:
    """Per seed, the average over datasets (only seeds that every dataset has); the Stat of those averages."""
    stats: dict[str, Stat] = {}
    per_seed = [getattr(r, "_per_seed", {}) for r in members]
    for key in ["base", "novel", *keys]:
        maps = [m.get(key) or {} for m in per_seed]
        if not all(maps):
            continue
        common = sorted(set.intersection(*(set(m) for m in maps)), key=str)
        if common:
            stats[key] = Stat.of([sum(m[s] for m in maps) / len(maps) for s in common])
    if "base" in stats and "novel" in stats:
        b, n = stats["base"].values, stats["novel"].values
        stats["hm"] = Stat.of([harmonic_mean(x, y) for x, y in zip(b, n)])
    return stats


def _headline_stat(row: ReportRow | AverageRow, keys: list[str]) -> Stat | None:
    """The seed sample behind a row's headline cell: per-seed HMs for base-to-novel, else the first metric."""
    if isinstance(row, AverageRow):
        return row.seed_stats.get("hm") or (row.seed_stats.get(keys[0]) if keys else None)
    if row.hm_seeds is not None:
        return row.hm_seeds
    return row.metrics.get(keys[0]) if keys else None


def _mark_vs_best(rows: list[ReportRow], averages: list[AverageRow], headline: dict[str, list[str]]) -> None:
    """Per protocol and dataset (and for the Average rows): each row's headline difference from the best row and
    whether Welch's t test at 95% over seeds tells them apart (:func:`noise_note`)."""
    cohorts: dict[tuple[str, str], list[ReportRow | AverageRow]] = {}
    for row in rows:
        cohorts.setdefault((row.protocol, row.dataset), []).append(row)
    for avg in averages:
        if len(avg.datasets) > 1:
            cohorts.setdefault((avg.protocol, "\0average"), []).append(avg)
    for (protocol, _), members in cohorts.items():
        stats = [(m, _headline_stat(m, headline.get(protocol, []))) for m in members]
        stats = [(m, st) for m, st in stats if st is not None and st.n]
        if len(stats) < 2:
            continue
        best = max(stats, key=lambda pair: pair[1].mean)[1]
        for member, stat in stats:
            member.vs_best = noise_note(best, stat)


# ---------------------------------------------------------------------------------------------------------------
# Output: Markdown, chart, files


def _is_b2n(report: Report, protocol: str) -> bool:
    return any(r.base is not None for r in report.rows if r.protocol == protocol)


def _fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _markdown_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    return lines


def _stat_text(stat: Stat | None) -> str:
    return "–" if stat is None else stat.text()


def _row_head(row: ReportRow) -> list[str]:
    return [row.dataset, row.method, row.model, str(len(row.seeds))]


def _avg_head(avg: AverageRow) -> list[str]:
    seeds = max((st.n for st in avg.seed_stats.values()), default=0)
    return [f"**Average** ({len(avg.datasets)})", avg.method, avg.model, str(seeds) if seeds else ""]


def _ci_cell(stat: Stat | None) -> str:
    return "–" if stat is None else stat.ci_text()


def _interval_table(report: Report, protocol: str, b2n: bool) -> list[str]:
    """The 95% intervals of every cell of a protocol's table (Student's t, n−1 dof, over seeds)."""
    rows = [r for r in report.rows if r.protocol == protocol]
    averages = [a for a in report.averages if a.protocol == protocol and len(a.datasets) > 1]
    keys = ["base", "novel", "hm"] if b2n else report.headline.get(protocol, [])
    headers = ["Dataset", "Method", "Model", *({"hm": "HM"}.get(k, k.capitalize()) if b2n else k for k in keys)]
    if b2n and any("acc1" in r.metrics for r in rows):
        keys, headers = [*keys, "acc1"], [*headers, "All classes"]
    body = []
    for row in rows:
        cells = {"base": row.base, "novel": row.novel, "hm": row.hm_seeds, **row.metrics}
        body.append([row.dataset, row.method, row.model, *(_ci_cell(cells.get(k)) for k in keys)])
    for avg in averages:
        body.append(
            [
                f"**Average** ({len(avg.datasets)})",
                avg.method,
                avg.model,
                *(_ci_cell(avg.seed_stats.get(k)) for k in keys),
            ]
        )
    return _markdown_table(headers, body)


NOISE_NOTE = (
    "Values in %: mean ± std over seeds (population std, as the references' parse_test_res.py). Base-to-novel HM is "
    "the HM of the seed-averaged Base and Novel; its interval is that of the per-seed HMs. 95% intervals: mean ± "
    "t(0.975, n−1)·s/√n with the sample std s. *vs best*: the difference from the best row of the same dataset in "
    "the headline cell (HM for base-to-novel) and Welch's unequal-variance t test over seeds at 95%: "
    "'≈ best, within noise' means the two cannot be told apart with these seeds. Average rows: over seeds of the "
    "per-seed average across datasets (seeds every dataset has)."
)


def format_markdown(report: Report, images: Mapping[str, str] | None = None) -> str:
    """Markdown tables, one per protocol (percentages; mean ± population std over seeds, a "vs best" column with
    Welch's test), each followed by a table of 95% Student-t intervals."""
    lines = ["# Results", "", f"{report.num_results} result files. {NOISE_NOTE}", ""]
    for protocol in report.protocols:
        rows = [r for r in report.rows if r.protocol == protocol]
        averages = [a for a in report.averages if a.protocol == protocol and len(a.datasets) > 1]
        lines += [f"## {protocol}", ""]
        b2n = _is_b2n(report, protocol)
        if b2n:
            headers = ["Dataset", "Method", "Model", "Seeds", "Base", "Novel", "HM"]
            body = [[*_row_head(r), _stat_text(r.base), _stat_text(r.novel), _hm_text(r)] for r in rows]
            body += [[*_avg_head(a), *(_avg_text(a, k) for k in ("base", "novel", "hm"))] for a in averages]
            if any("acc1" in r.metrics for r in rows):  # base runs also scored on all classes at once
                headers.append("All classes")
                for line, row in zip(body, [*rows, *averages]):
                    line.append(
                        _stat_text(row.metrics.get("acc1")) if isinstance(row, ReportRow) else _avg_text(row, "acc1")
                    )
        else:
            keys = report.headline.get(protocol, [])
            headers = ["Dataset", "Method", "Model", "Seeds", *keys]
            body = [[*_row_head(r), *(_stat_text(r.metrics.get(k)) for k in keys)] for r in rows]
            body += [[*_avg_head(a), *(_avg_text(a, k) for k in keys)] for a in averages]
        if any(r.vs_best for r in [*rows, *averages]):
            headers.append("vs best")
            for line, row in zip(body, [*rows, *averages]):
                line.append(row.vs_best or "–")
        lines += _markdown_table(headers, body)
        lines += ["", f"95% intervals over seeds ({protocol}):", "", *_interval_table(report, protocol, b2n)]
        if images and protocol in images:
            lines += ["", f"![{protocol}]({images[protocol]})"]
        lines.append("")
    if report.warnings:
        lines += ["## Warnings", "", *(f"- {w}" for w in report.warnings), ""]
    return "\n".join(lines)


def _avg_text(avg: AverageRow, key: str) -> str:
    """An Average cell: the papers' value (HM of mean B and N), ± the std over seeds of the per-seed averages."""
    value = getattr(avg, key) if key in ("base", "novel", "hm") else avg.metrics.get(key)
    stat = avg.seed_stats.get(key)
    if value is None or stat is None or stat.n < 2:
        return _fmt(value)
    return f"{value:.2f} ± {stat.std:.2f}"


def _hm_text(row: ReportRow) -> str:
    if row.hm is None:
        return "–"
    if row.hm_seeds is None or row.hm_seeds.n < 2:
        return _fmt(row.hm)
    return f"{row.hm:.2f} ± {row.hm_seeds.std:.2f}"


def _bars(ax: Any, datasets: list[str], series: list[tuple[str, list[float | None]]], title: str) -> None:
    width = 0.8 / max(1, len(series))
    for i, (label, vals) in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(datasets))]
        ys = [float("nan") if v is None else v for v in vals]
        ax.bar(xs, ys, width=width, label=label)
    finite = [v for _, vals in series for v in vals if v is not None and not math.isnan(v)]
    ax.set_ylim(0, 1.25 * max(finite) if finite and max(finite) > 0 else 1)  # headroom for the legend
    ax.set_xticks(range(len(datasets)))
    ax.set_xticklabels(datasets, rotation=30, ha="right", fontsize=8)
    ax.set_title(title)
    ax.set_ylabel("%")
    ax.grid(axis="y", alpha=0.3)


def plot_report(report: Report, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """One bar chart PNG per protocol (accuracy per dataset per method; base/novel/HM panels for base-to-novel)."""
    from matplotlib.figure import Figure  # object API: no pyplot, no global backend switch (renders with Agg)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for protocol in report.protocols:
        rows = [r for r in report.rows if r.protocol == protocol]
        averages = {(a.method, a.model): a for a in report.averages if a.protocol == protocol}
        datasets = list(dict.fromkeys(r.dataset for r in rows))
        methods = list(dict.fromkeys((r.method, r.model) for r in rows))
        with_avg = len(datasets) > 1
        columns = [*datasets, "Average"] if with_avg else datasets
        b2n = _is_b2n(report, protocol)
        keys = report.headline.get(protocol, [])
        panels = [("Base", "base"), ("Novel", "novel"), ("HM", "hm")] if b2n else [(k, k) for k in keys]
        fig = Figure(figsize=(max(5.0, 1.2 * len(columns) * max(1, len(methods)) ** 0.5), 3.4 * len(panels)))
        axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
        for ax, (title, key) in zip(axes, panels):
            series = []
            for method, model in methods:
                vals: list[float | None] = []
                for d in datasets:
                    row = next((r for r in rows if r.dataset == d and (r.method, r.model) == (method, model)), None)
                    if row is None:
                        vals.append(None)
                    elif b2n:
                        value = getattr(row, key)
                        vals.append(value.mean if isinstance(value, Stat) else value)
                    else:
                        vals.append(row.metrics[key].mean if key in row.metrics else None)
                if with_avg:
                    avg = averages.get((method, model))
                    vals.append(None if avg is None else (getattr(avg, key) if b2n else avg.metrics.get(key)))
                label = method if len({m for _, m in methods}) == 1 else f"{method} ({model})"
                series.append((label, vals))
            _bars(ax, columns, series, f"{protocol}: {title}")
        axes[0].legend(fontsize=8, ncol=min(4, len(methods)), loc="upper center")
        fig.tight_layout()
        path = out / f"report_{_slug(protocol)}.png"
        fig.savefig(path, dpi=100)
        written[protocol] = path
    return written


def write_report(report: Report, out_dir: str | os.PathLike[str], *, plot: bool = True) -> dict[str, Path]:
    """Write ``report.md``, ``report.json`` and the charts into ``out_dir``; returns the written paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images = plot_report(report, out) if plot else {}
    markdown = format_markdown(report, {p: path.name for p, path in images.items()})
    atomic_write_text(out / "report.md", markdown + "\n")
    atomic_write_text(out / "report.json", json.dumps(report.to_dict(), indent=2, default=str) + "\n")
    return {"markdown": out / "report.md", "json": out / "report.json", **{f"plot:{k}": v for k, v in images.items()}}
