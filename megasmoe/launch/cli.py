"""``megasmoe launch`` / ``python -m megasmoe.launch``: dry run, pre-flight and the batch script's helpers."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional

from megasmoe.launch.allocation import EXIT_LAUNCH_ERROR, LaunchError
from megasmoe.launch.nodes import node_info
from megasmoe.launch.plan import (LAUNCHERS, _pretrain_args, build_plan, format_plan,
                                  srun_task_env)
from megasmoe.launch.preflight import preflight, run_config, run_dir

DEFAULT_CONFIG = "configs/tiny-cpu.yaml"
"""The config when none is given, relative to the repository (as in launch/pretrain.sh)."""


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
    path = Path(__file__).resolve().parents[2] / DEFAULT_CONFIG  # megasmoe/launch/cli.py
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


def _usage() -> str:
    """The package docstring: the help text of ``megasmoe launch``."""
    import megasmoe.launch

    return megasmoe.launch.__doc__


def add_subcommand(subparsers) -> argparse.ArgumentParser:
    """Register ``megasmoe launch`` on the ``megasmoe`` command's subparsers.

    Its handler (``args.fn``) returns the exit code: 0, or 2 after one line
    ``megasmoe: launch error: ...`` / ``megasmoe: config error: ...`` on stderr.
    """
    p = subparsers.add_parser(
        "launch", help="SLURM launch plan (--dry-run) and pre-flight checks",
        description=_usage(), formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)
    p.set_defaults(fn=_handle)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m megasmoe.launch``: the same as ``megasmoe launch``."""
    parser = argparse.ArgumentParser(prog="python -m megasmoe.launch", description=_usage(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(parser)
    args = parser.parse_intermixed_args(argv)
    return _handle(args)
