"""The data pipeline: embedded corpus, tokenizers, preprocessing into Megatron datasets.

- ``corpus``: the embedded default corpus (Jane Austen's novels, one document per
  chapter) with fixed train / valid / test splits.
- ``tokenizer``: train a lossless SentencePiece tokenizer; load SentencePiece or
  Hugging Face tokenizers as megatron-core dataset tokenizers.
- ``preprocess``: .jsonl / .txt files -> ``.bin``/``.idx`` indexed datasets, and checks.
- ``default``: the embedded corpus prepared once and cached for training.
- ``evalsets``: embedded evaluation data (held-out Austen and Python standard-library
  text, multiple-choice continuation sets), made by ``build_evalsets``.

Every user-facing problem is a one-line :class:`DataError`.
"""

from megasmoe.data.corpus import PROVENANCE, SPLITS, corpus_documents, corpus_files, split_of
from megasmoe.data.default import DEFAULT_VOCAB_SIZE, prepare_default_data
from megasmoe.data.documents import iter_documents
from megasmoe.data.errors import DataError
from megasmoe.data.preprocess import (check_indexed_dataset, preprocess, preprocess_documents,
                                      preprocess_main, tokenizer_main)
from megasmoe.data.tokenizer import Tokenizer, check_vocab, load_tokenizer, train_tokenizer

__all__ = [
    "DataError", "PROVENANCE", "SPLITS", "corpus_documents", "corpus_files", "split_of",
    "iter_documents", "Tokenizer", "train_tokenizer", "load_tokenizer", "check_vocab",
    "preprocess", "preprocess_documents", "check_indexed_dataset", "tokenizer_main",
    "preprocess_main", "DEFAULT_VOCAB_SIZE", "prepare_default_data",
]
