"""Tokenizers: train a SentencePiece model, load SentencePiece or Hugging Face tokenizers.

``load_tokenizer`` returns a :class:`Tokenizer` that megatron-core's GPTDatasetConfig
accepts as its ``tokenizer`` (``vocab_size``, ``eod``, ``pad``, ``bos`` and a plain-dict
``unique_identifiers`` that megatron hashes into its dataset cache names).

Trained models are lossless: no normalisation, no dummy prefix, whitespace kept, and
byte fallback for characters outside the vocabulary, so ``decode(encode(text)) == text``
for any text that does not itself contain SentencePiece's space marker U+2581.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from megasmoe.data.errors import DataError

__all__ = ["Tokenizer", "train_tokenizer", "load_tokenizer", "check_vocab", "MODEL_TYPES"]

MODEL_TYPES = ("bpe", "unigram")

# Special ids of trained models: EOS doubles as the end-of-document (EOD) token.
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3

# Names looked up in a Hugging Face tokenizer.json, first match wins.
_HF_EOD = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "[EOS]")
_HF_PAD = ("<pad>", "[PAD]", "<|pad|>", "<|padding|>")
_HF_BOS = ("<s>", "<bos>", "<|begin_of_text|>", "<|startoftext|>", "[BOS]")


class Tokenizer:
    """A loaded tokenizer: encode/decode plus the special ids megatron-core reads."""

    vocab_size: int
    """Number of token ids (largest id + 1); the model's vocab must be at least this."""
    eod: int
    """End-of-document id, appended after every document by preprocessing."""
    pad: int
    """Padding id, or -1 when the tokenizer has none."""
    bos: int | None
    """Beginning-of-sequence id, or None when the tokenizer has none."""
    unique_identifiers: dict
    """JSON-able identity (kind, content hash, special ids) for megatron's cache hashing."""
    path: Path
    """The file the tokenizer was loaded from."""
    kind: str
    """``"sentencepiece"`` or ``"huggingface"``."""

    def __init__(self, path: Path, kind: str, blob: bytes, eod_token: str | None = None):
        """Build from a file's bytes; use :func:`load_tokenizer` rather than this."""
        self.path, self.kind = path, kind
        self._blob, self._eod_token = blob, eod_token
        self._load()

    def _load(self) -> None:
        if self.kind == "sentencepiece":
            self._load_sentencepiece()
        else:
            self._load_huggingface()
        self.unique_identifiers = {
            "class": "megasmoe.data.Tokenizer", "kind": self.kind,
            "sha256": hashlib.sha256(self._blob).hexdigest(), "vocab_size": self.vocab_size,
            "eod": self.eod, "pad": self.pad, "bos": self.bos,
        }

    def _load_sentencepiece(self) -> None:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(self._blob)
        except (RuntimeError, OSError):
            raise DataError(f"{self.path}: not a SentencePiece model; pass a .model file from "
                            "`megasmoe tokenizer train` or a Hugging Face tokenizer.json") from None
        if sp.eos_id() < 0:
            raise DataError(f"{self.path}: SentencePiece model has no EOS piece to end documents "
                            "with; retrain it with `megasmoe tokenizer train`")
        self._sp = sp
        self.vocab_size = sp.get_piece_size()
        self.eod = sp.eos_id()
        self.pad = sp.pad_id()
        self.bos = sp.bos_id() if sp.bos_id() >= 0 else None

    def _load_huggingface(self) -> None:
        try:  # optional dependency (the hf / dev extras): import on use
            from tokenizers import Tokenizer as HFTokenizer
        except ImportError:
            raise DataError(f"{self.path}: reading a tokenizer.json needs the `tokenizers` "
                            "package; pip install tokenizers (or megasmoe[hf])") from None

        try:
            tok = HFTokenizer.from_str(self._blob.decode("utf-8"))
        except Exception as e:  # the library raises a bare Exception on bad JSON
            raise DataError(f"{self.path}: not a Hugging Face tokenizer.json ({e})") from None
        vocab = tok.get_vocab(with_added_tokens=True)
        names = (self._eod_token,) if self._eod_token else _HF_EOD
        eod = next((vocab[n] for n in names if n in vocab), None)
        if eod is None:
            raise DataError(f"{self.path}: no end-of-document token (looked for "
                            f"{', '.join(names)}); add one to the tokenizer or pass --eod-token")
        self._hf = tok
        self.vocab_size = max(vocab.values()) + 1
        self.eod = eod
        self.pad = next((vocab[n] for n in _HF_PAD if n in vocab), -1)
        self.bos = next((vocab[n] for n in _HF_BOS if n in vocab), None)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without any special tokens added."""
        if self.kind == "sentencepiece":
            return self._sp.encode(text)
        return self._hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; special tokens (EOD, BOS, pad) decode to nothing."""
        ids = [int(i) for i in ids]
        if self.kind == "sentencepiece":
            return self._sp.decode(ids)
        return self._hf.decode(ids, skip_special_tokens=True)

    # Pickle the file's bytes, not the native backend (DataLoader workers may spawn).
    def __getstate__(self) -> dict:
        return {"path": self.path, "kind": self.kind, "blob": self._blob,
                "eod_token": self._eod_token}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], state["kind"], state["blob"], state["eod_token"])

    def __repr__(self) -> str:
        return (f"Tokenizer({str(self.path)!r}, kind={self.kind}, vocab_size={self.vocab_size}, "
                f"eod={self.eod}, pad={self.pad}, bos={self.bos})")


