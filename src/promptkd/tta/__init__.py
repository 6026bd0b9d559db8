"""Test-time prompt tuning (TPT, C-TPT, PromptAlign, PromptSync), batched over test images."""

from promptkd.tta.base import (
    AdaptResult,
    TTAConfig,
    TTAError,
    TTAMethod,
    get_tta_method,
    list_tta_methods,
    register_tta_method,
)
from promptkd.tta.model import PromptedCLIP, build_model
from promptkd.tta.sources import Prototypes, SourceStats, compute_prototypes, compute_stats
from promptkd.tta.views import TTAViewDataset, ViewConfig

__all__ = [
    "AdaptResult",
    "PromptedCLIP",
    "Prototypes",
    "SourceStats",
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
