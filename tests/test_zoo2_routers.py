"""CompeteSMoE (v1, v2) and SimSMoE inside the real model, on forced competition / CKA steps.

The shared contract and golden tests of tests/test_routers.py cover both routers at
world size 1 on normal steps (compete with frequency 0; simsmoe with every pair
compared); their layout and training tests live here. Every launch runs several entries
(tests/router_probe.py), so the whole file costs 4 probe and 4 training launches:

* golden (world size 1, both expert backends, float64 references from the experts'
  weights and the router's input): competition routing of v1 (top-k of ||y_e||, softmax
  over the selected) and v2 (top-k of mean softplus(y_e), normalised by the sum), the v2
  schedule cap (3 of 4 layers), the gradient of the v1/v2 router loss on W_r, the
  gradient of SimSMoE's CKA loss (rbf and linear) on the projection P; the extension
  point itself: ``run_experts`` with a caller-chosen 3-expert routing and ``smoe``;
* layouts (the default expert backend): DP=2, EP=2 (experts on the other rank:
  MegasmoeMoELayer.expert_features; alltoall and allgather dispatchers) and TP=2+SP
  (expert-tensor shards) route like world size 1 on competition steps, give the same
  MoE output, and the same aux-loss gradients (v2's normal-step entropy balance too);
* the competition schedule is a pure function of (seed, step, layer);
* training (compete v2 at frequency 0.5: normal and competition steps; simsmoe with
  pairs arming during the run), both routers in each launch: 12 steps at EP=2 (loss
  falls, no NaN, the HF export passes ``verify``); its step-6 checkpoint resumed in a
  fresh process at EP=2 (steps 7-12 bitwise: compete's schedule, simsmoe's pair
  trackers), at world size 1 (EP=2 -> 1) and at PP=2 (same losses / grad norms as
  world size 1 within the layout tests' tolerances);
* the MoE layer's delegation to a router's ``moe_forward`` (no process group);
* bad input refused in one line.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import FAST, REPO, read_metrics, train_losses
from megasmoe.config import ConfigError, load_config, validate
from megasmoe.routers import functional as RF
from test_routers import AUX_RTOL, BASE, LAYOUTS, WS1, run_probe
from test_routers import _one_thread  # noqa: F401  (autouse: references on one thread)

C1 = "compete:moe.router.frequency=1.0"
C2 = "compete:moe.router.version=v2:moe.router.frequency=1.0"
# v2 on normal steps: its entropy balance on softmax(g) (entropy_coeff_normal).
C2_NORMAL = "compete:moe.router.version=v2:moe.router.frequency=0"
SIM = "simsmoe:moe.router.cont_freq=-1:moe.router.tau=-1"
SIM_LIN = "simsmoe:moe.router.cont_freq=-1:moe.router.tau=-1:moe.router.kernel=linear"
GOLDEN = [C1, C2, SIM, SIM_LIN]
ENTRIES = [*GOLDEN, C2_NORMAL]
# Competition at EP=2 through the other dispatcher (compared with world size 1's C2).
C2_ALLGATHER = C2 + ":moe.dispatcher=allgather"
E, K, MICRO = 8, 2, 2
CONFIG_SEED = 1234  # run.seed of configs/tiny-cpu.yaml: the competition schedule's seed
BACKENDS = ["sequential", "grouped"]
# Layouts run the default backend (the golden tests run both at world size 1).
DEFAULT_BACKEND = load_config(REPO / "configs" / "tiny-cpu.yaml", []).moe.expert_backend
PROBE_OPTS = (":probe.experts=true", ":probe.moe_api=true")


def _on(entry: str, backend: str) -> str:
    return f"{entry}:moe.expert_backend={backend}"


@pytest.fixture(scope="module")
def ws1(tmp_path_factory) -> dict:
    """World size 1, one process: the golden entries on both backends (expert weights,
    C1 also the run_experts / smoe outputs) and the layout references."""
    tmp = tmp_path_factory.mktemp("zoo2_ws1")
    entries = [_on(e, b) + PROBE_OPTS[0] + (PROBE_OPTS[1] if e == C1 else "")
               for e in GOLDEN for b in BACKENDS]
    if DEFAULT_BACKEND not in BACKENDS:
        entries += [_on(e, DEFAULT_BACKEND) for e in GOLDEN]
    entries += [_on(C2_NORMAL, DEFAULT_BACKEND)]
    raw = run_probe(tmp / "ws1.pt", entries,
                    [*BASE, *WS1, f"run.dir={tmp}", "probe.inputs=true"], 1)
    out = {}
    for label, value in raw.items():
        for opt in PROBE_OPTS:
            label = label.replace(opt, "")
        out[label] = value
    return out


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """2-process probes at EP=2 (+ C2 through the allgather dispatcher) and TP=2+SP."""
    cache: dict[str, dict] = {}

    def get(layout: str) -> dict:
        if layout not in cache:
            tmp = tmp_path_factory.mktemp(f"zoo2_{layout}")
            entries = ENTRIES + ([C2_ALLGATHER] if layout == "ep2" else [])
            cache[layout] = run_probe(tmp / "probe.pt",
                                      [_on(e, DEFAULT_BACKEND) for e in entries],
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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_competition_routes_by_expert_affinity(version, backend, ws1):
    res = ws1[_on(C1 if version == "v1" else C2, backend)]
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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("entry", [SIM, SIM_LIN])
def test_simsmoe_cka_gradient_reaches_projection(entry, backend, ws1):
    kernel = "linear" if entry == SIM_LIN else "rbf"
    for layer, rec in ws1[_on(entry, backend)]["layers"].items():
        ref = _sim_reference(rec, kernel)
        got = rec["grads"]["projection"].double()
        scale = ref.abs().max()
        assert scale > 0 and torch.isfinite(got).all()
        assert (got - ref).abs().max() <= 1e-5 * scale, (layer, (got - ref).abs().max(), scale)


@pytest.mark.parametrize("backend", BACKENDS)
def test_run_experts_and_smoe_match_reference(backend, ws1):
    """The extension point at world size 1: ``run_experts`` with a caller-chosen routing
    (3 experts per token, not the router's) is sum_e p_e Expert_e(x); ``smoe`` (no
    gradient: compete routes normally) is the SMoE of W_r x."""
    for layer, rec in ws1[_on(C1, backend)]["layers"].items():
        y = _expert_outputs({**rec, "x": rec["api_x"]})
        assert (rec["api_routing_map"].sum(-1) == 3).all()
        want = torch.einsum("te,teh->th", rec["api_probs"].double(), y)
        got = rec["api_run_experts"].double()
        assert (got - want).abs().max() <= 1e-5 * want.abs().max(), layer
        logits = rec["api_x"].double() @ rec["state"]["weight"].double().t()
        top = torch.topk(logits, K + 1, -1).values
        clear = (top[:, K - 1] - top[:, K]) > 1e-5
        probs = torch.softmax(logits.masked_fill(
            logits < top[:, K - 1:K], -math.inf), -1)
        want = torch.einsum("te,teh->th", probs, y)
        got = rec["api_smoe"].double()
        assert clear.float().mean() > 0.99
        assert (got - want)[clear].abs().max() <= 1e-5 * want.abs().max(), layer


def test_moe_layer_delegates_to_the_routers_moe_forward(monkeypatch):
    """MegasmoeMoELayer: megatron's forward without ``router.moe_forward`` (and always
    for intermediate tensors), the router's with it; smoe is megatron's; extend_moe_layer
    switches the class in place; LayerBound needs a bound megasmoe layer."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from megasmoe.moe import LayerBound, MegasmoeMoELayer, extend_moe_layer

    monkeypatch.setattr(MoELayer, "forward",
                        lambda self, h, it=None, pm=None: ("megatron", h, it, pm))
    layer = MoELayer.__new__(MoELayer)
    torch.nn.Module.__init__(layer)
    assert extend_moe_layer(layer) is layer and type(layer) is MegasmoeMoELayer
    layer.router = torch.nn.Identity()
    h = torch.zeros(2, 1, 4)
    assert layer(h, padding_mask="pm") == ("megatron", h, None, "pm")

    class Taking(torch.nn.Module):
        def moe_forward(self, moe_layer, hidden, padding_mask):
            return "router", moe_layer, hidden, padding_mask

    layer.router = Taking()
    assert layer(h, padding_mask="pm") == ("router", layer, h, "pm")
    assert layer(h, "it")[0] == "megatron"
    assert layer.smoe(h, "pm") == ("megatron", h, None, "pm")

    class Base(torch.nn.Module):
        def bind_moe_layer(self, moe_layer):
            pass

    class Bound(LayerBound, Base):
        pass

    router = Bound()
    with pytest.raises(RuntimeError, match="bind_moe_layer was not called"):
        router.moe_layer
    with pytest.raises(TypeError, match="needs megasmoe's MoE layer"):
        router.bind_moe_layer(torch.nn.Identity())
    router.bind_moe_layer(layer)
    assert router.moe_layer is layer and "moe_layer" not in dict(router.named_modules())


