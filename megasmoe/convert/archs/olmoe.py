"""OLMoE (``OlmoeForCausalLM``): recognised, and refused in both directions.

OLMoE's routing (top-k of softmax, ``norm_topk_prob`` false) is megatron's
pre_softmax=true, but every OLMoE attention applies ``q_norm`` and ``k_norm``: RMSNorms
over the whole query / key projection (all heads at once), with no config flag to turn
them off. megasmoe's attention has no q/k norm, and megatron's ``qk_layernorm`` norms
each head separately, which is a different function. So an OLMoE checkpoint cannot be
imported exactly, and a megasmoe model is written as Qwen2-MoE (norm_topk_prob false)
instead of OLMoE.
"""

from __future__ import annotations

from megasmoe.convert.archs.base import Arch, ImportedModel, Tensors
from megasmoe.convert.errors import ConversionError

__all__ = ["Olmoe"]


class Olmoe(Arch):
    """OLMoE: import refused (q_norm/k_norm), never an export target."""

    name = "olmoe"
    model_type = "olmoe"
    architecture = "OlmoeForCausalLM"
    config_class = "OlmoeConfig"

    def unsupported(self, shape, routing, extra):
        return ("q_norm/k_norm are always on in OLMoE and megasmoe has no q/k norm "
                "(use qwen2_moe with norm_topk_prob=false)")

    def import_checkpoint(self, cfg: dict, hf: Tensors) -> ImportedModel:
        raise ConversionError(
            "olmoe: self_attn.q_norm/k_norm (RMSNorm over all query/key heads, always on in "
            "OLMoE) have no counterpart in megasmoe's attention, so the import would change "
            "the model; megasmoe needs a full-width q/k norm (see docs/conversion.md)")
