"""Distributed checkpoints: exact resume, resume on another parallel layout, crash safety.

Real torchrun (gloo, CPU) runs of the tiny model, 20 steps with per-step losses in
metrics.jsonl. The uninterrupted reference runs are module-scoped and shared:

* an interrupted run (exit_at_step, kill -9, SIGTERM) resumed on the same layout must
  reproduce the reference losses bitwise, with every step logged exactly once;
* a checkpoint saved at EP=2 resumes at world size 1, TP=2+SP, PP=2, PP=2+VPP=2, one
  saved at TP=2+SP+PP=2 at world size 1 (and the distributed optimizer at another
  layout) with the same next-step loss (1e-5);
* an incomplete newest checkpoint (truncated file, half-written ``.tmp``) is skipped
  for the newest complete one, with a warning naming both;
* every expert of an EP=2 checkpoint is stored once, under its global id.

Plus cheap unit tests of verify / find_resume / prune on fabricated directories.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from conftest import BIN, FAST, REPO, free_port, read_metrics, run_megasmoe, train_losses
from megasmoe import checkpoint as ckpt
from megasmoe.checkpoint.inspection import _flatten

CONFIG = "configs/tiny-cpu.yaml"
STEPS = ["train.steps=20"]
WS1 = ["parallel.world_size=1", "parallel.ep=1"]
LAYOUTS = {
    "dp2": ["parallel.ep=1"],
    "ep2": ["parallel.ep=2"],
}


def pretrain_args(run_dir: Path, *overrides: str) -> list[str]:
    return ["pretrain", CONFIG, *FAST, *STEPS, f"run.dir={run_dir}", *overrides]


def train_steps(run_dir: Path) -> list[int]:
    """The steps of metrics.jsonl's train records, in file order."""
    return [r["step"] for r in read_metrics(run_dir) if "train/loss" in r]


def train_records(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run_dir) if "train/loss" in r}


def latest_name(run_dir: Path) -> str:
    return (ckpt.checkpoint_root(run_dir) / "latest").read_text().strip()


def output(proc) -> str:
    return proc.stdout + proc.stderr


def seed_run_dir(run_dir: Path, src_ckpt: Path) -> Path:
    """A fresh run dir whose only checkpoint is a copy of ``src_ckpt`` (latest -> it)."""
    root = ckpt.checkpoint_root(run_dir)
    root.mkdir(parents=True)
    dst = root / src_ckpt.name
    shutil.copytree(src_ckpt, dst)
    (root / "latest").write_text(src_ckpt.name)
    return dst


def run_direct(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m megasmoe.cli ARGS`` in one process, no torchrun: its own exit code."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port())}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
        env.pop(key, None)
    return subprocess.run([sys.executable, "-m", "megasmoe.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, env=env)


def start_torchrun(args: list[str], nproc: int, log: Path) -> subprocess.Popen:
    cmd = [str(BIN / "torchrun"), "--standalone", f"--nproc-per-node={nproc}",
           "-m", "megasmoe.cli", *args]
    out = open(log, "w")
    try:
        return subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": "1"},
                                start_new_session=True)
    finally:
        out.close()


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, log: Path,
                  timeout: float = 300) -> int:
    """Poll metrics.jsonl until a train step >= ``step`` is logged; returns the newest."""
    path = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"run ended (rc={proc.returncode}) before step {step}:\n"
                                 f"{log.read_text()[-5000:]}")
        newest = 0
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:  # a line being written
                    continue
                if "train/loss" in rec:
                    newest = max(newest, rec["step"])
        if newest >= step:
            return newest
        time.sleep(0.02)
    raise AssertionError(f"no step {step} within {timeout}s:\n{log.read_text()[-5000:]}")


def workers_of(proc: subprocess.Popen) -> list[psutil.Process]:
    """The megasmoe worker processes torchrun started (each in its own session)."""
    kids = psutil.Process(proc.pid).children(recursive=True)
    return [p for p in kids if any("megasmoe" in a for a in p.cmdline())]


