"""The per-node plan: the srun line, one torchrun per node (or one process per task), the dry run."""

from __future__ import annotations

import dataclasses
import shlex
import sys
from pathlib import Path
from typing import Mapping, Optional, Sequence

from megasmoe.launch.allocation import (Allocation, LaunchError, allocation_from_env,
                                        rendezvous_port)

LAUNCHERS = ("torchrun", "srun")
"""``torchrun``: one torchrun per node; ``srun``: one process per SLURM task."""

FORWARDED_SIGNAL = "SIGUSR1"
"""The signal launch/pretrain.sh forwards to the job step before the time limit."""

STEP_WAIT_S = 120
"""srun --wait: how long the other tasks may run on once one task ended (then srun kills
them). More than the watchdog's MAX_LOST_AFTER_S plus its exit, so that a node's loss is
reported by the survivors' watchdog, not cut short by srun."""

SHUTDOWN_TIMEOUT_S = 600
"""How long torchrun waits for workers to checkpoint after a signal before SIGKILL."""


@dataclasses.dataclass
class NodeCommand:
    """What one node runs: a command, and for the srun launcher one environment per task."""

    node_rank: int
    """Index of the node in the allocation (0 = head)."""
    host: str
    """Host name."""
    argv: list
    """The command (torchrun ... or python -m megasmoe.launch srun-task ...)."""
    tasks: list = dataclasses.field(default_factory=list)
    """srun launcher: per task, the environment srun-task gives ``megasmoe pretrain``."""

    def shell(self) -> str:
        """The command as one shell-quoted line."""
        return shlex.join(self.argv)


@dataclasses.dataclass
class LaunchPlan:
    """A whole job: allocation, the srun command that starts it, per-node commands."""

    allocation: Allocation
    """Where it runs."""
    launcher: str
    """torchrun or srun."""
    srun: list
    """The srun command line launch/pretrain.sh runs (argv)."""
    nodes: list
    """One NodeCommand per node."""
    endpoint: str
    """Rendezvous endpoint host:port (c10d for torchrun, MASTER_ADDR:MASTER_PORT for srun)."""
    env: dict
    """Environment the batch script exports for the step (OMP_NUM_THREADS, ...)."""
    notes: list
    """Warnings worth reading before queueing."""


def srun_extra_args(env: Mapping[str, str]) -> list[str]:
    """``MEGASMOE_SRUN_ARGS`` split like a shell would: extra options for every srun
    megasmoe starts (e.g. pyxis' ``--container-image=... --container-mounts=...``)."""
    return shlex.split(env.get("MEGASMOE_SRUN_ARGS", ""))


def _bin_dir() -> Path:
    return Path(sys.executable).parent


