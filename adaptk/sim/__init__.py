"""Exact trace replay, batching and arrivals, and the hindsight oracles (torch-free)."""

from adaptk.sim.trace import Trace, TraceFormatError, TraceSet

__all__ = ["Trace", "TraceFormatError", "TraceSet"]
