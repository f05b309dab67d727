"""megatron's optimizer on CPU with torch's fused Adam kernel (megasmoe/training/fused_adam.py).

The same megatron model trained 3 steps with the fused kernel and with torch's loop, for
the fp32, bf16 and distributed optimizers: every inner torch optimizer is switched, the
parameters move, and both kernels give the same parameters to float rounding. The
optimizer state of a checkpoint written before this (loop flags) restores the loop's
flags; the checkpoint load puts the run's kernel back (megasmoe/checkpoint/saveload.py).
A fused run resumed from its own checkpoint gives the uninterrupted run's bits
(tests/test_checkpoint.py, exact resume).
"""

from __future__ import annotations

from test_platform import ONE_RANK_MEGATRON, run_script

SCRIPT = ONE_RANK_MEGATRON + """
from megasmoe.checkpoint.saveload import _restore_run_group_settings, _run_group_settings
from megasmoe.training.fused_adam import use_fused_adam

cfg = validate(load_config("configs/tiny-cpu.yaml", [
    "parallel.world_size=1", "parallel.ep=1", "model.num_layers=2", "model.hidden_size=64",
    "model.vocab_size=256", "moe.num_experts=4", "moe.ffn_hidden_size=64",
    "train.seq_length=16", "train.micro_batch_size=2", "train.global_batch_size=2"]), 1)
gen = torch.Generator().manual_seed(0)
batches = [torch.randint(0, 256, (2, 16), generator=gen) for _ in range(3)]
pos = torch.arange(16).expand(2, 16)


def build(distopt, precision, fused):
    cfg.train.precision = precision
    platform.seed_rng_streams(1234, 0, 0, 0)
    torch.manual_seed(1234)
    _, model, opt = build_ddp(cfg, distopt, weight_decay=0.1)
    switched = use_fused_adam(opt) if fused else 0
    return model, opt, switched


def inner(opt):
    return [o.optimizer for o in getattr(opt, "chained_optimizers", [opt])]


def train(model, opt):
    start = [p.detach().float().clone() for p in model.parameters()]
    for tokens in batches:
        model.zero_grad_buffer(); opt.zero_grad()
        model(tokens, pos, None, labels=tokens).float().mean().backward()
        model.finish_grad_sync()
        opt.step()
    end = [p.detach().float().clone() for p in model.parameters()]
    moved = max((a - b).abs().max().item() for a, b in zip(start, end))
    return end, moved


results = []
for distopt, precision in ((False, "fp32"), (True, "fp32"), (False, "bf16"), (True, "bf16")):
    fused_model, fused_opt, switched = build(distopt, precision, True)
    loop_model, loop_opt, _ = build(distopt, precision, False)
    flags = [g["fused"] for o in inner(fused_opt) for g in o.param_groups]
    loop_flags = [g.get("fused") for o in inner(loop_opt) for g in o.param_groups]
    fused_params, moved = train(fused_model, fused_opt)
    loop_params, _ = train(loop_model, loop_opt)
    diff = max((a - b).abs().max().item() for a, b in zip(fused_params, loop_params))
    # A loop optimizer's checkpoint state restores its flags; the checkpoint load puts
    # the run's own back, as load_checkpoint does around the optimizer's load.
    settings = _run_group_settings(fused_opt)
    for f, l in zip(inner(fused_opt), inner(loop_opt)):
        f.load_state_dict(copy.deepcopy(l.state_dict()))
    restored = [g.get("fused") for o in inner(fused_opt) for g in o.param_groups]
    _restore_run_group_settings(fused_opt, settings)
    after = [g["fused"] for o in inner(fused_opt) for g in o.param_groups]
    again = sum(all(g["fused"] for g in o.param_groups) for o in inner(fused_opt))
    results.append(dict(distopt=distopt, precision=precision, switched=switched,
                        inner=len(inner(fused_opt)), flags=flags, loop_flags=loop_flags,
                        moved=moved, diff=diff, restored=restored, again=again, after=after))
dist.destroy_process_group()
print(json.dumps(results))
"""


def test_fused_kernel_on_every_megatron_optimizer_matches_the_loop():
    runs = run_script(SCRIPT)
    assert [(r["distopt"], r["precision"]) for r in runs] == [
        (False, "fp32"), (True, "fp32"), (False, "bf16"), (True, "bf16")]
    for r in runs:
        assert r["switched"] == r["inner"] >= 1, r
        assert r["flags"] and all(r["flags"]), r
        assert not any(r["loop_flags"]), r  # megatron's own choice: torch's loop
        assert r["moved"] > 1e-3, r  # 3 steps at lr 1e-2 move the weights
        # The same update to float rounding: fp32 master weights in every case.
        assert r["diff"] <= 1e-5 * max(1.0, r["moved"]), r
        assert not any(r["restored"]), r
        assert r["again"] == r["inner"] and all(r["after"]), r
