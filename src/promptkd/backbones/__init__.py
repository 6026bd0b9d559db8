"""CLIP backbones from open_clip: loading by name + tag, from local files or folders, with their facts exposed."""

from promptkd.backbones.files import WeightFileError, read_weight_file
from promptkd.backbones.loading import (
    PRECISIONS,
    Backbone,
    BackboneError,
    BackboneSpec,
    PreprocessInfo,
    autocast_for,
    check_model_name,
    load_backbone,
    load_recorded_backbone,
    register_builtin_configs,
)

__all__ = [
    "PRECISIONS",
    "Backbone",
    "BackboneError",
    "BackboneSpec",
    "PreprocessInfo",
    "WeightFileError",
    "autocast_for",
    "check_model_name",
    "load_backbone",
    "load_recorded_backbone",
    "read_weight_file",
    "register_builtin_configs",
]
