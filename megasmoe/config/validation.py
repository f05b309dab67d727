"""Validating a ``Config`` before any process group starts.

``validate`` fills the derived fields (``resolve_world``: parallel.world_size, dp, etp)
and raises ``ConfigError`` with one line naming the field and the fix, on the first
problem; the chosen router's own config dataclass checks the ``moe.router.*`` fields.
"""

from __future__ import annotations

import importlib.util
import re
from typing import Optional, Union

from megasmoe.config.loading import _nearest
from megasmoe.config.schema import Config, ConfigError, MoEConfig, TrainConfig

__all__ = [
    "resolve_world",
    "moe_layer_pattern",
    "EXPERT_BACKENDS",
    "FP8_RECIPES",
    "TE_FP8_RECIPES",
    "duration_s",
    "validate",
]


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def resolve_world(cfg: Config, world_size: Optional[int] = None) -> Config:
    """Fill parallel.world_size and parallel.dp (from the launcher's world size if given)."""
    p = cfg.parallel
    for name in ("tp", "pp", "cp", "ep"):
        _require(getattr(p, name) >= 1, f"parallel.{name}={getattr(p, name)} must be >= 1")
    for name in ("world_size", "dp", "etp"):
        value = getattr(p, name)
        _require(value is None or value >= 1,
                 f"parallel.{name}={value} must be >= 1 (or null to derive it)")
    mp = cfg.model_parallel_size()
    launched = world_size is not None
    if world_size is not None:
        _require(
            p.world_size in (None, world_size),
            f"parallel.world_size={p.world_size} but "
            f"{'1 process was' if world_size == 1 else f'{world_size} processes were'} launched; "
            f"launch {p.world_size} (torchrun --nproc-per-node={p.world_size}, or "
            f"launch/pretrain.sh) or set parallel.world_size={world_size}",
        )
        p.world_size = world_size
    if p.world_size is None:
        p.world_size = mp * (p.dp or 1)
    _require(
        p.world_size % mp == 0,
        f"parallel: world size {p.world_size} is not divisible by tp x pp x cp = "
        f"{p.tp}x{p.pp}x{p.cp} = {mp}; "
        + (f"launch a multiple of {mp} processes" if launched else
           f"set parallel.world_size to a multiple of {mp} (e.g. parallel.world_size={mp})")
        + " or change parallel.tp/pp/cp",
    )
    dp = p.world_size // mp
    _require(
        p.dp in (None, dp),
        f"parallel: world size {p.world_size} != tp x pp x cp x dp = "
        f"{p.tp}x{p.pp}x{p.cp}x{p.dp}; set parallel.dp={dp} or launch "
        f"{mp * (p.dp or 1)} processes",
    )
    p.dp = dp
    if p.etp is None:
        p.etp = p.tp
    return cfg


def _check_split(split: str) -> None:
    """data.split: up to three non-negative shares with a train and a valid part."""
    fix = "write train,valid,test shares such as 969,30,1"
    parts = [p.strip() for p in str(split).split(",")]
    try:
        shares = [float(p) for p in parts]
    except ValueError:
        raise ConfigError(f"data.split={split!r} is not a list of numbers; {fix}") from None
    _require(len(shares) <= 3 and all(s >= 0 for s in shares),
             f"data.split={split!r} needs at most three non-negative shares; {fix}")
    shares += [0.0] * (3 - len(shares))
    # Evaluation runs at the end of every run (eval_iters >= 1), so valid cannot be empty.
    _require(shares[0] > 0 and shares[1] > 0,
             f"data.split={split!r} leaves the train or valid split empty; {fix}")


def moe_layer_pattern(layer_freq: Union[int, list], num_layers: int) -> list[bool]:
    """Which layers are MoE for moe.layer_freq, as megatron reads it: a 0/1 list per
    layer, or N: layer i is MoE iff i % N == 0."""
    if isinstance(layer_freq, list):
        return [bool(x) for x in layer_freq]
    return [i % layer_freq == 0 for i in range(num_layers)]


EXPERT_BACKENDS = ("sequential", "grouped", "te")
FP8_RECIPES = ("tensorwise", "rowwise")
"""train.fp8 recipes of megasmoe's own FP8 GEMMs (megasmoe/experts/fp8.py)."""
TE_FP8_RECIPES = ("delayed", "tensorwise", "blockwise", "mxfp8")
"""train.fp8 recipes Transformer Engine runs (moe.expert_backend=te)."""


