"""Data pipeline: embedded corpus, tokenizers, preprocessing into Megatron indexed datasets."""

from __future__ import annotations

import json
import sys
import warnings

import numpy as np
import pytest

from megasmoe.data import (SPLITS, DataError, check_vocab, corpus_documents, load_tokenizer,
                           prepare_default_data, split_of, train_tokenizer)
from megasmoe.data.corpus import corpus_records
from megasmoe.data.preprocess import (check_indexed_dataset, preprocess, preprocess_documents,
                                      preprocess_main)

# The module, not the function of the same name that megasmoe.data exports.
PRE = sys.modules["megasmoe.data.preprocess"]

# Text a corpus tokenizer has not seen: other scripts, tabs, runs of spaces, blank lines.
ODD_TEXT = "  Tabs\tand   spaces,\n\n\nnaïve café £20,000 — 日本語 🙂\n  "


def _indexed(prefix):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDataset
    return IndexedDataset(str(prefix))


def _paragraphs(n: int) -> list[str]:
    return [p for doc in corpus_documents("valid") for p in doc.split("\n\n")][:n]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    """A 1024-token BPE tokenizer trained on part of the corpus' train split."""
    out = tmp_path_factory.mktemp("tok") / "sp"
    return train_tokenizer(None, out, 1024, texts=corpus_documents("train")[:60])


@pytest.fixture()
def dataset(tmp_path, sp_model):
    """A small preprocessed dataset: (prefix, documents)."""
    docs = _paragraphs(40)
    src = tmp_path / "in.txt"
    src.write_text("\n\n".join(docs) + "\n")
    preprocess([src], tmp_path / "ds", sp_model, progress=False)
    return tmp_path / "ds", docs


def test_corpus_splits_are_fixed_disjoint_and_complete():
    records = corpus_records()
    assert len(records) == 269
    by_split = {s: corpus_documents(s) for s in SPLITS}
    assert all(by_split[s] for s in SPLITS)
    assert sum(len(v) for v in by_split.values()) == len(records)
    assert len(by_split["train"]) > 0.9 * len(records)
    ids = {s: {r["id"] for r in records if split_of(r["id"]) == s} for s in SPLITS}
    assert not (ids["train"] & ids["valid"]) and not (ids["train"] & ids["test"])
    assert split_of("emma-003") == "valid"  # pinned: the split must never drift
    assert any(d.startswith("It is a truth universally acknowledged")
               for d in corpus_documents("train"))
    assert any(r["text"].count("\n\n") > 5 for r in records)  # paragraphs kept


def test_tokenizer_round_trip_on_corpus(sp_model):
    tok = load_tokenizer(sp_model)
    texts = corpus_documents("valid") + corpus_documents("test")[:3] + [ODD_TEXT]
    for text in texts:
        ids = tok.encode(text)
        assert max(ids) < tok.vocab_size
        assert tok.decode(ids) == text
    assert tok.vocab_size == 1024
    assert (tok.eod, tok.pad, tok.bos) == (2, 3, 1)
    assert tok.eod not in tok.encode(texts[0])
    assert isinstance(tok.unique_identifiers, dict)
    json.dumps(tok.unique_identifiers)  # megatron hashes it as JSON


