"""The embedded default corpus: Jane Austen's six novels, one document per chapter.

The text ships in ``corpus/austen.jsonl.gz`` (see ``corpus/PROVENANCE.md``). Each record
is ``{"id", "title", "chapter", "text"}``; paragraphs inside ``text`` are separated by a
blank line. A chapter's split is a pure function of its id (a SHA-256 bucket), so the
train / valid / test sets never change as long as the ids do not.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from functools import lru_cache
from pathlib import Path

from megasmoe.data.errors import DataError

__all__ = ["SPLITS", "PROVENANCE", "corpus_files", "corpus_records", "corpus_documents",
           "split_of", "read_embedded_jsonl"]

SPLITS = ("train", "valid", "test")

PROVENANCE = ("Jane Austen's six completed novels (public domain; Project Gutenberg eBooks "
              "#161, #1342, #141, #158, #121, #105) as shipped in Debian's "
              "r-cran-janeaustenr 1.0.0-1 (MIT); one document per chapter, 269 chapters, "
              "4.0 MB of text; see megasmoe/data/corpus/PROVENANCE.md")

_DIR = Path(__file__).resolve().parent / "corpus"
_FILE = _DIR / "austen.jsonl.gz"
# Percent buckets per split: ~96 / 2 / 2 by document.
_VALID_BUCKETS = range(0, 2)
_TEST_BUCKETS = range(2, 4)


def corpus_files() -> list[Path]:
    """The files of the embedded corpus: the compressed text and its PROVENANCE.md."""
    return [_FILE, _DIR / "PROVENANCE.md"]


def split_of(doc_id: str) -> str:
    """The split (train / valid / test) of a document, from a hash of its id."""
    bucket = int(hashlib.sha256(doc_id.encode("utf-8")).hexdigest()[:8], 16) % 100
    if bucket in _VALID_BUCKETS:
        return "valid"
    if bucket in _TEST_BUCKETS:
        return "test"
    return "train"


def read_embedded_jsonl(path: Path, what: str) -> tuple[dict, ...]:
    """The records of an embedded ``.jsonl.gz`` file shipped with megasmoe; DataError
    naming ``what`` when the file is missing (an incomplete install)."""
    if not path.is_file():
        raise DataError(f"{path}: {what} missing; reinstall megasmoe from a full checkout")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return tuple(json.loads(line) for line in f)


@lru_cache(maxsize=1)
def _records() -> tuple[dict, ...]:
    return read_embedded_jsonl(_FILE, "embedded corpus")


def corpus_records(split: str | None = None) -> list[dict]:
    """The corpus records (id, title, chapter, text) of one split, or all of them."""
    if split is not None and split not in SPLITS:
        raise DataError(f"unknown corpus split {split!r}; use one of {', '.join(SPLITS)}")
    return [r for r in _records() if split is None or split_of(r["id"]) == split]


def corpus_documents(split: str) -> list[str]:
    """The chapter texts of one split (train, valid or test), in corpus order."""
    return [r["text"] for r in corpus_records(split)]
