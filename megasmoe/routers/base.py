"""The base of every megasmoe router: a megatron-core TopKRouter made device-safe.

Routers plug into megatron-core through ``MoESubmodules.router``: the layer calls
``router(config=TransformerConfig, pg_collection=...)`` and then
``router(hidden [S/TP, B, H], padding_mask) -> (probs [T, E] float, routing_map [T, E] bool)``.

Two bases:

- ``MegasmoeRouter``: megatron-core's TopKRouter (its routing, aux losses, z-loss,
  expert bias) with a device-safe ``gating`` and telemetry. ``topk``,
  ``sigmoid_bias`` and ``domain_steer`` use it as is; its softmax top-k cases take
  ``lean_routing`` (the same routing with one softmax instead of two).
- ``SpecRouter``: for routers whose gate and selection follow a paper instead of
  megatron's ``topk_routing_with_score_function``: subclasses implement ``route``
  with the plain functions of ``routers/functional.py``; the base attaches the
  paper's balance loss through megatron's aux-loss machinery (so logging, loss
  scaling and per-token normalisation are megatron's).

One balance-loss convention for both (``moe.aux_loss_normalization``, docs/routers.md):
every router's loss is E sum_e f_e P_e on its balance scores with f_e = count_e / (T k)
and P_e = sum_t p_te / T (``megatron``, the default: megatron-core's normalisation,
k times the seed papers') or P_e = sum_t p_te / (T k) (``paper``), times
``moe.aux_loss_coeff``. So at equal coefficients ``topk`` and a paper router put the same
gradient on the router for the same routing (tests/test_balance_convention.py). The
logged ``moe/load_balancing_loss`` is in megatron's normalisation (1 at uniform load)
under either setting.

Hooks the rest of megasmoe calls without knowing the router: ``on_train_step(step,
total_steps)`` before every optimizer step (schedules), ``bind_moe_layer(layer)`` once
after the model is built (routers that read expert weights). Routers that need
expert outputs inside the layer (CompeteSMoE, SimSMoE, VQMoE, S2MoE: a later issue)
hook the MoE layer through ``bind_moe_layer`` as well.

Every router parameter is marked ``sequence_parallel`` when sequence parallelism is
on, so ``finalize_model_grads`` sums its gradient over the tensor-parallel ranks (each
sees only its slice of the sequence). Parameters may carry ``megasmoe_init``
(a ``fn(shape, generator) -> tensor``) to keep the authors' initialisation under
``model.layout_invariant_init``.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from megatron.core.transformer.moe.moe_utils import (
    apply_random_logits,
    get_tokens_per_expert_and_token_count,
)
from megatron.core.transformer.moe.router import TopKRouter

from megasmoe.routers import functional as RF
from megasmoe.routers.options import RouterConfigBase

__all__ = ["MegasmoeRouter", "SpecRouter", "RouterConfigBase", "router_logits",
           "uniform_fan_in_init", "orthogonal_init", "normal_init"]


def router_logits(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], dtype: torch.dtype
) -> torch.Tensor:
    """Gate logits ``x W^T (+ b)`` computed in ``dtype`` on ``x``'s device."""
    w = weight.to(device=x.device, dtype=dtype)
    b = None if bias is None else bias.to(device=x.device, dtype=dtype)
    return torch.nn.functional.linear(x.to(dtype), w, b)


def uniform_fan_in_init(shape, generator) -> torch.Tensor:
    """torch.nn.Linear's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (fan_in = last dim
    of the weight; for a bias pass the weight's fan_in via functools.partial)."""
    fan_in = shape[-1]
    bound = 1.0 / math.sqrt(fan_in)
    return (torch.rand(shape, generator=generator) * 2 - 1) * bound


def orthogonal_init(gain: float) -> Callable:
    """An orthogonal init with ``gain`` (XMoE / StableMoE expert embeddings)."""

    def init(shape, generator) -> torch.Tensor:
        a = torch.randn(shape, generator=generator)
        rows, cols = shape
        flat = a if rows >= cols else a.t()
        q, r = torch.linalg.qr(flat)
        q = q * torch.sign(torch.diagonal(r))
        q = q if rows >= cols else q.t()
        return gain * q

    return init


