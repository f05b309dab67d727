"""``vq``: VQMoE (giangdip2410/VQMoE): an SMoE branch and a vector-quantised branch.

Per MoE layer, for each token x (d):

- SMoE branch: StableMoE's gate g = x . normalize(M)^T (M: E x d, orthogonal init, gain
  0.32), top-k' of g with k' = ``smoe_topk`` (null = moe.topk - 1; the authors' top-1),
  softmax over the k' selected; balance loss L_bal on softmax(g / 0.3) (x moe.aux_loss_coeff,
  0.01; normalised with k = k' in the convention of ``moe.aux_loss_normalization``,
  routers/base.py, which at k' = 1 is the papers' formula either way). y_smoe =
  megatron's MoE pass with that routing.
- VQ branch: codebook C (K x d, K = ``codebook_size`` = 16, init U(-1/K, 1/K));
  j = argmin_j ||x - C_j||^2; x~ = 0.95 x + 0.05 sg(C_j - x) (``contrib_rate``);
  y_vq = LN(Expert_{j mod E}(LN(x~))), one LayerNorm (affine) used at both places, as
  in the authors' code. The VQ expert goes through the layer's dispatcher
  (``layer.run_experts``), so under expert parallelism it runs wherever expert j mod E
  lives.
- Mixing gate [w0, w1] = softmax(Linear(d, 2)(x)) (with bias, torch Linear init);
  y = w0 y_smoe + w1 y_vq (+ the shared expert's output, outside the mixture).
- L_vq = MSE(C_j, sg(x)) + 0.25 MSE(sg(C_j), x) (``commitment``), times ``vq_loss_coeff``
  (0.08), logged as ``moe/vq_loss/layer_i``.

Compute parity: every token runs k' + 1 experts. With the default k' = moe.topk - 1 a
VQMoE layer costs what a top-(moe.topk) router does (authors: top-1 + 1 VQ expert against
top-2 baselines), plus the codebook distances (K d per token), two LayerNorms and the
d x 2 mixing gate; the VQ expert is a second dispatch + combine of one expert per token.

Trained: the expert embeddings M (only through L_bal when k' = 1: the softmax over one
selected logit is 1, as in the authors' code), the codebook (only through L_vq: x~ passes
no gradient to it), the LayerNorm and the mixing gate. Checkpoint keys
``router.expert_embeddings``, ``router.codebook``, ``router.vq_norm_weight``,
``router.vq_norm_bias``, ``router.mix_weight``, ``router.mix_bias``.

Deviations: the loss is attached through megatron (logged per layer, scaled for per-token
loss normalisation, its squared errors divided by the token count of the whole
tensor/context-parallel group so that it does not depend on TP). The authors' optional
codebook variants (cosine / residual / balanced VQ) are not implemented (their scripts use
``vqtype base``, this one). A shared expert (the authors have none) is added outside
the mixture: y = w0 y_smoe + w1 y_vq + shared(x).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from megasmoe.moe import LayerBound
from megasmoe.routers import functional as RF
from megasmoe.routers.base import SpecRouter, orthogonal_init
from megasmoe.routers.options import VQMoEConfig
from megasmoe.routers.registry import register_router

__all__ = ["VQMoEConfig", "VQMoERouter", "add_branch_gate", "routed_and_shared",
           "group_token_count"]


def add_branch_gate(router: torch.nn.Module, hidden_size: int) -> None:
    """Give ``router`` the two-branch mixing gate Linear(d, 2) as ``mix_weight`` [2, d] and
    ``mix_bias`` [2], torch Linear's init U(-1/sqrt(d), 1/sqrt(d)) for both."""
    bound = 1.0 / math.sqrt(hidden_size)

    def init(shape, generator):
        return (torch.rand(shape, generator=generator) * 2 - 1) * bound

    router.mix_weight = torch.nn.Parameter(init((2, hidden_size), None))
    router.mix_bias = torch.nn.Parameter(init((2,), None))
    router.mix_weight.megasmoe_init = init
    router.mix_bias.megasmoe_init = init


def routed_and_shared(layer, hidden: torch.Tensor, padding_mask):
    """megatron's MoE pass in two parts: (routed output through this layer's router and
    dispatcher, shared expert output or None), so a second branch mixes with the routed
    experts only and the shared expert stays outside the mixture, as in the SMoE layer."""
    shared = layer.shared_experts_compute(hidden)
    if padding_mask is not None:  # the layer receives [B, S]; megatron routes with [S, B]
        padding_mask = padding_mask.transpose(0, 1).bool()
    probs, routing_map = layer.route(hidden, padding_mask)
    return layer.run_experts(hidden, probs, routing_map), shared


