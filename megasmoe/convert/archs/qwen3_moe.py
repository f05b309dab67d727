"""Qwen3-MoE (``Qwen3MoeForCausalLM``): per-head q/k norms, softmax top-k, dense layers.

Attention normalises each query and key head on its own (``q_norm`` / ``k_norm`` of
width head_dim) before RoPE: megatron's ``qk_layernorm``, megasmoe's
``model.qk_norm=head``. ``head_dim`` may differ from hidden_size / num_heads
(``model.head_dim``). Routing: softmax over all experts, top-k, renormalised with
``norm_topk_prob`` (megatron pre_softmax=false) or not (pre_softmax=true). Dense layers
are listed in ``mlp_only_layers``; no shared expert. ``attention_bias`` (on q/k/v *and*
o) is refused on import unless all zero; sliding windows are refused. A routing scaling
factor is folded into the experts' down projections.
"""

from __future__ import annotations

from typing import Optional

from megasmoe.convert.archs.base import (SWIGLU_NAMES, Arch, ImportedModel, Tensors,
                                         export_qk_norms, import_qk_norms,
                                         plain_moe_unsupported, require_zero)
from megasmoe.convert.archs.qwen2_moe import qwen_config, qwen_import_start, qwen_moe_section
from megasmoe.convert.megatron_layout import ModelShape
from megasmoe.convert.routers import Routing

__all__ = ["Qwen3Moe"]


class Qwen3Moe(Arch):
    """Qwen3-MoE as a conversion target (models with model.qk_norm=head) and source."""

    name = "qwen3_moe"
    model_type = "qwen3_moe"
    architecture = "Qwen3MoeForCausalLM"
    config_class = "Qwen3MoeConfig"

    def unsupported(self, shape: ModelShape, routing: Routing, extra: dict) -> Optional[str]:
        # model.qkv_bias is refused too: Qwen3-MoE's attention_bias also biases o_proj.
        return plain_moe_unsupported("Qwen3-MoE", shape, routing, accepted_qk_norm=("head",),
                                     dense_layers=True)

    def hf_config(self, shape: ModelShape, routing: Routing, extra: dict) -> dict:
        return dict(
            **self.llama_config(shape, shape.ffn_hidden_size),
            attention_bias=False, use_sliding_window=False, sliding_window=None,
            decoder_sparse_step=1, moe_intermediate_size=shape.moe_ffn_hidden_size,
            num_experts_per_tok=routing.topk, num_experts=shape.num_experts,
            norm_topk_prob=routing.normalize,
            mlp_only_layers=[i for i, moe in enumerate(shape.moe_layers) if not moe],
            router_aux_loss_coef=extra.get("aux_loss_coeff", 0.0),
        )

    def export(self, canon: Tensors, shape: ModelShape, routing: Routing, extra: dict) -> dict:
        out: dict = {}
        self.export_common(canon, shape, out)
        for i in range(shape.num_layers):
            p = f"model.layers.{i}"
            export_qk_norms(canon, i, out)
            if not shape.moe_layers[i]:
                for c, h in self.mlp(f"layers.{i}.mlp", f"{p}.mlp"):
                    out[h] = canon.take(c)
                continue
            out[f"{p}.mlp.gate.weight"] = canon.take(f"layers.{i}.gate.weight")
            self.export_experts(canon, i, shape.num_experts, f"{p}.mlp", SWIGLU_NAMES, out,
                                down_scale=routing.scaling)
        return out

    def import_checkpoint(self, cfg: dict, hf: Tensors) -> ImportedModel:
        cfg = qwen_config(cfg)
        L, E, pattern, model = qwen_import_start(cfg)
        model["qk_norm"] = "head"
        canonical: dict = {}
        self.import_common(hf, L, model["share_embeddings"], canonical)
        for i in range(L):
            p = f"model.layers.{i}"
            if cfg.get("attention_bias", False):
                for proj in ("q", "k", "v", "o"):
                    require_zero(hf, f"{p}.self_attn.{proj}_proj.bias",
                                 "megasmoe's attention has no o_proj bias (q/k/v: Qwen2-MoE)")
            import_qk_norms(hf, i, canonical)
            if not pattern[i]:
                for c, h in self.mlp(f"layers.{i}.mlp", f"{p}.mlp"):
                    canonical[c] = hf.take(h)
                continue
            canonical[f"layers.{i}.router.weight"] = hf.take(f"{p}.mlp.gate.weight")
            self.import_experts(hf, i, E, f"{p}.mlp", SWIGLU_NAMES, canonical)
        moe = qwen_moe_section(cfg, pattern, shared_expert_size=0)
        return ImportedModel({"model": model, "moe": moe}, canonical)
