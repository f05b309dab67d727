"""``unified``: USMoE unified score with cross-token top-k (giangdip2410/USMoE).

l = W_r x; s = (1 - alpha) softmax_e(l) + alpha (2 / E) sigmoid(l) (alpha = 0.5). Within
a group of N tokens the N k largest (token, expert) pairs of s are kept: a token gets a
variable number of experts (0..E), an expert a variable number of tokens; the output is
y_t = sum_e M_te s_te Expert_e(x_t) (no renormalisation). Training-free use: put this
router on a model trained with ``topk`` (same ``router.weight``).

Groups (``moe.router.group``) and what they leak:
- ``sequence`` (authors' HF models): the N tokens of one sequence. Token t's experts
  depend on later tokens of its sequence: training sees the future, autoregressive
  decoding cannot reproduce it.
- ``position`` (authors' Transformer-XL code, "one time step"): the B tokens at one
  position of the micro batch (this data-parallel rank's micro batch, as the authors
  group within their batch). No token sees a later token of its own sequence, but its
  experts depend on the other sequences of the micro batch at that position (so on
  micro_batch_size); decoding one sequence alone (B = 1) is plain top-k of s. The
  micro batches, and so the groups, are the same under any DP/EP split at a fixed
  micro_batch_size; under sequence parallelism a position's tokens are all on one
  rank (megatron's [S/TP, B] layout), so nothing is gathered.
- ``micro_batch``: all tokens of the micro batch. Leaks across tokens and sequences,
  and routing depends on batch composition (and so on micro_batch_size).
- ``causal``: token t keeps its pairs among the (t + 1) k largest of the prefix 0..t.
  No leakage: identical in training and decoding. Cost O(S^2 E) per sequence.

Under sequence parallelism the scores (not their gradients) are all-gathered over the
tensor-parallel group so the sequence, micro_batch and causal groups see whole
sequences; each rank keeps its slice. Padding tokens are never selected.

Balance loss: none by default, as the authors train (``moe.router.balance_loss=true``
attaches L_bal on softmax(g), in the shared convention of ``moe.aux_loss_normalization``,
routers/base.py, normalised with k = moe.topk).

Dispatchers: the allgather dispatcher sizes its buffers from the routing map and takes a
variable number of experts per token. The alltoall and flex dispatchers (dropless)
assume exactly moe.topk per token and are refused.
"""

from __future__ import annotations


import torch
import torch.distributed as dist

from megasmoe.routers import functional as RF
from megasmoe.routers.base import SpecRouter
from megasmoe.routers.options import UnifiedConfig
from megasmoe.routers.registry import register_router

__all__ = ["UnifiedConfig", "UnifiedRouter"]

@register_router("unified", UnifiedConfig)
class UnifiedRouter(SpecRouter):
    """USMoE: unified softmax/sigmoid score, top N k (token, expert) pairs per group."""

    variable_experts_per_token = True

    def __init__(self, config, pg_collection=None, router_config=None, **kwargs):
        super().__init__(config, pg_collection, router_config, **kwargs)
        self.mark_sequence_parallel()
        self._shape = None

    def routing(self, logits, padding_mask=None):
        self._shape = logits.shape[:2]  # [S_local, B]: the groups need the layout
        return super().routing(logits, padding_mask)

    def route(self, logits, padding_mask):
        scores = RF.unified_scores(logits, self.router_config.alpha)
        with torch.no_grad():
            chosen = scores.detach()
            if padding_mask is not None:
                chosen = chosen.masked_fill(padding_mask.unsqueeze(-1), float("-inf"))
            routing_map = self._select(chosen)
            if padding_mask is not None:  # a group with too few real tokens picks -inf
                routing_map &= ~padding_mask.unsqueeze(-1)
        probs = scores * routing_map
        balance = torch.softmax(logits, dim=-1) if self.router_config.balance_loss else None
        return probs, routing_map, balance

    def _select(self, scores: torch.Tensor) -> torch.Tensor:
        S_local, B = self._shape
        E = scores.shape[-1]
        local = scores.reshape(S_local, B, E)
        if self.router_config.group == "position":
            # [S, B] is s-major: each row s of [S_local, B, E] is one position's group.
            return RF.group_topk_map(local, self.topk).reshape(-1, E)
        tp = self.tp_group.size() if self.tp_group is not None else 1
        if tp > 1 and self.config.sequence_parallel:
            parts = [torch.empty_like(local) for _ in range(tp)]
            dist.all_gather(parts, local.contiguous(), group=self.tp_group)
            full = torch.cat(parts, dim=0)
        else:
            full = local
        group, k = self.router_config.group, self.topk
        per_seq = full.transpose(0, 1)  # [B, S, E]
        if group == "sequence":
            chosen = RF.group_topk_map(per_seq, k).transpose(0, 1)
        elif group == "causal":
            chosen = RF.causal_topk_map(per_seq, k).transpose(0, 1)
        else:
            chosen = RF.group_topk_map(full.reshape(-1, E), k).reshape(full.shape)
        if tp > 1 and self.config.sequence_parallel:
            rank = self.tp_group.rank()
            chosen = chosen[rank * S_local:(rank + 1) * S_local]
        return chosen.reshape(-1, E)
