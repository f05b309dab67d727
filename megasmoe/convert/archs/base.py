"""What every target architecture shares: Llama-style attention/norm names, the mapper
that tracks which tensors were used, and the base class an architecture implements.

Canonical tensor names are those of ``megasmoe/convert/megatron_layout.py``; the
gate of a MoE layer is ``layers.<i>.gate.weight`` [E, H] (plus
``layers.<i>.gate.selection_bias`` [E] for DeepSeek-V3-style routing), written there by
the router exporter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megasmoe.convert.errors import ConversionError
from megasmoe.convert.megatron_layout import ModelShape
from megasmoe.convert.routers import Routing

__all__ = ["Arch", "Tensors", "ImportedModel", "LAYER_COMMON", "GLOBAL_COMMON", "require_zero",
           "common_model_overrides", "layer_freq", "plain_moe_unsupported", "QK_NORMS",
           "SWIGLU_NAMES",
           "export_qk_norms", "import_qk_norms",
           "import_qkv_biases", "export_qkv_biases"]

# (canonical, HF) names shared by every target (Llama layout).
GLOBAL_COMMON = (("embed", "model.embed_tokens.weight"), ("final_norm", "model.norm.weight"))
LAYER_COMMON = (
    ("input_norm", "input_layernorm.weight"),
    ("q", "self_attn.q_proj.weight"),
    ("k", "self_attn.k_proj.weight"),
    ("v", "self_attn.v_proj.weight"),
    ("o", "self_attn.o_proj.weight"),
    ("mlp_norm", "post_attention_layernorm.weight"),
)


SWIGLU_NAMES = ("gate_proj", "up_proj", "down_proj")
"""HF names of a SwiGLU MLP's gate, up and down projections (Llama layout; experts of
every target but Mixtral and GPT-OSS, shared experts, dense MLPs)."""

QK_NORMS = (("q_norm", "self_attn.q_norm.weight"), ("k_norm", "self_attn.k_norm.weight"))
"""(canonical, HF) names of the q/k norms (OLMoE full width, Qwen3-MoE per head)."""


def export_qk_norms(canon: "Tensors", i: int, out: dict) -> None:
    """Layer i's q/k norm weights under their HF names."""
    for c, h in QK_NORMS:
        out[f"model.layers.{i}.{h}"] = canon.take(f"layers.{i}.{c}")


def import_qk_norms(hf: "Tensors", i: int, canonical: dict) -> None:
    """Inverse of ``export_qk_norms``."""
    for c, h in QK_NORMS:
        canonical[f"layers.{i}.{c}"] = hf.take(f"model.layers.{i}.{h}")


class Tensors:
    """A tensor dict that remembers which entries were read (to find unused ones)."""

    def __init__(self, tensors: dict, what: str):
        self.tensors = dict(tensors)
        self.what = what
        self.used: set = set()

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def take(self, name: str) -> torch.Tensor:
        """The tensor ``name``, marked used; ConversionError naming it if absent."""
        if name not in self.tensors:
            raise ConversionError(f"{self.what} has no tensor {name}")
        self.used.add(name)
        return self.tensors[name]

    def get(self, name: str) -> Optional[torch.Tensor]:
        """The tensor ``name`` marked used, or None."""
        if name in self.tensors:
            self.used.add(name)
            return self.tensors[name]
        return None

    def unused(self) -> list[str]:
        """Names never read."""
        return sorted(set(self.tensors) - self.used)


@dataclass
class ImportedModel:
    """An HF checkpoint in megasmoe terms: config fields and canonical tensors."""

    overrides: dict
    """Nested megasmoe config fields (model.*, moe.*, moe.router.*)."""
    canonical: dict


