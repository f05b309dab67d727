"""Collapse telemetry (megasmoe/training/collapse.py): the math against a brute-force
numpy float64 reference, and the same matrices at world size 1 and EP=2 in real runs."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
import torch

from conftest import BIN, REPO, pretrain, read_metrics
from megasmoe.routers import functional as RF
from megasmoe.training import collapse as C


def _cka_reference(features: np.ndarray) -> np.ndarray:
    """Linear CKA pair by pair in feature space: ||Yf^T Ye||^2 / (||Ye^T Ye|| ||Yf^T Yf||)."""
    n, e, _ = features.shape
    out = np.zeros((e, e))
    for a in range(e):
        for b in range(e):
            x = features[:, a] - features[:, a].mean(0)
            y = features[:, b] - features[:, b].mean(0)
            out[a, b] = (np.linalg.norm(y.T @ x) ** 2
                         / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))
    return out


def _cosine_reference(features: np.ndarray) -> np.ndarray:
    n, e, _ = features.shape
    out = np.zeros((e, e))
    for a in range(e):
        for b in range(e):
            out[a, b] = np.mean([features[t, a] @ features[t, b]
                                 / (np.linalg.norm(features[t, a]) * np.linalg.norm(features[t, b]))
                                 for t in range(n)])
    return out


def _structured(seed: int = 0) -> np.ndarray:
    """[N=48, E=5, F=7]: random experts, one a rotated+scaled+shifted copy of another, one
    a noisy copy."""
    rng = np.random.default_rng(seed)
    f = rng.standard_normal((48, 5, 7))
    q, _ = np.linalg.qr(rng.standard_normal((7, 7)))
    f[:, 1] = 3.0 * f[:, 0] @ q + 5.0
    f[:, 4] = f[:, 2] + 0.5 * rng.standard_normal((48, 7))
    return f


def test_cka_and_cosine_match_brute_force():
    f = _structured()
    cka = C.linear_cka_matrix(torch.from_numpy(f)).numpy()
    np.testing.assert_allclose(cka, _cka_reference(f), atol=1e-12)
    np.testing.assert_allclose(C.cosine_matrix(torch.from_numpy(f)).numpy(),
                               _cosine_reference(f), atol=1e-12)
    # The router's own CKA (Gram form, used by SimSMoE) agrees on every pair.
    t = torch.from_numpy(f)
    for a, b in ((0, 1), (2, 4), (0, 3)):
        assert abs(RF.cka_linear(t[:, a], t[:, b]).item() - cka[a, b]) < 1e-10
    # A rotated, scaled, shifted copy is the same representation for CKA.
    assert abs(cka[0, 1] - 1.0) < 1e-12 and cka[2, 4] > 0.5
    # float32 input is measured in float64.
    np.testing.assert_allclose(C.linear_cka_matrix(t.float()).numpy(), cka, atol=1e-5)


def test_identical_experts_give_one_independent_near_zero():
    rng = np.random.default_rng(1)
    same = np.repeat(rng.standard_normal((64, 1, 16)), 4, axis=1)
    assert np.allclose(C.linear_cka_matrix(torch.from_numpy(same)).numpy(), 1.0, atol=1e-12)
    assert np.allclose(C.cosine_matrix(torch.from_numpy(same)).numpy(), 1.0, atol=1e-12)
    # Independent random experts: linear CKA's finite-sample floor is about F / N
    # (here 16 / 4096 ~ 0.004); cosine's spread about 1 / sqrt(N F) ~ 0.004.
    indep = torch.from_numpy(rng.standard_normal((4096, 4, 16)))
    off = C.offdiag(C.linear_cka_matrix(indep))
    assert off.abs().max() < 0.02, off
    off = C.offdiag(C.cosine_matrix(indep))
    assert off.abs().max() < 0.02, off
    # Constant outputs carry no representation: CKA 0 with the others, not NaN.
    const = indep.clone()
    const[:, 0] = 1.0
    cka = C.linear_cka_matrix(const)
    assert cka[0, 0] == 1.0 and torch.all(cka[0, 1:] == 0) and not cka.isnan().any()


def test_router_rows_load_and_scalars():
    rows = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]])
    np.testing.assert_allclose(C.row_cosine_matrix(rows).numpy(),
                               [[1, 1, 0], [1, 1, 0], [0, 0, 1]], atol=1e-12)
    assert C.effective_experts(torch.full((8,), 5.0)) == pytest.approx(8.0)
    assert C.effective_experts(torch.tensor([0.0, 9.0, 0.0])) == pytest.approx(1.0)
    load = torch.tensor([1.0, 2.0, 3.0, 0.0])
    p = np.array([1, 2, 3]) / 6
    assert C.effective_experts(load) == pytest.approx(np.exp(-(p * np.log(p)).sum()))
    assert C.dead_experts(load) == 1
    eye = torch.eye(4, dtype=torch.float64)
    nan = torch.full((4, 4), float("nan"), dtype=torch.float64)
    s = C.layer_scalars(eye, eye, nan, load, 1.25)
    assert s["cka_mean_offdiag"] == 0 and s["dead_experts"] == 1 and s["router_entropy"] == 1.25
    assert "router_cosine_mean_offdiag" not in s  # a router without per-expert rows


def test_negative_probe_tokens_is_refused_in_one_line():
    proc = subprocess.run([str(BIN / "megasmoe"), "check", "configs/tiny-cpu.yaml",
                           "logging.collapse_probe_tokens=-1"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "megasmoe: config error: logging.collapse_probe_tokens=-1 must be >= 0 (0 turns "
        "collapse telemetry off)"]


# One step at a negligible learning rate: both layouts evaluate the layout-invariant
# initialisation, so their matrices must agree to float rounding.
SAME_WEIGHTS = ["train.steps=1", "train.warmup_steps=0", "train.lr=1e-9", "train.min_lr=0"]


@pytest.fixture(scope="module")
def ws1_and_ep2(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("collapse")
    ws1 = pretrain(tmp, "ws1", [*SAME_WEIGHTS, "parallel.world_size=1", "parallel.ep=1"], 1)
    ep2 = pretrain(tmp, "ep2", [*SAME_WEIGHTS, "parallel.ep=2"], 2)
    return ws1, ep2


def test_same_matrices_at_world_size_1_and_ep2(ws1_and_ep2):
    ws1, ep2 = (np.load(run / "collapse" / "step_0000001.npz") for run in ws1_and_ep2)
    assert ws1["layers"].tolist() == ep2["layers"].tolist() == [0, 1, 2, 3]
    assert ws1["cka"].shape == (4, 8, 8) and int(ws1["probe_tokens"]) == 512
    for key in ("cka", "cosine", "router_cosine", "router_entropy"):
        np.testing.assert_allclose(ep2[key], ws1[key], atol=1e-5, err_msg=key)
    np.testing.assert_array_equal(ep2["load"], ws1["load"])
    # Both ranks of the EP=2 run held the same matrices.
    assert float(ep2["rank_spread"]) <= 1e-6
    # Not a trivial matrix: experts differ at initialisation.
    off = ws1["cka"][~np.broadcast_to(np.eye(8, dtype=bool), ws1["cka"].shape)]
    assert 0.05 < off.mean() < 0.95 and np.allclose(np.diagonal(ws1["cka"], 0, 1, 2), 1.0)


def test_scalars_logged_with_the_valid_loss(ws1_and_ep2):
    ws1, ep2 = ws1_and_ep2
    for run in (ws1, ep2):
        record = [r for r in read_metrics(run) if "valid/loss" in r][-1]
        data = np.load(run / "collapse" / "step_0000001.npz")
        for i in range(4):
            cka = data["cka"][i][~np.eye(8, dtype=bool)]
            assert record[f"collapse/cka_mean_offdiag/layer_{i}"] == pytest.approx(cka.mean())
            load = data["load"][i] / data["load"][i].sum()
            h = -(load[load > 0] * np.log(load[load > 0])).sum()
            assert record[f"collapse/effective_experts/layer_{i}"] == pytest.approx(np.exp(h))
            assert record[f"collapse/dead_experts/layer_{i}"] == float((data["load"][i] == 0).sum())
            assert 0 < record[f"collapse/router_entropy/layer_{i}"] <= np.log(8) + 1e-6
        assert record["collapse/probe_time_s"] > 0
    # TensorBoard got them too (the event file holds the tag names).
    events = b"".join(p.read_bytes() for p in (ep2 / "tensorboard").glob("events.*"))
    assert b"collapse/cka_mean_offdiag/layer_3" in events
