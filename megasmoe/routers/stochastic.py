"""``stochastic``: S2MoE, sparse MoE learning under uncertainty (Do et al. 2025).

No public code was found; this is reconstructed from the paper's abstract
(/work/shared/reference/routers.md, S2MoE). In training, per MoE layer and token x:

- Noise module: x_n = x * eps1 + eps2, eps1 = mu + s1 n1, eps2 = s2 n2 with n1, n2 ~ N(0, I).
- Two passes through the same experts: y_d = SMoE(x) (megatron's MoE pass: gate
  g = W_r x, top-k with k = moe.topk, softmax over the k selected, balance loss on
  softmax(g) in the convention of ``moe.aux_loss_normalization``, the shared router
  weight W_r), and y_n = SMoE(x_n) (the same gate and
  experts on the noisy copy; the layer's dispatcher, so expert parallelism works as for
  any pass).
- A one-layer mixing gate [w0, w1] = softmax(Linear(d, 2)(x)); y = w0 y_d + w1 y_n (a
  shared expert, if any, is added outside the mixture, on x only).
- Uncertainty loss: InfoNCE between y_d and y_n. Anchor y_d of token t, positive y_n of
  t, negatives y_n of the other tokens of its sequence, cosine similarity over a
  temperature; mean over tokens, times ``uncertainty_loss_coeff``, logged as
  ``moe/uncertainty_loss/layer_i``. Under sequence parallelism y_n (and y_d when
  symmetric) is all-gathered over the tensor-parallel group, so each rank's anchors see
  the whole sequence and each rank adds its share.
- Evaluation: no noise and one pass, y = y_d with ``inference_k`` experts per token
  (the paper's claim of comparable quality at 28% lower inference cost rests on running
  fewer experts at inference). That is a plain top-k router: it exports exactly.

Every choice below is inferred (no code to read) and is a field (``moe.router.*``):

| choice | field | default |
|---|---|---|
| noise form x eps1 + eps2, eps1 ~ N(mu, s1^2), eps2 ~ N(0, s2^2) | ``noise_mul_mean``, ``noise_mul_std``, ``noise_add_std`` | 0, 1, 1 (the spec's eps ~ N(0, I)) |
| x_n routed by the gate on x_n, or sent to x's experts | ``noise_routing`` | own |
| loss coefficient | ``uncertainty_loss_coeff`` | 0.01 (as the balance loss) |
| InfoNCE temperature | ``infonce_temperature`` | 0.07 (the same authors' VQMoE contrastive loss) |
| InfoNCE direction: y_d anchors only, or the mean of both directions | ``infonce_symmetric`` | false |
| experts per token at inference | ``inference_k`` | max(1, moe.topk // 2): top-2 training, top-1 inference |

Inferred without a field: the mixing gate is Linear(d, 2) with bias (torch init) on x,
as in the same authors' VQMoE; negatives are the tokens of the same sequence (not the
batch: O(S^2) per sequence, the same set in every parallel layout); the balance loss is
on the deterministic pass only; gradients flow through both InfoNCE sides (no stop
gradient); the noisy pass has no z-loss; evaluation does not use the noise branch or the
mixing gate.

Noise streams: the draws for a micro batch come from a generator seeded by (run seed,
layer, optimizer step, global index of the micro batch in the step), over the whole
sequence, each sequence-parallel rank keeping its slice. So every parallel layout draws
the same noise for the same token, and a resumed run draws what an uninterrupted one
does; the micro batch index is the count of training forwards since ``on_train_step``
(activation recomputation's second forward of a micro batch reuses its first's index).

Trained: W_r (key ``router.weight``, as ``topk``), ``router.mix_weight``,
``router.mix_bias``. Training cost per token: 2 k experts and two dispatches; inference:
``inference_k`` experts.
"""

from __future__ import annotations

import collections

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

from megasmoe.moe import LayerBound
from megasmoe.routers import functional as RF
from megasmoe.routers.base import SpecRouter
from megasmoe.routers.options import S2MoEConfig
from megasmoe.routers.registry import register_router
from megasmoe.routers.vq import add_branch_gate, group_token_count, routed_and_shared

__all__ = ["S2MoEConfig", "S2MoERouter", "noise_seed"]


def noise_seed(seed: int, layer: int, step: int, micro_batch: int) -> int:
    """The generator seed of one micro batch's noise in one layer at one step."""
    key = seed
    for part in (layer, step, micro_batch):
        key = (key * 1_000_003 + part + 1) % (2**61 - 1)
    return key


