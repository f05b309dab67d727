"""Launching on SLURM: the per-node plan, pre-flight checks, and helpers for launch/pretrain.sh.

    python -m megasmoe.launch --dry-run CONFIG [key=value ...]      what a job would run, per node
    python -m megasmoe.launch --dry-run --nodes 2 --nproc-per-node 8 CONFIG ...   (hypothetical)
    python -m megasmoe.launch preflight CONFIG [key=value ...]      checks; exit 2 on a problem
    python -m megasmoe.launch run-dir CONFIG [key=value ...]        print the run directory

Options go before CONFIG (default: the repository's configs/tiny-cpu.yaml, as for
launch/pretrain.sh). Inside an allocation the plan follows SLURM's environment:
nodes from ``SLURM_JOB_NUM_NODES``, hosts from ``SLURM_JOB_NODELIST`` (the first is the
head: rendezvous host), processes per node from the tasks per node
(``SLURM_TASKS_PER_NODE``: one SLURM task per training process, like one per GPU), the
rendezvous port from the job id. ``--nodes``, ``--nproc-per-node``, ``--nodelist`` and
``--job-id`` describe a hypothetical allocation instead.

Two launchers (``--launcher`` or ``MEGASMOE_LAUNCHER``):

``torchrun`` (default)
    one ``torchrun`` per node (``srun --ntasks-per-node=1``), c10d rendezvous on the head
    node; torchrun is told to forward SIGUSR1 to its workers (``--signals-to-handle``),
    which it does not do by default.
``srun``
    one process per SLURM task: ``srun`` starts ``python -m megasmoe.launch srun-task``,
    which sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT from
    SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID and the head node and then execs
    ``python -m megasmoe.cli pretrain``, so signals reach the trainer directly.

Every problem found before training is one line (``megasmoe: launch error: ...`` or
``megasmoe: config error: ...``) and exit code 2. docs/slurm.md has the whole story.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Mapping, Optional, Sequence

__all__ = [
    "Allocation",
    "NodeCommand",
    "LaunchPlan",
    "LaunchError",
    "EXIT_LAUNCH_ERROR",
    "LAUNCHERS",
    "expand_hostlist",
    "parse_tasks_per_node",
    "rendezvous_port",
    "allocation_from_env",
    "build_plan",
    "plan",
    "format_plan",
    "run_config",
    "run_dir",
    "data_paths",
    "code_hash",
    "node_info",
    "check_nodes",
    "preflight",
    "torchrun_signal_flags",
    "srun_extra_args",
    "srun_task_env",
    "add_subcommand",
    "default_config",
    "main",
]

EXIT_LAUNCH_ERROR = 2
"""Exit code of every pre-flight failure (the same as a config error)."""

LAUNCHERS = ("torchrun", "srun")
"""``torchrun``: one torchrun per node; ``srun``: one process per SLURM task."""

FORWARDED_SIGNAL = "SIGUSR1"
"""The signal launch/pretrain.sh forwards to the job step before the time limit."""

SHUTDOWN_TIMEOUT_S = 600
"""How long torchrun waits for workers to checkpoint after a signal before SIGKILL."""

PORT_BASE, PORT_SPAN = 20000, 20000

DEFAULT_CONFIG = "configs/tiny-cpu.yaml"
"""The config when none is given, relative to the repository (as in launch/pretrain.sh)."""


class LaunchError(RuntimeError):
    """A one-line, user-facing problem with the allocation, nodes or launcher."""


# --------------------------------------------------------------------------- allocation


def expand_hostlist(spec: str) -> list[str]:
    """Expand a SLURM host list: ``gpu[01-03,07],login1`` -> gpu01 gpu02 gpu03 gpu07 login1.

    Zero padding of ranges is kept; several bracket groups in one name
    (``rack[1-2]-n[1-2]``) expand as a product, like ``scontrol show hostnames``.
    """
    hosts: list[str] = []
    for item in _split_top(spec.strip()):
        if item:
            hosts.extend(_expand_one(item))
    return hosts


def _split_top(spec: str) -> list[str]:
    """Split on commas outside brackets."""
    parts, depth, cur = [], 0, []
    for ch in spec:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


def _expand_one(item: str) -> list[str]:
    m = re.search(r"\[([^\]]*)\]", item)
    if not m:
        return [item]
    head, tail = item[: m.start()], item[m.end():]
    out = []
    for rng in m.group(1).split(","):
        if "-" in rng:
            lo, hi = rng.split("-", 1)
            width = len(lo)
            values = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
        else:
            values = [rng]
        for v in values:
            out.extend(_expand_one(head + v + tail))
    return out


def parse_tasks_per_node(spec: str) -> list[int]:
    """Expand SLURM's ``SLURM_TASKS_PER_NODE`` (``2(x3),1``) to one count per node."""
    counts: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part)
        if not m:
            raise LaunchError(f"cannot parse SLURM_TASKS_PER_NODE='{spec}'")
        counts.extend([int(m.group(1))] * int(m.group(2) or 1))
    return counts