def kill_everything(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and all its descendants (workers run in sessions of their own)."""
    try:
        procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)
    proc.wait(timeout=30)


# ------------------------------------------------------------------ shared reference runs


@pytest.fixture(scope="module")
def ref_ep2(tmp_path_factory) -> Path:
    """Uninterrupted EP=2 run, 20 steps, checkpoints at 10, 15, 20."""
    run_dir = tmp_path_factory.mktemp("ref") / "ep2"
    run_megasmoe(pretrain_args(run_dir, *LAYOUTS["ep2"], "checkpoint.interval=5"), nproc=2)
    return run_dir


@pytest.fixture(scope="module")
def ref_dp2(tmp_path_factory) -> Path:
    """Uninterrupted DP=2 (EP=1: every rank holds all experts) run, 20 steps, saves 10, 20."""
    run_dir = tmp_path_factory.mktemp("ref") / "dp2"
    run_megasmoe(pretrain_args(run_dir, *LAYOUTS["dp2"], "checkpoint.interval=10"), nproc=2)
    return run_dir


REFS = {"dp2": "ref_dp2", "ep2": "ref_ep2"}


# ------------------------------------------------------------------ exact resume


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_exact_resume_is_bitwise(layout, request, tmp_path):
    """10 steps, exit, resume to 20 == 20 uninterrupted steps, bit for bit."""
    ref = request.getfixturevalue(REFS[layout])
    run_dir = tmp_path / "run"
    args = pretrain_args(run_dir, *LAYOUTS[layout])

    run_megasmoe([*args, "train.exit_at_step=10"], nproc=2)
    assert train_steps(run_dir) == list(range(1, 11))
    assert latest_name(run_dir) == "iter_0000010"
    meta = ckpt.read_meta(ckpt.checkpoint_root(run_dir) / "iter_0000010")
    assert meta["step"] == 10 and meta["consumed_samples"] == 80  # 10 x global batch 8

    second = run_megasmoe(args, nproc=2)
    assert f"resumed from {ckpt.checkpoint_root(run_dir) / 'iter_0000010'} at step 10" in \
        second.stdout, second.stdout
    assert train_steps(run_dir) == list(range(1, 21))  # every step once, in order

    got, want = train_records(run_dir), train_records(ref)
    for step in range(1, 21):
        assert got[step]["train/loss"] == want[step]["train/loss"], (step, got[step], want[step])
        assert got[step]["train/lr"] == want[step]["train/lr"], step
        assert got[step]["train/grad_norm"] == want[step]["train/grad_norm"], step
        assert got[step]["train/consumed_samples"] == want[step]["train/consumed_samples"]
    assert latest_name(run_dir) == "iter_0000020"


# ------------------------------------------------------------------ crash safety


def test_kill_9_between_saves_resumes_from_last_save(ref_ep2, tmp_path):
    """SIGKILL of torchrun and its workers at step >= 12 (saves every 5): resume from 10."""
    run_dir = tmp_path / "run"
    args = pretrain_args(run_dir, *LAYOUTS["ep2"], "checkpoint.interval=5")
    log = tmp_path / "killed.log"
    proc = start_torchrun(args, nproc=2, log=log)
    try:
        killed_at = wait_for_step(proc, run_dir, 12, log)
        workers = workers_of(proc)
        assert len(workers) == 2, [p.cmdline() for p in workers]
    finally:
        kill_everything(proc)
    assert 12 <= killed_at < 15, f"killed too late ({killed_at}) to test resume from 10"
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in workers)
    assert latest_name(run_dir) == "iter_0000010"
    assert max(train_steps(run_dir)) >= 12  # steps after the checkpoint were logged

    resumed = run_megasmoe(args, nproc=2)
    assert f"resumed from {ckpt.checkpoint_root(run_dir) / 'iter_0000010'} at step 10" in \
        resumed.stdout, resumed.stdout
    assert train_steps(run_dir) == list(range(1, 21))  # none repeated, none missing
    got, want = train_losses(run_dir), train_losses(ref_ep2)
    for step in range(1, 21):
        assert got[step] == want[step], (step, got[step], want[step])


def test_truncated_latest_checkpoint_falls_back(ref_ep2, tmp_path):
    """latest -> iter_20 with a truncated .distcp (killed mid-save): resume from iter_10.

    A half-written iter_0000030.tmp next to it is ignored.
    """
    run_dir = tmp_path / "run"
    root = ckpt.checkpoint_root(run_dir)
    src = ckpt.checkpoint_root(ref_ep2)
    root.mkdir(parents=True)
    for name in ("iter_0000010", "iter_0000020"):
        shutil.copytree(src / name, root / name)
    (root / "latest").write_text("iter_0000020")
    shutil.copy(ref_ep2 / "metrics.jsonl", run_dir / "metrics.jsonl")
    shard = sorted((root / "iter_0000020").glob("*.distcp"))[1]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    half = root / "iter_0000030.tmp"
    half.mkdir()
    shutil.copy(src / "iter_0000020" / "common.pt", half / "common.pt")
    with open(half / "__0_0.distcp", "wb") as f:
        f.write(b"\0" * 1000)

    proc = run_megasmoe(pretrain_args(run_dir, *LAYOUTS["ep2"], "train.exit_at_step=11"),
                        nproc=2)
    text = output(proc)
    warning = [line for line in text.splitlines() if "incomplete or corrupt" in line]
    assert warning, text[-4000:]
    assert str(root / "iter_0000020") in warning[0] and str(root / "iter_0000010") in warning[0]
    assert f"skipping checkpoint {root / 'iter_0000020'}" in text and "truncated" in text
    assert f"resumed from {root / 'iter_0000010'} at step 10" in proc.stdout
    assert "iter_0000030" not in proc.stdout
    # Steps 11..20 of the copied metrics were dropped; the first step after resume is 11.
    assert train_steps(run_dir) == list(range(1, 12))
    assert train_losses(run_dir)[11] == train_losses(ref_ep2)[11]
    assert latest_name(run_dir) == "iter_0000011"


# ------------------------------------------------------------------ resharding


RESHARD = {
    "ws1": (WS1, 1),
    "tp2_sp": (["parallel.ep=1", "parallel.tp=2", "parallel.sp=true"], 2),
    "pp2": (["parallel.ep=1", "parallel.pp=2"], 2),
    # Interleaved pipeline: the model is a list of chunks stored as model0/model1.
    "pp2_vpp2": (["parallel.ep=1", "parallel.pp=2", "parallel.vpp=2"], 2),
}


@pytest.mark.parametrize("layout", sorted(RESHARD))
def test_resume_on_another_layout(layout, ref_ep2, tmp_path):
    """EP=2's step-10 checkpoint at world size 1 / TP=2+SP / PP=2 / PP=2+VPP: same loss.

    Step 12 (after one optimizer step with the loaded Adam state) within 1e-3.
    """
    overrides, nproc = RESHARD[layout]
    run_dir = tmp_path / "run"
    seed_run_dir(run_dir, ckpt.checkpoint_root(ref_ep2) / "iter_0000010")
    proc = run_megasmoe(pretrain_args(run_dir, *overrides, "train.exit_at_step=12"),
                        nproc=nproc)
    assert "at step 10" in proc.stdout and "new parallel layout, RNG re-seeded" in proc.stdout
    losses, want = train_losses(run_dir), train_losses(ref_ep2)
    assert sorted(losses) == [11, 12]
    assert abs(losses[11] - want[11]) < 1e-5, (layout, losses[11], want[11])
    assert abs(losses[12] - want[12]) < 1e-3, (layout, losses[12], want[12])
    meta = ckpt.read_meta(ckpt.checkpoint_root(run_dir) / "iter_0000012")
    assert meta["step"] == 12 and meta["consumed_samples"] == 96
    assert meta["layout"]["ep"] == 1 and meta["layout"]["world_size"] == nproc


@pytest.fixture(scope="module")
def tp2_pp2_src(tmp_path_factory) -> Path:
    """TP=2+SP and PP=2 (4 processes): checkpoint at step 10, losses up to 12."""
    run_dir = tmp_path_factory.mktemp("tp2pp2") / "src"
    run_megasmoe(pretrain_args(run_dir, "parallel.world_size=4", "parallel.ep=1",
                               "parallel.tp=2", "parallel.sp=true", "parallel.pp=2",
                               "checkpoint.interval=10", "train.exit_at_step=12"), nproc=4)
    return run_dir


def test_tp2_pp2_checkpoint_resumes_at_world_size_1(tp2_pp2_src, tmp_path):
    """TP=2 -> TP=1 and PP=2 -> PP=1 at once: the same step-11 loss as the saving run."""
    run_dir = tmp_path / "run"
    seed_run_dir(run_dir, ckpt.checkpoint_root(tp2_pp2_src) / "iter_0000010")
    proc = run_megasmoe(pretrain_args(run_dir, *WS1, "train.exit_at_step=12"), nproc=1)
    assert "at step 10" in proc.stdout and "new parallel layout, RNG re-seeded" in proc.stdout
    losses, want = train_losses(run_dir), train_losses(tp2_pp2_src)
    assert sorted(losses) == [11, 12]
    assert abs(losses[11] - want[11]) < 1e-5, (losses[11], want[11])
    assert abs(losses[12] - want[12]) < 1e-3, (losses[12], want[12])


DISTOPT = "train.distributed_optimizer=true"


@pytest.fixture(scope="module")
def distopt_src(tmp_path_factory) -> Path:
    """EP=2 with the distributed optimizer: checkpoint at step 10, losses up to 12."""
    run_dir = tmp_path_factory.mktemp("distopt") / "src"
    run_megasmoe(pretrain_args(run_dir, "parallel.ep=2", DISTOPT, "checkpoint.interval=10",
                               "train.exit_at_step=12"), nproc=2)
    return run_dir


def test_distributed_optimizer_exact_resume(distopt_src, tmp_path):
    """Distributed optimizer, same layout (EP=2): steps 11 and 12 bitwise after resume."""
    run_dir = tmp_path / "run"
    seed_run_dir(run_dir, ckpt.checkpoint_root(distopt_src) / "iter_0000010")
    proc = run_megasmoe(pretrain_args(run_dir, "parallel.ep=2", DISTOPT,
                                      "train.exit_at_step=12"), nproc=2)
    assert "at step 10" in proc.stdout and "new parallel layout" not in proc.stdout
    losses, want = train_losses(run_dir), train_losses(distopt_src)
    assert sorted(losses) == [11, 12]
    assert losses[11] == want[11] and losses[12] == want[12], (losses, want)


def test_distributed_optimizer_resume_on_another_layout(distopt_src, tmp_path):
    """Distributed optimizer saved at EP=2, resumed at DP=2 EP=1: same step-11 loss."""
    run_dir = tmp_path / "run"
    seed_run_dir(run_dir, ckpt.checkpoint_root(distopt_src) / "iter_0000010")
    proc = run_megasmoe(pretrain_args(run_dir, "parallel.ep=1", DISTOPT,
                                      "train.exit_at_step=12"), nproc=2)
    assert "at step 10" in proc.stdout and "new parallel layout" in proc.stdout
    losses, want = train_losses(run_dir), train_losses(distopt_src)
    assert sorted(losses) == [11, 12]
    assert abs(losses[11] - want[11]) < 1e-5, (losses[11], want[11])
    assert abs(losses[12] - want[12]) < 1e-3, (losses[12], want[12])


def resume_config(*overrides: str):
    from megasmoe.config import load_config, validate

    return validate(load_config(REPO / CONFIG, [*FAST, *STEPS, *overrides]))


def test_switching_from_distributed_optimizer_is_refused(distopt_src):
    """The compatibility check in-process (the CLI path is tested the other way round)."""
    saved = ckpt.checkpoint_root(distopt_src) / "iter_0000010"
    meta = ckpt.read_meta(saved)
    assert meta["layout"]["distributed_optimizer"] is True
    ckpt.check_compatible(meta, resume_config(*WS1, DISTOPT), saved)  # layout may change
    with pytest.raises(ckpt.CheckpointError, match="train.distributed_optimizer=true") as e:
        ckpt.check_compatible(meta, resume_config(*WS1), saved)
    assert str(saved) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ckpt.CheckpointError, match="moe.ffn_hidden_size 256 -> 128"):
        ckpt.check_compatible(meta, resume_config(DISTOPT, "moe.ffn_hidden_size=128"), saved)


def assert_checkpoint_error(proc, fields: list[str]) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-4000:])
    lines = [line for line in proc.stderr.splitlines() if "checkpoint error" in line]
    assert len(lines) == 1 and lines[0].startswith("megasmoe: checkpoint error:"), proc.stderr
    for field in fields:
        assert field in lines[0], (field, lines[0])
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]


def test_switching_to_distributed_optimizer_is_refused(ref_ep2, tmp_path):
    run_dir = tmp_path / "run"
    seed_run_dir(run_dir, ckpt.checkpoint_root(ref_ep2) / "iter_0000010")
    proc = run_direct(pretrain_args(run_dir, *WS1, "train.distributed_optimizer=true"))
    assert_checkpoint_error(proc, ["train.distributed_optimizer"])
    assert not (ckpt.checkpoint_root(run_dir) / "iter_0000011").exists()


def test_changed_model_shape_is_refused(ref_ep2, tmp_path):
    run_dir = tmp_path / "run"
    seed_run_dir(run_dir, ckpt.checkpoint_root(ref_ep2) / "iter_0000010")
    proc = run_direct(pretrain_args(run_dir, *WS1, "model.hidden_size=64",
                                    "moe.num_experts=4"))
    assert_checkpoint_error(proc, ["model.hidden_size", "moe.num_experts"])
    assert "train.distributed_optimizer" not in proc.stderr


# ------------------------------------------------------------------ expert identity


def test_rerunning_a_finished_run_says_so_and_changes_nothing(ref_ep2, tmp_path):
    """The README command run twice: the second finds step 20 of 20 and says how to go
    on, instead of announcing 20 steps and training none."""
    run_dir = tmp_path / "run"
    seed_run_dir(run_dir, ckpt.checkpoint_root(ref_ep2) / "iter_0000020")
    proc = run_direct(pretrain_args(run_dir, *WS1))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "is already at step 20 of train.steps=20: nothing to train" in proc.stdout
    assert "for 20 steps" not in proc.stdout
    assert [s for s, _ in ckpt.list_checkpoints(ckpt.checkpoint_root(run_dir))] == [20]


def test_changed_router_is_refused_once(ref_ep2, tmp_path):
    """A topk checkpoint resumed with another router's tensors: one line (from rank 0 of
    the two), naming the missing router tensors and the router change."""
    run_dir = tmp_path / "run"
    seed_run_dir(run_dir, ckpt.checkpoint_root(ref_ep2) / "iter_0000010")
    proc = run_megasmoe(pretrain_args(run_dir, "parallel.ep=2", "moe.router.name=hyper"),
                        nproc=2, check=False)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if "checkpoint error" in line]
    assert len(lines) == 1, proc.stderr[-4000:]
    assert lines[0].startswith("megasmoe: checkpoint error: ")
    assert "lacks decoder.layers.mlp.router.embedding" in lines[0]
    assert "moe.router.name 'topk' -> 'hyper'" in lines[0]
    # No worker traceback (torchrun's own ChildFailedError report is the one allowed).
    assert proc.stderr.count("Traceback (most recent call last)") <= 1, proc.stderr[-4000:]
    assert not (ckpt.checkpoint_root(run_dir) / "iter_0000011").exists()


def _expert_weights(tensors: dict) -> dict[str, torch.Tensor]:
    """{name: [layers, experts, ...]} of the expert fc1/fc2 weights of a full checkpoint."""
    found = {}
    for key, value in _flatten(tensors):
        if key.startswith("optimizer") or not torch.is_tensor(value):
            continue
        for name in ("linear_fc1.weight", "linear_fc2.weight"):
            if key.endswith(f"mlp.experts.experts.{name}"):
                found[name] = value
    return found


def test_experts_stored_once_with_global_ids(ref_ep2, ref_dp2):
    """EP=2 and EP=1 checkpoints at step 10 hold the same expert g, for every g.

    EP=1 (DP=2) keeps all experts on every rank, so its checkpoint names each expert by
    its global id without any expert-parallel offset; it trains like EP=2.
    """
    ep2 = _expert_weights(ckpt.load_full_tensors(
        ckpt.checkpoint_root(ref_ep2) / "iter_0000010"))
    ep1 = _expert_weights(ckpt.load_full_tensors(
        ckpt.checkpoint_root(ref_dp2) / "iter_0000010"))
    assert sorted(ep2) == ["linear_fc1.weight", "linear_fc2.weight"], sorted(ep2)
    for name in ep2:
        a, b = ep2[name], ep1[name]
        assert a.shape == b.shape and a.shape[:2] == (4, 8), (name, a.shape, b.shape)
        for layer in range(a.shape[0]):
            for g in range(a.shape[1]):
                diff = (a[layer, g] - b[layer, g]).abs().max().item()
                assert diff < 1e-5, (name, layer, g, diff)
                for h in range(g):
                    assert not torch.equal(a[layer, g], a[layer, h]), (name, layer, g, h)
    assert ckpt.expert_layout_problems(ckpt.checkpoint_root(ref_ep2) / "iter_0000010") == []


def test_inspect_good_checkpoint(ref_ep2):
    proc = run_direct(["checkpoint", "inspect", str(ref_ep2)])
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    assert "ok:" in proc.stdout
    assert f"checkpoint {ckpt.checkpoint_root(ref_ep2) / 'iter_0000020'}" in proc.stdout
    assert "step 20" in proc.stdout and "ep=2" in proc.stdout
    assert "decoder.layers.mlp.experts.experts.linear_fc1.weight: [4, 8, 512, 128]" in \
        proc.stdout


@pytest.fixture
def truncated_checkpoint(ref_ep2, tmp_path) -> tuple[Path, Path]:
    """A copy of ref_ep2's iter_0000020 with one .distcp cut in half: (dir, shard)."""
    bad = tmp_path / "iter_0000020"
    shutil.copytree(ckpt.checkpoint_root(ref_ep2) / "iter_0000020", bad)
    shard = sorted(bad.glob("*.distcp"))[0]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    return bad, shard


