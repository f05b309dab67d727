"""Collapse telemetry: how alike the experts of each MoE layer are, at every evaluation.

At each evaluation the trainer calls ``Probe.measure``. Per MoE layer it reports

- ``cka``: linear CKA (Kornblith et al. 2019) between every two experts' outputs on the
  same probe tokens, an E x E matrix; 1 = the same representation up to rotation and
  scale (collapse), near 0 = unrelated;
- ``cosine``: mean over probe tokens of the cosine similarity of two experts' outputs on
  that token, E x E;
- ``router_cosine``: cosine similarity of the router's per-expert weight rows (the gate
  rows W_r, or the expert embeddings of XMoE / StableMoE / VQMoE, or HyperRouter's
  generated gate), E x E;
- ``load``: tokens routed to each expert over the evaluation's valid batches, from
  which effective experts exp(H(load / sum)) (E = perfectly even, 1 = one expert takes
  everything) and dead experts (no token over the whole evaluation);
- router entropy: the mean per-token entropy of the router's softmax over all experts
  (nats) over the evaluation's tokens.

The probe batch is the first ``ceil(logging.collapse_probe_tokens / train.seq_length)``
sequences of the valid split: the same tokens at every evaluation and under every
layout, run on every data-parallel replica. The input of each MoE layer on it (the
router's input) is captured by a forward pre-hook; every expert then runs on all probe
tokens through ``MegasmoeMoELayer.expert_features`` (experts on other expert-parallel
ranks included), sequence-parallel slices are gathered over the tensor(-and-context)
parallel group, and the matrices of the layers on other pipeline stages are summed in
over the pipeline group: every rank ends with the same matrices.

Scalars (``collapse/<name>/layer_<i>``, i = 0-based layer index like ``router/*``) go
to metrics.jsonl and TensorBoard with the valid loss; rank 0 writes the matrices to
``<run dir>/collapse/step_<N:07d>.npz``. The math is in the plain functions at the top.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["linear_cka_matrix", "cosine_matrix", "row_cosine_matrix", "effective_experts",
           "dead_experts", "offdiag", "router_rows", "layer_scalars", "snapshot", "Probe"]


# ---------------------------------------------------------------------- the math


def linear_cka_matrix(features: torch.Tensor) -> torch.Tensor:
    """Linear CKA between every two experts: features [N tokens, E, F] -> [E, E] (float64).

    CKA(X, Y) = <Kx, Ky> / (||Kx|| ||Ky||) with K = H X X^T H the doubly centred Gram
    matrix over the N tokens. An expert whose outputs are constant over the tokens has
    CKA 0 with every other expert (and 1 with itself).
    """
    y = features.to(torch.float64)
    y = (y - y.mean(dim=0, keepdim=True)).transpose(0, 1)  # [E, N, F]
    grams = torch.bmm(y, y.transpose(1, 2)).reshape(y.shape[0], -1)  # [E, N*N]
    hsic = grams @ grams.t()
    norm = hsic.diagonal().clamp_min(0).sqrt()
    denom = norm[:, None] * norm[None, :]
    cka = torch.where(denom > 0, hsic / denom.clamp_min(1e-300), torch.zeros_like(hsic))
    return cka.fill_diagonal_(1.0)


def cosine_matrix(features: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Mean over tokens of cos(y_e(t), y_f(t)): features [N, E, F] -> [E, E] (float64)."""
    y = features.to(torch.float64)
    y = y / y.norm(dim=-1, keepdim=True).clamp_min(eps)
    return torch.einsum("nef,ngf->eg", y, y) / max(y.shape[0], 1)


