"""Training reads data through megatron-core's GPTDataset / BlendedMegatronDatasetBuilder:
weighted blends, the embedded corpus' splits, and an exact, layout-independent order."""

from __future__ import annotations

import itertools

import pytest
import torch

from megasmoe.config import load_config, validate
from megasmoe.training.data import batch_iterator, build_datasets, resolve_data


def _cfg(*overrides, world=1):
    cfg = load_config("configs/tiny-cpu.yaml", [
        f"parallel.world_size={world}", "parallel.ep=1", "train.steps=20",
        "train.global_batch_size=8", "train.micro_batch_size=2", *overrides])
    return validate(cfg, world)


@pytest.fixture(scope="module")
def corpus_cfg(tmp_path_factory):
    cfg = _cfg(f"run.dir={tmp_path_factory.mktemp('run')}")
    return resolve_data(cfg)


def test_corpus_splits_are_held_out(corpus_cfg):
    train, valid, test = build_datasets(corpus_cfg)
    assert len(train) >= 20 * 8 and len(valid) > 0 and len(test) > 0
    prefixes = corpus_cfg.data.prefixes
    assert [p.rsplit("/", 1)[-1] for p in prefixes] == ["train", "valid", "test"]


def _tokens(cfg, consumed, dp_rank, dp_size, n):
    train, _, _ = build_datasets(cfg)
    it = batch_iterator(train, consumed, cfg.train.micro_batch_size, dp_rank, dp_size)
    return [b["tokens"] for b in itertools.islice(it, n)]


def test_same_seed_same_samples_same_order(corpus_cfg):
    first = _tokens(corpus_cfg, 0, 0, 1, 6)
    second = _tokens(corpus_cfg, 0, 0, 1, 6)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    other = resolve_data(_cfg("run.seed=7", f"run.dir={corpus_cfg.run.path}-seed7"))
    assert not all(torch.equal(a, b) for a, b in zip(first, _tokens(other, 0, 0, 1, 6)))


def test_data_position_resumes_on_the_next_sample_and_is_layout_independent(corpus_cfg):
    mbs = corpus_cfg.train.micro_batch_size
    ws1 = _tokens(corpus_cfg, 0, 0, 1, 8)
    # Resume after 3 micro batches: the next batch is the 4th.
    resumed = _tokens(corpus_cfg, 3 * mbs, 0, 1, 5)
    assert all(torch.equal(a, b) for a, b in zip(ws1[3:], resumed))
    # DP=2: rank r takes the r-th slice of each group of 2 micro batches.
    r0, r1 = _tokens(corpus_cfg, 0, 0, 2, 4), _tokens(corpus_cfg, 0, 1, 2, 4)
    interleaved = [b for pair in zip(r0, r1) for b in pair]
    assert all(torch.equal(a, b) for a, b in zip(ws1, interleaved))