def test_inspect_reports_truncated_file_without_value_scan(truncated_checkpoint):
    bad, shard = truncated_checkpoint
    report = ckpt.inspect_checkpoint(bad, check_values=False)
    assert any(str(shard) in p and "truncated" in p for p in report["problems"]), report
    text = ckpt.format_inspection(report)
    assert "PROBLEMS:" in text and "ok:" not in text


def test_inspect_truncated_checkpoint(truncated_checkpoint):
    """``megasmoe checkpoint inspect`` of a truncated checkpoint: a report, exit code 1."""
    bad, shard = truncated_checkpoint
    proc = run_direct(["checkpoint", "inspect", str(bad)])
    assert proc.returncode == 1, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    assert "PROBLEMS:" in proc.stdout and f"{shard} has" in proc.stdout, \
        (proc.stdout[-2000:], proc.stderr[-3000:])
    assert "truncated" in proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


# ------------------------------------------------------------------ SIGTERM


def test_sigterm_saves_at_step_boundary_and_exits_75(tmp_path):
    run_dir = tmp_path / "run"
    args = ["pretrain", CONFIG, *FAST, "train.steps=200", f"run.dir={run_dir}"]
    log = tmp_path / "sigterm.log"
    proc = start_torchrun(args, nproc=2, log=log)
    try:
        wait_for_step(proc, run_dir, 3, log)
        workers = workers_of(proc)
        assert len(workers) == 2, [p.cmdline() for p in workers]
        for p in workers:
            p.send_signal(signal.SIGTERM)
        proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            kill_everything(proc)
    text = log.read_text()
    assert proc.returncode != 0, text[-3000:]
    assert "exiting with code 75" in text, text[-5000:]
    assert "exitcode  : 75" in text, text[-5000:]
    last = max(train_steps(run_dir))
    assert last >= 3
    assert f"saved step {last}," in text, text[-5000:]
    root = ckpt.checkpoint_root(run_dir)
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [last]
    assert latest_name(run_dir) == f"iter_{last:07d}"
    assert ckpt.verify_checkpoint(root / f"iter_{last:07d}") is None
    assert ckpt.read_meta(root / f"iter_{last:07d}")["step"] == last
    assert not list(root.glob("*.tmp"))

    resumed = run_megasmoe([*args, f"train.exit_at_step={last + 1}"], nproc=2)
    assert f"resumed from {root / f'iter_{last:07d}'} at step {last}" in resumed.stdout
    assert train_steps(run_dir) == list(range(1, last + 2))


