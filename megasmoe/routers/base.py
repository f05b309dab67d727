"""The base of every megasmoe router: a megatron-core TopKRouter made device-safe.

Routers plug into megatron-core through ``MoESubmodules.router``: the layer calls
``router(config=TransformerConfig, pg_collection=...)`` and then
``router(hidden [S/TP, B, H], padding_mask) -> (probs [T, E] float, routing_map [T, E] bool)``.
A megasmoe router subclasses ``MegasmoeRouter``, keeps its math in plain tensor
functions in its own module, and takes its own config dataclass as ``router_config``.
Routers that need expert outputs (a later issue) hook the layer, not this interface.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from megatron.core.transformer.moe.router import TopKRouter

__all__ = ["MegasmoeRouter", "RouterConfigBase", "router_logits"]


@dataclass
class RouterConfigBase:
    """Fields shared by all router configs (none yet); subclasses add their own."""

    def transformer_config_overrides(self) -> dict:
        """TransformerConfig fields this router needs set (e.g. score function)."""
        return {}

    def validate(self, cfg) -> None:
        """Raise ConfigError for settings this router cannot run with."""


def router_logits(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], dtype: torch.dtype
) -> torch.Tensor:
    """Gate logits ``x W^T (+ b)`` computed in ``dtype`` on ``x``'s device."""
    w = weight.to(device=x.device, dtype=dtype)
    b = None if bias is None else bias.to(device=x.device, dtype=dtype)
    return torch.nn.functional.linear(x.to(dtype), w, b)


class MegasmoeRouter(TopKRouter):
    """TopKRouter with a device-safe gating and per-expert load telemetry.

    ``gating`` is overridden because megatron-core 0.16.1's ``Router.gating`` moves the
    weight to the CUDA device and, without Transformer Engine, its
    ``router_gating_linear`` raises NameError. Telemetry (tokens per expert since the
    last read) is kept in a non-persistent buffer read by ``megasmoe.training.metrics``.
    """

    registry_name = "base"
    config_cls = RouterConfigBase

    def __init__(self, config, pg_collection=None, router_config=None, **kwargs):
        super().__init__(config=config, pg_collection=pg_collection)
        self.router_config = router_config if router_config is not None else self.config_cls()
        self.register_buffer(
            "telemetry_tokens_per_expert",
            torch.zeros(self.config.num_moe_experts, dtype=torch.float64),
            persistent=False,
        )

    @property
    def routing_dtype(self) -> torch.dtype:
        """fp64 if moe_router_dtype says so, else fp32 (routing is never done in bf16)."""
        return torch.float64 if self.config.moe_router_dtype == "fp64" else torch.float32

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        """Router logits in fp32 (or fp64) on the input's device."""
        return router_logits(input, self.weight, self.bias, self.routing_dtype)

    def forward(self, input: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        """Route ``input`` [S, B, H]; returns (probs [S*B, E], routing_map [S*B, E])."""
        probs, routing_map = super().forward(input, padding_mask=padding_mask)
        self.record_load(routing_map, padding_mask)
        return probs, routing_map

    @torch.no_grad()
    def record_load(self, routing_map: torch.Tensor, padding_mask: Optional[torch.Tensor]):
        """Add this batch's tokens per expert to the telemetry buffer (padding excluded)."""
        if padding_mask is not None:
            routing_map = routing_map & ~padding_mask.reshape(-1, 1)
        buf = self.telemetry_tokens_per_expert
        if buf.device != routing_map.device:
            self.telemetry_tokens_per_expert = buf = buf.to(routing_map.device)
        buf += routing_map.sum(dim=0).to(buf.dtype)
