"""Compute precisions (a light module: the CLI lists them without importing torch)."""

PRECISIONS = ("fp32", "bf16", "fp16")
