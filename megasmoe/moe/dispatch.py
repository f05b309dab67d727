"""The local token dispatcher: megatron's dispatch -> experts -> combine when no token
leaves its rank.

When a layer's expert group is one rank (expert parallelism 1 and expert-tensor
parallelism 1; attention TP and DP may be anything), every megatron dispatcher reduces
to: permute the tokens by expert, run the local experts, scatter them back. megatron-core
0.16.1 still runs its collectives' autograd functions on one-rank groups, and its
alltoall dispatcher splits and re-concatenates the permuted tokens by local expert (the
identity at EP=1), copying them twice per layer forward and twice backward. At the default
CPU shape that was ~11 ms of a ~420 ms step (docs/benchmarks.md).

``LocalTokenDispatcher`` does the permutation with megatron's own ``permute`` and the
combine with ``index_add_`` (megatron's deterministic-mode combine; its default
``scatter_add_`` over an expanded index has a slower backward on CPU). Same tokens per
expert in the same order as megatron's dispatchers at EP=1, so the experts compute the same
values; the sums per token are taken in the same order. ``use_local_dispatcher`` swaps it
into a built layer where that applies, whatever ``moe.dispatcher`` says; elsewhere (capacity
factor, quantization padding, overlapped shared experts, an expert group of several ranks)
the configured megatron dispatcher stays.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from megatron.core.transformer.moe.moe_utils import permute
from megatron.core.transformer.moe.token_dispatcher import MoETokenDispatcher

__all__ = ["LocalTokenDispatcher", "local_dispatch_applies", "use_local_dispatcher"]


def _size(group) -> int:
    return group.size() if group is not None else 1


def local_dispatch_applies(layer) -> bool:
    """Whether ``layer``'s tokens all stay on their rank and the local dispatcher covers its
    features: an expert group (EP x expert TP) of one rank, dropless, no quantization
    padding, no shared expert overlapped with the dispatch."""
    d, c = layer.token_dispatcher, layer.config
    return (_size(d.tp_ep_group) == 1 and _size(d.ep_group) == 1 and _size(d.tp_group) == 1
            and c.moe_expert_capacity_factor is None
            and not c.moe_router_padding_for_quantization
            and not c.moe_shared_expert_overlap
            and not c.moe_permute_fusion)


def use_local_dispatcher(layer) -> bool:
    """Give ``layer`` a ``LocalTokenDispatcher`` if ``local_dispatch_applies``; True if so."""
    if isinstance(layer.token_dispatcher, LocalTokenDispatcher):
        return True
    if not local_dispatch_applies(layer):
        return False
    layer.token_dispatcher = LocalTokenDispatcher(layer.token_dispatcher)
    return True


class LocalTokenDispatcher(MoETokenDispatcher):
    """megatron's dispatcher interface without communication (module docstring).

    Built from the layer's megatron dispatcher, whose process groups (all of one rank)
    and config it keeps, so code that reads ``tp_ep_group`` or ``tp_group`` is unchanged.
    """

    def __init__(self, dispatcher: MoETokenDispatcher):
        groups = SimpleNamespace(ep=dispatcher.ep_group, expt_tp=dispatcher.tp_group,
                                 tp_ep=dispatcher.tp_ep_group)
        super().__init__(dispatcher.config, groups)
        self.num_local_experts = dispatcher.num_local_experts
        self.local_expert_indices = dispatcher.local_expert_indices
        self.hidden_shape = None
        self.sorted_indices = None
        self.tokens_per_expert = None

    def dispatch_preprocess(self, hidden_states: torch.Tensor, routing_map: torch.Tensor,
                            probs: torch.Tensor):
        """Tokens [*, H] and dense probs [T, E] -> (tokens grouped by expert, their probs)."""
        self.hidden_shape = hidden_states.shape
        tokens = hidden_states.reshape(-1, self.hidden_shape[-1])
        # Any number of experts per token (run_experts): counts come from the map.
        self.tokens_per_expert = routing_map.sum(dim=0)
        permuted, permuted_probs, self.sorted_indices = permute(tokens, routing_map, probs=probs)
        return permuted, permuted_probs

    def token_dispatch(self, hidden_states: torch.Tensor, probs: torch.Tensor):
        """No communication: every expert is local."""
        return hidden_states, probs

    def dispatch_postprocess(self, hidden_states: torch.Tensor, probs: torch.Tensor):
        """(tokens, tokens per local expert, probs) for the experts."""
        return hidden_states, self.tokens_per_expert, probs

    def combine_preprocess(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Nothing to do before the (absent) combine communication."""
        return hidden_states

    def token_combine(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """No communication."""
        return hidden_states

    def combine_postprocess(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Expert outputs [sum of counts, H] -> each token's outputs summed, in the layer
        input's shape."""
        assert hidden_states.shape[0] == self.sorted_indices.numel(), \
            "expert outputs do not match the dispatched tokens"
        tokens = self.hidden_shape.numel() // self.hidden_shape[-1]
        out = hidden_states.new_zeros(tokens, hidden_states.shape[-1])
        out = out.index_add_(0, self.sorted_indices, hidden_states)
        return out.view(self.hidden_shape)
