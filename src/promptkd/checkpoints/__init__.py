"""Checkpoint files: promptkd's own format and import of the reference code's checkpoints."""

from promptkd.checkpoints.format import (
    CheckpointError,
    atomic_path,
    atomic_write_text,
    check_state_fits,
    checkpoint_paths,
    classnames_hash,
    file_sha256,
    load_checkpoint,
    load_tensor_record,
    load_trainable_state,
    read_with_digest,
    save_checkpoint,
    save_tensor_record,
    trainable_state,
    write_with_digest,
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
    "file_sha256",
    "load_checkpoint",
    "load_tensor_record",
    "load_trainable_state",
    "read_reference_checkpoint",
    "read_with_digest",
    "save_checkpoint",
    "save_tensor_record",
    "trainable_state",
    "write_with_digest",
]
