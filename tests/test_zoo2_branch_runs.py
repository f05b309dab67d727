"""VQMoE (``vq``) and S2MoE (``stochastic``) in real runs of the megatron-core model (gloo).

tests/test_routers.py holds both to the router contract and the float64 routing
reference at world size 1 (OWN_FILE there). Here, with the two losses and the state
these routers add (codebook, mixing gate, LayerNorm, noise streams), five probe launches
(tests/router_probe.py: every entry one model in one process group per layout) cover:

* training: 20 steps at EP=2 (2 processes), finite, the loss falls by 0.5;
* layouts: the first 5 steps at DP=2, EP=2 (also data parallel 2 for the dense weights),
  TP=2+SP and PP=2 give world size 1's losses (step 1 within 1e-5, then 1e-3, the
  tolerances of tests/test_layouts.py) and gradient norms (1e-3 relative);
* resume: 10 steps + 10 resumed == 20 uninterrupted, losses bitwise and every model
  tensor of the final checkpoint bitwise (codebooks, mixing gates, LayerNorms); a run
  checkpointed at EP=2 and resumed at world size 1 continues within 1e-3;
* the losses in the model: L_vq in megatron's tracker equals the float64 formula on the
  router's input and codebook; both new losses are logged per layer
  (``moe/vq_loss/layer_i``, ``moe/uncertainty_loss/layer_i``) and finite;
* evaluation at the end of training runs S2MoE's inference setting (inference_k experts,
  no noise).
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import FAST, read_metrics
from test_routers import run_probe

NAMES = ["vq", "stochastic"]
# Two layers (one per stage at PP=2), short sequences, small batches, so steps are cheap;
# lr 3e-3 so that 20 such steps visibly learn (8.3 -> 6.7 at world size 1).
LAYERS = 2
RUN = [*FAST, "train.steps=20", "train.seq_length=32", "train.global_batch_size=4",
       "train.lr=0.003",
       f"model.num_layers={LAYERS}",
       "logging.tensorboard=false", "checkpoint.enabled=false", "probe.train=true"]
LAYOUTS = {
    "dp2": ["parallel.ep=1"],
    "ep2": ["parallel.ep=2"],
    "tp2_sp": ["parallel.ep=1", "parallel.tp=2", "parallel.sp=true"],
    "pp2": ["parallel.ep=1", "parallel.pp=2"],
}
SAVE = "checkpoint.enabled=true"
SHARED = "moe.shared_expert_size=64"


def _entry(name: str, *items: str) -> str:
    return ":".join([name, *items])


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> dict:
    """{layout: {router: run result}}: 5 steps (of a 20-step schedule) per layout; at
    EP=2 all 20, checkpointed at step 10 (resumed at world size 1 below)."""
    out = {}
    for layout, overrides in LAYOUTS.items():
        tmp = tmp_path_factory.mktemp(layout)
        items = [SAVE, "checkpoint.interval=10"] if layout == "ep2" else ["train.exit_at_step=5"]
        entries = [_entry(n, *items, f"probe.run_dir={n}") for n in NAMES]
        # One probe step (LM loss x 0: the aux losses' gradients alone); pp=1 only.
        probes = [] if layout == "pp2" else [_entry(n, "probe.train=false") for n in NAMES]
        if layout == "tp2_sp":  # a shared expert (TP-sharded) beside the two branches
            probes += [_entry(n, SHARED, "probe.train=false") for n in NAMES]
        res = run_probe(tmp / "runs.pt", entries + probes,
                        [*RUN, *overrides, f"run.dir={tmp}"], 2)
        out[layout] = {n: res[e] for n, e in zip(NAMES, entries)}
        out[layout].update({f"{n}/probe": res[e] for n, e in zip(NAMES, probes)})
        out[layout].update({f"{n}/shared": res[e] for n, e in zip(NAMES, probes[2:])})
    return out


@pytest.fixture(scope="module")
def ws1(layouts, tmp_path_factory) -> dict:
    """World size 1, per router: 20 steps; 10 steps (checkpointed) then resumed to 20; the
    EP=2 run resumed to 20; a probe step (router inputs, aux-loss gradients, tracker
    values)."""
    tmp = tmp_path_factory.mktemp("ws1")
    plan = {}
    for n in NAMES:
        plan[f"{n}/full"] = _entry(n, f"probe.run_dir={n}_full")
        plan[f"{n}/first10"] = _entry(n, SAVE, "train.exit_at_step=10", f"probe.run_dir={n}_res")
        plan[f"{n}/resumed"] = _entry(n, f"probe.run_dir={n}_res")
        plan[f"{n}/from_ep2"] = _entry(n, "checkpoint.resume_step=10",
                                       f"probe.run_dir={layouts['ep2'][n]['run_dir']}")
        plan[f"{n}/probe"] = _entry(n, "probe.train=false", "probe.inputs=true")
        plan[f"{n}/shared"] = _entry(n, SHARED, "probe.train=false")
    plan["stochastic/recompute"] = _entry("stochastic", "train.recompute=true",
                                          "train.exit_at_step=5", "probe.run_dir=recompute")
    res = run_probe(tmp / "runs.pt", list(plan.values()),
                    [*RUN, "parallel.world_size=1", "parallel.ep=1", f"run.dir={tmp}"], 1)
    return {key: res[e] for key, e in plan.items()}


def _grad_norms(run_dir) -> dict[int, float]:
    return {r["step"]: r["train/grad_norm"] for r in read_metrics(run_dir) if "train/loss" in r}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("name", NAMES)
def test_layout_matches_world_size_1(name, layout, layouts, ws1):
    want, got = ws1[f"{name}/full"], layouts[layout][name]
    assert all(math.isfinite(v) for v in got["losses"]), got["losses"]
    assert abs(got["losses"][0] - want["losses"][0]) < 1e-5, (got["losses"], want["losses"])
    for step in range(5):
        assert abs(got["losses"][step] - want["losses"][step]) < 1e-3, (step, got, want)
    g_want, g_got = _grad_norms(want["run_dir"]), _grad_norms(got["run_dir"])
    for step in range(1, 6):
        assert abs(g_got[step] - g_want[step]) <= 1e-3 * g_want[step], (step, g_got, g_want)


@pytest.mark.parametrize("layout", ["dp2", "ep2", "tp2_sp"])
@pytest.mark.parametrize("name", NAMES)
def test_aux_loss_gradients_are_layout_invariant(name, layout, layouts, ws1):
    """The router gradients of the aux losses alone (L_bal, L_vq / InfoNCE; LM loss x 0,
    normalised as in training) equal world size 1's: a missing or doubled per-token or
    sequence-parallel normalisation would be off by a factor of 2. The commitment and
    InfoNCE gradients reach earlier layers through the residual stream, so every router
    parameter but the last layer's branch-only ones gets one. Bound: 1e-4 of the
    largest entry; float32 reduction order gives up to 2e-5 on the mixing gate of the
    first layer (a small, second-order gradient with cancellations), ~1e-6 elsewhere."""
    ref, got = ws1[f"{name}/probe"], layouts[layout][f"{name}/probe"]
    for layer, rec in ref["layers"].items():
        for pname, g_ref in rec["grads"].items():
            g = got["layers"][layer]["grads"][pname]
            scale = g_ref.abs().max().item()
            if scale == 0:  # e.g. the last layer's mixing gate: no aux loss downstream
                assert g.abs().max().item() == 0, (layer, pname)
                continue
            err = (g - g_ref).abs().max().item()
            assert err <= 1e-4 * scale, (layer, pname, err / scale)


@pytest.mark.parametrize("name", NAMES)
def test_shared_expert_beside_the_branches(name, layouts, ws1):
    """A shared expert is added outside the mixture; TP=2+SP (its weights TP-sharded)
    gives world size 1's layer outputs."""
    ref, got = ws1[f"{name}/shared"], layouts["tp2_sp"][f"{name}/shared"]
    assert math.isfinite(ref["loss"]) and abs(got["loss"] - ref["loss"]) < 1e-5
    for layer, rec in ref["layers"].items():
        torch.testing.assert_close(got["layers"][layer]["moe_out"], rec["moe_out"],
                                   rtol=0, atol=1e-5)
        differs = (rec["moe_out"] - ws1[f"{name}/probe"]["layers"][layer]["moe_out"]).abs()
        assert differs.max() > 1e-3, "the shared expert changed nothing"


