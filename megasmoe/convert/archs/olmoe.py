"""OLMoE (``OlmoeForCausalLM``): softmax top-k, all layers MoE, full-width q/k norms.

Routing: softmax over all experts, top-k, renormalised only with ``norm_topk_prob``
(megatron pre_softmax=false; OLMoE's default ``norm_topk_prob=false`` is
pre_softmax=true). Every OLMoE attention applies ``q_norm`` and ``k_norm``: RMSNorms
over the whole query / key projection (all heads at once), which is megasmoe's
``model.qk_norm=full`` (megatron's own ``qk_layernorm`` normalises each head, a
different function). So a model exports to OLMoE exactly when it has full-width q/k
norms, and OLMoE imports with ``model.qk_norm=full``. No shared expert, no dense
layers, no biases; ``clip_qkv`` (clamping q/k/v) is refused on import. A routing
scaling factor is folded into the experts' down projections, as for Mixtral.
"""

from __future__ import annotations

from typing import Optional

from megasmoe.convert.archs.base import (SWIGLU_NAMES, Arch, ImportedModel, Tensors,
                                         common_model_overrides, export_qk_norms,
                                         import_qk_norms, plain_moe_unsupported)
from megasmoe.convert.archs.checks import check_common, require
from megasmoe.convert.megatron_layout import ModelShape
from megasmoe.convert.routers import Routing

__all__ = ["Olmoe"]


class Olmoe(Arch):
    """OLMoE as a conversion target (models with model.qk_norm=full) and source."""

    name = "olmoe"
    model_type = "olmoe"
    architecture = "OlmoeForCausalLM"
    config_class = "OlmoeConfig"

    def unsupported(self, shape: ModelShape, routing: Routing, extra: dict) -> Optional[str]:
        if shape.head_dim * shape.num_heads != shape.hidden_size:
            return (f"model.head_dim={shape.head_dim} (OLMoE's q norm spans hidden_size: "
                    f"head_dim = hidden_size / num_heads)")
        return plain_moe_unsupported("OLMoE", shape, routing, accepted_qk_norm=("full",))

    def hf_config(self, shape: ModelShape, routing: Routing, extra: dict) -> dict:
        config = self.llama_config(shape, shape.moe_ffn_hidden_size)
        del config["head_dim"]  # OLMoE has none: hidden_size / num_heads (checked above)
        return dict(
            **config, attention_bias=False, clip_qkv=None,
            num_experts_per_tok=routing.topk, num_experts=shape.num_experts,
            norm_topk_prob=routing.normalize,
            router_aux_loss_coef=extra.get("aux_loss_coeff", 0.0),
        )

    def export(self, canon: Tensors, shape: ModelShape, routing: Routing, extra: dict) -> dict:
        out: dict = {}
        self.export_common(canon, shape, out)
        for i in range(shape.num_layers):
            p = f"model.layers.{i}"
            export_qk_norms(canon, i, out)
            out[f"{p}.mlp.gate.weight"] = canon.take(f"layers.{i}.gate.weight")
            self.export_experts(canon, i, shape.num_experts, f"{p}.mlp", SWIGLU_NAMES, out,
                                down_scale=routing.scaling)
        return out

    def import_checkpoint(self, cfg: dict, hf: Tensors) -> ImportedModel:
        check_common(cfg)
        require(cfg.get("clip_qkv") is None, "clip_qkv",
                f"{cfg.get('clip_qkv')}: megasmoe's attention does not clamp q/k/v")
        require(not cfg.get("attention_bias", False), "attention_bias",
                "true: megasmoe's attention has no bias")
        L, E = cfg["num_hidden_layers"], cfg["num_experts"]
        model = common_model_overrides(cfg, cfg["hidden_size"], cfg["num_attention_heads"])
        model["qk_norm"] = "full"
        canonical: dict = {}
        self.import_common(hf, L, model["share_embeddings"], canonical)
        for i in range(L):
            p = f"model.layers.{i}"
            import_qk_norms(hf, i, canonical)
            canonical[f"layers.{i}.router.weight"] = hf.take(f"{p}.mlp.gate.weight")
            self.import_experts(hf, i, E, f"{p}.mlp", SWIGLU_NAMES, canonical)
        moe = {"num_experts": E, "topk": cfg["num_experts_per_tok"],
               "ffn_hidden_size": cfg["intermediate_size"], "layer_freq": 1,
               "shared_expert_size": 0, "aux_loss_coeff": cfg.get("router_aux_loss_coef", 0.01),
               "router": {"name": "topk", "score_function": "softmax",
                          "pre_softmax": not cfg.get("norm_topk_prob", False)}}
        return ImportedModel({"model": model, "moe": moe}, canonical)
