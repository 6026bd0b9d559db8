"""Prompted CLIP encoders and the learnable prompt modules they take."""

from promptkd.prompts.encoders import (
    PromptedImageEncoder,
    PromptedTextEncoder,
    UnsupportedModelError,
    prompt_layers,
)
from promptkd.prompts.learners import (
    POSITIONS,
    MultimodalCoupling,
    TextPromptLearner,
    VisualPrompts,
    clean_classname,
)

__all__ = [
    "POSITIONS",
    "MultimodalCoupling",
    "PromptedImageEncoder",
    "PromptedTextEncoder",
    "TextPromptLearner",
    "UnsupportedModelError",
    "VisualPrompts",
    "clean_classname",
    "prompt_layers",
]
