"""Golden tests of the routers' math (megasmoe/routers/functional.py).

Each function is compared in float64 with an independent reference written here from
the specification (docs/router-spec.md), with explicit Python loops and
sorting (numpy for the SVD) rather than the vectorised torch of the implementation.
Small shapes: T = 12 tokens, E = 6 experts, d = 10, k = 2. Random inputs are drawn
from a seeded generator; float64 random scores have no ties.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from megasmoe.routers import functional as RF

T, E, D, K = 12, 6, 10, 2
TOL = 1e-12


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=torch.float64)


def _softmax(values: list[float]) -> list[float]:
    m = max(values)
    ex = [math.exp(v - m) for v in values]
    s = sum(ex)
    return [v / s for v in ex]


def _sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def _top_indices(row: list[float], k: int) -> list[int]:
    return [i for _, i in sorted(((v, i) for i, v in enumerate(row)), reverse=True)[:k]]


def _ref_smoe(logits: torch.Tensor, k: int):
    """SMoE: top-k of the logits, softmax over the k selected (routers.md, Baselines)."""
    rows = logits.tolist()
    probs = torch.zeros(len(rows), len(rows[0]), dtype=torch.float64)
    chosen = torch.zeros(len(rows), len(rows[0]), dtype=torch.bool)
    for t, row in enumerate(rows):
        top = _top_indices(row, k)
        for e, p in zip(top, _softmax([row[e] for e in top])):
            probs[t, e] = p
            chosen[t, e] = True
    return probs, chosen


def _ref_matvec(matrix: torch.Tensor, vec: list[float]) -> list[float]:
    return [sum(a * b for a, b in zip(row, vec)) for row in matrix.tolist()]


def _ref_normalize_rows(matrix: torch.Tensor, eps: float = 1e-4) -> list[list[float]]:
    out = []
    for row in matrix.tolist():
        n = math.sqrt(sum(v * v for v in row))
        out.append([v / max(n, eps) for v in row])
    return out


# ----------------------------------------------------------------------------- SMoE


def test_topk_map_and_softmax_over_topk():
    logits = _randn(T, E, seed=1)
    probs, chosen = RF.softmax_over_topk(logits, K)
    ref_probs, ref_map = _ref_smoe(logits, K)
    assert probs.dtype == torch.float64 and chosen.dtype == torch.bool
    assert torch.equal(chosen, ref_map)
    assert torch.equal(RF.topk_map(logits, K), ref_map)
    torch.testing.assert_close(probs, ref_probs, rtol=0, atol=TOL)
    assert torch.all(probs[~chosen] == 0)
    torch.testing.assert_close(probs.sum(-1), torch.ones(T, dtype=torch.float64), rtol=0, atol=TOL)


@pytest.mark.parametrize("k", [1, 2, 3, E])
def test_softmax_over_topk_any_k(k):
    logits = _randn(T, E, seed=2) * 3
    probs, chosen = RF.softmax_over_topk(logits, k)
    ref_probs, ref_map = _ref_smoe(logits, k)
    assert torch.equal(chosen, ref_map)
    assert torch.all(chosen.sum(-1) == k)
    torch.testing.assert_close(probs, ref_probs, rtol=0, atol=TOL)


@pytest.mark.parametrize("k", [1, 2, E])
@pytest.mark.parametrize("pre_softmax", [False, True])
@pytest.mark.parametrize("scaling", [None, 2.5])
def test_topk_softmax_routing(k, pre_softmax, scaling):
    """megatron's softmax top-k (the lean routing): Mixtral's softmax over the k selected
    logits, or with pre_softmax the top-k of the softmax over all experts; both times the
    scaling factor; scores = the softmax over all experts."""
    logits = _randn(T, E, seed=3) * 2
    probs, chosen, scores = RF.topk_softmax_routing(logits, k, pre_softmax, scaling)
    rows = logits.tolist()
    ref_scores = torch.tensor([_softmax(row) for row in rows], dtype=torch.float64)
    ref_probs, ref_map = _ref_smoe(logits, k)
    if pre_softmax:
        ref_probs = ref_scores * ref_map
    ref_probs = ref_probs * (scaling or 1.0)
    assert torch.equal(chosen, ref_map) and chosen.dtype == torch.bool
    torch.testing.assert_close(scores, ref_scores, rtol=0, atol=TOL)
    torch.testing.assert_close(probs, ref_probs, rtol=0, atol=TOL)


@pytest.mark.parametrize("shape", [(T, E), (512, 8), (3, 64)])
def test_softmax_experts_is_the_softmax_over_the_last_dim(shape):
    x = torch.randn(*shape, generator=_gen(4)) * 4
    ref = torch.tensor([_softmax(row) for row in x.double().tolist()], dtype=torch.float64)
    got = RF.softmax_experts(x)
    assert got.dtype == torch.float32 and got.shape == x.shape
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(RF.softmax_experts(x.double()), ref, rtol=0, atol=TOL)


def _ref_balance(scores: torch.Tensor, chosen: torch.Tensor, k: int) -> float:
    """L_bal = E sum_e f_e P_e, f_e = count_e / (T k), P_e = sum_t scores_te / (T k)."""
    n_tok, n_exp = scores.shape
    total = 0.0
    for e in range(n_exp):
        count = 0
        mass = 0.0
        for t in range(n_tok):
            if chosen[t, e]:
                count += 1
            mass += float(scores[t, e])
        f = count / (n_tok * k)
        p = mass / (n_tok * k)
        total += f * p
    return n_exp * total


def test_balance_loss_matches_loop_reference():
    logits = _randn(T, E, seed=3)
    scores = torch.softmax(logits, dim=-1)
    chosen = RF.topk_map(logits, K)
    got = RF.balance_loss(scores, chosen, K)
    assert abs(float(got) - _ref_balance(scores, chosen, K)) < TOL


def test_balance_loss_uniform_router_is_one_over_k():
    """A perfectly balanced router: f_e = 1/E, P_e = 1/(E k): L = E * E * 1/(E^2 k) = 1/k."""
    scores = torch.full((E, E), 1.0 / E, dtype=torch.float64)
    chosen = torch.zeros(E, E, dtype=torch.bool)
    for t in range(E):
        for j in range(K):
            chosen[t, (t + j) % E] = True
    assert abs(float(RF.balance_loss(scores, chosen, K)) - 1.0 / K) < TOL


def test_balance_loss_is_additive_over_token_shards():
    """Sequence parallelism: each shard passes the global counts and token total; the shard
    losses then add up to the loss of all tokens."""
    logits = _randn(T, E, seed=4)
    scores = torch.softmax(logits, dim=-1)
    chosen = RF.topk_map(logits, K)
    counts = chosen.sum(0).to(torch.float64)
    parts = [RF.balance_loss(scores[s], chosen[s], K, global_counts=counts, global_tokens=T)
             for s in (slice(0, 5), slice(5, T))]
    assert abs(float(sum(parts)) - _ref_balance(scores, chosen, K)) < TOL


def test_balance_loss_gradient():
    """dL/dscores_te = E f_e / (T k) (counts are not differentiated)."""
    logits = _randn(T, E, seed=5)
    scores = torch.softmax(logits, dim=-1).requires_grad_(True)
    chosen = RF.topk_map(logits, K)
    RF.balance_loss(scores, chosen, K).backward()
    counts = chosen.sum(0).tolist()
    for t in range(T):
        for e in range(E):
            ref = E * (counts[e] / (T * K)) / (T * K)
            assert abs(float(scores.grad[t, e]) - ref) < TOL


# ----------------------------------------------------------------------------- XMoE / StableMoE


def test_xmoe_logits():
    """g = (W_red x) . normalize(M)^T, W_red: d -> 8 without bias, M [E, 8]."""
    x, w_red, m = _randn(T, D, seed=6), _randn(8, D, seed=7), _randn(E, 8, seed=8) * 0.3
    got = RF.xmoe_logits(x, w_red, m)
    m_n = _ref_normalize_rows(m)
    ref = torch.zeros(T, E, dtype=torch.float64)
    for t in range(T):
        h = _ref_matvec(w_red, x[t].tolist())
        for e in range(E):
            ref[t, e] = sum(a * b for a, b in zip(h, m_n[e]))
    assert got.shape == (T, E)
    torch.testing.assert_close(got, ref, rtol=0, atol=TOL)


def test_xmoe_logits_do_not_depend_on_embedding_scale():
    x, w_red, m = _randn(T, D, seed=9), _randn(8, D, seed=10), _randn(E, 8, seed=11)
    torch.testing.assert_close(RF.xmoe_logits(x, w_red, m), RF.xmoe_logits(x, w_red, 7.0 * m),
                               rtol=0, atol=TOL)


def test_renorm_rows_gives_norm_1p5_in_place():
    m = _randn(E, 8, seed=12) * 0.32
    before = m.clone()
    ptr = m.data_ptr()
    out = RF.renorm_rows_(m, 1.5)
    assert m.data_ptr() == ptr and out.data_ptr() == ptr
    for e in range(E):
        row, old = m[e].tolist(), before[e].tolist()
        assert abs(math.sqrt(sum(v * v for v in row)) - 1.5) < TOL
        scale = 1.5 / math.sqrt(sum(v * v for v in old))
        for a, b in zip(row, old):
            assert abs(a - b * scale) < TOL  # direction unchanged


def test_renorm_rows_works_on_a_trainable_parameter():
    """No autograd error: the rescale is done without grad tracking (a leaf Parameter)."""
    p = torch.nn.Parameter(_randn(E, 8, seed=13))
    RF.renorm_rows_(p, 1.5)
    assert p.grad_fn is None
    torch.testing.assert_close(p.detach().norm(dim=1), torch.full((E,), 1.5, dtype=torch.float64),
                               rtol=0, atol=TOL)


def test_stablemoe_cosine_logits():
    """g = x . normalize(M)^T with M [E, d]."""
    x, m = _randn(T, D, seed=14), _randn(E, D, seed=15) * 0.32
    got = RF.cosine_logits(x, m)
    m_n = _ref_normalize_rows(m)
    ref = torch.tensor([[sum(a * b for a, b in zip(x[t].tolist(), m_n[e])) for e in range(E)]
                        for t in range(T)], dtype=torch.float64)
    torch.testing.assert_close(got, ref, rtol=0, atol=TOL)


# ----------------------------------------------------------------------------- HyperRouter


def test_hyper_gate_matches_loop_reference():
    """theta = W2 relu(W1 e + b1) + b2, reshaped [E, d + 1]: W_r = theta[:, :d], b = theta[:, d]."""
    d_e, h = 7, 5
    emb = _randn(1, d_e, seed=16)
    w1, b1 = _randn(h, d_e, seed=17), _randn(h, seed=18)
    w2, b2 = _randn(E * (D + 1), h, seed=19), _randn(E * (D + 1), seed=20)
    w_r, b = RF.hyper_gate(emb, w1, b1, w2, b2, E)
    assert w_r.shape == (E, D) and b.shape == (E,)
    e = emb[0].tolist()
    hidden = [max(0.0, v + float(b1[j])) for j, v in enumerate(_ref_matvec(w1, e))]
    theta = [v + float(b2[m]) for m, v in enumerate(_ref_matvec(w2, hidden))]
    for ex in range(E):
        for i in range(D):
            assert abs(float(w_r[ex, i]) - theta[ex * (D + 1) + i]) < TOL
        assert abs(float(b[ex]) - theta[ex * (D + 1) + D]) < TOL
    # The gate it defines: g = x W_r^T + b.
    x = _randn(T, D, seed=21)
    g = torch.nn.functional.linear(x, w_r, b)
    for t in range(T):
        for ex in range(E):
            ref = sum(x[t, i].item() * theta[ex * (D + 1) + i] for i in range(D)) \
                + theta[ex * (D + 1) + D]
            assert abs(float(g[t, ex]) - ref) < 1e-10


def test_hyper_gate_gradient_reaches_only_the_embedding():
    d_e, h = 7, 5
    emb = torch.nn.Parameter(_randn(1, d_e, seed=22))
    frozen = [torch.nn.Parameter(t, requires_grad=False) for t in (
        _randn(h, d_e, seed=23), _randn(h, seed=24), _randn(E * (D + 1), h, seed=25),
        _randn(E * (D + 1), seed=26))]
    w_r, b = RF.hyper_gate(emb, *frozen, E)
    (torch.nn.functional.linear(_randn(T, D, seed=27), w_r, b) ** 2).sum().backward()
    assert emb.grad is not None and emb.grad.abs().sum() > 0
    assert all(p.grad is None for p in frozen)


# ----------------------------------------------------------------------------- SMoE-Dropout


@pytest.mark.parametrize("total", [10, 16, 20, 100, 1000])
def test_smoe_dropout_k_schedule_authors_formula(total):
    """Authors: k_t = round(8 t / T) + 8 (8 -> 16 of 16 experts)."""
    ks = [RF.smoe_dropout_k(t, total, 8, 16) for t in range(total + 1)]
    assert ks == [round(8 * t / total) + 8 for t in range(total + 1)]
    assert ks[0] == 8 and ks[-1] == 16
    assert all(b >= a for a, b in zip(ks, ks[1:]))
    assert all(isinstance(k, int) for k in ks)


def test_smoe_dropout_k_clamps_and_degenerate_schedules():
    assert RF.smoe_dropout_k(150, 100, 8, 16) == 16  # past the end: k_end
    assert RF.smoe_dropout_k(0, 0, 2, 8) == 8  # no schedule: k_end
    assert [RF.smoe_dropout_k(t, 20, 2, 8) for t in (0, 5, 10, 20)] == [2, round(1.5) + 2, 5, 8]
    assert all(RF.smoe_dropout_k(t, 20, 4, 4) == 4 for t in range(21))


def test_smoe_dropout_defaults_are_the_authors_schedule():
    """Null k_start / k_end: E / 2 -> E, so with 16 experts the authors' 8 -> 16 schedule
    k_t = round(8 t / T) + 8, whatever moe.topk."""
    from conftest import REPO
    from megasmoe.config import load_config, validate
    from megasmoe.routers import router_config_for

    steps = 40
    cfg = validate(load_config(str(REPO / "configs" / "tiny-cpu.yaml"), [
        "moe.router.name=smoe_dropout", "moe.aux_loss_type=none", "moe.num_experts=16",
        "moe.topk=2", f"train.steps={steps}"]))
    rc = router_config_for(cfg)
    assert (rc.k_start, rc.k_end, rc.inference_k, rc.schedule_steps) == (8, 16, 2, steps)
    ks = [RF.smoe_dropout_k(t, rc.schedule_steps, rc.k_start, rc.k_end) for t in range(steps + 1)]
    assert ks == [round(8 * t / steps) + 8 for t in range(steps + 1)]


# ----------------------------------------------------------------------------- USMoE


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_unified_scores(alpha):
    """s = (1 - alpha) softmax_e(l) + alpha (2 / E) sigmoid(l)."""
    logits = _randn(T, E, seed=28)
    got = RF.unified_scores(logits, alpha)
    for t in range(T):
        row = logits[t].tolist()
        sm = _softmax(row)
        for e in range(E):
            ref = (1 - alpha) * sm[e] + alpha * (2.0 / E) * _sigmoid(row[e])
            assert abs(float(got[t, e]) - ref) < TOL
    assert torch.all(got >= 0)


def _ref_group_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Sort all N E (token, expert) pairs of the group, keep the N k largest."""
    n, e = scores.shape
    pairs = sorted(((float(scores[t, j]), t, j) for t in range(n) for j in range(e)), reverse=True)
    out = torch.zeros(n, e, dtype=torch.bool)
    for _, t, j in pairs[: n * k]:
        out[t, j] = True
    return out


