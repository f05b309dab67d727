"""The model: megatron-core GPTModel with MoE layers, built from megatron-core layer specs.

SwiGLU experts, RMSNorm, RoPE, optional shared expert, MoE layer frequency. The layer
specs are megatron-core's own: the Transformer Engine spec when TE imports, else the
local spec with its norms swapped for ``RMSNorm`` below (megatron's local torch norm
refuses sequence parallel) and its core attention for torch SDPA (``model.attention``,
megasmoe/attention.py). The router comes from the registry through the
``MoESubmodules.router`` plug point, so nothing here knows which router is used; each
built MoE layer becomes a ``megasmoe.moe.MegasmoeMoELayer`` (megatron's, plus the
extension point for routers that need expert outputs or a second branch).
"""

from __future__ import annotations

import copy
import zlib
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.transformer_config import TransformerConfig

from megasmoe.attention import SDPAttention
from megasmoe.config import Config
from megasmoe.experts import experts_spec
from megasmoe.moe import extend_moe_layer, use_local_dispatcher
from megasmoe.routers import router_config_for, router_spec

__all__ = [
    "RMSNorm",
    "FullWidthQNorm",
    "FullWidthKNorm",
    "te_available",
    "core_attention_module",
    "padded_vocab_size",
    "to_transformer_config",
    "decoder_block_spec",
    "build_model_chunks",
    "layout_invariant_init",
    "sharded_tensors",
]


