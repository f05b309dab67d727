"""Golden tests of VQMoE's and S2MoE's math (megasmoe/routers/functional.py, last section)
and of their config validation.

References are written here from the specification (/work/shared/reference/routers.md,
docs/router-spec.md: VQMoE, S2MoE) with explicit Python loops in float64. Small shapes:
T = 12 tokens, d = 10, a codebook of K = 5 entries.
"""

from __future__ import annotations

import math

import pytest
import torch

from megasmoe.config import ConfigError, load_config, validate
from megasmoe.routers import functional as RF
from megasmoe.routers import router_config_for

T, D, K = 12, 10, 5
TOL = 1e-12


def _randn(*shape, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _sqdist(a: list[float], b: list[float]) -> float:
    return sum((u - v) ** 2 for u, v in zip(a, b))


def _softmax(values: list[float]) -> list[float]:
    m = max(values)
    ex = [math.exp(v - m) for v in values]
    return [v / sum(ex) for v in ex]


def test_vq_nearest_is_the_closest_codebook_entry():
    x, codebook = _randn(T, D, seed=1), _randn(K, D, seed=2)
    got = RF.vq_nearest(x, codebook)
    for t, row in enumerate(x.tolist()):
        dists = [_sqdist(row, c) for c in codebook.tolist()]
        assert int(got[t]) == dists.index(min(dists))


def test_vq_loss_value_and_gradients():
    """L_vq = MSE(C_j, sg(x)) + 0.25 MSE(sg(C_j), x): the codebook gets only the first
    term's gradient, the token only the commitment term's."""
    x = _randn(T, D, seed=3).requires_grad_()
    code = _randn(T, D, seed=4).requires_grad_()
    loss = RF.vq_loss(x, code, 0.25)
    n = T * D
    ref = sum(_sqdist(a, b) for a, b in zip(x.tolist(), code.tolist())) * 1.25 / n
    assert abs(loss.item() - ref) < TOL
    loss.backward()
    xv, cv = x.detach(), code.detach()
    torch.testing.assert_close(code.grad, 2 * (cv - xv) / n, rtol=0, atol=TOL)
    torch.testing.assert_close(x.grad, 2 * 0.25 * (xv - cv) / n, rtol=0, atol=TOL)
    # An explicit denominator (sequence parallelism: the group's element count) divides.
    assert abs(RF.vq_loss(xv, cv, 0.25, num_elements=2 * n).item() - ref / 2) < TOL


def test_vq_straight_through_mixes_without_gradient_to_the_code():
    x = _randn(T, D, seed=5).requires_grad_()
    code = _randn(T, D, seed=6).requires_grad_()
    out = RF.vq_straight_through(x, code, 0.05)
    for o, a, c in zip(out.tolist(), x.tolist(), code.tolist()):
        for ov, av, cv in zip(o, a, c):
            assert abs(ov - (0.95 * av + 0.05 * (cv - av))) < TOL  # the spec's formula
    out.sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 0.95), rtol=0, atol=TOL)
    assert code.grad is None


def test_branch_mix_is_a_softmax_over_two_logits():
    x, w, b = _randn(T, D, seed=7), _randn(2, D, seed=8), _randn(2, seed=9)
    got = RF.branch_mix(x, w, b)
    for t, row in enumerate(x.tolist()):
        logits = [sum(u * v for u, v in zip(row, w[i].tolist())) + float(b[i]) for i in range(2)]
        for i, p in enumerate(_softmax(logits)):
            assert abs(got[t, i].item() - p) < TOL


def test_noisy_input():
    x, n1, n2 = _randn(T, D, seed=10), _randn(T, D, seed=11), _randn(T, D, seed=12)
    got = RF.noisy_input(x, n1, n2, mul_mean=0.5, mul_std=2.0, add_std=0.3)
    ref = [[a * (0.5 + 2.0 * e1) + 0.3 * e2 for a, e1, e2 in zip(r, s, u)]
           for r, s, u in zip(x.tolist(), n1.tolist(), n2.tolist())]
    torch.testing.assert_close(got, torch.tensor(ref, dtype=torch.float64), rtol=0, atol=TOL)


def _ref_info_nce(anchors, candidates, positive, tau):
    out = []
    for a_rows, c_rows in zip(anchors.tolist(), candidates.tolist()):
        group = []
        for n, a in enumerate(a_rows):
            na = math.sqrt(sum(v * v for v in a))
            sims = [sum(u * v for u, v in zip(a, c)) / (na * math.sqrt(sum(v * v for v in c)))
                    / tau for c in c_rows]
            group.append(-math.log(_softmax(sims)[int(positive[n])]))
        out.append(group)
    return torch.tensor(out, dtype=torch.float64)


def test_info_nce_value_and_gradient():
    """Anchors 3..6 of a sequence of 8 (a sequence-parallel slice) against all 8."""
    anchors = _randn(2, 4, D, seed=13).requires_grad_()
    candidates = _randn(2, 8, D, seed=14).requires_grad_()
    positive = torch.arange(3, 7)
    got = RF.info_nce(anchors, candidates, positive, 0.07)
    torch.testing.assert_close(got.detach(), _ref_info_nce(anchors, candidates, positive, 0.07),
                               rtol=0, atol=1e-10)
    assert torch.autograd.gradcheck(lambda a, c: RF.info_nce(a, c, positive, 0.5),
                                    (anchors, candidates))


# ----------------------------------------------------------------------------- config


def _cfg(*overrides):
    return validate(load_config("configs/tiny-cpu.yaml", ["parallel.world_size=1",
                                                          "parallel.ep=1", *overrides]), 1)


@pytest.mark.parametrize("overrides, message", [
    (["moe.router.name=vq", "moe.topk=1"], "moe.topk=1 leaves none for the SMoE branch"),
    (["moe.router.name=vq", "moe.router.codebook_size=4"],
     "moe.router.codebook_size=4 is under moe.num_experts=8"),
    (["moe.router.name=vq", "moe.router.smoe_topk=9"], "moe.router.smoe_topk=9 must be in"),
    (["moe.router.name=vq", "moe.router.contrib_rate=1.5"], "moe.router.contrib_rate=1.5"),
    (["moe.router.name=stochastic", "moe.router.noise_routing=mine"],
     "moe.router.noise_routing='mine' is unknown"),
    (["moe.router.name=stochastic", "moe.router.infonce_temperature=0"],
     "moe.router.infonce_temperature=0"),
    (["moe.router.name=stochastic", "moe.router.inference_k=9"],
     "moe.router.inference_k=9 must be in"),
    (["moe.router.name=vq", "moe.dispatcher=flex"], "moe.dispatcher="),
])
def test_config_errors_are_one_line(overrides, message, repo, monkeypatch):
    monkeypatch.chdir(repo)
    with pytest.raises(ConfigError) as err:
        router_config_for(_cfg(*overrides))
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_config_defaults_resolve(repo, monkeypatch):
    monkeypatch.chdir(repo)
    vq = router_config_for(_cfg("moe.router.name=vq"))
    assert vq.smoe_topk == 1 and vq.transformer_config_overrides()["moe_router_topk"] == 1
    assert vq.codebook_size == 16  # max(16, moe.num_experts = 8)
    assert router_config_for(_cfg("moe.router.name=vq", "moe.num_experts=32")).codebook_size == 32
    s2 = router_config_for(_cfg("moe.router.name=stochastic"))
    assert s2.inference_k == 1 and s2.seed == 1234