def torchrun_signal_flags() -> tuple[bool, bool]:
    """(torchrun has --signals-to-handle, torchrun has --shutdown-timeout), without importing torch."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("torch")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return False, False
    run_py = Path(list(spec.submodule_search_locations)[0]) / "distributed" / "run.py"
    try:
        text = run_py.read_text()
    except OSError:
        return False, False
    return "--signals-to-handle" in text, "--shutdown-timeout" in text


def _pretrain_args(config: Optional[str], overrides: Sequence[str]) -> list[str]:
    return ["pretrain", *([config] if config else []), *overrides]


def build_plan(config: Optional[str], overrides: Sequence[str], env: Mapping[str, str],
               launcher: Optional[str] = None, nodes: Optional[int] = None,
               nproc_per_node: Optional[int] = None, nodelist: Optional[str] = None,
               job_id: Optional[int] = None, default_nproc: Optional[int] = None) -> LaunchPlan:
    """The full launch plan for ``config`` + ``overrides`` on the allocation in ``env``.

    Does not validate the config (``preflight`` does); ``default_nproc`` is the
    processes per node to assume when neither SLURM nor the caller says.
    """
    launcher = launcher or env.get("MEGASMOE_LAUNCHER") or "torchrun"
    if launcher not in LAUNCHERS:
        raise LaunchError(f"MEGASMOE_LAUNCHER/--launcher='{launcher}' is unknown; "
                          f"use {' or '.join(LAUNCHERS)}")
    alloc = allocation_from_env(env, nodes, nproc_per_node, nodelist, job_id, default_nproc)
    port = rendezvous_port(alloc.job_id)
    endpoint = f"{alloc.head}:{port}"
    bindir = _bin_dir()
    python = str(Path(sys.executable))
    notes: list[str] = []
    n, p = alloc.nodes, alloc.nproc_per_node
    step_env = {"PYTHONUNBUFFERED": "1"}
    if "OMP_NUM_THREADS" not in env:
        threads = max(1, (alloc.cpus_per_node or p) // p)
        step_env["OMP_NUM_THREADS"] = str(threads)
    extra = srun_extra_args(env)
    srun = ["srun", f"--nodes={n}"]
    pretrain = _pretrain_args(config, overrides)
    if launcher == "torchrun":
        torchrun = bindir / "torchrun"
        torchrun = str(torchrun) if torchrun.exists() else "torchrun"
        has_signals, has_shutdown = torchrun_signal_flags()
        argv = [torchrun, f"--nnodes={n}", f"--nproc-per-node={p}",
                "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}",
                f"--rdzv-id={alloc.job_id if alloc.job_id is not None else 'megasmoe'}",
                "--max-restarts=0"]
        if has_signals:
            argv.append(f"--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,{FORWARDED_SIGNAL}")
        else:
            notes.append("this torchrun has no --signals-to-handle: it will not forward SIGUSR1 "
                         "to the workers, so a time-limit signal cannot checkpoint; use "
                         "MEGASMOE_LAUNCHER=srun or a newer torch")
        if has_shutdown:
            argv.append(f"--shutdown-timeout={SHUTDOWN_TIMEOUT_S}")
        argv += ["-m", "megasmoe.cli", *pretrain]
        srun += [f"--ntasks={n}", "--ntasks-per-node=1"]
        if alloc.cpus_per_node:
            srun.append(f"--cpus-per-task={alloc.cpus_per_node}")
        # No --kill-on-bad-exit: when a node is lost, srun would kill the survivors before
        # their watchdog names the lost rank (and the batch script would not know to
        # requeue). --wait bounds the rest: longer than the watchdog's longest wait.
        srun += [f"--wait={STEP_WAIT_S}", *extra, *argv]
        node_cmds = [NodeCommand(i, h, list(argv)) for i, h in enumerate(alloc.hosts)]
    else:
        argv = [python, "-m", "megasmoe.launch", "srun-task", f"--master-addr={alloc.head}",
                f"--master-port={port}", *([config] if config else []), *overrides]
        srun += [f"--ntasks={n * p}", f"--ntasks-per-node={p}"]
        if alloc.cpus_per_node and alloc.cpus_per_node // p >= 1:
            srun.append(f"--cpus-per-task={alloc.cpus_per_node // p}")
        # No --kill-on-bad-exit: every rank exits 75 after a signal-checkpoint and rank 0
        # may still be publishing it; --wait bounds a hang after one rank crashed.
        srun += [f"--wait={STEP_WAIT_S}", *extra, *argv]
        node_cmds = []
        for i, h in enumerate(alloc.hosts):
            tasks = [srun_task_env({"SLURM_PROCID": str(i * p + j), "SLURM_LOCALID": str(j),
                                    "SLURM_NTASKS": str(n * p), "SLURM_NODEID": str(i),
                                    "SLURM_NNODES": str(n)}, alloc.head, port)
                     for j in range(p)]
            node_cmds.append(NodeCommand(i, h, list(argv), tasks))
    return LaunchPlan(alloc, launcher, srun, node_cmds, endpoint, step_env, notes)


def plan(config: Optional[str], overrides: Sequence[str], env: Mapping[str, str],
         **kwargs) -> list[NodeCommand]:
    """The per-node commands a job runs for ``config`` + ``overrides`` on the allocation
    described by ``env`` (SLURM_* variables; keyword arguments as in ``build_plan``)."""
    return build_plan(config, overrides, env, **kwargs).nodes


def format_plan(lp: LaunchPlan) -> str:
    """The human-readable dry run: allocation, srun line, per-node (and per-task) commands."""
    a = lp.allocation
    where = f"SLURM job {a.job_id}" if a.in_slurm else "hypothetical allocation"
    lines = [
        f"# {where}: {a.describe()} (processes per node from {a.source})",
        f"# launcher: {lp.launcher}; rendezvous: "
        + (f"c10d at {lp.endpoint}" if lp.launcher == "torchrun"
           else f"MASTER_ADDR:MASTER_PORT = {lp.endpoint}")
        + "; backend: nccl on CUDA nodes, gloo otherwise",
    ]
    if a.gpus_per_node:
        lines.append(f"# GPUs per node: {a.gpus_per_node}")
    for note in lp.notes:
        lines.append(f"# note: {note}")
    lines.append("# the batch script runs (after the pre-flight checks):")
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in lp.env.items())
    lines.append(f"{env} {shlex.join(lp.srun)}".strip())
    for node in lp.nodes:
        lines.append(f"# node {node.node_rank} ({node.host}):")
        if lp.launcher == "torchrun":
            lines.append(node.shell())
        else:
            # What srun-task execs, with the environment it sets for each task.
            cmd = shlex.join([str(Path(sys.executable)), "-m", "megasmoe.cli", "pretrain",
                              *node.argv[node.argv.index("srun-task") + 3:]])
            for task in node.tasks:
                tenv = " ".join(f"{k}={v}" for k, v in task.items())
                lines.append(f"{tenv} {cmd}")
    return "\n".join(lines)


def srun_task_env(env: Mapping[str, str], master_addr: str, master_port: int) -> dict:
    """torch.distributed's env:// variables for one SLURM task (srun launcher).

    RANK = SLURM_PROCID, WORLD_SIZE = SLURM_NTASKS, LOCAL_RANK = SLURM_LOCALID,
    NODE_RANK = SLURM_NODEID, MASTER_ADDR / MASTER_PORT = the head node and the job's port.
    """
    ntasks = int(env["SLURM_NTASKS"])
    nnodes = int(env.get("SLURM_NNODES") or env.get("SLURM_JOB_NUM_NODES") or 1)
    return {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": str(ntasks),
        "LOCAL_RANK": env["SLURM_LOCALID"],
        "LOCAL_WORLD_SIZE": str(max(1, ntasks // nnodes)),
        "NODE_RANK": env.get("SLURM_NODEID", "0"),
        "MASTER_ADDR": master_addr,
        "MASTER_PORT": str(master_port),
    }
