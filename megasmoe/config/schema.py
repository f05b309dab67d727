"""The configuration schema: one dataclass per section, each field documented.

A run is described by one ``Config`` (sections ``run``, ``model``, ``moe``, ``parallel``,
``train``, ``data``, ``checkpoint``, ``logging``). A field's attribute docstring is its
documentation (``field_docs``; ``megasmoe config-reference`` prints them).
``to_transformer_config`` (megasmoe/model.py) is the one place that maps it onto megatron-core.

Router-specific fields live under ``moe.router.*``; each router owns a config
dataclass (see megasmoe/routers/) that checks them.
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

__all__ = [
    "ConfigError",
    "RunConfig",
    "ModelConfig",
    "RouterSection",
    "MoEConfig",
    "ParallelConfig",
    "TrainConfig",
    "DataConfig",
    "CheckpointConfig",
    "LoggingConfig",
    "Config",
    "field_docs",
]


class ConfigError(ValueError):
    """A one-line, user-facing configuration error naming the field and the fix."""


@dataclass
class RunConfig:
    """Where the run lives and how it is seeded."""

    name: str = "tiny-cpu"
    """Run name; the run directory defaults to runs/<name>."""
    dir: Optional[str] = None
    """Run directory (outputs, config.yaml, metrics, TensorBoard events); default runs/<name>."""
    seed: int = 1234
    """Seed of parameter init, dropout and data order; same seed, same run."""

    @property
    def path(self) -> Path:
        """The resolved run directory."""
        return Path(self.dir) if self.dir else Path("runs") / self.name


@dataclass
class ModelConfig:
    """Shape of the GPT decoder (megatron-core GPTModel)."""

    num_layers: int = 4
    """Number of transformer layers."""
    hidden_size: int = 128
    """Model width d."""
    num_heads: int = 4
    """Attention heads; must be divisible by parallel.tp."""
    num_query_groups: Optional[int] = None
    """Key/value heads for grouped-query attention; null = num_heads (multi-head)."""
    ffn_hidden_size: Optional[int] = None
    """FFN width of dense (non-MoE) layers; null = 4 x hidden_size."""
    vocab_size: int = 4096
    """Vocabulary size (padded up to a multiple of 128 x tp, like megatron)."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    rope_base: int = 10000
    """Rotary embedding base."""
    rotary_percent: float = 1.0
    """Fraction of each head that RoPE rotates (its first dimensions); 1.0 = all
    (megatron's rotary_percent, HF partial_rotary_factor)."""
    init_std: float = 0.02
    """Std of the normal init of weights; output projections use std / sqrt(2 num_layers)."""
    share_embeddings: bool = False
    """Tie input embedding and output layer weights."""
    dropout: float = 0.0
    """Hidden and attention dropout."""
    head_dim: Optional[int] = None
    """Width of each attention head; null = hidden_size / num_heads (megatron's
    kv_channels)."""
    qkv_bias: bool = False
    """Biases on the query/key/value projections (Qwen-MoE); megatron's add_qkv_bias."""
    qk_norm: str = "none"
    """RMSNorm of queries and keys before RoPE: none, head (each head on its own,
    megatron's qk_layernorm, as in Qwen3-MoE) or full (the whole q / k projection,
    all heads at once, as in OLMoE)."""
    attention: str = "auto"
    """Core attention: auto (Transformer Engine's fused attention when TE imports, else
    sdpa), sdpa (torch scaled_dot_product_attention: flash / memory-efficient kernels on
    GPU) or unfused (megatron's DotProductAttention)."""


@dataclass
class RouterSection:
    """Router selection; extra keys are the chosen router's own fields."""

    name: str = "topk"
    """Registered router name (see `megasmoe routers`)."""
    options: dict = field(default_factory=dict)
    """Router-specific fields (written directly as moe.router.<field>)."""


