"""Linear probe: logistic regression on frozen CLIP image features, as CoOp's ``lpclip`` (and the CLIP paper).

Features are the image tower's **raw** outputs by default, as ``lpclip/feat_extractor.py`` stores them and the CLIP
paper fits them; ``features="normalized"`` fits L2-normalised ones instead (the space every CLIP classifier
compares in), a named deviation.

The regulariser C is chosen on the **validation** split only, by ``lpclip/linear_probe.py``'s rule: a coarse sweep
over 10^-6 .. 10^6 (every two decades) keeps the C of the best validation accuracy (ties: the larger C, as lpclip
scans from 10^6 down and keeps the first maximum); then, in log10(C), the interval [peak - 1, peak + 1] is bisected
``refine_steps`` times (lpclip's ``num_step``, 8): both ends are fitted, the better end is picked (ties: the lower
end), and the interval shrinks to the half on its side. The pick of the last step is C (lpclip reports that step's
model). The model is then refit on the train split with C and evaluated once on the test split, which never enters
the selection (the function that searches C does not even receive it).

scikit-learn's ``LogisticRegression`` (lbfgs, multinomial, as lpclip) is deterministic for fixed inputs.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from promptkd.data.items import DatasetSplits, ImageDataset
from promptkd.data.transforms import eval_transform
from promptkd.errors import PromptKDError
from promptkd.evaluation.features import FeatureSet, extract_features
from promptkd.evaluation.metrics import classification_metrics

__all__ = [
    "COARSE_GRID",
    "FEATURE_MODES",
    "LinearProbeError",
    "LinearProbeResult",
    "SearchStep",
    "evaluate_linear_probe",
    "fit_logistic",
    "linear_probe",
    "search_c",
]

logger = logging.getLogger(__name__)

#: lpclip's coarse sweep: 10^-6, 10^-4, ..., 10^6.
COARSE_GRID: tuple[float, ...] = tuple(10.0**e for e in range(-6, 7, 2))

#: How features enter the probe: "raw" (lpclip, the CLIP paper) or "normalized" (L2, a named deviation).
FeatureMode = Literal["raw", "normalized"]
FEATURE_MODES: tuple[str, ...] = ("raw", "normalized")

#: lpclip's ``num_step``: bisection steps after the coarse sweep.
REFINE_STEPS = 8

#: Below this many (samples x features x classes) a fit runs on one BLAS/OpenMP thread.
_SINGLE_THREAD_WORK = 50_000_000


class LinearProbeError(PromptKDError, ValueError):
    """A linear probe that cannot be run as asked (e.g. no validation split to choose C on)."""


@dataclass
class SearchStep:
    """One evaluated C during the search, on the validation split."""

    C: float
    val_acc1: float
    val_loss: float
    stage: str  # "coarse" or "refine"


@dataclass
class LinearProbeResult:
    """Test metrics (CLIP_benchmark ``lp_*`` keys) of the probe refit with the C chosen on validation."""

    metrics: dict[str, float]
    C: float
    selection: dict[str, Any]
    num_train: int
    num_val: int
    num_test: int
    skipped: list[str] = field(default_factory=list)
    classifier: Any = None


def _as_xy(
    data: FeatureSet | tuple[torch.Tensor, torch.Tensor], features: FeatureMode = "raw"
) -> tuple[np.ndarray, np.ndarray]:
    """Float64 features (raw, or L2-normalised) and int labels as numpy arrays."""
    if features not in FEATURE_MODES:
        raise LinearProbeError(f"features={features!r}: expected one of {', '.join(FEATURE_MODES)}")
    if isinstance(data, FeatureSet):
        x, y = data.features.float(), data.labels
    else:
        x, y = torch.as_tensor(data[0]).float(), torch.as_tensor(data[1])
    if features == "normalized":
        x = torch.nn.functional.normalize(x, dim=-1)
    return x.double().numpy(), y.long().numpy()


def fit_logistic(x: np.ndarray, y: np.ndarray, C: float, *, max_iter: int = 1000) -> Any:
    """Multinomial logistic regression (lbfgs); convergence warnings are logged, not raised."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    clf = LogisticRegression(C=float(C), max_iter=max_iter, random_state=0)
    # Small problems run ~25x faster on one thread: BLAS/OpenMP start-up and spinning dominate otherwise.
    threads = 1 if x.shape[0] * x.shape[1] * max(2, len(np.unique(y))) < _SINGLE_THREAD_WORK else None
    with threadpool_limits(threads), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        clf.fit(x, y)
    if any(issubclass(w.category, ConvergenceWarning) for w in caught):
        logger.debug("logistic regression with C=%g did not converge in %d iterations", C, max_iter)
    return clf