def rendezvous_port(job_id: Optional[int]) -> int:
    """The rendezvous (c10d / MASTER_PORT) port of a job: 20000 + job id mod 20000.

    Derived from the job id so that jobs sharing a head node do not collide, and
    stable across requeues of the same job.
    """
    return PORT_BASE + (int(job_id or 0) % PORT_SPAN)


@dataclasses.dataclass
class Allocation:
    """The nodes and processes a job runs on (real, from SLURM_*, or hypothetical)."""

    nodes: int
    """Number of nodes."""
    nproc_per_node: int
    """Training processes per node (SLURM tasks per node; GPUs per node on clusters)."""
    hosts: list
    """Host names, the head (rendezvous) node first."""
    job_id: Optional[int] = None
    """SLURM job id (None outside SLURM): seeds the rendezvous port and id."""
    gpus_per_node: Optional[int] = None
    """GPUs SLURM allocated per node, when it says (SLURM_GPUS_ON_NODE)."""
    cpus_per_node: Optional[int] = None
    """CPUs allocated per node (smallest over the nodes), when known."""
    in_slurm: bool = False
    """True inside a real allocation (SLURM_JOB_ID set), False for a hypothetical one."""
    source: str = ""
    """How nproc_per_node was found (for messages)."""

    @property
    def world_size(self) -> int:
        """Total processes: nodes x processes per node."""
        return self.nodes * self.nproc_per_node

    @property
    def head(self) -> str:
        """The head node: rendezvous host and MASTER_ADDR."""
        return self.hosts[0]

    def describe(self) -> str:
        """``2 nodes x 8 processes per node = 16`` (for messages)."""
        n = self.nodes
        return (f"{n} node{'s' if n != 1 else ''} x {self.nproc_per_node} "
                f"process{'es' if self.nproc_per_node != 1 else ''} per node = {self.world_size}")


def _int_env(env: Mapping[str, str], *names: str) -> Optional[int]:
    """The first of ``names`` set to a number in ``env`` (leading digits), else None."""
    for name in names:
        m = re.match(r"\d+", env.get(name, "").strip())
        if m:
            return int(m.group(0))
    return None


