"""megasmoe's own Hugging Face architecture (``MegasmoeMoeForCausalLM``, remote code).

Used only with ``--remote-code``: first for a per-expert bias on the router logits
(HyperRouter's generated b, DSMoE's steering bias; exact in every dtype, where GPT-OSS
adds 1 to its up projection), last otherwise. It holds that bias together with
everything the standard targets hold (softmax top-k either way, scaling, a gated or
ungated shared expert, dense layers, GQA, a head width of its own, q/k/v biases,
per-head or full-width q/k norms), so also combinations none of them holds.
Its modeling file, ``megasmoe/convert/modeling_megasmoe.py``, is copied into the export
and named in config.json's ``auto_map``; readers load it with ``trust_remote_code=True``.
Never an import source.
"""

from __future__ import annotations

from typing import Optional

from megasmoe.convert.archs.base import (SWIGLU_NAMES, Arch, ImportedModel, Tensors,
                                         export_qk_norms, export_qkv_biases)
from megasmoe.convert.errors import ConversionError
from megasmoe.convert.megatron_layout import ModelShape
from megasmoe.convert.routers import Routing

__all__ = ["MegasmoeRemote", "MODELING_FILE"]

MODELING_FILE = "modeling_megasmoe.py"


class MegasmoeRemote(Arch):
    """megasmoe's remote-code architecture (export only)."""

    name = "megasmoe_moe"
    model_type = "megasmoe_moe"
    architecture = "MegasmoeMoeForCausalLM"
    config_class = "MegasmoeMoeConfig"
    remote_code = True
    router_bias = True
    reader_note = ("megasmoe's own architecture: load with trust_remote_code=True (its "
                   "modeling file is in the directory); no KV cache in generate")

    def config_cls(self):
        from megasmoe.convert.modeling_megasmoe import MegasmoeMoeConfig

        return MegasmoeMoeConfig

    def unsupported(self, shape: ModelShape, routing: Routing, extra: dict) -> Optional[str]:
        if routing.score_function != "softmax":
            return f"moe.router.score_function={routing.score_function} (softmax only)"
        if routing.selection_bias:
            return "the router's expert selection bias"
        return None

    def hf_config(self, shape: ModelShape, routing: Routing, extra: dict) -> dict:
        module = MODELING_FILE.removesuffix(".py")
        return dict(
            vocab_size=shape.vocab_size, hidden_size=shape.hidden_size,
            num_hidden_layers=shape.num_layers, num_attention_heads=shape.num_heads,
            num_key_value_heads=shape.num_query_groups, head_dim=shape.head_dim,
            intermediate_size=shape.ffn_hidden_size,
            moe_intermediate_size=shape.moe_ffn_hidden_size,
            shared_expert_intermediate_size=shape.shared_expert_size,
            shared_expert_gate=bool(extra.get("shared_expert_gate")),
            mlp_only_layers=[i for i, moe in enumerate(shape.moe_layers) if not moe],
            num_experts=shape.num_experts, num_experts_per_tok=routing.topk,
            norm_topk_prob=routing.normalize, routed_scaling_factor=routing.scaling,
            router_bias=bool(extra.get("logit_bias")), qk_norm=shape.qk_norm,
            attention_bias=shape.qkv_bias,
            rms_norm_eps=shape.norm_eps, rope_theta=float(shape.rope_base),
            partial_rotary_factor=shape.rotary_percent,
            max_position_embeddings=shape.seq_length, tie_word_embeddings=shape.tied,
            auto_map={"AutoConfig": f"{module}.MegasmoeMoeConfig",
                      "AutoModelForCausalLM": f"{module}.MegasmoeMoeForCausalLM"},
        )

    def export(self, canon: Tensors, shape: ModelShape, routing: Routing, extra: dict) -> dict:
        out: dict = {}
        self.export_common(canon, shape, out)
        for i in range(shape.num_layers):
            p = f"model.layers.{i}"
            if shape.qk_norm != "none":
                export_qk_norms(canon, i, out)
            if shape.qkv_bias:
                export_qkv_biases(canon, shape, i, out)
            if not shape.moe_layers[i]:
                for c, h in self.mlp(f"layers.{i}.mlp", f"{p}.mlp"):
                    out[h] = canon.take(c)
                continue
            weight = canon.take(f"layers.{i}.gate.weight")
            out[f"{p}.mlp.gate.weight"] = weight
            if extra.get("logit_bias"):
                bias = canon.get(f"layers.{i}.gate.bias")
                out[f"{p}.mlp.gate.bias"] = (bias if bias is not None
                                             else weight.new_zeros(weight.shape[0]))
            self.export_experts(canon, i, shape.num_experts, f"{p}.mlp", SWIGLU_NAMES, out)
            if shape.shared_expert_size:
                for c, h in self.mlp(f"layers.{i}.shared", f"{p}.mlp.shared_expert"):
                    out[h] = canon.take(c)
                if extra.get("shared_expert_gate"):
                    out[f"{p}.mlp.shared_expert_gate.weight"] = canon.take(
                        f"layers.{i}.shared.gate_weight")
        return out

    def import_checkpoint(self, cfg: dict, hf: Tensors) -> ImportedModel:
        raise ConversionError("megasmoe_moe exports are megasmoe runs already: resume the run "
                              "they came from instead of importing them")
