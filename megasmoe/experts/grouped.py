"""``GroupedMLP``: all local experts in one grouped GEMM per projection (torch grouped_mm).

A drop-in for megatron-core's ``SequentialMLP`` in ``MoESubmodules.experts``: same
constructor contract (``num_local_experts, config, submodules, pg_collection``), same
forward contract (the token dispatcher's permuted tokens, grouped by local expert,
``tokens_per_expert`` and the permuted probabilities; returns ``(output, None)``), same
math in the same order (fc1 -> SwiGLU -> x prob -> fc2), and the same checkpoint.

Parameters: ``weight1`` [E_local, fc1_out / etp, H] and ``weight2`` [E_local, H, I / etp];
row e is exactly ``local_experts[e].linear_fcX.weight`` of a SequentialMLP (nn.Linear
layout, fc1 holding [gate; up] of this expert-tensor-parallel shard). ``sharded_state_dict``
emits, through one ShardedTensorFactory per projection, the ShardedTensors SequentialMLP
emits (keys ``...mlp.experts.experts.linear_fc{1,2}.weight``, expert axis prepended with
the global expert id, SwiGLU halves split, ETP offsets, replica ids over the expert
data-parallel group) plus its ``_extra_state`` objects: checkpoints, the layout-invariant
init (seeded by checkpoint key), resharding, the optimizer state (the factory is built
over Adam's moments too) and the HF converter see no difference.

Expert tensor parallelism: like SequentialMLP's linears (``explicit_expert_comm``), the
module communicates nothing; the token dispatcher all-gathers tokens over the ETP group
before the experts and reduce-scatters their partial fc2 sums after.
"""

from __future__ import annotations

import functools
import logging
from copy import deepcopy
from typing import Optional

import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_sharded_object_for_checkpoint,
)
from megatron.core.utils import get_pg_rank, get_pg_size, make_tp_sharded_tensor_for_checkpoint

from megasmoe.experts.fp8 import Fp8GroupedLinear

__all__ = ["GroupedMLP", "grouped_mm_fn", "grouped_linear"]

log = logging.getLogger(__name__)


def grouped_mm_fn():
    """torch's grouped matmul: ``torch.nn.functional.grouped_mm`` (torch >= 2.10) or the
    older private ``torch._grouped_mm``; None when neither exists."""
    return getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


@functools.lru_cache(maxsize=None)
def _grouped_mm_reason(device_type: str, dtype: torch.dtype, k: int, n: int) -> Optional[str]:
    """None when torch's grouped_mm runs [T, k] x [E, k, n] here, else why not (once)."""
    fn = grouped_mm_fn()
    if fn is None:
        return f"torch {torch.__version__} has no grouped_mm"
    size = torch.tensor([], dtype=dtype).element_size()
    if (k * size) % 16 or (n * size) % 16:
        return f"grouped_mm needs rows of 16-byte multiples; got {k} and {n} x {size} bytes"
    try:  # the kernels differ per device and dtype (CUDA: bf16 on sm80+, ...)
        with torch.enable_grad():  # the first call may come from an eval under no_grad
            _probe_grouped_mm(fn, device_type, dtype, k, n)
    except Exception as e:  # noqa: BLE001 - any refusal means: use the per-expert loop
        return f"grouped_mm unsupported for {dtype} on {device_type}: {str(e).splitlines()[0]}"
    return None


def _probe_grouped_mm(fn, device_type: str, dtype: torch.dtype, k: int, n: int) -> None:
    """One tiny forward and backward (an empty group included) on this device/dtype."""
    x = torch.zeros(2, k, dtype=dtype, device=device_type, requires_grad=True)
    w = torch.zeros(2, n, k, dtype=dtype, device=device_type, requires_grad=True)
    offs = torch.tensor([0, 2], dtype=torch.int32, device=device_type)
    fn(x, w.transpose(-2, -1), offs=offs).backward(torch.ones(2, n, dtype=dtype,
                                                              device=device_type))


def _counts(tokens_per_expert: torch.Tensor, rows: int) -> list[int]:
    """Tokens per expert as ints (a host sync on GPU: only the per-expert paths need it)."""
    counts = [int(c) for c in tokens_per_expert.tolist()]
    if sum(counts) != rows:
        raise ValueError(f"tokens_per_expert sums to {sum(counts)} for {rows} tokens")
    return counts


