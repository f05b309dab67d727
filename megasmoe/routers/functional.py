"""The routers' math as plain tensor functions (no megatron, no process groups).

Shapes: T tokens, E experts, d hidden, k experts per token. ``scores``/``logits`` are
[T, E]; a routing map is a bool [T, E]; probabilities are dense [T, E] with zeros off
the map. Each function is checked against an independent float64 reference in
tests/test_router_math.py, written from the specification in docs/router-spec.md.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "topk_map",
    "softmax_over_topk",
    "balance_loss",
    "xmoe_logits",
    "cosine_logits",
    "renorm_rows_",
    "hyper_gate",
    "smoe_dropout_k",
    "unified_scores",
    "group_topk_map",
    "causal_topk_map",
    "spectral_direction",
    "spectral_mix",
    "steering_bias",
    "vq_nearest",
    "vq_loss",
    "vq_straight_through",
    "branch_mix",
    "noisy_input",
    "info_nce",
]


def topk_map(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool [T, E]: the k largest scores of each token."""
    idx = torch.topk(scores, k=k, dim=-1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter(-1, idx, True)


def softmax_over_topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SMoE gate: top-k of the logits, softmax over the k selected (dense probs, map)."""
    routing_map = topk_map(logits, k)
    masked = logits.masked_fill(~routing_map, float("-inf"))
    probs = torch.softmax(masked, dim=-1)
    return probs, routing_map


def balance_loss(scores: torch.Tensor, routing_map: torch.Tensor, k: int,
                 global_counts: torch.Tensor | None = None,
                 global_tokens: float | None = None) -> torch.Tensor:
    """L_bal = E * sum_e f_e P_e with f_e = count_e / (T k), P_e = sum_t scores_te / (T k).

    ``scores`` are the (softmax) scores the paper balances. Under sequence/context
    parallelism pass the counts and token total reduced over the group: the loss is
    then additive over ranks (each rank adds its tokens' share of P).
    """
    E = scores.shape[-1]
    counts = routing_map.sum(0).to(scores.dtype) if global_counts is None else global_counts
    T = scores.shape[0] if global_tokens is None else global_tokens
    f = counts / (T * k)
    P = scores.sum(0) / (T * k)
    return E * (f * P).sum()


def xmoe_logits(x: torch.Tensor, w_reduce: torch.Tensor, expert_emb: torch.Tensor,
                eps: float = 1e-4) -> torch.Tensor:
    """XMoE: (W_red x) . normalize(M)^T, d -> low-dim projection, no bias."""
    return (x @ w_reduce.t()) @ F.normalize(expert_emb, p=2.0, dim=1, eps=eps).t()


def cosine_logits(x: torch.Tensor, expert_emb: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """StableMoE (single stage): x . normalize(M)^T with M [E, d]."""
    return x @ F.normalize(expert_emb, p=2.0, dim=1, eps=eps).t()


@torch.no_grad()
def renorm_rows_(matrix: torch.Tensor, norm: float) -> torch.Tensor:
    """Rescale each row in place to L2 norm ``norm`` (XMoE keeps M at 1.5)."""
    return matrix.mul_(norm / matrix.norm(p=2.0, dim=1, keepdim=True))


def hyper_gate(embedding: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
               b2: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """HyperRouter: theta = Linear2(ReLU(Linear1(e))) reshaped [E, d+1] -> (W_r [E, d], b [E])."""
    theta = F.linear(F.relu(F.linear(embedding, w1, b1)), w2, b2).reshape(num_experts, -1)
    return theta[:, :-1], theta[:, -1]


def smoe_dropout_k(step: int, total_steps: int, k_start: int, k_end: int) -> int:
    """SMoE-Dropout schedule: k grows linearly from k_start to k_end over training.

    Authors: k_t = round((k_end - k_start) t / T) + k_start (8 -> 16 of 16 experts).
    """
    if total_steps <= 0:
        return k_end
    frac = min(max(step / total_steps, 0.0), 1.0)
    return int(round((k_end - k_start) * frac)) + k_start


def unified_scores(logits: torch.Tensor, alpha: float) -> torch.Tensor:
    """USMoE unified score: (1 - a) softmax_e(l) + a (2 / E) sigmoid(l)."""
    E = logits.shape[-1]
    return (1 - alpha) * torch.softmax(logits, dim=-1) + alpha * (2.0 / E) * torch.sigmoid(logits)


def group_topk_map(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Cross-token top-k: in each group [..., N, E] keep the N k largest (token, expert) pairs.

    A token may get 0..E experts; the group as a whole gets exactly N k.
    """
    *lead, N, E = scores.shape
    flat = scores.reshape(*lead, N * E)
    idx = torch.topk(flat, k=N * k, dim=-1).indices
    chosen = torch.zeros_like(flat, dtype=torch.bool).scatter(-1, idx, True)
    return chosen.reshape(*lead, N, E)


def causal_topk_map(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Causal-safe cross-token top-k over a sequence [N, E] (or [B, N, E]).

    Token t keeps its pairs that are among the (t+1) k largest of the prefix 0..t, so its
    routing never depends on later tokens. Cost O(N^2 E) per sequence.
    """
    if scores.dim() == 3:
        return torch.stack([causal_topk_map(s, k) for s in scores])
    N, E = scores.shape
    out = torch.zeros_like(scores, dtype=torch.bool)
    for t in range(N):
        prefix = scores[: t + 1].reshape(-1)
        threshold = torch.topk(prefix, k=(t + 1) * k).values[-1]
        out[t] = scores[t] >= threshold
    return out


def spectral_direction(matrix: torch.Tensor, router_row: torch.Tensor, k_svd: int) -> torch.Tensor:
    """SSMoE direction of one expert matrix M [I, d]: mean of the right singular vectors
    at the top-k_svd entries of s = r V (V [d, min(I, d)]), a vector [d].

    Singular vectors are defined up to sign; each is oriented so that r . v >= 0 (then
    the top entries of s are the directions the router already favours).
    """
    _, _, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    v = vh.t()  # [d, min(I, d)]
    s = router_row.double() @ v
    v = v * torch.where(s < 0, -1.0, 1.0)
    s = s.abs()
    top = torch.topk(s, k=min(k_svd, s.numel())).indices
    return v[:, top].mean(dim=1).to(matrix.dtype)


def spectral_mix(logits: torch.Tensor, svd_logits: torch.Tensor, c: float) -> torch.Tensor:
    """SSMoE probabilities: (1 - c) softmax(W_r x) + c softmax(l_svd)."""
    return (1 - c) * torch.softmax(logits, dim=-1) + c * torch.softmax(svd_logits, dim=-1)


def steering_bias(num_experts: int, experts: list[int], mode: str, lam: float) -> torch.Tensor:
    """DSMoE per-layer logit bias: +log(1 + lam) (multiplicative) or +lam (additive) on
    the selected experts, 0 elsewhere."""
    delta = math.log1p(lam) if mode == "multiplicative" else lam
    bias = torch.zeros(num_experts)
    if experts:
        bias[torch.as_tensor(experts, dtype=torch.long)] = delta
    return bias


# ----------------------------------------------------------------------------- VQMoE, S2MoE
# Sums with explicit denominators: under sequence parallelism each rank passes the token
# count of the whole group, so the per-rank values add up to the world-size-1 value.


def vq_nearest(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """VQMoE: index [T] of the codebook entry nearest to each token, argmin_j ||x - C_j||^2."""
    dist = (x.pow(2).sum(-1, keepdim=True) + codebook.pow(2).sum(-1)
            - 2.0 * x @ codebook.t())
    return dist.argmin(dim=-1)


def vq_loss(x: torch.Tensor, code: torch.Tensor, commitment: float,
            num_elements: float | None = None) -> torch.Tensor:
    """L_vq = MSE(C_j, sg(x)) + commitment MSE(sg(C_j), x) (codebook + commitment loss).

    ``code`` [T, d] is each token's nearest entry C_j. The squared errors are summed and
    divided by ``num_elements`` (default ``x.numel()``: the mean).
    """
    n = x.numel() if num_elements is None else num_elements
    codebook_term = (code - x.detach()).pow(2).sum()
    commitment_term = (code.detach() - x).pow(2).sum()
    return (codebook_term + commitment * commitment_term) / n


def vq_straight_through(x: torch.Tensor, code: torch.Tensor, contrib: float) -> torch.Tensor:
    """x~ = (1 - contrib) x + contrib sg(C_j - x): the VQ expert's input (authors 0.05)."""
    return (1.0 - contrib) * x + contrib * (code - x).detach()


def branch_mix(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Two-branch mixing gate [w0, w1] = softmax(Linear(d, 2)(x)), [T, 2]."""
    return torch.softmax(F.linear(x, weight, bias), dim=-1)


def noisy_input(x: torch.Tensor, eps_mul: torch.Tensor, eps_add: torch.Tensor,
                mul_mean: float, mul_std: float, add_std: float) -> torch.Tensor:
    """S2MoE noise module x_n = x * eps1 + eps2 with eps1 = mul_mean + mul_std n1 and
    eps2 = add_std n2 from standard normal draws n1, n2 (the spec: eps ~ N(0, I))."""
    return x * (mul_mean + mul_std * eps_mul) + add_std * eps_add


def info_nce(anchors: torch.Tensor, candidates: torch.Tensor, positive: torch.Tensor,
             temperature: float) -> torch.Tensor:
    """InfoNCE per anchor: -log softmax_m(cos(a_n, c_m) / tau)[positive_n].

    ``anchors`` [G, N, d], ``candidates`` [G, M, d] (groups, e.g. sequences), ``positive``
    [N] index of each anchor's positive among the M candidates; returns [G, N].
    """
    a = F.normalize(anchors, dim=-1)
    c = F.normalize(candidates, dim=-1)
    logits = a @ c.transpose(-1, -2) / temperature
    logp = torch.log_softmax(logits, dim=-1)
    index = positive.view(1, -1, 1).expand(logits.shape[0], -1, 1)
    return -logp.gather(-1, index).squeeze(-1)
