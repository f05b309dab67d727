"""Preprocessing: documents -> token ids -> a Megatron indexed dataset (``.bin`` + ``.idx``).

Every document becomes one sequence of its token ids followed by the tokenizer's EOD id
(see ``megasmoe.data.documents`` for what a document is in .jsonl and .txt inputs).
Encoding runs in ``workers`` processes; batches come back in input order, so the output
is byte-identical for any number of workers. Outputs are written under temporary names
and renamed at the end: an interrupted run never leaves a ``.bin``/``.idx`` pair that
looks complete.

Command-line entry points (wired into ``megasmoe``): ``tokenizer_main`` for
``megasmoe tokenizer train`` and ``preprocess_main`` for ``megasmoe preprocess``.
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing
import os
import struct
import sys
import time
import warnings
from contextlib import closing
from itertools import chain
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from megasmoe.data.documents import input_kind, iter_documents
from megasmoe.data.errors import DataError
from megasmoe.data.tokenizer import MODEL_TYPES, load_tokenizer, train_tokenizer

__all__ = ["preprocess", "preprocess_documents", "check_indexed_dataset", "tokenizer_main",
           "preprocess_main"]

_BATCH_BYTES = 1 << 18  # text per task sent to a worker: small enough to balance 2-16 workers


def _indexed_dataset_module():
    # Imported on use: megatron-core is heavy, and its import-time warnings (TE/Apex
    # missing, deprecations in model code) say nothing about data work.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex.*")
        warnings.simplefilter("ignore", DeprecationWarning)
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


# ---- encoding, in this process or in workers ------------------------------------------

_WORKER_TOKENIZER = None


def _init_worker(tokenizer_path: str, eod_token: str | None) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = load_tokenizer(tokenizer_path, eod_token)


def _encode_batch(texts: list[str]) -> list[tuple[int, np.ndarray]]:
    """(UTF-8 bytes, ids + [eod]) per document, with the worker's tokenizer."""
    tok = _WORKER_TOKENIZER
    # int64 here; the builder casts to the dataset's dtype.
    return [(len(t.encode("utf-8")), np.array(tok.encode(t) + [tok.eod], dtype=np.int64))
            for t in texts]


def _batches(documents: Iterable[str]) -> Iterator[list[str]]:
    batch, size = [], 0
    for doc in documents:
        if not doc:  # an empty document would be a lone EOD: dropped, as in file inputs
            continue
        batch.append(doc)
        size += len(doc)
        if size >= _BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _encoded(documents: Iterable[str], tokenizer_path: Path, eod_token: str | None,
             workers: int) -> Iterator[tuple[int, np.ndarray]]:
    if workers <= 1:
        _init_worker(str(tokenizer_path), eod_token)
        for batch in _batches(documents):
            yield from _encode_batch(batch)
        return
    with multiprocessing.get_context().Pool(workers, _init_worker,
                                            (str(tokenizer_path), eod_token)) as pool:
        # A bounded window of batches in flight, collected in submission order: memory
        # stays flat on big inputs (Pool.imap would read the whole input ahead).
        pending: collections.deque = collections.deque()
        for batch in _batches(documents):
            pending.append(pool.apply_async(_encode_batch, (batch,)))
            if len(pending) >= 2 * workers:
                yield from pending.popleft().get()
        while pending:
            yield from pending.popleft().get()


# ---- writing ------------------------------------------------------------------------------

def _paths(prefix: Path) -> tuple[Path, Path]:
    return prefix.with_name(prefix.name + ".bin"), prefix.with_name(prefix.name + ".idx")


