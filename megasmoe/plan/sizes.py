"""Model shapes: parameter counts, training FLOPs per token, the layers of a stage.

Arithmetic on the config as megatron-core builds the model (tests/test_plan.py holds the
parameter counts to the real model built on the meta device, tests/test_flops.py the
FLOPs).
"""

from __future__ import annotations

from dataclasses import dataclass


def padded_vocab(vocab_size: int, tp: int, multiple: int = 128) -> int:
    """Megatron's vocabulary padding (megasmoe.model.padded_vocab_size): a multiple of
    128 x tp."""
    step = multiple * tp
    return -(-vocab_size // step) * step


def _moe_layers(cfg) -> list[bool]:
    from megasmoe.config import moe_layer_pattern

    return moe_layer_pattern(cfg.moe.layer_freq, cfg.model.num_layers)


def _widths(cfg) -> tuple[int, int, int, int]:
    """(hidden, head_dim, query width, key/value width)."""
    m = cfg.model
    h = m.hidden_size
    d = m.head_dim or h // m.num_heads
    return h, d, m.num_heads * d, (m.num_query_groups or m.num_heads) * d


@dataclass
class _LayerParams:
    """Parameters of one layer by how they are sharded."""

    tp: int = 0
    """Sharded over tensor parallelism."""
    replicated: int = 0
    """The same on every TP rank (norms, router, per-head q/k norms, shared-expert gate)."""
    experts: int = 0
    """Routed experts, all of them (sharded over ep x etp)."""

    @property
    def total(self) -> int:
        return self.tp + self.replicated + self.experts


def _layer_params(cfg, moe: bool) -> _LayerParams:
    m, e = cfg.model, cfg.moe
    h, d, q, kv = _widths(cfg)
    p = _LayerParams()
    p.tp += h * (q + 2 * kv) + q * h + (q + 2 * kv if m.qkv_bias else 0)  # qkv, proj
    p.replicated += 2 * h  # input and pre-MLP RMSNorm
    if m.qk_norm == "head":
        p.replicated += 2 * d
    elif m.qk_norm == "full":
        p.tp += q + kv
    if moe:
        p.replicated += e.num_experts * h  # router (a linear gate)
        p.experts += e.num_experts * 3 * h * e.ffn_hidden_size  # SwiGLU: fc1 2f x h, fc2 h x f
        p.tp += 3 * h * e.shared_expert_size
        p.replicated += h if e.shared_expert_gate else 0
    else:
        p.tp += 3 * h * (m.ffn_hidden_size or 4 * h)
    return p


@dataclass
class ParamCount:
    """Parameters of the whole model (as megatron builds it at TP=1)."""

    total: int
    """Every parameter, embedding and output layer included."""
    active: int
    """Parameters one token uses: routed experts counted top-k of num_experts."""
    embedding: int
    """Input embedding (padded vocabulary x hidden)."""
    experts: int
    """Routed-expert parameters, all experts."""


def count_parameters(cfg, tp: int = 1) -> ParamCount:
    """Total and active parameters of ``cfg``'s model, vocabulary padded for ``tp``."""
    h = cfg.model.hidden_size
    layers = [_layer_params(cfg, moe) for moe in _moe_layers(cfg)]
    experts = sum(p.experts for p in layers)
    embedding = padded_vocab(cfg.model.vocab_size, tp) * h
    total = sum(p.total for p in layers) + h + embedding  # + final norm
    total += 0 if cfg.model.share_embeddings else embedding
    active = total - experts + experts * cfg.moe.topk // cfg.moe.num_experts
    return ParamCount(total=total, active=active, embedding=embedding, experts=experts)


def flops_per_token(cfg) -> float:
    """Training FLOPs per token: 6 x the matmul parameters a token passes through, plus
    the attention scores (12 x layers x sequence x query width).

    Counted per layer from the config, as megatron builds it: q/k/v/o projections (GQA,
    head_dim; biases left out), the router (a linear gate, as topk's), the top-k routed
    experts and the shared expert (and its gate) of MoE layers (gated SwiGLU: 3
    matrices), the dense MLP of dense layers, and the output layer over the padded
    vocabulary (the embedding is a lookup).
    """
    m, e, t = cfg.model, cfg.moe, cfg.train
    h, _, q, kv = _widths(cfg)
    attention = 2 * h * q + 2 * h * kv
    moe_mlp = (h * e.num_experts + 3 * h * e.ffn_hidden_size * e.topk
               + 3 * h * e.shared_expert_size + (h if e.shared_expert_gate else 0))
    dense_mlp = 3 * h * (m.ffn_hidden_size or 4 * h)
    active = sum(attention + (moe_mlp if moe else dense_mlp) for moe in _moe_layers(cfg))
    active += h * padded_vocab(m.vocab_size, cfg.parallel.tp)
    return 6.0 * active + 12.0 * m.num_layers * t.seq_length * q


def stage_layers(cfg, stage: int) -> list[int]:
    """Global indices of the layers pipeline stage ``stage`` holds (all its VPP chunks)."""
    p, n = cfg.parallel, cfg.model.num_layers
    chunks = p.vpp or 1
    per_chunk = n // (p.pp * chunks)
    return [c * p.pp * per_chunk + stage * per_chunk + i
            for c in range(chunks) for i in range(per_chunk)]
