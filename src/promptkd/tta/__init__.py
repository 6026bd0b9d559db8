"""Test-time adaptation, batched over test images: prompt tuning (TPT, C-TPT, PromptAlign, PromptSync) and
training-free / online methods (TDA, ZERO, DPE, BoostAdapter; interface in :mod:`promptkd.tta.online`)."""

from promptkd.tta.base import (
    AdaptResult,
    TTAConfig,
    TTAError,
    TTAMethod,
    get_tta_method,
    list_tta_methods,
    register_tta_method,
)
from promptkd.tta.model import PromptedCLIP, StudentFeatures, build_model
from promptkd.tta.online import OnlineBatch, OnlineConfig, OnlineMethod
from promptkd.tta.sources import Prototypes, SourceStats, compute_prototypes, compute_stats
from promptkd.tta.views import TTAViewDataset, ViewConfig

__all__ = [
    "AdaptResult",
    "OnlineBatch",
    "OnlineConfig",
    "OnlineMethod",
    "PromptedCLIP",
    "Prototypes",
    "SourceStats",
    "StudentFeatures",
    "TTAConfig",
    "TTAError",
    "TTAMethod",
    "TTAViewDataset",
    "ViewConfig",
    "build_model",
    "compute_prototypes",
    "compute_stats",
    "get_tta_method",
    "list_tta_methods",
    "register_tta_method",
]
