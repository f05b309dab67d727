"""Baseline routers the papers compare against: sigmoid_bias, xmoe, stablemoe, smoe_dropout.

- ``sigmoid_bias``: DeepSeek-V3 (Liu et al. 2024, arXiv:2412.19437): sigmoid scores,
  auxiliary-loss-free balancing with a per-expert bias added for selection only and
  updated from the token counts in megatron-core's ``finalize_model_grads``
  (``expert_bias`` is a persistent buffer: it is checkpointed).
- ``xmoe``: X-MoE (Chi et al. 2022, arXiv:2204.09179), authors' gate as in
  giangdip2410/SimSMoE: h = W_red x (d -> 8), M (E x 8) orthogonal init (gain 0.32),
  renormalised in place to row norm 1.5 every forward, g = h . normalize(M)^T; top-k,
  softmax over the k values; balance loss on softmax(g / 0.3).
- ``stablemoe``: StableMoE stage 1 (Dai et al. 2022, arXiv:2204.08396): g = x .
  normalize(M)^T, M (E x d) orthogonal (gain 0.32); otherwise as xmoe.
- ``smoe_dropout``: SMoE-Dropout (Chen et al. 2023, arXiv:2303.01610): the router is
  frozen at its random init; k grows linearly from k_start to k_end over training
  (authors' defaults: from E / 2 to E, 8 -> 16 of 16 experts); evaluation uses
  inference_k (moe.topk; the authors evaluate at several k).

Balance loss: ``sigmoid_bias`` uses megatron-core's (optional); ``xmoe`` and
``stablemoe`` the papers' L_bal on softmax(g / 0.3). Both follow the one convention of
``moe.aux_loss_normalization`` (routers/base.py): by default megatron's normalisation,
k times the papers' formula, so equal moe.aux_loss_coeff means the same pressure as
``topk``; set it to ``paper`` for the papers' normalisation (for every router).

Deviations from the authors' code: the balance loss is megatron-attached (logged per
layer, scaled for per-token loss normalisation) with counts summed over the
sequence-parallel group so that it does not depend on TP; the authors' gate Linear
has a bias, megasmoe's router weight has none (``model`` has no biases anywhere).
"""

from __future__ import annotations


import torch

from megasmoe.routers import functional as RF
from megasmoe.routers.base import (
    MegasmoeRouter,
    SpecRouter,
    orthogonal_init,
    uniform_fan_in_init,
)
from megasmoe.routers.options import SigmoidBiasConfig, XMoEConfig, StableMoEConfig, SMoEDropoutConfig
from megasmoe.routers.registry import register_router

__all__ = ["SigmoidBiasConfig", "SigmoidBiasRouter", "XMoEConfig", "XMoERouter",
           "StableMoEConfig", "StableMoERouter", "SMoEDropoutConfig", "SMoEDropoutRouter"]


@register_router("sigmoid_bias", SigmoidBiasConfig)
class SigmoidBiasRouter(MegasmoeRouter):
    """Sigmoid scores with aux-loss-free expert bias (DeepSeek-V3), megatron semantics."""

    def __init__(self, config, pg_collection=None, router_config=None, **kwargs):
        super().__init__(config, pg_collection, router_config, **kwargs)
        self.mark_sequence_parallel()


class _EmbeddingGate(SpecRouter):
    """Shared route(): top-k of g, softmax over the k values, balance on softmax(g / tau)."""

    def route(self, logits, padding_mask):
        probs, routing_map = RF.softmax_over_topk(logits, self.topk)
        scores = torch.softmax(logits / self.router_config.balance_temperature, dim=-1)
        return probs, routing_map, scores


@register_router("xmoe", XMoEConfig)
class XMoERouter(_EmbeddingGate):
    """X-MoE gate: low-rank projection, cosine to normalised expert embeddings."""

    def __init__(self, config, pg_collection=None, router_config=None, **kwargs):
        super().__init__(config, pg_collection, router_config, **kwargs)
        rc = self.router_config
        d, E = self.config.hidden_size, self.config.num_moe_experts
        self.weight = None  # the gate is (w_reduce, expert_embeddings), not W_r
        self.w_reduce = torch.nn.Parameter(uniform_fan_in_init((rc.reduced_dim, d), None))
        self.w_reduce.megasmoe_init = uniform_fan_in_init
        self.expert_embeddings = torch.nn.Parameter(
            orthogonal_init(rc.init_gain)((E, rc.reduced_dim), None))
        self.expert_embeddings.megasmoe_init = orthogonal_init(rc.init_gain)
        self.mark_sequence_parallel()

    def gating(self, input):
        if self.training:
            RF.renorm_rows_(self.expert_embeddings.data, self.router_config.embedding_norm)
        dtype = self.routing_dtype
        return RF.xmoe_logits(input.to(dtype), self.w_reduce.to(dtype),
                              self.expert_embeddings.to(dtype))


@register_router("stablemoe", StableMoEConfig)
class StableMoERouter(_EmbeddingGate):
    """StableMoE (stage 1) gate: x . normalize(M)^T."""

    def __init__(self, config, pg_collection=None, router_config=None, **kwargs):
        super().__init__(config, pg_collection, router_config, **kwargs)
        d, E = self.config.hidden_size, self.config.num_moe_experts
        self.weight = None
        init = orthogonal_init(self.router_config.init_gain)
        self.expert_embeddings = torch.nn.Parameter(init((E, d), None))
        self.expert_embeddings.megasmoe_init = init
        self.mark_sequence_parallel()

    def gating(self, input):
        dtype = self.routing_dtype
        return RF.cosine_logits(input.to(dtype), self.expert_embeddings.to(dtype))


@register_router("smoe_dropout", SMoEDropoutConfig)
class SMoEDropoutRouter(SpecRouter):
    """Frozen random router; k grows linearly during training (SMoE-Dropout).

    The current k is a function of the persistent ``schedule_step`` buffer (set by
    ``on_train_step``, checkpointed), so a resumed run continues the schedule. The
    alltoall dispatcher sizes its buffers from ``config.moe_router_topk``; this router
    keeps that field equal to the k in use (all MoE layers share one schedule).
    """

    def __init__(self, config, pg_collection=None, router_config=None, **kwargs):
        super().__init__(config, pg_collection, router_config, **kwargs)
        self.weight.requires_grad_(False)
        self.weight.megasmoe_init = uniform_fan_in_init
        self.register_buffer("schedule_step", torch.zeros((), dtype=torch.long))

    def on_train_step(self, step: int, total_steps: int) -> None:
        self.schedule_step.fill_(step)

    def current_k(self) -> int:
        """k for this forward: the schedule's in training, inference_k in evaluation."""
        rc = self.router_config
        if not self.training:
            return rc.inference_k
        return RF.smoe_dropout_k(int(self.schedule_step), rc.schedule_steps, rc.k_start, rc.k_end)

    def route(self, logits, padding_mask):
        k = self.current_k()
        self.config.moe_router_topk = k
        probs, routing_map = RF.softmax_over_topk(logits, k)
        return probs, routing_map, None
