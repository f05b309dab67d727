"""The default data: the embedded corpus, tokenized and preprocessed once, then cached.

``prepare_default_data(cache_dir, vocab_size)`` builds, in ``cache_dir/<name>/``, a
SentencePiece tokenizer trained on the corpus' train split and one indexed dataset per
split. ``<name>`` carries a hash of the corpus file, the vocab size and the model type,
so a changed corpus or vocab gets a fresh directory and an unchanged one is reused.
Building happens in a temporary directory renamed into place under a file lock, so
concurrent callers (one per rank) build it once and never see a half-built directory.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

from megasmoe.data.corpus import SPLITS, corpus_documents, corpus_files
from megasmoe.data.errors import DataError
from megasmoe.data.preprocess import check_indexed_dataset, preprocess_documents
from megasmoe.data.tokenizer import train_tokenizer

__all__ = ["DEFAULT_VOCAB_SIZE", "prepare_default_data"]

DEFAULT_VOCAB_SIZE = 4096
_FORMAT = 1  # bump when the build recipe changes, to invalidate old caches


def _key(vocab_size: int, model_type: str) -> str:
    h = hashlib.sha256(corpus_files()[0].read_bytes())
    h.update(f"|{vocab_size}|{model_type}|{_FORMAT}".encode())
    return h.hexdigest()[:12]


def _paths(root: Path) -> dict:
    return {"tokenizer": root / "tokenizer.model", **{s: root / s for s in SPLITS}}


def _complete(root: Path, key: str) -> bool:
    try:
        if json.loads((root / "stamp.json").read_text())["key"] != key:
            return False
        if not (root / "tokenizer.model").is_file():
            return False
        for split in SPLITS:
            check_indexed_dataset(root / split)
    except (OSError, ValueError, KeyError):  # DataError is a ValueError
        return False
    return True


def _build(root: Path, key: str, vocab_size: int, model_type: str, workers: int,
           progress: bool) -> dict:
    paths = _paths(root)
    train_tokenizer(None, root / "tokenizer", vocab_size, model_type,
                    texts=corpus_documents("train"))
    stats = {}
    for split in SPLITS:
        stats[split] = preprocess_documents(corpus_documents(split), paths[split],
                                            paths["tokenizer"], workers, progress,
                                            source=f"embedded corpus ({split})")
    # Written last: its presence (with the right key) means the directory is complete.
    (root / "stamp.json").write_text(json.dumps(
        {"key": key, "vocab_size": vocab_size, "model_type": model_type,
         "splits": {s: {k: stats[s][k] for k in ("documents", "tokens", "bytes")}
                    for s in SPLITS}}, indent=1) + "\n")
    return paths


def prepare_default_data(cache_dir: str | Path, vocab_size: int = DEFAULT_VOCAB_SIZE,
                         workers: int = 1, model_type: str = "bpe",
                         progress: bool = False,
                         log: Optional[Callable[[str], None]] = None) -> dict:
    """Tokenizer and train/valid/test datasets of the embedded corpus, built once.

    Returns ``{"tokenizer": Path to the .model, "train"/"valid"/"test": dataset prefix}``.
    A second call with the same arguments returns the cached paths without writing.
    ``log`` receives one line before and one after a build (only the process that
    builds logs; concurrent callers wait on a file lock).
    """
    if vocab_size < 512:
        raise DataError(f"vocab size {vocab_size} is too small for the default tokenizer "
                        "(256 byte pieces + specials); use model.vocab_size >= 512")
    cache_dir = Path(cache_dir)
    key = _key(vocab_size, model_type)
    name = f"austen-{model_type}{vocab_size}-{key}"
    root = cache_dir / name
    if _complete(root, key):
        return _paths(root)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if _complete(root, key):  # another process built it while we waited
            return _paths(root)
        # Under the lock, any temporary directory of this name is a dead builder's.
        for stale in cache_dir.glob(f".{name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = cache_dir / f".{name}.tmp-{os.getpid()}"
        try:
            tmp.mkdir()
            start = time.monotonic()
            if log:
                log(f"megasmoe: first use of the embedded corpus: training a {vocab_size}-piece "
                    f"{model_type.upper()} tokenizer and tokenizing the corpus into {root} "
                    f"(cached for later runs)")
            _build(tmp, key, vocab_size, model_type, workers, progress)
            if root.exists():  # incomplete or damaged: replace it whole
                shutil.rmtree(root)
            os.rename(tmp, root)
            if log:
                log(f"megasmoe: corpus ready in {time.monotonic() - start:.1f} s")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return _paths(root)
