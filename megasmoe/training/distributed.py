"""Process groups: torch.distributed from the launcher's env, then megatron's groups."""

from __future__ import annotations

import datetime
import os
import sys

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megasmoe import platform
from megasmoe.config import Config, duration_s

__all__ = ["init_distributed", "destroy_distributed", "rank", "is_main"]


def rank() -> int:
    """Global rank (0 when torch.distributed is not initialised)."""
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """True on global rank 0: the rank that writes run-level outputs."""
    return rank() == 0


# The peer watchdog of this process's default group (megasmoe.launch.watchdog): started
# with the group, stopped by destroy_distributed, which has no other way to reach it.
_watchdog: list = []


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(cfg: Config, timeout_s: float = None) -> None:
    """Start torch.distributed (env:// from torchrun/srun) and megatron's parallel groups.

    Must run after ``validate``. Uses nccl with CUDA, gloo otherwise; seeds the RNG streams.
    Every group gets ``timeout_s`` (default ``train.collective_timeout``), and a watchdog
    exits this process with one line naming a lost peer (megasmoe.launch.watchdog).
    """
    if timeout_s is None:
        timeout_s = duration_s(cfg.train.collective_timeout, "train.collective_timeout")
    platform.activate()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ and "MASTER_PORT" not in os.environ:
            # Alone (no torchrun/srun): a free port, so that two such processes on one
            # machine (two `megasmoe pretrain` or `eval` runs) do not collide on 29500.
            os.environ["MASTER_PORT"] = str(_free_port())
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        dist.init_process_group(
            backend=platform.backend(), timeout=datetime.timedelta(seconds=timeout_s)
        )
        from megasmoe.checkpoint import checkpoint_root
        from megasmoe.launch.watchdog import PeerWatchdog, lost_after_s

        dog = PeerWatchdog.from_env(lost_after_s(timeout_s), checkpoint_root(cfg.run.path))
        _watchdog[:] = [dog] if dog else []
    p = cfg.parallel
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=p.tp,
        pipeline_model_parallel_size=p.pp,
        virtual_pipeline_model_parallel_size=p.vpp,
        context_parallel_size=p.cp,
        expert_model_parallel_size=p.ep,
        expert_tensor_parallel_size=p.etp,
        distributed_timeout_minutes=timeout_s / 60,  # timedelta(minutes=...) takes a float
    )
    platform.seed_rng_streams(
        cfg.run.seed,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        ep_rank=parallel_state.get_expert_model_parallel_rank(),
        etp_rank=parallel_state.get_expert_tensor_parallel_rank(),
    )


def destroy_distributed() -> None:
    """Tear down megatron's groups and the default process group.

    Called while an exception propagates (a ``finally``), it first gives the watchdog
    time to name a lost peer, which is the likelier cause than the socket error itself.
    """
    if _watchdog:
        error = sys.exc_info()[0]  # SystemExit (e.g. 75 at the time limit) is no failure
        _watchdog.pop().stop(failing=error is not None and issubclass(error, Exception))
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