def allocation_from_env(env: Mapping[str, str], nodes: Optional[int] = None,
                        nproc_per_node: Optional[int] = None,
                        nodelist: Optional[str] = None, job_id: Optional[int] = None,
                        default_nproc: Optional[int] = None) -> Allocation:
    """The allocation described by SLURM's environment, overridden by explicit values.

    ``nodes`` / ``nproc_per_node`` / ``nodelist`` / ``job_id`` (e.g. from --dry-run
    flags) win over ``SLURM_*``. Processes per node: ``MEGASMOE_NPROC_PER_NODE``, else the
    tasks per node (``SLURM_TASKS_PER_NODE``, then ``SLURM_NTASKS_PER_NODE``), else
    ``default_nproc`` (the config's world size / nodes), else 1. Raises LaunchError for
    an allocation with different task counts on different nodes.
    """
    in_slurm = bool(env.get("SLURM_JOB_ID")) and nodes is None and nproc_per_node is None
    if job_id is None:
        job_id = _int_env(env, "SLURM_JOB_ID") if in_slurm else None
    hosts: list[str] = []
    if nodelist:
        hosts = expand_hostlist(nodelist)
    elif in_slurm and env.get("SLURM_JOB_NODELIST"):
        hosts = expand_hostlist(env["SLURM_JOB_NODELIST"])
    if nodes is None:
        nodes = _int_env(env, "SLURM_JOB_NUM_NODES", "SLURM_NNODES") if in_slurm else None
        nodes = nodes or (len(hosts) if hosts else 1)
    if nodes < 1:
        raise LaunchError(f"--nodes={nodes} must be >= 1")
    if not hosts:
        hosts = ["localhost"] if nodes == 1 and not nodelist else \
            [f"node{i}" for i in range(nodes)]
    if len(hosts) < nodes:
        raise LaunchError(f"the node list has {len(hosts)} hosts ({','.join(hosts)}) "
                          f"but {nodes} nodes were asked for")
    hosts = hosts[:nodes]
    gpus = _int_env(env, "MEGASMOE_GPUS_ON_NODE", "SLURM_GPUS_ON_NODE") if in_slurm else None
    cpus = None
    if in_slurm and env.get("SLURM_JOB_CPUS_PER_NODE"):
        try:
            cpus = min(parse_tasks_per_node(env["SLURM_JOB_CPUS_PER_NODE"]))
        except (LaunchError, ValueError):
            cpus = None
    source = ""
    if nproc_per_node is None:
        explicit = _int_env(env, "MEGASMOE_NPROC_PER_NODE")
        if explicit:
            nproc_per_node, source = explicit, "MEGASMOE_NPROC_PER_NODE"
        elif in_slurm and (env.get("MEGASMOE_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")):
            # Inside a job step SLURM_TASKS_PER_NODE is the step's: the batch script saves
            # the job's in MEGASMOE_TASKS_PER_NODE for helpers that run in a step.
            spec = env.get("MEGASMOE_TASKS_PER_NODE") or env["SLURM_TASKS_PER_NODE"]
            counts = parse_tasks_per_node(spec)
            if len(set(counts)) > 1:
                raise LaunchError(
                    f"the allocation has different task counts per node "
                    f"(SLURM_TASKS_PER_NODE={spec}); submit with "
                    f"--ntasks-per-node=<processes per node> so every node runs the same number")
            nproc_per_node, source = counts[0], "SLURM tasks per node"
        elif in_slurm and _int_env(env, "SLURM_NTASKS_PER_NODE"):
            nproc_per_node, source = _int_env(env, "SLURM_NTASKS_PER_NODE"), "SLURM_NTASKS_PER_NODE"
        elif default_nproc:
            nproc_per_node, source = default_nproc, "the config's world size"
        else:
            nproc_per_node, source = 1, "default"
    else:
        source = "--nproc-per-node"
    if nproc_per_node < 1:
        raise LaunchError(f"processes per node = {nproc_per_node} must be >= 1")
    return Allocation(nodes=nodes, nproc_per_node=nproc_per_node, hosts=hosts, job_id=job_id,
                      gpus_per_node=gpus, cpus_per_node=cpus, in_slurm=in_slurm, source=source)