def row_cosine_matrix(rows: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Cosine similarity of every two rows: [E, D] -> [E, E] (float64)."""
    r = rows.to(torch.float64)
    r = r / r.norm(dim=-1, keepdim=True).clamp_min(eps)
    return r @ r.t()


def effective_experts(load: torch.Tensor) -> float:
    """exp(entropy of load / sum(load)): E when even, 1 when one expert has it all; nan
    when nothing was routed."""
    load = load.to(torch.float64)
    total = load.sum()
    if total <= 0:
        return float("nan")
    p = load[load > 0] / total
    return math.exp(-(p * p.log()).sum().item())


def dead_experts(load: torch.Tensor) -> int:
    """Experts that received no token."""
    return int((load == 0).sum().item())


def offdiag(matrix: torch.Tensor) -> torch.Tensor:
    """The off-diagonal entries of a square matrix, flattened."""
    n = matrix.shape[0]
    return matrix[~torch.eye(n, dtype=torch.bool, device=matrix.device)]


def router_rows(router) -> Optional[torch.Tensor]:
    """The router's per-expert weight rows [E, D], or None when it has none.

    HyperRouter's generated gate (``materialize``), else ``expert_embeddings`` (XMoE,
    StableMoE, VQMoE), else the gate weight W_r.
    """
    if hasattr(router, "materialize"):
        return router.materialize()[0].detach()
    for name in ("expert_embeddings", "weight"):
        value = getattr(router, name, None)
        if isinstance(value, torch.Tensor) and value.dim() == 2:
            return value.detach()
    return None


def layer_scalars(cka: torch.Tensor, cosine: torch.Tensor, router_cosine: torch.Tensor,
                  load: torch.Tensor, entropy: float) -> dict[str, float]:
    """The scalars of one layer's matrices (names without the ``collapse/`` prefix)."""
    out = {
        "cka_mean_offdiag": offdiag(cka).mean().item(),
        "cka_max_offdiag": offdiag(cka).max().item(),
        "cosine_mean_offdiag": offdiag(cosine).mean().item(),
        "effective_experts": effective_experts(load),
        "dead_experts": float(dead_experts(load)),
        "router_entropy": entropy,
    }
    if not torch.isnan(router_cosine).any():
        out["router_cosine_mean_offdiag"] = offdiag(router_cosine).mean().item()
    return out


# ---------------------------------------------------------------------- the probe


def snapshot(routers) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Copies of the routers' telemetry buffers (taken when an evaluation starts)."""
    return [(r.telemetry_tokens_per_expert.clone(), r.telemetry_entropy.clone())
            for r in routers]


def _gather_tokens(x: torch.Tensor, group) -> torch.Tensor:
    """Concatenate every rank's [n, ...] rows of ``group`` (rank order) on every rank."""
    if group is None or dist.get_world_size(group) == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts)