@register_router("stochastic", S2MoEConfig)
class S2MoERouter(LayerBound, SpecRouter):
    """S2MoE: SMoE on x and on a Gaussian-noised copy, mixed by a learned gate, InfoNCE
    between the two; fewer experts at inference."""

    def __init__(self, config, pg_collection=None, router_config=None, **kwargs):
        super().__init__(config, pg_collection, router_config, **kwargs)
        add_branch_gate(self, self.config.hidden_size)
        self.train_topk = self.topk
        self._step, self._micro_batch = 0, 0
        self._recompute_keys: collections.deque = collections.deque()
        self._routed = None
        self.mark_sequence_parallel()

    def on_train_step(self, step: int, total_steps: int) -> None:
        self._step, self._micro_batch = step, 0
        self._recompute_keys = collections.deque()

    def current_k(self) -> int:
        """moe.topk in training, inference_k in evaluation."""
        return self.train_topk if self.training else self.router_config.inference_k

    def route(self, logits, padding_mask):
        k = self.current_k()
        self.config.moe_router_topk = k  # the dispatchers size their buffers from it
        probs, routing_map = RF.softmax_over_topk(logits, k)
        if self.training:
            self._routed = (probs, routing_map)  # for noise_routing=shared
        return probs, routing_map, torch.softmax(logits, dim=-1)

    # ---------------------------------------------------------------- the noise module

    def _sequence_parallel(self) -> bool:
        return bool(self.config.sequence_parallel) and self.tp_group.size() > 1

    def noise(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(n1, n2) ~ N(0, I) shaped like ``hidden`` [S/TP, B, H]: this rank's slice of the
        micro batch's draws (see the module docstring)."""
        seed = noise_seed(getattr(self.router_config, "seed", 0), self.layer_number or 0,
                          self._step, self._micro_batch_index())
        gen = torch.Generator(device=hidden.device)
        gen.manual_seed(seed)
        s_local = hidden.shape[0]
        tp = self.tp_group.size() if self._sequence_parallel() else 1
        full = torch.randn((2, s_local * tp, *hidden.shape[1:]), generator=gen,
                           device=hidden.device, dtype=torch.float32)
        rank = self.tp_group.rank() if tp > 1 else 0
        part = full[:, rank * s_local:(rank + 1) * s_local]
        return part[0], part[1]

    def _micro_batch_index(self) -> int:
        """Global index of this forward's micro batch in the step (data-parallel rank r of
        d runs micro batches r, d + r, 2 d + r, ...: the sampler's order).

        Activation recomputation runs each layer's forward twice: first without
        gradients (its index is queued), then again in the backward, in the same micro
        batch order (it takes the queued index), so both draw the same noise.
        """
        if torch.is_grad_enabled() and self._recompute_keys:
            return self._recompute_keys.popleft()
        dp = parallel_state.get_data_parallel_world_size()
        index = self._micro_batch * dp + parallel_state.get_data_parallel_rank()
        self._micro_batch += 1
        if not torch.is_grad_enabled():
            self._recompute_keys.append(index)
        return index

    # ---------------------------------------------------------------- the layer

    def moe_forward(self, layer, hidden, padding_mask=None):
        """Training: y = w0 SMoE(x) + w1 SMoE(x_n), InfoNCE attached; evaluation: SMoE(x)
        with inference_k experts."""
        if not self.training:
            return layer.smoe(hidden, padding_mask)
        rc, dtype, E = self.router_config, self.routing_dtype, self.config.num_moe_experts
        y_d, shared = routed_and_shared(layer, hidden, padding_mask)
        n1, n2 = self.noise(hidden)
        x_n = RF.noisy_input(hidden.to(dtype), n1.to(dtype), n2.to(dtype), rc.noise_mul_mean,
                             rc.noise_mul_std, rc.noise_add_std)
        if rc.noise_routing == "own":
            logits_n = self.gating(x_n).reshape(-1, E)
            probs_n, map_n = RF.softmax_over_topk(logits_n, self.train_topk)
        else:
            probs_n, map_n = self._routed
        self._routed = None
        valid = None
        if padding_mask is not None:  # [B, S] as the layer receives it; True = padding
            valid = ~padding_mask.transpose(0, 1).reshape(-1).bool()
            map_n = map_n & valid.unsqueeze(-1)
            probs_n = probs_n * valid.unsqueeze(-1)
        self.record_load(map_n, None)
        y_n = layer.run_experts(x_n.to(hidden.dtype), probs_n.to(torch.float32), map_n)
        x = hidden.reshape(-1, hidden.shape[-1]).to(dtype)
        w = RF.branch_mix(x, self.mix_weight.to(dtype), self.mix_bias.to(dtype))
        w = w.reshape(*hidden.shape[:-1], 2)
        out = (w[..., :1] * y_d.to(dtype) + w[..., 1:] * y_n.to(dtype)).to(hidden.dtype)
        if torch.is_grad_enabled() and rc.uncertainty_loss_coeff > 0:
            out = self._attach_uncertainty_loss(out, y_d, y_n, valid)
        if shared is not None:
            out = out + shared
        return out, None

    def _gather_sequence(self, y: torch.Tensor) -> torch.Tensor:
        if not self._sequence_parallel():
            return y
        # Backward: reduce-scatter, i.e. every rank's loss share reaches the slice's owner.
        return gather_from_sequence_parallel_region(y, tensor_parallel_output_grad=True,
                                                    group=self.tp_group)

    def _attach_uncertainty_loss(self, out, y_d, y_n, valid):
        rc, dtype = self.router_config, self.routing_dtype
        s_local = y_d.shape[0]
        offset = self.tp_group.rank() * s_local if self._sequence_parallel() else 0
        positive = torch.arange(offset, offset + s_local, device=y_d.device)
        y_d, y_n = y_d.to(dtype), y_n.to(dtype)
        # [B, S_local, H] anchors against [B, S, H] candidates, one group per sequence.
        ce = RF.info_nce(y_d.transpose(0, 1), self._gather_sequence(y_n).transpose(0, 1),
                         positive, rc.infonce_temperature)
        if rc.infonce_symmetric:
            ce = 0.5 * (ce + RF.info_nce(y_n.transpose(0, 1),
                                         self._gather_sequence(y_d).transpose(0, 1),
                                         positive, rc.infonce_temperature))
        ce = ce.transpose(0, 1).reshape(-1)  # tokens in [S, B] order, like valid
        if valid is not None:
            ce = ce[valid]
        local = ce.numel()
        loss = ce.sum() / group_token_count(local, valid, self.tp_cp_group)
        coeff = rc.uncertainty_loss_coeff
        return self.attach_and_log_load_balancing_loss(
            out, coeff, coeff * loss, "uncertainty_loss", self.tp_cp_group,
            valid_token_count=local)