# --------------------------------------------------------------------------- the plan


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
        srun += ["--kill-on-bad-exit=1", *extra, *argv]
        node_cmds = [NodeCommand(i, h, list(argv)) for i, h in enumerate(alloc.hosts)]
    else:
        argv = [python, "-m", "megasmoe.launch", "srun-task", f"--master-addr={alloc.head}",
                f"--master-port={port}", *([config] if config else []), *overrides]
        srun += [f"--ntasks={n * p}", f"--ntasks-per-node={p}"]
        if alloc.cpus_per_node and alloc.cpus_per_node // p >= 1:
            srun.append(f"--cpus-per-task={alloc.cpus_per_node // p}")
        # No --kill-on-bad-exit: every rank exits 75 after a signal-checkpoint and rank 0
        # may still be publishing it; --wait bounds a hang after one rank crashed.
        srun += ["--wait=120", *extra, *argv]
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


# --------------------------------------------------------------------------- helpers


def run_config(config: Optional[str], overrides: Sequence[str]):
    """The config with overrides applied, not validated (cheap: no torch import)."""
    from megasmoe.config import load_config

    return load_config(config, list(overrides))


def run_dir(config: Optional[str], overrides: Sequence[str]) -> Path:
    """The run directory of ``config`` + ``overrides``: run.dir, else runs/<run.name>.

    Cheap: parses the config without importing torch or validating (ConfigError on a
    config that does not parse).
    """
    return run_config(config, overrides).run.path


def data_paths(cfg) -> list[str]:
    """Files every node must see: indexed prefixes' .bin/.idx and the tokenizer, if set.

    (source=corpus builds its data on first use under the cache directory: nothing to
    check before.)
    """
    paths: list[str] = []
    if cfg.data.source == "indexed":
        for prefix in cfg.data.prefixes:
            paths += [f"{prefix}.bin", f"{prefix}.idx"]
    tokenizer = getattr(cfg.data, "tokenizer", None)
    if tokenizer and cfg.data.source == "indexed":
        paths.append(str(tokenizer))
    return paths


def code_hash(package_dir: Optional[Path] = None) -> str:
    """SHA-256 over the megasmoe package's .py files (relative path + bytes), sorted."""
    root = Path(package_dir) if package_dir else Path(__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        h.update(str(path.relative_to(root)).encode() + b"\0")
        h.update(path.read_bytes() + b"\0")
    return h.hexdigest()


def _file_hash(path: Path) -> Optional[str]:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def _version(dist: str) -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def node_info(config: Optional[str], data_paths: Sequence[str] = (),
              token_file: Optional[str] = None, head: Optional[str] = None,
              port: Optional[int] = None) -> dict:
    """What this node sees: code hash, config hash, paths, torch and its backends, GPUs.

    Run on every node by ``check_nodes`` (``srun --ntasks-per-node=1``); with
    ``head``/``port`` it also tries a TCP connection to the head's rendezvous port.
    """
    info: dict = {
        "host": socket.gethostname().split(".")[0],
        "python": sys.executable,
        "python_exists": Path(sys.executable).exists(),
        "cwd": os.getcwd(),
        "code": code_hash(),
        "config": str(config) if config else None,
        "config_hash": _file_hash(Path(config)) if config else None,
        "missing_paths": [p for p in data_paths if not Path(p).exists()],
        "megatron_core": _version("megatron-core"),
    }
    if token_file:
        try:
            info["token"] = Path(token_file).read_text().strip()
        except OSError:
            info["token"] = None
    try:
        import torch
        import torch.distributed as dist

        info["torch"] = torch.__version__
        info["distributed"] = dist.is_available()
        info["gloo"] = bool(dist.is_available() and dist.is_gloo_available())
        info["nccl"] = bool(dist.is_available() and dist.is_nccl_available())
        info["cuda_devices"] = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception as e:  # noqa: BLE001 - reported, not raised
        info["torch"] = None
        info["torch_error"] = f"{type(e).__name__}: {e}".splitlines()[0]
    if head and port:
        try:
            socket.getaddrinfo(head, port)
            with socket.create_connection((head, port), timeout=10) as s:
                s.sendall(info["host"].encode() + b"\n")
            info["rendezvous"] = "ok"
        except OSError as e:
            info["rendezvous"] = f"{type(e).__name__}: {e}"
    return info


class _Listener:
    """A TCP listener on the rendezvous port for the duration of the node check."""

    def __init__(self, port: int):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("", port))
        self.sock.listen(128)
        self.sock.settimeout(0.5)
        self.seen: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(5)
                try:
                    data = b""
                    while True:  # read to EOF: the client closes first (no TIME_WAIT here)
                        chunk = conn.recv(256)
                        if not chunk:
                            break
                        data += chunk
                    self.seen.append(data.decode(errors="replace").strip())
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