def te_available() -> bool:
    """True when Transformer Engine imports (then its layer spec is used)."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        return False
    return True


class RMSNorm(torch.nn.Module):
    """RMSNorm that works under sequence parallelism (megatron norm-module signature).

    The weight is marked ``sequence_parallel`` so megatron's ``finalize_model_grads``
    all-reduces its gradient over the tensor-parallel group: each TP rank only sees its
    slice of the sequence.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **kwargs):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise the last dimension in fp32, scale, cast back."""
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x.dtype)


class _FullWidthNorm(torch.nn.Module):
    """RMSNorm over all heads of a query or key projection (OLMoE's q_norm / k_norm).

    megatron's ``qk_layernorm`` normalises each head on its own; OLMoE normalises the
    whole projection (heads x head_dim) per token. Attention hands the norm this
    rank's heads, [..., heads, head_dim]; under tensor parallelism the per-token sum
    of squares is all-reduced over the TP group (an all-reduce whose backward is an
    all-reduce, so every rank's gradient sees all heads). The weight is sharded over TP
    like the heads, so megatron's TP all-reduce of q/k-norm gradients must stay off
    (``qk_layernorm=False`` in the TransformerConfig; this module is placed in the spec
    directly).
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5,
                 **kwargs):
        super().__init__()
        self.eps = eps
        self.head_dim = hidden_size  # megatron passes the per-head size
        self.tp = config.tensor_model_parallel_size
        self.full_width = self._heads(config) * hidden_size
        local = self.full_width // self.tp
        self.weight = torch.nn.Parameter(torch.ones(local, dtype=config.params_dtype))
        # Each TP rank holds the slice of its heads (contiguous, like the heads).
        setattr(self.weight, "tensor_model_parallel", True)
        setattr(self.weight, "partition_dim", 0)
        setattr(self.weight, "partition_stride", 1)

    @staticmethod
    def _heads(config: TransformerConfig) -> int:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise [..., heads, head_dim] over (heads, head_dim) of all TP ranks."""
        xf = x.float()
        sq = xf.pow(2).sum(dim=(-2, -1), keepdim=True)
        if self.tp > 1:
            from torch.distributed.nn.functional import all_reduce

            sq = all_reduce(sq, group=parallel_state.get_tensor_model_parallel_group())
        normed = xf * torch.rsqrt(sq / self.full_width + self.eps)
        weight = self.weight.float().view(-1, self.head_dim)
        return (normed * weight).to(x.dtype)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: Optional[dict] = None) -> dict:
        """The weight as one global [heads x head_dim] tensor, TP-sharded on axis 0."""
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        return make_sharded_tensors_for_checkpoint(
            self.state_dict(prefix="", keep_vars=True), prefix, {"weight": 0}, sharded_offsets)


class FullWidthQNorm(_FullWidthNorm):
    """Full-width RMSNorm of the queries (all attention heads)."""

    @staticmethod
    def _heads(config: TransformerConfig) -> int:
        return config.num_attention_heads


class FullWidthKNorm(_FullWidthNorm):
    """Full-width RMSNorm of the keys (all key/value groups)."""

    @staticmethod
    def _heads(config: TransformerConfig) -> int:
        return config.num_query_groups or config.num_attention_heads


def padded_vocab_size(vocab_size: int, tp: int, multiple: int = 128) -> int:
    """Megatron's vocab padding: round up to a multiple of ``multiple x tp``."""
    step = multiple * tp
    return ((vocab_size + step - 1) // step) * step


def _dtypes(cfg: Config) -> tuple[torch.dtype, bool]:
    precision = cfg.train.precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() else "fp32"
    return (torch.bfloat16, True) if precision == "bf16" else (torch.float32, False)


def to_transformer_config(cfg: Config) -> TransformerConfig:
    """The one mapping from megasmoe's Config to megatron-core's TransformerConfig."""
    m, e, p, t = cfg.model, cfg.moe, cfg.parallel, cfg.train
    dtype, bf16 = _dtypes(cfg)
    on_cpu = not torch.cuda.is_available()
    fields = dict(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_heads,
        num_query_groups=m.num_query_groups,
        kv_channels=m.head_dim,  # None: megatron's hidden_size / num_heads
        # Per-head q/k norms (qk_norm=head) are megatron's own; full-width ones are our
        # module, placed in the spec, and must not get megatron's TP grad all-reduce.
        qk_layernorm=m.qk_norm == "head",
        ffn_hidden_size=m.ffn_hidden_size or 4 * m.hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=m.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=m.qkv_bias,
        hidden_dropout=m.dropout,
        attention_dropout=m.dropout,
        init_method_std=m.init_std,
        tensor_model_parallel_size=p.tp,
        pipeline_model_parallel_size=p.pp,
        virtual_pipeline_model_parallel_size=p.vpp,
        context_parallel_size=p.cp,
        expert_model_parallel_size=p.ep,
        expert_tensor_parallel_size=p.etp if p.etp is not None else p.tp,
        sequence_parallel=p.sp,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=bf16,
        # Loss is summed per token and divided by the global token count in
        # finalize_model_grads: every layout sees the same normalisation.
        calculate_per_token_loss=True,
        num_moe_experts=e.num_experts,
        moe_router_topk=e.topk,
        moe_ffn_hidden_size=e.ffn_hidden_size,
        moe_layer_freq=e.layer_freq,
        moe_shared_expert_intermediate_size=e.shared_expert_size or None,
        moe_shared_expert_gate=e.shared_expert_gate,
        moe_token_dispatcher_type=e.dispatcher,
        moe_router_load_balancing_type=e.aux_loss_type,
        moe_aux_loss_coeff=0.0 if e.aux_loss_type == "none" else e.aux_loss_coeff,
        moe_z_loss_coeff=e.z_loss_coeff,
        moe_expert_capacity_factor=e.capacity_factor,
        moe_grouped_gemm=e.expert_backend == "te",  # TEGroupedMLP; grouped: our spec
        moe_router_dtype=e.router_dtype,
        # The fused kernels below need apex / TE / CUDA; the unfused paths are exact.
        use_cpu_initialization=on_cpu,
        gradient_accumulation_fusion=False,
        masked_softmax_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        moe_permute_fusion=False,
        # gloo matches point-to-point messages between two ranks by posting order and
        # tag. Batched p2p posts send_prev before send_next; at PP=2 both go to the same
        # peer, whose receives are posted in the other order, so a gradient would land
        # in an activation buffer (seen with interleaved PP). The unbatched path orders
        # by rank parity over two groups and is exact on gloo; NCCL keeps batching.
        batch_p2p_comm=not on_cpu,
    )
    if e.expert_backend == "te" and t.fp8 is not None:
        # Transformer Engine's own recipes (its layers in the model run in FP8).
        fields.update(fp8="hybrid", fp8_recipe=t.fp8)
    if t.recompute:
        fields.update(recompute_granularity="full", recompute_method="uniform",
                      recompute_num_layers=1)
    fields.update(router_config_for(cfg).transformer_config_overrides())
    return TransformerConfig(**fields)


def core_attention_module(attention: str, use_te: bool) -> Optional[type]:
    """The core-attention class for ``model.attention``; None keeps the spec's own (TE's).

    auto: TE's fused attention when TE imports, else torch SDPA (megasmoe/attention.py);
    sdpa: torch SDPA; unfused: megatron's DotProductAttention (the reference).
    """
    if attention == "auto":
        return None if use_te else SDPAttention
    return {"sdpa": SDPAttention, "unfused": DotProductAttention}[attention]


def decoder_block_spec(tc: TransformerConfig, cfg: Config, vp_stage: Optional[int] = None):
    """megatron-core's GPT decoder block spec for this stage, with our router, norms and
    core attention."""
    use_te = te_available()
    block = get_gpt_decoder_block_spec(
        tc, use_transformer_engine=use_te, normalization="RMSNorm", vp_stage=vp_stage,
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
    )
    router = router_spec(cfg)
    core_attention = core_attention_module(cfg.model.attention, use_te)
    layers = []
    for spec in block.layer_specs:
        spec = copy.deepcopy(spec)  # megatron shares one spec object across layers
        sub = spec.submodules
        if not use_te:
            sub.input_layernorm = RMSNorm
            sub.pre_mlp_layernorm = RMSNorm
        attn = sub.self_attention.submodules
        if core_attention is not None:
            attn.core_attention = core_attention
        if cfg.model.qk_norm == "full":
            attn.q_layernorm, attn.k_layernorm = FullWidthQNorm, FullWidthKNorm
        elif cfg.model.qk_norm == "head" and not use_te:
            attn.q_layernorm = attn.k_layernorm = RMSNorm
        if getattr(sub.mlp, "module", None) is MoELayer:
            sub.mlp.submodules.router = router
            sub.mlp.submodules.experts = experts_spec(cfg, sub.mlp.submodules.experts)
        layers.append(spec)
    block.layer_specs = layers
    if not use_te:
        block.layer_norm = RMSNorm
    return block


def build_model_chunks(cfg: Config, tc: TransformerConfig) -> list[GPTModel]:
    """The GPTModel chunks of this rank (one per virtual pipeline stage), un-wrapped."""
    vpp = cfg.parallel.vpp
    stages = range(vpp) if vpp else [None]
    chunks = []
    for vp_stage in stages:
        model = GPTModel(
            config=tc,
            transformer_layer_spec=decoder_block_spec(tc, cfg, vp_stage),
            vocab_size=padded_vocab_size(cfg.model.vocab_size, cfg.parallel.tp),
            max_sequence_length=cfg.train.seq_length,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            share_embeddings_and_output_weights=cfg.model.share_embeddings,
            position_embedding_type="rope",
            rotary_base=cfg.model.rope_base,
            rotary_percent=cfg.model.rotary_percent,
            vp_stage=vp_stage,
        )
        mark_expert_params(model)
        for module in model.modules():
            # Routers that read expert weights (spectral) or hook the layer get it here.
            if isinstance(module, MoELayer):
                extend_moe_layer(module)
                use_local_dispatcher(module)  # where no token leaves its rank
                module.router.bind_moe_layer(module)
        chunks.append(model)
    return chunks


def mark_expert_params(model: torch.nn.Module) -> None:
    """Treat routed-expert weights as expert-parallel even at EP=1.

    megatron-core marks expert weights (``allreduce=False``) only when EP > 1, so the
    optimizer is one group at EP=1 and a chain (dense, expert) at EP > 1, and an
    optimizer checkpoint cannot move between them. Marking them always makes the
    structure layout-independent; at EP=1 the expert data-parallel group is the data
    parallel group, so the gradient reduction is the same.
    """
    for name, param in model.named_parameters():
        if ".mlp.experts." in f".{name}":
            param.allreduce = False


_OUTPUT_PROJECTIONS = ("linear_proj.weight", "linear_fc2.weight")


def sharded_tensors(tree):
    """Every ShardedTensor in a (nested) sharded state dict, factories built."""
    if isinstance(tree, dict):
        for value in tree.values():
            yield from sharded_tensors(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            yield from sharded_tensors(value)
    elif isinstance(tree, ShardedTensorFactory):
        yield from sharded_tensors(tree.build())
    elif isinstance(tree, ShardedTensor):
        yield tree


@torch.no_grad()
def layout_invariant_init(chunks: list, seed: int, std: float, num_layers: int) -> None:
    """Re-initialise every random weight so its values depend only on its global identity.

    Megatron draws init values in the order a rank builds its modules, so a model built
    at TP=2, PP=2 or EP=2 starts from different weights than at world size 1. Here each
    weight (matrix; norms and biases keep their constant init) is drawn from a generator
    seeded by (seed, checkpoint key, expert/GLU index) over its global per-key shape,
    and each rank keeps its slice: every layout starts from the same model.
    Output projections get std / sqrt(2 num_layers), like megatron's scaled init.
    A parameter with a ``megasmoe_init`` attribute (routers) uses that init instead,
    whatever its rank. Values are drawn on CPU (same numbers on every device).
    """
    out_std = std / (2.0 * num_layers) ** 0.5
    for chunk in chunks:
        for sh in sharded_tensors(chunk.sharded_state_dict()):
            data = sh.data
            custom = getattr(data, "megasmoe_init", None)
            if data is None or not data.is_floating_point() or (data.dim() < 2 and not custom):
                continue
            pre = sh.prepend_axis_num
            ident = f"{sh.key}|{sh.global_offset[:pre]}"
            gen = torch.Generator()
            gen.manual_seed((seed * 1_000_003 + zlib.crc32(ident.encode())) % (2**63))
            shape = tuple(sh.global_shape[pre:])
            if custom is not None:
                # The authors' init of a router parameter (orthogonal, Linear default...).
                full = custom(shape, gen).float()
            else:
                scale = out_std if sh.key.endswith(_OUTPUT_PROJECTIONS) else std
                full = torch.randn(shape, generator=gen, dtype=torch.float32) * scale
            index = tuple(
                slice(o, o + n) for o, n in zip(sh.global_offset[pre:], sh.local_shape)
            )
            data.copy_(full[index].reshape(data.shape).to(device=data.device, dtype=data.dtype))
