"""``hyper``: HyperRouter (Do et al. 2023, arXiv:2312.07035; giangdip2410/HyperRouter).

Per MoE layer a trainable embedding e (1 x d_e, randn init; authors d_e = d) and a
hypernetwork H = Linear(d_e, h) -> ReLU -> Linear(h, E (d + 1)) FROZEN at its random
init (torch.nn.Linear default init). theta = H(e) reshaped [E, d + 1]: W_r = theta[:, :d],
b = theta[:, d]; g = x W_r^T + b; top-k, softmax over the selected logits. Gradients reach
only e. ``materialize()`` returns the generated (W_r, b): deterministic, so an export
writes a plain linear gate.

Balance loss: none by default, as the authors train; ``moe.router.balance_loss=true``
attaches L_bal on softmax(g) in the shared convention of ``moe.aux_loss_normalization``
(routers/base.py: at equal moe.aux_loss_coeff the same pressure as ``topk``).

Deviation: the authors pair HyperRouter with the SMoE-Dropout k schedule; here k is
moe.topk.
"""

from __future__ import annotations


import torch

from megasmoe.routers import functional as RF
from megasmoe.routers.base import SpecRouter, normal_init, uniform_fan_in_init
from megasmoe.routers.options import HyperConfig
from megasmoe.routers.registry import register_router

__all__ = ["HyperConfig", "HyperRouter"]


def _bias_init(fan_in: int):
    """torch.nn.Linear's bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) of the layer."""
    return lambda shape, generator: (torch.rand(shape, generator=generator) * 2 - 1) / fan_in ** 0.5


@register_router("hyper", HyperConfig)
class HyperRouter(SpecRouter):
    """HyperRouter: a frozen hypernetwork generates the gate from a trainable embedding."""

    def __init__(self, config, pg_collection=None, router_config=None, **kwargs):
        super().__init__(config, pg_collection, router_config, **kwargs)
        rc = self.router_config
        d, E = self.config.hidden_size, self.config.num_moe_experts
        d_e, h = rc.embedding_dim or d, rc.hypernet_hidden
        self.weight = None
        self.embedding = torch.nn.Parameter(torch.randn(1, d_e))
        self.embedding.megasmoe_init = normal_init(1.0)
        frozen = {
            "hyper_w1": ((h, d_e), uniform_fan_in_init),
            "hyper_b1": ((h,), _bias_init(d_e)),
            "hyper_w2": ((E * (d + 1), h), uniform_fan_in_init),
            "hyper_b2": ((E * (d + 1),), _bias_init(h)),
        }
        for name, (shape, init) in frozen.items():
            p = torch.nn.Parameter(init(shape, None), requires_grad=False)
            p.megasmoe_init = init
            setattr(self, name, p)
        self.mark_sequence_parallel()

    def materialize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The generated gate (W_r [E, d], b [E]) in the routing dtype."""
        dtype = self.routing_dtype
        return RF.hyper_gate(self.embedding.to(dtype), self.hyper_w1.to(dtype),
                             self.hyper_b1.to(dtype), self.hyper_w2.to(dtype),
                             self.hyper_b2.to(dtype), self.config.num_moe_experts)

    def gating(self, input):
        w, b = self.materialize()
        return torch.nn.functional.linear(input.to(w.dtype), w, b)

    def route(self, logits, padding_mask):
        probs, routing_map = RF.softmax_over_topk(logits, self.topk)
        scores = torch.softmax(logits, dim=-1) if self.router_config.balance_loss else None
        return probs, routing_map, scores
