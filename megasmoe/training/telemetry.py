"""Router telemetry: tokens per expert per layer, max/mean load, load and router entropy.

Every ``MegasmoeRouter`` counts the tokens it routes to each expert into a buffer;
``collect`` sums those counts over all ranks (each rank routes a disjoint set of tokens:
its data-parallel shard, its sequence-parallel slice, its pipeline stage's layers) and
turns them into scalars; ``reset`` clears them. ``kept`` keeps what training counted
across an evaluation in the middle of a log interval.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist

from megasmoe.routers.base import MegasmoeRouter

__all__ = ["routers", "collect", "reset", "kept", "load_matrix"]


def routers(chunks) -> list[MegasmoeRouter]:
    """The megasmoe routers in these model chunks."""
    return [m for c in chunks for m in c.modules() if isinstance(m, MegasmoeRouter)]


def load_matrix(chunks, num_layers: int, num_experts: int, device) -> torch.Tensor:
    """[num_layers, num_experts] routed-token counts since the last reset, summed globally.

    Collective: every rank must call it. Dense layers stay zero rows.
    """
    counts = torch.zeros(num_layers, num_experts, dtype=torch.float64, device=device)
    for r in routers(chunks):
        counts[r.layer_number - 1] += r.telemetry_tokens_per_expert.to(device)
    if dist.is_initialized():
        dist.all_reduce(counts)
    return counts


def entropy_matrix(chunks, num_layers: int, device) -> torch.Tensor:
    """[num_layers, 2]: (sum of per-token router entropies, tokens), summed globally."""
    acc = torch.zeros(num_layers, 2, dtype=torch.float64, device=device)
    for r in routers(chunks):
        acc[r.layer_number - 1] += r.telemetry_entropy.to(device)
    if dist.is_initialized():
        dist.all_reduce(acc)
    return acc


def reset(chunks) -> None:
    """Zero every router's telemetry counters."""
    for r in routers(chunks):
        r.telemetry_tokens_per_expert.zero_()
        r.telemetry_entropy.zero_()


@contextlib.contextmanager
def kept(chunks):
    """Leave the routers' counters and megatron's aux-loss tracker, after the block, as
    they were before it: what an evaluation routes is not counted, and what training
    counted since the last log is not lost.

    Zeroing them after an evaluation (what this replaces) lost the training steps between
    the last log and an evaluation that is not on a log step: the next log's aux losses
    were averaged over steps some of which were no longer counted.
    """
    from megatron.core.transformer.moe import moe_utils

    tracker = moe_utils.get_moe_layer_wise_logging_tracker()
    aux = {name: entry["values"].clone() for name, entry in tracker.items()}
    counters = [(r, r.telemetry_tokens_per_expert.clone(), r.telemetry_entropy.clone())
                for r in routers(chunks)]
    try:
        yield
    finally:
        for name, entry in tracker.items():
            if name in aux:
                entry["values"].copy_(aux[name])
            else:  # first logged during the block: evaluation's alone
                entry["values"].zero_()
        for r, tokens, entropy in counters:
            r.telemetry_tokens_per_expert.copy_(tokens)
            r.telemetry_entropy.copy_(entropy)


def collect(chunks, cfg) -> tuple[dict, torch.Tensor]:
    """Scalars per MoE layer, then reset: router/entropy (mean per-token entropy of the
    router's softmax over all experts, nats), router/max_over_mean_load, router/load_entropy
    (entropy of the load distribution / ln E), router/dead_experts (no token routed).
    Also returns the [layers, experts] token counts (for heatmaps)."""
    from megasmoe import platform

    device = platform.device()
    counts = load_matrix(chunks, cfg.model.num_layers, cfg.moe.num_experts, device)
    router_entropy = entropy_matrix(chunks, cfg.model.num_layers, device)
    reset(chunks)
    out = {}
    for layer, row in enumerate(counts):
        total = row.sum().item()
        if total == 0:
            continue
        ent_sum, ent_tokens = router_entropy[layer].tolist()
        out[f"router/entropy/layer_{layer}"] = ent_sum / max(ent_tokens, 1.0)
        share = row / total
        load_entropy = -(share[share > 0] * share[share > 0].log()).sum().item()
        out[f"router/max_over_mean_load/layer_{layer}"] = (row.max() / row.mean()).item()
        out[f"router/load_entropy/layer_{layer}"] = load_entropy / math.log(len(row))
        out[f"router/dead_experts/layer_{layer}"] = float((row == 0).sum().item())
    return out, counts
