"""One balance-loss convention for every router (moe.aux_loss_normalization).

At equal moe.aux_loss_coeff, ``topk`` (megatron-core's loss) and the paper routers
(SpecRouter's L_bal) put the same gradient on the router for the same routing, under
both settings (``megatron``, the default, and ``paper`` = 1/k of it), and log the same
load_balancing_loss. The routers are the real modules (megatron-core TopKRouter
subclasses built from the registry) in a world-size-1 gloo process started by this file
(``python tests/test_balance_convention.py OUT``; the pytest process never starts
torch.distributed). Checked at two levels:

* logits: every router's ``routing`` on the same leaf logits [S, B, E] (the same top-k),
  the probabilities' own gradient 0, so the logits' gradient is the balance loss's alone;
  against a float64 reference written here from the formula;
* weights: a full ``forward`` of ``topk`` whose W_r is the gate another router defines
  (hyper's generated W_r with its bias rows zeroed; xmoe's normalize(M) W_red), so both
  route alike: that router's parameter gradients equal topk's W_r gradient pulled back
  through its gate (the chain rule of W_r(theta)).

xmoe and stablemoe balance softmax(g / 0.3) by default (the papers'); here
balance_temperature = 1 so that they balance the same scores as topk.
"""

from __future__ import annotations

import sys

import pytest
import torch

S, B, D, E, K = 6, 3, 12, 8, 2
COEFF = 0.01
PAPER_ROUTERS = {  # name -> router config fields (balance softmax(g), a loss attached)
    "xmoe": {"balance_temperature": 1.0},
    "stablemoe": {"balance_temperature": 1.0},
    "hyper": {"balance_loss": True},
    "simsmoe": {},
}
ROUTERS = ["topk", *PAPER_ROUTERS]
NORMALIZATIONS = ("megatron", "paper")


# ----------------------------------------------------------------------------- the probe


