"""Multi-process gloo runs of the real megatron-core model: learning and layout equivalence.

The same tiny model, seed and data under world size 1, DP=2, EP=2, TP=2+SP and PP=2
(and interleaved PP, the distributed optimizer) must give the same losses: the
parameters are initialised from their global identity (model.layout_invariant_init),
the sampler hands every layout the same samples, and the loss is normalised by the
global token count. First-step loss within 1e-5; after 5 steps within 1e-3.
"""

from __future__ import annotations

import math

import pytest

from conftest import pretrain, read_metrics, train_losses

STEPS = ["train.steps=5"]
WS1 = ["parallel.world_size=1", "parallel.ep=1"]

LAYOUTS = {
    "dp2": ["parallel.ep=1"],
    "ep2": ["parallel.ep=2"],
    "tp2_sp": ["parallel.ep=1", "parallel.tp=2", "parallel.sp=true"],
    "pp2": ["parallel.ep=1", "parallel.pp=2"],
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Losses of the world-size-1 run."""
    tmp = tmp_path_factory.mktemp("ws1")
    return train_losses(pretrain(tmp, "ws1", [*STEPS, *WS1], nproc=1))


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_matches_world_size_1(layout, reference, tmp_path):
    losses = train_losses(pretrain(tmp_path, layout, [*STEPS, *LAYOUTS[layout]], nproc=2))
    assert sorted(losses) == [1, 2, 3, 4, 5]
    assert abs(losses[1] - reference[1]) < 1e-5, (losses[1], reference[1])
    for step in range(1, 6):
        assert abs(losses[step] - reference[step]) < 1e-3, (step, losses, reference)


def test_interleaved_pipeline_matches(reference, tmp_path):
    """Interleaved 1F1B (PP=2, 2 virtual stages per rank) matches world size 1.

    Guards the gloo p2p ordering fix in model.to_transformer_config (batch_p2p_comm).
    """
    losses = train_losses(pretrain(
        tmp_path, "vpp", [*STEPS, "parallel.ep=1", "parallel.pp=2", "parallel.vpp=2"], nproc=2))
    assert abs(losses[1] - reference[1]) < 1e-5
    for step in range(1, 6):
        assert abs(losses[step] - reference[step]) < 1e-3, (step, losses, reference)


@pytest.mark.parametrize("mode", ["full", "head"])
def test_qk_norm_tp2_matches_world_size_1(mode, reference, tmp_path):
    """q/k norms at TP=2+SP, each rank holding half of the heads.

    full (OLMoE): the norm weights are TP-sharded and the per-token statistic is
    all-reduced over TP. head (Qwen3-MoE, megatron's qk_layernorm): the per-head weights
    are replicated and their gradients summed over TP by finalize_model_grads. Same
    losses and gradient norms as world size 1 (a wrong backward through the all-reduce,
    or a missing / extra TP all-reduce of the norm gradients, would change them).
    """
    qk = [f"model.qk_norm={mode}"]
    ws1 = pretrain(tmp_path, "qk_ws1", [*STEPS, *WS1, *qk], nproc=1)
    tp2 = pretrain(tmp_path, "qk_tp2", [*STEPS, *LAYOUTS["tp2_sp"], *qk], nproc=2)
    want, got = train_losses(ws1), train_losses(tp2)
    # The norms are really there: training departs from the run without them.
    assert max(abs(want[s] - reference[s]) for s in range(1, 6)) > 1e-3, (want, reference)
    assert abs(got[1] - want[1]) < 1e-5, (got[1], want[1])
    grad = {d: {r["step"]: r["train/grad_norm"] for r in read_metrics(d) if "train/loss" in r}
            for d in (ws1, tp2)}
    for step in range(1, 6):
        assert abs(got[step] - want[step]) < 1e-3, (step, got, want)
        assert abs(grad[tp2][step] - grad[ws1][step]) <= 1e-4 * grad[ws1][step], (step, grad)


def test_distributed_optimizer_dp2_matches(reference, tmp_path):
    """The distributed optimizer (state sharded over DP=2, EP=2) trains like world size 1."""
    losses = train_losses(pretrain(
        tmp_path, "distopt", [*STEPS, "parallel.ep=2", "train.distributed_optimizer=true"],
        nproc=2))
    for step in range(1, 6):
        assert abs(losses[step] - reference[step]) < 1e-3, (step, losses, reference)


def test_loss_falls_over_30_steps_and_outputs(tmp_path):
    """The default config (EP=2, alltoall, 2 processes) learns; run outputs are complete."""
    run_dir = pretrain(tmp_path, "learn", ["train.steps=30", "train.eval_interval=15"], nproc=2)
    losses = train_losses(run_dir)
    first, last = sum(losses[s] for s in (1, 2, 3)) / 3, sum(losses[s] for s in (28, 29, 30)) / 3
    assert last < first - 0.5, (first, last)
    records = read_metrics(run_dir)
    tags = set().union(*records)
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_sec",
                "train/mem_gb", "valid/loss", "valid/ppl",
                "moe/load_balancing_loss/layer_0", "moe/load_balancing_loss/layer_3"):
        assert tag in tags, tag
    evals = [r for r in records if "valid/loss" in r]
    assert [r["step"] for r in evals] == [15, 30]
    assert math.isclose(evals[-1]["valid/ppl"], math.exp(evals[-1]["valid/loss"]), rel_tol=1e-6)
    assert (run_dir / "config.yaml").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "valid/ppl", "moe/load_balancing_loss/layer_0"} <= scalars
    tb_loss = [e.value for e in events.Scalars("train/loss")]
    assert len(tb_loss) == 30 and abs(tb_loss[-1] - losses[30]) < 1e-5


def test_an_evaluation_between_logs_changes_no_training_record(tmp_path):
    """Evaluations off the log steps (every 3 steps, logs every 4) leave each training
    record as a run without them logs it: the loss, and the aux losses and router load of
    the steps before the evaluation, which an evaluation used to zero (the next log then
    averaged what was left over all its steps)."""
    common = [*STEPS, *WS1, "train.steps=8", "train.log_interval=4",
              "checkpoint.enabled=false", "logging.tensorboard=false"]
    records = {}
    for name, every in (("evals", 3), ("no_evals", 0)):
        run_dir = pretrain(tmp_path, name, [*common, f"train.eval_interval={every}"], nproc=1)
        records[name] = {r["step"]: r for r in read_metrics(run_dir) if "train/loss" in r}
    assert sorted(records["evals"]) == sorted(records["no_evals"]) == [4, 8]
    for step in (4, 8):
        got, want = records["evals"][step], records["no_evals"][step]
        keys = sorted(k for k in want if k.startswith(("train/loss", "moe/", "router/")))
        assert any(k.startswith("moe/load_balancing_loss/") for k in keys), keys
        assert any(k.startswith("router/max_over_mean_load/") for k in keys), keys
        assert {k: got.get(k) for k in keys} == {k: want[k] for k in keys}, step
