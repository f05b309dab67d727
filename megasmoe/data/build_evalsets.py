"""Build the embedded evaluation data, deterministically.

    python -m megasmoe.data.build_evalsets            # rewrite the files
    python -m megasmoe.data.build_evalsets --check    # verify the committed files

Two steps:

1. The **standard-library snapshot** (``python-stdlib.jsonl.gz`` and
   ``CPython-LICENSE.txt``) is copied from the running interpreter's stdlib, which must be
   CPython 3.11.7 (``STDLIB_VERSION``); under any other interpreter it is left as
   committed, and --check verifies its contents against ``STDLIB_SHA256`` only.
2. The **multiple-choice sets** are built from the committed held-out text only (the
   corpus' test chapters and the snapshot), so they are the same on every machine.

Every choice is a pure function of the input text: items and distractors are ranked by
SHA-256 of stable ids, never by a random generator. Changing anything that changes an
item means a new version: bump ``megasmoe.data.evalsets.MC_VERSION`` (the file name).
"""

from __future__ import annotations

import argparse
import ast
import gzip
import hashlib
import json
import re
import sys
import sysconfig
from itertools import islice
from pathlib import Path

from megasmoe.data.corpus import corpus_records, split_of
from megasmoe.data.errors import DataError
from megasmoe.data.evalsets import EVALSETS_DIR, MC_SETS, mc_set_path, python_records

__all__ = ["STDLIB_VERSION", "STDLIB_SHA256", "STDLIB_MODULES", "ITEMS_PER_SET", "build", "main",
           "stdlib_records", "austen_items", "python_items", "sentence_spans"]

STDLIB_VERSION = (3, 11, 7)
# SHA-256 of the snapshot's uncompressed JSON Lines, so --check can verify it anywhere.
STDLIB_SHA256 = "2e3735a28c8d0af8adea3fd68472102bc42d59aee9242ddbac91781adebce1b5"
# Well-known pure-Python modules (paths under the stdlib directory), ~0.85 MB of text.
# None of them is covered by the extra licences of CPython's LICENSE.txt.
STDLIB_MODULES = (
    "abc.py", "base64.py", "bisect.py", "calendar.py", "collections/__init__.py",
    "colorsys.py", "contextlib.py", "copy.py", "csv.py", "dataclasses.py", "fnmatch.py",
    "fractions.py", "functools.py", "getopt.py", "gettext.py", "glob.py", "graphlib.py",
    "heapq.py", "hmac.py", "json/__init__.py", "json/decoder.py", "json/encoder.py",
    "numbers.py", "operator.py", "pathlib.py", "pprint.py", "queue.py", "random.py",
    "sched.py", "shlex.py", "shutil.py", "statistics.py", "string.py", "textwrap.py",
    "tokenize.py", "traceback.py", "types.py", "uuid.py", "warnings.py", "weakref.py",
)
ITEMS_PER_SET = 100
N_CHOICES = 4
# Austen: a continuation is one whole sentence of this many words; the context is the
# sentences before it, at least CONTEXT_WORDS[0] words, cut to the last CONTEXT_WORDS[1].
SENTENCE_WORDS = (8, 30)
CONTEXT_WORDS = (40, 80)
# Python: a continuation is one single-line statement of this many characters; the context
# is the CONTEXT_LINES source lines before it.
LINE_CHARS = (20, 80)
CONTEXT_LINES = 8
# A distractor's length (words or characters) is within this fraction of the true one's.
LENGTH_TOLERANCE = 0.25
# At most this many items come from one chapter or module, so every source contributes.
MAX_PER_DOCUMENT = {"austen": 15, "python": 5}

_STDLIB_FILE = EVALSETS_DIR / "python-stdlib.jsonl.gz"
_LICENSE_FILE = EVALSETS_DIR / "CPython-LICENSE.txt"
# A sentence ends at . ! or ? (plus closing quotes) followed by space and a capital or quote.
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s+[\"'(A-Z])")
_ABBREVIATIONS = {"Mr", "Mrs", "Dr", "St", "Col", "Capt", "Esq", "Rev", "Messrs", "Ms"}


