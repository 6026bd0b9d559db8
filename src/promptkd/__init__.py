"""promptkd: prompt learning, prompt distillation and test-time prompt tuning for CLIP models (open_clip)."""

from promptkd._version import __version__

__all__ = ["__version__"]