def _check_experts(e: MoEConfig, t: TrainConfig) -> None:
    """moe.expert_backend and train.fp8 (the te backend needs Transformer Engine)."""
    _require(e.expert_backend in EXPERT_BACKENDS,
             f"moe.expert_backend='{e.expert_backend}' is unknown; use sequential, grouped "
             f"or te{_nearest(e.expert_backend, EXPERT_BACKENDS)}")
    if e.expert_backend == "te":
        _require(importlib.util.find_spec("transformer_engine") is not None,
                 "moe.expert_backend=te needs Transformer Engine, which is not installed "
                 "here; use moe.expert_backend=grouped (same checkpoint) or install the te extra")
    if t.fp8 is None:
        return
    recipes = TE_FP8_RECIPES if e.expert_backend == "te" else FP8_RECIPES
    _require(t.fp8 in (*FP8_RECIPES, *TE_FP8_RECIPES),
             f"train.fp8='{t.fp8}' is unknown; use null, {', '.join(FP8_RECIPES)} "
             f"(or with moe.expert_backend=te: {', '.join(TE_FP8_RECIPES)})")
    _require(e.expert_backend != "sequential",
             f"train.fp8={t.fp8} runs the expert GEMMs in FP8 and needs "
             f"moe.expert_backend=grouped (or te); SequentialMLP has no FP8 path here")
    _require(t.fp8 in recipes,
             f"train.fp8={t.fp8} is a Transformer Engine recipe; set moe.expert_backend=te "
             f"or use train.fp8=rowwise / tensorwise with moe.expert_backend=grouped")