def _rank(key: str) -> str:
    """The order used for every choice: SHA-256 of a stable id."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _jsonl(records: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")


def _gzip(payload: bytes) -> bytes:
    # mtime 0 and no file name: the same payload always compresses to the same bytes here.
    return gzip.compress(payload, compresslevel=9, mtime=0)


# ---- the standard-library snapshot ------------------------------------------------------

def stdlib_records(stdlib_dir: Path) -> list[dict]:
    """The ``STDLIB_MODULES`` of ``stdlib_dir`` as ``{"id", "path", "text"}`` records."""
    records = []
    for rel in STDLIB_MODULES:
        path = Path(stdlib_dir) / rel
        try:
            text = path.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: cannot read as UTF-8 ({e}); use CPython "
                            f"{'.'.join(map(str, STDLIB_VERSION))}'s standard library") from e
        module = rel[:-len(".py")].removesuffix("/__init__").replace("/", ".")
        records.append({"id": module, "path": rel, "text": text})
    return records


def _stdlib_outputs() -> dict[Path, bytes] | None:
    """The snapshot files from the running interpreter, or None if it is not the pinned one."""
    if sys.implementation.name != "cpython" or sys.version_info[:3] != STDLIB_VERSION:
        return None
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return {_STDLIB_FILE: _gzip(_jsonl(stdlib_records(stdlib))),
            _LICENSE_FILE: (stdlib / "LICENSE.txt").read_bytes()}


# ---- Austen: the next sentence ------------------------------------------------------------

def sentence_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) character spans of the sentences of ``text``; none crosses a paragraph."""
    spans = []
    offset = 0
    for para in text.split("\n\n"):
        start = len(para) - len(para.lstrip())
        for m in _SENTENCE_END.finditer(para):
            words = para[start:m.start()].split()
            if words and words[-1].strip("\"'(") in _ABBREVIATIONS:
                continue
            spans.append((offset + start, offset + m.end()))
            rest = para[m.end():]
            start = m.end() + len(rest) - len(rest.lstrip())
        if para[start:].strip():
            spans.append((offset + start, offset + len(para.rstrip())))
        offset += len(para) + 2
    return spans


def _austen_candidates(doc_id: str, text: str, seen_elsewhere: str) -> list[dict]:
    spans = sentence_spans(text)
    out = []
    for i in range(1, len(spans)):
        start, end = spans[i]
        sentence = text[start:end]
        n_words = len(sentence.split())
        if not SENTENCE_WORDS[0] <= n_words <= SENTENCE_WORDS[1] or sentence.count('"') % 2:
            continue  # (half a quotation: its quote marks would give the place away)
        if sentence in seen_elsewhere:
            continue
        context_end = spans[i - 1][1]
        j, words = i - 1, 0
        while j >= 0 and words < CONTEXT_WORDS[0]:
            words += len(text[spans[j][0]:spans[j][1]].split())
            j -= 1
        if words < CONTEXT_WORDS[0]:
            continue
        context = text[spans[j + 1][0]:context_end]
        if words > CONTEXT_WORDS[1]:
            # Keep the last CONTEXT_WORDS[1] words, cut at a word start.
            starts = [m.start() for m in re.finditer(r"\S+", context)]
            context = context[starts[-CONTEXT_WORDS[1]]:]
        out.append({"doc": doc_id, "offset": start, "span": (context_end - len(context), end),
                    "context": context, "sep": text[context_end:start], "text": sentence,
                    "size": n_words})
    return out


def austen_items() -> list[dict]:
    """The ``austen-continuation`` items, from the corpus' test chapters only."""
    records = corpus_records()
    tests = [r for r in records if split_of(r["id"]) == "test"]
    # Sentences also found in a training or validation chapter are never used.
    seen_elsewhere = "\n\n".join(r["text"] for r in records if split_of(r["id"]) != "test")
    candidates = [c for r in tests for c in _austen_candidates(r["id"], r["text"],
                                                                seen_elsewhere)]
    return _items("austen", candidates, [r["id"] for r in tests])


