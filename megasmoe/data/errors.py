"""The one error type of the data pipeline."""

from __future__ import annotations

__all__ = ["DataError"]


class DataError(ValueError):
    """A problem with the user's data, tokenizer or outputs, in one line.

    The message names the file (and line or field where there is one) and says how to
    fix it; the command-line entry points print it as ``megasmoe: data error: ...``.
    """
