"""GLM4-MoE (``Glm4MoeForCausalLM``): sigmoid routing, the target of sigmoid routers.

Routing: sigmoid scores, top-k of scores + ``e_score_correction_bias`` (selection
only), the selected scores renormalised (+1e-20, like megatron) when
``norm_topk_prob``, times ``routed_scaling_factor``: megatron's sigmoid routing with
expert bias (``sigmoid_bias``) or without (``topk`` with score_function=sigmoid, bias
written as zeros), with one expert group (n_group = topk_group = 1). Written with
partial_rotary_factor = model.rotary_percent (both rotate the first dimensions of each
head), attention_bias = model.qkv_bias (GLM4-MoE's bias is on q/k/v only) and
``use_qk_norm`` exactly when the model has per-head q/k norms (model.qk_norm=head). Dense layers must come first (``first_k_dense_replace``); the shared expert has
no gate and a width of n_shared_experts x moe_intermediate_size.
"""

from __future__ import annotations

from typing import Optional

import torch

from megasmoe.convert.archs.base import (
    SWIGLU_NAMES,
    Arch,
    ImportedModel,
    Tensors,
    common_model_overrides,
    export_qk_norms,
    export_qkv_biases,
    import_qk_norms,
    import_qkv_biases,
    layer_freq,
)
from megasmoe.convert.archs.checks import check_common, require
from megasmoe.convert.megatron_layout import ModelShape
from megasmoe.convert.routers import Routing

__all__ = ["Glm4Moe"]


