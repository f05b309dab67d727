"""``simsmoe``: SimSMoE, a similarity penalty on experts that learn the same thing
(giangdip2410/SimSMoE).

- Gate: SMoE (g = W_r x, top-k, softmax over the selected), balance loss L_bal on
  softmax(g) as every SpecRouter (``moe.aux_loss_type=aux_loss``, in the convention of
  ``moe.aux_loss_normalization``: the same pressure as ``topk`` at equal coefficients).
- Pair tracking over any k: every training forward counts, for each expert pair i < j,
  the tokens whose selected experts include both (all k(k-1)/2 pairs of a token; the
  authors track only the sorted top-2, k = 2). The counts are summed over the data-,
  tensor- and context-parallel ranks of the micro batch (an all-reduce of E x E
  numbers) and ``pair_tracking`` += count / tokens / micro batches per step, so every
  rank holds the same tracker, whatever the layout. ``pair_tracking`` is a persistent
  buffer: checkpointed, a resumed run continues it exactly.
- Threshold rule: at the start of each optimizer step (``on_train_step``) the pairs
  with pair_tracking > ``cont_freq`` (16) are armed and their tracker reset to 0. In
  that step's forwards, for each armed pair (i, j), the tokens of the micro batch routed
  to both: z_i = P(E_i(X)), z_j = P(E_j(X)) with P a trainable Linear(d, E) (no bias,
  torch Linear init); c = CKA(z_i, z_j) (``kernel`` rbf with ``sigma`` 0.8, or
  linear); L_sim = sum of c over the pairs with c > ``tau`` (0.5); loss
  ``sim_coeff`` x L_sim (lambda 1 x 0.01), logged as ``moe/simsmoe_sim_loss/layer_i``.
  Gradients reach P and the experts (not W_r: the token selection is discrete).
- The expert outputs come from ``MegasmoeMoELayer.expert_features`` restricted to the
  armed pairs' experts: under expert parallelism a pair's experts may be on different
  ranks (each rank runs its local ones on the tokens of the expert group and returns the
  E-dimensional projections). Under sequence parallelism the projections are
  all-gathered over the tensor-parallel group so CKA sees the whole micro batch; every
  rank computes the same L_sim and adds L_sim / group size.

Deviations: the authors arm a pair in the batch whose count crosses the threshold; here
the decision is taken from the tracker at the start of the next step (one step later),
so that it needs no communication inside the forward pass and is the same at every
layout; tracking counts all k(k-1)/2 pairs (any k). Only the SMoE gate is provided as
the base router (the authors also use XMoE and StableMoE gates). Inference is plain
top-k of g: exports exactly to the standard architectures (P and the tracker have no
inference role).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core import num_microbatches_calculator
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

from megasmoe.moe import LayerBound
from megasmoe.routers import functional as RF
from megasmoe.routers.base import SpecRouter, uniform_fan_in_init
from megasmoe.routers.options import SimSMoEConfig
from megasmoe.routers.registry import register_router

__all__ = ["SimSMoEConfig", "SimSMoERouter"]


@register_router("simsmoe", SimSMoEConfig)
class SimSMoERouter(LayerBound, SpecRouter):
    """SimSMoE: SMoE gate plus a CKA penalty on frequently co-selected expert pairs."""

    def __init__(self, config, pg_collection=None, router_config=None, **kwargs):
        super().__init__(config, pg_collection, router_config, **kwargs)
        E, d = self.config.num_moe_experts, self.config.hidden_size
        self.projection = torch.nn.Parameter(uniform_fan_in_init((E, d), None))
        self.projection.megasmoe_init = uniform_fan_in_init
        self.register_buffer("pair_tracking", torch.zeros(E, E, dtype=torch.float64))
        self.register_buffer("armed", torch.zeros(E, E, dtype=torch.bool), persistent=False)
        self.mark_sequence_parallel()

    def on_train_step(self, step: int, total_steps: int) -> None:
        """Arm the pairs over the threshold and reset their trackers."""
        armed = torch.triu(self.pair_tracking > self.router_config.cont_freq, diagonal=1)
        self.armed.copy_(armed)
        self.pair_tracking.masked_fill_(armed, 0.0)

    def route(self, logits, padding_mask):
        probs, routing_map = RF.softmax_over_topk(logits, self.topk)
        return probs, routing_map, torch.softmax(logits, dim=-1)

    def forward(self, input: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        probs, routing_map = super().forward(input, padding_mask)
        if not (self.training and torch.is_grad_enabled()):
            return probs, routing_map
        valid = None if padding_mask is None else ~padding_mask.reshape(-1)
        self._track(routing_map if valid is None else routing_map & valid.unsqueeze(-1),
                    routing_map.shape[0] if valid is None else int(valid.sum()))
        if self.armed.any():
            probs = self._similarity_loss(input, probs, routing_map, valid)
        return probs, routing_map

    @torch.no_grad()
    def _track(self, routing_map: torch.Tensor, tokens: int) -> None:
        counts = RF.pair_counts(routing_map).reshape(-1)
        buf = torch.cat([counts, torch.tensor([float(tokens)], dtype=torch.float64)])
        buf = buf.to(self.pair_tracking.device)
        for group in (parallel_state.get_tensor_model_parallel_group(),
                      parallel_state.get_data_parallel_group(with_context_parallel=True)):
            if group is not None and group.size() > 1:
                dist.all_reduce(buf, group=group)
        E = self.config.num_moe_experts
        self.pair_tracking += buf[:-1].reshape(E, E) / buf[-1] / _microbatches_per_step()

    def _similarity_loss(self, input, probs, routing_map, valid):
        rc = self.router_config
        pairs = self.armed.nonzero().tolist()
        experts = sorted({e for pair in pairs for e in pair})
        proj = self.projection

        def project(y):
            return torch.nn.functional.linear(y.float(), proj.float())

        z = self.moe_layer.expert_features(input.reshape(-1, input.shape[-1]), project,
                                           experts=experts)  # [N, E, E]
        rmap = routing_map if valid is None else routing_map & valid.unsqueeze(-1)
        n_local = rmap.shape[0] if valid is None else valid.sum()
        group = self.tp_cp_group
        size = 1 if group is None else group.size()
        if size > 1:
            z = gather_from_sequence_parallel_region(z.reshape(z.shape[0], -1).contiguous(),
                                                     group=group).reshape(-1, *z.shape[1:])
            rmap = gather_from_sequence_parallel_region(rmap.to(torch.uint8).contiguous(),
                                                        group=group).bool()
        loss = z.sum() * 0.0
        for i, j in pairs:
            rows = rmap[:, i] & rmap[:, j]
            if int(rows.sum()) < 2:
                continue
            zi, zj = z[rows, i], z[rows, j]
            c = RF.cka_rbf(zi, zj, rc.sigma) if rc.kernel == "rbf" else RF.cka_linear(zi, zj)
            if c.item() > rc.tau:
                loss = loss + c
        return self.attach_and_log_load_balancing_loss(
            probs, rc.sim_coeff, rc.sim_coeff * loss / size, "simsmoe_sim_loss", group,
            valid_token_count=n_local)


def _microbatches_per_step() -> int:
    """Micro batches per optimizer step from megatron's calculator; 1 where none is set
    up (a model driven outside the trainer, e.g. one MoE layer timed by a benchmark)."""
    if num_microbatches_calculator._GLOBAL_NUM_MICROBATCHES_CALCULATOR is None:
        return 1
    return num_microbatches_calculator.get_num_microbatches()