# ------------------------------------------------------------------ unit: fabricated dirs


def fake_checkpoint(root: Path, step: int, permanent: bool = False) -> Path:
    """A final-named checkpoint dir with two data files and a matching megasmoe.json.

    Its ``.metadata`` is a real (empty) torch_dist index: verify_checkpoint reads it.
    """
    import pickle

    from torch.distributed.checkpoint.metadata import Metadata

    d = ckpt.iteration_dir(root, step)
    d.mkdir(parents=True)
    (d / "__0_0.distcp").write_bytes(b"x" * (100 + step))
    index = pickle.dumps(Metadata(state_dict_metadata={}))
    (d / ".metadata").write_bytes(index)
    manifest = {"__0_0.distcp": 100 + step, ".metadata": len(index)}
    (d / ckpt.META_FILE).write_text(json.dumps(
        {"step": step, "permanent": permanent, "manifest": manifest}))
    return d


def set_latest(root: Path, step: int) -> None:
    (root / "latest").write_text(f"iter_{step:07d}\n")


def test_verify_checkpoint(tmp_path):
    d = fake_checkpoint(tmp_path, 10)
    assert ckpt.verify_checkpoint(d) is None
    (d / "__0_0.distcp").write_bytes(b"x" * 50)
    assert "truncated" in ckpt.verify_checkpoint(d)
    (d / "__0_0.distcp").unlink()
    assert "missing" in ckpt.verify_checkpoint(d)
    e = fake_checkpoint(tmp_path, 20)
    (e / ckpt.META_FILE).unlink()
    assert ckpt.META_FILE in ckpt.verify_checkpoint(e)
    # Damaged in place (same size, so the manifest matches): unreadable, in one line.
    f = fake_checkpoint(tmp_path, 30)
    (f / ".metadata").write_bytes(b"m" * (f / ".metadata").stat().st_size)
    problem = ckpt.verify_checkpoint(f)
    assert problem.startswith(f"{f / '.metadata'} is unreadable (UnpicklingError") and \
        "\n" not in problem, problem


