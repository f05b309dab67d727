"""The lean paths against megatron-core's own, on the real model (gloo, CPU, world size 1).

Run by tests/test_lean_paths.py:

    python tests/lean_probe.py OUT.json

Two checks, each building the real GPTModel from configs/tiny-cpu.yaml:

* routing: for topk variants (Mixtral softmax-after-top-k, pre-softmax, a top-k scaling
  factor, z-loss), every MoE layer's router runs once through ``lean_routing`` and once
  through megatron's ``TopKRouter.routing`` on the same input; recorded are the largest
  differences of the probabilities, the routing maps, the gradients (of a fixed random
  weighting of the probs, which carries the attached aux and z losses) with respect to
  the input and the router weight, and the values logged to megatron's aux-loss tracker;
  also in eval mode (no loss attached), and which routers take the lean path.
* dispatch: for each dispatcher (alltoall, allgather) and expert backend (grouped,
  sequential), the model with megasmoe's local token dispatcher and with megatron's (same
  weights) runs forward and backward on the same batch; recorded are the loss and the
  largest gradient difference, and the dispatcher classes.
* linear: the same for platform P10's linear against megatron's autograd function.
"""

from __future__ import annotations

import json
import sys

import torch


def _cfg(overrides: list[str]):
    from megasmoe.config import load_config, validate

    return validate(load_config("configs/tiny-cpu.yaml", ["parallel.world_size=1",
                                                          "parallel.ep=1", *overrides]), 1)


def _build(cfg, local: bool = True):
    import megasmoe.model as model_mod
    from megasmoe.model import build_model_chunks, layout_invariant_init, to_transformer_config

    original = model_mod.use_local_dispatcher
    if not local:
        model_mod.use_local_dispatcher = lambda layer: False
    try:
        (model,) = build_model_chunks(cfg, to_transformer_config(cfg))
    finally:
        model_mod.use_local_dispatcher = original
    layout_invariant_init([model], cfg.run.seed, cfg.model.init_std, cfg.model.num_layers)
    return model


def _moe_layers(model):
    from megatron.core.transformer.moe.moe_layer import MoELayer

    return [m for m in model.modules() if isinstance(m, MoELayer)]


def _route(router, x: torch.Tensor, weights: torch.Tensor, lean: bool, train: bool):
    from megatron.core.transformer.moe.moe_utils import (
        clear_aux_losses_tracker,
        get_moe_layer_wise_logging_tracker,
    )

    router.lean_routing_applies = lambda *args: lean  # instance attribute: this call only
    clear_aux_losses_tracker()
    router.train(train)
    try:
        x = x.clone().requires_grad_(True)
        with torch.set_grad_enabled(train):
            probs, routing_map = router(x)
        grads = (None, None)
        if train:
            grads = torch.autograd.grad((probs * weights).sum(), [x, router.weight])
        logged = {name: v["values"].clone() for name, v in
                  get_moe_layer_wise_logging_tracker().items()}
    finally:
        del router.lean_routing_applies
        router.train(True)
    return probs.detach(), routing_map, grads, logged


