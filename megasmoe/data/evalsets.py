"""Embedded evaluation data: held-out text in two domains and multiple-choice sets.

- Domains (``DOMAINS``): ``austen``, the corpus' test-split chapters (never trained on),
  and ``python``, a fixed set of CPython 3.11.7 standard-library modules (PSF licence),
  shipped in ``evalsets/python-stdlib.jsonl.gz`` as ``{"id", "path", "text"}`` records,
  one per module.
- Multiple-choice sets (``MC_SETS``): pick the true continuation of a held-out passage
  among 4, one JSON object per line, ``{"id", "context", "choices", "answer"}``. They are
  versioned in the file name (``<name>-v1.jsonl``): any change to an item is a new
  version, so scores under one name are always comparable.

Everything is built by ``python -m megasmoe.data.build_evalsets`` (see
``evalsets/PROVENANCE.md``); this module only reads the committed files.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from megasmoe.data.corpus import corpus_documents, read_embedded_jsonl
from megasmoe.data.errors import DataError

__all__ = ["DOMAINS", "MC_SETS", "MC_VERSION", "EVALSETS_DIR", "domain_documents",
           "python_records", "mc_set_path", "evalset_files"]

DOMAINS: tuple[str, ...] = ("austen", "python")
MC_SETS: tuple[str, ...] = ("austen-continuation", "python-continuation")
# Bumped (and the files renamed) whenever any item of any set changes.
MC_VERSION = "v1"

EVALSETS_DIR = Path(__file__).resolve().parent / "evalsets"
_STDLIB_FILE = EVALSETS_DIR / "python-stdlib.jsonl.gz"


def _check_name(kind: str, name: str, known: tuple[str, ...]) -> None:
    if name not in known:
        raise DataError(f"unknown embedded {kind} {name!r}; use one of {', '.join(known)}")


@lru_cache(maxsize=1)
def _python_records() -> tuple[dict, ...]:
    return read_embedded_jsonl(_STDLIB_FILE, "embedded evaluation data")


def python_records() -> list[dict]:
    """The embedded standard-library modules as ``{"id", "path", "text"}`` records."""
    return [dict(r) for r in _python_records()]


def domain_documents(name: str) -> list[str]:
    """The held-out documents of an embedded domain (``austen`` or ``python``), in order."""
    _check_name("domain", name, DOMAINS)
    if name == "austen":
        return corpus_documents("test")
    return [r["text"] for r in _python_records()]


def mc_set_path(name: str) -> Path:
    """The committed JSONL file of an embedded multiple-choice set (current version)."""
    _check_name("multiple-choice set", name, MC_SETS)
    return EVALSETS_DIR / f"{name}-{MC_VERSION}.jsonl"


def evalset_files() -> list[Path]:
    """Every file of the embedded evaluation data (to package or hash), sorted."""
    return sorted([_STDLIB_FILE, EVALSETS_DIR / "CPython-LICENSE.txt",
                   EVALSETS_DIR / "PROVENANCE.md", *(mc_set_path(n) for n in MC_SETS)])
