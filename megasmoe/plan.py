"""Capacity planning: parameters, per-rank memory, FLOPs and communication of a layout.

    megasmoe plan CONFIG [key=value ...] [--gpus N] [--gpu-memory 80GB] [--layouts]

Everything here is arithmetic on the config (no torch, no megatron): it answers in a
fraction of a second for a 47B-parameter recipe. The formulas follow what megasmoe builds
with megatron-core, and the tests hold them to it: parameter counts against the real
model built on the meta device, memory against measured peaks of real runs
(docs/planning.md has the model, the measurements and their error).

Memory of one rank (the most loaded pipeline stage, or the one asked for):

- **weights**: the rank's slice after TP (attention, dense MLP, shared expert, vocabulary),
  EP x ETP (routed experts) and PP (layers; embedding on the first stage, output layer on
  the last); norms and routers are replicated. Bytes per parameter: 2 (bf16) or 4 (fp32).
- **gradients**: megatron's fp32 main-grad buffers, 4 bytes per parameter.
- **optimizer**: Adam's two fp32 moments, plus an fp32 master copy when the weights are
  bf16 (8 or 12 bytes per parameter); the distributed optimizer divides them by the
  data-parallel group of each parameter (dense: dp x cp; experts: the expert
  data-parallel group, tp x cp x dp / (ep x etp)).
- **activations**: what autograd keeps per layer and micro batch (Korthikanti et al.,
  2022, "Reducing Activation Recomputation in Large Transformer Models", redone for
  this architecture: RMSNorm, GQA, SwiGLU, routed experts seeing top-k copies of each
  token), divided by TP under sequence parallelism; with full recompute only each
  layer's input is kept, plus one layer recomputed during backward. Times the micro
  batches in flight: 1 without a pipeline, pp - stage for 1F1B, megatron's warm-up
  count for interleaved 1F1B. The last stage adds the logits and the cross entropy's
  softmax (one micro batch).
- **overhead**: a fixed framework constant (CPU: the measured resident size of a
  process that imports torch, megatron-core and megasmoe and joins a gloo group; GPU:
  CUDA context, NCCL and allocator slack).

Communication is stated in bytes per step per rank, by kind (DP gradient reduction,
TP/SP collectives, EP all-to-all, PP point-to-point) and turned into seconds with the
bandwidth of the link the group spans (inside a node or across nodes).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import re
from dataclasses import dataclass, field
from typing import Optional

__all__ = [
    "Hardware",
    "ParamCount",
    "MemoryEstimate",
    "CommEstimate",
    "Plan",
    "PlanError",
    "count_parameters",
    "flops_per_token",
    "padded_vocab",
    "stage_layers",
    "estimate_memory",
    "estimate_comm",
    "make_plan",
    "search_layouts",
    "format_plan",
    "parse_memory",
    "add_subcommand",
    "CPU_BASELINE_GB",
    "GPU_OVERHEAD_GB",
]

GB = 2**30

CPU_BASELINE_GB = 0.353
"""Peak RSS of a CPU process that imports torch, megatron-core and megasmoe's training
stack and joins a one-rank gloo group, building nothing (torch 2.13.0+cpu,
megatron-core 0.16.1; measured as in docs/planning.md)."""

GPU_OVERHEAD_GB = 4.0
"""Per-GPU memory outside the tensors counted here: CUDA context and kernels, NCCL
buffers, allocator fragmentation. A planning allowance, not a measurement."""


class PlanError(ValueError):
    """Nothing fits: one line per problem."""


@dataclass
class Hardware:
    """What the plan runs on."""

    gpus: int
    """Number of processes (GPUs)."""
    memory_gb: Optional[float] = None
    """Memory per GPU in GiB; None = do not judge the fit."""
    gpus_per_node: int = 8
    """GPUs per node: groups that fit in a node use the intra-node bandwidth."""
    intra_node_gbps: float = 150.0
    """Effective bandwidth per GPU inside a node, GB/s (NVLink, achieved)."""
    inter_node_gbps: float = 20.0
    """Effective bandwidth per GPU across nodes, GB/s (one 200 Gb/s NIC per GPU, achieved)."""
    tflops: float = 400.0
    """Achieved bf16 TFLOP/s per GPU for the step-time estimate (H100: ~40% of peak)."""
    device: str = "gpu"
    """gpu or cpu: precision auto, attention/norm kernels and the overhead constant."""


# --------------------------------------------------------------------------- shapes


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


# --------------------------------------------------------------------------- memory


@dataclass
class MemoryEstimate:
    """Bytes on one rank."""

    stage: int
    """Pipeline stage of this rank."""
    params: float
    """Parameters on this rank (count)."""
    weights: float
    gradients: float
    optimizer: float
    """Optimizer state as configured (train.distributed_optimizer)."""
    optimizer_replicated: float
    """... without the distributed optimizer."""
    optimizer_distributed: float
    """... with the distributed optimizer."""
    activations: float
    """As configured (train.recompute)."""
    activations_full: float
    """... without recompute."""
    activations_recompute: float
    """... with full recompute."""
    in_flight: int
    """Micro batches whose activations are held at once (chunk-micro batches for VPP)."""
    overhead: float
    """Framework constant."""

    @property
    def total(self) -> float:
        """Peak bytes of this rank, as configured."""
        return self.weights + self.gradients + self.optimizer + self.activations + self.overhead


def _precision(cfg, device: str) -> str:
    precision = cfg.train.precision
    if precision == "auto":
        precision = "bf16" if device == "gpu" else "fp32"
    return precision


def _stage_params(cfg, stage: int) -> tuple[float, float, float]:
    """(dense params, expert params, of which embedding/output) held by ``stage``'s rank."""
    p, m = cfg.parallel, cfg.model
    pattern = _moe_layers(cfg)
    dense = experts = 0.0
    for i in stage_layers(cfg, stage):
        lp = _layer_params(cfg, pattern[i])
        dense += lp.tp / p.tp + lp.replicated
        experts += lp.experts / (p.ep * p.etp)
    vocab = padded_vocab(m.vocab_size, p.tp) * m.hidden_size / p.tp
    edges = 0.0
    if stage == 0:
        edges += vocab
    if stage == p.pp - 1:
        dense += m.hidden_size  # final norm
        if not (m.share_embeddings and p.pp == 1):
            edges += vocab  # output layer (tied at PP > 1: the last stage's copy)
    return dense + edges, experts, edges