def test_find_resume_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    assert ckpt.find_resume_checkpoint(root) is None  # nothing yet
    for step in (10, 20, 30):
        fake_checkpoint(root, step)
    set_latest(root, 30)
    assert ckpt.find_resume_checkpoint(root) == root / "iter_0000030"

    # A half-written save and a finished directory whose latest was never moved.
    (root / "iter_0000040.tmp").mkdir()
    (root / "iter_0000040.tmp" / "__0_0.distcp").write_bytes(b"x")
    fake_checkpoint(root, 50)
    assert ckpt.find_resume_checkpoint(root) == root / "iter_0000030"

    # latest is truncated: the newest complete older one, with a warning naming both.
    (root / "iter_0000030" / "__0_0.distcp").write_bytes(b"")
    with pytest.warns(UserWarning) as caught:
        assert ckpt.find_resume_checkpoint(root) == root / "iter_0000020"
    texts = [str(w.message) for w in caught]
    assert any(str(root / "iter_0000030") in t and str(root / "iter_0000020") in t
               for t in texts), texts

    # A named step: that one, or an error listing the steps there are.
    assert ckpt.find_resume_checkpoint(root, step=10) == root / "iter_0000010"
    with pytest.raises(ckpt.CheckpointError, match="resume_step=30"):
        ckpt.find_resume_checkpoint(root, step=30)
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        ckpt.find_resume_checkpoint(root, step=70)

    # No latest marker (lost): the newest complete directory.
    (root / "latest").unlink()
    assert ckpt.find_resume_checkpoint(root) == root / "iter_0000050"

    # Nothing complete at all.
    other = tmp_path / "broken"
    fake_checkpoint(other, 10)
    (other / "iter_0000010" / ckpt.META_FILE).unlink()
    set_latest(other, 10)
    with pytest.warns(UserWarning):
        assert ckpt.find_resume_checkpoint(other) is None


