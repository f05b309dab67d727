"""Forward-only evaluation of a checkpoint at any parallel layout.

``Evaluator`` is the ``Trainer`` without what training needs (no DDP wrapper, optimizer,
scheduler or training data): the same model build, forward step, pipeline schedule and
global loss reduction, so a loss measured here is the trainer's ``valid/loss`` for the
same batches. Weights come from any megasmoe checkpoint (a training checkpoint or the
weights-only one ``convert from-hf`` writes), resharded to the evaluated layout by
megatron's ``dist_checkpointing``; the checkpoint is only read. Routers run in eval mode
(stochastic routers deterministic, no dropout).

Every result is summed over all ranks with one all-reduce, so every rank returns the same
numbers, and every layout the same up to float32 rounding.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.num_microbatches_calculator import (get_num_microbatches,
                                                       init_num_microbatches_calculator)
from megatron.core.transformer.module import Float16Module
from megatron.core.transformer.moe import moe_utils

from megasmoe import checkpoint as ckpt
from megasmoe.checkpoint.saveload import _no_sharded_tensor_deprecation, _strategies
from megasmoe.config import Config
from megasmoe.model import build_model_chunks
from megasmoe.training import telemetry
from megasmoe.training.data import build_datasets
from megasmoe.training.trainer import Trainer

__all__ = ["Evaluator", "load_model_tensors", "rebuilt_buffers", "pack_documents", "padded_to_batches", "read_indexed_documents",
           "perplexity"]

KEYS = ("tokens", "labels", "loss_mask", "position_ids")


def pack_documents(docs: Sequence[Sequence[int]], seq_length: int, eod: int,
                   append_eod: bool = True) -> list[dict]:
    """Token documents packed into ``seq_length`` windows, like training samples.

    The documents are concatenated in order, each followed by ``eod`` (unless
    ``append_eod`` is false: indexed documents already end with it); window w predicts
    tokens w*L+1 .. w*L+L of that stream from the L before each. The last window is
    padded with ``eod``, its padding masked out of the loss (loss_mask 0).
    """
    parts = [np.asarray(d, dtype=np.int64) for d in docs]
    if append_eod:
        parts = [np.append(p, np.int64(eod)) for p in parts]
    stream = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    predicted = max(len(stream) - 1, 0)
    windows = -(-predicted // seq_length)
    padded = np.full(windows * seq_length + 1, eod, dtype=np.int64)
    padded[:len(stream)] = stream
    positions = torch.arange(seq_length, dtype=torch.int64)
    samples = []
    for w in range(windows):
        start = w * seq_length
        chunk = torch.from_numpy(padded[start:start + seq_length + 1].copy())
        mask = (torch.arange(seq_length) < predicted - start).to(torch.float32)
        samples.append({"tokens": chunk[:-1], "labels": chunk[1:], "loss_mask": mask,
                        "position_ids": positions})
    return samples


def read_indexed_documents(prefix: str) -> list[np.ndarray]:
    """Every document of a Megatron .bin/.idx dataset, in order (token ids)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(prefix), mmap=True)
    return [np.asarray(ds[i], dtype=np.int64) for i in range(len(ds))]


class _Padded(torch.utils.data.Dataset):
    """A dataset extended to ``total`` samples by masked copies of its first sample."""

    def __init__(self, base, total: int):
        self.base, self.total = base, total
        first = base[0]
        self.filler = {k: torch.as_tensor(first[k]) for k in KEYS}
        self.filler["loss_mask"] = torch.zeros_like(self.filler["loss_mask"], dtype=torch.float32)

    def __len__(self) -> int:
        return self.total

    def __getitem__(self, i: int) -> dict:
        return self.base[i] if i < len(self.base) else self.filler