def _layer_activation_bytes(cfg, moe: bool, dtype_bytes: int, te: bool) -> float:
    """Bytes autograd keeps for one layer and one micro batch on one rank (no recompute).

    Per token, in elements (Korthikanti et al. 2022's accounting, redone for megatron-core
    0.16's local layers and checked tensor by tensor with saved-tensor hooks, see
    docs/planning.md): each RMSNorm keeps its fp32 input and normalised output (2h, fp32;
    TE: h); attention keeps the QKV projection's input (h), its output (q + 2kv, alive
    through the value view), the rotated q and k (q + kv; q/k norms another q + kv), the
    softmax probabilities (heads x sequence, model.attention=unfused; TE's fused attention
    and SDPA keep a logsumexp per head instead) and the output
    projection's input (q). A MoE layer keeps the router's input and fp32 logits and
    scores (h + 2E) and per routed copy (top-k) the expert's input (h) and 6f: fc1's
    output (2f), the SiLU, the linear half plus megatron's GLU offset, their product and
    the product scaled by the routing probability; a shared expert 5s, a dense MLP
    h + 5F. Sequence parallelism divides everything by TP; expert tokens are gathered
    over ETP and their width split by it.
    """
    m, e, p, t = cfg.model, cfg.moe, cfg.parallel, cfg.train
    h, _, q, kv = _widths(cfg)
    tp, etp = p.tp, p.etp or p.tp
    tokens = t.micro_batch_size * t.seq_length / p.cp
    norm = (h * dtype_bytes) if te else (2 * h * 4)
    attn = h + (q + 2 * kv) + (q + kv) + q
    if m.qk_norm != "none":
        attn += q + kv
    per_token = 2 * norm
    if m.attention == "unfused":
        # megatron's DotProductAttention keeps the [heads, s] softmax probabilities.
        attn += m.num_heads * t.seq_length / p.cp
    else:
        # TE's fused attention or torch SDPA (flash kernels): the output plus one fp32
        # logsumexp per head and token, no scores.
        per_token += m.num_heads * 4
    per_token += attn * dtype_bytes
    if moe:
        per_token += h * dtype_bytes + 2 * e.num_experts * 4
        # The alltoall dispatcher gathers the tokens over ETP: etp x the rank's tokens.
        per_token += etp * e.topk * (h + 6 * e.ffn_hidden_size / etp) * dtype_bytes
        per_token += 5 * e.shared_expert_size * dtype_bytes
    else:
        per_token += (h + 5 * (m.ffn_hidden_size or 4 * h)) * dtype_bytes
    return tokens * per_token / (tp if p.sp or tp == 1 else 1)


