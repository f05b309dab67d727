"""Training reads data through megatron-core's GPTDataset / BlendedMegatronDatasetBuilder:
weighted blends, the embedded corpus' splits, and an exact, layout-independent order."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from megasmoe.config import ConfigError, load_config, validate
from megasmoe.data import DataError, corpus_documents, preprocess_documents
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


@pytest.fixture(scope="module")
def two_prefixes(corpus_cfg, tmp_path_factory):
    """Two indexed datasets: the two halves of the corpus' train documents."""
    root = tmp_path_factory.mktemp("blend")
    docs = corpus_documents("train")
    for name, part in (("a", docs[: len(docs) // 2]), ("b", docs[len(docs) // 2:])):
        assert preprocess_documents(part, root / name, corpus_cfg.data.tokenizer,
                                    progress=False)["documents"]
    return str(root / "a"), str(root / "b")


def _blend(prefixes, tmp_path, *overrides):
    return _cfg("data.source=indexed", f"data.prefixes=[{prefixes[0]},{prefixes[1]}]",
                "data.weights=[0.7,0.3]", "train.steps=125", f"run.dir={tmp_path}",
                *overrides)


@pytest.fixture
def gloo_world_of_one(tmp_path):
    """megatron's BlendedDataset asks torch.distributed for its rank, as in training."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_blend_shares_follow_weights(two_prefixes, gloo_world_of_one, tmp_path):
    """Weights 0.7/0.3: each prefix's share of 1,000 sampled sequences is within 0.05."""
    cfg = resolve_data(_blend(two_prefixes, tmp_path, "data.split=90,5,5"))
    train, valid, test = build_datasets(cfg)
    ids = np.asarray(train.dataset_index[:1000])
    assert len(ids) == 1000 and valid is not None and test is not None
    share_a = float((ids == 0).mean())
    assert abs(share_a - 0.7) < 0.05 and abs((1 - share_a) - 0.3) < 0.05, share_a
    # The samples really come from the datasets the index says.
    for i in range(5):
        ds = train.datasets[int(train.dataset_index[i])]
        want = ds[int(train.dataset_sample_index[i])]["tokens"]
        assert torch.equal(torch.as_tensor(train[i]["tokens"]), torch.as_tensor(want))


def test_split_without_documents_is_refused(two_prefixes, tmp_path):
    """969,30,1 of ~126 documents leaves test empty: megatron would loop forever."""
    with pytest.raises(DataError, match=r"data\.split=969,30,1: the test split of .*/a gets "
                                        r"none of its \d+ documents"):
        resolve_data(_blend(two_prefixes, tmp_path, "data.split=969,30,1"))


@pytest.mark.parametrize("split", ["100,0,0", "x,1,1", "1,1,1,1", "90,-5,5"])
def test_malformed_split_is_refused(two_prefixes, tmp_path, split):
    with pytest.raises(ConfigError, match=r"^data\.split="):
        _blend(two_prefixes, tmp_path, f"data.split={split}")


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
