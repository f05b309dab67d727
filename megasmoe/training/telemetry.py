"""Router telemetry: tokens per expert per layer, max/mean load, load entropy.

Every ``MegasmoeRouter`` counts the tokens it routes to each expert into a buffer;
``collect`` sums those counts over all ranks (each rank routes a disjoint set of tokens:
its data-parallel shard, its sequence-parallel slice, its pipeline stage's layers) and
turns them into scalars; ``reset`` clears them (after evaluation).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from megasmoe.routers.base import MegasmoeRouter

__all__ = ["routers", "collect", "reset", "load_matrix"]


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


def reset(chunks) -> None:
    """Zero every router's token counters."""
    for r in routers(chunks):
        r.telemetry_tokens_per_expert.zero_()


def collect(chunks, cfg) -> dict:
    """Scalars per MoE layer (load max/mean, load entropy, dead experts), then reset."""
    from megasmoe import platform

    counts = load_matrix(chunks, cfg.model.num_layers, cfg.moe.num_experts, platform.device())
    reset(chunks)
    out = {}
    for layer, row in enumerate(counts):
        total = row.sum().item()
        if total == 0:
            continue
        share = row / total
        entropy = -(share[share > 0] * share[share > 0].log()).sum().item()
        out[f"router/max_over_mean_load/layer_{layer}"] = (row.max() / row.mean()).item()
        out[f"router/load_entropy/layer_{layer}"] = entropy / math.log(len(row))
        out[f"router/dead_experts/layer_{layer}"] = float((row == 0).sum().item())
    return out
