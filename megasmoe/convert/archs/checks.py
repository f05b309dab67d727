"""Checks of an HF config on import: refuse what megasmoe's model cannot represent."""

from __future__ import annotations

from megasmoe.convert.errors import ConversionError

__all__ = ["require", "rope_theta", "partial_rotary_factor", "check_common"]


def require(cond: bool, field: str, why: str) -> None:
    """ConversionError ``<field>: <why>`` unless ``cond``."""
    if not cond:
        raise ConversionError(f"{field}: {why}")


def partial_rotary_factor(cfg: dict) -> float:
    """The fraction of each head an HF config's RoPE rotates (1.0 = all)."""
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    return float(rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)))


def rope_theta(cfg: dict, allow_partial: bool = False) -> int | float:
    """The RoPE base of an HF config (plain RoPE; over the whole head unless
    ``allow_partial``: the architecture rotates the first dimensions, like megatron)."""
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    require(kind == "default", "rope_parameters.rope_type",
            f"{kind!r} rescales RoPE; megasmoe has plain RoPE only")
    partial = partial_rotary_factor(cfg)
    require(allow_partial or partial == 1.0, "partial_rotary_factor",
            f"{partial} rotates part of each head, which this architecture's HF code does "
            f"not (megasmoe's model.rotary_percent exports to GLM4-MoE)")
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    return int(theta) if float(theta).is_integer() else theta


def check_common(cfg: dict) -> None:
    """Fields every supported architecture must have at megasmoe's values."""
    act = cfg.get("hidden_act", "silu")
    require(act == "silu", "hidden_act", f"{act!r}; megasmoe's MLPs are SwiGLU (silu)")