def check_nodes(lp: LaunchPlan, config: Optional[str], data_paths: Sequence[str],
                run_path: Path, timeout_s: int = 180) -> None:
    """Compare what every node of the allocation sees; LaunchError on the first mismatch.

    Inside SLURM: ``srun --ntasks-per-node=1 python -m megasmoe.launch node-info`` on
    every node, while this process (on the head node) listens on the rendezvous port;
    outside SLURM: this node only. Checks: same megasmoe code and config, data paths
    present, the run directory shared (a token written here is read there), torch with
    the backend it will use (nccl with CUDA, else gloo), enough GPUs for the processes,
    the head's rendezvous port reachable.
    """
    a = lp.allocation
    run_path.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(8)
    token_file = run_path / f".preflight-{a.job_id or os.getpid()}"
    token_file.write_text(token + "\n")
    head_port = rendezvous_port(a.job_id)
    listener = None
    local = socket.gethostname().split(".")[0]
    code_before = code_hash()
    try:
        if a.in_slurm and not shutil.which("srun"):
            # e.g. pre-flight itself runs in a container step (MEGASMOE_PYTHON=srun ...).
            lp.notes.append("srun is not available where pre-flight runs: only this node "
                            "was checked")
        if a.in_slurm and shutil.which("srun"):
            if local == a.head.split(".")[0]:
                try:
                    listener = _Listener(head_port)
                except OSError as e:
                    raise LaunchError(
                        f"rendezvous port {head_port} on head node {a.head} is not free ({e}); "
                        f"another job or process uses it") from None
            # --overlap: pre-flight may itself run in a step (MEGASMOE_PYTHON=srun ...).
            cmd = ["srun", f"--nodes={a.nodes}", f"--ntasks={a.nodes}", "--ntasks-per-node=1",
                   "--overlap", "--kill-on-bad-exit=1", *srun_extra_args(os.environ),
                   sys.executable, "-m", "megasmoe.launch", "node-info",
                   f"--token-file={token_file}",
                   *([f"--head={a.head}", f"--port={head_port}"] if listener else []),
                   *[f"--data-path={p}" for p in data_paths], *([config] if config else [])]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
            except subprocess.TimeoutExpired:
                raise LaunchError(f"the node check (srun node-info on {a.nodes} nodes) did not "
                                  f"finish in {timeout_s} s; are the nodes healthy?") from None
            # One JSON object per node; tolerate prefixes (srun --label) and other output.
            infos = [json.loads(line[line.index('{"host"'):]) for line in proc.stdout.splitlines()
                     if '{"host"' in line]
            if proc.returncode != 0 or len(infos) != a.nodes:
                err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                raise LaunchError(f"the node check (srun node-info) failed on the allocation "
                                  f"(rc={proc.returncode}, {len(infos)}/{a.nodes} nodes answered): "
                                  f"{err}")
        else:
            infos = [node_info(config, data_paths, str(token_file))]
        mine = node_info(config, data_paths, str(token_file))
        # Code edited while the check ran (same filesystem, another moment): either is fine.
        mine["codes"] = {code_before, mine["code"]}
        _compare_nodes(mine, infos, token, lp, str(run_path))
    finally:
        if listener is not None:
            listener.close()
        token_file.unlink(missing_ok=True)