def load_tokenizer(path: str | Path, eod_token: str | None = None) -> Tokenizer:
    """Load a SentencePiece ``.model`` or a Hugging Face ``tokenizer.json`` (or its folder).

    ``eod_token`` names the end-of-document token of a Hugging Face tokenizer; by default
    the first of ``<|endoftext|>``, ``</s>``, ``<eos>``, ``<|end_of_text|>``, ``[EOS]``.
    """
    path = Path(path)
    if path.is_dir() and (path / "tokenizer.json").is_file():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise DataError(f"{path}: tokenizer not found; pass a SentencePiece .model or a "
                        "tokenizer.json (train one with `megasmoe tokenizer train`)")
    kind = "huggingface" if path.suffix == ".json" else "sentencepiece"
    return Tokenizer(path, kind, path.read_bytes(), eod_token)


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int) -> None:
    """DataError if the tokenizer has more ids than the model's embedding table."""
    if tokenizer.vocab_size > model_vocab_size:
        raise DataError(f"{tokenizer.path}: tokenizer has {tokenizer.vocab_size} tokens but "
                        f"model.vocab_size is {model_vocab_size}; set "
                        f"model.vocab_size={tokenizer.vocab_size} (or more), or train a tokenizer "
                        f"with --vocab-size {model_vocab_size}")


def _sentences(docs: Iterable[str]) -> Iterator[str]:
    # SentencePiece learns from lines; "\n" itself is a user-defined piece, so documents
    # are cut at line breaks and nothing is lost at encode time.
    for doc in docs:
        for line in doc.split("\n"):
            if line:
                yield line


def _documents(inputs: Sequence[str | Path], json_key: str) -> Iterator[str]:
    from megasmoe.data.documents import iter_documents

    for path in inputs:
        yield from iter_documents(path, json_key)


def _training_error(message: str, vocab_size: int, model_type: str) -> str:
    # SentencePiece says "... src/x.cc(123) [condition] What went wrong. Details."
    what = message.splitlines()[0].rsplit("] ", 1)[-1]
    too_big = re.search(r"value <= (\d+)", what)
    too_small = re.search(r"smaller than required_chars\. \d+ vs (\d+)", what)
    if too_big:
        hint = f"too little text for it: pass --vocab-size {too_big.group(1)} or less"
    elif too_small:
        hint = f"the text needs more: pass --vocab-size {too_small.group(1)} or more"
    else:
        hint = "check the input text and --vocab-size"
    return (f"SentencePiece could not train a {vocab_size}-token {model_type} tokenizer "
            f"({what}); {hint}")


def _vocab_line(piece: str, score: float) -> str:
    # The .vocab file is for people: one "piece<TAB>score" line per id, so the newline
    # piece is shown escaped.
    return piece.replace("\n", "\\n") + f"\t{score:g}\n"


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def train_tokenizer(inputs: Sequence[str | Path] | None, model_prefix: str | Path,
                    vocab_size: int, model_type: str = "bpe", *,
                    texts: Iterable[str] | None = None, json_key: str = "text",
                    input_sentence_size: int = 1_000_000, num_threads: int | None = None
                    ) -> Path:
    """Train a lossless SentencePiece tokenizer; returns ``<model_prefix>.model``.

    Learns from the documents of ``inputs`` (.jsonl / .txt files, see
    ``megasmoe.data.documents``) or from ``texts`` (an iterable of document strings).
    At most ``input_sentence_size`` lines are sampled. Ids 0-3 are unk, bos, eos (the
    EOD token) and pad. Writes ``<model_prefix>.model`` and ``.vocab`` under temporary
    names and renames them, so an interrupted run leaves no half-written model.
    """
    import sentencepiece as spm

    if model_type not in MODEL_TYPES:
        raise DataError(f"unknown tokenizer model type {model_type!r}; use --model-type "
                        f"{' or '.join(MODEL_TYPES)}")
    if (inputs is None) == (texts is None):
        raise ValueError("train_tokenizer: pass exactly one of inputs= or texts=")
    docs = texts if texts is not None else _documents(inputs, json_key)
    sentences = _sentences(docs)
    first = next(sentences, None)
    if first is None:
        where = ", ".join(map(str, inputs)) if inputs is not None else "texts"
        raise DataError(f"{where}: no text to train a tokenizer on; check --input and "
                        "--json-key")

    input_errors: list[DataError] = []

    def all_sentences() -> Iterator[str]:
        # SentencePiece turns an error raised in here into a RuntimeError; keep ours.
        try:
            yield first
            yield from sentences
        except DataError as e:
            input_errors.append(e)
            raise

    model = io.BytesIO()
    spm.set_random_generator_seed(1234)  # deterministic line sampling on big inputs
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=all_sentences(), model_writer=model, vocab_size=vocab_size,
            model_type=model_type, byte_fallback=True, character_coverage=1.0,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=False, allow_whitespace_only_pieces=True, split_digits=True,
            user_defined_symbols=["\n"], unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
            pad_id=PAD_ID, max_sentence_length=1 << 16,
            input_sentence_size=input_sentence_size, shuffle_input_sentence=True,
            num_threads=num_threads or min(os.cpu_count() or 1, 8), minloglevel=1)
    except RuntimeError as e:
        if input_errors:
            raise input_errors[0] from None
        raise DataError(_training_error(str(e), vocab_size, model_type)) from None

    prefix = Path(model_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    out = prefix.with_name(prefix.name + ".model")
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    vocab = "".join(_vocab_line(sp.id_to_piece(i), sp.get_score(i))
                    for i in range(sp.get_piece_size()))
    _write_atomic(prefix.with_name(prefix.name + ".vocab"), vocab.encode("utf-8"))
    _write_atomic(out, model.getvalue())
    return out