def _in_flight(cfg, stage: int) -> int:
    """Micro batches (chunk-micro batches under VPP) whose activations a stage holds."""
    p, t = cfg.parallel, cfg.train
    micro = t.global_batch_size // (t.micro_batch_size * p.dp)
    if p.pp == 1:
        return 1
    if not p.vpp:
        return min(p.pp - stage, micro)
    warmup = (p.pp - stage - 1) * 2 + (p.vpp - 1) * p.pp
    return min(micro * p.vpp, warmup + 1)


def estimate_memory(cfg, stage: Optional[int] = None, device: str = "gpu",
                    overhead_gb: Optional[float] = None) -> MemoryEstimate:
    """Peak memory of one rank of the validated ``cfg`` (the heaviest stage by default)."""
    if stage is None:
        stages = [estimate_memory(cfg, s, device, overhead_gb) for s in range(cfg.parallel.pp)]
        return max(stages, key=lambda s: s.total)
    p, t, m = cfg.parallel, cfg.train, cfg.model
    bf16 = _precision(cfg, device) == "bf16"
    te = device == "gpu" and _te_importable()
    dtype_bytes = 2 if bf16 else 4
    dense, experts, _ = _stage_params(cfg, stage)
    params = dense + experts
    opt_bytes = 12 if bf16 else 8
    dense_dp = p.dp * p.cp
    expert_dp = p.tp * p.cp * p.dp // (p.ep * p.etp)
    opt_full = params * opt_bytes
    opt_dist = (dense / dense_dp + experts / expert_dp) * opt_bytes
    pattern = _moe_layers(cfg)
    layers = stage_layers(cfg, stage)
    per_layer = [_layer_activation_bytes(cfg, pattern[i], dtype_bytes, te) for i in layers]
    in_flight = _in_flight(cfg, stage)
    chunks = p.vpp or 1
    # In flight are micro batches of a whole stage (1F1B) or of one chunk (VPP).
    held = in_flight / chunks
    # The backward of a layer makes gradients about the size of what it saved: one
    # layer's worth on top of what is held (recompute: plus the recomputed layer).
    full = held * sum(per_layer) + max(per_layer)
    tokens = t.micro_batch_size * t.seq_length / p.cp
    layer_input = tokens * m.hidden_size * dtype_bytes / (p.tp if p.sp else 1)
    recompute = held * len(layers) * layer_input + 2 * max(per_layer)
    moe_layers = sum(pattern[i] for i in layers)
    if cfg.moe.expert_backend == "grouped" and moe_layers:
        # grouped_mm's backward returns the weight gradient of all of a layer's local
        # experts as one fp32 tensor before megatron's hook adds it into the gradient
        # buffer (SequentialMLP's per-expert gradients are one expert at a time).
        transient = experts / moe_layers * 4
        full += transient
        recompute += transient
    if stage == p.pp - 1:
        # The cross entropy's fp32 softmax, plus the logits (or their gradient).
        vocab = padded_vocab(m.vocab_size, p.tp) / p.tp
        logits = tokens * vocab * (dtype_bytes + 4)
        full += logits
        recompute += logits
    if overhead_gb is None:
        overhead_gb = GPU_OVERHEAD_GB if device == "gpu" else CPU_BASELINE_GB
    if device == "cpu" and t.distributed_optimizer:
        # Megatron's DDP copies the weights into one contiguous buffer at build; glibc
        # keeps the freed originals, so a CPU process's peak RSS holds them once more.
        overhead_gb += params * dtype_bytes / GB
    return MemoryEstimate(
        stage=stage, params=params, weights=params * dtype_bytes, gradients=params * 4,
        optimizer=opt_dist if t.distributed_optimizer else opt_full,
        optimizer_replicated=opt_full, optimizer_distributed=opt_dist,
        activations=recompute if t.recompute else full,
        activations_full=full, activations_recompute=recompute,
        in_flight=in_flight, overhead=overhead_gb * GB)


