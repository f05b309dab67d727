"""CompeteSMoE (v1, v2) and SimSMoE inside the real model, on forced competition / CKA steps.

The shared contract, golden and layout tests of tests/test_routers.py cover both routers
on normal steps (compete with frequency 0; simsmoe with every pair compared). Here:

* golden (world size 1, float64 references from docs/router-spec.md written from the
  experts' weights and the router's input): competition routing of v1 (top-k of
  ||y_e||, softmax over the selected) and v2 (top-k of mean softplus(y_e), normalised by
  the sum), the v2 schedule cap (3 of 4 layers), the gradient of the v1/v2 router loss
  on W_r, the gradient of SimSMoE's CKA loss (rbf and linear) on the projection P;
* layouts: EP=2 (experts on the other rank: MegasmoeMoELayer.expert_features) and
  TP=2+SP (expert-tensor shards) route like world size 1 on competition steps, give the
  same MoE output, and the same aux-loss gradients (DP=2 too);
* the competition schedule is a pure function of (seed, step, layer);
* resume: SimSMoE (pair trackers arming during the run) 10 + 10 steps == 20 bitwise at
  EP=2, and the EP=2 checkpoint resumed at world size 1 follows the same losses; the
  20-step run's loss falls; its export passes ``megasmoe convert verify``;
* bad input refused in one line.
"""

from __future__ import annotations

import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from conftest import FAST, REPO, run_megasmoe, train_losses
from megasmoe.config import ConfigError, load_config, validate
from megasmoe.routers import functional as RF
from test_routers import AUX_RTOL, BASE, LAYOUTS, WS1, run_probe

C1 = "compete:moe.router.frequency=1.0"
C2 = "compete:moe.router.version=v2:moe.router.frequency=1.0"
SIM = "simsmoe:moe.router.cont_freq=-1:moe.router.tau=-1"
SIM_LIN = "simsmoe:moe.router.cont_freq=-1:moe.router.tau=-1:moe.router.kernel=linear"
ENTRIES = [C1, C2, SIM, SIM_LIN]
E, K, MICRO = 8, 2, 2
CONFIG_SEED = 1234  # run.seed of configs/tiny-cpu.yaml: the competition schedule's seed