def normal_init(std: float) -> Callable:
    """N(0, std^2)."""
    return lambda shape, generator: torch.randn(shape, generator=generator) * std


class MegasmoeRouter(TopKRouter):
    """TopKRouter with a device-safe gating and telemetry (load per expert, entropy).

    ``gating`` is overridden because megatron-core 0.16.1's ``Router.gating`` moves the
    weight to the CUDA device and, without Transformer Engine, its
    ``router_gating_linear`` raises NameError. Telemetry (tokens per expert, sum of
    per-token entropies of the router distribution, token count; since the last read)
    lives in non-persistent buffers read by ``megasmoe.training.telemetry``.
    """

    registry_name = "base"
    config_cls = RouterConfigBase
    variable_experts_per_token = False
    """True for routers that give a token a variable number of experts (USMoE)."""
    aux_loss_normalization = "megatron"
    """moe.aux_loss_normalization: megatron or paper (the module docstring)."""

    def __init__(self, config, pg_collection=None, router_config=None,
                 aux_loss_normalization: str = "megatron", **kwargs):
        super().__init__(config=config, pg_collection=pg_collection)
        self.router_config = router_config if router_config is not None else self.config_cls()
        self.aux_loss_normalization = aux_loss_normalization
        E = self.config.num_moe_experts
        self.register_buffer("telemetry_tokens_per_expert", torch.zeros(E, dtype=torch.float64),
                             persistent=False)
        self.register_buffer("telemetry_entropy", torch.zeros(2, dtype=torch.float64),
                             persistent=False)

    def mark_sequence_parallel(self) -> None:
        """Mark every parameter so finalize_model_grads reduces its gradient over TP."""
        for p in self.parameters():
            setattr(p, "sequence_parallel", self.config.sequence_parallel)

    @property
    def routing_dtype(self) -> torch.dtype:
        """fp64 if moe_router_dtype says so, else fp32 (routing is never done in bf16)."""
        return torch.float64 if self.config.moe_router_dtype == "fp64" else torch.float32

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        """Router logits in fp32 (or fp64) on the input's device."""
        return router_logits(input, self.weight, self.bias, self.routing_dtype)

    def forward(self, input: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        """Route ``input`` [S, B, H]; returns (probs [S*B, E], routing_map [S*B, E]).

        Same steps as TopKRouter.forward (expert-bias upkeep, jitter, gating, forced
        balancing, routing) plus telemetry; megatron's softmax top-k routing goes through
        ``lean_routing`` where that applies.
        """
        self._maintain_float32_expert_bias()
        input = self.apply_input_jitter(input)
        logits = self.gating(input)
        if self.config.moe_router_force_load_balancing:
            logits = apply_random_logits(logits)
        if self.lean_routing_applies(logits, padding_mask):
            probs, routing_map, scores = self.lean_routing(logits)
            self.record_entropy(logits, padding_mask, scores=scores)
        else:
            self.record_entropy(logits, padding_mask)
            probs, routing_map = self.routing(logits, padding_mask=padding_mask)
        self.record_load(routing_map, padding_mask)
        return probs, routing_map

    # ---------------------------------------------------------------- lean routing

    def lean_routing_applies(self, logits: torch.Tensor,
                             padding_mask: Optional[torch.Tensor]) -> bool:
        """Whether ``lean_routing`` computes what megatron's ``TopKRouter.routing`` would:
        its routing unchanged by the class, fp32 softmax scores, no padding, groups,
        expert bias, capacity, fusion or replay, and no balance loss but ``aux_loss``."""
        c = self.config
        return (type(self).routing is TopKRouter.routing
                and logits.dtype == torch.float32 and padding_mask is None
                and self.score_function == "softmax"
                and not c.moe_router_num_groups and not c.moe_router_group_topk
                and self.expert_bias is None and c.moe_expert_capacity_factor is None
                and not c.moe_router_fusion and self.router_replay is None
                and self.get_aux_loss_coeff("seq_aux_loss") == 0
                and self.get_aux_loss_coeff("global_aux_loss") == 0)

    def lean_routing(self, logits: torch.Tensor):
        """megatron's softmax top-k routing with one softmax over the experts instead of
        two: (probs [T, E], routing_map [T, E], scores [T, E] fp32).

        megatron-core 0.16.1 takes the softmax twice per call (the top-k probabilities,
        then the aux loss's scores) and a second top-k for the aux loss's map; on CPU at
        8 experts that was ~40 % of the router's time. Here the aux loss counts the
        routing map itself (megatron recomputes the same top-k; they differ only where
        two softmax scores round equal) and balances the same scores; z-loss, the loss's
        attachment and its logging are megatron's (tests/test_lean_paths.py compares).
        """
        logits = logits.reshape(-1, self.config.num_moe_experts)
        logits = self.apply_z_loss(logits)
        probs, routing_map, scores = RF.topk_softmax_routing(
            logits, self.topk, self.config.moe_router_pre_softmax,
            self.config.moe_router_topk_scaling_factor)
        if self.training and torch.is_grad_enabled():
            probs = self._apply_aux_loss(probs, scores, routing_map)
        return probs, routing_map, scores

    # ---------------------------------------------------------------- aux-loss scaling

    def aux_loss_scale(self) -> float:
        """Factor on megatron's balance-loss normalisation: 1 (megatron) or 1 / k (paper)."""
        return 1.0 if self.aux_loss_normalization == "megatron" else 1.0 / self.topk

    def get_aux_loss_coeff(self, aux_loss_type: str) -> float:
        """moe.aux_loss_coeff of ``aux_loss_type`` times ``aux_loss_scale``: megatron's
        aux_loss, seq_aux_loss and global_aux_loss, and SpecRouter's L_bal, all carry it
        (the z-loss has its own coefficient). The tracker logs the loss divided by this,
        so the logged value is in megatron's normalisation under either setting."""
        return super().get_aux_loss_coeff(aux_loss_type) * self.aux_loss_scale()

    def attach_and_log_load_balancing_loss(self, activation, aux_loss_coeff, aux_loss,
                                           aux_loss_name, reduce_group,
                                           reduce_group_has_dp=False, valid_token_count=None):
        """Megatron's attach, with the per-token scale counted over the reduce group.

        With calculate_per_token_loss, megatron-core 0.16.1 scales a rank's share of the
        loss by its local token count, then finalize_model_grads sums the router gradient
        over TP and divides by the micro batch's full count: the gradient comes out 1/TP
        (1/(TP x CP)) too small (NVIDIA/Megatron-LM#1652, fixed upstream later). Scaling
        by local tokens x group size makes it layout-independent (tests/test_routers.py).
        """
        if self.calculate_per_token_loss and not reduce_group_has_dp:
            local = valid_token_count if valid_token_count is not None else activation.shape[0]
            valid_token_count = local * reduce_group.size()
        return super().attach_and_log_load_balancing_loss(
            activation, aux_loss_coeff, aux_loss, aux_loss_name, reduce_group,
            reduce_group_has_dp=reduce_group_has_dp, valid_token_count=valid_token_count)

    def apply_z_loss(self, logits, padding_mask=None):
        """Megatron's z-loss with the same TP x CP correction of its per-token scale."""
        from megatron.core.transformer.moe.moe_utils import (
            MoEAuxLossAutoScaler,
            save_to_aux_losses_tracker,
            z_loss_func,
        )

        if not (self.config.moe_z_loss_coeff is not None and self.training
                and torch.is_grad_enabled()):
            return logits
        group_size = self.tp_cp_group.size()
        coeff = self.config.moe_z_loss_coeff / group_size
        z_loss = z_loss_func(logits, coeff, padding_mask=padding_mask)
        if self.calculate_per_token_loss:
            n = (~padding_mask).sum() if padding_mask is not None else logits.shape[0]
            logits = MoEAuxLossAutoScaler.apply(logits, z_loss * n * group_size)
        else:
            logits = MoEAuxLossAutoScaler.apply(logits, z_loss)
        num_layers = self.config.num_layers + (self.config.mtp_num_layers or 0)
        save_to_aux_losses_tracker("z_loss", z_loss / coeff, self.layer_number, num_layers)
        return logits

    # ---------------------------------------------------------------- hooks

    def on_train_step(self, step: int, total_steps: int) -> None:
        """Called before optimizer step ``step`` (0-based) of ``total_steps``."""

    def bind_moe_layer(self, layer) -> None:
        """Called once with the MoELayer that owns this router, after the model is built."""

    # ---------------------------------------------------------------- telemetry

    @torch.no_grad()
    def record_load(self, routing_map: torch.Tensor, padding_mask: Optional[torch.Tensor]):
        """Add this batch's tokens per expert to the telemetry buffer (padding excluded)."""
        if padding_mask is not None:
            routing_map = routing_map & ~padding_mask.reshape(-1, 1)
        self.telemetry_tokens_per_expert += routing_map.sum(dim=0)

    @torch.no_grad()
    def record_entropy(self, logits: torch.Tensor, padding_mask: Optional[torch.Tensor],
                       scores: Optional[torch.Tensor] = None):
        """Add the entropy of softmax(logits) of each (non-padding) token (from
        ``scores`` = that softmax when the caller has it)."""
        if scores is not None:
            ent = torch.special.entr(scores.detach())
        else:
            logits = logits.reshape(-1, logits.shape[-1]).float()
            logp = torch.log_softmax(logits, dim=-1)
            ent = -(logp.exp() * logp)
        if padding_mask is not None:
            ent = ent[~padding_mask.reshape(-1)]
        # [T, E] terms summed at once; the buffer is fp64 (long logging windows).
        self.telemetry_entropy[0] += ent.sum()
        self.telemetry_entropy[1] += ent.shape[0]


class SpecRouter(MegasmoeRouter):
    """A router whose selection follows its paper: subclasses implement ``route``.

    ``route(logits [T, E], padding_mask [T] or None) -> (probs, routing_map, scores)``
    where ``scores`` [T, E] are what the paper's balance loss balances (None: no loss).
    The balance loss is the papers' E sum_e f_e P_e (docs/router-spec.md) in the
    convention of moe.aux_loss_normalization (the module docstring: by default k times the
    papers' formula, megatron's normalisation, as ``topk``), with f from the token counts
    reduced over the tensor/context-parallel group, scaled by moe.aux_loss_coeff and only
    when moe.aux_loss_type is aux_loss.
    """

    def route(self, logits: torch.Tensor, padding_mask: Optional[torch.Tensor]):
        """The paper's routing; see the class docstring."""
        raise NotImplementedError

    def routing(self, logits: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        """Flatten, z-loss, ``route``, balance loss (training only)."""
        logits = logits.reshape(-1, self.config.num_moe_experts)
        if padding_mask is not None:
            padding_mask = padding_mask.reshape(-1)
        logits = self.apply_z_loss(logits, padding_mask=padding_mask)
        probs, routing_map, scores = self.route(logits, padding_mask)
        coeff = self.get_aux_loss_coeff("aux_loss")
        if scores is not None and coeff > 0 and self.training and torch.is_grad_enabled():
            probs = self._attach_balance_loss(probs, scores, routing_map, padding_mask, coeff)
        return probs, routing_map

    def _attach_balance_loss(self, probs, scores, routing_map, padding_mask, coeff):
        if padding_mask is not None:
            valid = (~padding_mask).unsqueeze(-1)
            scores = scores * valid
            routing_map = routing_map & valid
        counts, local_tokens, total_tokens = get_tokens_per_expert_and_token_count(
            routing_map=routing_map, reduce_group=self.tp_cp_group, topk=self.topk,
            with_padding_mask=padding_mask is not None,
        )
        # k x the papers' L_bal (P_e over T, not T k) is megatron's normalisation; coeff
        # carries aux_loss_scale, which turns it back into the papers' under ``paper``.
        aux = coeff * self.topk * RF.balance_loss(scores, routing_map, self.topk,
                                                  global_counts=counts.to(scores.dtype),
                                                  global_tokens=total_tokens)
        return self.attach_and_log_load_balancing_loss(
            probs, coeff, aux, "load_balancing_loss", self.tp_cp_group,
            valid_token_count=local_tokens,
        )