def test_group_topk_map_single_group():
    scores = RF.unified_scores(_randn(T, E, seed=29) * 2, 0.5)
    got = RF.group_topk_map(scores, K)
    assert torch.equal(got, _ref_group_topk(scores, K))
    assert int(got.sum()) == T * K  # the group as a whole gets N k pairs
    per_token = got.sum(-1)
    assert per_token.min() != per_token.max()  # fractional top-k: variable per token


def test_group_topk_map_batched_groups():
    """[B, N, E]: each group (sequence) chooses on its own."""
    scores = RF.unified_scores(_randn(3, T, E, seed=30) * 2, 0.5)
    got = RF.group_topk_map(scores, K)
    assert got.shape == (3, T, E)
    for b in range(3):
        assert torch.equal(got[b], _ref_group_topk(scores[b], K))
        assert int(got[b].sum()) == T * K


def test_position_groups_follow_megatrons_layout():
    """group=position: scores [S, B, E] as megatron lays tokens out ([S, B], s-major);
    each time step s keeps the B k largest (token, expert) pairs of its B tokens."""
    n_pos, n_seq = 5, 4
    scores = RF.unified_scores(_randn(n_pos, n_seq, E, seed=45) * 2, 0.5)
    got = RF.group_topk_map(scores, K)
    flat = got.reshape(n_pos * n_seq, E)  # the router's [T, E] rows: token (s, b) at s B + b
    for s in range(n_pos):
        ref = _ref_group_topk(scores[s], K)
        assert torch.equal(got[s], ref)
        assert torch.equal(flat[s * n_seq:(s + 1) * n_seq], ref)
        assert int(ref.sum()) == n_seq * K
    assert flat.sum(-1).min() != flat.sum(-1).max()  # still fractional per token