def duration_s(value: Union[int, float, str], key: str) -> float:
    """Seconds from ``600``, ``"90s"``, ``"10m"`` or ``"10min"`` (ConfigError naming ``key``)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*(s|sec|m|min)?\s*", str(value))
    if isinstance(value, bool) or not m or float(m.group(1)) <= 0:
        raise ConfigError(f"{key}={value!r} is not a duration; write seconds (600, 90s) or "
                          f"minutes (10m, 10min), more than 0")
    return float(m.group(1)) * (60 if m.group(2) in ("m", "min") else 1)


def validate(cfg: Config, world_size: Optional[int] = None) -> Config:
    """Check a config before any process group starts; fills derived fields.

    Raises ``ConfigError`` (one line: field, problem, fix) on the first problem.
    """
    from megasmoe.routers import router_config_for

    resolve_world(cfg, world_size)
    p, m, e, t = cfg.parallel, cfg.model, cfg.moe, cfg.train
    for section, names in (
        ("model", ("num_layers", "hidden_size", "num_heads", "vocab_size")),
        ("moe", ("ffn_hidden_size",)),
        ("train", ("seq_length", "global_batch_size", "eval_iters")),
    ):
        for name in names:
            value = getattr(getattr(cfg, section), name)
            _require(value >= 1, f"{section}.{name}={value} must be >= 1")
    for dotted, value in (("model.num_query_groups", m.num_query_groups),
                          ("model.head_dim", m.head_dim),
                          ("model.ffn_hidden_size", m.ffn_hidden_size),
                          ("train.exit_at_step", t.exit_at_step),
                          ("train.wsd_decay_steps", t.wsd_decay_steps)):
        _require(value is None or value >= 1, f"{dotted}={value} must be >= 1 or null")
    _require(0.0 <= m.dropout < 1.0, f"model.dropout={m.dropout} must be in [0, 1)")
    _require(t.warmup_steps >= 0, f"train.warmup_steps={t.warmup_steps} must be >= 0")
    _require(t.lr > 0, f"train.lr={t.lr} must be > 0")
    _require(cfg.logging.collapse_probe_tokens >= 0,
             f"logging.collapse_probe_tokens={cfg.logging.collapse_probe_tokens} must be "
             f">= 0 (0 turns collapse telemetry off)")
    duration_s(t.collective_timeout, "train.collective_timeout")
    _require(e.shared_expert_size >= 0, "moe.shared_expert_size must be >= 0 (0 = none)")
    _require(not e.shared_expert_gate or e.shared_expert_size > 0,
             "moe.shared_expert_gate=true needs a shared expert; set moe.shared_expert_size")
    _require(p.vpp is None or p.vpp >= 1, "parallel.vpp must be >= 1 or null")
    _require(
        m.num_heads % p.tp == 0,
        f"model.num_heads={m.num_heads} is not divisible by parallel.tp={p.tp}; "
        f"choose a tp that divides the heads",
    )
    groups = m.num_query_groups or m.num_heads
    _require(
        m.num_heads % groups == 0 and groups % p.tp == 0,
        f"model.num_query_groups={groups} must divide num_heads={m.num_heads} and be "
        f"divisible by parallel.tp={p.tp}",
    )
    head_dim = m.head_dim or (m.hidden_size // m.num_heads)
    rotary = head_dim * m.rotary_percent
    _require(0 < m.rotary_percent <= 1 and rotary == int(rotary) and int(rotary) % 2 == 0,
             f"model.rotary_percent={m.rotary_percent} must be in (0, 1] and rotate an even "
             f"number of the head's {head_dim} dimensions")
    _require(m.qk_norm in ("none", "head", "full"),
             f"model.qk_norm={m.qk_norm!r} is unknown; use none, head or full")
    _require(m.attention in ("auto", "sdpa", "unfused"),
             f"model.attention={m.attention!r} is unknown; use auto, sdpa or unfused"
             f"{_nearest(str(m.attention), ['auto', 'sdpa', 'unfused'])}")
    _require(p.cp == 1 or m.attention == "auto",
             f"parallel.cp={p.cp} needs Transformer Engine attention, which "
             f"model.attention={m.attention} replaces; set parallel.cp=1, or "
             f"model.attention=auto with Transformer Engine installed")
    _require(
        m.head_dim is not None or m.hidden_size % m.num_heads == 0,
        f"model.hidden_size={m.hidden_size} is not divisible by model.num_heads={m.num_heads}; "
        f"change one of them or set model.head_dim",
    )
    _require(e.num_experts >= 1, "moe.num_experts must be >= 1")
    _require(
        e.num_experts % p.ep == 0,
        f"moe.num_experts={e.num_experts} is not divisible by parallel.ep={p.ep}; "
        f"set ep to a divisor of the expert count",
    )
    _require(
        1 <= e.topk <= e.num_experts,
        f"moe.topk={e.topk} must be between 1 and moe.num_experts={e.num_experts}",
    )
    _require(
        not (p.tp > 1 and e.num_experts > 0 and not p.sp),
        f"parallel.tp={p.tp} with MoE requires sequence parallel; set parallel.sp=true",
    )
    expert_group = p.ep * p.etp
    dense_group = p.tp * p.cp * p.dp
    _require(
        dense_group % expert_group == 0,
        f"parallel.ep x etp = {p.ep}x{p.etp} must divide tp x cp x dp = {dense_group}; "
        f"lower parallel.ep or add data-parallel ranks",
    )
    _require(
        e.dispatcher in ("allgather", "alltoall", "flex"),
        f"moe.dispatcher='{e.dispatcher}' is unknown; use allgather, alltoall or flex"
        f"{_nearest(e.dispatcher, ['allgather', 'alltoall', 'flex'])}",
    )
    if e.dispatcher == "flex":
        # megatron's flex dispatcher runs on DeepEP's CUDA kernels only; without them it
        # fails deep inside the first forward pass.
        _require(
            importlib.util.find_spec("deep_ep") is not None,
            "moe.dispatcher=flex needs DeepEP (the deep_ep package, NVIDIA GPUs), which is "
            "not installed here; use moe.dispatcher=alltoall (same routing, dropless)",
        )
    _require(
        e.aux_loss_type in ("aux_loss", "seq_aux_loss", "global_aux_loss", "none"),
        f"moe.aux_loss_type='{e.aux_loss_type}' is unknown; use aux_loss, seq_aux_loss, "
        f"global_aux_loss or none",
    )
    _require(
        e.aux_loss_normalization in ("megatron", "paper"),
        f"moe.aux_loss_normalization='{e.aux_loss_normalization}' is unknown; use megatron "
        f"or paper",
    )
    _require(e.router_dtype in ("fp32", "fp64"), "moe.router_dtype must be fp32 or fp64")
    _check_experts(e, t)
    if isinstance(e.layer_freq, list):
        _require(
            len(e.layer_freq) == m.num_layers and set(e.layer_freq) <= {0, 1},
            f"moe.layer_freq list must hold {m.num_layers} entries of 0/1 (one per layer)",
        )
    else:
        _require(e.layer_freq >= 1, "moe.layer_freq must be >= 1 or a 0/1 list per layer")
    _require(
        m.num_layers % p.pp == 0,
        f"model.num_layers={m.num_layers} is not divisible by parallel.pp={p.pp}; "
        f"choose a pp that divides the layer count",
    )
    if p.vpp is not None:
        _require(p.pp > 1, "parallel.vpp needs parallel.pp > 1; unset vpp or raise pp")
        _require(
            m.num_layers % (p.pp * p.vpp) == 0,
            f"model.num_layers={m.num_layers} is not divisible by pp x vpp = {p.pp * p.vpp}",
        )
    if p.cp > 1:
        _require(
            importlib.util.find_spec("transformer_engine") is not None,
            f"parallel.cp={p.cp} needs Transformer Engine attention (megatron-core's local "
            f"attention has no context parallelism); set parallel.cp=1 or install the te extra",
        )
        _require(
            t.seq_length % (2 * p.cp) == 0,
            f"train.seq_length={t.seq_length} must be divisible by 2 x parallel.cp "
            f"(= {2 * p.cp}); change train.seq_length or parallel.cp",
        )
    if p.sp:
        _require(
            t.seq_length % p.tp == 0,
            f"train.seq_length={t.seq_length} is not divisible by parallel.tp={p.tp} "
            f"(sequence parallel splits the sequence)",
        )
    _require(t.micro_batch_size >= 1, "train.micro_batch_size must be >= 1")
    _require(
        t.global_batch_size % (t.micro_batch_size * p.dp) == 0,
        f"train.global_batch_size={t.global_batch_size} is not divisible by "
        f"micro_batch_size x dp = {t.micro_batch_size}x{p.dp}; set it to a multiple of "
        f"{t.micro_batch_size * p.dp}",
    )
    if p.pp > 1:
        num_micro = t.global_batch_size // (t.micro_batch_size * p.dp)
        if p.vpp is not None:
            _require(
                num_micro % p.pp == 0,
                f"interleaved pipeline needs micro batches per step ({num_micro}) divisible "
                f"by parallel.pp={p.pp}; raise train.global_batch_size",
            )
    _require(t.steps >= 1, "train.steps must be >= 1")
    _require(
        t.lr_schedule in ("cosine", "linear", "constant", "wsd"),
        f"train.lr_schedule='{t.lr_schedule}' is unknown; use cosine, linear, constant or wsd"
        f"{_nearest(t.lr_schedule, ['cosine', 'linear', 'constant', 'wsd'])}",
    )
    _require(0 <= t.min_lr <= t.lr, f"train.min_lr={t.min_lr} must be in [0, train.lr={t.lr}]")
    # megatron's scheduler asserts warmup < decay steps (= train.steps), even for one step.
    _require(t.warmup_steps < t.steps,
             f"train.warmup_steps={t.warmup_steps} must be < train.steps={t.steps}; "
             f"lower train.warmup_steps")
    _require(
        t.precision in ("auto", "fp32", "bf16"),
        f"train.precision='{t.precision}' is unknown; use auto, fp32 or bf16",
    )
    _require(t.log_interval >= 1, "train.log_interval must be >= 1")
    _require(t.eval_interval >= 0, "train.eval_interval must be >= 0")
    _require(
        cfg.data.source in ("corpus", "mock", "indexed"),
        f"data.source='{cfg.data.source}' is unknown; use corpus, indexed or mock",
    )
    c = cfg.checkpoint
    _require(c.interval >= 0, "checkpoint.interval must be >= 0 (0 = only at the end)")
    _require(c.keep_last >= 0, "checkpoint.keep_last must be >= 0 (0 = keep all)")
    _require(c.async_save in ("auto", "true", "false", True, False),
             f"checkpoint.async_save={c.async_save!r}; use auto, true or false")
    if cfg.data.source == "indexed":
        _require(bool(cfg.data.prefixes), "data.prefixes is empty; list .bin/.idx path prefixes")
        _require(cfg.data.weights is None or len(cfg.data.weights) == len(cfg.data.prefixes),
                 f"data.weights has {len(cfg.data.weights or [])} entries for "
                 f"{len(cfg.data.prefixes)} data.prefixes; give one weight per prefix")
        _check_split(cfg.data.split)
    router_config_for(cfg)  # router name and its fields
    return cfg
