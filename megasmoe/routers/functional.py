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
    "softmax_experts",
    "topk_softmax_routing",
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
    "schedule_uniform",
    "competition_layers",
    "compete_v1_route",
    "compete_v2_route",
    "compete_router_loss",
    "pairwise_cosine",
    "entropy_balance",
    "pair_counts",
    "cka_linear",
    "cka_rbf",
    "vq_nearest",
    "vq_loss",
    "vq_straight_through",
    "branch_mix",
    "noisy_input",
    "info_nce",
]


def softmax_experts(x: torch.Tensor) -> torch.Tensor:
    """Softmax over the last (expert) dimension of a 2-D [T, E] tensor, in x's dtype.

    On CPU it runs torch's kernel over dim 0 of the transposed view: torch's CPU softmax
    over a short last dimension works row by row (512 x 8 in fp32: ~55 us, against ~8 us
    over the leading dimension, vectorised across tokens). Same values up to rounding
    (within a few ulp); the result is a transposed view. Elsewhere: plain ``softmax``.
    """
    if x.device.type == "cpu" and x.dim() == 2:
        return torch.softmax(x.t(), dim=0).t()
    return torch.softmax(x, dim=-1)


def topk_softmax_routing(logits: torch.Tensor, k: int, pre_softmax: bool,
                         scaling_factor: float | None = None):
    """megatron-core's softmax top-k routing (``topk_routing_with_score_function`` without
    groups or expert bias), sharing one softmax over all experts with the balance loss.

    ``logits`` fp32 [T, E]. Returns (probs [T, E] dense in logits' dtype, routing_map
    bool [T, E], scores [T, E] = softmax over all experts: what megatron's aux loss
    balances). ``pre_softmax``: the top-k of the scores are the probabilities; otherwise
    (Mixtral) softmax over the k selected logits. ``scaling_factor`` multiplies the probs.
    """
    scores = softmax_experts(logits)
    if pre_softmax:
        probs, idx = torch.topk(scores, k=k, dim=1)
    else:
        top, idx = torch.topk(logits, k=k, dim=1)
        probs = softmax_experts(top)
    if scaling_factor:
        probs = probs * scaling_factor
    dense = torch.zeros_like(logits).scatter(1, idx, probs)
    routing_map = torch.zeros_like(logits, dtype=torch.bool).scatter(1, idx, True)
    return dense, routing_map, scores


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


# ----------------------------------------------------------------------------- CompeteSMoE


def schedule_uniform(seed: int, step: int, layer: int) -> float:
    """A uniform number in [0, 1) that is a pure function of (seed, step, layer)
    (splitmix64 of the three): every rank and a resumed run draw the same."""
    mask = (1 << 64) - 1
    z = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + layer * 0x94D049BB133111EB
         + 0x632BE59BD9B4E5D1) & mask
    for _ in range(2):
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        z ^= z >> 31
    return (z >> 11) / float(1 << 53)


def competition_layers(seed: int, step: int, num_layers: int, frequency: float,
                       max_layers: int | None) -> set[int]:
    """CompeteSMoE schedule: the 0-based layers that compete at ``step``.

    Layer l competes when u(seed, step, l) < frequency (v1: a probability per layer per
    step; v2: the fraction of steps pre-scheduled per layer); at most ``max_layers``
    (the ones with the smallest u) per step, None = no cap.
    """
    draws = sorted((schedule_uniform(seed, step, layer), layer) for layer in range(num_layers))
    chosen = [layer for u, layer in draws if u < frequency]
    if max_layers is not None:
        chosen = chosen[:max_layers]
    return set(chosen)


