"""megatron-core's checkpoint tensors <-> a neutral per-layer form ("canonical" names).

megatron stores (global shapes, as megasmoe's GPTModel writes them):

- ``self_attention.linear_qkv.weight`` [ng (nh/ng + 2) d, H]: per query group g, the
  nh/ng query heads of g, then g's key head, then g's value head;
- ``linear_fc1.weight`` of experts, shared expert and dense MLP: [gate; up] stacked on
  the output axis (SwiGLU), ``linear_fc2.weight`` the down projection;
- the input norm as ``self_attention.linear_qkv.layer_norm_weight`` and the pre-MLP
  norm as ``mlp.linear_fc1.layer_norm_weight`` (Transformer-Engine names; the
  ``input_layernorm`` / ``pre_mlp_layernorm`` names are accepted too);
- stacked keys ``decoder.layers.<name>`` (first axis: global layer) when all layers
  are alike, per-layer keys ``decoder.layers.<i>.<name>`` when they differ
  (``moe.layer_freq``); expert tensors have the global expert id as next axis;
- the vocabulary padded to a multiple of 128 x tp.

Canonical names (one tensor each, vocabulary un-padded): ``embed``, ``lm_head`` (absent
when tied), ``final_norm``, and per layer ``layers.<i>.`` + ``input_norm``, ``q``, ``k``,
``v``, ``o``, ``mlp_norm`` (and ``q_norm`` / ``k_norm``: [heads x head_dim] with
model.qk_norm=full, [head_dim] with model.qk_norm=head; ``q_bias`` / ``k_bias`` / ``v_bias`` with model.qkv_bias); dense layers ``mlp.gate|up|down``; MoE layers
``experts.gate|up`` [E, I, H], ``experts.down`` [E, H, I], ``shared.gate|up|down``,
``shared.gate_weight`` (a sigmoid-gated shared expert), and the router's own tensors as
``router.<name>`` (what they mean is the router exporter's business, see routers.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from megasmoe.convert.errors import ConversionError

__all__ = ["ModelShape", "to_canonical", "to_megatron", "split_qkv", "merge_qkv"]

_PER_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_STACKED = "decoder.layers."

# layer suffix -> canonical name; "fc1" entries split into gate/up, "qkv" into q/k/v.
_LAYER_MAP = {
    "self_attention.linear_qkv.layer_norm_weight": "input_norm",
    "input_layernorm.weight": "input_norm",
    "self_attention.linear_qkv.weight": "qkv",
    "self_attention.linear_qkv.bias": "qkv_bias",
    "self_attention.linear_proj.weight": "o",
    "self_attention.q_layernorm.weight": "q_norm",
    "self_attention.k_layernorm.weight": "k_norm",
    "mlp.linear_fc1.layer_norm_weight": "mlp_norm",
    "pre_mlp_layernorm.weight": "mlp_norm",
    "mlp.linear_fc1.weight": "fc1:mlp",
    "mlp.linear_fc2.weight": "mlp.down",
    "mlp.experts.experts.linear_fc1.weight": "fc1:experts",
    "mlp.experts.experts.linear_fc2.weight": "experts.down",
    "mlp.shared_experts.linear_fc1.weight": "fc1:shared",
    "mlp.shared_experts.linear_fc2.weight": "shared.down",
    "mlp.shared_experts.gate_weight": "shared.gate_weight",
}
_GLOBAL_MAP = {
    "embedding.word_embeddings.weight": "embed",
    "output_layer.weight": "lm_head",
    "decoder.final_layernorm.weight": "final_norm",
}
_ROUTER_PREFIX = "mlp.router."


@dataclass
class ModelShape:
    """The model facts the conversion needs, from a megasmoe config (nested dict)."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int
    ffn_hidden_size: int
    num_experts: int
    topk: int
    moe_ffn_hidden_size: int
    shared_expert_size: int
    moe_layers: list
    norm_eps: float
    rope_base: float
    tied: bool
    seq_length: int
    qk_norm: str = "none"
    qkv_bias: bool = False
    rotary_percent: float = 1.0

    @classmethod
    def from_config(cls, cfg: dict) -> "ModelShape":
        """Read the shape from a megasmoe config dict (megasmoe.json ``config``)."""
        m, e = cfg["model"], cfg["moe"]
        from megasmoe.config import moe_layer_pattern

        L = m["num_layers"]
        pattern = moe_layer_pattern(e.get("layer_freq", 1), L)
        return cls(
            num_layers=L, hidden_size=m["hidden_size"], num_heads=m["num_heads"],
            num_query_groups=m.get("num_query_groups") or m["num_heads"],
            head_dim=m.get("head_dim") or m["hidden_size"] // m["num_heads"],
            vocab_size=m["vocab_size"],
            ffn_hidden_size=m.get("ffn_hidden_size") or 4 * m["hidden_size"],
            num_experts=e["num_experts"], topk=e["topk"],
            moe_ffn_hidden_size=e["ffn_hidden_size"],
            shared_expert_size=e.get("shared_expert_size") or 0, moe_layers=pattern,
            norm_eps=m["norm_eps"], rope_base=m["rope_base"],
            tied=bool(m.get("share_embeddings")), seq_length=cfg["train"]["seq_length"],
            qk_norm=m.get("qk_norm", "none"), qkv_bias=bool(m.get("qkv_bias", False)),
            rotary_percent=float(m.get("rotary_percent", 1.0)),
        )


