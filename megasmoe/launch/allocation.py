"""The allocation: SLURM's environment (host lists, tasks per node, job id) as nodes x processes."""

from __future__ import annotations

import dataclasses
import re
from typing import Mapping, Optional

EXIT_LAUNCH_ERROR = 2
"""Exit code of every pre-flight failure (the same as a config error)."""

PORT_BASE, PORT_SPAN = 20000, 20000


class LaunchError(RuntimeError):
    """A one-line, user-facing problem with the allocation, nodes or launcher."""



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