def test_preprocess_counts_match_input(dataset, sp_model):
    prefix, docs = dataset
    tok = load_tokenizer(sp_model)
    check_indexed_dataset(prefix)
    ds = _indexed(prefix)
    assert len(ds) == len(docs)
    assert len(ds.document_indices) == len(docs) + 1
    assert int(ds.sequence_lengths.sum()) == sum(len(tok.encode(d)) + 1 for d in docs)
    assert ds.index.dtype == np.uint16  # optimal dtype for a 1024-token vocab
    for i in (0, len(docs) // 2, len(docs) - 1):
        seq = ds[i]
        assert seq[-1] == tok.eod
        assert tok.decode(seq[:-1].tolist()) == docs[i]


def _ids(seq) -> str:
    return "," + ",".join(map(str, seq)) + ","


def test_tokenizer_feeds_megatron_gpt_dataset(dataset, sp_model, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
        from megatron.core.datasets.utils import Split
    prefix, docs = dataset
    tok = load_tokenizer(sp_model)
    cfg = GPTDatasetConfig(random_seed=1, sequence_length=32, split="100,0,0",
                           path_to_cache=str(tmp_path / "cache"), tokenizer=tok,
                           reset_position_ids=False, reset_attention_mask=False,
                           eod_mask_loss=False, create_attention_mask=False)
    indexed = _indexed(prefix)
    ds = GPTDataset(indexed, str(prefix), np.arange(len(docs), dtype=np.int32), 10,
                    Split.train, cfg)
    stored = [_ids(indexed[i]) for i in range(len(docs))]
    for i in range(3):
        tokens = ds[i]["tokens"].tolist()
        assert len(tokens) == 32
        # Between EODs, every run of tokens is a stretch of one stored document.
        pieces = _ids(tokens).split(f",{tok.eod},")
        assert all(any(p.strip(",") in s for s in stored) for p in pieces)


def test_two_workers_write_identical_files(tmp_path, sp_model, monkeypatch):
    monkeypatch.setattr(PRE, "_BATCH_BYTES", 4096)  # many batches in flight at once
    docs = corpus_documents("train")[:40]
    one = preprocess_documents(docs, tmp_path / "w1", sp_model, workers=1, progress=False)
    two = preprocess_documents(docs, tmp_path / "w2", sp_model, workers=2, progress=False)
    assert (one["documents"], one["tokens"]) == (two["documents"], two["tokens"])
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"w1{ext}").read_bytes() == (tmp_path / f"w2{ext}").read_bytes()


def test_jsonl_with_json_key(tmp_path, sp_model, capsys):
    docs = _paragraphs(12)
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": i, "body": d}) + "\n" for i, d in enumerate(docs)))
    code = preprocess_main(["--input", str(src), "--output-prefix", str(tmp_path / "ds"),
                            "--tokenizer", str(sp_model), "--json-key", "body",
                            "--workers", "2", "--no-progress"])
    assert code == 0
    assert "12 documents" in capsys.readouterr().out
    tok = load_tokenizer(sp_model)
    ds = _indexed(tmp_path / "ds")
    assert len(ds) == 12
    assert tok.decode(ds[11][:-1].tolist()) == docs[11]


def test_hugging_face_tokenizer_json(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(corpus_documents("valid"), trainers.BpeTrainer(
        vocab_size=500, special_tokens=["<unk>", "</s>", "<pad>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = tmp_path / "tokenizer.json"
    hf.save(str(path))

    tok = load_tokenizer(path)
    assert (tok.eod, tok.pad, tok.bos) == (hf.token_to_id("</s>"), hf.token_to_id("<pad>"), None)
    assert tok.vocab_size == hf.get_vocab_size()
    docs = _paragraphs(10)
    stats = preprocess_documents(docs, tmp_path / "ds", path, progress=False)
    ds = _indexed(tmp_path / "ds")
    assert stats["documents"] == len(ds) == 10
    assert ds[3][-1] == tok.eod
    assert tok.decode(ds[3][:-1].tolist()) == docs[3]


@pytest.mark.parametrize("damage, message", [
    ("missing .bin", r"ds\.bin: missing"),
    ("truncated .bin", r"ds\.bin: truncated"),
    ("missing .idx", r"ds\.idx: missing"),
    ("truncated .idx", r"ds\.idx: truncated index"),
])
def test_damaged_dataset_is_reported(dataset, damage, message):
    prefix, _ = dataset
    path = prefix.with_name(prefix.name + damage[-4:])
    if damage.startswith("missing"):
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(DataError, match=message + r".*re-run `megasmoe preprocess`"):
        check_indexed_dataset(prefix)


def test_index_format_matches_megatron():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import _INDEX_HEADER, DType
    assert PRE.INDEX_MAGIC == _INDEX_HEADER
    assert PRE.DTYPE_CODES == {d.value: DType.dtype_from_code(d.value) for d in DType}


def test_tokenizer_larger_than_model_vocab(sp_model):
    tok = load_tokenizer(sp_model)
    check_vocab(tok, 1024)  # equal is fine
    with pytest.raises(DataError, match=r"1024 tokens but model\.vocab_size is 512; set "
                                        r"model\.vocab_size=1024"):
        check_vocab(tok, 512)


def test_empty_corpus(tmp_path, sp_model):
    src = tmp_path / "empty.txt"
    src.write_text("\n   \n\n")
    with pytest.raises(DataError, match=r"empty\.txt: no documents"):
        preprocess([src], tmp_path / "ds", sp_model, progress=False)
    assert list(tmp_path.iterdir()) == [src]


def test_json_line_without_key(tmp_path, sp_model, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "fine"}\n\n{"content": "no text key"}\n')
    with pytest.raises(DataError, match=r"in\.jsonl:3: no key 'text' \(found: content\); "
                                        r"pass --json-key"):
        preprocess([src], tmp_path / "ds", sp_model, progress=False)
    code = preprocess_main(["--input", str(src), "--output-prefix", str(tmp_path / "ds"),
                            "--tokenizer", str(sp_model), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("megasmoe: data error: ") and "in.jsonl:3" in err[-1]


def test_crash_midway_leaves_no_output(tmp_path, sp_model):
    def documents():
        yield from corpus_documents("train")[:30]
        raise RuntimeError("disk on fire")

    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk on fire"):
        preprocess_documents(documents(), out / "ds", sp_model, workers=2, progress=False)
    assert list(out.iterdir()) == []  # neither final names nor temporary files


def test_prepare_default_data_builds_once(tmp_path):
    first = prepare_default_data(tmp_path, vocab_size=4096)
    files = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    mtimes = {p: p.stat().st_mtime_ns for p in files}
    assert load_tokenizer(first["tokenizer"]).vocab_size == 4096
    for split in SPLITS:
        assert len(_indexed(first[split])) == len(corpus_documents(split))

    second = prepare_default_data(tmp_path, vocab_size=4096)
    assert second == first
    assert sorted(p for p in tmp_path.rglob("*") if p.is_file()) == files
    assert {p: p.stat().st_mtime_ns for p in files} == mtimes