@pytest.fixture(scope="module")
def ws1(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("zoo2_ws1")
    raw = run_probe(tmp / "ws1.pt", [e + ":probe.experts=true" for e in ENTRIES],
                    [*BASE, *WS1, f"run.dir={tmp}", "probe.inputs=true"], 1)
    return {e.replace(":probe.experts=true", ""): v for e, v in raw.items()}


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    cache: dict[str, dict] = {}

    def get(layout: str) -> dict:
        if layout not in cache:
            tmp = tmp_path_factory.mktemp(f"zoo2_{layout}")
            cache[layout] = run_probe(tmp / "probe.pt", ENTRIES,
                                      [*BASE, *LAYOUTS[layout], f"run.dir={tmp}"], 2)
        return cache[layout]

    return get


def _expert_outputs(rec: dict) -> torch.Tensor:
    """[T, E, H] float64: every expert (SwiGLU) on every token of the layer's input."""
    x = rec["x"].double()
    fc1, fc2 = rec["experts_fc1"].double(), rec["experts_fc2"].double()
    inter = fc2.shape[-1]
    h = torch.einsum("td,eid->tei", x, fc1)
    act = F.silu(h[..., :inter]) * h[..., inter:]
    return torch.einsum("tei,ehi->teh", act, fc2)


def _competing(version: str) -> set[int]:
    cap = None if version == "v1" else 3
    return RF.competition_layers(CONFIG_SEED, 0, 4, 1.0, cap)


def _compete_reference(version: str, rec: dict):
    """(probs, routing_map, affinity, W_r gradient of the router loss) in float64."""
    y = _expert_outputs(rec)
    if version == "v1":
        a = y.norm(dim=-1)
    else:
        a = F.softplus(y).mean(-1)
    rmap = torch.zeros_like(a, dtype=torch.bool).scatter(-1, torch.topk(a, K, -1).indices, True)
    if version == "v1":
        probs = torch.softmax(a.masked_fill(~rmap, -math.inf), -1)
        target, coeff, topw = probs, 0.05, 0.0
    else:
        probs = a * rmap / (a * rmap).sum(-1, keepdim=True)
        target, coeff, topw = torch.softmax(a, -1), 0.001, 0.2
    w = rec["state"]["weight"].double().clone().requires_grad_()
    x = rec["x"].double()
    total = 0.0
    for rows in x.shape[0] // MICRO * torch.arange(MICRO):
        sl = slice(int(rows), int(rows) + x.shape[0] // MICRO)
        sq = (torch.softmax(x[sl] @ w.t(), -1) - target[sl]) ** 2
        per_token = sq.mean(-1) + topw * (sq * rmap[sl]).sum(-1) / K
        total = total + coeff * per_token.mean() / MICRO  # mean over the micro batches
    total.backward()
    return probs, rmap, a, w.grad


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_competition_routes_by_expert_affinity(version, ws1):
    res = ws1[C1 if version == "v1" else C2]
    competing = _competing(version)
    assert len(competing) == (4 if version == "v1" else 3), competing
    for layer, rec in res["layers"].items():
        if layer not in competing:
            continue
        probs, rmap, a, grad = _compete_reference(version, rec)
        top = torch.topk(a, K + 1, -1).values
        # v2's affinities (mean softplus of small outputs, ~log 2) are close together:
        # compare the tokens whose k-th and (k+1)-th differ beyond float32 rounding.
        clear = (top[:, K - 1] - top[:, K]) > 1e-6
        assert clear.float().mean() > 0.95, clear.float().mean()
        assert torch.equal(rec["routing_map"][clear], rmap[clear]), layer
        torch.testing.assert_close(rec["probs"].double()[clear], probs[clear], rtol=0, atol=1e-5)
        # The router loss is the only aux loss on W_r on a competition step.
        got = rec["grads"]["weight"].double()
        scale = grad.abs().max()
        assert scale > 0
        assert (got - grad).abs().max() <= 1e-5 * scale, (layer, (got - grad).abs().max(), scale)


def _sim_reference(rec: dict, kernel: str) -> torch.Tensor:
    """d/dP of 0.01 x mean over micro batches of sum over pairs of CKA (tau = -1)."""
    y = _expert_outputs(rec)
    p = rec["state"]["projection"].double().clone().requires_grad_()
    z = y @ p.t()
    rmap = rec["routing_map"]
    n = z.shape[0] // MICRO
    total = 0.0
    for m in range(MICRO):
        zm, rm = z[m * n:(m + 1) * n], rmap[m * n:(m + 1) * n]
        for i in range(E):
            for j in range(i + 1, E):
                rows = rm[:, i] & rm[:, j]
                if int(rows.sum()) < 2:
                    continue
                a, b = zm[rows, i], zm[rows, j]
                if kernel == "linear":
                    ka, kb = a @ a.t(), b @ b.t()
                else:
                    ka = torch.exp(-torch.cdist(a, a).pow(2) / (2 * 0.8 ** 2))
                    kb = torch.exp(-torch.cdist(b, b).pow(2) / (2 * 0.8 ** 2))
                h = torch.eye(len(a), dtype=torch.float64) - 1.0 / len(a)
                ca, cb = h @ ka @ h, h @ kb @ h
                den = ((ca * ca).sum() * (cb * cb).sum()).sqrt()
                if den > 1e-12:
                    total = total + 0.01 * (ca * cb).sum() / den / MICRO
    total.backward()
    return p.grad


@pytest.mark.parametrize("entry", [SIM, SIM_LIN])
def test_simsmoe_cka_gradient_reaches_projection(entry, ws1):
    kernel = "linear" if entry == SIM_LIN else "rbf"
    for layer, rec in ws1[entry]["layers"].items():
        ref = _sim_reference(rec, kernel)
        got = rec["grads"]["projection"].double()
        scale = ref.abs().max()
        assert scale > 0 and torch.isfinite(got).all()
        assert (got - ref).abs().max() <= 1e-5 * scale, (layer, (got - ref).abs().max(), scale)


@pytest.mark.parametrize("layout", ["ep2", "tp2_sp"])
@pytest.mark.parametrize("entry", ENTRIES)
def test_layout_matches_world_size_1_on_competition_and_cka_steps(entry, layout, ws1, layouts):
    ref, got = ws1[entry], layouts(layout)[entry]
    for layer, rec in ref["layers"].items():
        other = got["layers"][layer]
        assert torch.equal(other["routing_map"], rec["routing_map"]), (layout, layer)
        torch.testing.assert_close(other["probs"], rec["probs"], rtol=0, atol=1e-5)
        torch.testing.assert_close(other["moe_out"], rec["moe_out"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("layout", ["dp2", "ep2", "tp2_sp"])
@pytest.mark.parametrize("entry", ENTRIES)
def test_aux_gradients_are_layout_invariant(entry, layout, ws1, layouts):
    ref, got = ws1[entry], layouts(layout)[entry]
    for layer, rec in ref["layers"].items():
        for pname, g_ref in rec["grads"].items():
            g = got["layers"][layer]["grads"][pname]
            scale = g_ref.abs().max().item()
            assert scale > 0, (entry, layer, pname)
            err = (g - g_ref).abs().max().item()
            assert err <= AUX_RTOL * scale, (entry, layout, layer, pname, err / scale)


def test_competition_schedule_is_a_pure_function():
    draws = [RF.competition_layers(7, s, 4, 0.07, 3) for s in range(2000)]
    assert draws == [RF.competition_layers(7, s, 4, 0.07, 3) for s in range(2000)]
    per_layer = [sum(layer in d for d in draws) / 2000 for layer in range(4)]
    assert all(0.05 < f < 0.09 for f in per_layer), per_layer
    capped = [RF.competition_layers(7, s, 8, 0.9, 3) for s in range(200)]
    assert max(len(d) for d in capped) == 3
    assert RF.competition_layers(8, 0, 4, 0.5, None) != RF.competition_layers(7, 0, 4, 0.5, None) \
        or RF.competition_layers(8, 1, 4, 0.5, None) != RF.competition_layers(7, 1, 4, 0.5, None)


# ----------------------------------------------------------------------------- resume

SIM_RUN = ["moe.router.name=simsmoe", "moe.router.cont_freq=0.1", "moe.router.tau=0.0",
           "train.steps=20", "checkpoint.interval=10", "logging.tensorboard=false",
           "parallel.ep=2"]


def _grad_norms(run_dir) -> dict:
    from conftest import read_metrics

    return {r["step"]: r["train/grad_norm"] for r in read_metrics(run_dir) if "train/loss" in r}


@pytest.fixture(scope="module")
def sim_runs(tmp_path_factory):
    """SimSMoE at EP=2: 20 steps straight; 10, exit, resume to 20; the step-10
    checkpoint resumed at world size 1."""
    tmp = tmp_path_factory.mktemp("zoo2_resume")
    args = ["pretrain", "configs/tiny-cpu.yaml", *FAST, *SIM_RUN]
    run_megasmoe([*args, f"run.dir={tmp / 'straight'}"], nproc=2)
    run_megasmoe([*args, f"run.dir={tmp / 'resumed'}", "train.exit_at_step=10"], nproc=2)
    shutil.copytree(tmp / "resumed", tmp / "ws1")
    run_megasmoe([*args, f"run.dir={tmp / 'resumed'}"], nproc=2)
    run_megasmoe([*args, f"run.dir={tmp / 'ws1'}", "parallel.world_size=1", "parallel.ep=1"],
                 nproc=1)
    return tmp


def test_simsmoe_resume_is_bitwise_and_moves_layouts(sim_runs):
    straight, resumed = train_losses(sim_runs / "straight"), train_losses(sim_runs / "resumed")
    assert sorted(straight) == list(range(1, 21)) == sorted(resumed)
    assert straight == resumed
    assert _grad_norms(sim_runs / "straight") == _grad_norms(sim_runs / "resumed")
    ws1 = train_losses(sim_runs / "ws1")
    for step in range(11, 21):
        assert abs(ws1[step] - straight[step]) < 1e-3, (step, ws1[step], straight[step])
    losses = [straight[s] for s in range(1, 21)]
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5, losses


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("overrides, message", [
    (["moe.router.name=simsmoe", "moe.topk=1"], "set moe.topk >= 2"),
    (["moe.router.name=simsmoe", "moe.router.kernel=cosine"], "moe.router.kernel"),
    (["moe.router.name=simsmoe", "train.recompute=true"], "train.recompute=false"),
    (["moe.router.name=compete", "moe.router.version=v3"], "moe.router.version"),
    (["moe.router.name=compete", "moe.router.frequency=1.5"], "moe.router.frequency"),
])
def test_bad_settings_are_refused_in_one_line(overrides, message):
    with pytest.raises(ConfigError) as err:
        validate(load_config(REPO / "configs" / "tiny-cpu.yaml", overrides), 2)
    text = str(err.value)
    assert message in text and "\n" not in text, text
