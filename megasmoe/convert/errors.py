"""The one error type of the converter: a one-line message naming the problem and the fix."""

from __future__ import annotations

__all__ = ["ConversionError"]


class ConversionError(RuntimeError):
    """A checkpoint or model cannot be converted; the message names the field or tensor."""