def split_qkv(w: torch.Tensor, shape: ModelShape) -> tuple:
    """megatron's grouped QKV weight -> (q [nh d, H], k [ng d, H], v [ng d, H])."""
    ng, d = shape.num_query_groups, shape.head_dim
    per = shape.num_heads // ng
    grouped = w.reshape(ng, per + 2, d, w.shape[-1])
    q = grouped[:, :per].reshape(ng * per * d, -1)
    k = grouped[:, per].reshape(ng * d, -1)
    v = grouped[:, per + 1].reshape(ng * d, -1)
    return q.contiguous(), k.contiguous(), v.contiguous()


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: ModelShape) -> torch.Tensor:
    """(q, k, v) -> megatron's grouped QKV weight (inverse of ``split_qkv``)."""
    ng, d = shape.num_query_groups, shape.head_dim
    per = shape.num_heads // ng
    H = q.shape[-1]
    grouped = torch.cat([q.reshape(ng, per, d, H), k.reshape(ng, 1, d, H),
                         v.reshape(ng, 1, d, H)], dim=1)
    return grouped.reshape(-1, H).contiguous()


def _layer_items(tensors: dict, shape: ModelShape):
    """(layer, suffix, tensor, megatron key) for every decoder-layer tensor."""
    for key, t in tensors.items():
        m = _PER_LAYER.match(key)
        if m:
            yield int(m.group(1)), m.group(2), t, key
        elif key.startswith(_STACKED):
            if t.shape[0] != shape.num_layers:
                raise ConversionError(f"{key} has {t.shape[0]} layers, model.num_layers is "
                                      f"{shape.num_layers}")
            for i in range(shape.num_layers):
                yield i, key[len(_STACKED):], t[i], key


