"""Frozen-backbone evaluation: zero-shot classification, linear probe, retrieval, their metrics and features.

Every function takes a :class:`~promptkd.backbones.Backbone` and plain data (:class:`DatasetSplits`, item lists,
caption sets) and returns metrics with CLIP_benchmark's keys; :mod:`promptkd.results` turns them into result files.
"""

from promptkd.evaluation.features import FeatureSet, extract_features, feature_cache_key, model_identity
from promptkd.evaluation.linear_probe import (
    COARSE_GRID,
    LinearProbeError,
    LinearProbeResult,
    evaluate_linear_probe,
    linear_probe,
    search_c,
)
from promptkd.evaluation.metrics import (
    ECE_BINS,
    accuracy,
    classification_metrics,
    expected_calibration_error,
    harmonic_mean,
    mean_per_class_recall,
    topk_accuracy,
)
from promptkd.evaluation.retrieval import (
    CaptionSet,
    RetrievalResult,
    evaluate_retrieval,
    read_captions,
    read_coco_captions,
    read_flickr_captions,
    retrieval_recall,
)
from promptkd.evaluation.zeroshot import (
    TEMPLATE_MODES,
    TemplateError,
    ZeroShotResult,
    build_prompts,
    clear_text_cache,
    encode_texts,
    evaluate_zeroshot,
    resolve_templates,
    zeroshot_classifier,
    zeroshot_logits,
)

__all__ = [
    "COARSE_GRID",
    "ECE_BINS",
    "TEMPLATE_MODES",
    "CaptionSet",
    "FeatureSet",
    "LinearProbeError",
    "LinearProbeResult",
    "RetrievalResult",
    "TemplateError",
    "ZeroShotResult",
    "accuracy",
    "build_prompts",
    "classification_metrics",
    "clear_text_cache",
    "encode_texts",
    "evaluate_linear_probe",
    "evaluate_retrieval",
    "evaluate_zeroshot",
    "expected_calibration_error",
    "extract_features",
    "feature_cache_key",
    "harmonic_mean",
    "linear_probe",
    "mean_per_class_recall",
    "model_identity",
    "read_captions",
    "read_coco_captions",
    "read_flickr_captions",
    "resolve_templates",
    "retrieval_recall",
    "search_c",
    "topk_accuracy",
    "zeroshot_classifier",
    "zeroshot_logits",
]