class Glm4Moe(Arch):
    """GLM4-MoE as a conversion target and source."""

    name = "glm4_moe"
    model_type = "glm4_moe"
    architecture = "Glm4MoeForCausalLM"
    config_class = "Glm4MoeConfig"

    @staticmethod
    def _dense_prefix(shape: ModelShape) -> Optional[int]:
        k = next((i for i, moe in enumerate(shape.moe_layers) if moe), shape.num_layers)
        return k if all(shape.moe_layers[k:]) else None

    def unsupported(self, shape: ModelShape, routing: Routing, extra: dict) -> Optional[str]:
        if shape.qk_norm == "full":
            return "model.qk_norm=full (GLM4-MoE's q/k norms are per head: use_qk_norm)"
        if routing.score_function != "sigmoid":
            return f"moe.router.score_function={routing.score_function} (GLM4-MoE uses sigmoid)"
        if routing.normalize != (routing.topk > 1):
            return "sigmoid scores without renormalisation"
        if self._dense_prefix(shape) is None:
            return "moe.layer_freq puts dense layers after MoE layers (GLM4-MoE's come first)"
        if shape.shared_expert_size % shape.moe_ffn_hidden_size:
            return (f"moe.shared_expert_size={shape.shared_expert_size} is not a multiple of "
                    f"moe.ffn_hidden_size={shape.moe_ffn_hidden_size}")
        if extra.get("shared_expert_gate"):
            return "the shared expert's gate (GLM4-MoE has none)"
        return None

    def hf_config(self, shape: ModelShape, routing: Routing, extra: dict) -> dict:
        config = self.llama_config(shape, shape.ffn_hidden_size)
        config["rope_parameters"]["partial_rotary_factor"] = shape.rotary_percent
        return dict(
            **config,
            attention_bias=shape.qkv_bias, use_qk_norm=shape.qk_norm == "head",
            moe_intermediate_size=shape.moe_ffn_hidden_size,
            n_shared_experts=shape.shared_expert_size // shape.moe_ffn_hidden_size,
            n_routed_experts=shape.num_experts, num_experts_per_tok=routing.topk,
            routed_scaling_factor=routing.scaling or 1.0, n_group=1, topk_group=1,
            first_k_dense_replace=self._dense_prefix(shape), norm_topk_prob=routing.normalize,
            num_mtp_layers=0,
        )

    def export(self, canon: Tensors, shape: ModelShape, routing: Routing, extra: dict) -> dict:
        out: dict = {}
        self.export_common(canon, shape, out)
        for i in range(shape.num_layers):
            if shape.qkv_bias:
                export_qkv_biases(canon, shape, i, out)
            if shape.qk_norm == "head":
                export_qk_norms(canon, i, out)
            p = f"model.layers.{i}.mlp"
            if not shape.moe_layers[i]:
                for c, h in self.mlp(f"layers.{i}.mlp", p):
                    out[h] = canon.take(c)
                continue
            out[f"{p}.gate.weight"] = canon.take(f"layers.{i}.gate.weight")
            bias = canon.get(f"layers.{i}.gate.selection_bias")
            out[f"{p}.gate.e_score_correction_bias"] = (
                torch.zeros(shape.num_experts) if bias is None else bias.float())
            self.export_experts(canon, i, shape.num_experts, p, SWIGLU_NAMES, out)
            H, S = shape.hidden_size, shape.shared_expert_size
            dtype = out[f"{p}.gate.weight"].dtype
            for part, name in zip(("gate", "up", "down"), SWIGLU_NAMES):
                t = canon.get(f"layers.{i}.shared.{part}") if S else None
                if t is None:  # zero-width shared expert (n_shared_experts = 0)
                    t = torch.zeros((H, 0) if part == "down" else (0, H), dtype=dtype)
                out[f"{p}.shared_experts.{name}.weight"] = t
        return out

    def import_checkpoint(self, cfg: dict, hf: Tensors) -> ImportedModel:
        check_common(cfg)
        groups, topk_group = cfg.get("n_group", 1), cfg.get("topk_group", 1)
        require(groups == topk_group, "n_group/topk_group",
                f"{groups}/{topk_group} limits routing to expert groups; megasmoe routes over "
                f"all experts")
        L, E, k = cfg["num_hidden_layers"], cfg["n_routed_experts"], cfg["num_experts_per_tok"]
        require(bool(cfg.get("norm_topk_prob", True)) == (k > 1), "norm_topk_prob",
                "megatron renormalises sigmoid scores exactly when num_experts_per_tok > 1")
        first_dense = cfg.get("first_k_dense_replace", 0)
        pattern = [i >= first_dense for i in range(L)]
        model = common_model_overrides(cfg, cfg["hidden_size"], cfg["num_attention_heads"],
                                       allow_partial_rope=True)
        qk_norm = bool(cfg.get("use_qk_norm", False))  # per head: megatron's qk_layernorm
        if qk_norm:
            model["qk_norm"] = "head"
        model["ffn_hidden_size"] = cfg["intermediate_size"]
        I = cfg["moe_intermediate_size"]
        S = I * (cfg.get("n_shared_experts") or 0)
        canonical: dict = {}
        self.import_common(hf, L, model["share_embeddings"], canonical)
        biases = []
        model["qkv_bias"] = import_qkv_biases(hf, L, cfg.get("attention_bias", False),
                                              canonical)
        for i in range(L):
            p = f"model.layers.{i}"
            if qk_norm:
                import_qk_norms(hf, i, canonical)
            if not pattern[i]:
                for c, h in self.mlp(f"layers.{i}.mlp", f"{p}.mlp"):
                    canonical[c] = hf.take(h)
                continue
            canonical[f"layers.{i}.router.weight"] = hf.take(f"{p}.mlp.gate.weight")
            bias = hf.take(f"{p}.mlp.gate.e_score_correction_bias").float()
            biases.append((i, bias))
            self.import_experts(hf, i, E, f"{p}.mlp", SWIGLU_NAMES, canonical)
            for part, name in zip(("gate", "up", "down"), SWIGLU_NAMES):
                t = hf.take(f"{p}.mlp.shared_experts.{name}.weight")
                if S:
                    canonical[f"layers.{i}.shared.{part}"] = t
        with_bias = any(bool(b.abs().max() != 0) for _, b in biases)
        scaling = cfg.get("routed_scaling_factor", 1.0)
        if with_bias:
            router = {"name": "sigmoid_bias"}
            for i, b in biases:
                canonical[f"layers.{i}.router.expert_bias"] = b
        else:
            router = {"name": "topk", "score_function": "sigmoid"}
        if scaling != 1.0:
            router["topk_scaling_factor"] = float(scaling)
        moe = {"num_experts": E, "topk": k, "ffn_hidden_size": I,
               "layer_freq": layer_freq(pattern), "shared_expert_size": S, "router": router}
        return ImportedModel({"model": model, "moe": moe}, canonical)