class Arch:
    """A target architecture (subclasses in archs/: Mixtral, Qwen2-MoE, GLM4-MoE, ...).

    Export: ``unsupported`` says why a megasmoe model cannot be written exactly (None if
    it can), ``hf_config`` gives config.json, ``export`` maps canonical tensors to HF
    names. Import: ``import_checkpoint`` maps an HF config and tensors back, refusing
    what megasmoe cannot represent, naming the HF field or tensor.
    """

    name = "base"
    model_type = ""
    architecture = ""
    config_class = ""
    remote_code = False
    """True when readers need ``trust_remote_code`` (megasmoe's own architecture)."""
    router_bias = False
    """True when the gate adds a per-expert bias to the router logits (GPT-OSS, megasmoe's)."""
    importable = True
    """False for export-only targets (their ``import_checkpoint`` says why)."""
    reader_note: Optional[str] = None
    """What a reader of this export must know (printed with the export summary)."""

    def config_cls(self):
        """The transformers config class of this architecture."""
        import transformers

        return getattr(transformers, self.config_class)

    def unsupported(self, shape: ModelShape, routing: Routing, extra: dict) -> Optional[str]:
        """Why this architecture cannot hold the model exactly; None when it can."""
        raise NotImplementedError

    def hf_config(self, shape: ModelShape, routing: Routing, extra: dict) -> dict:
        """Keyword arguments of the transformers config class."""
        raise NotImplementedError

    def export(self, canon: Tensors, shape: ModelShape, routing: Routing, extra: dict) -> dict:
        """HF tensors (hub names) from canonical ones."""
        raise NotImplementedError

    def import_checkpoint(self, cfg: dict, hf: Tensors) -> ImportedModel:
        """megasmoe config fields and canonical tensors from an HF config and tensors."""
        raise NotImplementedError

    # ------------------------------------------------------------------ shared pieces

    @staticmethod
    def llama_config(shape: ModelShape, intermediate_size: int) -> dict:
        """The Llama-style config fields every target names alike (plain RoPE, SwiGLU,
        no dropout); ``intermediate_size``: what the target calls that (dense or expert
        MLP width)."""
        return dict(
            vocab_size=shape.vocab_size, hidden_size=shape.hidden_size,
            intermediate_size=intermediate_size, num_hidden_layers=shape.num_layers,
            num_attention_heads=shape.num_heads, num_key_value_heads=shape.num_query_groups,
            head_dim=shape.head_dim, hidden_act="silu",
            max_position_embeddings=shape.seq_length, rms_norm_eps=shape.norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": float(shape.rope_base)},
            tie_word_embeddings=shape.tied, attention_dropout=0.0,
        )

    @staticmethod
    def export_common(canon: Tensors, shape: ModelShape, out: dict) -> None:
        """Embeddings, final norm, LM head (untied) and each layer's attention and norms."""
        for c, h in GLOBAL_COMMON:
            out[h] = canon.take(c)
        if not shape.tied:
            out["lm_head.weight"] = canon.take("lm_head")
        for i in range(shape.num_layers):
            for c, h in LAYER_COMMON:
                out[f"model.layers.{i}.{h}"] = canon.take(f"layers.{i}.{c}")

    @staticmethod
    def import_common(hf: Tensors, num_layers: int, tied: bool, out: dict) -> None:
        """Inverse of ``export_common``."""
        for c, h in GLOBAL_COMMON:
            out[c] = hf.take(h)
        if not tied:
            out["lm_head"] = hf.take("lm_head.weight")
        elif "lm_head.weight" in hf:
            # Some writers store the tied head anyway; it must equal the embedding.
            if not torch.equal(hf.take("lm_head.weight"), out["embed"]):
                raise ConversionError("tie_word_embeddings is true but lm_head.weight differs "
                                      "from model.embed_tokens.weight")
        for i in range(num_layers):
            for c, h in LAYER_COMMON:
                out[f"layers.{i}.{c}"] = hf.take(f"model.layers.{i}.{h}")

    @staticmethod
    def export_experts(canon: Tensors, i: int, num_experts: int, prefix: str,
                       names: tuple[str, str, str], out: dict,
                       down_scale: Optional[float] = None) -> None:
        """Routed experts as per-expert tensors (gate, up, down names of the hub format).

        ``down_scale`` folds a routing scaling factor into the down projections.
        """
        gate = canon.take(f"layers.{i}.experts.gate")
        up = canon.take(f"layers.{i}.experts.up")
        down = canon.take(f"layers.{i}.experts.down")
        if down_scale is not None:
            down = (down.double() * down_scale).to(down.dtype)
        g, u, d = names
        for e in range(num_experts):
            out[f"{prefix}.experts.{e}.{g}.weight"] = gate[e].contiguous()
            out[f"{prefix}.experts.{e}.{u}.weight"] = up[e].contiguous()
            out[f"{prefix}.experts.{e}.{d}.weight"] = down[e].contiguous()

    @staticmethod
    def import_experts(hf: Tensors, i: int, num_experts: int, prefix: str,
                       names: tuple[str, str, str], out: dict) -> None:
        """Inverse of ``export_experts`` (no scaling)."""
        g, u, d = names
        for part, n in (("gate", g), ("up", u), ("down", d)):
            out[f"layers.{i}.experts.{part}"] = torch.stack(
                [hf.take(f"{prefix}.experts.{e}.{n}.weight") for e in range(num_experts)])

    @staticmethod
    def mlp(canon_prefix: str, hf_prefix: str, names=SWIGLU_NAMES):
        """(canonical, HF) pairs of a SwiGLU MLP."""
        return [(f"{canon_prefix}.{p}", f"{hf_prefix}.{n}.weight")
                for p, n in zip(("gate", "up", "down"), names)]


