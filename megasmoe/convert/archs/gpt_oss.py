"""GPT-OSS (``GptOssForCausalLM``) as an export target: the one architecture transformers
ships whose router adds a bias to its logits (HyperRouter's generated b, DSMoE's
steering bias), so those routers export without remote code.

GPT-OSS routes with a softmax over the top-k of ``W x + b``: megatron's
pre_softmax=false. Its other parts differ from megasmoe's, and each difference is made
inert; every weight is the checkpoint's, bit for bit:

- experts compute ``(clamp(up) + 1) * g sigmoid(alpha g)`` with ``g = clamp(gate)``:
  ``swiglu_alpha = 1`` makes that SiLU, ``swiglu_limit`` far above any activation makes
  the clamps do nothing, and the up bias is -1 (``(x W_up - 1) + 1``: one rounding at
  magnitude 1 in the compute dtype, ~6e-8 in fp32). gate/up are interleaved in
  ``gate_up_proj``; a routing scaling factor is folded into the down projections.
- attention sinks: one extra softmax column per head; storing the dtype's most negative
  value makes its exp exactly 0.
- alternating sliding-window layers: ``layer_types`` all ``full_attention`` (and the
  window as long as the training sequence).
- biases on q/k/v/o and the experts: megasmoe's q/k/v biases or zeros; o and experts zero.

Readers must honour ``swiglu_alpha`` and ``swiglu_limit`` (transformers does; a reader
that hard-codes GPT-OSS's 1.702 and 7.0 computes a different model: check it with
``megasmoe convert verify``, or use ``--remote-code``). Export only: GPT-OSS checkpoints
(clamped experts, trained sinks, sliding windows) are not models megasmoe can represent.
"""

from __future__ import annotations

from typing import Optional

import torch

from megasmoe.convert.archs.base import Arch, ImportedModel, Tensors, export_qkv_biases, \
    plain_moe_unsupported
from megasmoe.convert.errors import ConversionError
from megasmoe.convert.megatron_layout import ModelShape
from megasmoe.convert.routers import Routing

__all__ = ["GptOss", "SWIGLU_ALPHA", "NO_CLAMP"]

SWIGLU_ALPHA = 1.0
"""GPT-OSS's sigmoid gain (its own default is 1.702): 1 makes its activation SiLU."""
NO_CLAMP = 1e30
"""swiglu_limit: above any finite activation, so GPT-OSS's clamps never act."""


class GptOss(Arch):
    """GPT-OSS as an export target for routers with a logit bias."""

    name = "gpt_oss"
    model_type = "gpt_oss"
    architecture = "GptOssForCausalLM"
    config_class = "GptOssConfig"
    router_bias = True
    importable = False
    reader_note = ("GPT-OSS with its extras made inert (swiglu_alpha=1, swiglu_limit=1e30, "
                   "sinks at the dtype's minimum, every layer full attention): a reader must "
                   "honour swiglu_alpha and swiglu_limit (transformers does); check other "
                   "runtimes with `megasmoe convert verify`")

    def unsupported(self, shape: ModelShape, routing: Routing, extra: dict) -> Optional[str]:
        if routing.score_function == "softmax" and not routing.normalize:
            return ("moe.router.pre_softmax=true (GPT-OSS takes the softmax over the top-k "
                    "logits)")
        why = plain_moe_unsupported("GPT-OSS", shape, routing, qkv_bias=True)
        if why is None and not _honours_swiglu_fields():
            import transformers

            why = (f"transformers {transformers.__version__} hard-codes GPT-OSS's SwiGLU "
                   f"(no swiglu_alpha): upgrade transformers")
        return why

    def hf_config(self, shape: ModelShape, routing: Routing, extra: dict) -> dict:
        return dict(
            **self.llama_config(shape, shape.moe_ffn_hidden_size),
            num_local_experts=shape.num_experts, num_experts_per_tok=routing.topk,
            # Every layer attends fully; GPT-OSS still builds a sliding mask, and a window
            # of the training length keeps readers that ignore layer_types exact too.
            sliding_window=shape.seq_length,
            layer_types=["full_attention"] * shape.num_layers,
            swiglu_alpha=SWIGLU_ALPHA, swiglu_limit=NO_CLAMP, attention_bias=True,
            router_aux_loss_coef=extra.get("aux_loss_coeff", 0.0),
        )

    def export(self, canon: Tensors, shape: ModelShape, routing: Routing, extra: dict) -> dict:
        out: dict = {}
        self.export_common(canon, shape, out)
        for i in range(shape.num_layers):
            p = f"model.layers.{i}"
            export_qkv_biases(canon, shape, i, out)
            o = out[f"{p}.self_attn.o_proj.weight"]
            out[f"{p}.self_attn.o_proj.bias"] = o.new_zeros(o.shape[0])
            out[f"{p}.self_attn.sinks"] = o.new_full((shape.num_heads,),
                                                     torch.finfo(o.dtype).min)
            weight = canon.take(f"layers.{i}.gate.weight")
            bias = canon.get(f"layers.{i}.gate.bias")
            out[f"{p}.mlp.router.weight"] = weight
            out[f"{p}.mlp.router.bias"] = (bias if bias is not None
                                           else weight.new_zeros(weight.shape[0]))
            out.update(_experts(canon, i, f"{p}.mlp.experts", routing.scaling))
        return out

    def import_checkpoint(self, cfg: dict, hf: Tensors) -> ImportedModel:
        raise ConversionError("model_type='gpt_oss' is an export target only: GPT-OSS's "
                              "clamped SwiGLU experts, attention sinks and sliding-window "
                              "layers are not parts of megasmoe's model")


def _honours_swiglu_fields() -> bool:
    """The installed transformers reads GPT-OSS's swiglu_alpha (and swiglu_limit)."""
    try:
        from transformers import GptOssConfig
    except ImportError:  # a transformers older than GPT-OSS
        return False
    config = GptOssConfig()
    return hasattr(config, "swiglu_alpha") and hasattr(config, "swiglu_limit")


def _experts(canon: Tensors, i: int, prefix: str, scaling: Optional[float]) -> dict:
    """Layer i's experts in GPT-OSS's fused, transposed layout: [E, H, 2I] gate/up
    interleaved, [E, I, H] down, with biases (zero, the up bias -1)."""
    gate = canon.take(f"layers.{i}.experts.gate")  # [E, I, H]
    up = canon.take(f"layers.{i}.experts.up")
    down = canon.take(f"layers.{i}.experts.down")  # [E, H, I]
    dtype = gate.dtype
    E, I, H = gate.shape
    gate_up = torch.empty(E, H, 2 * I, dtype=dtype)
    gate_up[..., 0::2] = gate.transpose(1, 2)
    gate_up[..., 1::2] = up.transpose(1, 2)
    gate_up_bias = torch.zeros(E, 2 * I, dtype=dtype)
    gate_up_bias[:, 1::2] = -1.0  # GPT-OSS computes (up + 1)
    if scaling is not None:
        down = (down.double() * scaling).to(dtype)
    return {f"{prefix}.gate_up_proj": gate_up, f"{prefix}.gate_up_proj_bias": gate_up_bias,
            f"{prefix}.down_proj": down.transpose(1, 2).contiguous(),
            f"{prefix}.down_proj_bias": torch.zeros(E, H, dtype=dtype)}
