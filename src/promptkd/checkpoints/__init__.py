"""Checkpoint files: promptkd's own format and import of the reference code's checkpoints."""

from promptkd.checkpoints.format import (
    CheckpointError,
    atomic_path,
    atomic_write_text,
    check_state_fits,
    checkpoint_paths,
    classnames_hash,
    load_checkpoint,
    load_trainable_state,
    save_checkpoint,
    trainable_state,
)
from promptkd.checkpoints.reference import (
    ConversionReport,
    convert_reference_checkpoint,
    convert_reference_state_dict,
    read_reference_checkpoint,
)

__all__ = [
    "CheckpointError",
    "ConversionReport",
    "atomic_path",
    "atomic_write_text",
    "check_state_fits",
    "checkpoint_paths",
    "classnames_hash",
    "convert_reference_checkpoint",
    "convert_reference_state_dict",
    "load_checkpoint",
    "load_trainable_state",
    "read_reference_checkpoint",
    "save_checkpoint",
    "trainable_state",
]