def group_token_count(local: int, valid: torch.Tensor | None, group) -> torch.Tensor | int:
    """Tokens of the whole tensor/context-parallel group: the local count times the group
    size, or (with padding) the valid tokens summed over the group."""
    size = group.size() if group is not None else 1
    if valid is None:
        return local * size
    count = valid.sum().to(torch.float64)
    if size > 1:
        torch.distributed.all_reduce(count, group=group)
    return count


@register_router("vq", VQMoEConfig)
class VQMoERouter(LayerBound, SpecRouter):
    """VQMoE: StableMoE top-(k-1) branch plus the expert a codebook picks, mixed by a
    learned gate."""

    def __init__(self, config, pg_collection=None, router_config=None, **kwargs):
        super().__init__(config, pg_collection, router_config, **kwargs)
        rc = self.router_config
        d, E, K = self.config.hidden_size, self.config.num_moe_experts, rc.codebook_size
        self.weight = None  # the SMoE gate is the expert embeddings, as stablemoe
        emb_init = orthogonal_init(rc.init_gain)
        self.expert_embeddings = torch.nn.Parameter(emb_init((E, d), None))
        self.expert_embeddings.megasmoe_init = emb_init

        def codebook_init(shape, generator):
            return (torch.rand(shape, generator=generator) * 2 - 1) / K

        self.codebook = torch.nn.Parameter(codebook_init((K, d), None))
        self.codebook.megasmoe_init = codebook_init
        self.vq_norm_weight = torch.nn.Parameter(torch.ones(d))
        self.vq_norm_bias = torch.nn.Parameter(torch.zeros(d))
        add_branch_gate(self, d)
        self.mark_sequence_parallel()

    def gating(self, input):
        dtype = self.routing_dtype
        return RF.cosine_logits(input.to(dtype), self.expert_embeddings.to(dtype))

    def route(self, logits, padding_mask):
        probs, routing_map = RF.softmax_over_topk(logits, self.topk)
        scores = torch.softmax(logits / self.router_config.balance_temperature, dim=-1)
        return probs, routing_map, scores

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], self.vq_norm_weight.to(x.dtype),
                            self.vq_norm_bias.to(x.dtype))

    def moe_forward(self, layer, hidden, padding_mask=None):
        """y = w0 SMoE(x) + w1 LN(Expert_{j mod E}(LN(x~))) (+ the shared expert); L_vq
        attached in training."""
        rc = self.router_config
        y_smoe, shared = routed_and_shared(layer, hidden, padding_mask)
        dtype, E = self.routing_dtype, self.config.num_moe_experts
        x = hidden.reshape(-1, hidden.shape[-1]).to(dtype)
        codebook = self.codebook.to(dtype)
        j = RF.vq_nearest(x.detach(), codebook.detach())
        code = codebook[j]
        x_tilde = RF.vq_straight_through(x, code, rc.contrib_rate)
        vq_in = self._norm(x_tilde).to(hidden.dtype).reshape(hidden.shape)
        onehot = F.one_hot(j % E, E).bool()
        valid = None
        if padding_mask is not None:  # [B, S] as the layer receives it; True = padding
            valid = ~padding_mask.transpose(0, 1).reshape(-1).bool()
            onehot = onehot & valid.unsqueeze(-1)
        self.record_load(onehot, None)
        y_vq = layer.run_experts(vq_in, onehot.to(torch.float32), onehot)
        y_vq = self._norm(y_vq.to(dtype))
        w = RF.branch_mix(x, self.mix_weight.to(dtype), self.mix_bias.to(dtype))
        w = w.reshape(*hidden.shape[:-1], 2)
        out = (w[..., :1] * y_smoe.to(dtype) + w[..., 1:] * y_vq).to(hidden.dtype)
        if shared is not None:
            out = out + shared
        if self.training and torch.is_grad_enabled() and rc.vq_loss_coeff > 0:
            out = self._attach_vq_loss(out, x, code, valid)
        return out, None

    def _attach_vq_loss(self, out, x, code, valid):
        rc = self.router_config
        if valid is not None:
            x, code = x[valid], code[valid]
        local = x.shape[0]
        total = group_token_count(local, valid, self.tp_cp_group)
        loss = RF.vq_loss(x, code, rc.commitment, num_elements=total * x.shape[-1])
        return self.attach_and_log_load_balancing_loss(
            out, rc.vq_loss_coeff, rc.vq_loss_coeff * loss, "vq_loss", self.tp_cp_group,
            valid_token_count=local)