def compete_v1_route(affinity: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CompeteSMoE v1 on a competition step: top-k of a = ||y_e||, softmax over the
    selected a (dense probs, map)."""
    return softmax_over_topk(affinity, k)


def compete_v2_route(affinity: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CompeteSMoE v2 on a competition step: top-k of a = mean_D softplus(y_e) (> 0),
    weights the selected a divided by their sum."""
    routing_map = topk_map(affinity, k)
    kept = affinity * routing_map
    return kept / kept.sum(-1, keepdim=True), routing_map


def compete_router_loss(logits: torch.Tensor, target: torch.Tensor,
                        routing_map: torch.Tensor | None = None,
                        topk_weight: float = 0.0) -> torch.Tensor:
    """Per-token router loss [T]: mean_e (softmax(g)_e - q_e)^2 (q detached by the caller),
    plus ``topk_weight`` x the same mean over the k entries of ``routing_map`` (v2)."""
    sq = (torch.softmax(logits, dim=-1) - target) ** 2
    loss = sq.mean(-1)
    if routing_map is not None and topk_weight:
        k = routing_map.sum(-1).clamp(min=1)
        loss = loss + topk_weight * (sq * routing_map).sum(-1) / k
    return loss


def pairwise_cosine(outputs: torch.Tensor, routing_map: torch.Tensor) -> torch.Tensor:
    """Per-token mean cosine similarity over the k(k-1)/2 pairs of selected experts:
    outputs [T, E, H], routing_map [T, E] with k >= 2 per token -> [T]."""
    unit = F.normalize(outputs, dim=-1) * routing_map.unsqueeze(-1)
    s = unit.sum(1)  # sum of the selected unit vectors
    k = routing_map.sum(-1).to(outputs.dtype)
    # sum_{i != j} u_i . u_j = |sum u|^2 - sum |u|^2 = |s|^2 - k
    return ((s * s).sum(-1) - k) / (k * (k - 1))


def entropy_balance(scores_sum: torch.Tensor, tokens) -> torch.Tensor:
    """log E - H(mean_t p_t): 0 when the mean routing distribution is uniform (the
    ``scores_sum`` [E] of p over the tokens, ``tokens`` their count)."""
    mean = scores_sum / tokens
    ent = -(mean * torch.log(mean.clamp_min(1e-20))).sum()
    return math.log(scores_sum.shape[-1]) - ent


# ----------------------------------------------------------------------------- SimSMoE


def pair_counts(routing_map: torch.Tensor) -> torch.Tensor:
    """[E, E] (upper triangle, i < j): tokens whose selected experts include both i and j
    (all k(k-1)/2 pairs of each token)."""
    m = routing_map.to(torch.float64)
    return torch.triu(m.t() @ m, diagonal=1)


def _center_gram(gram: torch.Tensor) -> torch.Tensor:
    n = gram.shape[0]
    h = torch.eye(n, dtype=gram.dtype, device=gram.device) - 1.0 / n
    return h @ gram @ h


def _cka(gram_x: torch.Tensor, gram_y: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) in float64; 0 (and no gradient) when a
    representation is constant over the tokens (its centred Gram matrix vanishes)."""
    cx, cy = _center_gram(gram_x.double()), _center_gram(gram_y.double())
    den_sq = (cx * cx).sum() * (cy * cy).sum()
    cka = (cx * cy).sum() / torch.sqrt(den_sq.clamp_min(eps * eps))
    return torch.where(den_sq > eps * eps, cka, torch.zeros_like(cka))


def cka_linear(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Linear CKA of two representations [n, f] of the same n tokens (in float64)."""
    a, b = a.double(), b.double()
    return _cka(a @ a.t(), b @ b.t())


def cka_rbf(a: torch.Tensor, b: torch.Tensor, sigma: float) -> torch.Tensor:
    """RBF CKA: K = exp(-||a_s - a_t||^2 / (2 sigma^2)), centred HSIC, normalised; in
    float64 (the squared distances cancel badly in float32)."""
    a, b = a.double(), b.double()

    def gram(z):
        sq = (z * z).sum(-1)
        dist = (sq.unsqueeze(0) + sq.unsqueeze(1) - 2 * z @ z.t()).clamp_min(0)
        return torch.exp(-dist / (2 * sigma ** 2))

    return _cka(gram(a), gram(b))
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