def test_prune_checkpoints(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (10, 20, 30, 40, 50, 60):
        fake_checkpoint(root, step, permanent=step == 30)
    (root / "iter_0000020" / "KEEP").touch()
    set_latest(root, 10)  # e.g. resume_step=10 was published again: never pruned
    assert ckpt.prune_checkpoints(root, keep_last=0) == []
    removed = ckpt.prune_checkpoints(root, keep_last=2)
    assert removed == [root / "iter_0000040"]
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [10, 20, 30, 50, 60]
    set_latest(root, 60)
    assert ckpt.prune_checkpoints(root, keep_last=1) == [root / "iter_0000010",
                                                         root / "iter_0000050"]
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [20, 30, 60]


def test_launch_script_refuses_a_changed_shape_before_torchrun(ref_ep2, tmp_path):
    """launch/pretrain.sh checks the checkpoint it would resume from before starting
    torchrun: one line, exit 2, no torchrun report."""
    run_dir = tmp_path / "run"
    seed_run_dir(run_dir, ckpt.checkpoint_root(ref_ep2) / "iter_0000010")
    env = {k: v for k, v in os.environ.items() if k not in ("SLURM_JOB_ID", "RANK")}
    proc = subprocess.run(["bash", "launch/pretrain.sh", CONFIG, *FAST, *STEPS,
                           f"run.dir={run_dir}", "model.hidden_size=64"],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert_checkpoint_error(proc, ["model.hidden_size 128 -> 64"])
    assert "ChildFailedError" not in proc.stderr and "torchrun" not in proc.stderr