# ---- Python: the next line --------------------------------------------------------------

def _python_candidates(record: dict) -> list[dict]:
    text = record["text"]
    # Lines as the parser counts them: str.splitlines would also break at form feeds.
    lines = text.split("\n")
    line_starts = [0]
    for line in lines:
        line_starts.append(line_starts[-1] + len(line) + 1)
    out = []
    for node in ast.walk(ast.parse(text, filename=record["path"])):
        if not isinstance(node, ast.stmt) or node.lineno != node.end_lineno:
            continue
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # docstrings
        n = node.lineno - 1
        statement = lines[n].strip()
        # Only lines that hold exactly this statement: no `if x: y`, no trailing comment.
        # (ast column offsets count UTF-8 bytes.)
        segment = lines[n].encode("utf-8")[node.col_offset:node.end_col_offset]
        if statement != segment.decode("utf-8"):
            continue
        if not LINE_CHARS[0] <= len(statement) <= LINE_CHARS[1]:
            continue
        first = max(0, n - CONTEXT_LINES)
        while first < n and not lines[first].strip():
            first += 1
        if len([ln for ln in lines[first:n] if ln.strip()]) < CONTEXT_LINES // 2:
            continue
        context = "\n".join(lines[first:n]).rstrip()
        start = line_starts[n] + len(lines[n]) - len(lines[n].lstrip())
        context_end = line_starts[first] + len(context)
        out.append({"doc": record["id"], "offset": node.lineno,
                    "span": (line_starts[first], line_starts[n + 1]), "context": context,
                    "sep": text[context_end:start], "text": statement, "size": len(statement)})
    return out


def python_items(records: list[dict]) -> list[dict]:
    """The ``python-continuation`` items, from the embedded standard-library modules."""
    candidates = [c for r in records for c in _python_candidates(r)]
    return _items("python", candidates, [r["id"] for r in records],
                  texts={r["id"]: r["text"] for r in records})


# ---- shared selection -------------------------------------------------------------------

def _item_id(domain: str, c: dict) -> str:
    where = f"L{c['offset']}" if domain == "python" else str(c["offset"])
    return f"{domain}-{c['doc']}-{where}"


def _items(domain: str, candidates: list[dict], doc_order: list[str],
           texts: dict[str, str] | None = None) -> list[dict]:
    """Pick ``ITEMS_PER_SET`` non-overlapping candidates and give each 3 distractors."""
    chosen: list[dict] = []
    per_doc: dict[str, int] = {}
    for c in sorted(candidates, key=lambda c: _rank(_item_id(domain, c))):
        if per_doc.get(c["doc"], 0) >= MAX_PER_DOCUMENT[domain]:
            continue
        if any(o["doc"] == c["doc"] and o["span"][0] < c["span"][1] and c["span"][0] < o["span"][1]
               for o in chosen):
            continue
        chosen.append(c)
        per_doc[c["doc"]] = per_doc.get(c["doc"], 0) + 1
        if len(chosen) == ITEMS_PER_SET:
            break
    if len(chosen) < ITEMS_PER_SET:
        raise DataError(f"{domain}: only {len(chosen)} multiple-choice items found, "
                        f"{ITEMS_PER_SET} wanted; the held-out text is too small")
    chosen.sort(key=lambda c: (doc_order.index(c["doc"]), c["offset"]))

    pool: dict[str, dict] = {}
    for c in candidates:
        pool.setdefault(c["text"], c)  # one entry per distinct text, its first place
    items = []
    for c in chosen:
        item_id = _item_id(domain, c)
        tolerance = max(2, LENGTH_TOLERANCE * c["size"])
        others = [o for o in pool.values()
                  if o["doc"] != c["doc"] and abs(o["size"] - c["size"]) <= tolerance
                  and o["text"] != c["text"]]
        others.sort(key=lambda o: _rank(f"{item_id}|{o['text']}"))
        # A line found anywhere in the true module could be right there too: skip it.
        picked = list(islice((o["text"] for o in others
                              if texts is None or o["text"] not in texts[c["doc"]]),
                             N_CHOICES - 1))
        if len(picked) < N_CHOICES - 1:
            raise DataError(f"{domain}: item {item_id} has only {len(picked)} distractors")
        texts_ = [c["text"], *picked]
        order = sorted(range(N_CHOICES), key=lambda k: _rank(f"{item_id}#{k}"))
        choices = [c["sep"] + texts_[k] for k in order]
        items.append({"id": item_id, "context": c["context"], "choices": choices,
                      "answer": order.index(0)})
    return items


