"""Checkpoint files: promptkd's own format and import of the reference code's checkpoints."""

from promptkd.checkpoints.format import (
    CheckpointError,
    atomic_path,
    check_state_fits,
    checkpoint_paths,
    classnames_hash,
    load_checkpoint,
    load_trainable_state,
    save_checkpoint,
    trainable_state,
)

__all__ = [
    "CheckpointError",
    "atomic_path",
    "check_state_fits",
    "checkpoint_paths",
    "classnames_hash",
    "load_checkpoint",
    "load_trainable_state",
    "save_checkpoint",
    "trainable_state",
]