def plain_moe_unsupported(arch: str, shape: ModelShape, routing: Routing,
                          accepted_qk_norm: tuple = ("none",),
                          dense_layers: bool = False, qkv_bias: bool = False) -> Optional[str]:
    """Why a Mixtral-like target (softmax gate, no shared expert, no expert bias, q/k/v
    biases only with ``qkv_bias``, the q/k norm modes it has, every layer MoE unless
    ``dense_layers``) cannot hold the model; None when it can."""
    if shape.qkv_bias and not qkv_bias:
        return f"model.qkv_bias=true ({arch} has no q/k/v biases)"
    if shape.rotary_percent != 1.0:
        return f"model.rotary_percent={shape.rotary_percent} ({arch} rotates whole heads)"
    if shape.qk_norm not in accepted_qk_norm:
        return f"model.qk_norm={shape.qk_norm} ({arch} q/k norms: {'/'.join(accepted_qk_norm)})"
    if routing.score_function != "softmax":
        return f"moe.router.score_function={routing.score_function} ({arch} uses softmax)"
    if routing.selection_bias:
        return f"the router's expert bias ({arch} has none)"
    if shape.shared_expert_size:
        return f"moe.shared_expert_size={shape.shared_expert_size} ({arch} has no shared expert)"
    if not dense_layers and not all(shape.moe_layers):
        return f"moe.layer_freq makes dense layers ({arch} has MoE layers only)"
    return None


def import_qkv_biases(hf: Tensors, num_layers: int, present: bool, canonical: dict) -> bool:
    """Read the HF q/k/v biases (when the config has them); keep them as canonical
    ``layers.<i>.q_bias|k_bias|v_bias`` if any is nonzero. Returns model.qkv_bias: zero
    biases everywhere (what a bias-free megasmoe model exports) import without biases."""
    names = [(i, proj, f"model.layers.{i}.self_attn.{proj}_proj.bias")
             for i in range(num_layers) for proj in ("q", "k", "v")] if present else []
    nonzero = any(hf.tensors[n].numel() and bool(hf.tensors[n].abs().max() != 0)
                  for _, _, n in names)
    for i, proj, name in names:
        bias = hf.take(name)
        if nonzero:
            canonical[f"layers.{i}.{proj}_bias"] = bias
    return nonzero


def export_qkv_biases(canon: Tensors, shape: ModelShape, i: int, out: dict) -> None:
    """Layer i's HF q/k/v biases: the model's (model.qkv_bias) or zeros (x + 0 = x)."""
    p = f"model.layers.{i}.self_attn"
    for proj in ("q", "k", "v"):
        weight = out[f"{p}.{proj}_proj.weight"]
        out[f"{p}.{proj}_proj.bias"] = (canon.take(f"layers.{i}.{proj}_bias") if shape.qkv_bias
                                        else weight.new_zeros(weight.shape[0]))


def require_zero(hf: Tensors, name: str, why: str) -> None:
    """Refuse an HF tensor megasmoe has no place for unless it is all zeros."""
    t = hf.take(name)
    if t.numel() and bool(t.abs().max() != 0):
        raise ConversionError(f"{name} is not zero and {why}")


def common_model_overrides(cfg: dict, hidden: int, heads: int,
                           allow_partial_rope: bool = False) -> dict:
    """megasmoe model.* fields from the Llama-style fields of an HF config.

    ``allow_partial_rope``: the architecture rotates only the first
    partial_rotary_factor of each head (GLM4-MoE): model.rotary_percent.
    """
    from megasmoe.convert.archs.checks import partial_rotary_factor, rope_theta

    kv = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or hidden // heads
    out = {} if head_dim * heads == hidden else {"head_dim": head_dim}
    theta = rope_theta(cfg, allow_partial=allow_partial_rope)
    if partial_rotary_factor(cfg) != 1.0:
        out["rotary_percent"] = partial_rotary_factor(cfg)
    return {
        **out,
        "num_layers": cfg["num_hidden_layers"], "hidden_size": hidden, "num_heads": heads,
        "num_query_groups": None if kv == heads else kv, "vocab_size": cfg["vocab_size"],
        "norm_eps": cfg.get("rms_norm_eps", 1e-6), "rope_base": theta,
        "share_embeddings": bool(cfg.get("tie_word_embeddings", False)),
    }


def layer_freq(pattern: list[bool]):
    """megasmoe's moe.layer_freq for a per-layer MoE pattern (1 when all are MoE)."""
    return 1 if all(pattern) else [int(x) for x in pattern]
