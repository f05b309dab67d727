"""Checkpoints under signals, leftovers of unfinished saves, and `inspect` of damaged ones.

One real torchrun run (2 gloo ranks, the tiny model, a save every 2 steps) is shared by
every test here; each test copies what it changes.

* SLURM delivers the time-limit SIGUSR1 to every process of a job step (launch/pretrain.sh
  forwards it to srun; proctrack signals the whole tree). megatron's torch_dist writer
  keeps its results queue in a spawned ``multiprocessing`` Manager that lives from the
  first save on; a spawned process has no Python handler, so the signal killed it and
  the next save died on both ranks with BrokenPipeError, leaving ``iter_*.tmp``. The run
  here gets SIGUSR1 delivered to torchrun and all its descendants (workers, Manager,
  forked writers) from inside a writer of the step-4 save, the way SLURM would.
* Leftover ``iter_*.tmp`` directories are removed by the next save and at resume; the
  resume prints no ShardedTensor FutureWarning.
* ``megasmoe checkpoint inspect`` (the real command) of a run whose newest checkpoint is
  damaged says so in one line, with the checkpoint a resume would use, exit code 1.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from conftest import BIN, FAST, REPO, run_megasmoe
from megasmoe import checkpoint as ckpt
from megasmoe.checkpoint import store

CONFIG = "configs/tiny-cpu.yaml"
ARGS = [CONFIG, *FAST, "train.steps=200", "checkpoint.interval=2"]

# Runs the real CLI in each torchrun worker, after wrapping megatron's file writer (it
# runs in the processes megatron forks to write a rank's files) so that the first writer
# of rank 0's step-4 save signals every process of the job: torchrun and all of its
# descendants, as SLURM's proctrack does. It records whom it signalled.
HOOK = '''
import os, signal, sys
import psutil
from megatron.core.dist_checkpointing.strategies import filesystem_async as fa

original = fa.FileSystemWriterAsync.write_preloaded_data
RECORD = sys.argv[1]

def hooked(transforms, local_proc_idx, write_bucket, *args, **kwargs):
    if (os.environ.get("RANK") == "0" and local_proc_idx == 0
            and "iter_0000004.tmp" in str(write_bucket[0])):
        launcher = psutil.Process(os.getppid()).parent()  # writer -> worker -> torchrun
        everyone = [launcher, *launcher.children(recursive=True)]
        with open(RECORD, "w") as f:
            for p in everyone:
                f.write(" ".join(p.cmdline()) + "\\n")
        for p in everyone:
            try:
                p.send_signal(signal.SIGUSR1)
            except psutil.NoSuchProcess:
                pass
    return original(transforms, local_proc_idx, write_bucket, *args, **kwargs)

if __name__ == "__main__":  # not when a spawned helper imports this file
    fa.FileSystemWriterAsync.write_preloaded_data = staticmethod(hooked)
    from megasmoe.cli import main
    sys.exit(main(sys.argv[2:]))
'''


def megasmoe_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def signalled(tmp_path_factory) -> dict:
    """The shared run: SIGUSR1 to every process of the job during the step-4 save.

    A leftover ``iter_0000001.tmp`` (as a killed save leaves it) is planted first; the
    run directory is otherwise new, so no resume happens and the first save meets it.
    """
    tmp = tmp_path_factory.mktemp("signalled")
    run_dir = tmp / "run"
    leftover = ckpt.checkpoint_root(run_dir) / "iter_0000001.tmp"
    leftover.mkdir(parents=True)
    (leftover / "__0_0.distcp").write_bytes(b"\0" * 100)
    hook, record = tmp / "hook.py", tmp / "signalled.txt"
    hook.write_text(HOOK)
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node=2",
           # what megasmoe.launch gives torchrun under SLURM
           "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
           "--shutdown-timeout=120",
           str(hook), str(record), "pretrain", *ARGS, f"run.dir={run_dir}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=megasmoe_env())
    return {"run_dir": run_dir, "log": proc.stdout + proc.stderr, "record": record,
            "dirs": sorted(p.name for p in ckpt.checkpoint_root(run_dir).iterdir())}


def test_signal_to_every_process_during_a_save(signalled):
    """The save under way completes, the signal save follows at the next step boundary,
    the workers exit with 75 (no rank fails), and no ``.tmp`` is left (the planted one is
    removed by the first save).

    Before the fix: BrokenPipeError on both ranks in the step-4 save (megatron's results
    queue Manager was killed), ``iter_0000004.tmp`` left, ``latest`` still at step 2.
    """
    log, run_dir = signalled["log"], signalled["run_dir"]
    assert signalled["record"].is_file(), f"the hook never ran:\n{log[-4000:]}"
    whom = signalled["record"].read_text()
    # A synchronous save has no results-queue Manager any more (megasmoe.checkpoint_queue);
    # the Manager of asynchronous saves is signalled in test_results_queue_server_...
    assert "multiprocessing.spawn" not in whom, whom
    assert whom.count(" pretrain ") >= 3, whom  # both workers and rank 0's forked writer
    assert "BrokenPipeError" not in log, log[-6000:]
    assert not re.search(r"\[rank\d\]: Traceback", log), log[-6000:]
    assert "saved step 5, exiting with code 75" in log, log[-6000:]
    root = ckpt.checkpoint_root(run_dir)
    assert signalled["dirs"] == ["iter_0000002", "iter_0000004", "iter_0000005", "latest"], \
        (signalled["dirs"], log[-6000:])
    assert ckpt.read_latest(root) == root / "iter_0000005"
    for step in (2, 4, 5):
        assert ckpt.verify_checkpoint(root / f"iter_{step:07d}") is None
    assert f"removed {root / 'iter_0000001.tmp'}, left by an unfinished save" in log


def copy_run(src: Path, dst: Path, steps: tuple[int, ...]) -> Path:
    """A new run dir holding copies of ``src``'s checkpoints ``steps`` (latest -> the last)."""
    root = ckpt.checkpoint_root(dst)
    root.mkdir(parents=True)
    for step in steps:
        name = f"iter_{step:07d}"
        shutil.copytree(ckpt.checkpoint_root(src) / name, root / name)
    (root / "latest").write_text(f"iter_{steps[-1]:07d}")
    return root


