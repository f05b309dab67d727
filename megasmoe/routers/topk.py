"""``topk``: the standard softmax (or sigmoid) top-k router, megatron-core semantics.

SMoE baseline (Shazeer et al. 2017; Fedus et al. 2022, Switch Transformer): logits
g = W_r x; top-k of the scores; probabilities softmax over the k selected logits
(``pre_softmax=false``, Mixtral) or the top-k of softmax over all experts
(``pre_softmax=true``). Load-balancing (aux_loss, seq_aux_loss, global_aux_loss) and
z-loss come from megatron-core's TopKRouter and are configured under ``moe.*``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megasmoe.config import ConfigError
from megasmoe.routers.base import MegasmoeRouter, RouterConfigBase
from megasmoe.routers.registry import register_router

__all__ = ["TopKConfig", "TopKSoftmaxRouter"]


@dataclass
class TopKConfig(RouterConfigBase):
    """Fields of the ``topk`` router."""

    score_function: str = "softmax"
    """softmax or sigmoid scores."""
    pre_softmax: bool = False
    """true: top-k of softmax over all experts; false: softmax over the top-k logits."""
    topk_scaling_factor: Optional[float] = None
    """Multiply the selected probabilities by this factor; null = 1."""

    def transformer_config_overrides(self) -> dict:
        return {
            "moe_router_score_function": self.score_function,
            "moe_router_pre_softmax": self.pre_softmax,
            "moe_router_topk_scaling_factor": self.topk_scaling_factor,
        }

    def validate(self, cfg) -> None:
        if self.score_function not in ("softmax", "sigmoid"):
            raise ConfigError(
                f"moe.router.score_function='{self.score_function}' is unknown; use softmax or sigmoid"
            )


@register_router("topk", TopKConfig)
class TopKSoftmaxRouter(MegasmoeRouter):
    """Softmax top-k router with megatron-core's aux losses (the SMoE baseline)."""

    def __init__(self, config, pg_collection=None, router_config=None, **kwargs):
        super().__init__(config, pg_collection, router_config, **kwargs)
        self.mark_sequence_parallel()