def to_canonical(tensors: dict, shape: ModelShape) -> tuple[dict, set]:
    """megatron checkpoint tensors -> (canonical tensors, megatron keys not understood).

    The caller decides what an unknown key means (it is never silently dropped).
    """
    out: dict = {}
    unknown: set = set()
    for key, t in tensors.items():
        if key in _GLOBAL_MAP:
            name = _GLOBAL_MAP[key]
            out[name] = t[: shape.vocab_size].contiguous() if name in ("embed", "lm_head") else t
        elif not key.startswith(_STACKED):
            unknown.add(key)
    for i, suffix, t, key in _layer_items(tensors, shape):
        p = f"layers.{i}."
        if suffix.startswith(_ROUTER_PREFIX):
            out[p + "router." + suffix[len(_ROUTER_PREFIX):]] = t
            continue
        name = _LAYER_MAP.get(suffix)
        if name is None:
            unknown.add(key)
        elif name == "qkv":
            out[p + "q"], out[p + "k"], out[p + "v"] = split_qkv(t, shape)
        elif name == "qkv_bias":  # grouped like the weight's rows
            q, k, v = split_qkv(t[:, None], shape)
            out[p + "q_bias"], out[p + "k_bias"], out[p + "v_bias"] = q[:, 0], k[:, 0], v[:, 0]
        elif name.startswith("fc1:"):
            gate, up = t.chunk(2, dim=-2)
            part = name[4:]
            out[p + part + ".gate"], out[p + part + ".up"] = gate.contiguous(), up.contiguous()
        else:
            out[p + name] = t
    return out, unknown


def _layer_tensor(canonical: dict, i: int, suffix: str, shape: ModelShape, used: set):
    p = f"layers.{i}."
    if suffix.startswith(_ROUTER_PREFIX):
        names = [p + "router." + suffix[len(_ROUTER_PREFIX):]]
        build = lambda ts: ts[0]  # noqa: E731
    else:
        name = _LAYER_MAP.get(suffix)
        if name is None:
            raise ConversionError(f"megasmoe's model has decoder.layers.{suffix}, which the "
                                  f"converter does not know")
        if name == "qkv":
            names = [p + "q", p + "k", p + "v"]
            build = lambda ts: merge_qkv(*ts, shape)  # noqa: E731
        elif name == "qkv_bias":
            names = [p + "q_bias", p + "k_bias", p + "v_bias"]
            build = lambda ts: merge_qkv(*(t[:, None] for t in ts), shape)[:, 0]  # noqa: E731
        elif name.startswith("fc1:"):
            names = [p + name[4:] + ".gate", p + name[4:] + ".up"]
            build = lambda ts: torch.cat(ts, dim=-2)  # noqa: E731
        else:
            names = [p + name]
            build = lambda ts: ts[0]  # noqa: E731
    missing = [n for n in names if n not in canonical]
    if missing:
        raise ConversionError(f"the imported model has no {', '.join(missing)} for megasmoe's "
                              f"decoder.layers.{i}.{suffix}")
    used.update(names)
    return build([canonical[n] for n in names])


def to_megatron(canonical: dict, keys: dict, shape: ModelShape) -> tuple[dict, set]:
    """Canonical tensors -> megatron checkpoint tensors for ``keys`` ({key: global shape}).

    ``keys`` come from the model's own sharded state dict, so stacked or per-layer keys
    are whatever megatron uses for this model. The vocabulary is zero-padded to the
    model's padded size. Returns (tensors, canonical names used).
    """
    out, used = {}, set()
    for key, gshape in keys.items():
        gshape = tuple(gshape)
        if key in _GLOBAL_MAP:
            name = _GLOBAL_MAP[key]
            src = canonical.get(name)
            if src is None and name == "lm_head" and shape.tied:
                src = canonical.get("embed")
                name = "embed"
            if src is None:
                raise ConversionError(f"the imported model has no {name} for megasmoe's {key}")
            used.add(name)
            t = torch.zeros(gshape, dtype=src.dtype)
            t[: src.shape[0]] = src
            out[key] = t
            continue
        m = _PER_LAYER.match(key)
        if m:
            t = _layer_tensor(canonical, int(m.group(1)), m.group(2), shape, used)
        elif key.startswith(_STACKED):
            suffix = key[len(_STACKED):]
            t = torch.stack([_layer_tensor(canonical, i, suffix, shape, used)
                             for i in range(gshape[0])])
        else:
            raise ConversionError(f"megasmoe's model has {key}, which the converter does not know")
        if tuple(t.shape) != gshape:
            raise ConversionError(f"{key}: the imported tensor has shape {list(t.shape)}, "
                                  f"megasmoe's model expects {list(gshape)}")
        out[key] = t
    return out, used
