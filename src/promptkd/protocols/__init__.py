"""The papers' evaluation protocols as resumable runners over datasets x seeds."""

from promptkd.protocols.runner import PROTOCOLS, ProtocolError, ProtocolSpec, run_protocol

__all__ = ["PROTOCOLS", "ProtocolError", "ProtocolSpec", "run_protocol"]