@dataclass
class MoEConfig:
    """Mixture-of-Experts layers."""

    num_experts: int = 8
    """Routed experts per MoE layer; must be divisible by parallel.ep."""
    topk: int = 2
    """Experts per token."""
    ffn_hidden_size: int = 256
    """FFN width of each expert (SwiGLU)."""
    layer_freq: Union[int, list] = 1
    """1 = every layer is MoE; N = every N-th layer; or a 0/1 list per layer."""
    shared_expert_size: int = 0
    """FFN width of an always-on shared expert; 0 = none."""
    shared_expert_gate: bool = False
    """Scale the shared expert's output by sigmoid(w . x), a learned per-token gate
    (Qwen2-MoE; megatron's moe_shared_expert_gate)."""
    dispatcher: str = "alltoall"
    """Token dispatcher: allgather, alltoall or flex (DeepEP, GPU only). Where a layer's
    expert group is one rank (parallel.ep=1, expert TP 1) no token leaves its rank and
    megasmoe's local dispatcher runs instead, with the same result (megasmoe/moe/dispatch.py)."""
    aux_loss_type: str = "aux_loss"
    """Load-balancing loss: aux_loss, seq_aux_loss, global_aux_loss or none."""
    aux_loss_coeff: float = 0.01
    """Coefficient of the load-balancing loss."""
    aux_loss_normalization: str = "megatron"
    """Normalisation of every router's balance loss E sum_e f_e P_e, the same for all routers
    so that equal moe.aux_loss_coeff means equal pressure: megatron (P_e = sum_t p_te / T,
    1 at uniform load; megatron-core's, k times the seed papers') or paper (P_e = sum_t
    p_te / (T k), 1/k at uniform load; the papers', i.e. the coefficient divided by k)."""
    z_loss_coeff: Optional[float] = None
    """Router z-loss coefficient; null = off."""
    capacity_factor: Optional[float] = None
    """Expert capacity factor (token dropping); null = dropless."""
    expert_backend: str = "grouped"
    """Expert computation: grouped (one torch grouped GEMM per projection, CPU and GPU;
    the default), sequential (megatron SequentialMLP, the reference) or te (Transformer
    Engine GroupedLinear). All three load each other's checkpoints."""
    router_dtype: str = "fp32"
    """Precision of routing math: fp32 or fp64."""
    router: RouterSection = field(default_factory=RouterSection)
    """The router (moe.router.name plus its fields)."""


@dataclass
class ParallelConfig:
    """Parallel layout; world size must equal tp x pp x cp x dp."""

    tp: int = 1
    """Tensor-parallel size."""
    pp: int = 1
    """Pipeline-parallel size."""
    vpp: Optional[int] = None
    """Virtual pipeline stages per rank (interleaved 1F1B); null = off."""
    ep: int = 1
    """Expert-parallel size (carved from data parallel x context parallel x tp)."""
    etp: Optional[int] = None
    """Expert tensor-parallel size; null = same as tp."""
    cp: int = 1
    """Context-parallel size."""
    sp: bool = False
    """Sequence parallel (required with tp > 1 and MoE)."""
    world_size: Optional[int] = None
    """Number of processes; null = tp x pp x cp x (dp from the batch sizes), else checked."""
    dp: Optional[int] = None
    """Data-parallel size; null = world_size / (tp x pp x cp)."""


@dataclass
class TrainConfig:
    """Optimisation and schedule."""

    steps: int = 200
    """Optimizer steps to train."""
    micro_batch_size: int = 4
    """Sequences per micro batch per data-parallel rank."""
    global_batch_size: int = 8
    """Sequences per optimizer step; divisible by micro_batch_size x dp."""
    seq_length: int = 128
    """Tokens per sequence."""
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr: float = 1e-4
    """Final learning rate of the decay."""
    lr_schedule: str = "cosine"
    """LR decay: cosine, linear, constant or wsd (warmup-stable-decay)."""
    warmup_steps: int = 10
    """Linear warmup steps."""
    wsd_decay_steps: Optional[int] = None
    """Steps of the final decay for lr_schedule=wsd; null = 10% of steps."""
    weight_decay: float = 0.1
    """AdamW weight decay."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.95
    """Adam beta2."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    clip_grad: float = 1.0
    """Global gradient-norm clip; 0 = off."""
    distributed_optimizer: bool = False
    """Shard optimizer state over data parallel (megatron DistributedOptimizer)."""
    precision: str = "auto"
    """auto (bf16 on GPU, fp32 on CPU), fp32 or bf16."""
    log_interval: int = 10
    """Steps between console/TensorBoard logs."""
    eval_interval: int = 50
    """Steps between validation runs; 0 = only at the end."""
    eval_iters: int = 4
    """Validation batches (of global_batch_size) per evaluation."""
    recompute: bool = False
    """Full activation recomputation of each layer (saves memory)."""
    exit_at_step: Optional[int] = None
    """Stop after this step with a checkpoint (the LR schedule still spans train.steps)."""
    fp8: Optional[str] = None
    """FP8 expert GEMMs: null (off), tensorwise or rowwise (dynamic scales, grouped or te
    backend), or TE's delayed, blockwise, mxfp8 (te backend)."""
    collective_timeout: Union[int, float, str] = "10m"
    """How long a collective waits for the other ranks before failing, on every process
    group (megatron's too); also how long a rank's heartbeat may stop (at most 60 s) before
    the watchdog calls it lost and exits. Seconds (600, 90s) or minutes (10m, 10min)."""


