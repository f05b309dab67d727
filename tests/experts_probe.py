"""Build the real model with two expert backends on the same weights; compare (gloo, CPU).

Run by tests/test_experts.py, alone (world size 1) or under torchrun:

    python tests/experts_probe.py OUT.json [key=value ...]

In this process (any layout) the model is built once with ``moe.expert_backend=
sequential`` and once with ``grouped`` (layout-invariant init: the same weights), both
run forward and backward on the same micro batch, and rank 0 writes to OUT.json the
maxima over all ranks of: |MoE-layer output difference| (every MoE layer, captured by
forward hooks), |loss difference|, |gradient difference| of every expert weight (row e
of ``weight1`` against ``local_experts.e.linear_fc1.weight``) and of every other
parameter; plus whether the sharded state dicts of the experts are the same tensors
(keys, global shapes, offsets, replica ids, values).
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist


def _grad_rows(model) -> dict[str, torch.Tensor]:
    from megasmoe.experts.grouped import GroupedMLP

    grads = {}
    for name, module in model.named_modules():
        if name.endswith("mlp.experts"):
            if isinstance(module, GroupedMLP):
                rows = list(zip(module.weight1.grad, module.weight2.grad))
            else:
                rows = [(m.linear_fc1.weight.grad, m.linear_fc2.weight.grad)
                        for m in module.local_experts]
            for e, (g1, g2) in enumerate(rows):
                grads[f"{name}.{e}.fc1"], grads[f"{name}.{e}.fc2"] = g1, g2
    for name, p in model.named_parameters():
        if ".mlp.experts." not in f".{name}":
            grads[name] = p.grad
    return grads


def _sharded(model) -> list[tuple]:
    from megasmoe.model import sharded_tensors

    sd = {k: v for k, v in model.sharded_state_dict().items() if ".mlp.experts." in k}
    rows = [(s.key, tuple(s.global_shape), tuple(s.global_offset), tuple(s.local_shape),
             tuple(s.axis_fragmentations), tuple(s.replica_id), s.data.detach().clone())
            for s in sharded_tensors(sd)]
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    objects = sorted((o.key, tuple(o.global_shape), tuple(o.global_offset), tuple(o.replica_id))
                     for o in nested_values(sd) if isinstance(o, ShardedObject))
    return sorted(rows, key=lambda r: (r[0], r[2])), objects


def _run(cfg, backend: str, tokens: torch.Tensor):
    import dataclasses

    from megatron.core.transformer.moe.moe_layer import MoELayer

    from megasmoe.model import build_model_chunks, layout_invariant_init, to_transformer_config

    cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, expert_backend=backend))
    tc = to_transformer_config(cfg)
    (model,) = build_model_chunks(cfg, tc)
    layout_invariant_init([model], cfg.run.seed, cfg.model.init_std, cfg.model.num_layers)
    outputs = []
    for module in model.modules():
        if isinstance(module, MoELayer):
            module.register_forward_hook(lambda m, i, o: outputs.append(o[0].detach().clone()))
    pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    loss = model(tokens[:, :-1], pos[:, :-1], None, labels=tokens[:, 1:]).float().mean()
    loss.backward()
    return model, loss.detach(), outputs


def main(out_path: str, overrides: list[str]) -> None:
    from megasmoe.config import load_config, validate
    from megasmoe.training.distributed import destroy_distributed, init_distributed

    cfg = validate(load_config("configs/tiny-cpu.yaml", overrides),
                   int(__import__("os").environ.get("WORLD_SIZE", "1")))
    init_distributed(cfg)
    try:
        gen = torch.Generator().manual_seed(dist.get_rank())
        tokens = torch.randint(0, cfg.model.vocab_size, (2, cfg.train.seq_length + 1),
                               generator=gen)
        seq, seq_loss, seq_out = _run(cfg, "sequential", tokens)
        grp, grp_loss, grp_out = _run(cfg, "grouped", tokens)
        a, b = _grad_rows(seq), _grad_rows(grp)
        assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
        expert_grad = max((a[k] - b[k]).abs().max().item() for k in a if ".mlp.experts." in k)
        other_grad = max((a[k] - b[k]).abs().max().item() for k in a
                         if ".mlp.experts." not in k and a[k] is not None)
        grad_scale = max(a[k].abs().max().item() for k in a if a[k] is not None)
        out_diff = max((x - y).abs().max().item() for x, y in zip(seq_out, grp_out))
        (rows_s, obj_s), (rows_g, obj_g) = _sharded(seq), _sharded(grp)
        same_layout = [r[:6] for r in rows_s] == [r[:6] for r in rows_g] and obj_s == obj_g
        same_values = all(torch.equal(x[6], y[6]) for x, y in zip(rows_s, rows_g))
        stats = torch.tensor([out_diff, (seq_loss - grp_loss).abs().item(), expert_grad,
                              other_grad, float(not same_layout), float(not same_values),
                              grad_scale, float(len(seq_out) != len(grp_out) or not seq_out)])
        dist.all_reduce(stats, op=dist.ReduceOp.MAX)
        if dist.get_rank() == 0:
            names = ["moe_output", "loss", "expert_grad", "other_grad", "layout_differs",
                     "values_differ", "grad_scale", "missing_outputs"]
            result = dict(zip(names, stats.tolist()))
            result["num_sharded_expert_tensors"] = len(rows_s)
            result["first_keys"] = [r[:6] for r in rows_s[:3]]
            with open(out_path, "w") as f:
                json.dump(result, f, indent=1)
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