def _router(name: str, normalization: str, pgs):
    """A registered router built as the model builds it, world size 1."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megasmoe.routers import router_entry

    config = TransformerConfig(
        num_layers=1, hidden_size=D, num_attention_heads=2, num_moe_experts=E,
        moe_router_topk=K, moe_aux_loss_coeff=COEFF, moe_router_load_balancing_type="aux_loss",
        moe_router_dtype="fp64", params_dtype=torch.float64, add_bias_linear=False,
        use_cpu_initialization=True, calculate_per_token_loss=False)
    cls, config_cls = router_entry(name)
    router = cls(config=config, pg_collection=pgs,
                 router_config=config_cls(**PAPER_ROUTERS.get(name, {})),
                 aux_loss_normalization=normalization)
    router.set_layer_number(1)
    return router.double().train()


def _aux_backward(probs: torch.Tensor) -> float:
    """Backward of the balance loss alone (the probabilities' gradient 0); its logged value."""
    from megatron.core.transformer.moe.moe_utils import (
        clear_aux_losses_tracker,
        get_moe_layer_wise_logging_tracker,
    )

    (probs * 0).sum().backward()
    logged = float(get_moe_layer_wise_logging_tracker()["load_balancing_loss"]["values"][0])
    clear_aux_losses_tracker()
    return logged


def _logits_level(pgs) -> dict:
    logits = torch.randn(S, B, E, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = {"logits": logits}
    for norm in NORMALIZATIONS:
        for name in ROUTERS:
            router = _router(name, norm, pgs)
            leaf = logits.clone().requires_grad_(True)
            probs, routing_map = router.routing(leaf)
            logged = _aux_backward(probs)
            out[name, norm] = {"grad": leaf.grad, "routing_map": routing_map, "logged": logged}
    return out


def _weight_level(pgs) -> dict:
    """topk with the W_r of hyper / xmoe against that router, on the same input."""
    from megasmoe.routers import functional as RF

    x = torch.randn(S, B, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    out = {}
    for name in ("hyper", "xmoe"):
        paper = _router(name, "megatron", pgs)
        if name == "hyper":
            with torch.no_grad():  # b = theta[:, d] = 0: the gate is W_r alone, like topk's
                bias_rows = torch.arange(E) * (D + 1) + D
                paper.hyper_w2[bias_rows] = 0
                paper.hyper_b2[bias_rows] = 0
        probs, _ = paper(x)
        _aux_backward(probs)
        params = [p for p in paper.parameters() if p.requires_grad]
        if name == "hyper":
            gate = paper.materialize()[0]
        else:  # after the forward's in-place renorm of M
            gate = RF.xmoe_logits(torch.eye(D, dtype=torch.float64), paper.w_reduce,
                                  paper.expert_embeddings).t()
        topk = _router("topk", "megatron", pgs)
        with torch.no_grad():
            topk.weight.copy_(gate.detach())
        probs, _ = topk(x)
        _aux_backward(probs)
        pulled = torch.autograd.grad(gate, params, grad_outputs=topk.weight.grad)
        out[name] = {"grads": [p.grad for p in params], "pulled": list(pulled),
                     "topk_grad": topk.weight.grad}
    return out


def _probe(path: str) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection

    dist.init_process_group("gloo")
    parallel_state.initialize_model_parallel()
    pgs = ProcessGroupCollection.use_mpu_process_groups()
    torch.save({"logits": _logits_level(pgs), "weights": _weight_level(pgs)}, path)
    dist.destroy_process_group()


# ----------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("balance") / "probe.pt"
    from conftest import launch

    proc = launch([__file__, str(out)], 1, 300, rank_env=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out, weights_only=False)


def _reference(logits: torch.Tensor, scale: float) -> tuple[torch.Tensor, float]:
    """d/dlogits of coeff x scale x E sum_e f_e P_e, f_e = count_e / (T k), P_e = mean_t
    softmax(l_t)_e, in float64 with explicit sums; and E sum_e f_e P_e (the logged value)."""
    flat = logits.reshape(-1, E).clone().requires_grad_(True)
    T = flat.shape[0]
    top = flat.detach().topk(K, dim=-1).indices
    counts = [sum(int(e in row) for row in top.tolist()) for e in range(E)]
    p = torch.softmax(flat, dim=-1)
    loss = sum(E * (counts[e] / (T * K)) * (p[:, e].sum() / T) for e in range(E))
    (COEFF * scale * loss).backward()
    return flat.grad.reshape(logits.shape), float(loss.detach())


@pytest.mark.parametrize("norm", NORMALIZATIONS)
def test_equal_coefficients_put_the_same_gradient_on_the_logits(probe, norm):
    res = probe["logits"]
    ref_grad, ref_logged = _reference(res["logits"], 1.0 if norm == "megatron" else 1.0 / K)
    assert ref_grad.abs().max() > 0
    for name in ROUTERS:
        got = res[name, norm]
        assert torch.equal(got["routing_map"], res["topk", norm]["routing_map"]), name
        # topk's aux scores are megatron's float32 softmax; the paper routers' float64
        torch.testing.assert_close(got["grad"], ref_grad, rtol=1e-5, atol=1e-9,
                                   msg=lambda m: f"{name} ({norm}): {m}")
        # The logged loss is in megatron's normalisation under either setting.
        assert got["logged"] == pytest.approx(ref_logged, rel=1e-6), (name, norm)


def test_paper_normalization_is_one_over_k_of_megatrons(probe):
    """The setting changes the pressure by exactly k, for every router (a missing or
    doubled factor k would pass the equality test above only if every router had it)."""
    res = probe["logits"]
    for name in ROUTERS:
        torch.testing.assert_close(res[name, "paper"]["grad"] * K, res[name, "megatron"]["grad"],
                                   rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", ["hyper", "xmoe"])
def test_same_routing_same_gradient_on_the_router_weights(probe, name):
    """The router's parameter gradients equal topk's W_r gradient pulled back through its
    gate W_r(theta): the same gradient on the router weights."""
    res = probe["weights"][name]
    assert res["topk_grad"].abs().max() > 0
    for got, want in zip(res["grads"], res["pulled"]):
        assert got is not None and want.abs().max() > 0
        # topk's balance scores are megatron's float32 softmax: ~1e-7 relative rounding
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6 * float(want.abs().max()))


@pytest.mark.parametrize("overrides,message", [
    (["moe.aux_loss_normalization=papers"],
     "moe.aux_loss_normalization='papers' is unknown; use megatron or paper"),
    (["moe.router.name=hyper", "moe.router.balance_loss=true", "moe.aux_loss_type=seq_aux_loss"],
     "moe.router.balance_loss=true (router hyper) needs moe.aux_loss_type=aux_loss"),
    (["moe.router.name=unified", "moe.dispatcher=allgather", "moe.router.group=step"],
     "moe.router.group='step' is unknown; use sequence, position, micro_batch, causal"),
])
def test_bad_settings_are_one_line_errors(overrides, message):
    from conftest import REPO
    from megasmoe.config import ConfigError, load_config, validate

    with pytest.raises(ConfigError) as info:
        validate(load_config(str(REPO / "configs" / "tiny-cpu.yaml"), overrides))
    assert str(info.value).startswith(message) and "\n" not in str(info.value), info.value


def test_default_is_megatrons_normalization():
    """The default keeps topk's loss (and so every measured topk number) unchanged."""
    from megasmoe.config import MoEConfig

    assert MoEConfig().aux_loss_normalization == "megatron"


if __name__ == "__main__":
    _probe(sys.argv[1])
