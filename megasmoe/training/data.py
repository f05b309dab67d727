"""Training data through megatron-core's GPTDataset machinery.

Datasets come from ``BlendedMegatronDatasetBuilder`` (mock data, or weighted blends of
Megatron .bin/.idx prefixes with train/valid/test splits and index caching). Batches
are cut by ``MicroBatchSampler``: the position is a single integer, consumed samples,
so a resumed run continues on the next sample, and every layout reads the same
samples in the same order (data-parallel rank r of d takes the r-th slice of each
micro batch group of ``micro_batch_size x d`` samples, like Megatron-LM's sampler).
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

from megasmoe.config import Config

__all__ = ["VocabTokenizer", "build_datasets", "MicroBatchSampler", "batch_iterator"]


class VocabTokenizer:
    """The tokenizer facts GPTDataset needs (vocab size, EOD, pad) without a tokenizer.

    Used for mock data; the data pipeline supplies a real SentencePiece tokenizer.
    """

    def __init__(self, vocab_size: int, eod: Optional[int] = None, pad: int = -1):
        self.vocab_size = vocab_size
        self.eod = vocab_size - 1 if eod is None else eod
        self.pad = pad
        self.bos = None
        # Read by megatron's dataset cache hashing (an attribute, not a method).
        self.unique_identifiers = {"class": type(self).__name__, "vocab_size": vocab_size,
                                   "eod": self.eod}


def dataset_config(cfg: Config, tokenizer=None) -> GPTDatasetConfig:
    """megatron-core GPTDatasetConfig for this run."""
    d = cfg.data
    blend = None
    if d.source == "indexed":
        blend = (list(d.prefixes), list(d.weights) if d.weights else None)
    return GPTDatasetConfig(
        random_seed=cfg.run.seed,
        sequence_length=cfg.train.seq_length,
        blend=blend,
        split=d.split,
        path_to_cache=d.cache_dir or str(cfg.run.path / "data_cache"),
        tokenizer=tokenizer or VocabTokenizer(cfg.model.vocab_size),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )


def build_datasets(cfg: Config, tokenizer=None):
    """(train, valid, test) datasets sized for the whole run, built on every rank."""
    t = cfg.train
    n_eval = (t.steps // max(t.eval_interval, 1) + 2) * t.eval_iters * t.global_batch_size
    sizes = [t.steps * t.global_batch_size, n_eval, t.eval_iters * t.global_batch_size]
    dcfg = dataset_config(cfg, tokenizer)
    cls = MockGPTDataset if cfg.data.source == "mock" else GPTDataset
    return BlendedMegatronDatasetBuilder(cls, sizes, lambda: True, dcfg).build()


class MicroBatchSampler:
    """Yields the sample indices of this data-parallel rank's micro batches, forever.

    ``consumed`` is the number of samples all ranks together have consumed; it advances
    by ``micro_batch_size x dp`` per micro batch.
    """

    def __init__(self, consumed: int, micro_batch_size: int, dp_rank: int, dp_size: int):
        self.consumed = consumed
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size

    def __iter__(self) -> Iterator[list[int]]:
        mbs = self.micro_batch_size
        pos = self.consumed
        while True:
            start = pos + self.dp_rank * mbs
            yield list(range(start, start + mbs))
            pos += mbs * self.dp_size


def _collate(samples: list[dict]) -> dict:
    return {k: torch.stack([torch.as_tensor(s[k]) for s in samples])
            for k in ("tokens", "labels", "loss_mask", "position_ids")}


def batch_iterator(dataset, consumed: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                   num_workers: int = 0) -> Iterator[dict]:
    """Micro batches (tokens, labels, loss_mask, position_ids) for this rank from ``consumed``.

    Wraps around the dataset if it is exhausted (the eval split is small).
    """
    sampler = MicroBatchSampler(consumed, micro_batch_size, dp_rank, dp_size)
    n = len(dataset)

    class _Wrapped(torch.utils.data.Dataset):
        def __len__(self):
            return n

        def __getitem__(self, i):
            return dataset[i % n]

    loader = torch.utils.data.DataLoader(
        _Wrapped(), batch_sampler=sampler, num_workers=num_workers, collate_fn=_collate,
        persistent_workers=num_workers > 0,
    )
    return iter(loader)
