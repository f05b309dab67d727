"""``MegasmoeMoELayer``: megatron-core's MoELayer plus the extension point of
megasmoe/moe/__init__.py (expert features, a caller-chosen routing, the plain SMoE pass,
and a router that takes over the forward)."""

from __future__ import annotations

import weakref
from typing import Callable, Optional, Sequence

import torch
from megatron.core.tensor_parallel.mappings import (
    gather_from_sequence_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.moe.moe_layer import MoELayer

__all__ = ["MegasmoeMoELayer", "LayerBound", "extend_moe_layer"]


def extend_moe_layer(layer: MoELayer) -> "MegasmoeMoELayer":
    """Make a built megatron MoELayer a MegasmoeMoELayer, in place.

    The class is switched after the build rather than named in the layer spec: megatron's
    TransformerLayer passes its process groups only to spec modules that *are*
    ``MoELayer`` (it compares classes, not subclasses). MegasmoeMoELayer adds methods
    and no state, so the switch changes nothing else (parameters, checkpoint keys).
    """
    if not isinstance(layer, MegasmoeMoELayer):
        layer.__class__ = MegasmoeMoELayer
    return layer


class LayerBound:
    """Mixin for routers that use their MoE layer: ``bind_moe_layer`` keeps a weak
    reference (the layer owns the router; a strong one would make the router a
    submodule cycle), read back as ``self.moe_layer``."""

    def bind_moe_layer(self, layer) -> None:
        """Remember the MoELayer that owns this router (called once after the build)."""
        super().bind_moe_layer(layer)
        if not isinstance(layer, MegasmoeMoELayer):
            raise TypeError(f"router {type(self).__name__} needs megasmoe's MoE layer, got "
                            f"{type(layer).__name__}")
        object.__setattr__(self, "_moe_layer_ref", weakref.ref(layer))

    @property
    def moe_layer(self) -> "MegasmoeMoELayer":
        """The MoE layer this router belongs to."""
        ref = self.__dict__.get("_moe_layer_ref")
        layer = ref() if ref is not None else None
        if layer is None:
            raise RuntimeError(f"{type(self).__name__}: bind_moe_layer was not called")
        return layer


def _all_reduce_sum(t: torch.Tensor, group) -> torch.Tensor:
    """All-reduce (sum) whose backward is an all-reduce (sum) of the gradients: right
    when every rank goes on to use the reduced tensor in its own share of the loss."""
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(t, group=group)


class MegasmoeMoELayer(MoELayer):
    """MoELayer with the extension point; megatron's forward when the router has no
    ``moe_forward``."""

    def forward(self, hidden_states: torch.Tensor, intermediate_tensors=None,
                padding_mask: Optional[torch.Tensor] = None):
        """Delegate to ``router.moe_forward(self, hidden, padding_mask)`` if it exists."""
        moe_forward = getattr(self.router, "moe_forward", None)
        if moe_forward is None or intermediate_tensors is not None:
            return super().forward(hidden_states, intermediate_tensors, padding_mask)
        return moe_forward(self, hidden_states, padding_mask)

    # ---------------------------------------------------------------- the SMoE pass

    def smoe(self, hidden_states: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        """megatron-core's MoELayer forward: (output [S, B, H], bias)."""
        return super().forward(hidden_states, None, padding_mask)

    def run_experts(self, hidden_states: torch.Tensor, probs: torch.Tensor,
                    routing_map: torch.Tensor) -> torch.Tensor:
        """sum_e probs_te Expert_e(x_t) over the experts of ``routing_map`` (bool [T, E],
        any number per token), through this layer's dispatcher; [S, B, H] like the input.

        Needs the unfused permute (``moe_permute_fusion=False``, always so in megasmoe):
        the fused one sizes its buffer for exactly moe.topk experts per token.
        """
        hidden, probs = self.token_dispatcher.dispatch_preprocess(hidden_states, routing_map,
                                                                 probs)
        hidden, probs = self.dispatch(hidden, probs)
        output, _ = self.routed_experts_compute(hidden, probs)
        output = self.combine(output)
        return self.token_dispatcher.combine_postprocess(output)

    # ---------------------------------------------------------------- expert features

    def expert_features(self, x: torch.Tensor,
                        fn: Callable[[torch.Tensor], torch.Tensor] = lambda y: y,
                        experts: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Every expert on every token of this rank, reduced by ``fn``: [N, E, F].

        ``x`` [N, H]: this rank's tokens (sequence-parallel slice). ``fn(y)`` gets the
        whole outputs y [M, E_local, H] of this rank's local experts (all M tokens of the
        expert group) and returns [M, E_local, F]. ``experts``: global ids to run (None =
        all); the others' features are 0. See the package docstring for the cost.
        """
        d = self.token_dispatcher
        group, etp_group = d.tp_ep_group, d.tp_group
        group_size = group.size() if group is not None else 1
        etp = etp_group.size() if etp_group is not None else 1
        tokens = x.reshape(-1, x.shape[-1])
        n = tokens.shape[0]
        if group_size > 1:
            tokens = gather_from_sequence_parallel_region(tokens, group=group)
        m = tokens.shape[0]
        wanted = None if experts is None else set(experts)
        local = [i for i, e in enumerate(self.local_expert_indices)
                 if wanted is None or e in wanted]
        E = self.config.num_moe_experts
        if local:
            inputs = tokens.repeat(len(local), 1)
            counts = [m if i in local else 0 for i in range(self.num_local_experts)]
            ones = torch.ones(m * len(local), dtype=torch.float32, device=x.device)
            y, _ = self.experts(inputs, torch.tensor(counts, dtype=torch.long), ones)
            y = y.reshape(len(local), m, -1).transpose(0, 1)  # [M, local, H]
            if etp > 1:
                y = _all_reduce_sum(y, etp_group)  # expert-tensor shards hold partial sums
            feats = fn(y)
            if etp > 1:
                feats = feats / etp  # every shard of the group returns the same features
            # Scatter the local experts' features into their global columns.
            offset = self.local_expert_indices[0]
            index = torch.tensor([offset + i for i in local])
            full = feats.new_zeros(m, E, feats.shape[-1]).index_copy(1, index.to(x.device),
                                                                      feats)
        else:
            f_dim = fn(tokens.new_zeros(1, 1, tokens.shape[-1])).shape[-1]
            full = tokens.new_zeros(m, E, f_dim) + 0 * tokens.sum()  # keep the graph alive
        if group_size > 1:
            flat = reduce_scatter_to_sequence_parallel_region(
                full.reshape(m, -1).contiguous(), group=group)
            full = flat.reshape(n, E, -1)
        return full
