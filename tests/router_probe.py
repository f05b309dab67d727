"""Probe the routers inside the real megatron-core model (run by tests/test_routers.py).

    python tests/router_probe.py OUT.pt ENTRIES [key=value ...]            (world size 1)
    torchrun --nproc-per-node=2 tests/router_probe.py OUT.pt ENTRIES [key=value ...]

ENTRIES is a comma-separated list; each entry is a router name optionally followed by
``:key=value`` overrides for that entry only, e.g. ``smoe_dropout:moe.aux_loss_type=none``.
Every entry builds the model afresh (configs/tiny-cpu.yaml + the overrides, validated,
data resolved as ``megasmoe pretrain`` does, ``Trainer(cfg)``) in one process group, so
many routers share one torchrun start-up.

Keys starting with ``probe.`` (global or per entry) steer the probe itself:

- ``probe.step=N``      call ``on_train_step(N, train.steps)`` before the forward (default 0).
- ``probe.lm=true``     also run a normal LM-loss backward and save its gradients.
- ``probe.resume=true`` load the checkpoint of run.dir (``Trainer.resume``) first.
- ``probe.inputs=true`` also save the router inputs and router state (golden checks).
- ``probe.experts=true`` also save the experts' weights (world size 1 only; either
  expert backend).
- ``probe.moe_api=true`` after the step, under no_grad, on the first micro batch's MoE
  input: ``layer.run_experts`` with a fixed routing of 3 experts per token
  (t, t + 3, t + 5 mod E, weights 1, 2, 3 / 6) and ``layer.smoe`` (world size 1 only).
- ``probe.train=true``  instead of probing, train with ``Trainer.fit`` (entry i in
  run.dir/entry<i>) and save the per-step losses and the final router state (this
  rank's layers): ``{entry: {"losses": [...], "run_dir": str, "router_state": {layer:
  {name: tensor}}}}``.
- ``probe.run_dir=NAME`` with probe.train: train in run.dir/NAME instead, so a later
  entry of the same probe can continue an earlier one's run (resume).

Probe mode: one step of the trainer's own schedule (``Trainer._run_schedule``: forward,
backward and ``finalize_model_grads``) on the first train.global_batch_size samples,
with the LM loss multiplied by 0 but its token count unchanged, so the router
gradients (``.main_grad``) come from the aux losses alone, normalised exactly as in
training (megatron's MoEAuxLossAutoScaler scale is set by the schedule). Forward hooks
on each MoE layer's router and on the layer capture probs, routing_map and the layer
output. Per-token tensors are all-gathered over the tensor-parallel group (sequence
parallel: each rank holds a slice of the sequence; tokens are [S, B] flattened s-major,
so the slices concatenate in rank order) and over the data-parallel group (in DP-rank
order, which is the order of the micro batches at world size 1 with the same global
batch). Saved on rank 0:

    {entry: {"meta": {...}, "loss": float,
             "layers": {layer: {"probs" [T, E], "routing_map" [T, E], "moe_out" [T, H],
                                "x" [T, H] (probe.inputs), "state" {name: tensor},
                                "grads": {param: main_grad or None},
                                "aux_losses": {name: this rank's tracker value},
                                "grads_lm": {...} (probe.lm),
                                "requires_grad": {param: bool},
                                "experts_fc1" [E, 2I, H], "experts_fc2" [E, H, I],
                                "api_x" [S B, H], "api_probs" / "api_routing_map" [S B, E],
                                "api_run_experts" / "api_smoe" [S B, H] (probe.moe_api)}}}}

with T = all tokens of the global batch (micro batches concatenated in sample order).
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
warnings.filterwarnings("ignore", category=FutureWarning)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "tiny-cpu.yaml"
PROBE_DEFAULTS = {"step": 0, "lm": False, "resume": False, "inputs": False, "run_dir": None,
                  "experts": False, "train": False, "moe_api": False}


def _split(items: list[str]) -> tuple[list[str], dict]:
    """(config overrides, probe options) from key=value items."""
    from megasmoe.config import parse_override

    overrides, probe = [], {}
    for item in items:
        key, value = parse_override(item)
        if key.startswith("probe."):
            name = key[len("probe."):]
            if name not in PROBE_DEFAULTS:
                raise SystemExit(f"router_probe: unknown option probe.{name}")
            probe[name] = value
        else:
            overrides.append(item)
    return overrides, probe


def _parse_entries(spec: str) -> list[tuple[str, str, list[str]]]:
    """[(entry label, router name, per-entry items)]."""
    entries = []
    for label in spec.split(","):
        name, *items = label.split(":")
        entries.append((label, name, items))
    return entries


def _gather_cat(t: torch.Tensor, group) -> torch.Tensor:
    """All-gather ``t`` over ``group`` and concatenate along dim 0 in group-rank order."""
    if group is None or dist.get_world_size(group) == 1:
        return t
    is_bool = t.dtype == torch.bool
    src = t.to(torch.uint8) if is_bool else t
    parts = [torch.empty_like(src) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, src.contiguous(), group=group)
    out = torch.cat(parts, dim=0)
    return out.bool() if is_bool else out


def _moe_layers(trainer):
    from megatron.core.transformer.moe.moe_layer import MoELayer

    layers = {}
    for chunk in trainer.unwrapped:
        for module in chunk.modules():
            if isinstance(module, MoELayer):
                layers[module.router.layer_number - 1] = module
    return layers


def _router_state(router) -> dict:
    state = {n: p.detach().clone().cpu() for n, p in router.named_parameters()}
    state.update({n: b.detach().clone().cpu() for n, b in router.named_buffers()
                  if not n.startswith("telemetry")})
    return state


def _grads(router) -> dict:
    out = {}
    for name, p in router.named_parameters():
        g = getattr(p, "main_grad", None)
        out[name] = None if g is None else g.detach().clone().cpu()
    return out


def _zero_grads(trainer) -> None:
    for m in trainer.model:
        m.zero_grad_buffer()
    trainer.optimizer.zero_grad()


def _run_step(trainer, lm_scale: float) -> list:
    """One step of the trainer's schedule (forward, backward, finalize_model_grads) on the
    first global batch; the LM loss is multiplied by ``lm_scale`` (token count unchanged)."""
    from megasmoe.training import trainer as trainer_mod

    original = trainer_mod._loss_func

    def scaled_loss(loss_mask, output):
        loss, num_tokens, report = original(loss_mask, output)
        return loss * lm_scale, num_tokens, report

    trainer_mod._loss_func = scaled_loss
    try:
        _zero_grads(trainer)
        return trainer._run_schedule(trainer._iterators(trainer.train_ds, 0), forward_only=False)
    finally:
        trainer_mod._loss_func = original


def _probe_entry(cfg, probe: dict) -> dict:
    from megatron.core import parallel_state
    from megatron.core.num_microbatches_calculator import get_num_microbatches
    from megatron.core.transformer.moe import moe_utils

    from megasmoe.experts import local_expert_weights
    from megasmoe.training.trainer import Trainer

    assert cfg.parallel.pp == 1 and cfg.parallel.cp == 1, "the probe handles pp=1, cp=1"
    trainer = Trainer(cfg)
    try:
        if probe["resume"]:
            trainer.resume()
            assert trainer.resumed is not None, f"no checkpoint to resume in {cfg.run.path}"
        for router in trainer.routers:
            router.on_train_step(int(probe["step"]), cfg.train.steps)
        for m in trainer.model:
            m.train()
        layers = _moe_layers(trainer)
        caps = {i: {"probs": [], "routing_map": [], "moe_out": [], "x": []} for i in layers}
        states: dict = {}
        api_inputs: dict = {}
        handles = []
        for i, layer in layers.items():
            def router_hook(module, args, output, i=i):
                probs, routing_map = output
                caps[i]["probs"].append(probs.detach().clone())
                caps[i]["routing_map"].append(routing_map.detach().clone())
                if probe["inputs"]:
                    x = args[0]
                    caps[i]["x"].append(x.detach().reshape(-1, x.shape[-1]).clone())
                if i not in states:
                    states[i] = _router_state(module)

            def layer_hook(module, args, output, i=i):
                out = output[0] if isinstance(output, tuple) else output
                if probe["moe_api"] and i not in api_inputs:
                    api_inputs[i] = args[0].detach().clone()
                caps[i]["moe_out"].append(out.detach().reshape(-1, out.shape[-1]).clone())

            handles.append(layer.router.register_forward_hook(router_hook))
            handles.append(layer.register_forward_hook(layer_hook))

        losses = _run_step(trainer, lm_scale=0.0)
        # The aux losses of that step per layer, as megatron's tracker holds them (summed
        # over this rank's micro batches; not yet reduced over ranks).
        aux = {name: v["values"].detach().clone().cpu()
               for name, v in moe_utils.get_moe_layer_wise_logging_tracker().items()}
        for h in handles:
            h.remove()
        loss, _ = trainer._global_loss(losses)
        grads = {i: _grads(layer.router) for i, layer in layers.items()}
        api = {i: _moe_api(layer, api_inputs[i]) for i, layer in layers.items()} \
            if probe["moe_api"] else {}
        grads_lm = None
        if probe["lm"]:
            _run_step(trainer, lm_scale=1.0)
            grads_lm = {i: _grads(layer.router) for i, layer in layers.items()}
        moe_utils.clear_aux_losses_tracker()

        sp_group = parallel_state.get_tensor_model_parallel_group() \
            if cfg.parallel.sp and cfg.parallel.tp > 1 else None
        dp_group = parallel_state.get_data_parallel_group()
        out_layers = {}
        for i, layer in sorted(layers.items()):
            rec = {}
            for key, chunks in caps[i].items():
                if not chunks:
                    continue
                per_mb = [_gather_cat(c, sp_group) for c in chunks]
                rec[key] = _gather_cat(torch.cat(per_mb, dim=0), dp_group).cpu()
            rec["grads"] = grads[i]
            rec["aux_losses"] = {name: float(v[i]) for name, v in aux.items()}
            if grads_lm is not None:
                rec["grads_lm"] = grads_lm[i]
            rec["requires_grad"] = {n: p.requires_grad for n, p in layer.router.named_parameters()}
            if probe["inputs"]:
                rec["state"] = states[i]
            if probe["experts"]:
                assert dist.get_world_size() == 1, "probe.experts needs world size 1"
                weights = local_expert_weights(layer.experts)
                rec["experts_fc1"] = torch.stack([w1.detach().clone() for w1, _ in weights]).cpu()
                rec["experts_fc2"] = torch.stack([w2.detach().clone() for _, w2 in weights]).cpu()
            rec.update(api.get(i, {}))
            out_layers[i] = rec
        t = cfg.train
        meta = {
            "router": cfg.moe.router.name, "num_experts": cfg.moe.num_experts,
            "topk": cfg.moe.topk, "seq_length": t.seq_length,
            "micro_batch_size": t.micro_batch_size,
            "num_microbatches": get_num_microbatches()
            * parallel_state.get_data_parallel_world_size(),
            "train_steps": t.steps, "step": int(probe["step"]),
            "router_options": dict(cfg.moe.router.options),
        }
        return {"meta": meta, "loss": loss, "layers": out_layers}
    finally:
        trainer.close()


@torch.no_grad()
def _moe_api(layer, hidden: torch.Tensor) -> dict:
    """run_experts with a fixed 3-expert routing and smoe, on ``hidden`` [S, B, H]."""
    assert dist.get_world_size() == 1, "probe.moe_api needs world size 1"
    n, num_experts = hidden.shape[0] * hidden.shape[1], layer.config.num_moe_experts
    t = torch.arange(n, device=hidden.device)
    chosen = torch.stack([t % num_experts, (t + 3) % num_experts, (t + 5) % num_experts], -1)
    weights = torch.tensor([1.0, 2.0, 3.0], device=hidden.device).expand(n, 3) / 6
    routing_map = torch.zeros(n, num_experts, dtype=torch.bool,
                              device=hidden.device).scatter(-1, chosen, True)
    probs = torch.zeros(n, num_experts, device=hidden.device).scatter(-1, chosen, weights)
    out = layer.run_experts(hidden, probs, routing_map)
    smoe, _ = layer.smoe(hidden)
    flat = lambda v: v.detach().reshape(n, -1).clone().cpu()  # noqa: E731
    return {"api_x": flat(hidden), "api_probs": probs.cpu(), "api_routing_map": routing_map.cpu(),
            "api_run_experts": flat(out), "api_smoe": flat(smoe)}


def _train_entry(cfg) -> dict:
    from megasmoe.training.trainer import Trainer

    trainer = Trainer(cfg)
    try:
        result = trainer.fit()
        state = {i: _router_state(layer.router) for i, layer in _moe_layers(trainer).items()}
        return {"losses": list(result["losses"]), "run_dir": str(cfg.run.path),
                "router_state": state}
    finally:
        trainer.close()


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__)
        return 2
    out_path, spec, *rest = argv
    from megasmoe import platform
    from megasmoe.config import load_config, validate
    from megasmoe.training.data import resolve_data
    from megasmoe.training.distributed import destroy_distributed, init_distributed

    overrides, probe_global = _split(rest)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    results = {}
    started = None
    try:
        for index, (label, name, items) in enumerate(_parse_entries(spec)):
            entry_overrides, probe_entry = _split(items)
            probe = {**PROBE_DEFAULTS, **probe_global, **probe_entry}
            extra = []
            if probe["train"]:
                base = Path(load_config(CONFIG, overrides).run.path)
                extra = [f"run.dir={base / (probe['run_dir'] or f'entry{index}')}"]
            cfg = validate(load_config(CONFIG, [*overrides, f"moe.router.name={name}",
                                                *entry_overrides, *extra]), world)
            resolve_data(cfg)  # as `megasmoe pretrain`: prepare / check the data first
            layout = (cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.ep, cfg.parallel.etp,
                      cfg.parallel.sp)
            if started is None:
                init_distributed(cfg)
                started = layout
            else:
                assert layout == started, "all entries of one probe need the same layout"
                from megatron.core import parallel_state as ps

                # What a fresh process would do: the RNG streams start from the seed.
                platform.seed_rng_streams(
                    cfg.run.seed, tp_rank=ps.get_tensor_model_parallel_rank(),
                    ep_rank=ps.get_expert_model_parallel_rank(),
                    etp_rank=ps.get_expert_tensor_parallel_rank())
            results[label] = _train_entry(cfg) if probe["train"] else _probe_entry(cfg, probe)
        if dist.get_rank() == 0:
            Path(out_path).parent.mkdir(parents=True, exist_ok=True)
            torch.save(results, out_path)
        dist.barrier()
    finally:
        destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main(sys.argv[1:]))
