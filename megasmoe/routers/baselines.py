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
  (authors: 8 -> 16 of 16 experts); evaluation uses inference_k.

Deviations from the authors' code: the balance loss is megatron-attached (logged per
layer, scaled for per-token loss normalisation) with counts summed over the
sequence-parallel group so that it does not depend on TP; the authors' gate Linear
has a bias, megasmoe's router weight has none (``model`` has no biases anywhere).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megasmoe.config import ConfigError
from megasmoe.routers import functional as RF
from megasmoe.routers.base import (
    MegasmoeRouter,
    RouterConfigBase,
    SpecRouter,
    orthogonal_init,
    uniform_fan_in_init,
)
from megasmoe.routers.registry import register_router

__all__ = ["SigmoidBiasConfig", "SigmoidBiasRouter", "XMoEConfig", "XMoERouter",
           "StableMoEConfig", "StableMoERouter", "SMoEDropoutConfig", "SMoEDropoutRouter"]


@dataclass
class SigmoidBiasConfig(RouterConfigBase):
    """Fields of the ``sigmoid_bias`` router (DeepSeek-V3 defaults)."""

    bias_update_rate: float = 1e-3
    """Step of the expert-bias update (sign of the load error times this rate)."""
    topk_scaling_factor: Optional[float] = None
    """Multiply the (renormalised) selected scores by this factor; null = 1."""

    def transformer_config_overrides(self) -> dict:
        return {
            "moe_router_score_function": "sigmoid",
            "moe_router_enable_expert_bias": True,
            "moe_router_bias_update_rate": self.bias_update_rate,
            "moe_router_topk_scaling_factor": self.topk_scaling_factor,
        }


@register_router("sigmoid_bias", SigmoidBiasConfig)
class SigmoidBiasRouter(MegasmoeRouter):
    """Sigmoid scores with aux-loss-free expert bias (DeepSeek-V3), megatron semantics."""

    def __init__(self, config, pg_collection=None, router_config=None, **kwargs):
        super().__init__(config, pg_collection, router_config, **kwargs)
        self.mark_sequence_parallel()


@dataclass
class XMoEConfig(RouterConfigBase):
    """Fields of the ``xmoe`` router (authors' defaults)."""

    reduced_dim: int = 8
    """Dimension of the low-rank routing space (W_red: d -> reduced_dim)."""
    embedding_norm: float = 1.5
    """Row norm the expert embeddings are rescaled to every forward."""
    init_gain: float = 0.32
    """Gain of the orthogonal init of the expert embeddings."""
    balance_temperature: float = 0.3
    """The balance loss uses softmax(g / balance_temperature)."""


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


@dataclass
class StableMoEConfig(RouterConfigBase):
    """Fields of the ``stablemoe`` router (authors' defaults)."""

    init_gain: float = 0.32
    """Gain of the orthogonal init of the expert embeddings (E x d)."""
    balance_temperature: float = 0.3
    """The balance loss uses softmax(g / balance_temperature)."""


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


@dataclass
class SMoEDropoutConfig(RouterConfigBase):
    """Fields of the ``smoe_dropout`` router (authors: 8 -> 16 of 16 experts)."""

    k_start: Optional[int] = None
    """k at step 0; null = moe.topk."""
    k_end: Optional[int] = None
    """k at the last step; null = moe.num_experts."""
    inference_k: Optional[int] = None
    """k used in evaluation; null = moe.topk."""
    schedule_steps: Optional[int] = None
    """Steps over which k grows; null = train.steps."""

    def validate(self, cfg) -> None:
        E = cfg.moe.num_experts
        self.k_start = self.k_start or cfg.moe.topk
        self.k_end = self.k_end or E
        self.inference_k = self.inference_k or cfg.moe.topk
        self.schedule_steps = self.schedule_steps or cfg.train.steps
        for name in ("k_start", "k_end", "inference_k"):
            if not 1 <= getattr(self, name) <= E:
                raise ConfigError(f"moe.router.{name}={getattr(self, name)} must be in "
                                  f"[1, moe.num_experts={E}]")
        if cfg.moe.aux_loss_type != "none":
            raise ConfigError("moe.router.name=smoe_dropout freezes the router, so a balance "
                              "loss cannot act on it; set moe.aux_loss_type=none")


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