def grouped_linear(x: torch.Tensor, w: torch.Tensor, tokens_per_expert: torch.Tensor,
                   fp8: Optional[str] = None) -> torch.Tensor:
    """y[rows of e] = x[rows of e] @ w[e]^T for tokens grouped by expert.

    x [T, K], w [E, N, K]; ``tokens_per_expert`` [E] sums to T (zeros allowed).
    """
    if fp8 is not None:
        return Fp8GroupedLinear.apply(x, w, _counts(tokens_per_expert, x.shape[0]), fp8)
    reason = _grouped_mm_reason(x.device.type, x.dtype, w.shape[-1], w.shape[-2])
    if reason is None:
        offs = tokens_per_expert.to(device=x.device).cumsum(0).to(torch.int32)
        return _DenseGrad.apply(grouped_mm_fn()(x, w.transpose(-2, -1), offs=offs))
    _warn_once(reason)
    parts = torch.split(x, _counts(tokens_per_expert, x.shape[0]))
    return torch.cat([part @ w[e].t() for e, part in enumerate(parts)])


class _DenseGrad(torch.autograd.Function):
    """Identity whose backward hands grouped_mm a dense gradient: its backward kernels
    refuse the stride-0 gradients of e.g. ``y.sum()`` ("Invalid strides")."""

    @staticmethod
    def forward(ctx, y):
        return y.view_as(y)

    @staticmethod
    def backward(ctx, dy):
        return dy.contiguous()


@functools.lru_cache(maxsize=None)
def _warn_once(reason: str) -> None:
    log.warning("grouped experts: %s; running one matmul per expert", reason)


