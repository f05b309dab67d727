"""``domain_steer``: DSMoE steering (giangdip2410/Domain-specific-Experts).

A fixed per-layer logit bias on selected experts, added to the router logits before
the model's own softmax/top-k (megatron-core's TopKRouter routing, as ``topk``):
delta = log(1 + lambda) (multiplicative mode, lambda = 0.10) or lambda (additive) on the
global top-N (layer, expert) pairs of a steering file. Zero extra inference cost: one
bias add; the bias is a persistent buffer (checkpointed) and can be folded into an
exported gate that has a bias.

Steering file (JSON), as ``megasmoe steer discover`` writes it (docs/steering.md; extra
fields are ignored here)::

    {"mode": "multiplicative", "lambda": 0.10,
     "experts": {"0": [3, 5], "2": [1]}}       # 0-based global layer -> expert ids

The config's mode/lambda override the file's when given. Without a file the bias is
zero (useful to load a checkpoint that already holds one). The balance loss is
megatron's, in the convention of ``moe.aux_loss_normalization`` (as ``topk``).
"""

from __future__ import annotations


import torch

from megasmoe.routers import functional as RF
from megasmoe.routers.base import MegasmoeRouter
from megasmoe.routers.options import DomainSteerConfig, read_steering_file
from megasmoe.routers.registry import register_router

__all__ = ["DomainSteerConfig", "DomainSteerRouter", "read_steering_file"]


@register_router("domain_steer", DomainSteerConfig)
class DomainSteerRouter(MegasmoeRouter):
    """Router logits plus a fixed per-layer steering bias, then megatron top-k."""

    def __init__(self, config, pg_collection=None, router_config=None, **kwargs):
        super().__init__(config, pg_collection, router_config, **kwargs)
        self.register_buffer("steering_bias", torch.zeros(self.config.num_moe_experts))
        self.mark_sequence_parallel()

    def set_layer_number(self, layer_number: int) -> None:
        """Megatron sets the (1-based, global) layer number: pick this layer's bias."""
        super().set_layer_number(layer_number)
        rc = self.router_config
        if rc.file is None:
            return
        steering = read_steering_file(rc.file, self.config.num_layers, self.config.num_moe_experts)
        experts = steering["experts"].get(layer_number - 1, [])
        self.steering_bias.copy_(RF.steering_bias(self.config.num_moe_experts, experts,
                                                  rc.mode, rc.strength))

    def gating(self, input):
        logits = super().gating(input)
        return logits + self.steering_bias.to(logits)