def _te_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("transformer_engine") is not None


# --------------------------------------------------------------------------- communication


@dataclass
class CommEstimate:
    """Bytes one rank sends per optimizer step, by kind, and the time they take."""

    bytes: dict = field(default_factory=dict)
    """{kind: bytes per step}: dp, tp, ep, pp, cp."""
    seconds: dict = field(default_factory=dict)
    """{kind: seconds per step} at the bandwidth of the link the group spans."""
    compute_s: float = 0.0
    """Matmul time per step at Hardware.tflops (recompute: one more forward)."""
    bubble: float = 0.0
    """Pipeline bubble fraction (pp - 1) / (micro batches x vpp)."""

    @property
    def step_s(self) -> float:
        """Estimated step time: compute stretched by the bubble, plus communication
        (none of it assumed overlapped: megasmoe does not overlap the DP reduction)."""
        return self.compute_s * (1 + self.bubble) + sum(self.seconds.values())


def estimate_comm(cfg, hw: Hardware) -> CommEstimate:
    """Communication of one rank per step: ring collectives, (n - 1) / n of the data."""
    p, t, m, e = cfg.parallel, cfg.train, cfg.model, cfg.moe
    bf16 = _precision(cfg, hw.device) == "bf16"
    act = 2 if bf16 else 4
    micro = t.global_batch_size // (t.micro_batch_size * p.dp)
    tokens = t.micro_batch_size * t.seq_length / p.cp  # per micro batch on one rank
    h = m.hidden_size
    pattern = _moe_layers(cfg)
    layers = m.num_layers // p.pp
    moe_layers = sum(pattern[i] for i in stage_layers(cfg, 0))
    passes = 3 if t.recompute else 2  # forward (+ recomputed forward) + backward
    ring = lambda n: (n - 1) / n  # noqa: E731
    dense, experts, _ = _stage_params(cfg, 0)
    out: dict[str, float] = {}
    # DP: fp32 gradients reduced (all-reduce = 2x; reduce-scatter + bf16 param all-gather
    # with the distributed optimizer).
    dense_dp, expert_dp = p.dp * p.cp, p.tp * p.cp * p.dp // (p.ep * p.etp)
    if t.distributed_optimizer:
        per = lambda n, x: ring(n) * x * (4 + act)  # noqa: E731
    else:
        per = lambda n, x: 2 * ring(n) * x * 4  # noqa: E731
    out["dp"] = per(dense_dp, dense) + per(expert_dp, experts)
    # TP with SP: per layer an all-gather and a reduce-scatter around attention and around
    # the MLP, forward and backward (the same bytes as two all-reduces without SP).
    out["tp"] = micro * layers * passes * 2 * 2 * ring(p.tp) * tokens * h * act \
        if p.tp > 1 else 0.0
    # EP: dispatch and combine all-to-all of top-k copies of the rank's tokens.
    local_tokens = tokens / (p.tp if p.sp else 1)
    out["ep"] = micro * moe_layers * passes * 2 * ring(p.ep) * e.topk * local_tokens * h * act
    # PP: one activation (forward) and one gradient (backward) per micro batch and chunk.
    out["pp"] = micro * (p.vpp or 1) * 2 * local_tokens * h * act if p.pp > 1 else 0.0
    _, _, q, kv = _widths(cfg)
    out["cp"] = micro * layers * passes * ring(p.cp) * t.micro_batch_size * t.seq_length \
        * 2 * kv / p.tp * act if p.cp > 1 else 0.0
    spans = {"tp": p.tp, "cp": p.tp * p.cp, "ep": p.ep * p.etp, "dp": p.world_size,
             "pp": p.world_size}
    if p.dp * p.tp * p.cp <= hw.gpus_per_node:
        spans["dp"] = p.dp * p.tp * p.cp
    seconds = {}
    for kind, nbytes in out.items():
        bw = hw.intra_node_gbps if spans[kind] <= hw.gpus_per_node else hw.inter_node_gbps
        seconds[kind] = nbytes / (bw * 1e9)
    flops = flops_per_token(cfg) * t.global_batch_size * t.seq_length / p.world_size
    if t.recompute:
        flops *= 4 / 3
    bubble = (p.pp - 1) / (micro * (p.vpp or 1)) if p.pp > 1 else 0.0
    return CommEstimate(bytes=out, seconds=seconds, compute_s=flops / (hw.tflops * 1e12),
                        bubble=bubble)