def _log_probs(clf: Any, x: np.ndarray, num_classes: int) -> torch.Tensor:
    """Log-probabilities [N, num_classes]; classes absent from the training labels get -inf."""
    out = torch.full((x.shape[0], num_classes), -math.inf, dtype=torch.float64)
    if x.shape[0]:
        out[:, torch.as_tensor(clf.classes_, dtype=torch.long)] = torch.from_numpy(clf.predict_log_proba(x))
    return out


def _score(clf: Any, x: np.ndarray, y: np.ndarray, num_classes: int) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) on a split."""
    logp = _log_probs(clf, x, num_classes)
    labels = torch.as_tensor(y, dtype=torch.long)
    acc = (logp.argmax(dim=1) == labels).double().mean().item()
    picked = logp.gather(1, labels[:, None]).squeeze(1).clamp(min=-1e4)
    return acc, float(-picked.mean().item())


def search_c(
    train: FeatureSet | tuple[torch.Tensor, torch.Tensor],
    val: FeatureSet | tuple[torch.Tensor, torch.Tensor],
    *,
    num_classes: int | None = None,
    coarse: Sequence[float] = COARSE_GRID,
    refine_steps: int = REFINE_STEPS,
    max_iter: int = 1000,
    features: FeatureMode = "raw",
) -> tuple[float, list[SearchStep]]:
    """Choose C on the validation split by lpclip's rule (module docstring): coarse sweep, then bisection in log10 C.

    Returns C and every evaluated value (each C is fitted once; a repeated end reuses its score).
    """
    x_train, y_train = _as_xy(train, features)
    x_val, y_val = _as_xy(val, features)
    if len(y_val) == 0:
        raise LinearProbeError("the validation split is empty, so C cannot be chosen on it; pass a fixed C instead")
    if len(y_train) == 0:
        raise LinearProbeError("the train split is empty")
    n_cls = num_classes or int(max(y_train.max(), y_val.max()) + 1)
    steps: list[SearchStep] = []
    tried: dict[float, tuple[float, float]] = {}

    def accuracy(log_c: float, stage: str) -> float:
        key = round(log_c, 10)
        if key not in tried:
            c = 10.0**key
            clf = fit_logistic(x_train, y_train, c, max_iter=max_iter)
            tried[key] = _score(clf, x_val, y_val, n_cls)
            steps.append(SearchStep(C=c, val_acc1=tried[key][0], val_loss=tried[key][1], stage=stage))
            logger.debug("C=%.3g: val acc %.4f, val loss %.4f (%s)", c, *tried[key], stage)
        return tried[key][0]

    coarse_logs = [math.log10(c) for c in coarse]
    scores = [accuracy(log_c, "coarse") for log_c in coarse_logs]
    best = max(scores)
    chosen = max(log_c for log_c, acc in zip(coarse_logs, scores) if acc == best)  # ties: the larger C
    low, high = chosen - 1.0, chosen + 1.0
    for _ in range(refine_steps):
        middle = 0.5 * (low + high)
        if accuracy(low, "refine") < accuracy(high, "refine"):
            chosen, low = high, middle
        else:
            chosen, high = low, middle
    return 10.0 ** round(chosen, 10), steps


def linear_probe(
    train: FeatureSet | tuple[torch.Tensor, torch.Tensor],
    val: FeatureSet | tuple[torch.Tensor, torch.Tensor] | None,
    test: FeatureSet | tuple[torch.Tensor, torch.Tensor],
    *,
    num_classes: int,
    C: float | None = None,
    refine_steps: int = REFINE_STEPS,
    max_iter: int = 1000,
    features: FeatureMode = "raw",
) -> LinearProbeResult:
    """Choose C on ``val`` (unless given), refit on ``train`` with it, evaluate once on ``test``."""
    x_train, y_train = _as_xy(train, features)
    x_test, y_test = _as_xy(test, features)
    num_val = 0
    if C is None:
        if val is None:
            raise LinearProbeError("no validation split to choose C on; pass a fixed C instead")
        chosen, steps = search_c(
            train, val, num_classes=num_classes, refine_steps=refine_steps, max_iter=max_iter, features=features
        )
        num_val = len(_as_xy(val, features)[1])
        best = next(s for s in steps if math.isclose(s.C, chosen, rel_tol=1e-9))
        selection: dict[str, Any] = {
            "parameter": "C",
            "criterion": f"lpclip: val acc1 over the coarse sweep (ties: larger C), then {refine_steps} bisection "
            "steps in log10 C (ties: lower end); the last step's pick",
            "split": "val",
            "test_used_for_selection": False,
            "chosen_C": chosen,
            "val_acc1": best.val_acc1,
            "search": [asdict(s) for s in steps],
        }
    else:
        chosen = float(C)
        selection = {"parameter": "C", "criterion": "fixed by the user", "chosen_C": chosen, "search": []}
        selection["test_used_for_selection"] = False
    selection["features"] = features
    clf = fit_logistic(x_train, y_train, chosen, max_iter=max_iter)
    logp = _log_probs(clf, x_test, num_classes).float()
    metrics = classification_metrics(logp, torch.as_tensor(y_test, dtype=torch.long))
    lp_metrics = {f"lp_{k}": v for k, v in metrics.items()}
    lp_metrics["C"] = chosen
    return LinearProbeResult(
        metrics=lp_metrics,
        C=chosen,
        selection=selection,
        num_train=len(y_train),
        num_val=num_val,
        num_test=len(y_test),
        classifier=clf,
    )


def evaluate_linear_probe(
    backbone: Any,
    splits: DatasetSplits,
    *,
    C: float | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
    skip_bad: bool = False,
    progress: bool = True,
    refine_steps: int = REFINE_STEPS,
    max_iter: int = 1000,
    features: FeatureMode = "raw",
) -> LinearProbeResult:
    """Extract train/val/test features (eval transform, no augmentation) and run :func:`linear_probe`."""
    if not splits.train:
        raise LinearProbeError(f"{splits.name} has no train split; a linear probe needs labelled training images")
    if C is None and not splits.val:
        raise LinearProbeError(
            f"{splits.name} has no validation split to choose C on (the test split is never used for selection); "
            "pass a fixed C (--C VALUE)"
        )
    transform = eval_transform(backbone.preprocess)
    feats: dict[str, FeatureSet | None] = {}
    skipped: list[str] = []
    for which in ("train", "val", "test"):
        items = splits.split(which)
        if which == "val" and (C is not None or not items):
            feats[which] = None
            continue
        dataset = ImageDataset(items, transform, skip_bad=skip_bad)
        feats[which] = extract_features(
            backbone,
            dataset,
            batch_size=batch_size,
            num_workers=num_workers,
            cache_dir=cache_dir,
            progress=progress,
            desc=f"{which} features",
        )
        skipped += feats[which].skipped  # type: ignore[union-attr]
    result = linear_probe(
        feats["train"],  # type: ignore[arg-type]
        feats["val"],
        feats["test"],  # type: ignore[arg-type]
        num_classes=splits.num_classes,
        C=C,
        refine_steps=refine_steps,
        max_iter=max_iter,
        features=features,
    )
    result.skipped = skipped
    return result
