"""Pre-flight: every check before training (config vs allocation, lock, data, launcher, nodes)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Mapping, Optional, Sequence

from megasmoe.launch.allocation import LaunchError
from megasmoe.launch.nodes import check_nodes
from megasmoe.launch.plan import LaunchPlan, build_plan


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
