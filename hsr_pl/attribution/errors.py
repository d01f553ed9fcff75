"""The error head attribution raises for a bad setting or input; the message names the fix."""

from __future__ import annotations

__all__ = ["HeadAttributionError"]


class HeadAttributionError(ValueError):
    """A bad SafetyHeadAttribution setting or input (score file, partial file, calibration data)."""