def _compare_nodes(mine: dict, infos: list[dict], token: str, lp: LaunchPlan,
                   run_path: str) -> None:
    a = lp.allocation
    for info in infos:
        host = info.get("host", "?")
        if not info.get("python_exists", True):
            raise LaunchError(f"node {host}: python {info['python']} does not exist there; "
                              f"put the venv on a filesystem every node mounts")
        if info.get("code") not in mine.get("codes", {mine["code"]}):
            raise LaunchError(f"node {host} sees different megasmoe code (hash "
                              f"{str(info.get('code'))[:12]} vs {mine['code'][:12]} here); use "
                              f"one checkout on a shared filesystem")
        if info.get("config_hash") != mine["config_hash"]:
            raise LaunchError(f"node {host}: config {info.get('config')} is missing or differs "
                              f"there; put it on a shared filesystem")
        if info.get("missing_paths"):
            raise LaunchError(f"node {host}: data path(s) missing there: "
                              f"{', '.join(info['missing_paths'])}")
        if info.get("token") != token:
            raise LaunchError(f"node {host} does not see the run directory {run_path} that this "
                              f"node writes (not a shared filesystem?); set run.dir to a shared path")
        if info.get("torch") is None:
            raise LaunchError(f"node {host}: torch does not import "
                              f"({info.get('torch_error', 'not installed')})")
        if info.get("torch") != mine.get("torch") or \
                info.get("megatron_core") != mine.get("megatron_core"):
            raise LaunchError(f"node {host} has torch {info.get('torch')} / megatron-core "
                              f"{info.get('megatron_core')}, this node {mine.get('torch')} / "
                              f"{mine.get('megatron_core')}; use one environment")
        cuda = info.get("cuda_devices", 0)
        backend = "nccl" if cuda else "gloo"
        if not info.get(backend):
            raise LaunchError(f"node {host}: torch.distributed backend {backend} is not "
                              f"available in torch {info.get('torch')}")
        if cuda and cuda < a.nproc_per_node:
            raise LaunchError(f"node {host} has {cuda} GPUs but {a.nproc_per_node} processes per "
                              f"node were asked for; lower --ntasks-per-node or add --gpus-per-node")
        rdzv = info.get("rendezvous")
        if rdzv is not None and rdzv != "ok":
            raise LaunchError(f"node {host} cannot reach the rendezvous endpoint {lp.endpoint} "
                              f"({rdzv}); check the network / firewall between nodes")


def preflight(config: Optional[str], overrides: Sequence[str], env: Mapping[str, str],
              node_check: bool = True, check_lock: bool = True, check_data: bool = True,
              **kwargs) -> LaunchPlan:
    """All checks before training; returns the plan. Raises ConfigError or LaunchError.

    The config must validate with the allocation's process count as its world size (so
    the parallel layout fits nodes x processes per node); no other live job may hold
    the run directory (with ``check_lock``; a requeued job passes its own lock, see
    ``megasmoe.training.lifecycle``); GPUs, when SLURM allocated them, must cover the
    processes per node; the launcher must exist; and (with ``node_check``) every node
    must see the same code, config, data and run directory and have the backend (see
    ``check_nodes``).
    """
    from megasmoe.config import ConfigError, validate

    cfg = run_config(config, overrides)
    wanted = cfg.parallel.world_size
    default_nproc = None
    if not env.get("SLURM_JOB_ID") and kwargs.get("nproc_per_node") is None:
        nodes = kwargs.get("nodes") or 1
        if wanted and wanted % nodes == 0:
            default_nproc = wanted // nodes
    lp = build_plan(config, overrides, env, default_nproc=default_nproc, **kwargs)
    a = lp.allocation
    if wanted is not None and wanted != a.world_size:
        raise LaunchError(
            f"the config needs {wanted} processes (parallel.world_size={wanted}) but the "
            f"allocation has {a.describe()}; submit with --nodes/--ntasks-per-node giving "
            f"{wanted}, or set parallel.world_size={a.world_size}")
    try:
        validate(cfg, a.world_size)
    except ConfigError as e:
        raise ConfigError(f"{e} (allocation: {a.describe()})") from None
    if check_lock:
        from megasmoe.training.runlock import check_run_lock

        check_run_lock(cfg.run.path, env)
    from megasmoe.checkpoint import check_resume_compatible

    check_resume_compatible(cfg)
    if check_data:
        from megasmoe.training.data import resolve_data

        # As `megasmoe world-size` does locally: paths, .bin/.idx integrity, tokenizer vs
        # model.vocab_size, data.split, refused in one line before any process starts.
        resolve_data(cfg)
    if a.gpus_per_node is not None and a.gpus_per_node and a.nproc_per_node > a.gpus_per_node:
        raise LaunchError(f"{a.nproc_per_node} processes per node but SLURM allocated "
                          f"{a.gpus_per_node} GPUs per node; make --ntasks-per-node equal "
                          f"--gpus-per-node")
    exe = lp.nodes[0].argv[0]
    if lp.launcher == "torchrun" and not (Path(exe).exists() or shutil.which(exe)):
        raise LaunchError(f"{exe} not found; install torch in the environment "
                          f"(bash launch/setup.sh)")
    if node_check:
        check_nodes(lp, config, data_paths(cfg), cfg.run.path.resolve())
    return lp


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


