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
``megasmoe: config error: ...``) and exit code 2. docs/slurm.md has the whole story."""

# One module per concern: allocation (SLURM's environment), plan (the per-node commands),
# nodes (the cross-node check and its listener), preflight (every check before training),
# cli (the command line). This package re-exports the public names of all of them.

from megasmoe.launch.allocation import (EXIT_LAUNCH_ERROR, Allocation, LaunchError,
                                        allocation_from_env, expand_hostlist,
                                        parse_tasks_per_node, rendezvous_port)
from megasmoe.launch.cli import add_subcommand, default_config, main
from megasmoe.launch.nodes import check_nodes, code_hash, node_info
from megasmoe.launch.plan import (LAUNCHERS, LaunchPlan, NodeCommand, build_plan, format_plan,
                                  plan, srun_extra_args, srun_task_env, torchrun_signal_flags)
from megasmoe.launch.preflight import data_paths, preflight, run_config, run_dir


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
