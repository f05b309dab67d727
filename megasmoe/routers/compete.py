"""``compete``: CompeteSMoE, routing by the experts' own responses.

v1 (Pham, Do et al. 2024, arXiv:2402.02526; giangdip2410/CompeteSMoE) and v2 (Nguyen et
al. 2025, Fsoft-AIC/CompeteSMoE), ``moe.router.version``. Router logits g = W_r x.

- Competition steps: layer l competes at optimizer step s when u(seed, s, l) <
  ``frequency`` (``functional.competition_layers``; v1: a probability per layer per
  step, 1.0 by default; v2: ~7% of steps per layer, at most ``max_layers`` = 3 layers
  per step). A pure function of (``schedule_seed`` = run.seed, step, layer): every rank
  of every layout agrees without communication and a resumed run competes on the same
  steps (nothing to checkpoint). Only in training (eval routes normally).
- On a competition step every expert runs on every token
  (``MegasmoeMoELayer.expert_features``: under expert parallelism each rank runs its
  local experts on the tokens of the whole expert-tensor x expert-parallel group and the
  affinities, one number per (token, expert), return to the tokens' ranks; see
  docs/routers.md for the communication), affinity a_e = ||y_e||_2 (v1) or
  mean_D softplus(y_e) (v2); S_t = top-k of a; weights softmax over the selected a (v1)
  or the selected a divided by their sum (v2). The layer then computes its output with
  that routing through its dispatcher as usual (the k selected experts run again: k / E
  more expert work on those steps, in exchange for not moving E outputs per token).
- Router loss: v1 MSE(softmax(g), q), q = the competition weights (softmax over the
  top-k of a, 0 elsewhere), x ``router_loss_coeff`` (5 x 0.01 = 0.05); v2
  MSE(softmax(g), softmax(a)) + ``topk_loss_weight`` (0.2) x the same MSE over the k
  selected entries, x 0.001. The target is detached (the loss trains the router to
  predict the competition). MSE = mean over the E experts, then over tokens.
- v2 extras: diversity loss = mean over tokens of the mean pairwise cosine of the
  selected experts' outputs (``diversity_coeff`` 0.005; the outputs of the selected
  experts come back with the affinities, H more numbers per (token, expert)); entropy
  balance log E - H(mean_t softmax(a_t)) on competition steps (``entropy_coeff``
  0.005) and of softmax(g) on other steps (``entropy_coeff_normal`` 0.01).
- Other steps: SMoE (top-k of g, softmax over the selected); the paper balance loss
  L_bal on softmax(g) (``moe.aux_loss_type=aux_loss``, as every SpecRouter, in the
  convention of ``moe.aux_loss_normalization``: the same pressure as ``topk`` at equal
  moe.aux_loss_coeff). The router, diversity and entropy losses have their own
  coefficients and are not scaled by it.

Each loss is logged per layer (``moe/compete_router_loss/layer_i``,
``compete_diversity_loss``, ``compete_entropy_loss``) through megatron's tracker. Under
sequence parallelism each rank adds its tokens' share (per-token means divided by the
micro batch's token count; the entropy term, a function of the whole micro batch, is
all-reduced and divided by the group size), so gradients do not depend on the layout.

Deviations: v1's authors warn their code does not reproduce the paper; here the
affinity is differentiable (the task loss reaches the experts through the competition
weights), the router-loss target is detached in both versions, the exact form of v2's
"entropy balance" is inferred (log E - entropy of the mean distribution), and the v2
schedule is a hash of (seed, step, layer) rather than the authors' pre-drawn list.
Inference is plain top-k of g: exports exactly to the standard architectures.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megasmoe.moe import LayerBound
from megasmoe.routers import functional as RF
from megasmoe.routers.base import SpecRouter
from megasmoe.routers.options import CompeteConfig
from megasmoe.routers.registry import register_router

__all__ = ["CompeteConfig", "CompeteRouter", "group_token_count", "group_sum"]


def group_token_count(n_local, group) -> float:
    """Tokens of the micro batch summed over ``group`` (no gradient)."""
    if group is None or group.size() == 1:
        return float(n_local)
    t = torch.tensor([float(n_local)], dtype=torch.float64)
    dist.all_reduce(t, group=group)
    return t.item()


def group_sum(t: torch.Tensor, group) -> torch.Tensor:
    """Differentiable sum over ``group`` (backward: sum of the gradients), for losses
    that every rank then computes whole and divides by the group size."""
    if group is None or group.size() == 1:
        return t
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(t, group=group)


@register_router("compete", CompeteConfig)
class CompeteRouter(LayerBound, SpecRouter):
    """CompeteSMoE: competition steps route by the experts' responses (module docstring)."""

    def __init__(self, config, pg_collection=None, router_config=None, **kwargs):
        super().__init__(config, pg_collection, router_config, **kwargs)
        self.mark_sequence_parallel()
        self.train_step: Optional[int] = None
        """The optimizer step being run (set by on_train_step); None: never compete."""

    def on_train_step(self, step: int, total_steps: int) -> None:
        self.train_step = step

    def competing(self) -> bool:
        """Whether this layer competes in the current training step."""
        if self.train_step is None or not (self.training and torch.is_grad_enabled()):
            return False
        rc = self.router_config
        return (self.layer_number - 1) in RF.competition_layers(
            rc.schedule_seed, self.train_step, self.config.num_layers, rc.frequency,
            rc.max_layers)

    # ---------------------------------------------------------------- normal steps

    def route(self, logits, padding_mask):
        probs, routing_map = RF.softmax_over_topk(logits, self.topk)
        scores = torch.softmax(logits, dim=-1)
        if self.router_config.entropy_coeff_normal and self.training and torch.is_grad_enabled():
            probs = self._attach_entropy(probs, scores, padding_mask,
                                         self.router_config.entropy_coeff_normal)
        return probs, routing_map, scores

    # ---------------------------------------------------------------- competition steps

    def _features(self, y: torch.Tensor) -> torch.Tensor:
        """Affinity (and, for the diversity loss, the unit output) of each (token, expert)."""
        y = y.float()
        if self.router_config.version == "v1":
            a = y.norm(dim=-1, keepdim=True)
        else:
            a = F.softplus(y).mean(-1, keepdim=True)
        if self._with_outputs():
            return torch.cat([a, F.normalize(y, dim=-1)], dim=-1)
        return a

    def _with_outputs(self) -> bool:
        return bool(self.router_config.diversity_coeff) and self.topk >= 2

    def forward(self, input: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        """Normal steps: SpecRouter's. Competition steps: route by the experts' affinities."""
        if not self.competing():
            return super().forward(input, padding_mask)
        rc, E = self.router_config, self.config.num_moe_experts
        logits = self.gating(input)
        self.record_entropy(logits, padding_mask)
        logits = logits.reshape(-1, E)
        if padding_mask is not None:
            padding_mask = padding_mask.reshape(-1)
        logits = self.apply_z_loss(logits, padding_mask=padding_mask)
        feats = self.moe_layer.expert_features(input.reshape(-1, input.shape[-1]),
                                               self._features)
        a = feats[..., 0].to(logits.dtype)
        if rc.version == "v1":
            probs, routing_map = RF.compete_v1_route(a, self.topk)
            target = probs.detach()
        else:
            probs, routing_map = RF.compete_v2_route(a, self.topk)
            target = torch.softmax(a, dim=-1).detach()
        valid = None if padding_mask is None else (~padding_mask).to(logits.dtype)
        per_token = RF.compete_router_loss(
            logits, target, routing_map, rc.topk_loss_weight if rc.version == "v2" else 0.0)
        probs = self._attach_token_mean(probs, per_token, valid, rc.router_loss_coeff,
                                        "compete_router_loss")
        if self._with_outputs():
            cos = RF.pairwise_cosine(feats[..., 1:], routing_map)
            probs = self._attach_token_mean(probs, cos, valid, rc.diversity_coeff,
                                            "compete_diversity_loss")
        if rc.entropy_coeff:
            probs = self._attach_entropy(probs, torch.softmax(a, dim=-1), padding_mask,
                                         rc.entropy_coeff)
        self.record_load(routing_map, padding_mask)
        return probs, routing_map

    # ---------------------------------------------------------------- losses

    def _attach_token_mean(self, probs, per_token, valid, coeff, name):
        """Attach coeff x (this rank's share of) the micro batch's mean of ``per_token``."""
        if not coeff:
            return probs
        if valid is not None:
            per_token = per_token * valid
        n_local = per_token.shape[0] if valid is None else valid.sum()
        total = group_token_count(n_local, self.tp_cp_group)
        share = per_token.sum() / total
        return self.attach_and_log_load_balancing_loss(
            probs, coeff, coeff * share, name, self.tp_cp_group, valid_token_count=n_local)

    def _attach_entropy(self, probs, scores, padding_mask, coeff):
        """Attach coeff x the entropy balance of the micro batch's mean of ``scores``."""
        if padding_mask is not None:
            scores = scores * (~padding_mask).unsqueeze(-1).to(scores.dtype)
            n_local = (~padding_mask).sum()
        else:
            n_local = scores.shape[0]
        group = self.tp_cp_group
        total = group_token_count(n_local, group)
        size = 1 if group is None else group.size()
        loss = RF.entropy_balance(group_sum(scores.sum(0), group), total) / size
        return self.attach_and_log_load_balancing_loss(
            probs, coeff, coeff * loss, "compete_entropy_loss", group,
            valid_token_count=n_local)