# --------------------------------------------------------------------------- plans


@dataclass
class Plan:
    """One layout of a config on some hardware: memory, communication, fit."""

    cfg: object
    memory: MemoryEstimate
    comm: CommEstimate
    fits: Optional[bool]
    """None when no memory per GPU was given."""

    def layout(self) -> str:
        """``tp=1 pp=4 vpp=- ep=8 etp=1 cp=1 dp=8 sp=off distopt=on recompute=off``."""
        p, t = self.cfg.parallel, self.cfg.train
        return (f"tp={p.tp} pp={p.pp} vpp={p.vpp or '-'} ep={p.ep} etp={p.etp} cp={p.cp} "
                f"dp={p.dp} sp={'on' if p.sp else 'off'} "
                f"distopt={'on' if t.distributed_optimizer else 'off'} "
                f"recompute={'on' if t.recompute else 'off'}")


def make_plan(cfg, hw: Hardware) -> Plan:
    """The plan of an already validated config."""
    mem = estimate_memory(cfg, device=hw.device)
    fits = None if hw.memory_gb is None else mem.total <= hw.memory_gb * GB
    return Plan(cfg=cfg, memory=mem, comm=estimate_comm(cfg, hw), fits=fits)


def _divisors(n: int, limit: Optional[int] = None) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0 and (limit is None or d <= limit)]


def search_layouts(cfg, hw: Hardware) -> tuple[list[Plan], list[str]]:
    """Every layout of ``cfg``'s model on ``hw.gpus`` that megasmoe's validator accepts
    and that fits, fastest first; and, when none fits, one line per problem.

    Tried: tp (within a node), pp (dividing the layers), vpp (1, 2), ep (dividing the
    experts), etp (1 or tp), cp (1, 2), distributed optimizer and recompute on/off;
    everything else as configured. ``megasmoe.config.validate`` decides what is a valid
    layout (divisibility, EP within DP x CP x TP, batch sizes, ...).
    """
    from megasmoe.config import ConfigError, validate

    n, e = hw.gpus, cfg.moe
    plans, valid = [], []
    for tp, pp, vpp, ep, etp_same, cp, distopt, recompute in itertools.product(
            _divisors(n, hw.gpus_per_node), _divisors(n), (None, 2), _divisors(e.num_experts),
            (False, True), (1, 2), (True, False), (False, True)):
        if n % (tp * pp * cp) or (etp_same and tp == 1) or ep > n:
            continue
        c = copy.deepcopy(cfg)
        c.parallel = dataclasses.replace(c.parallel, tp=tp, pp=pp, vpp=vpp, ep=ep, cp=cp,
                                         etp=tp if etp_same else 1, sp=tp > 1,
                                         world_size=n, dp=None)
        c.train.distributed_optimizer, c.train.recompute = distopt, recompute
        try:
            validate(c, n)
        except ConfigError:
            continue
        q = c.parallel
        if distopt and q.dp * q.cp == 1 and q.tp * q.cp * q.dp == q.ep * q.etp:
            continue  # nothing to shard over: the same layout as without
        plan = make_plan(c, hw)
        valid.append(plan)
        if plan.fits is not False:
            plans.append(plan)
    plans.sort(key=lambda pl: (pl.comm.step_s, pl.memory.total))
    problems: list[str] = []
    if not plans:
        problems = _nothing_fits(cfg, hw, valid)
    return plans, problems


