"""Training data through megatron-core's GPTDataset machinery.

Datasets come from ``BlendedMegatronDatasetBuilder`` (mock data, or weighted blends of
Megatron .bin/.idx prefixes with train/valid/test splits and index caching). Batches
are cut by ``MicroBatchSampler``: the position is a single integer, consumed samples,
so a resumed run continues on the next sample, and every layout reads the same
samples in the same order (data-parallel rank r of d takes the r-th slice of each
micro batch group of ``micro_batch_size x d`` samples, like Megatron-LM's sampler).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Iterator, Optional

import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

from megasmoe.config import Config

__all__ = ["VocabTokenizer", "build_datasets", "MicroBatchSampler", "batch_iterator",
           "resolve_data", "default_cache_dir", "load_run_tokenizer", "dataset_config"]


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


def default_cache_dir() -> Path:
    """Where the prepared embedded corpus is cached: $MEGASMOE_CACHE or ~/.cache/megasmoe."""
    env = os.environ.get("MEGASMOE_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "megasmoe"


def resolve_data(cfg: Config) -> Config:
    """Check the data and fill in paths, before any process group starts.

    source=corpus: tokenizes and preprocesses the embedded corpus on first use (cached,
    safe for concurrent ranks) and records its prefixes and tokenizer in the config.
    source=indexed: every prefix's .bin/.idx must be complete, and the tokenizer's vocab
    must fit model.vocab_size. Raises DataError (one line) otherwise.
    """
    from megasmoe.data import (check_indexed_dataset, check_vocab, load_tokenizer,
                               prepare_default_data)

    d = cfg.data
    if d.source == "corpus":
        built = prepare_default_data(Path(d.cache_dir) if d.cache_dir else default_cache_dir(),
                                     vocab_size=cfg.model.vocab_size,
                                     # stderr: stdout of `megasmoe world-size` is the
                                     # process count launch/pretrain.sh reads.
                                     log=lambda line: print(line, file=sys.stderr, flush=True))
        d.prefixes = [str(built[s]) for s in ("train", "valid", "test")]
        d.tokenizer = str(built["tokenizer"])
    if d.source in ("corpus", "indexed"):
        sizes = {prefix: check_indexed_dataset(prefix) for prefix in d.prefixes}
        if d.source == "indexed":
            check_split(d.split, sizes)
        if d.tokenizer:
            check_vocab(load_tokenizer(d.tokenizer), cfg.model.vocab_size)
    return cfg


def check_split(split: str, sizes: dict[str, int]) -> None:
    """DataError if ``split`` leaves a used split of some prefix without documents.

    Mirrors how megatron's BlendedMegatronDatasetBuilder cuts each prefix (rounded
    document ranges): an empty range with a non-zero share makes megatron-core 0.16.1's
    GPTDataset loop forever (``_get_num_epochs`` on a zero-token epoch), so refuse it here.
    """
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix, parse_and_normalize_split)

    from megasmoe.data import DataError

    names = ("train", "valid", "test")
    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    for prefix, n in sizes.items():
        for name, bounds in zip(names, matrix):
            if bounds is None:
                continue
            beg, end = (int(round(b * float(n))) for b in bounds)
            if end <= beg:
                raise DataError(
                    f"data.split={split}: the {name} split of {prefix} gets none of its {n} "
                    f"documents; give {name} a larger share (e.g. data.split=90,5,5) or 0")


def load_run_tokenizer(cfg: Config):
    """The run's tokenizer (data.tokenizer), or vocab facts only for mock data."""
    if cfg.data.tokenizer:
        from megasmoe.data import load_tokenizer

        return load_tokenizer(cfg.data.tokenizer)
    return VocabTokenizer(cfg.model.vocab_size)


def dataset_config(cfg: Config, tokenizer=None) -> GPTDatasetConfig:
    """megatron-core GPTDatasetConfig for this run.

    corpus: the embedded corpus' own held-out splits (train/valid/test prefixes);
    indexed: a weighted blend of prefixes, each split by data.split; mock: synthetic.
    """
    d = cfg.data
    blend, blend_per_split, split = None, None, d.split
    if d.source == "indexed":
        blend = (list(d.prefixes), list(d.weights) if d.weights else None)
    elif d.source == "corpus":
        blend_per_split = [([p], None) for p in d.prefixes]
        split = None
    return GPTDatasetConfig(
        random_seed=cfg.run.seed,
        sequence_length=cfg.train.seq_length,
        blend=blend,
        blend_per_split=blend_per_split,
        split=split,
        path_to_cache=d.index_cache_dir or str(cfg.run.path / "data_cache"),
        tokenizer=tokenizer or load_run_tokenizer(cfg),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )


def build_datasets(cfg: Config, tokenizer=None, whole_eval_splits: bool = False):
    """(train, valid, test) datasets sized for the whole run.

    ``whole_eval_splits``: valid and test hold one pass over their split instead of
    train.eval_iters global batches (``megasmoe eval``). Rank 0 builds first (writing
    megatron's index cache); the others then read it.
    """
    import torch.distributed as dist

    t = cfg.train
    # Every evaluation reads the same first eval_iters batches.
    n_eval = None if whole_eval_splits else t.eval_iters * t.global_batch_size
    sizes = [t.steps * t.global_batch_size, n_eval, n_eval]
    dcfg = dataset_config(cfg, tokenizer)
    cls = MockGPTDataset if cfg.data.source == "mock" else GPTDataset
    first = not dist.is_initialized() or dist.get_rank() == 0
    built = None
    if first:
        built = BlendedMegatronDatasetBuilder(cls, sizes, lambda: True, dcfg).build()
    if dist.is_initialized():
        dist.barrier()
    if not first:
        built = BlendedMegatronDatasetBuilder(cls, sizes, lambda: True, dcfg).build()
    return built


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
