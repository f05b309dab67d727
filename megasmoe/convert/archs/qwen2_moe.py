"""Qwen2-MoE (``Qwen2MoeForCausalLM``): either softmax rule, shared expert, dense layers.

Routing: softmax over all experts, top-k, renormalised when ``norm_topk_prob`` (=
megatron pre_softmax=false) or not (= pre_softmax=true). Dense layers are listed in
``mlp_only_layers``. Qwen2-MoE parts a megasmoe model may lack are written so that
they act as identities, exactly:

- q/k/v biases (``qkv_bias``, on by default and expected by other Qwen2-MoE readers):
  written as zeros (x + 0 = x) unless the model has them (``model.qkv_bias``);
- the shared expert's sigmoid gate, for an ungated shared expert
  (``moe.shared_expert_gate=false``): the gate weight is written as zeros and the shared
  down projection doubled: sigmoid(0) (2 W) h = W h exactly (scaling by powers of two
  is exact in floating point). A megasmoe model without shared expert gets a
  zero-width one.

On import, nonzero q/k/v biases set ``model.qkv_bias=true`` (megatron's add_qkv_bias);
a nonzero shared-expert gate becomes ``moe.shared_expert_gate=true`` (megatron's sigmoid-gated
shared expert, the same function), and a gated megasmoe model exports its gate as is.
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
    export_qkv_biases,
    import_qkv_biases,
    layer_freq,
)
from megasmoe.convert.archs.checks import check_common, require
from megasmoe.convert.megatron_layout import ModelShape
from megasmoe.convert.routers import Routing

__all__ = ["Qwen2Moe", "moe_layer_ids", "qwen_config", "qwen_import_start", "qwen_moe_section"]


def moe_layer_ids(cfg: dict) -> list[bool]:
    """Qwen2-MoE's rule: layer i is sparse unless listed in mlp_only_layers, and when
    (i + 1) % decoder_sparse_step == 0."""
    step = cfg.get("decoder_sparse_step", 1) or 1
    dense = set(cfg.get("mlp_only_layers") or [])
    return [i not in dense and cfg["num_experts"] > 0 and (i + 1) % step == 0
            for i in range(cfg["num_hidden_layers"])]


def qwen_config(cfg: dict) -> dict:
    """An HF Qwen-MoE config with ``num_experts`` (transformers 5 writes Qwen3-MoE's
    as ``num_local_experts``; the Hub's configs say ``num_experts``)."""
    if "num_experts" not in cfg and "num_local_experts" in cfg:
        cfg = {**cfg, "num_experts": cfg["num_local_experts"]}
    return cfg


def qwen_import_start(cfg: dict) -> tuple[int, int, list[bool], dict]:
    """What Qwen2-MoE and Qwen3-MoE imports share: checks, (layers, experts, MoE-layer
    pattern, megasmoe model.* fields). ``cfg`` must have been through ``qwen_config``."""
    check_common(cfg)
    require(not cfg.get("use_sliding_window", False), "use_sliding_window",
            "true: megasmoe attends to the whole sequence")
    model = common_model_overrides(cfg, cfg["hidden_size"], cfg["num_attention_heads"])
    model["ffn_hidden_size"] = cfg["intermediate_size"]
    return cfg["num_hidden_layers"], cfg["num_experts"], moe_layer_ids(cfg), model


def qwen_moe_section(cfg: dict, pattern: list[bool], **extra) -> dict:
    """megasmoe moe.* fields of a Qwen-MoE config (softmax top-k, norm_topk_prob)."""
    return {"num_experts": cfg["num_experts"], "topk": cfg["num_experts_per_tok"],
            "ffn_hidden_size": cfg["moe_intermediate_size"], "layer_freq": layer_freq(pattern),
            "aux_loss_coeff": cfg.get("router_aux_loss_coef", 0.01), **extra,
            "router": {"name": "topk", "score_function": "softmax",
                       "pre_softmax": not cfg.get("norm_topk_prob", False)}}


class Qwen2Moe(Arch):
    """Qwen2-MoE as a conversion target and source."""

    name = "qwen2_moe"
    model_type = "qwen2_moe"
    architecture = "Qwen2MoeForCausalLM"
    config_class = "Qwen2MoeConfig"

    def unsupported(self, shape: ModelShape, routing: Routing, extra: dict) -> Optional[str]:
        if shape.qk_norm != "none":
            return f"model.qk_norm={shape.qk_norm} (Qwen2-MoE has no q/k norm)"
        if shape.rotary_percent != 1.0:
            return f"model.rotary_percent={shape.rotary_percent} (Qwen2-MoE rotates whole heads)"
        if routing.score_function != "softmax":
            return f"moe.router.score_function={routing.score_function} (Qwen2-MoE uses softmax)"
        if routing.selection_bias:
            return "the router's expert bias (Qwen2-MoE has none)"
        return None

    def hf_config(self, shape: ModelShape, routing: Routing, extra: dict) -> dict:
        return dict(
            **self.llama_config(shape, shape.ffn_hidden_size),
            use_sliding_window=False, max_window_layers=shape.num_layers,
            decoder_sparse_step=1, moe_intermediate_size=shape.moe_ffn_hidden_size,
            shared_expert_intermediate_size=shape.shared_expert_size,
            num_experts_per_tok=routing.topk, num_experts=shape.num_experts,
            norm_topk_prob=routing.normalize,
            mlp_only_layers=[i for i, moe in enumerate(shape.moe_layers) if not moe],
            qkv_bias=True, router_aux_loss_coef=extra.get("aux_loss_coeff", 0.0),
        )

    def export(self, canon: Tensors, shape: ModelShape, routing: Routing, extra: dict) -> dict:
        out: dict = {}
        self.export_common(canon, shape, out)
        H, S = shape.hidden_size, shape.shared_expert_size
        for i in range(shape.num_layers):
            p = f"model.layers.{i}"
            dtype = out[f"{p}.self_attn.q_proj.weight"].dtype
            export_qkv_biases(canon, shape, i, out)
            if not shape.moe_layers[i]:
                for c, h in self.mlp(f"layers.{i}.mlp", f"{p}.mlp"):
                    out[h] = canon.take(c)
                continue
            out[f"{p}.mlp.gate.weight"] = canon.take(f"layers.{i}.gate.weight")
            self.export_experts(canon, i, shape.num_experts, f"{p}.mlp", SWIGLU_NAMES, out,
                                down_scale=routing.scaling)
            sp = f"{p}.mlp.shared_expert"
            if S:
                out[f"{sp}.gate_proj.weight"] = canon.take(f"layers.{i}.shared.gate")
                out[f"{sp}.up_proj.weight"] = canon.take(f"layers.{i}.shared.up")
                down = canon.take(f"layers.{i}.shared.down")
                gate = canon.get(f"layers.{i}.shared.gate_weight")
                if gate is None:  # ungated: sigmoid(0) * (2 W) = W, exactly
                    gate, down = torch.zeros(1, H, dtype=down.dtype), down * 2
                out[f"{sp}.down_proj.weight"] = down
                out[f"{p}.mlp.shared_expert_gate.weight"] = gate
            else:
                out[f"{sp}.gate_proj.weight"] = torch.zeros(0, H, dtype=dtype)
                out[f"{sp}.up_proj.weight"] = torch.zeros(0, H, dtype=dtype)
                out[f"{sp}.down_proj.weight"] = torch.zeros(H, 0, dtype=dtype)
                out[f"{p}.mlp.shared_expert_gate.weight"] = torch.zeros(1, H, dtype=dtype)
        return out

    def import_checkpoint(self, cfg: dict, hf: Tensors) -> ImportedModel:
        cfg = qwen_config(cfg)
        L, E, pattern, model = qwen_import_start(cfg)
        S = cfg.get("shared_expert_intermediate_size", 0) or 0
        # A gate that is zero everywhere (megasmoe's own ungated exports) imports ungated;
        # any nonzero gate (Qwen's checkpoints) makes megasmoe's shared expert gated.
        gated = bool(S) and any(
            bool(hf.tensors[f"model.layers.{i}.mlp.shared_expert_gate.weight"].abs().max() != 0)
            for i in range(L) if pattern[i])
        canonical: dict = {}
        self.import_common(hf, L, model["share_embeddings"], canonical)
        model["qkv_bias"] = import_qkv_biases(hf, L, cfg.get("qkv_bias", True), canonical)
        for i in range(L):
            p = f"model.layers.{i}"
            if not pattern[i]:
                for c, h in self.mlp(f"layers.{i}.mlp", f"{p}.mlp"):
                    canonical[c] = hf.take(h)
                continue
            canonical[f"layers.{i}.router.weight"] = hf.take(f"{p}.mlp.gate.weight")
            self.import_experts(hf, i, E, f"{p}.mlp", SWIGLU_NAMES, canonical)
            sp = f"{p}.mlp.shared_expert"
            gate = hf.take(f"{p}.mlp.shared_expert_gate.weight")
            if S:
                canonical[f"layers.{i}.shared.gate"] = hf.take(f"{sp}.gate_proj.weight")
                canonical[f"layers.{i}.shared.up"] = hf.take(f"{sp}.up_proj.weight")
                down = hf.take(f"{sp}.down_proj.weight")
                if gated:
                    canonical[f"layers.{i}.shared.gate_weight"] = gate
                    canonical[f"layers.{i}.shared.down"] = down
                else:  # sigmoid(0) = 1/2 exactly: the ungated expert is W / 2, exactly
                    canonical[f"layers.{i}.shared.down"] = down / 2
            else:
                for n in SWIGLU_NAMES:
                    hf.get(f"{sp}.{n}.weight")  # zero-width: nothing to carry over
        moe = qwen_moe_section(cfg, pattern, shared_expert_size=S, shared_expert_gate=gated)
        return ImportedModel({"model": model, "moe": moe}, canonical)