def preprocess_documents(documents: Iterable[str], output_prefix: str | Path,
                         tokenizer_path: str | Path, workers: int = 1, progress: bool = True,
                         eod_token: str | None = None, source: str = "input") -> dict:
    """Tokenize ``documents`` (strings) into ``<output_prefix>.bin/.idx``.

    Each non-empty document becomes one sequence, its ids then EOD. ``source`` names the
    input in error messages. See :func:`preprocess` for outputs and the returned stats.
    """
    if workers < 1:
        raise DataError(f"--workers is {workers}; use 1 or more encoding processes")
    ixd = _indexed_dataset_module()
    from tqdm import tqdm

    tok = load_tokenizer(tokenizer_path, eod_token)
    dtype = ixd.DType.optimal_dtype(tok.vocab_size)
    prefix = Path(output_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    final_bin, final_idx = _paths(prefix)
    tmp_bin, tmp_idx = _paths(prefix.with_name(f"{prefix.name}.tmp-{os.getpid()}"))
    stats = {"documents": 0, "tokens": 0, "bytes": 0}
    start = time.perf_counter()
    builder = None
    try:
        builder = ixd.IndexedDatasetBuilder(str(tmp_bin), dtype=dtype)
        with tqdm(desc=f"preprocess {prefix.name}", unit="B", unit_scale=True,
                  unit_divisor=1024, disable=not progress, file=sys.stderr) as bar:
            # closing(): a failure here stops the worker pool now, not at garbage collection.
            with closing(_encoded(documents, Path(tokenizer_path), eod_token, workers)) as pairs:
                for nbytes, ids in pairs:
                    builder.add_document(ids, [len(ids)])
                    stats["documents"] += 1
                    stats["tokens"] += len(ids)
                    stats["bytes"] += nbytes
                    bar.update(nbytes)
        if stats["documents"] == 0:
            raise DataError(f"{source}: no documents (empty input); check --input and "
                            "--json-key")
        builder.finalize(str(tmp_idx))
        # Remove a stale .idx first: if we die between the renames, a lone .bin is left,
        # never an old .idx beside a new .bin.
        final_idx.unlink(missing_ok=True)
        os.replace(tmp_bin, final_bin)
        os.replace(tmp_idx, final_idx)
    finally:
        if builder is not None:
            builder.data_file.close()
        tmp_bin.unlink(missing_ok=True)
        tmp_idx.unlink(missing_ok=True)
    stats["seconds"] = time.perf_counter() - start
    return {**stats, "prefix": str(prefix), "bin": str(final_bin), "idx": str(final_idx)}


def preprocess(inputs: Sequence[str | Path], output_prefix: str | Path,
               tokenizer_path: str | Path, json_key: str = "text", workers: int = 1,
               progress: bool = True, eod_token: str | None = None) -> dict:
    """Tokenize .jsonl / .txt files into one Megatron indexed dataset.

    Writes ``<output_prefix>.bin`` and ``.idx`` (token dtype from the vocab size: uint16
    below 65500 ids, else int32). Returns ``documents``, ``tokens`` (EOD included),
    ``bytes`` (UTF-8 text), ``seconds`` and the output paths. DataError for missing or
    unsupported inputs, a JSON line without ``json_key``, or no documents at all.
    """
    paths = [Path(p) for p in inputs]
    if not paths:
        raise DataError("no input files; pass --input FILE [FILE ...]")
    for p in paths:  # fail before any work, not halfway through the first file
        input_kind(p)
        if not p.is_file():
            raise DataError(f"{p}: input file not found; check the --input path")
    docs = chain.from_iterable(iter_documents(p, json_key) for p in paths)
    return preprocess_documents(docs, output_prefix, tokenizer_path, workers, progress,
                                eod_token, source=", ".join(map(str, paths)))


# ---- checking -----------------------------------------------------------------------------

# The .idx format of megatron-core 0.16 (tests check these against megatron's own):
# magic, <Q version, <B dtype code, <Q sequences S, <Q documents D, then int32 lengths[S],
# int64 pointers[S], int64 document indices[D]. Read here with numpy alone, so checking
# a cached dataset does not pay megatron's import.
INDEX_MAGIC = b"MMIDIDX\x00\x00"
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64,
               6: np.float64, 7: np.float32, 8: np.uint16}