class Probe:
    """Collapse telemetry of one model (all its chunks) on a fixed probe batch."""

    def __init__(self, cfg, model, chunks, routers, valid_ds, device):
        from megasmoe.moe.layer import MegasmoeMoELayer

        self.cfg, self.model, self.routers, self.device = cfg, model, routers, device
        self.layers = [m for c in chunks for m in c.modules()
                       if isinstance(m, MegasmoeMoELayer)]
        # megatron's interleaved pipeline schedule needs at least PP micro batches: the
        # probe is cut into PP of them there (whole sequences each), else it is one.
        self.micro = cfg.parallel.pp if len(model) > 1 else 1
        seqs = math.ceil(cfg.logging.collapse_probe_tokens / cfg.train.seq_length)
        self.num_seqs = -(-seqs // self.micro) * self.micro
        self.valid_ds = valid_ds
        self._captured: dict[int, list[torch.Tensor]] = {}

    @property
    def enabled(self) -> bool:
        """Whether this run measures anything (probe tokens > 0 and a valid split)."""
        return (self.num_seqs > 0 and self.valid_ds is not None
                and len(self.valid_ds) >= self.micro)

    # -------------------------------------------------------------- forward on the probe

    def _batch(self) -> dict:
        from megasmoe.training.data import batch_iterator

        n = min(self.num_seqs, len(self.valid_ds) // self.micro * self.micro)
        batch = next(iter(batch_iterator(self.valid_ds, 0, n, 0, 1, 0)))
        return {k: v.to(self.device) for k, v in batch.items()}

    def _forward(self, batch: dict) -> None:
        """One forward-only pass of the probe batch through the (pipelined) model."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        def loss_func(output):
            zero = output.float().sum() * 0
            return zero, torch.tensor(1, dtype=torch.int), {"probe": zero.detach()}

        def forward_step(data_iterator, model):
            b = next(data_iterator)
            out = model(b["tokens"], b["position_ids"], None, labels=b["labels"])
            return out, loss_func

        parts = [dict(zip(batch, values))
                 for values in zip(*(v.chunk(self.micro) for v in batch.values()))]
        iterators = [iter(parts) for _ in self.model]
        get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iterators if len(iterators) > 1 else iterators[0],
            model=self.model if len(self.model) > 1 else self.model[0],
            num_microbatches=self.micro, seq_length=batch["tokens"].shape[1],
            micro_batch_size=batch["tokens"].shape[0] // self.micro, forward_only=True)

    def _capture(self, batch: dict) -> None:
        def hook(layer, args):
            x = args[0].detach()
            self._captured.setdefault(layer.router.layer_number, []).append(
                x.reshape(-1, x.shape[-1]))

        handles = [layer.register_forward_pre_hook(hook) for layer in self.layers]
        try:
            self._forward(batch)
        finally:
            for h in handles:
                h.remove()

    # -------------------------------------------------------------- measuring

    def _layer_matrices(self, layer) -> tuple[torch.Tensor, ...]:
        """(cka, cosine, router_cosine) of one local MoE layer, the same on every rank."""
        from megatron.core import parallel_state

        # Tokens of all probe micro batches (CKA and mean cosine do not depend on order).
        x = torch.cat(self._captured.pop(layer.router.layer_number))
        feats = layer.expert_features(x)  # [this rank's tokens, E, H]
        if layer.config.sequence_parallel or self.cfg.parallel.cp > 1:
            feats = _gather_tokens(
                feats, parallel_state.get_tensor_and_context_parallel_group())
        rows = router_rows(layer.router)
        E = feats.shape[1]
        router_cos = (row_cosine_matrix(rows) if rows is not None
                      else torch.full((E, E), float("nan"), dtype=torch.float64))
        return linear_cka_matrix(feats), cosine_matrix(feats), router_cos.to(feats.device)

    def _eval_load(self, before) -> tuple[torch.Tensor, torch.Tensor]:
        """[layers, E] tokens and [layers, 2] (entropy sum, tokens) routed since
        ``before``, summed over all ranks."""
        L, E = self.cfg.model.num_layers, self.cfg.moe.num_experts
        load = torch.zeros(L, E, dtype=torch.float64, device=self.device)
        ent = torch.zeros(L, 2, dtype=torch.float64, device=self.device)
        for r, (counts0, ent0) in zip(self.routers, before):
            load[r.layer_number - 1] += (r.telemetry_tokens_per_expert - counts0).to(load)
            ent[r.layer_number - 1] += (r.telemetry_entropy - ent0).to(ent)
        dist.all_reduce(load)
        dist.all_reduce(ent)
        return load, ent

    @torch.no_grad()
    def measure(self, before, step: int, run_dir: Optional[Path], write: bool) -> dict:
        """Collapse scalars at ``step`` (collective: every rank calls it, after the
        evaluation's valid batches, while ``telemetry.kept`` holds the training counts).
        Writes the npz when ``write``. ``before`` is the ``snapshot`` taken when the
        evaluation started."""
        from megatron.core import parallel_state

        if not self.enabled:
            return {}
        start = time.perf_counter()
        load, ent = self._eval_load(before)
        self._capture(self._batch())
        L, E = self.cfg.model.num_layers, self.cfg.moe.num_experts
        mats = torch.zeros(3, L, E, E, dtype=torch.float64, device=self.device)
        present = torch.zeros(L, dtype=torch.float64, device=self.device)
        for layer in self.layers:
            i = layer.router.layer_number - 1
            for k, m in enumerate(self._layer_matrices(layer)):
                mats[k, i] = m
            present[i] = 1.0
        pp_group = parallel_state.get_pipeline_model_parallel_group()
        if dist.get_world_size(pp_group) > 1:
            dist.all_reduce(mats, group=pp_group)
            dist.all_reduce(present, group=pp_group)
        # Every rank must hold the same matrices: the spread over ranks proves it.
        hi, lo = mats.nan_to_num(0.0), mats.nan_to_num(0.0)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        spread = (hi - lo).max().item()
        layers = torch.nonzero(present > 0).flatten().tolist()
        out: dict[str, float] = {}
        for i in layers:
            e_sum, e_tokens = ent[i].tolist()
            scalars = layer_scalars(mats[0, i], mats[1, i], mats[2, i], load[i],
                                    e_sum / e_tokens if e_tokens else float("nan"))
            out.update({f"collapse/{k}/layer_{i}": v for k, v in scalars.items()})
        out["collapse/rank_spread"] = spread
        out["collapse/probe_time_s"] = time.perf_counter() - start
        if write and run_dir is not None:
            self._save(Path(run_dir) / "collapse" / f"step_{step:07d}.npz", step, layers,
                       mats, load, ent, spread)
        return out

    def _save(self, path: Path, step: int, layers: list[int], mats, load, ent,
              spread: float) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        idx = torch.tensor(layers, dtype=torch.long, device=mats.device)
        entropy = ent[idx, 0] / ent[idx, 1].clamp_min(1.0)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, step=np.int64(step), layers=np.asarray(layers, dtype=np.int64),
                 cka=mats[0, idx].cpu().numpy(), cosine=mats[1, idx].cpu().numpy(),
                 router_cosine=mats[2, idx].cpu().numpy(), load=load[idx].cpu().numpy(),
                 router_entropy=entropy.cpu().numpy(),
                 probe_tokens=np.int64(self.num_seqs * self.cfg.train.seq_length),
                 rank_spread=np.float64(spread))
        tmp.replace(path)