@dataclass
class DataConfig:
    """Training data."""

    source: str = "corpus"
    """corpus (the embedded English corpus, tokenized on first use), indexed (your Megatron
    .bin/.idx prefixes) or mock (megatron's synthetic data)."""
    prefixes: list = field(default_factory=list)
    """Indexed-dataset path prefixes (without .bin/.idx), for source=indexed."""
    weights: Optional[list] = None
    """Blend weights per prefix; null = proportional to their sizes."""
    split: str = "969,30,1"
    """train,valid,test split of each prefix (Megatron format), for source=indexed."""
    tokenizer: Optional[str] = None
    """SentencePiece .model or Hugging Face tokenizer.json of the data (source=corpus fills
    it in with the tokenizer it trains)."""
    num_workers: int = 0
    """DataLoader worker processes."""
    cache_dir: Optional[str] = None
    """Cache of the prepared corpus; null = $MEGASMOE_CACHE or ~/.cache/megasmoe."""
    index_cache_dir: Optional[str] = None
    """Where megatron's dataset index caches go; null = <run dir>/data_cache."""


@dataclass
class CheckpointConfig:
    """Distributed checkpoints (megatron-core dist_checkpointing, torch_dist)."""

    enabled: bool = True
    """Save checkpoints under <run dir>/checkpoints (at the end, every interval, on signal)."""
    interval: int = 0
    """Steps between checkpoints; 0 = only at the end of training."""
    keep_last: int = 3
    """Keep the newest N checkpoints (older ones are deleted unless permanent); 0 = keep all."""
    keep_every: int = 0
    """Checkpoints at steps divisible by this are permanent (never pruned); 0 = none."""
    resume: bool = True
    """Resume from <run dir>/checkpoints/latest if it exists."""
    resume_step: Optional[int] = None
    """Resume from this iteration instead of latest."""
    async_save: Union[str, bool] = "auto"
    """auto (asynchronous on GPU, synchronous on CPU), true or false."""


@dataclass
class LoggingConfig:
    """Metrics outputs."""

    tensorboard: bool = True
    """Write TensorBoard event files under <run dir>/tensorboard."""
    progress: bool = True
    """Print a console progress line every log_interval steps."""
    heatmaps: bool = True
    """Draw the expert-load heatmap at each evaluation (<run dir>/plots/ and TensorBoard);
    false skips matplotlib, ~1 s per run on a CPU, for short sweeps and tests."""
    collapse_probe_tokens: int = 512
    """Collapse telemetry at each evaluation on the first N valid tokens (rounded up to
    whole sequences): expert-output CKA/cosine, router-weight similarity, effective and
    dead experts, to metrics.jsonl and <run dir>/collapse/ (docs/analysis.md); 0 = off."""


@dataclass
class Config:
    """A complete megasmoe run."""

    run: RunConfig = field(default_factory=RunConfig)
    """Run name, directory and seed."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Decoder shape."""
    moe: MoEConfig = field(default_factory=MoEConfig)
    """MoE layers and router."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Parallel layout."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training data."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Logging outputs."""

    def model_parallel_size(self) -> int:
        """tp x pp x cp: the ranks that hold one model replica."""
        p = self.parallel
        return p.tp * p.pp * p.cp


# --------------------------------------------------------------------------- docs


@functools.lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings of a dataclass: {field name: docstring}."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())  # one line per field
    return docs