def check_indexed_dataset(prefix: str | Path) -> int:
    """DataError unless ``<prefix>.bin`` and ``.idx`` exist, parse, and agree in size.

    Returns the number of sequences (one per document as written by ``preprocess``):
    the count megatron's dataset builder splits into train/valid/test.
    """
    prefix = Path(str(prefix).removesuffix(".bin").removesuffix(".idx"))
    bin_path, idx_path = _paths(prefix)
    fix = f"re-run `megasmoe preprocess` to rebuild {prefix}.bin/.idx"
    for p in (idx_path, bin_path):
        if not p.is_file():
            raise DataError(f"{p}: missing; {fix}")
    head_size = len(INDEX_MAGIC) + 8 + 1 + 8 + 8
    with open(idx_path, "rb") as f:
        head = f.read(head_size)
        if len(head) < head_size or not head.startswith(INDEX_MAGIC):
            raise DataError(f"{idx_path}: not a Megatron index (bad header); {fix}")
        code, n_seq, n_doc = struct.unpack_from("<BQQ", head, len(INDEX_MAGIC) + 8)
        lengths = np.frombuffer(f.read(4 * n_seq), dtype=np.int32)
    if code not in DTYPE_CODES:
        raise DataError(f"{idx_path}: unknown token dtype code {code}; {fix}")
    want_idx = head_size + n_seq * (4 + 8) + n_doc * 8
    have_idx = idx_path.stat().st_size
    if len(lengths) < n_seq or have_idx < want_idx:
        raise DataError(f"{idx_path}: truncated index ({have_idx} bytes, header says "
                        f"{want_idx}); {fix}")
    want_bin = int(lengths.sum(dtype=np.int64)) * np.dtype(DTYPE_CODES[code]).itemsize
    have_bin = bin_path.stat().st_size
    if have_bin != want_bin:
        what = "truncated" if have_bin < want_bin else "longer than its index"
        raise DataError(f"{bin_path}: {what} ({have_bin} bytes, {idx_path.name} says "
                        f"{want_bin}); {fix}")
    return int(n_seq)


# ---- command line -------------------------------------------------------------------------

def _run(fn, args) -> int:
    try:
        fn(args)
    except DataError as e:
        print(f"megasmoe: data error: {e}", file=sys.stderr)
        return 2
    return 0


def tokenizer_main(argv: Sequence[str] | None = None) -> int:
    """``megasmoe tokenizer train``: train a SentencePiece tokenizer; returns the exit code."""
    p = argparse.ArgumentParser(prog="megasmoe tokenizer train",
                                description="Train a lossless SentencePiece tokenizer.")
    p.add_argument("--input", nargs="+", required=True, metavar="FILE",
                   help=".jsonl or .txt files (optionally .gz)")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--model-type", choices=MODEL_TYPES, default="bpe")
    p.add_argument("--json-key", default="text", help="JSON field holding the text")
    args = p.parse_args(argv)

    def work(a):
        start = time.perf_counter()
        path = train_tokenizer(a.input, a.output_prefix, a.vocab_size, a.model_type,
                               json_key=a.json_key)
        n = load_tokenizer(path).vocab_size
        print(f"megasmoe: wrote {path} ({n} tokens, {a.model_type}) in "
              f"{time.perf_counter() - start:.1f}s")

    return _run(work, args)


def preprocess_main(argv: Sequence[str] | None = None) -> int:
    """``megasmoe preprocess``: build a Megatron indexed dataset; returns the exit code."""
    p = argparse.ArgumentParser(prog="megasmoe preprocess",
                                description="Tokenize .jsonl/.txt files into PREFIX.bin/.idx.")
    p.add_argument("--input", nargs="+", required=True, metavar="FILE",
                   help=".jsonl (one JSON object per line) or .txt (blank-line separated "
                        "documents), optionally .gz")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    p.add_argument("--tokenizer", required=True,
                   help="SentencePiece .model or Hugging Face tokenizer.json")
    p.add_argument("--json-key", default="text", help="JSON field holding the text")
    p.add_argument("--workers", type=int, default=1, help="encoding processes")
    p.add_argument("--eod-token", default=None,
                   help="end-of-document token of a tokenizer.json (default: </s>, "
                        "<|endoftext|>, ...)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)

    def work(a):
        s = preprocess(a.input, a.output_prefix, a.tokenizer, a.json_key, a.workers,
                       progress=not a.no_progress, eod_token=a.eod_token)
        mb = s["bytes"] / 1e6
        print(f"megasmoe: wrote {s['prefix']}.bin/.idx: {s['documents']} documents, "
              f"{s['tokens']} tokens, {mb:.2f} MB of text in {s['seconds']:.1f}s "
              f"({mb / max(s['seconds'], 1e-9):.2f} MB/s)")

    return _run(work, args)
