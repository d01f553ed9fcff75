"""Errors raised by the realignment code. Each message names the problem and the fix."""

from __future__ import annotations

__all__ = ["RealignConfigError", "RealignError", "RealignInputError"]


class RealignError(Exception):
    """Base class of every realignment failure."""


class RealignConfigError(RealignError, ValueError):
    """A bad option (p, q, max_p, selection, budget, order, scope, importance)."""


class RealignInputError(RealignError, ValueError):
    """Missing or mismatched inputs: no masks, no head scores, no dense statistics, checkpoints
    that cannot be compared."""
