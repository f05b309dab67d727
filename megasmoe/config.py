"""The project's configuration: dataclasses, YAML + ``key=value`` overrides, validation.

A run is described by one ``Config`` (sections ``run``, ``model``, ``moe``, ``parallel``,
``train``, ``data``, ``checkpoint``, ``logging``). It is read from a YAML file, then
overridden by dotted ``key=value`` pairs from the command line (values parsed as YAML
and checked against the field's type). ``validate`` runs before any process group
starts and raises ``ConfigError`` with one line naming the field and the fix.
``to_transformer_config`` is the one place that maps it onto megatron-core.

Router-specific fields live under ``moe.router.*``; each router owns a config
dataclass (see megasmoe/routers/) that checks them.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import importlib.util
import inspect
import os
import re
import textwrap
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

__all__ = [
    "Config",
    "ConfigError",
    "load_config",
    "apply_overrides",
    "validate",
    "field_docs",
    "to_dict",
    "save_config",
]


class ConfigError(ValueError):
    """A one-line, user-facing configuration error naming the field and the fix."""


class _Loader(yaml.SafeLoader):
    """YAML 1.1 SafeLoader that also reads 1e-3 / 3E-4 as floats (plain PyYAML wants a dot)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml_load(text: str, where: str):
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}: invalid YAML ({problem}{line})") from None


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


# --------------------------------------------------------------------------- loading


def _nearest(name: str, choices, prefix: str = "") -> str:
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f"; did you mean '{prefix}{match[0]}'?" if match else ""


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin is Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(e)
        names = " or ".join(_type_name(a) for a in args if a is not type(None))
        raise ConfigError(f"{key}: expected {names}, got {value!r}")
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if tp is bool and isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if tp in (list, dict) or origin in (list, dict):
        if not isinstance(value, (origin or tp)):
            raise ConfigError(f"{key}: expected a {_type_name(origin or tp)}, got {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    return value


def _build(cls, data: dict, prefix: str):
    """Build dataclass ``cls`` from a (nested) dict, rejecting unknown keys."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    if cls is RouterSection:
        data = dict(data)
        kwargs = {"name": _coerce(data.pop("name", "topk"), str, prefix + "name")}
        kwargs["options"] = {**data.pop("options", {}), **data}
        return RouterSection(**kwargs)
    kwargs = {}
    for key, value in data.items():
        full = prefix + key
        if full in REPLACED_KEYS:
            raise ConfigError(REPLACED_KEYS[full](value))
        if key not in names:
            raise ConfigError(f"unknown config key '{full}'"
                              f"{_nearest(key, names, prefix)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value or {}, full + ".")
        else:
            kwargs[key] = _coerce(value, tp, full)
    return cls(**kwargs)


REPLACED_KEYS = {
    "moe.grouped_gemm": lambda value: (
        "moe.grouped_gemm was replaced by moe.expert_backend; set moe.expert_backend="
        + ("grouped" if value else "sequential")),
}
"""Keys that were renamed: the one-line message naming the replacement."""


def to_dict(cfg) -> dict:
    """A config as plain nested dicts (router options flattened under moe.router)."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, RouterSection):
            out[f.name] = {"name": value.name, **value.options}
        elif dataclasses.is_dataclass(value):
            out[f.name] = to_dict(value)
        else:
            out[f.name] = value
    return out


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[parts[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """Split ``key=value``; the value is parsed as YAML (so 2 is int, 1e-3 float)."""
    if "=" not in item:
        raise ConfigError(f"override '{item}': expected key=value, e.g. train.steps=20")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{item}': empty key; write key=value, e.g. train.steps=20")
    try:
        value = yaml.load(raw, Loader=_Loader) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    """Apply dotted ``key=value`` overrides to a nested dict (types checked on build)."""
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(tree, key, value)
    return tree


def load_config(path: Optional[str | Path] = None, overrides: tuple | list = ()) -> Config:
    """Read a YAML config (or the defaults), apply overrides, build and type-check it."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' not found; pass a YAML file under configs/")
        tree = _yaml_load(path.read_text(), f"config file '{path}'") or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"config file '{path}': top level must be a mapping of sections")
    env = os.environ.get(OVERRIDES_ENV, "").split()
    if env:
        try:
            apply_overrides(tree, env)
        except ConfigError as e:
            raise ConfigError(f"{OVERRIDES_ENV}: {e}") from None
    apply_overrides(tree, list(overrides))
    cfg = _build(Config, tree, "")
    _absolute_paths(cfg)
    return cfg


OVERRIDES_ENV = "MEGASMOE_OVERRIDES"
"""Environment variable of extra ``key=value`` overrides (space-separated), applied after
the config file and before the command line's (which win): sets a field for every command
of a script at once (the docs test runs the README's commands at small sizes with it)."""

CALLER_DIR_ENV = "MEGASMOE_CALLER_DIR"
"""Environment variable naming the directory the user ran the command from.
launch/pretrain.sh sets it (the sbatch submit directory under SLURM) before it changes
into the repository; without it that is the current directory."""

PATH_FIELDS = (("run", "dir"), ("data", "tokenizer"), ("data", "cache_dir"),
               ("data", "index_cache_dir"))
"""(section, field) of config fields holding one path; data.prefixes is a list of them."""


def caller_dir() -> Path:
    """The directory relative paths a user gives are relative to (see CALLER_DIR_ENV)."""
    return Path(os.environ.get(CALLER_DIR_ENV) or os.getcwd())


def _absolute(value: str) -> str:
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else caller_dir() / path)


def _absolute_paths(cfg: "Config") -> None:
    """Make every user-given path absolute, relative to the caller's directory.

    A user types paths relative to where they are; launch/pretrain.sh runs from the
    repository root, and the run's saved config.yaml must still point at the same files
    when resumed from anywhere. The default run directory (runs/<run.name>, no run.dir)
    stays relative to the working directory: the repository root under the launch script.
    """
    for section, name in PATH_FIELDS:
        value = getattr(getattr(cfg, section), name)
        if value:
            setattr(getattr(cfg, section), name, _absolute(str(value)))
    cfg.data.prefixes = [_absolute(str(p)) for p in cfg.data.prefixes]
    steer = cfg.moe.router.options.get("file")
    if isinstance(steer, str) and steer:
        cfg.moe.router.options["file"] = _absolute(steer)


def save_config(cfg: Config, path: Path) -> None:
    """Write the resolved config as YAML (atomically: temp file then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    tmp.replace(path)


# --------------------------------------------------------------------------- validation


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
