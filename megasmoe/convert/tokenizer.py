"""The run's tokenizer, copied next to an export so that ``AutoTokenizer`` loads it.

Where it is: an explicit path if given; else any string field of the run's config whose
name contains ``tokenizer`` and that names an existing file or directory (today
``data.tokenizer``; relative paths are tried from the working directory and the run
directory); else ``<run dir>/tokenizer/``, ``<run dir>/tokenizer.json`` or
``<run dir>/tokenizer.model``. Runs without one (mock data) export without tokenizer.

What is written (special ids are those of ``megasmoe.data.tokenizer.load_tokenizer``,
the loader training used: EOS = end of document, BOS, pad):

- a SentencePiece model (``*.model``): copied as ``tokenizer.model`` and converted by
  transformers itself (``TokenizersBackend``, what ``AutoTokenizer`` would do with a
  bare ``tokenizer.model`` next to a Mixtral/Qwen2-MoE/GLM4-MoE config) into
  ``tokenizer.json``. The conversion is then checked against SentencePiece on probe
  texts (whitespace runs, digits, newlines, tabs, accents, CJK, emoji): encodings and
  decodings must agree. They do for megasmoe's own lossless tokenizers (``megasmoe
  tokenizer train``: identity normalisation, no dummy prefix, byte fallback); for other
  SentencePiece models a mismatch is reported in ``notes`` (decode with the copied
  ``tokenizer.model`` then);
- a ``tokenizer.json`` (tokenizers library): copied with ``tokenizer_class:
  PreTrainedTokenizerFast`` and the special tokens named;
- a Hugging Face tokenizer directory (has ``tokenizer_config.json``): its tokenizer
  files are copied as they are.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from megasmoe.convert.errors import ConversionError

__all__ = ["TokenizerInfo", "find_tokenizer", "write_tokenizer"]

PROBES = (
    "It is a truth universally acknowledged, that a single man in possession of a good "
    "fortune, must be in want of a wife.",
    "  two leading spaces,   three inside, a tab\there and a trailing space ",
    "line one\n\nline three\r\n",
    "numbers 12345 and 3.14159, £10,000 a year",
    "Ünïcödé àccents, naïve café; 日本語のテキスト; emoji 🤖❤",
)
"""Texts the exported SentencePiece conversion must encode and decode like SentencePiece."""

_HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                       "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                       "vocab.txt", "chat_template.jinja")


@dataclass
class TokenizerInfo:
    """What was written: the source and the special token ids (None if unknown)."""

    source: Path
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None
    pad_token_id: Optional[int] = None
    vocab_size: Optional[int] = None
    notes: list = field(default_factory=list)
    """Where the exported tokenizer is known to differ from the run's."""


def _config_paths(tree, prefix: str = ""):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _config_paths(value, f"{prefix}{key}.")
    elif isinstance(tree, str) and "tokenizer" in prefix.lower():
        yield prefix.rstrip("."), tree


def find_tokenizer(config: dict, run_dir: Optional[Path], explicit: Optional[str | Path] = None
                   ) -> Optional[Path]:
    """The tokenizer file or directory of a run (see the module docstring), or None."""
    if explicit is not None:
        path = Path(explicit)
        if not path.exists():
            raise ConversionError(f"tokenizer {path} does not exist")
        return path
    bases = [Path.cwd()] + ([Path(run_dir)] if run_dir is not None else [])
    for _, value in _config_paths(config):
        for base in bases:
            path = base / value
            if value and path.exists():
                return path
    if run_dir is not None:
        for name in ("tokenizer", "tokenizer.json", "tokenizer.model"):
            path = Path(run_dir) / name
            if path.exists():
                return path
    return None


def _ids_from_hf(out_dir: Path) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out_dir))
    return {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id, "vocab_size": len(tok)}


def _special_ids(source: Path) -> dict:
    """EOS (end of document), BOS and pad ids as the data pipeline reads them."""
    from megasmoe.data.tokenizer import load_tokenizer

    try:
        tok = load_tokenizer(source)
    except Exception as e:  # noqa: BLE001 - DataError and the backends' own errors
        raise ConversionError(f"tokenizer {source}: {e}") from None
    return {"eos_token_id": tok.eod, "bos_token_id": tok.bos,
            "pad_token_id": tok.pad if tok.pad >= 0 else None, "vocab_size": tok.vocab_size}


def write_tokenizer(source: Path, out_dir: Path) -> TokenizerInfo:
    """Copy the tokenizer at ``source`` into ``out_dir`` in a form AutoTokenizer reads."""
    source, out_dir = Path(source), Path(out_dir)
    if source.is_dir():
        if (source / "tokenizer_config.json").is_file():
            for name in _HF_TOKENIZER_FILES:
                if (source / name).is_file():
                    shutil.copy2(source / name, out_dir / name)
            return TokenizerInfo(source, **_ids_from_hf(out_dir))
        for name in ("tokenizer.json", "tokenizer.model"):
            if (source / name).is_file():
                return write_tokenizer(source / name, out_dir)
        raise ConversionError(f"tokenizer directory {source} has no tokenizer_config.json, "
                              f"tokenizer.json or tokenizer.model")
    if source.name.endswith(".json"):
        from tokenizers import Tokenizer

        ids = _special_ids(source)
        names = Tokenizer.from_file(str(source))
        special = {name: names.id_to_token(ids[f"{name}_id"])
                   for name in ("bos_token", "eos_token", "pad_token")
                   if ids[f"{name}_id"] is not None}
        shutil.copy2(source, out_dir / "tokenizer.json")
        (out_dir / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", **special}, indent=2) + "\n")
        return TokenizerInfo(source, **ids)
    if source.suffix == ".model":
        return _write_sentencepiece(source, out_dir)
    raise ConversionError(f"tokenizer {source}: expected a SentencePiece .model, a "
                          f"tokenizer.json or a Hugging Face tokenizer directory")


def _write_sentencepiece(source: Path, out_dir: Path) -> TokenizerInfo:
    """tokenizer.model + transformers' own conversion (tokenizer.json), probe-checked."""
    import sentencepiece as spm
    from transformers import TokenizersBackend

    sp = spm.SentencePieceProcessor(model_file=str(source))
    ids = _special_ids(source)
    shutil.copy2(source, out_dir / "tokenizer.model")
    special = {"unk_token": sp.unk_id(), "bos_token": ids["bos_token_id"],
               "eos_token": ids["eos_token_id"], "pad_token": ids["pad_token_id"]}
    cfg = {"tokenizer_class": "TokenizersBackend",
           **{k: sp.id_to_piece(i) for k, i in special.items()
              if i is not None and 0 <= i < sp.get_piece_size()}}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    hf = TokenizersBackend.from_pretrained(str(out_dir))
    hf.save_pretrained(str(out_dir))  # tokenizer.json: later loads need no conversion
    info = TokenizerInfo(source, **ids)
    for text in PROBES:
        want = sp.encode(text)
        got = hf(text, add_special_tokens=False)["input_ids"]
        if got != want or hf.decode(want) != sp.decode(want):
            info.notes.append(f"tokenizer: transformers' conversion of {source.name} differs "
                              f"from SentencePiece on {text[:30]!r}...; encode/decode with the "
                              f"copied tokenizer.model where it matters")
            break
    return info
