"""Classification metrics with the keys CLIP_benchmark uses, plus ECE and the base-to-novel harmonic mean.

All accuracies are fractions in [0, 1] (CLIP_benchmark's convention); reports multiply by 100. Nothing here builds
a confusion matrix: per-class recall comes from two ``bincount`` calls, so 1000-way ImageNet costs nothing.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "ECE_BINS",
    "TTA_ECE_BINS",
    "accuracy",
    "classification_metrics",
    "expected_calibration_error",
    "harmonic_mean",
    "mean_per_class_recall",
    "topk_accuracy",
]

#: Number of equal-width confidence bins for ECE in general: 15, the usual choice since Guo et al. (2017).
ECE_BINS = 15
#: Bins for test-time adaptation results: C-TPT, the compared paper that reports ECE, uses 20 (``ECE_Loss(20, ...)``
#: in hee-suk-yoon/C-TPT ``tpt_classification.py``, bins (lo, hi] as here), so TTA results compare with its tables.
TTA_ECE_BINS = 20


def _check(scores: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scores = torch.as_tensor(scores)
    labels = torch.as_tensor(labels).long()
    if scores.ndim != 2 or labels.ndim != 1 or scores.shape[0] != labels.shape[0]:
        raise ValueError(f"expected scores [N, C] and labels [N], got {tuple(scores.shape)} and {tuple(labels.shape)}")
    if labels.numel() and (labels.min() < 0 or labels.max() >= scores.shape[1]):
        raise ValueError(f"labels must lie in 0..{scores.shape[1] - 1}")
    return scores, labels


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, k: int = 1) -> float:
    """Fraction of samples whose label is among the ``k`` highest scores; ``k`` is clamped to the class count."""
    scores, labels = _check(scores, labels)
    if labels.numel() == 0:
        return float("nan")
    k = max(1, min(int(k), scores.shape[1]))
    top = scores.topk(k, dim=1).indices
    return (top == labels[:, None]).any(dim=1).float().mean().item()


def accuracy(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy."""
    return topk_accuracy(scores, labels, 1)


def mean_per_class_recall(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Balanced accuracy: recall averaged over the classes that occur in ``labels`` (as sklearn and CLIP_benchmark)."""
    scores, labels = _check(scores, labels)
    if labels.numel() == 0:
        return float("nan")
    num_classes = scores.shape[1]
    correct = (scores.argmax(dim=1) == labels).long()
    support = torch.bincount(labels, minlength=num_classes)
    hits = torch.bincount(labels, weights=correct.double(), minlength=num_classes)
    present = support > 0
    return (hits[present] / support[present]).mean().item()


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = ECE_BINS) -> float:
    """ECE: sum over equal-width confidence bins (lo, hi] of (bin share) x |accuracy - mean confidence|.

    ``probs`` are class probabilities [N, C]; confidence = max probability, prediction = its class.
    """
    probs, labels = _check(probs, labels)
    if labels.numel() == 0:
        return float("nan")
    confidence, prediction = probs.double().max(dim=1)
    correct = (prediction == labels).double()
    edges = torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64)
    # Bin index b holds confidences in (edges[b], edges[b+1]]; a confidence of exactly 0 goes to the first bin.
    index = (torch.bucketize(confidence, edges, right=False) - 1).clamp(0, n_bins - 1)
    conf_sum = torch.bincount(index, weights=confidence, minlength=n_bins)
    acc_sum = torch.bincount(index, weights=correct, minlength=n_bins)
    return ((acc_sum - conf_sum).abs().sum() / labels.numel()).item()


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, *, n_bins: int = ECE_BINS) -> dict[str, float]:
    """``acc1``, ``acc5`` (k clamped to the class count), ``mean_per_class_recall`` and ``ece`` from logits.

    ``logits`` must already include the logit scale (ECE is computed from their softmax).
    """
    logits, labels = _check(logits, labels)
    logits = logits.float()
    return {
        "acc1": topk_accuracy(logits, labels, 1),
        "acc5": topk_accuracy(logits, labels, 5),
        "mean_per_class_recall": mean_per_class_recall(logits, labels),
        "ece": expected_calibration_error(logits.softmax(dim=1), labels, n_bins),
    }


def harmonic_mean(b: float, n: float) -> float:
    """HM = 2BN / (B + N), the base-to-novel summary; 0 when both are 0, NaN when either is NaN."""
    b, n = float(b), float(n)
    if math.isnan(b) or math.isnan(n):
        return float("nan")
    if b + n == 0:
        return 0.0
    return 2.0 * b * n / (b + n)