def test_position_group_leaks_across_sequences_not_from_the_future():
    """A token's experts never depend on later positions (of any sequence), but do on the
    other sequences' tokens at its own position (the documented trade-off)."""
    scores = RF.unified_scores(_randn(T, 3, E, seed=46) * 2, 0.5)
    base = RF.group_topk_map(scores, K)
    later = scores.clone()
    later[T // 2:] = RF.unified_scores(_randn(T - T // 2, 3, E, seed=47) * 4, 0.5)
    assert torch.equal(RF.group_topk_map(later, K)[: T // 2], base[: T // 2])
    others = scores.clone()
    others[:, 1:] = 1.0  # the other sequences now claim the largest scores
    assert not torch.equal(RF.group_topk_map(others, K)[:, 0], base[:, 0])
    assert int(RF.group_topk_map(others, K)[:, 0].sum()) == 0


def _ref_causal(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Token t keeps its pairs among the (t + 1) k largest pairs of tokens 0..t."""
    n, e = scores.shape
    out = torch.zeros(n, e, dtype=torch.bool)
    for t in range(n):
        prefix = _ref_group_topk(scores[: t + 1], k)
        out[t] = prefix[t]
    return out


def test_causal_topk_map_matches_prefix_reference():
    scores = RF.unified_scores(_randn(T, E, seed=31) * 2, 0.5)
    got = RF.causal_topk_map(scores, K)
    assert torch.equal(got, _ref_causal(scores, K))
    batched = RF.causal_topk_map(torch.stack([scores, scores.flip(0)]), K)
    assert torch.equal(batched[0], got)
    assert torch.equal(batched[1], _ref_causal(scores.flip(0), K))


def test_causal_topk_map_never_depends_on_later_tokens():
    scores = RF.unified_scores(_randn(T, E, seed=32) * 2, 0.5)
    base = RF.causal_topk_map(scores, K)
    for t in range(T - 1):
        for seed in range(3):
            changed = scores.clone()
            changed[t + 1:] = RF.unified_scores(_randn(T - t - 1, E, seed=100 + 10 * t + seed) * 4,
                                                0.5)
            assert torch.equal(RF.causal_topk_map(changed, K)[: t + 1], base[: t + 1]), t


def test_sequence_group_routing_does_depend_on_later_tokens():
    """The documented leakage of the sequence group (the reason the causal group exists)."""
    scores = RF.unified_scores(_randn(T, E, seed=33) * 2, 0.5)
    base = RF.group_topk_map(scores, K)
    changed = scores.clone()
    changed[T // 2:] = 1.0  # later tokens now claim the largest scores
    assert not torch.equal(RF.group_topk_map(changed, K)[: T // 2], base[: T // 2])


# ----------------------------------------------------------------------------- SSMoE


def _ref_direction(matrix: np.ndarray, r: np.ndarray, k_svd: int) -> np.ndarray:
    """V = right singular vectors of M (d x min(I, d)); orient each so r.v >= 0; mean of
    the columns at the top-k_svd entries of |s| = |r V|."""
    _, _, vh = np.linalg.svd(matrix, full_matrices=False)
    cols = []
    for v in vh:  # rows of vh are the right singular vectors
        s = float(r @ v)
        cols.append((abs(s), v if s >= 0 else -v))
    cols.sort(key=lambda item: item[0], reverse=True)
    top = [v for _, v in cols[:k_svd]]
    return np.mean(top, axis=0)


@pytest.mark.parametrize("rows,k_svd", [(16, 3), (6, 2), (16, 50), (6, 50)])
def test_spectral_direction_matches_numpy_svd(rows, k_svd):
    m = _randn(rows, D, seed=34 + rows)
    r = _randn(D, seed=35)
    got = RF.spectral_direction(m, r, k_svd)
    ref = _ref_direction(m.numpy(), r.numpy(), k_svd)
    assert got.shape == (D,) and got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), ref, rtol=0, atol=1e-10)
    assert float(r @ got) >= 0  # oriented towards the router row


def test_spectral_direction_is_invariant_to_the_svd_sign_convention():
    """Flipping the sign of M flips U or V in the SVD; the oriented direction is the same."""
    m, r = _randn(16, D, seed=36), _randn(D, seed=37)
    torch.testing.assert_close(RF.spectral_direction(m, r, 4), RF.spectral_direction(-m, r, 4),
                               rtol=0, atol=1e-10)


def test_spectral_direction_float32_input_returns_float32():
    m, r = _randn(16, D, seed=38).float(), _randn(D, seed=39).float()
    got = RF.spectral_direction(m, r, 4)
    assert got.dtype == torch.float32
    ref = _ref_direction(m.double().numpy(), r.double().numpy(), 4)
    np.testing.assert_allclose(got.double().numpy(), ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("c", [0.0, 0.5, 1.0])
def test_spectral_mix(c):
    """p = (1 - c) softmax(W_r x) + c softmax(l_svd)."""
    logits, svd = _randn(T, E, seed=40), _randn(T, E, seed=41)
    got = RF.spectral_mix(logits, svd, c)
    for t in range(T):
        a, b = _softmax(logits[t].tolist()), _softmax(svd[t].tolist())
        for e in range(E):
            assert abs(float(got[t, e]) - ((1 - c) * a[e] + c * b[e])) < TOL
    torch.testing.assert_close(got.sum(-1), torch.ones(T, dtype=torch.float64), rtol=0, atol=TOL)


def test_spectral_mix_c0_gives_the_smoe_choice():
    """c = 0: top-k of p is the top-k of the logits, renormalised p is the SMoE softmax."""
    logits, svd = _randn(T, E, seed=42), _randn(T, E, seed=43)
    p = RF.spectral_mix(logits, svd, 0.0)
    chosen = RF.topk_map(p, K)
    ref_probs, ref_map = _ref_smoe(logits, K)
    assert torch.equal(chosen, ref_map)
    renorm = p * chosen / (p * chosen).sum(-1, keepdim=True)
    torch.testing.assert_close(renorm, ref_probs, rtol=0, atol=TOL)


# ----------------------------------------------------------------------------- DSMoE


@pytest.mark.parametrize("mode,lam", [("multiplicative", 0.10), ("multiplicative", 2.0),
                                      ("additive", 0.10), ("additive", 1.5)])
def test_steering_bias(mode, lam):
    """+log(1 + lambda) (multiplicative) or +lambda (additive) on the chosen experts, 0 else."""
    chosen = [1, 4]
    got = RF.steering_bias(E, chosen, mode, lam)
    delta = math.log(1.0 + lam) if mode == "multiplicative" else lam
    assert got.shape == (E,)
    for e in range(E):
        ref = delta if e in chosen else 0.0
        assert abs(float(got[e]) - ref) <= 1e-7 * max(1.0, abs(ref)), (e, float(got[e]), ref)


def test_steering_bias_no_experts_is_zero():
    assert torch.equal(RF.steering_bias(E, [], "multiplicative", 0.1), torch.zeros(E))


def test_steering_bias_shifts_softmax_by_factor_1_plus_lambda():
    """Multiplicative mode: a chosen expert's unnormalised softmax weight grows by 1 + lambda."""
    logits = _randn(T, E, seed=44)
    bias = RF.steering_bias(E, [2], "multiplicative", 0.1).double()
    ratio = torch.exp(logits + bias) / torch.exp(logits)
    torch.testing.assert_close(ratio[:, 2], torch.full((T,), 1.1, dtype=torch.float64),
                               rtol=1e-7, atol=0)
    torch.testing.assert_close(ratio[:, 0], torch.ones(T, dtype=torch.float64), rtol=0, atol=0)
