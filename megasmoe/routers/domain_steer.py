"""``domain_steer``: DSMoE steering (giangdip2410/Domain-specific-Experts).

A fixed per-layer logit bias on selected experts, added to the router logits before
the model's own softmax/top-k (megatron-core's TopKRouter routing, as ``topk``):
delta = log(1 + lambda) (multiplicative mode, lambda = 0.10) or lambda (additive) on the
global top-N (layer, expert) pairs of a steering file. Zero extra inference cost: one
bias add; the bias is a persistent buffer (checkpointed) and can be folded into an
exported gate that has a bias.

Steering file (JSON), as written by the discovery step (a later issue)::

    {"mode": "multiplicative", "lambda": 0.10,
     "experts": {"0": [3, 5], "2": [1]}}       # 0-based global layer -> expert ids

The config's mode/lambda override the file's when given. Without a file the bias is
zero (useful to load a checkpoint that already holds one).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from megasmoe.config import ConfigError
from megasmoe.routers import functional as RF
from megasmoe.routers.base import MegasmoeRouter, RouterConfigBase
from megasmoe.routers.registry import register_router

__all__ = ["DomainSteerConfig", "DomainSteerRouter", "read_steering_file"]


@dataclass
class DomainSteerConfig(RouterConfigBase):
    """Fields of the ``domain_steer`` router (authors' defaults)."""

    file: Optional[str] = None
    """Steering file (JSON: mode, lambda, experts per layer); null = zero bias."""
    mode: Optional[str] = None
    """multiplicative (delta = log(1 + lambda)) or additive (delta = lambda); null = file's."""
    strength: Optional[float] = None
    """lambda; null = the file's (authors: 0.10)."""

    def validate(self, cfg) -> None:
        if self.file is not None:
            steering = read_steering_file(self.file, cfg.model.num_layers, cfg.moe.num_experts)
            self.mode = self.mode or steering["mode"]
            self.strength = self.strength if self.strength is not None else steering["lambda"]
        self.mode = self.mode or "multiplicative"
        self.strength = 0.10 if self.strength is None else self.strength
        if self.mode not in ("multiplicative", "additive"):
            raise ConfigError(f"moe.router.mode='{self.mode}'; use multiplicative or additive")


def read_steering_file(path: str, num_layers: int, num_experts: int) -> dict:
    """Read and check a steering file; ConfigError naming the problem otherwise."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"moe.router.file='{path}': cannot read steering JSON ({e})") from None
    experts = {}
    for layer, ids in data.get("experts", {}).items():
        layer = int(layer)
        if not 0 <= layer < num_layers or any(not 0 <= i < num_experts for i in ids):
            raise ConfigError(f"moe.router.file='{path}': layer {layer} / experts {ids} out of "
                              f"range ({num_layers} layers, {num_experts} experts)")
        experts[layer] = [int(i) for i in ids]
    return {"mode": data.get("mode", "multiplicative"), "lambda": float(data.get("lambda", 0.1)),
            "experts": experts}


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
