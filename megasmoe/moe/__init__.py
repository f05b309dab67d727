"""The MoE layer's extension point: methods that need the experts' outputs inside the
layer, or a second branch mixed with the SMoE output.

Every MoE layer megasmoe builds is a ``MegasmoeMoELayer`` (megatron-core's ``MoELayer``
with three extra methods and one delegation; ``megasmoe/model.py`` applies
``extend_moe_layer`` to each layer right after the build, before ``bind_moe_layer``). A
method of this kind is one router file under ``megasmoe/routers/`` (see docs/routers.md,
"Methods that need expert outputs or a second branch"):

- ``layer.expert_features(x [N, H], fn, experts=None) -> [N, E, F]``: every expert (or
  the given global expert ids; the others give zeros) run on the tokens ``x`` of this
  rank, ``fn(y [M, E_local, H]) -> [M, E_local, F]`` applied where whole outputs exist,
  the features returned to the tokens' own rank. Differentiable (expert weights and
  whatever ``fn`` uses). Under expert/tensor parallelism the tokens of the whole
  expert-tensor x expert-parallel group are all-gathered, each rank runs its local
  experts on all of them, expert-tensor shards are summed (all-reduce), and the
  features come back by a reduce-scatter: like the allgather dispatcher, with every
  expert in place of k. Communication per call: all-gather of G N H and reduce-scatter
  of G N E F values (G = the group's size); compute E / k times a normal MoE layer's
  expert work (fewer with ``experts``). CompeteSMoE (affinities), SimSMoE (projected
  outputs for CKA).
- ``layer.run_experts(hidden [S, B, H], probs [T, E], routing_map [T, E]) -> [S, B, H]``:
  megatron's dispatch -> experts -> combine with a routing chosen by the caller (any
  number of experts per token, e.g. VQMoE's expert j mod E), any dispatcher, no
  router call, no shared expert.
- ``layer.smoe(hidden, padding_mask=None) -> (output, bias)``: megatron's own forward
  (router, dispatch, experts, combine, shared expert). Call it twice for two passes
  (S2MoE: x and noisy x).

And the delegation: a router that defines ``moe_forward(layer, hidden, padding_mask)
-> (output, bias)`` takes over the layer's forward (the second branch and its gate
live in the router module, so they are checkpointed and initialised as router
parameters); without one the layer is megatron's ``MoELayer`` unchanged. A router
reaches its layer as ``self.moe_layer`` after ``bind_moe_layer`` (``LayerBound`` below).

Beside it, ``megasmoe/moe/dispatch.py``: the local token dispatcher, which
``megasmoe/model.py`` gives every layer whose expert group is one rank
(``use_local_dispatcher``); the methods above work through it as through megatron's.
"""

from megasmoe.moe.dispatch import LocalTokenDispatcher, use_local_dispatcher
from megasmoe.moe.layer import LayerBound, MegasmoeMoELayer, extend_moe_layer

__all__ = ["MegasmoeMoELayer", "LayerBound", "extend_moe_layer", "LocalTokenDispatcher",
           "use_local_dispatcher"]