def _diff(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


def routing_checks() -> dict:
    variants = {
        "mixtral": [],
        "pre_softmax": ["moe.router.pre_softmax=true"],
        "scaling": ["moe.router.topk_scaling_factor=2.0"],
        "z_loss": ["moe.z_loss_coeff=0.001"],
    }
    out = {}
    for name, overrides in variants.items():
        cfg = _cfg(overrides)
        model = _build(cfg)
        gen = torch.Generator().manual_seed(7)
        x = torch.randn(cfg.train.seq_length, 2, cfg.model.hidden_size, generator=gen)
        rec = {"probs": 0.0, "map_differs": 0.0, "x_grad": 0.0, "w_grad": 0.0, "grad_scale": 0.0,
               "logged": 0.0, "logged_names": [], "eval_probs": 0.0, "applies": []}
        for layer in _moe_layers(model):
            r = layer.router
            rec["applies"].append(bool(r.lean_routing_applies(torch.zeros(1, 1), None)))
            weights = torch.rand(x.shape[0] * x.shape[1], cfg.moe.num_experts, generator=gen)
            lean = _route(r, x, weights, lean=True, train=True)
            meg = _route(r, x, weights, lean=False, train=True)
            rec["probs"] = max(rec["probs"], _diff(lean[0], meg[0]))
            rec["map_differs"] = max(rec["map_differs"], float(not torch.equal(lean[1], meg[1])))
            rec["x_grad"] = max(rec["x_grad"], _diff(lean[2][0], meg[2][0]))
            rec["w_grad"] = max(rec["w_grad"], _diff(lean[2][1], meg[2][1]))
            rec["grad_scale"] = max(rec["grad_scale"], meg[2][1].abs().max().item())
            assert lean[3].keys() == meg[3].keys(), (lean[3].keys(), meg[3].keys())
            rec["logged_names"] = sorted(meg[3])
            for k in meg[3]:
                rec["logged"] = max(rec["logged"], _diff(lean[3][k], meg[3][k]))
            ev_lean = _route(r, x, weights, lean=True, train=False)
            ev_meg = _route(r, x, weights, lean=False, train=False)
            rec["eval_probs"] = max(rec["eval_probs"], _diff(ev_lean[0], ev_meg[0]))
        out[name] = rec
    # Routers and settings the lean path must leave to megatron.
    cases = {"sigmoid_bias": ["moe.router.name=sigmoid_bias"],
             "seq_aux_loss": ["moe.aux_loss_type=seq_aux_loss"],
             "fp64": ["moe.router_dtype=fp64"]}
    out["not_lean"] = {}
    for name, overrides in cases.items():
        model = _build(_cfg(overrides))
        r = _moe_layers(model)[0].router
        logits = torch.zeros(4, r.config.num_moe_experts,
                             dtype=torch.float64 if name == "fp64" else torch.float32)
        out["not_lean"][name] = bool(r.lean_routing_applies(logits, None))
    r = _moe_layers(_build(_cfg([])))[0].router
    out["not_lean"]["padding_mask"] = bool(r.lean_routing_applies(
        torch.zeros(4, 8), torch.zeros(4, dtype=torch.bool)))
    return out


def dispatch_checks() -> dict:
    out = {}
    for dispatcher in ("alltoall", "allgather"):
        for backend in ("grouped", "sequential"):
            cfg = _cfg([f"moe.dispatcher={dispatcher}", f"moe.expert_backend={backend}"])
            gen = torch.Generator().manual_seed(3)
            tokens = torch.randint(0, cfg.model.vocab_size, (2, cfg.train.seq_length + 1),
                                   generator=gen)
            pos = torch.arange(cfg.train.seq_length).unsqueeze(0).expand(2, -1)
            runs = []
            for local in (True, False):
                model = _build(cfg, local=local)
                loss = model(tokens[:, :-1], pos, None, labels=tokens[:, 1:]).float().mean()
                loss.backward()
                grads = {n: p.main_grad.clone() if getattr(p, "main_grad", None) is not None
                         else p.grad.clone() for n, p in model.named_parameters()}
                classes = sorted({type(m.token_dispatcher).__name__ for m in _moe_layers(model)})
                runs.append((loss.detach(), grads, classes))
            (l1, g1, c1), (l2, g2, c2) = runs
            out[f"{dispatcher}/{backend}"] = {
                "loss": _diff(l1, l2), "loss_value": l1.item(),
                "grad": max(_diff(g1[k], g2[k]) for k in g1),
                "classes_local": c1, "classes_megatron": c2,
            }
    return out


def linear_checks() -> dict:
    """The model with platform P10's linear and with megatron's autograd function."""
    from megatron.core.tensor_parallel import layers

    patched = layers.linear_with_grad_accumulation_and_async_allreduce
    cfg = _cfg([])
    gen = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, cfg.train.seq_length + 1), generator=gen)
    pos = torch.arange(cfg.train.seq_length).unsqueeze(0).expand(2, -1)
    runs = []
    for fn in (patched, getattr(patched, "__wrapped__", patched)):
        layers.linear_with_grad_accumulation_and_async_allreduce = fn
        try:
            model = _build(cfg)
            loss = model(tokens[:, :-1], pos, None, labels=tokens[:, 1:]).float().mean()
            loss.backward()
        finally:
            layers.linear_with_grad_accumulation_and_async_allreduce = patched
        runs.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (l1, g1), (l2, g2) = runs
    return {"patched": hasattr(patched, "__wrapped__"), "loss": _diff(l1, l2),
            "grad": max(_diff(g1[k], g2[k]) for k in g1), "params": len(g1)}


def main(out_path: str) -> None:
    from megasmoe.training.distributed import destroy_distributed, init_distributed

    init_distributed(_cfg([]))
    try:
        result = {"routing": routing_checks(), "dispatch": dispatch_checks(),
                  "linear": linear_checks()}
    finally:
        destroy_distributed()
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