def test_resume_removes_leftovers_and_prints_no_sharded_tensor_warning(signalled, tmp_path):
    """Leftover ``.tmp`` directories (older and newer than latest) are removed when the run
    resumes; the resume's stderr has no "deprecating ShardedTensor" FutureWarning (torch
    printed it once per rank)."""
    run_dir = tmp_path / "run"
    root = copy_run(signalled["run_dir"], run_dir, (4, 5))
    for name in ("iter_0000003.tmp", "iter_0000009.tmp"):
        (root / name).mkdir()
        (root / name / "common.pt").write_bytes(b"x")
    proc = run_megasmoe(["pretrain", *ARGS, f"run.dir={run_dir}", "train.exit_at_step=6",
                         "parallel.world_size=1", "parallel.ep=1"], nproc=1)
    assert f"resumed from {root / 'iter_0000005'} at step 5" in proc.stdout, proc.stdout
    assert "ShardedTensor" not in proc.stderr, proc.stderr[-3000:]
    assert "FutureWarning" not in proc.stderr, proc.stderr[-3000:]
    for name in ("iter_0000003.tmp", "iter_0000009.tmp"):
        assert f"removed {root / name}" in proc.stderr, proc.stderr[-3000:]
    assert sorted(p.name for p in root.iterdir()) == [
        "iter_0000004", "iter_0000005", "iter_0000006", "latest"]


def inspect_cli(path: Path) -> subprocess.CompletedProcess:
    """``megasmoe checkpoint inspect PATH``, the installed console script."""
    return subprocess.run([str(BIN / "megasmoe"), "checkpoint", "inspect", str(path)],
                          cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=megasmoe_env())


def verdict(proc) -> str:
    """The one ``FAIL:`` line of an inspect report (asserting there is exactly one)."""
    assert "Traceback" not in proc.stdout + proc.stderr, (proc.stdout[-3000:],
                                                          proc.stderr[-3000:])
    lines = [line for line in proc.stdout.splitlines() if line.startswith("FAIL:")]
    assert len(lines) == 1, (proc.stdout[-3000:], proc.stderr[-3000:])
    assert "ok: files complete" not in proc.stdout
    return lines[0]


def test_inspect_run_with_truncated_newest_shard(signalled, tmp_path):
    """The newest checkpoint (latest) has a cut shard: inspect of the run names it, the
    file, and the checkpoint a resume would use; exit 1. Before: "ok" about step 4."""
    run_dir = tmp_path / "run"
    root = copy_run(signalled["run_dir"], run_dir, (4, 5))
    shard = sorted((root / "iter_0000005").glob("*.distcp"))[1]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    proc = inspect_cli(run_dir)
    assert proc.returncode == 1, (proc.returncode, proc.stdout[-3000:], proc.stderr[-3000:])
    line = verdict(proc)
    assert line.startswith(f"FAIL: checkpoint {root / 'iter_0000005'} is broken: {shard} "
                           f"has "), line
    assert "(truncated)" in line
    assert line.endswith(f"; a resume would use {root / 'iter_0000004'} instead"), line