# --------------------------------------------------------------------------- command line

ACTIONS = ("run-dir", "preflight", "node-info", "srun-task")


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dry-run", action="store_true",
                   help="print the commands the job runs on each node, then exit")
    p.add_argument("--nodes", type=int, default=None,
                   help="hypothetical allocation: number of nodes")
    p.add_argument("--nproc-per-node", type=int, default=None,
                   help="hypothetical allocation: processes (GPUs) per node")
    p.add_argument("--nodelist", default=None,
                   help="hypothetical allocation: host list (e.g. gpu[01-02]); head first")
    p.add_argument("--job-id", type=int, default=None,
                   help="hypothetical job id (seeds the rendezvous port)")
    p.add_argument("--launcher", choices=LAUNCHERS, default=None,
                   help="torchrun (one per node, default) or srun (one process per task); "
                        "default $MEGASMOE_LAUNCHER or torchrun")
    p.add_argument("--no-node-check", action="store_true",
                   help="preflight: skip the srun check of every node")
    p.add_argument("--argv-file", default=None,
                   help="preflight: write the srun command (NUL-separated) to this file")
    p.add_argument("--env-file", default=None,
                   help="preflight: write the step environment (KEY=VALUE lines) to this file")
    # Internal (node-info, srun-task).
    p.add_argument("--token-file", default=None, help=argparse.SUPPRESS)
    p.add_argument("--head", default=None, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--data-path", action="append", default=[], help=argparse.SUPPRESS)
    p.add_argument("--master-addr", default=None, help=argparse.SUPPRESS)
    p.add_argument("--master-port", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("args", nargs="*", metavar="[ACTION] [CONFIG] [key=value]",
                   help=f"ACTION: {', '.join(ACTIONS)} (or --dry-run); CONFIG: a YAML "
                        f"config; then dotted overrides")


def default_config() -> Optional[str]:
    """The repository's DEFAULT_CONFIG as an absolute path (None if it is not there)."""
    path = Path(__file__).resolve().parents[1] / DEFAULT_CONFIG
    return str(path) if path.is_file() else None


def _split(args) -> tuple[Optional[str], Optional[str], list[str]]:
    rest = list(args.args)
    action = rest.pop(0) if rest and rest[0] in ACTIONS else None
    config = None
    if rest and ("=" not in rest[0] or rest[0].endswith((".yaml", ".yml"))):
        config = rest.pop(0)
    return action, config, rest


def _fail(kind: str, message: str) -> int:
    print(f"megasmoe: {kind} error: {message}", file=sys.stderr)
    return EXIT_LAUNCH_ERROR


def _quiet() -> None:
    """megatron-core warns on import when Transformer Engine / Apex are absent: expected."""
    import warnings

    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(megatron|torch)\.")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"(megatron|torch)\.")


def _handle(args) -> int:
    """Run one `launch` invocation; returns the exit code."""
    from megasmoe.checkpoint import CheckpointError
    from megasmoe.config import ConfigError
    from megasmoe.data.errors import DataError

    _quiet()

    action, config, overrides = _split(args)
    if config is None and action not in ("node-info", "srun-task"):
        config = default_config()  # the job `sbatch launch/pretrain.sh` runs without one
    alloc_kw = dict(launcher=args.launcher, nodes=args.nodes,
                    nproc_per_node=args.nproc_per_node, nodelist=args.nodelist,
                    job_id=args.job_id)
    try:
        if action == "srun-task":
            env = srun_task_env(os.environ, args.master_addr, args.master_port)
            os.environ.update(env)
            cmd = [sys.executable, "-m", "megasmoe.cli", *_pretrain_args(config, overrides)]
            sys.stdout.flush()
            os.execv(sys.executable, cmd)  # same pid: srun's signals reach the trainer
        if action == "node-info":
            print(json.dumps(node_info(config, args.data_path, args.token_file, args.head,
                                       args.port)), flush=True)
            return 0
        if action == "run-dir":
            print(run_dir(config, overrides).resolve())
            return 0
        if args.dry_run:
            default_nproc = None
            if args.nproc_per_node is None and not os.environ.get("SLURM_JOB_ID"):
                ws = run_config(config, overrides).parallel.world_size
                nodes = args.nodes or 1
                default_nproc = ws // nodes if ws and ws % nodes == 0 else None
            print(format_plan(build_plan(config, overrides, os.environ,
                                         default_nproc=default_nproc, **alloc_kw)), flush=True)
            # The lock is the state of the moment, not part of the plan: not checked here.
            # Nor is the data (a recipe's data may live on the cluster only).
            preflight(config, overrides, os.environ, node_check=False, check_lock=False,
                      check_data=False, **alloc_kw)
            return 0
        if action == "preflight":
            lp = preflight(config, overrides, os.environ, node_check=not args.no_node_check,
                           **alloc_kw)
            if args.argv_file:
                Path(args.argv_file).write_bytes(
                    b"".join(a.encode() + b"\0" for a in lp.srun))
            if args.env_file:
                Path(args.env_file).write_text(
                    "".join(f"{k}={v}\n" for k, v in lp.env.items()))
            for note in lp.notes:
                print(f"megasmoe: note: {note}", file=sys.stderr)
            a = lp.allocation
            print(f"megasmoe: pre-flight ok: {a.describe()}, launcher {lp.launcher}, "
                  f"rendezvous {lp.endpoint}", flush=True)
            return 0
    except ConfigError as e:
        return _fail("config", str(e))
    except LaunchError as e:
        return _fail("launch", str(e))
    except CheckpointError as e:
        return _fail("checkpoint", str(e))
    except DataError as e:
        return _fail("data", str(e))
    return _fail("launch", "give --dry-run or an action: " + ", ".join(ACTIONS))


def add_subcommand(subparsers) -> argparse.ArgumentParser:
    """Register ``megasmoe launch`` on the ``megasmoe`` command's subparsers.

    Its handler (``args.fn``) returns the exit code: 0, or 2 after one line
    ``megasmoe: launch error: ...`` / ``megasmoe: config error: ...`` on stderr.
    """
    p = subparsers.add_parser(
        "launch", help="SLURM launch plan (--dry-run) and pre-flight checks",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)
    p.set_defaults(fn=_handle)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m megasmoe.launch``: the same as ``megasmoe launch``."""
    parser = argparse.ArgumentParser(prog="python -m megasmoe.launch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(parser)
    args = parser.parse_intermixed_args(argv)
    return _handle(args)


if __name__ == "__main__":
    sys.exit(main())