# ---- build / check ----------------------------------------------------------------------

def build(stdlib_records_: list[dict] | None = None) -> dict[Path, bytes]:
    """Every multiple-choice file's bytes, built from the committed held-out text
    (or from ``stdlib_records_`` for the Python set, when given)."""
    records = python_records() if stdlib_records_ is None else stdlib_records_
    sets = {"austen-continuation": austen_items(), "python-continuation": python_items(records)}
    assert tuple(sets) == MC_SETS
    return {mc_set_path(name): _jsonl(items) for name, items in sets.items()}


def _check(snapshot: dict[Path, bytes] | None) -> list[str]:
    """The problems of the committed files: one line each, empty when all are right."""
    if not _STDLIB_FILE.is_file():
        return [f"{_STDLIB_FILE}: missing; run `python -m megasmoe.data.build_evalsets` "
                f"under CPython {'.'.join(map(str, STDLIB_VERSION))}"]
    problems = []
    payload = gzip.decompress(_STDLIB_FILE.read_bytes())
    if hashlib.sha256(payload).hexdigest() != STDLIB_SHA256:
        problems.append(f"{_STDLIB_FILE}: contents differ from STDLIB_SHA256 in "
                        "megasmoe/data/build_evalsets.py")
    if snapshot is not None:
        # Compressed bytes can differ between zlib builds: compare what they hold.
        fresh = gzip.decompress(snapshot[_STDLIB_FILE])
        if payload != fresh:
            problems.append(f"{_STDLIB_FILE}: differs from this interpreter's standard library")
        if _LICENSE_FILE.read_bytes() != snapshot[_LICENSE_FILE]:
            problems.append(f"{_LICENSE_FILE}: differs from this interpreter's LICENSE.txt")
        payload = fresh
    records = [json.loads(line) for line in payload.decode("utf-8").split("\n") if line]
    for path, data in build(records).items():
        if not path.is_file() or path.read_bytes() != data:
            problems.append(f"{path}: differs from what the builder makes; if the change "
                            "is meant, bump MC_VERSION in megasmoe/data/evalsets.py and run "
                            "`python -m megasmoe.data.build_evalsets`")
    return problems


def main(argv: list[str] | None = None) -> int:
    """Rewrite (or with ``--check`` verify) the embedded evaluation data; 0 when all is well."""
    parser = argparse.ArgumentParser(prog="python -m megasmoe.data.build_evalsets",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="verify the committed files instead of writing them")
    args = parser.parse_args(argv)
    try:
        snapshot = _stdlib_outputs()
        pinned = ".".join(map(str, STDLIB_VERSION))
        if snapshot is None:
            print(f"build_evalsets: not CPython {pinned}; the standard-library snapshot is "
                  "kept as committed")
        if args.check:
            problems = _check(snapshot)
            for line in problems:
                print(f"build_evalsets: {line}", file=sys.stderr)
            if not problems:
                print("build_evalsets: all embedded evaluation files are up to date")
            return 1 if problems else 0
        if snapshot is not None:
            for path, data in snapshot.items():
                path.write_bytes(data)
            digest = hashlib.sha256(gzip.decompress(snapshot[_STDLIB_FILE])).hexdigest()
            if digest != STDLIB_SHA256:
                print(f"build_evalsets: the snapshot changed: set STDLIB_SHA256 = {digest!r}")
        for path, data in build().items():
            path.write_bytes(data)
            print(f"build_evalsets: wrote {path}")
    except DataError as e:
        print(f"build_evalsets: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