def _nothing_fits(cfg, hw: Hardware, valid: list[Plan]) -> list[str]:
    where = f"{hw.gpus} GPU{'s' if hw.gpus != 1 else ''} of {hw.memory_gb:g} GB"
    if not valid:
        return [f"no parallel layout of this model validates on {where} (tp, pp, ep, cp "
                f"must divide the GPUs, heads, layers and experts; see megasmoe check)"]
    count = count_parameters(cfg)
    states = min(pl.memory.weights + pl.memory.gradients + pl.memory.optimizer
                 for pl in valid) / GB
    best = min(valid, key=lambda pl: pl.memory.total)
    mem = best.memory
    lines = [
        f"smallest layout ({best.layout()}) needs {mem.total / GB:.1f} GB per GPU > "
        f"{hw.memory_gb:g} GB: weights {mem.weights / GB:.1f}, gradients "
        f"{mem.gradients / GB:.1f}, optimizer {mem.optimizer / GB:.1f}, activations "
        f"{mem.activations / GB:.1f}, overhead {mem.overhead / GB:.1f}",
        f"weights + gradients + optimizer state alone are at least {states:.1f} GB per GPU "
        f"for {count.total / 1e9:.1f}B parameters on {hw.gpus} GPUs",
    ]
    total_states = count.total * (2 + 4) + count.total * 12  # bf16 + grads + Adam
    need = -(-int(total_states / GB) // max(1, int(hw.memory_gb - GPU_OVERHEAD_GB)))
    lines.append(f"model states need about {total_states / GB:.0f} GB in all: use at least "
                 f"{max(need, hw.gpus + 1)} GPUs of {hw.memory_gb:g} GB, or GPUs with more "
                 f"memory")
    return lines


# --------------------------------------------------------------------------- output


def parse_memory(text: str) -> float:
    """``80GB``, ``80``, ``141 GiB``, ``512MB`` -> GiB (GB is read as GiB, like nvidia-smi)."""
    mt = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([GMT]i?B?)?\s*", text, flags=re.I)
    if not mt:
        raise ValueError(f"--gpu-memory={text!r}: write a size such as 80GB")
    value, unit = float(mt.group(1)), (mt.group(2) or "G")[0].upper()
    return value * {"M": 1 / 1024, "G": 1.0, "T": 1024.0}[unit]


def _gb(x: float) -> str:
    return f"{x / GB:8.2f}"


def format_plan(plan: Plan, hw: Hardware) -> str:
    """The plan as the table ``megasmoe plan`` prints."""
    cfg, mem, comm = plan.cfg, plan.memory, plan.comm
    count = count_parameters(cfg, cfg.parallel.tp)
    t = cfg.train
    lines = [
        f"model: {count.total / 1e9:.2f}B parameters, {count.active / 1e9:.2f}B active "
        f"({count.total:,} / {count.active:,}); {flops_per_token(cfg) / 1e9:.2f} GFLOPs "
        f"per token (training)",
        f"layout on {hw.gpus} {'GPU' if hw.device == 'gpu' else 'process'}"
        f"{'s' if hw.gpus != 1 else ''}: {plan.layout()}",
        f"precision {_precision(cfg, hw.device)}, dispatcher {cfg.moe.dispatcher}, "
        f"micro batch {t.micro_batch_size} x {t.seq_length} tokens, "
        f"{t.global_batch_size // (t.micro_batch_size * cfg.parallel.dp)} micro batches per "
        f"step",
        "",
        f"memory per rank (GB), pipeline stage {mem.stage} of {cfg.parallel.pp}, "
        f"{mem.params / 1e9:.3f}B parameters:",
        f"  weights                        {_gb(mem.weights)}",
        f"  gradients (fp32 main grads)    {_gb(mem.gradients)}",
        f"  optimizer, replicated          {_gb(mem.optimizer_replicated)}"
        f"{'   <-' if not t.distributed_optimizer else ''}",
        f"  optimizer, distributed         {_gb(mem.optimizer_distributed)}"
        f"{'   <-' if t.distributed_optimizer else ''}",
        f"  activations, no recompute      {_gb(mem.activations_full)}"
        f"{'   <-' if not t.recompute else ''}  ({mem.in_flight} micro batches in flight)",
        f"  activations, full recompute    {_gb(mem.activations_recompute)}"
        f"{'   <-' if t.recompute else ''}",
        f"  overhead                       {_gb(mem.overhead)}",
        f"  total (<- rows)                {_gb(mem.total)}",
    ]
    if plan.fits is not None:
        verdict = "fits" if plan.fits else "does NOT fit"
        lines.append(f"  {verdict} in {hw.memory_gb:g} GB "
                     f"({100 * mem.total / (hw.memory_gb * GB):.0f}% used)")
    lines += ["", "communication per rank per step:"]
    for kind in ("dp", "tp", "ep", "pp", "cp"):
        if comm.bytes.get(kind):
            lines.append(f"  {kind:3s} {comm.bytes[kind] / GB:10.2f} GB  "
                         f"{comm.seconds[kind]:8.3f} s")
    lines.append(f"  compute {comm.compute_s:.3f} s at {hw.tflops:g} TFLOP/s, pipeline bubble "
                 f"{100 * comm.bubble:.0f}%: about {comm.step_s:.2f} s per step")
    return "\n".join(lines)


def format_layouts(plans: list[Plan], hw: Hardware, top: int) -> str:
    """The ranked layout table of ``megasmoe plan --layouts``."""
    head = (f"{len(plans)} layouts fit on {hw.gpus} GPUs"
            f"{f' of {hw.memory_gb:g} GB' if hw.memory_gb else ''}, fastest first "
            f"(showing {min(top, len(plans))}):")
    rows = [head, f"{'#':>3} {'layout':<86} {'GB/rank':>8} {'comm GB':>8} {'step s':>7}"]
    for i, pl in enumerate(plans[:top], 1):
        rows.append(f"{i:>3} {pl.layout():<86} {pl.memory.total / GB:8.1f} "
                    f"{sum(pl.comm.bytes.values()) / GB:8.1f} {pl.comm.step_s:7.2f}")
    return "\n".join(rows)


def _cmd_plan(args) -> int:
    import sys

    from megasmoe.config import ConfigError, load_config, validate

    cfg = load_config(args.config, args.overrides)
    try:
        memory_gb = parse_memory(args.gpu_memory) if args.gpu_memory else None
    except ValueError as err:
        raise ConfigError(str(err)) from None
    gpus = args.gpus or cfg.parallel.world_size
    if gpus is None:
        validate(copy.deepcopy(cfg))
        gpus = cfg.parallel.world_size or 1
    hw = Hardware(gpus=gpus, memory_gb=memory_gb, gpus_per_node=args.gpus_per_node,
                  device=args.device)
    ok = False
    try:
        configured = validate(copy.deepcopy(cfg), gpus) if args.gpus is None else \
            _at_world_size(cfg, gpus)
    except ConfigError as err:
        configured = None
        print(f"megasmoe: plan: the configured layout does not run on {gpus} GPUs: {err}",
              file=sys.stderr)
    if configured is not None:
        plan = make_plan(configured, hw)
        print(format_plan(plan, hw))
        ok = plan.fits is not False
    if not args.layouts:
        if configured is not None and plan.fits is False:
            print(f"megasmoe: plan: {plan.layout()} needs {plan.memory.total / GB:.1f} GB per "
                  f"GPU > {memory_gb:g} GB; try --layouts", file=sys.stderr)
        return 0 if ok else 2
    plans, problems = search_layouts(cfg, hw)
    if plans:
        print()
        print(format_layouts(plans, hw, args.top))
        return 0
    for line in problems:
        print(f"megasmoe: plan: nothing fits: {line}", file=sys.stderr)
    return 2


def _at_world_size(cfg, gpus: int):
    """The config's layout at another world size (dp follows)."""
    from megasmoe.config import validate

    c = copy.deepcopy(cfg)
    c.parallel.world_size, c.parallel.dp = gpus, None
    return validate(c, gpus)


def add_subcommand(subparsers):
    """Register ``megasmoe plan`` on the ``megasmoe`` command's subparsers."""
    p = subparsers.add_parser(
        "plan", help="parameters, memory per GPU, FLOPs, communication; layouts that fit")
    p.add_argument("config", nargs="?", default=None, help="YAML config (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    p.add_argument("--gpus", type=int, default=None,
                   help="number of GPUs (default: the config's parallel.world_size)")
    p.add_argument("--gpu-memory", default=None, help="memory per GPU, e.g. 80GB")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    p.add_argument("--layouts", action="store_true",
                   help="also list every layout that validates and fits, fastest first")
    p.add_argument("--top", type=int, default=15, help="layouts to list (default 15)")
    p.add_argument("--device", choices=("gpu", "cpu"), default="gpu",
                   help="plan for GPUs (default) or for CPU processes (gloo)")
    p.set_defaults(fn=_cmd_plan)
    return p
