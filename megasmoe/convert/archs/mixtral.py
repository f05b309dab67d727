"""Mixtral (``MixtralForCausalLM``): softmax over the top-k logits, all layers MoE.

Routing: softmax over all experts, top-k, renormalised: the same choice and weights as
megatron's pre_softmax=false (softmax over the k selected logits). No shared expert,
no dense layers, no biases. A routing scaling factor is folded into the experts' down
projections (exact up to one rounding).
"""

from __future__ import annotations

from typing import Optional

from megasmoe.convert.archs.base import (Arch, ImportedModel, Tensors, common_model_overrides,
                                         plain_moe_unsupported)
from megasmoe.convert.archs.checks import check_common, require
from megasmoe.convert.megatron_layout import ModelShape
from megasmoe.convert.routers import Routing

__all__ = ["Mixtral"]

_EXPERT_NAMES = ("w1", "w3", "w2")  # gate, up, down


class Mixtral(Arch):
    """Mixtral as a conversion target and source."""

    name = "mixtral"
    model_type = "mixtral"
    architecture = "MixtralForCausalLM"
    config_class = "MixtralConfig"

    def unsupported(self, shape: ModelShape, routing: Routing, extra: dict) -> Optional[str]:
        if routing.score_function == "softmax" and not routing.normalize:
            return ("moe.router.pre_softmax=true (Mixtral renormalises the top-k "
                    "probabilities)")
        return plain_moe_unsupported("Mixtral", shape, routing)

    def hf_config(self, shape: ModelShape, routing: Routing, extra: dict) -> dict:
        return dict(
            **self.llama_config(shape, shape.moe_ffn_hidden_size),
            sliding_window=None, num_experts_per_tok=routing.topk,
            num_local_experts=shape.num_experts, router_jitter_noise=0.0,
            router_aux_loss_coef=extra.get("aux_loss_coeff", 0.0),
        )

    def export(self, canon: Tensors, shape: ModelShape, routing: Routing, extra: dict) -> dict:
        out: dict = {}
        self.export_common(canon, shape, out)
        for i in range(shape.num_layers):
            p = f"model.layers.{i}.block_sparse_moe"
            out[f"{p}.gate.weight"] = canon.take(f"layers.{i}.gate.weight")
            self.export_experts(canon, i, shape.num_experts, p, _EXPERT_NAMES, out,
                                down_scale=routing.scaling)
        return out

    def import_checkpoint(self, cfg: dict, hf: Tensors) -> ImportedModel:
        check_common(cfg)
        require(cfg.get("sliding_window") is None, "sliding_window",
                f"{cfg.get('sliding_window')}: megasmoe attends to the whole sequence")
        L, E = cfg["num_hidden_layers"], cfg["num_local_experts"]
        model = common_model_overrides(cfg, cfg["hidden_size"], cfg["num_attention_heads"])
        canonical: dict = {}
        self.import_common(hf, L, model["share_embeddings"], canonical)
        for i in range(L):
            p = f"model.layers.{i}.block_sparse_moe"
            canonical[f"layers.{i}.router.weight"] = hf.take(f"{p}.gate.weight")
            self.import_experts(hf, i, E, p, _EXPERT_NAMES, canonical)
        moe = {"num_experts": E, "topk": cfg["num_experts_per_tok"],
               "ffn_hidden_size": cfg["intermediate_size"], "layer_freq": 1,
               "shared_expert_size": 0, "aux_loss_coeff": cfg.get("router_aux_loss_coef", 0.01),
               "router": {"name": "topk", "score_function": "softmax", "pre_softmax": False}}
        return ImportedModel({"model": model, "moe": moe}, canonical)