def _layout_case(entry: str, layout: str, ws1, layouts):
    """(world size 1's result, the layout's) of an entry; the allgather entry against C2."""
    ref = ws1[_on(C2 if entry == C2_ALLGATHER else entry, DEFAULT_BACKEND)]
    return ref, layouts(layout)[_on(entry, DEFAULT_BACKEND)]


LAYOUT_CASES = [(e, layout) for layout in ("dp2", "ep2", "tp2_sp") for e in ENTRIES] \
    + [(C2_ALLGATHER, "ep2")]


@pytest.mark.parametrize("entry, layout", LAYOUT_CASES)
def test_layout_matches_world_size_1_on_competition_and_cka_steps(entry, layout, ws1, layouts):
    ref, got = _layout_case(entry, layout, ws1, layouts)
    for layer, rec in ref["layers"].items():
        other = got["layers"][layer]
        assert torch.equal(other["routing_map"], rec["routing_map"]), (layout, layer)
        torch.testing.assert_close(other["probs"], rec["probs"], rtol=0, atol=1e-5)
        torch.testing.assert_close(other["moe_out"], rec["moe_out"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("entry, layout", LAYOUT_CASES)
def test_aux_gradients_are_layout_invariant(entry, layout, ws1, layouts):
    ref, got = _layout_case(entry, layout, ws1, layouts)
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


# ----------------------------------------------------------------------------- training

# compete v2 at frequency 0.5 (a mix of normal and competition layer-steps, at most 3
# layers per step); simsmoe with pairs arming after a few steps (every armed pair counts).
RUNS = {"compete": "compete:moe.router.version=v2:moe.router.frequency=0.5",
        "simsmoe": "simsmoe:moe.router.cont_freq=0.1:moe.router.tau=0.0"}
HALF, STEPS = 6, 12
TRAIN_RUN = [*FAST, f"train.steps={STEPS}", f"checkpoint.interval={HALF}",
             "logging.tensorboard=false", "probe.train=true"]
# Continuations of the straight run's step-6 checkpoint: (layout, processes).
CONTINUED = {"resumed": (["parallel.ep=2"], 2), "ws1": (WS1, 1),
             "pp2": (["parallel.ep=1", "parallel.pp=2"], 2)}


def _copy_at_step(src: Path, dst: Path, step: int) -> None:
    """A copy of run ``src`` as it was when its step-``step`` checkpoint was the latest."""
    keep = f"iter_{step:07d}"
    shutil.copytree(src, dst, ignore=lambda d, names: [
        n for n in names if n.startswith("iter_") and n != keep and Path(d).name == "checkpoints"])
    (dst / "checkpoints" / "latest").write_text(keep)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """{launch: {router: run dir}}: both routers 12 steps straight at EP=2 (one launch);
    then, per continuation, both routers resumed from the straight runs' step-6
    checkpoints (one fresh launch each)."""
    tmp = tmp_path_factory.mktemp("zoo2_runs")
    entries = list(RUNS.values())
    run_probe(tmp / "straight.pt", entries,
              [*TRAIN_RUN, "parallel.ep=2", f"run.dir={tmp / 'straight'}"], 2)
    for name, (layout, nproc) in CONTINUED.items():
        for i in range(len(entries)):
            _copy_at_step(tmp / "straight" / f"entry{i}", tmp / name / f"entry{i}", HALF)
        run_probe(tmp / f"{name}.pt", entries, [*TRAIN_RUN, *layout, f"run.dir={tmp / name}"],
                  nproc)
    return {name: {router: tmp / name / f"entry{i}" for i, router in enumerate(RUNS)}
            for name in ["straight", *CONTINUED]}


def _metric(run_dir, key: str) -> dict:
    return {r["step"]: r[key] for r in read_metrics(run_dir) if key in r}


def _aux_layers(run_dir, name: str) -> dict:
    """{step: sorted layers that logged the aux loss ``name``}."""
    out: dict = {}
    for r in read_metrics(run_dir):
        if "train/loss" in r:
            out[r["step"]] = sorted(int(k.rsplit("_", 1)[1]) for k in r
                                    if k.startswith(f"moe/{name}/layer_"))
    return out


@pytest.mark.parametrize("router", list(RUNS))
def test_resume_is_bitwise_and_moves_layouts(router, runs):
    """6 + 6 == 12 bitwise at EP=2 (fresh process), with competition / CKA steps on both
    sides of the checkpoint; the EP=2 checkpoint continued at world size 1 follows the
    same losses."""
    straight, resumed = runs["straight"][router], runs["resumed"][router]
    want = train_losses(straight)
    assert sorted(want) == list(range(1, STEPS + 1))
    assert train_losses(resumed) == want
    assert _metric(resumed, "train/grad_norm") == _metric(straight, "train/grad_norm")
    name = "compete_router_loss" if router == "compete" else "simsmoe_sim_loss"
    active = _aux_layers(straight, name)
    assert _aux_layers(resumed, name) == active
    after = [s for s in range(HALF + 1, STEPS + 1) if active[s]]
    assert after and any(active[s] for s in range(1, HALF + 1)), active
    if router == "compete":
        # Competing layers: the pure schedule of (run.seed, step - 1, layer); some steps
        # do not compete (normal SMoE steps between).
        sched = {s: sorted(RF.competition_layers(CONFIG_SEED, s - 1, 4, 0.5, 3))
                 for s in active}
        assert active == sched, (active, sched)
        # and layers alternate: some layer routes normally on a step after the resume
        # and competes on another.
        assert any(0 < sum(layer in active[s] for s in after) < len(after)
                   for layer in range(4)), active
    ws1 = train_losses(runs["ws1"][router])
    for step in range(HALF + 1, STEPS + 1):
        assert abs(ws1[step] - want[step]) < 1e-3, (step, ws1[step], want[step])


@pytest.mark.parametrize("router", list(RUNS))
def test_pp2_matches_world_size_1(router, runs):
    """Both continuations of the same checkpoint: PP=2 against world size 1 on steps with
    competition / CKA (test_layouts' tolerances: losses 1e-5 on the first step, then
    1e-3; grad norms 1e-4 relative); the same layers compete / compare."""
    ws1, pp2 = runs["ws1"][router], runs["pp2"][router]
    want, got = train_losses(ws1), train_losses(pp2)
    g_want, g_got = _metric(ws1, "train/grad_norm"), _metric(pp2, "train/grad_norm")
    assert abs(got[HALF + 1] - want[HALF + 1]) < 1e-5, (got, want)
    for step in range(HALF + 1, STEPS + 1):
        assert abs(got[step] - want[step]) < 1e-3, (step, got, want)
        assert abs(g_got[step] - g_want[step]) <= 1e-4 * g_want[step], (step, g_got, g_want)
    name = "compete_router_loss" if router == "compete" else "simsmoe_sim_loss"
    assert _aux_layers(pp2, name) == _aux_layers(ws1, name)
    assert any(_aux_layers(pp2, name)[s] for s in range(HALF + 1, STEPS + 1))


@pytest.mark.parametrize("router", list(RUNS))
def test_trained_run_learns_and_exports(router, runs, tmp_path):
    """2 processes, default config (EP=2), 12 steps: loss falls, no NaN; the HF export
    of the trained run passes ``megasmoe convert verify`` (logit parity)."""
    from megasmoe.convert import to_hf, verify
    from test_convert import assert_parity, eval_token_ids

    run = runs["straight"][router]
    losses = [train_losses(run)[s] for s in range(1, STEPS + 1)]
    assert all(math.isfinite(v) for v in losses), losses
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5, losses
    report = to_hf(run, tmp_path / "hf")
    assert report.architecture == "MixtralForCausalLM" and not report.dropped
    vocab = json.loads((tmp_path / "hf" / "config.json").read_text())["vocab_size"]
    assert_parity(verify(run, tmp_path / "hf", eval_token_ids(vocab, tmp_path / "hf")))


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
