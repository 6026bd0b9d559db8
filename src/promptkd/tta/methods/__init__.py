"""The built-in test-time methods; importing this package registers them."""

from promptkd.tta.methods import ctpt, promptalign, promptsync, tpt

__all__ = ["ctpt", "promptalign", "promptsync", "tpt"]