class GroupedMLP(MegatronModule):
    """The local experts of one MoE layer, one grouped GEMM per projection.

    ``fp8``: None, ``tensorwise`` or ``rowwise`` (megasmoe/experts/fp8.py): the expert
    GEMMs in float8 with scales computed at every call.
    """

    def __init__(self, num_local_experts: int, config, submodules=None, pg_collection=None,
                 fp8: Optional[str] = None):
        if config.moe_ffn_hidden_size != config.ffn_hidden_size:
            config = deepcopy(config)  # as SequentialMLP: the experts' own FFN width
            config.ffn_hidden_size = config.moe_ffn_hidden_size
        super().__init__(config=config)
        if config.add_bias_linear:
            raise ValueError("grouped experts have no biases (add_bias_linear=False)")
        self.num_local_experts = num_local_experts
        self.fp8 = fp8
        self.ep_group = pg_collection.ep
        self.tp_group = pg_collection.expt_tp
        self.dp_group = pg_collection.expt_dp
        etp = get_pg_size(self.tp_group)
        ffn = config.moe_ffn_hidden_size
        if ffn % etp:
            raise ValueError(f"moe ffn_hidden_size={ffn} is not divisible by ETP={etp}")
        fc1_out = (2 if config.gated_linear_unit else 1) * ffn // etp
        hidden = config.hidden_size
        # Like megatron's linears: with use_cpu_initialization no device is named, so the
        # default device applies (CPU, or the meta device a planner builds under).
        kw = dict(dtype=config.params_dtype)
        if not config.use_cpu_initialization:
            kw["device"] = torch.cuda.current_device()
        self.weight1 = torch.nn.Parameter(torch.empty(num_local_experts, fc1_out, hidden, **kw))
        self.weight2 = torch.nn.Parameter(torch.empty(num_local_experts, hidden, ffn // etp, **kw))
        for weight, dim, stride in ((self.weight1, 1, 2 if config.gated_linear_unit else 1),
                                    (self.weight2, 2, 1)):
            # What megatron's expert linears carry: the gradient is reduced over the
            # expert data-parallel group, and each ETP rank's shard counts in the norm.
            weight.allreduce = False
            weight.tensor_model_parallel = True
            weight.partition_dim = dim
            weight.partition_stride = stride
        if config.perform_initialization:
            with torch.no_grad():
                for e in range(num_local_experts):
                    config.init_method(self.weight1[e])
                    config.output_layer_init_method(self.weight2[e])

    # ------------------------------------------------------------------ forward

    def _glu(self, x: torch.Tensor) -> torch.Tensor:
        """megatron MLP's activation (unfused path), on this ETP shard's [gate; up]."""
        cfg = self.config
        if not cfg.gated_linear_unit:
            return cfg.activation_func(x)
        x_glu, x_linear = torch.chunk(x, 2, dim=-1)
        if (val := cfg.activation_func_clamp_value) is not None:
            x_glu = x_glu.clamp(min=None, max=val)
            x_linear = x_linear.clamp(min=-val, max=val)
        if cfg.glu_linear_offset:
            x_linear = x_linear + cfg.glu_linear_offset
        # (Adding a zero offset changes no value but costs an op and its backward.)
        return cfg.activation_func(x_glu) * x_linear

    def forward(self, permuted_local_hidden_states: torch.Tensor,
                tokens_per_expert: torch.Tensor, permuted_probs: torch.Tensor):
        """[T, H] tokens grouped by local expert -> ([T, H] expert outputs x probs, None)."""
        x, probs = permuted_local_hidden_states, permuted_probs
        if self.config.moe_apply_probs_on_input:
            assert self.config.moe_router_topk == 1, \
                "`moe_apply_probs_on_input` only works with `moe_router_topk`=1."
            x = (probs.unsqueeze(-1) * x).to(x.dtype)
            probs = torch.ones_like(probs)
        h = grouped_linear(x, self.weight1, tokens_per_expert, self.fp8)
        h = self._glu(h)
        h = (h * probs.unsqueeze(-1)).to(h.dtype)
        return grouped_linear(h, self.weight2, tokens_per_expert, self.fp8), None

    def backward_dw(self):
        """No deferred weight-gradient computation (megatron's hook for TE's split wgrad)."""

    # ------------------------------------------------------------------ checkpoint

    def _expert_tensors(self, key: str, t: torch.Tensor, e: int, tp_axis: int, gated: bool,
                        sharded_offsets: tuple, replica_id, metadata: dict):
        """What SequentialMLP's expert ``e`` emits for one projection, on the view t[e]."""
        num_global = get_pg_size(self.ep_group) * self.num_local_experts
        global_e = get_pg_rank(self.ep_group) * self.num_local_experts + e
        offsets = (*sharded_offsets, (len(sharded_offsets), global_e, num_global))
        sh = make_tp_sharded_tensor_for_checkpoint(
            t[e], key, tp_axis, prepend_offsets=offsets, tp_group=self.tp_group,
            dp_cp_group=metadata["dp_cp_group"])
        sh.replica_id = replica_id
        if gated:
            return apply_swiglu_sharded_factory(sh, offsets).build()
        return sh

    def _projection_factory(self, prefix: str, name: str, param: torch.Tensor, tp_axis: int,
                            gated: bool, sharded_offsets: tuple, metadata: dict):
        def build(key, t, replica_id, flattened_range):
            if flattened_range is not None:
                raise NotImplementedError("grouped experts: flattened (dp_reshardable) "
                                          "optimizer state is not supported")
            return {e: self._expert_tensors(key, t, e, tp_axis, gated, sharded_offsets,
                                            replica_id, metadata)
                    for e in range(self.num_local_experts)}

        def merge(loaded: dict) -> torch.Tensor:
            return torch.stack([torch.cat(loaded[e]) if gated else loaded[e]
                                for e in range(self.num_local_experts)])

        replica_id = (0, 0, get_pg_rank(self.dp_group))  # replicas over expert-DP only
        return ShardedTensorFactory(f"{prefix}experts.{name}.weight", param, build, merge,
                                    replica_id)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: Optional[dict] = None) -> dict:
        """SequentialMLP's checkpoint layout (global expert ids), from the stacked weights."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        if metadata.get("singleton_local_shards", False):
            raise NotImplementedError("grouped experts: singleton_local_shards checkpoints")
        gated = self.config.gated_linear_unit
        out = {
            f"{prefix}weight1": self._projection_factory(
                prefix, "linear_fc1", self.weight1, 0, gated, sharded_offsets, metadata),
            f"{prefix}weight2": self._projection_factory(
                prefix, "linear_fc2", self.weight2, 1, False, sharded_offsets, metadata),
        }
        # SequentialMLP's linears also store an (empty) extra state per expert; a grouped
        # checkpoint carries them too so that SequentialMLP can load it.
        num_global = get_pg_size(self.ep_group) * self.num_local_experts
        first = get_pg_rank(self.ep_group) * self.num_local_experts
        replica = (0, get_pg_rank(self.tp_group), get_pg_rank(self.dp_group))
        for e in range(self.num_local_experts):
            offsets = (*sharded_offsets, (len(sharded_offsets), first + e, num_global))
            for name in ("linear_fc1", "linear_fc2"):
                out[f"{prefix}local_experts.{e}.{name}._extra_state"] = \
                    make_sharded_object_for_checkpoint(
                        None, f"{prefix}experts.{name}._extra_state", offsets, replica)
        return out

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                              missing_keys, unexpected_keys, error_msgs):
        # The per-expert extra states of SequentialMLP's linears carry nothing here.
        for key in [k for k in state_dict if k.startswith(f"{prefix}local_experts.")
                    and k.endswith("._extra_state")]:
            state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)