def padded_to_batches(dataset, global_batch_size: int) -> tuple[torch.utils.data.Dataset, int]:
    """(dataset padded with masked samples to whole global batches, number of batches)."""
    batches = -(-len(dataset) // global_batch_size)
    return _Padded(dataset, batches * global_batch_size), batches


def _token_losses(output: torch.Tensor):
    """Loss function of per-token mode: reports each token's loss (-log p) as it is."""
    zero = output.float().sum() * 0.0
    return zero, torch.tensor(1, dtype=torch.int), {"token_loss": output.detach().float()}


def load_model_tensors(chunks: list, cfg: Config, ckpt_dir: Path,
                       rebuilt: tuple[str, ...] = ()) -> dict:
    """Load the model tensors of a checkpoint into ``chunks`` (any layout, weights-only
    too; no optimizer); returns the checkpoint's meta. Collective; the checkpoint is only
    read.

    ``rebuilt``: buffer names (e.g. ``steering_bias``) that keep the value the model was
    built with instead of the checkpoint's, whether the checkpoint has them or not (a
    topk-trained checkpoint has no steering bias). Every other tensor must be there.
    """
    from megatron.core import dist_checkpointing

    ckpt_dir = Path(ckpt_dir)
    meta = ckpt.read_meta(ckpt_dir)
    ckpt.check_compatible(meta, cfg, ckpt_dir)
    keys = [("model" if len(chunks) == 1 else f"model{i}") for i in range(len(chunks))]
    state = {k: c.sharded_state_dict(metadata=ckpt.SHARDING_METADATA)
             for k, c in zip(keys, chunks)}
    kept = {k: [name for name in state[k] if name.rsplit(".", 1)[-1] in rebuilt] for k in keys}
    for k in keys:
        for name in kept[k]:
            del state[k][name]
    ckpt.check_model_tensors(list(state.values()), ckpt_dir, meta, cfg)
    _, load_strategy = _strategies(None)
    with _no_sharded_tensor_deprecation():
        loaded = dist_checkpointing.load(state, str(ckpt_dir), sharded_strategy=load_strategy)
    for k, chunk in zip(keys, chunks):
        own = chunk.state_dict()
        tensors = dict(loaded[k])
        tensors.update({name: own[name] for name in kept[k]})
        chunk.load_state_dict(tensors, strict=True)
    return meta


def rebuilt_buffers(cfg: Config) -> tuple[str, ...]:
    """Buffers an evaluation takes from its own config, not the checkpoint: the steering
    bias of ``domain_steer`` given a steering file (so a topk checkpoint can be evaluated
    steered); without a file the checkpoint's bias is used (a steered run's)."""
    rc = cfg.moe.router
    if rc.name == "domain_steer" and rc.options.get("file"):
        return ("steering_bias",)
    return ()


class Evaluator(Trainer):
    """A Trainer that only evaluates: model chunks in eval mode, weights from a checkpoint.

    Must be built inside initialised process groups (``init_distributed``); ``close``
    frees megatron's global state as the Trainer's does.
    """

    def __init__(self, cfg: Config):
        cfg = copy.deepcopy(cfg)
        cfg.checkpoint.enabled = False  # never saves (no async writer either)
        self._per_token = False
        super().__init__(cfg)

    def _build_model(self) -> None:
        chunks = build_model_chunks(self.cfg, self.tc)
        if torch.cuda.is_available():
            chunks = [c.cuda(torch.cuda.current_device()) for c in chunks]
        if self.tc.bf16:
            chunks = [Float16Module(self.tc, c) for c in chunks]
        self.model = self.unwrapped = chunks
        self.routers = telemetry.routers(chunks)

    def _build_optimizer(self) -> None:
        t = self.cfg.train
        self.optimizer = self.scheduler = None
        init_num_microbatches_calculator(
            dist.get_rank(), None, t.global_batch_size, t.micro_batch_size,
            parallel_state.get_data_parallel_world_size())

    def _build_data(self) -> None:
        self.train_ds = self.valid_ds = self.test_ds = None  # built on demand (split_dataset)

    # ------------------------------------------------------------------ weights

    def load(self, ckpt_dir: Path) -> dict:
        """Load the model weights of ``ckpt_dir`` (any layout, weights-only too); its meta.

        Collective. Only model tensors are read; the checkpoint is not changed.
        """
        meta = load_model_tensors(self.unwrapped, self.cfg, ckpt_dir,
                                  rebuilt=rebuilt_buffers(self.cfg))
        for m in self.model:
            m.eval()
        self.step = int(meta.get("step", 0))
        return meta

    # ------------------------------------------------------------------ data

    def split_dataset(self, split: str, batches: Optional[int]):
        """The run's ``valid`` or ``test`` split as the trainer builds it, or None if empty.

        ``batches``: sized for that many global batches (exactly the trainer's samples
        with train.eval_iters = batches); None: one pass over the whole split. Collective.
        """
        cfg = copy.deepcopy(self.cfg)
        if batches:
            cfg.train.eval_iters = batches
        _, valid, test = build_datasets(cfg, whole_eval_splits=not batches)
        return valid if split == "valid" else test

    # ------------------------------------------------------------------ measuring

    def _forward_step(self, data_iterator, model):
        if not self._per_token:
            return super()._forward_step(data_iterator, model)
        batch = next(data_iterator)
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        return output, _token_losses

    def _forget_routing(self) -> None:
        # Evaluation must leave no aux-loss or telemetry counts behind (as Trainer.evaluate).
        moe_utils.clear_aux_losses_tracker()
        telemetry.reset(self.unwrapped)

    @torch.no_grad()
    def dataset_loss(self, dataset, batches: Optional[int] = None) -> tuple[float, float]:
        """(mean loss per token, tokens) over the first ``batches`` global batches of
        ``dataset`` drawn as Trainer.evaluate draws them; None: all of it once (the last
        batch completed with masked samples). Collective; the same on every rank."""
        gbs = self.cfg.train.global_batch_size
        if batches is None:
            dataset, batches = padded_to_batches(dataset, gbs)
        iters = self._iterators(dataset, 0)
        total, tokens = 0.0, 0.0
        for _ in range(batches):
            loss, n = self._global_loss(self._run_schedule(iters, forward_only=True))
            if n > 0:
                total, tokens = total + loss * n, tokens + n
        self._forget_routing()
        return total / max(tokens, 1.0), tokens

    @torch.no_grad()
    def token_logprobs(self, sequences: Sequence[Sequence[int]]) -> list[list[float]]:
        """Per sequence s: [log p(s[j] | s[:j]) for j = 1 .. len(s)-1], float64 lists.

        Each sequence (2 .. train.seq_length + 1 tokens) is one sample, padded after its
        end (causal attention: the padding does not change what comes before). Collective;
        identical on every rank.
        """
        t = self.cfg.train
        L = t.seq_length
        samples = []
        for s in sequences:
            if not 2 <= len(s) <= L + 1:
                raise ValueError(f"a sequence of {len(s)} tokens: need 2 .. seq_length+1 = {L + 1}")
            row = torch.zeros(L + 1, dtype=torch.int64)  # padding: any id, masked
            row[:len(s)] = torch.as_tensor(list(s), dtype=torch.int64)
            mask = (torch.arange(L) < len(s) - 1).to(torch.float32)
            samples.append({"tokens": row[:-1], "labels": row[1:], "loss_mask": mask,
                            "position_ids": torch.arange(L, dtype=torch.int64)})
        if not samples:
            return []
        dataset, batches = padded_to_batches(samples, t.global_batch_size)
        iters = self._iterators(dataset, 0)
        dp, dp_rank = (parallel_state.get_data_parallel_world_size(),
                       parallel_state.get_data_parallel_rank())
        mbs, gbs = t.micro_batch_size, t.global_batch_size
        holds = parallel_state.is_pipeline_last_stage(ignore_virtual=True) and \
            parallel_state.get_tensor_model_parallel_rank() == 0
        out = torch.zeros(batches * gbs, L, dtype=torch.float64)
        self._per_token = True
        try:
            for g in range(batches):
                buf = torch.zeros(gbs, L, dtype=torch.float64, device=self.device)
                results = self._run_schedule(iters, forward_only=True)
                if holds:
                    for j, item in enumerate(results):
                        # MicroBatchSampler: micro batch j of this rank starts at j*mbs*dp + r*mbs.
                        at = j * mbs * dp + dp_rank * mbs
                        buf[at:at + mbs] = item["token_loss"].to(buf)
                dist.all_reduce(buf)
                out[g * gbs:(g + 1) * gbs] = buf.cpu()
        finally:
            self._per_token = False
        self._forget_routing()
        assert get_num_microbatches() * mbs * dp == gbs
        return [(-out[i, :len(s) - 1]).tolist() for i, s in enumerate(sequences)]


def perplexity(loss: float) -> float:
    """exp(loss), capped as the trainer's valid/ppl is (exp(50) for a diverged model)."""
    return math.exp(min(loss, 50.0))

