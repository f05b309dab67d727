"""What ``megasmoe eval`` measures: text sets and multiple-choice sets, read and checked.

Everything here runs before any process group starts, identically in every rank, so a
bad file is refused once, in one line (``DataError``: file, line, field, fix; exit 2)
and nothing is written.

Text sets (perplexity):

- ``.txt``: documents separated by blank lines (as ``megasmoe preprocess`` reads them);
- ``.jsonl``: one ``{"text": ...}`` object per line;
- an indexed ``.bin/.idx`` prefix (already tokenized; each document ends with EOD).

Multiple-choice sets (``.jsonl``), one object per line::

    {"context": str, "choices": [str, str, ...], "answer": int, "id": str (optional)}

``answer`` is the 0-based index of the right choice; each choice is appended verbatim to
the context (so it starts with the separating space).
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from megasmoe.data.errors import DataError

__all__ = ["TextSet", "MCItem", "MCSet", "parse_named", "read_documents", "read_mc",
           "text_set", "mc_set", "default_text_sets", "default_mc_sets"]


@dataclass
class TextSet:
    """One perplexity dataset."""

    name: str
    """Name in the report (``--data NAME=PATH``)."""
    source: str
    """Where it comes from: ``split:valid``, ``embedded:austen`` or a path."""
    kind: str
    """``split`` (the run's own valid/test split), ``documents`` or ``indexed``."""
    documents: list = field(default_factory=list)
    """The documents (kind ``documents``)."""
    prefix: Optional[str] = None
    """The .bin/.idx prefix (kind ``indexed``), or the split name (kind ``split``)."""


@dataclass
class MCItem:
    """One multiple-choice question."""

    context: str
    """Text before the answer."""
    choices: list
    """Candidate continuations (each appended verbatim to the context)."""
    answer: int
    """0-based index of the right choice."""
    id: Optional[str] = None
    """Optional identifier carried into the report."""


@dataclass
class MCSet:
    """One multiple-choice dataset."""

    name: str
    """Name in the report (``--mc NAME=PATH``)."""
    source: str
    """Where it comes from (``embedded:<name>`` or a path)."""
    items: list
    """The MCItem questions, in file order."""


def parse_named(arg: str) -> tuple[str, str]:
    """``NAME=PATH`` -> (NAME, PATH); a bare PATH is named after its file (no suffixes)."""
    if "=" in arg:
        name, path = arg.split("=", 1)
    else:
        path = arg
        name = Path(arg).name.split(".")[0]
    if not name or "/" in name or not path:
        raise DataError(f"'{arg}': give NAME=PATH (a name without '/', then the file)")
    from megasmoe.config import caller_dir

    return name, str(caller_dir() / Path(path).expanduser())


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of a UTF-8 file (gzip if it ends in .gz)."""
    if not path.is_file():
        raise DataError(f"{path}: file not found; check the path")
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 text ({e.reason} at byte "
                                f"{e.start} of the line); convert the file to UTF-8") from None


def _json_line(path: Path, lineno: int, line: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg}); write one JSON object "
                        "per line") from None
    if not isinstance(record, dict):
        raise DataError(f"{path}:{lineno}: a JSON {type(record).__name__}, not an object; "
                        "write one JSON object per line")
    return record


def read_documents(path: str | Path) -> list[str]:
    """The non-empty documents of a ``.txt`` or ``.jsonl`` file (optionally ``.gz``)."""
    path = Path(path)
    stem = path.name.lower().removesuffix(".gz")
    docs: list[str] = []
    if stem.endswith((".jsonl", ".json")):
        for lineno, line in _lines(path):
            if not line.strip():
                continue
            text = _json_line(path, lineno, line).get("text")
            if not isinstance(text, str):
                raise DataError(f"{path}:{lineno}: field 'text' is missing or not a string; "
                                'write {"text": "..."} per line')
            if text.strip():
                docs.append(text)
    elif stem.endswith(".txt"):
        para: list[str] = []
        for _, line in _lines(path):
            if line.strip():
                para.append(line.rstrip("\n"))
            elif para:
                docs.append("\n".join(para))
                para = []
        if para:
            docs.append("\n".join(para))
    else:
        raise DataError(f"{path}: unknown kind of text file; use .txt, .jsonl or an indexed "
                        ".bin/.idx prefix")
    if not docs:
        raise DataError(f"{path}: empty (no documents); give a file with text in it")
    return docs


def _indexed_prefix(path: str) -> Optional[str]:
    """The prefix if ``path`` names an indexed dataset (prefix, .bin or .idx), else None."""
    prefix = path.removesuffix(".bin").removesuffix(".idx")
    if Path(prefix + ".bin").exists() or Path(prefix + ".idx").exists():
        return prefix
    return None


def text_set(arg: str) -> TextSet:
    """A ``--data NAME=PATH`` argument read and checked."""
    from megasmoe.data import check_indexed_dataset

    name, path = parse_named(arg)
    prefix = _indexed_prefix(path)
    if prefix is not None:
        if check_indexed_dataset(prefix) == 0:
            raise DataError(f"{prefix}.idx: empty (no documents); give a dataset with text in it")
        return TextSet(name, str(Path(prefix).resolve()), "indexed", prefix=prefix)
    return TextSet(name, str(Path(path).resolve()), "documents", read_documents(path))


def _mc_item(path: Path, lineno: int, record: dict) -> MCItem:
    where = f"{path}:{lineno}"
    context = record.get("context")
    if not isinstance(context, str):
        raise DataError(f"{where}: field 'context' is missing or not a string; each line "
                        'needs {"context": str, "choices": [str, ...], "answer": int}')
    choices = record.get("choices")
    if not isinstance(choices, list) or not all(isinstance(c, str) and c for c in choices):
        raise DataError(f"{where}: field 'choices' is missing or not a list of non-empty "
                        "strings; give the candidate continuations as strings")
    if len(choices) < 2:
        raise DataError(f"{where}: field 'choices' has {len(choices)} choice(s); give at "
                        "least 2")
    answer = record.get("answer")
    if not isinstance(answer, int) or isinstance(answer, bool):
        raise DataError(f"{where}: field 'answer' is missing or not an integer; give the "
                        "0-based index of the right choice")
    if not 0 <= answer < len(choices):
        raise DataError(f"{where}: field 'answer' is {answer}, out of range for "
                        f"{len(choices)} choices; give a 0-based index 0..{len(choices) - 1}")
    item_id = record.get("id")
    if item_id is not None and not isinstance(item_id, str):
        raise DataError(f"{where}: field 'id' is not a string; give a string or leave it out")
    return MCItem(context, list(choices), answer, item_id)


def read_mc(path: str | Path) -> list[MCItem]:
    """The questions of a multiple-choice JSONL file (format in the module docstring)."""
    path = Path(path)
    items = [_mc_item(path, lineno, _json_line(path, lineno, line))
             for lineno, line in _lines(path) if line.strip()]
    if not items:
        raise DataError(f"{path}: empty (no questions); give one JSON object per line")
    return items


def mc_set(arg: str) -> MCSet:
    """A ``--mc NAME=PATH`` argument read and checked."""
    name, path = parse_named(arg)
    return MCSet(name, str(Path(path).resolve()), read_mc(path))


def default_text_sets(with_splits: bool, with_embedded: bool) -> list[TextSet]:
    """The run's valid and test splits, then the embedded domains (megasmoe.data.evalsets)."""
    sets = [TextSet(s, f"split:{s}", "split", prefix=s) for s in ("valid", "test")
            if with_splits]
    if with_embedded:
        from megasmoe.data import evalsets

        sets += [TextSet(d, f"embedded:{d}", "documents", evalsets.domain_documents(d))
                 for d in evalsets.DOMAINS]
    return sets


def default_mc_sets() -> list[MCSet]:
    """The embedded multiple-choice sets (megasmoe.data.evalsets)."""
    from megasmoe.data import evalsets

    return [MCSet(n, f"embedded:{n}", read_mc(evalsets.mc_set_path(n)))
            for n in evalsets.MC_SETS]