def test_inspect_run_with_truncated_newest_metadata(signalled, tmp_path):
    """The newest checkpoint's ``.metadata`` cut in half: one line, no UnpicklingError
    traceback, exit 1. Before: "ok" about step 4 (and a traceback for the directory)."""
    run_dir = tmp_path / "run"
    root = copy_run(signalled["run_dir"], run_dir, (4, 5))
    metadata = root / "iter_0000005" / ".metadata"
    with open(metadata, "r+b") as f:
        f.truncate(metadata.stat().st_size // 2)
    proc = inspect_cli(run_dir)
    assert proc.returncode == 1, (proc.returncode, proc.stdout[-3000:], proc.stderr[-3000:])
    line = verdict(proc)
    assert f"checkpoint {root / 'iter_0000005'} is broken: {metadata} has " in line, line
    assert "(truncated)" in line and "+1 more above" in line, line
    assert f"{metadata} is unreadable (UnpicklingError" in proc.stdout, proc.stdout[-3000:]
    assert line.endswith(f"; a resume would use {root / 'iter_0000004'} instead"), line


def test_corrupt_metadata_of_same_size_is_one_line_and_skipped_by_resume(signalled, tmp_path):
    """``.metadata`` overwritten in place (its size, so the manifest matches): inspect of
    that directory says it is unreadable in one line, exit 1, and a resume skips it.
    Before: an UnpicklingError traceback, and a resume would have loaded it (and died)."""
    run_dir = tmp_path / "run"
    root = copy_run(signalled["run_dir"], run_dir, (4, 5))
    metadata = root / "iter_0000005" / ".metadata"
    metadata.write_bytes(b"\x07" * metadata.stat().st_size)
    proc = inspect_cli(root / "iter_0000005")
    assert proc.returncode == 1, (proc.returncode, proc.stdout[-3000:], proc.stderr[-3000:])
    line = verdict(proc)
    assert line.startswith(f"FAIL: checkpoint {root / 'iter_0000005'} is broken: "
                           f"{metadata} is unreadable (UnpicklingError"), line
    assert line.endswith(f"; a resume would use {root / 'iter_0000004'} instead"), line
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert ckpt.find_resume_checkpoint(root) == root / "iter_0000004"
    assert any(f"{metadata} is unreadable" in str(w.message) for w in caught), caught


def test_remove_leftovers_spares_saves_in_flight(tmp_path):
    """An asynchronous save still being written by this process is not a leftover."""
    root = tmp_path / "checkpoints"
    for name in ("iter_0000010.tmp", "iter_0000020.tmp", "iter_0000030"):
        (root / name).mkdir(parents=True)
    (root / "latest.tmp").write_text("iter_0000030")
    store._IN_FLIGHT.add(str(root / "iter_0000020.tmp"))
    try:
        assert ckpt.remove_leftovers(root) == [root / "iter_0000010.tmp"]
    finally:
        store._IN_FLIGHT.clear()
    assert sorted(p.name for p in root.iterdir()) == [
        "iter_0000020.tmp", "iter_0000030", "latest.tmp"]


# Starts the writer's results queue as a save does, checks that its server survives
# SIGUSR1 and SIGTERM, then dies by SIGKILL: the server must not outlive it.
ORPHAN = """
import os, signal, warnings
warnings.simplefilter("ignore")
if __name__ == "__main__":
    from megatron.core.dist_checkpointing.strategies import filesystem_async as fa
    from megasmoe.checkpoint.saveload import _helpers_ignore_stop_signals
    with _helpers_ignore_stop_signals(async_save=True):  # what an async save does
        queue = fa._get_write_results_queue()   # what megatron's writer does in a save
    server = queue._manager._process.pid
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        os.kill(server, sig)
    queue.put(1)
    assert queue.get() == 1
    print(server, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_results_queue_server_ignores_stop_signals_and_dies_with_its_worker(tmp_path):
    """The Manager behind megatron's writer results queue, as megasmoe starts it: alive
    after SIGUSR1 + SIGTERM, gone (or a zombie) once its worker is SIGKILLed. Before:
    megatron's own Manager died of either signal, and outlived a killed worker."""
    script = tmp_path / "orphan.py"
    script.write_text(ORPHAN)
    proc = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env=megasmoe_env())
    assert proc.returncode == -9, (proc.returncode, proc.stdout, proc.stderr[-3000:])
    server = int(proc.stdout.split()[0])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{server}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return
        if state == "Z":
            return
        time.sleep(0.1)
    os.kill(server, 9)
    raise AssertionError(f"the results queue server {server} outlived its worker")


def test_resaving_a_step_replaces_it_without_a_gap(tmp_path, monkeypatch):
    """Re-saving a published step swapped the directories in two steps (delete, then
    rename): a kill between them left `latest` naming a missing directory. Now the new
    one is in place before anything is deleted: a kill during the deletion (simulated)
    leaves the new checkpoint published."""
    from megasmoe.checkpoint import replace_dir

    final, new = tmp_path / "iter_0000004", tmp_path / "iter_0000004.tmp"
    final.mkdir()
    (final / "old").write_text("old")
    new.mkdir()
    (new / "new").write_text("new")
    real_rmtree = shutil.rmtree

    def killed(path, *a, **k):
        raise KeyboardInterrupt("killed while deleting")

    monkeypatch.setattr(shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        replace_dir(new, final)
    assert sorted(p.name for p in final.iterdir()) == ["new"]
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    real_rmtree(new)  # what the next save's leftover cleanup does
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000004"]