def test_s2moe_noise_survives_activation_recompute(ws1):
    """train.recompute re-runs each layer's forward in the backward; the second run takes
    the first one's noise, so the losses are the run's without recompute."""
    got, want = ws1["stochastic/recompute"]["losses"], ws1["stochastic/full"]["losses"][:5]
    assert len(got) == 5
    for a, b in zip(got, want):
        assert abs(a - b) < 1e-6, (got, want)


@pytest.mark.parametrize("name", NAMES)
def test_resume_is_bitwise(name, ws1):
    """10 + 10 resumed == 20 uninterrupted: every loss and the final router state of every
    layer (the codebook, mixing gate, LayerNorm, expert embeddings), bitwise."""
    full, first, resumed = (ws1[f"{name}/{k}"] for k in ("full", "first10", "resumed"))
    assert len(full["losses"]) == 20 and len(first["losses"]) == 10
    assert all(math.isfinite(v) for v in full["losses"]), full["losses"]
    assert first["losses"] + resumed["losses"] == full["losses"]
    own = {"vq": {"codebook", "mix_weight", "mix_bias", "vq_norm_weight", "vq_norm_bias",
                  "expert_embeddings"},
           "stochastic": {"weight", "mix_weight", "mix_bias"}}[name]
    for layer, state in full["router_state"].items():
        assert own <= set(state), (layer, sorted(state))
        other = resumed["router_state"][layer]
        for key, value in state.items():
            assert torch.equal(value, other[key]), (layer, key)
        # The state trained away from where the first 10 steps left it.
        assert not torch.equal(state["mix_weight"], first["router_state"][layer]["mix_weight"])


