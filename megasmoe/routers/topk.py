"""``topk``: the standard softmax (or sigmoid) top-k router, megatron-core semantics.

SMoE baseline (Shazeer et al. 2017; Fedus et al. 2022, Switch Transformer): logits
g = W_r x; top-k of the scores; probabilities softmax over the k selected logits
(``pre_softmax=false``, Mixtral) or the top-k of softmax over all experts
(``pre_softmax=true``). Load-balancing (aux_loss, seq_aux_loss, global_aux_loss) and
z-loss come from megatron-core's TopKRouter and are configured under ``moe.*``.
The balance losses follow ``moe.aux_loss_normalization`` (routers/base.py): megatron's
normalisation by default (1 at uniform load), the papers' (1/k, i.e. moe.aux_loss_coeff
divided by k) with ``paper``, as every other router's.
"""

from __future__ import annotations


from megasmoe.routers.base import MegasmoeRouter
from megasmoe.routers.options import TopKConfig
from megasmoe.routers.registry import register_router

__all__ = ["TopKConfig", "TopKSoftmaxRouter"]


@register_router("topk", TopKConfig)
class TopKSoftmaxRouter(MegasmoeRouter):
    """Softmax top-k router with megatron-core's aux losses (the SMoE baseline)."""

    def __init__(self, config, pg_collection=None, router_config=None, **kwargs):
        super().__init__(config, pg_collection, router_config, **kwargs)
        self.mark_sequence_parallel()
