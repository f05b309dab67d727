"""``spectral``: SSMoE, training-free spectral routing (giangdip2410/SSMoE).

Per MoE layer and expert i, for each matrix M in {W_gate, W_up, W_down^T} (each I x d):
V = right singular vectors of M; s = r_i V (r_i = router row i); v_{i,M} = mean of the
columns of V at the top-k_svd entries of s. Then l_svd_i = mean_M (x . v_{i,M}),
p = (1 - c) softmax(W_r x) + c softmax(l_svd), top-k of p, renormalised over the k when
``normalize_topk`` (models that normalise top-k probabilities, e.g. Mixtral; megasmoe's
``topk`` router with pre_softmax=false). c = 0 gives the plain router's choice.

The directions are computed once from the expert weights (each expert-parallel rank
its local experts, with expert-tensor-parallel shards gathered first; then the E x 3 x d
vectors are all-gathered over the expert-parallel group) and cached in a non-persistent
buffer; loading new weights (a checkpoint) clears the cache, so the router works when
switched onto a trained model. It has no trainable parameter besides W_r, which is
shared with ``topk`` (same checkpoint key). When trained, L_bal on softmax(W_r x) follows
``moe.aux_loss_normalization`` (routers/base.py: the same pressure as ``topk`` at equal
moe.aux_loss_coeff).

Deviation: singular vectors are defined up to sign; each is oriented so that r_i . v >= 0
and the top-k_svd entries are taken of |s| (the authors' code leaves the sign to the SVD
routine, which makes the choice arbitrary).
"""

from __future__ import annotations

import weakref

import torch
import torch.distributed as dist

from megasmoe.routers import functional as RF
from megasmoe.routers.base import SpecRouter
from megasmoe.experts import local_expert_weights
from megasmoe.routers.options import SpectralConfig
from megasmoe.routers.registry import register_router

__all__ = ["SpectralConfig", "SpectralRouter", "expert_matrices"]


def _gather(t: torch.Tensor, dim: int, group) -> torch.Tensor:
    if group is None or group.size() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(group.size())]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def expert_matrices(fc1, fc2, etp_group) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(W_gate, W_up, W_down^T), each [I, d], of one SwiGLU expert (ETP shards gathered).

    fc1 holds [gate; up] per ETP shard; fc2 is [d, I / etp].
    """
    gate, up = fc1.detach().chunk(2, dim=0)
    gate, up = _gather(gate, 0, etp_group), _gather(up, 0, etp_group)
    down_t = _gather(fc2.detach(), 1, etp_group).t()
    return gate, up, down_t


@register_router("spectral", SpectralConfig)
class SpectralRouter(SpecRouter):
    """SSMoE: mix the learned router with scores from the experts' singular vectors."""

    def __init__(self, config, pg_collection=None, router_config=None, **kwargs):
        super().__init__(config, pg_collection, router_config, **kwargs)
        from megatron.core import parallel_state

        self.ep_group = getattr(pg_collection, "ep", None) or \
            parallel_state.get_expert_model_parallel_group()
        self.etp_group = getattr(pg_collection, "expt_tp", None) or \
            parallel_state.get_expert_tensor_parallel_group()
        self.register_buffer("directions", torch.zeros(0), persistent=False)
        self._layer = None
        self.mark_sequence_parallel()

    def bind_moe_layer(self, layer) -> None:
        # A weak reference: the experts must not become a submodule of the router.
        self._layer = weakref.ref(layer)

    def _load_from_state_dict(self, *args, **kwargs):
        self.directions = torch.zeros(0, device=self.directions.device)
        return super()._load_from_state_dict(*args, **kwargs)

    @torch.no_grad()
    def compute_directions(self) -> torch.Tensor:
        """[E, 3, d] spectral directions of all experts (collective over EP and ETP)."""
        layer = self._layer() if self._layer is not None else None
        if layer is None:
            raise RuntimeError("spectral router is not bound to its MoE layer")
        local = local_expert_weights(layer.experts)
        offset = layer.local_expert_indices[0]
        k_svd = self.router_config.k_svd
        rows = []
        for i, (fc1, fc2) in enumerate(local):
            r = self.weight[offset + i].detach().float()
            rows.append(torch.stack([RF.spectral_direction(m.float(), r, k_svd)
                                     for m in expert_matrices(fc1, fc2, self.etp_group)]))
        return _gather(torch.stack(rows), 0, self.ep_group)

    def forward(self, input, padding_mask=None):
        if self.directions.numel() == 0:
            self.directions = self.compute_directions().to(input.device)
        self._input = input
        try:
            return super().forward(input, padding_mask)
        finally:
            self._input = None

    def routing(self, logits, padding_mask=None):
        # l_svd needs the router input, which megatron's routing() does not receive.
        x = self._input.reshape(-1, self._input.shape[-1]).to(self.routing_dtype)
        self._svd_logits = torch.einsum("td,emd->tem", x, self.directions.to(x.dtype)).mean(-1)
        return super().routing(logits, padding_mask)

    def route_with_svd(self, logits):
        """(probs, routing_map) from the learned logits and the cached spectral logits."""
        rc = self.router_config
        p = RF.spectral_mix(logits, self._svd_logits, rc.c)
        routing_map = RF.topk_map(p, self.topk)
        probs = p * routing_map
        if rc.normalize_topk:
            probs = probs / probs.sum(-1, keepdim=True)
        return probs, routing_map

    def route(self, logits, padding_mask):
        probs, routing_map = self.route_with_svd(logits)
        return probs, routing_map, torch.softmax(logits, dim=-1)
