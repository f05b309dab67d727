"""Every registered router inside the real megatron-core model (gloo, CPU).

The model is built, run and inspected by tests/router_probe.py in a subprocess (the
pytest process never starts torch.distributed); one probe invocation builds many
routers in turn, and the world-size-1 references are module-scoped and shared:

* contract (every registered router): probs [T, E] fp32, finite, >= 0, zero off a bool
  routing map, the documented number of experts per token, LM gradients reach every
  trainable router parameter and no frozen one, bitwise determinism across processes;
* golden: the probs inside the model equal a float64 reference computed here from the
  router's input and parameters (routers.md);
* layouts: EP=2 and TP=2+SP route exactly like world size 1 and give the same MoE-layer
  output (1e-5);
* aux-loss gradients: the router gradient of the aux losses alone (LM loss x 0) is the
  same at DP=2, EP=2 and TP=2+SP as at world size 1;
* every router trains (20 steps, EP=2, 2 processes): the loss falls;
* routers of OWN_FILE (compete, simsmoe, vq, stochastic): contract and golden here, the
  rest in their file;
* spectral switched onto the topk model of that training (its checkpoint): finite loss;
  with c = 0 it routes exactly like topk.

Token layout of the probe outputs: T = global batch tokens; micro batches in sample
order, each [S, B] flattened s-major (index m S B + s B + b).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import FAST, REPO, launch
from megasmoe.routers import registered_routers, router_entry

PROBE = REPO / "tests" / "router_probe.py"
ROUTERS = registered_routers()

# One global batch of 2 micro batches of 2 sequences: at world size 1 and TP=2 one rank
# runs both micro batches; at DP=2 / EP=2 each rank runs one (the aux loss is per micro
# batch, so the token groups are the same in every layout).
BASE = ["train.micro_batch_size=2", "train.global_batch_size=4", "train.steps=20",
        "train.warmup_steps=1", "logging.progress=false", "checkpoint.enabled=false"]
WS1 = ["parallel.world_size=1", "parallel.ep=1"]
LAYOUTS = {
    "dp2": ["parallel.ep=1"],
    "ep2": ["parallel.ep=2"],
    "tp2_sp": ["parallel.ep=1", "parallel.tp=2", "parallel.sp=true"],
}
S, MBS, MICRO = 128, 2, 2
E, K = 8, 2
T = S * MBS * MICRO
STEER = {"mode": "additive", "lambda": 1.0, "experts": {"0": [3], "2": [1, 6]}}

# Routers that cannot run with the defaults: unified refuses alltoall; smoe_dropout
# freezes its router so it refuses a balance loss.
ROUTER_ARGS = {
    "unified": ["moe.dispatcher=allgather"],
    "smoe_dropout": ["moe.aux_loss_type=none"],
    "sigmoid_bias": ["moe.aux_loss_type=aux_loss"],
    # Here on normal steps / with every pair compared; competition: tests/test_zoo2_routers.py
    "compete": ["moe.router.frequency=0"],
    "simsmoe": ["moe.router.cont_freq=-1", "moe.router.tau=-1"],
}
# Experts per token of a router's own routing map where it is not moe.topk: vq routes
# top-(k-1) and adds its VQ expert in a second pass of the layer (not in the map);
# smoe_dropout starts at the authors' k_start = E / 2 (8 of 16).
ROUTER_K = {"vq": K - 1, "smoe_dropout": E // 2}
# Routers tested here at world size 1 only (contract, golden); their layout and training
# tests, on the steps that matter (competition, CKA; the second branches' losses, noise
# and state), share launches in their own file.
OWN_FILE = {"compete": "tests/test_zoo2_routers.py", "simsmoe": "tests/test_zoo2_routers.py",
            "vq": "tests/test_zoo2_branch_runs.py", "stochastic": "tests/test_zoo2_branch_runs.py"}
SHARED = [n for n in ROUTERS if n not in OWN_FILE]
FROZEN = {"smoe_dropout": {"weight"},
          "hyper": {"hyper_w1", "hyper_b1", "hyper_w2", "hyper_b2"}}
AUX_ROUTERS = ["topk", "sigmoid_bias", "xmoe", "stablemoe", "spectral", "domain_steer"]
# hyper and unified attach no balance loss by default (the authors'): their L_bal with
# moe.router.balance_loss=true; megatron-core's other router losses on the same attach
# path (topk): sequence-level balance loss and z-loss alone.
AUX_EXTRA = {
    "hyper_balance": "hyper:moe.router.balance_loss=true",
    "unified_balance": "unified:moe.dispatcher=allgather:moe.router.balance_loss=true",
    "topk_seq_aux": "topk:moe.aux_loss_type=seq_aux_loss",
    "topk_z_loss": "topk:moe.aux_loss_type=none:moe.z_loss_coeff=0.001",
}
NO_BALANCE = ["hyper", "unified"]
SMOE_DROPOUT_MID = "smoe_dropout:moe.aux_loss_type=none:probe.step=10"
# The other token groups of unified (the default is sequence).
UNIFIED_GROUPS = {
    "unified_position": "unified:moe.dispatcher=allgather:moe.router.group=position",
    "unified_causal": "unified:moe.dispatcher=allgather:moe.router.group=causal",
    "unified_micro_batch": "unified:moe.dispatcher=allgather:moe.router.group=micro_batch",
}
# Probed in every layout besides the registered routers.
VARIANTS = {**UNIFIED_GROUPS, "smoe_dropout_mid": SMOE_DROPOUT_MID}


# ----------------------------------------------------------------------------- running


def run_probe(out: Path, entries: list[str], overrides: list[str], nproc: int,
              timeout: int = 600) -> dict:
    """Run tests/router_probe.py as ``nproc`` ranks (conftest.launch); its saved results."""
    argv = [str(PROBE), str(out), ",".join(entries), *overrides]
    proc = launch(argv, nproc, timeout, rank_env=True)
    if proc.returncode != 0:
        raise AssertionError(f"router probe failed (rc={proc.returncode}): {' '.join(argv)}\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def steer_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("steer") / "steering.json"
    path.write_text(json.dumps(STEER))
    return path


@pytest.fixture(scope="module")
def labels(steer_file) -> dict[str, str]:
    """Probe entry of each router: its name plus the overrides it needs."""
    args = {**ROUTER_ARGS, "domain_steer": [f"moe.router.file={steer_file}"]}
    return {name: ":".join([name, *args.get(name, [])]) for name in ROUTERS}


@pytest.fixture(scope="module")
def ws1(labels, tmp_path_factory) -> dict:
    """World size 1: every router (+ inputs, router state, LM gradients; spectral with its
    experts' weights), smoe_dropout mid-schedule and the extra aux-loss entries."""
    tmp = tmp_path_factory.mktemp("ws1")
    entries = [labels[n] + (":probe.experts=true" if n == "spectral" else "") for n in ROUTERS]
    entries += [*VARIANTS.values(), *AUX_EXTRA.values()]
    raw = run_probe(tmp / "ws1.pt", entries,
                    [*BASE, *WS1, f"run.dir={tmp}", "probe.inputs=true", "probe.lm=true"], 1)
    return {e.replace(":probe.experts=true", ""): v for e, v in raw.items()}


@pytest.fixture(scope="module")
def ws1_again(labels, tmp_path_factory) -> dict:
    """A second world-size-1 process, routers built in the reverse order."""
    tmp = tmp_path_factory.mktemp("ws1_again")
    return run_probe(tmp / "ws1.pt", [labels[n] for n in reversed(ROUTERS)],
                     [*BASE, *WS1, f"run.dir={tmp}"], 1)


@pytest.fixture(scope="module")
def layouts(labels, tmp_path_factory):
    """Probe results per layout (2 processes), each run once, on first use."""
    cache: dict[str, dict] = {}

    def get(layout: str) -> dict:
        if layout not in cache:
            tmp = tmp_path_factory.mktemp(layout)
            if layout == "dp2":  # only the aux-loss gradients are compared at DP=2
                entries = [labels[n] for n in AUX_ROUTERS] + list(AUX_EXTRA.values())
            else:
                entries = [labels[n] for n in SHARED] + [*VARIANTS.values(),
                                                          *AUX_EXTRA.values()]
            cache[layout] = run_probe(tmp / "probe.pt", entries,
                                      [*BASE, *LAYOUTS[layout], f"run.dir={tmp}"], 2)
        return cache[layout]

    return get


def _layers(result: dict) -> dict:
    return result["layers"]


# ----------------------------------------------------------------------------- contract


@pytest.mark.parametrize("name", ROUTERS)
def test_router_contract(name, labels, ws1, ws1_again):
    res = ws1[labels[name]]
    assert math.isfinite(res["loss"]), res["loss"]
    assert sorted(_layers(res)) == [0, 1, 2, 3]
    for layer, rec in _layers(res).items():
        probs, rmap = rec["probs"], rec["routing_map"]
        assert probs.shape == (T, E) and probs.dtype == torch.float32, (probs.shape, probs.dtype)
        assert rmap.shape == (T, E) and rmap.dtype == torch.bool
        assert torch.isfinite(probs).all() and (probs >= 0).all()
        assert (probs[~rmap] == 0).all(), "probability mass off the routing map"
        assert (probs[rmap] > 0).all(), "a chosen expert with weight 0"
        per_token = rmap.sum(-1)
        if router_entry(name)[0].variable_experts_per_token:
            # Fractional top-k: each sequence (group) gets S k pairs in total.
            per_seq = rmap.reshape(MICRO, S, MBS, E).sum(dim=(1, 3))
            assert (per_seq == S * K).all(), per_seq
            assert per_token.min() < per_token.max(), f"{name} gave every token exactly k"
        else:
            # smoe_dropout at step 0: its scheduled k is k_start = E / 2 (the authors').
            assert (per_token == ROUTER_K.get(name, K)).all(), per_token.unique()
            # Softmax over the selected, normalised sigmoid (sigmoid_bias), renormalised
            # mixture (spectral, normalize_topk): the weights of a token sum to 1.
            torch.testing.assert_close(probs.sum(-1), torch.ones(T), rtol=0, atol=1e-5)

        # Gradients of a normal LM-loss step: every trainable parameter, no frozen one.
        frozen = {n for n, rg in rec["requires_grad"].items() if not rg}
        assert frozen == FROZEN.get(name, set()), frozen
        for pname, grad in rec["grads_lm"].items():
            if pname in frozen:
                assert grad is None, f"frozen {pname} has a gradient buffer"
            else:
                assert grad is not None and torch.isfinite(grad).all(), pname
                assert grad.abs().sum() > 0, f"no gradient reaches {pname} (layer {layer})"

    # Deterministic for a fixed seed: another process, another build order, same bits.
    again = ws1_again[labels[name]]
    assert again["loss"] == res["loss"]
    for layer, rec in _layers(res).items():
        other = _layers(again)[layer]
        for key in ("probs", "routing_map", "moe_out"):
            assert torch.equal(rec[key], other[key]), (layer, key)
        for pname, grad in rec["grads"].items():
            assert (grad is None) == (other["grads"][pname] is None)
            assert grad is None or torch.equal(grad, other["grads"][pname]), (layer, pname)


def test_smoe_dropout_k_follows_the_schedule_in_the_model(ws1):
    """Authors' schedule from k_start = E / 2: at step 10 of 20, k = round((8 - 4) 10 / 20)
    + 4 = 6 experts for every token."""
    res = ws1[SMOE_DROPOUT_MID]
    k = 6
    for rec in _layers(res).values():
        assert (rec["routing_map"].sum(-1) == k).all()
        assert (rec["probs"][~rec["routing_map"]] == 0).all()
        torch.testing.assert_close(rec["probs"].sum(-1), torch.ones(T), rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- golden


def _smoe(logits: torch.Tensor, k: int):
    top = torch.topk(logits, k, dim=-1)
    probs = torch.zeros_like(logits).scatter(-1, top.indices, torch.softmax(top.values, -1))
    return probs, probs > 0


def _margin(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Gap between the k-th and (k+1)-th score of each token (near-ties may flip in fp32)."""
    top = torch.topk(scores, k + 1, dim=-1).values
    return top[:, k - 1] - top[:, k]


def _ref_direction(matrix: torch.Tensor, r: torch.Tensor, k_svd: int) -> torch.Tensor:
    """Right singular vectors oriented so r.v >= 0; mean of the k_svd with the largest |r.v|."""
    _, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    oriented = sorted(((abs(float(r @ v)), v if r @ v >= 0 else -v) for v in vh),
                      key=lambda item: item[0], reverse=True)
    return torch.stack([v for _, v in oriented[:k_svd]]).mean(0)


@pytest.fixture(autouse=True)
def _one_thread():
    """Reference math on one thread: threaded BLAS on small matrices crawls on a busy
    2-core machine (the probes run with OMP_NUM_THREADS=1 as well)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _ref_causal(group: torch.Tensor) -> torch.Tensor:
    """Token t keeps its pairs among the (t + 1) k largest of tokens 0..t ([N, E])."""
    out = torch.zeros_like(group, dtype=torch.bool)
    for t in range(group.shape[0]):
        prefix = group[: t + 1].reshape(-1)
        keep = torch.zeros_like(prefix, dtype=torch.bool)
        keep[torch.argsort(prefix, descending=True)[: (t + 1) * K]] = True
        out[t] = keep.reshape(t + 1, E)[t]
    return out


def _ref_group(group: torch.Tensor) -> torch.Tensor:
    """The N k largest (token, expert) pairs of a group [N, E]."""
    flat = group.reshape(-1)
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[torch.argsort(flat, descending=True)[: group.shape[0] * K]] = True
    return keep.reshape(group.shape)


def _reference(name: str, layer: int, rec: dict, group: str = "sequence"):
    """(probs, routing_map, selection scores) in float64 from the router's input/state."""
    x = rec["x"].double()
    st = {n: v.double() if v.is_floating_point() else v for n, v in rec["state"].items()}
    if name in ("topk", "smoe_dropout", "domain_steer", "compete", "simsmoe"):
        logits = x @ st["weight"].t()
        if name == "domain_steer":
            bias = torch.zeros(E, dtype=torch.float64)
            bias[STEER["experts"].get(str(layer), [])] = STEER["lambda"]  # additive mode
            torch.testing.assert_close(st["steering_bias"], bias, rtol=0, atol=0)
            logits = logits + bias
        probs, rmap = _smoe(logits, ROUTER_K.get(name, K))
        return probs, rmap, logits
    if name == "sigmoid_bias":
        scores = torch.sigmoid(x @ st["weight"].t())
        select = scores + st["expert_bias"]
        rmap = torch.zeros_like(scores, dtype=torch.bool).scatter(
            -1, torch.topk(select, K, dim=-1).indices, True)
        kept = scores * rmap
        return kept / kept.sum(-1, keepdim=True), rmap, select
    if name == "xmoe":
        m = st["expert_embeddings"]
        torch.testing.assert_close(m.norm(dim=1), torch.full((E,), 1.5, dtype=torch.float64),
                                   rtol=1e-6, atol=0)  # renormalised in the training forward
        logits = (x @ st["w_reduce"].t()) @ (m / m.norm(dim=1, keepdim=True)).t()
        return (*_smoe(logits, K), logits)
    if name == "vq":  # StableMoE's gate, top-(k-1)
        m = st["expert_embeddings"]
        logits = x @ (m / m.norm(dim=1, keepdim=True)).t()
        return (*_smoe(logits, K - 1), logits)
    if name == "stochastic":  # the deterministic pass: SMoE on W_r
        logits = x @ st["weight"].t()
        return (*_smoe(logits, K), logits)
    if name == "stablemoe":
        m = st["expert_embeddings"]
        logits = x @ (m / m.norm(dim=1, keepdim=True)).t()
        return (*_smoe(logits, K), logits)
    if name == "hyper":
        hidden = torch.relu(st["embedding"] @ st["hyper_w1"].t() + st["hyper_b1"])
        theta = (hidden @ st["hyper_w2"].t() + st["hyper_b2"]).reshape(E, -1)
        logits = x @ theta[:, :-1].t() + theta[:, -1]
        return (*_smoe(logits, K), logits)
    if name == "unified":
        logits = x @ st["weight"].t()
        scores = 0.5 * torch.softmax(logits, -1) + 0.5 * (2.0 / E) * torch.sigmoid(logits)
        rmap = torch.zeros(T, E, dtype=torch.bool)
        index = torch.arange(T).reshape(MICRO, S, MBS)
        for m in range(MICRO):
            if group == "micro_batch":
                rows = index[m].reshape(-1)
                rmap[rows] = _ref_group(scores[rows])
                continue
            if group == "position":  # one time step: the MBS tokens at position s
                for s in range(S):
                    rows = index[m, s]
                    rmap[rows] = _ref_group(scores[rows])
                continue
            for b in range(MBS):
                rows = index[m, :, b]  # one sequence, in token order
                choose = _ref_causal if group == "causal" else _ref_group
                rmap[rows] = choose(scores[rows])
        return scores * rmap, rmap, None
    if name == "spectral":
        w = st["weight"]
        dirs = st["directions"]
        fc1, fc2 = rec["experts_fc1"].double(), rec["experts_fc2"].double()
        inter = fc2.shape[-1]
        for e in range(E):
            mats = (fc1[e, :inter], fc1[e, inter:], fc2[e].t())  # W_gate, W_up, W_down^T
            for j, mat in enumerate(mats):
                ref = _ref_direction(mat, w[e], 50)
                torch.testing.assert_close(dirs[e, j], ref, rtol=0, atol=1e-6)
        logits = x @ w.t()
        svd = torch.einsum("td,emd->tem", x, dirs).mean(-1)
        p = 0.5 * torch.softmax(logits, -1) + 0.5 * torch.softmax(svd, -1)
        rmap = torch.zeros_like(p, dtype=torch.bool).scatter(
            -1, torch.topk(p, K, dim=-1).indices, True)
        kept = p * rmap
        return kept / kept.sum(-1, keepdim=True), rmap, p
    raise AssertionError(f"no reference for router {name}: add one")


@pytest.mark.parametrize("name", [*ROUTERS, *UNIFIED_GROUPS])
def test_router_matches_reference_math_in_the_model(name, labels, ws1):
    """The probs the MoE layer receives equal the routers.md math in float64 (1e-5), on the
    router's actual input and parameters."""
    label = UNIFIED_GROUPS.get(name) or labels[name]
    router, group = (("unified", name.split("_", 1)[1]) if name in UNIFIED_GROUPS
                     else (name, "sequence"))
    for layer, rec in _layers(ws1[label]).items():
        probs, rmap, select = _reference(router, layer, rec, group)
        if select is not None:
            # float32 near-ties may pick either expert
            clear = _margin(select, ROUTER_K.get(router, K)) > 1e-5
            assert clear.float().mean() > 0.99, clear.float().mean()
        else:
            clear = torch.ones(T, dtype=torch.bool)
        assert torch.equal(rec["routing_map"][clear], rmap[clear]), layer
        torch.testing.assert_close(rec["probs"].double()[clear], probs[clear], rtol=0, atol=1e-5)


def test_position_group_gives_each_time_step_b_k_pairs(ws1):
    """The position group's selection varies per token but each position of each micro
    batch gets exactly MBS x k pairs (a check of the grouping independent of the golden)."""
    for rec in _layers(ws1[UNIFIED_GROUPS["unified_position"]]).values():
        per_position = rec["routing_map"].reshape(MICRO, S, MBS, E).sum(dim=(2, 3))
        assert (per_position == MBS * K).all(), per_position.unique()
        per_seq = rec["routing_map"].reshape(MICRO, S, MBS, E).sum(dim=(1, 3))
        assert not (per_seq == S * K).all(), "grouped by sequence, not by position"


@pytest.mark.parametrize("name", NO_BALANCE)
def test_authors_default_attaches_no_balance_loss(name, labels, ws1):
    """hyper and unified train without a balance loss by default, as their authors: no
    aux gradient at all; with moe.router.balance_loss=true there is one (aux test below)."""
    for layer, rec in _layers(ws1[labels[name]]).items():
        assert rec["aux_losses"].get("load_balancing_loss", 0.0) == 0.0, layer
        for pname, grad in rec["grads"].items():
            assert grad is None or grad.abs().max() == 0, (layer, pname)
        with_loss = _layers(ws1[AUX_EXTRA[f"{name}_balance"]])[layer]
        assert with_loss["aux_losses"]["load_balancing_loss"] > 0, layer


# ----------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("layout", ["ep2", "tp2_sp"])
@pytest.mark.parametrize("name", [*SHARED, *VARIANTS])
def test_layout_routes_like_world_size_1(name, layout, labels, ws1, layouts):
    label = VARIANTS.get(name) or labels[name]
    ref, got = ws1[label], layouts(layout)[label]
    for layer, rec in _layers(ref).items():
        other = _layers(got)[layer]
        assert torch.equal(other["routing_map"], rec["routing_map"]), (layout, layer)
        torch.testing.assert_close(other["probs"], rec["probs"], rtol=0, atol=1e-5)
        torch.testing.assert_close(other["moe_out"], rec["moe_out"], rtol=0, atol=1e-5)


# Bound of the aux-gradient comparison, relative to the largest entry of the reference:
# the layouts compute the same float32 forward with other reduction orders (TP-split
# matmuls, regrouped expert GEMMs, xmoe's in-place row renorm done once per micro batch
# rather than once per step), so router inputs agree to ~1e-7 relative; the gradient sums
# 512 tokens x 8 experts of products of them (and for hyper passes through the
# hypernetwork), measured <= 7.2e-7 of the largest entry. 2e-6 keeps a margin, while a
# missing or doubled normalisation (a factor 2 at 2 ranks) fails by 5 orders of magnitude.
AUX_RTOL = 2e-6


@pytest.mark.parametrize("layout", ["dp2", "ep2", "tp2_sp"])
@pytest.mark.parametrize("entry", [*AUX_ROUTERS, *AUX_EXTRA])
def test_aux_loss_gradient_is_layout_invariant(entry, layout, labels, ws1, layouts):
    """Router gradient of the aux losses alone (LM loss x 0, normalised like training by
    finalize_model_grads) equals world size 1's.

    With calculate_per_token_loss each rank scales its aux/z-loss by its *local* token
    count, finalize_model_grads divides by the micro batch's full token count and the
    router gradient is summed over the sequence-parallel ranks: megatron-core 0.16.1
    (TopKRouter.attach_and_log_load_balancing_loss, apply_z_loss) and SpecRouter give
    1/TP of the world-size-1 gradient at TP=2+SP (upstream NVIDIA/Megatron-LM#1652,
    fixed by PR #5047: scale by tp_cp_group.size()). This test keeps the correct target.
    """
    label = AUX_EXTRA.get(entry) or labels[entry]
    ref, got = ws1[label], layouts(layout)[label]
    for layer, rec in _layers(ref).items():
        for pname, g_ref in rec["grads"].items():
            if not rec["requires_grad"][pname]:
                continue
            g = _layers(got)[layer]["grads"][pname]
            scale = g_ref.abs().max().item()
            assert scale > 0, f"{entry}: no aux-loss gradient on {pname} at world size 1"
            err = (g - g_ref).abs().max().item()
            ratio = g.abs().max().item() / scale
            assert err <= AUX_RTOL * scale, (
                f"{entry} layer {layer} {pname} at {layout}: max |diff| {err:.3e} = "
                f"{err / scale:.3e} of max |grad_ws1| (gradient ratio {ratio:.6f})")


# ----------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def trained(labels, tmp_path_factory) -> dict:
    """20 steps of every router at EP=2 (2 processes, one process group for all); the topk
    run also saves its checkpoint (for the spectral test)."""
    tmp = tmp_path_factory.mktemp("train")
    entries = [labels[n] + (":checkpoint.enabled=true" if n == "topk" else "") for n in SHARED]
    results = run_probe(tmp / "train.pt", entries,
                        [*FAST, *TRAIN, f"run.dir={tmp}", "probe.train=true"], 2)
    return {name: results[entry] for name, entry in zip(SHARED, entries)}


TRAIN = ["train.steps=20", "checkpoint.enabled=false", "logging.tensorboard=false"]


@pytest.mark.parametrize("name", SHARED)
def test_router_trains(name, trained):
    losses = trained[name]["losses"]
    assert len(losses) == 20 and all(math.isfinite(v) for v in losses), losses
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 0.5, f"{name}: first 3 steps {first:.3f}, last 3 {last:.3f}: {losses}"


# ----------------------------------------------------------------------------- spectral


def test_spectral_on_a_model_trained_with_topk(trained, tmp_path):
    """Switch a topk-trained model (20 steps, EP=2, its checkpoint) to spectral."""
    run_dir = trained["topk"]["run_dir"]
    results = run_probe(
        tmp_path / "spectral.pt", ["topk", "spectral:moe.router.c=0", "spectral"],
        [*FAST, *TRAIN, f"run.dir={run_dir}", "probe.resume=true"], 2)
    topk, c0, spectral = (results[k] for k in ["topk", "spectral:moe.router.c=0", "spectral"])
    untrained = trained["topk"]["losses"][0]
    for res in (topk, c0, spectral):
        # Finite, and far below the untrained loss: the checkpoint was loaded.
        assert math.isfinite(res["loss"]) and res["loss"] < untrained - 0.5, \
            (res["loss"], untrained)
    differs = False
    for layer, rec in _layers(topk).items():
        zero, mixed = _layers(c0)[layer], _layers(spectral)[layer]
        assert torch.isfinite(mixed["probs"]).all() and torch.isfinite(mixed["moe_out"]).all()
        # c = 0: p = softmax(l) + 0 softmax(l_svd), top-k of p renormalised, which is
        # mathematically the softmax over the top-k logits. The choice is identical; the
        # weights are computed in another order (softmax over all E then divide by the
        # sum of the k, against softmax over the k) so they agree to rounding, not bitwise.
        assert torch.equal(zero["routing_map"], rec["routing_map"]), layer
        torch.testing.assert_close(zero["probs"], rec["probs"], rtol=0, atol=1e-6)
        torch.testing.assert_close(zero["moe_out"], rec["moe_out"], rtol=0, atol=1e-6)
        differs |= not torch.equal(mixed["routing_map"], rec["routing_map"])
    assert differs, "spectral with c=0.5 routes exactly like topk: the spectral term is inert"
