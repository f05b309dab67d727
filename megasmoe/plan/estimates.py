"""Per-rank memory and per-step communication of one layout of a validated config, and
the Plan that holds both with the fit.

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

Also here: the unit GB, the overhead constants (CPU_BASELINE_GB, GPU_OVERHEAD_GB),
Hardware (what a plan runs on) and Plan / make_plan (one layout's memory, communication
and fit). The shapes and counts these build on are in megasmoe.plan.sizes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from megasmoe.plan.sizes import (
    _layer_params,
    _moe_layers,
    _widths,
    flops_per_token,
    padded_vocab,
    stage_layers,
)

GB = 2**30

CPU_BASELINE_GB = 0.353
"""Peak RSS of a CPU process that imports torch, megatron-core and megasmoe's training
stack and joins a one-rank gloo group, building nothing (torch 2.13.0+cpu,
megatron-core 0.16.1; measured as in docs/planning.md)."""

GPU_OVERHEAD_GB = 4.0
"""Per-GPU memory outside the tensors counted here: CUDA context and kernels, NCCL
buffers, allocator fragmentation. A planning allowance, not a measurement."""


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