@pytest.mark.parametrize("name", NAMES)
def test_trains_at_ep2(name, layouts):
    """20 steps, 2 processes (EP=2, DP=2): finite, and the loss falls."""
    losses = layouts["ep2"][name]["losses"]
    assert len(losses) == 20 and all(math.isfinite(v) for v in losses), losses
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 0.5, (first, last, losses)


@pytest.mark.parametrize("name", NAMES)
def test_resume_from_ep2_at_world_size_1(name, layouts, ws1):
    """The EP=2 checkpoint of step 10 continued at world size 1: the uninterrupted
    world-size-1 run's losses (1e-3, the layout tolerance)."""
    ep2, full, moved = layouts["ep2"][name], ws1[f"{name}/full"], ws1[f"{name}/from_ep2"]
    assert len(moved["losses"]) == 10
    for got, want in zip(ep2["losses"][:10] + moved["losses"], full["losses"]):
        assert abs(got - want) < 1e-3, (ep2["losses"][:10] + moved["losses"], full["losses"])


def test_new_losses_are_logged_per_layer(ws1):
    for name, loss in (("vq", "vq_loss"), ("stochastic", "uncertainty_loss")):
        records = [r for r in read_metrics(ws1[f"{name}/full"]["run_dir"]) if "train/loss" in r]
        for layer in range(LAYERS):
            key = f"moe/{loss}/layer_{layer}"
            values = [r[key] for r in records]
            assert len(values) == 20 and all(math.isfinite(v) and v > 0 for v in values), key
        # The evaluation at the end ran (S2MoE: its inference_k setting, no noise).
        assert any("valid/loss" in r and math.isfinite(r["valid/loss"])
                   for r in read_metrics(ws1[f"{name}/full"]["run_dir"])), name


def test_vq_loss_in_the_model_matches_the_formula(ws1):
    """megatron's tracker holds, per layer, L_vq summed over the step's micro batches:
    MSE(C_j, x) (1 + commitment) with j the nearest codebook entry, here in float64 on
    the router's recorded input."""
    res = ws1["vq/probe"]
    micro = res["meta"]["num_microbatches"]
    for layer, rec in res["layers"].items():
        x = rec["x"].double()
        codebook = rec["state"]["codebook"].double()
        j = torch.cdist(x, codebook).argmin(-1)
        per_token = (x - codebook[j]).pow(2).sum(-1) * 1.25
        want = sum(chunk.sum().item() / (chunk.numel() * x.shape[-1])
                   for chunk in per_token.chunk(micro))
        assert abs(rec["aux_losses"]["vq_loss"] - want) <= 1e-6 * want, (layer, rec["aux_losses"])
        # The VQ experts j mod E spread over both halves of the experts: at EP=2 tokens
        # travel to the other rank's VQ expert (and the codebook is not collapsed).
        half = res["meta"]["num_experts"] // 2
        vq_experts = j % res["meta"]["num_experts"]
        assert (vq_experts < half).any() and (vq_experts >= half).any(), vq_experts.unique()
        assert rec["aux_losses"]["load_balancing_loss"] > 0
    # S2MoE's logged InfoNCE: a mean cross-entropy, in (0, 2 / tau + ln S).
    bound = 2 / 0.07 + math.log(res["meta"]["seq_length"])
    for record in read_metrics(ws1["stochastic/full"]["run_dir"]):
        for key in (k for k in record if k.startswith("moe/uncertainty_loss/")):
            assert 0 < record[key] < bound, (key, record[key])
