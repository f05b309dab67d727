"""Reading documents from input files: JSON Lines and plain text, optionally gzipped.

What a document is:

- ``.jsonl`` / ``.json`` (JSON Lines): one JSON object per line; the document is the
  string under ``json_key`` (default ``"text"``). Blank lines are skipped.
- ``.txt``: documents are separated by one or more blank lines (lines holding only
  whitespace count as blank), so each paragraph is a document; the line breaks inside
  a paragraph are kept. Put multi-paragraph documents in JSON Lines instead.

Any of these may end in ``.gz``. Files must be UTF-8. Empty documents are dropped.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import IO, Iterator

from megasmoe.data.errors import DataError

__all__ = ["iter_documents", "input_kind"]

_JSONL = (".jsonl", ".json")
_TEXT = (".txt",)


def input_kind(path: Path) -> str:
    """``"jsonl"`` or ``"txt"`` from the file name; DataError for anything else."""
    name = path.name.lower().removesuffix(".gz")
    if name.endswith(_JSONL):
        return "jsonl"
    if name.endswith(_TEXT):
        return "txt"
    raise DataError(f"{path}: unsupported input type; use .jsonl (JSON Lines) or .txt files "
                    "(optionally .gz)")


def _open(path: Path) -> IO[str]:
    if not path.is_file():
        raise DataError(f"{path}: input file not found; check the --input path")
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _jsonl_documents(path: Path, f: IO[str], json_key: str) -> Iterator[str]:
    for lineno, line in enumerate(f, 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg}); each line must be one JSON "
                            "object") from None
        if not isinstance(record, dict) or json_key not in record:
            keys = ", ".join(sorted(record)) if isinstance(record, dict) else type(record).__name__
            raise DataError(f"{where}: no key {json_key!r} (found: {keys}); pass "
                            "--json-key NAME for the field that holds the text")
        text = record[json_key]
        if not isinstance(text, str):
            raise DataError(f"{where}: {json_key!r} is {type(text).__name__}, not a string; "
                            "pass --json-key NAME for the field that holds the text")
        yield text


def _text_documents(f: IO[str]) -> Iterator[str]:
    para: list[str] = []
    for line in f:
        line = line.rstrip("\n")
        if line.strip():
            para.append(line)
        elif para:
            yield "\n".join(para)
            para = []
    if para:
        yield "\n".join(para)


def iter_documents(path: str | Path, json_key: str = "text") -> Iterator[str]:
    """Yield the non-empty documents of one input file (see the module docstring)."""
    path = Path(path)
    kind = input_kind(path)
    with _open(path) as f:
        try:
            docs = _jsonl_documents(path, f, json_key) if kind == "jsonl" else _text_documents(f)
            for doc in docs:
                if doc:
                    yield doc
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); convert "
                            "it to UTF-8") from None
