"""Saving and loading a trainer's state: collective, through megatron-core dist_checkpointing.

Format: megatron-core ``dist_checkpointing`` (torch_dist, fully parallel save/load
wrappers). Every tensor is stored with its global shape and offset, so a checkpoint
saved at one TP/PP/EP/DP layout loads into any other; the distributed optimizer uses
the ``fully_reshardable`` format for the same reason. How the files are published and
found again is megasmoe.checkpoint.store.

Signals: SLURM delivers the time-limit SIGUSR1 (and scancel's SIGTERM) to every process
of a job step. megatron's writer starts helper processes during a save (a spawned
``multiprocessing`` Manager that serves its results queue and lives on, forked
writers); a spawned process does not inherit Python's handlers, so the signal killed the
Manager and the next save died with BrokenPipeError. Saves therefore start them with
those signals blocked (see ``_helpers_ignore_stop_signals``).

What is saved: model (router buffers such as the expert bias included), optimizer,
LR scheduler, every rank's RNG states (Python, NumPy, torch CPU/CUDA and megatron's
tracker streams), step and consumed samples (the data position), the resolved config,
megasmoe and megatron-core versions. RNG states are restored only when the layout is
unchanged; on a new layout they are re-seeded (dropout streams cannot map across
layouts), which is logged.
"""

from __future__ import annotations

import contextlib
import random
import signal
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megasmoe.checkpoint.compat import check_compatible, check_model_tensors
from megasmoe.checkpoint.store import (_IN_FLIGHT, _abandon, _publish, iteration_dir,
                                       read_meta, remove_leftovers)
from megasmoe.checkpoint_queue import STOP_SIGNALS, use_results_queue

__all__ = ["SHARDING_METADATA", "Resumed", "layout_of", "build_sharded_state_dict",
           "save_checkpoint", "load_checkpoint"]

# Keys of chained (dense + expert) optimizers must not depend on the layout, and the
# distributed optimizer must be stored in a layout-independent ("canonical") form.
SHARDING_METADATA = {
    "distrib_optim_sharding_type": "fully_reshardable",
    "chained_optim_avoid_prefix": True,
}


# ---------------------------------------------------------------------------- state


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch_cpu": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch_cpu"])
    if torch.cuda.is_available() and "torch_cuda" in state:
        torch.cuda.set_rng_state(state["torch_cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def layout_of(cfg) -> dict:
    """The parallel layout a checkpoint was written with."""
    p = cfg.parallel
    return {"world_size": p.world_size, "tp": p.tp, "pp": p.pp, "vpp": p.vpp, "ep": p.ep,
            "etp": p.etp, "cp": p.cp, "dp": p.dp,
            "distributed_optimizer": cfg.train.distributed_optimizer}


def _model_key(i: int, n: int) -> str:
    return "model" if n == 1 else f"model{i}"


def build_sharded_state_dict(trainer, is_loading: bool, with_rng: bool = True) -> dict:
    """The state dict handed to dist_checkpointing (model, optimizer, scheduler, RNG)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    chunks = trainer.unwrapped
    state: dict = {}
    for i, chunk in enumerate(chunks):
        state[_model_key(i, len(chunks))] = chunk.sharded_state_dict(metadata=SHARDING_METADATA)
    added = _prepare_optimizer_for_loading(trainer.optimizer) if is_loading else []
    # Hand the optimizer every model chunk, nested: virtual-pipeline chunks reuse local
    # keys ("decoder.layers.0..."), so flattening them into one dict would drop params.
    state["optimizer"] = trainer.optimizer.sharded_state_dict(
        dict(state), is_loading=is_loading, metadata=SHARDING_METADATA
    )
    for st in added:
        # The distributed optimizer restores its step from the param groups and copies
        # exactly the per-parameter tensors it loads: a placeholder 'step' would be
        # looked up in the checkpoint (KeyError 'step').
        st.pop("step", None)
    state["scheduler"] = trainer.scheduler.state_dict()
    if with_rng:
        state["rng"] = ShardedObject("rng_state", _rng_state(), (dist.get_world_size(),),
                                     (dist.get_rank(),), replica_id=0)
    return state


def _prepare_optimizer_for_loading(optimizer) -> list:
    """Give a fresh optimizer the state layout a checkpoint will fill in.

    megatron-core 0.16.1's distributed optimizer asserts one 'step' value across its
    parameter states, which a fresh optimizer does not have yet; create zero Adam
    states (exp_avg, exp_avg_sq, step) exactly like the first step would. Returns the
    distributed optimizer's per-parameter states that got a placeholder step.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    added = []
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        opt.init_state_fn(inner, getattr(opt, "config", None))
        for group in inner.param_groups:
            for p in group["params"]:
                st = inner.state[p]
                if "step" not in st:
                    st["step"] = torch.zeros((), dtype=torch.float32)
                    if isinstance(opt, DistributedOptimizer):
                        added.append(st)
    return added


RUN_GROUP_KEYS = ("max_lr", "min_lr", "fused", "foreach")
"""Param-group keys the run sets, not the checkpoint: megatron's per-group schedule bounds
(from the config) and torch's Adam kernel (megasmoe/training/fused_adam.py)."""


def _run_group_settings(optimizer) -> list[dict]:
    """Each param group's ``RUN_GROUP_KEYS`` as the run built them."""
    return [{k: g.get(k) for k in RUN_GROUP_KEYS} for g in optimizer.param_groups]


def _restore_run_group_settings(optimizer, settings: list[dict]) -> None:
    """Put back the run's own param-group settings after an optimizer state was loaded.

    torch's ``load_state_dict`` restores every param-group key from the checkpoint.
    megatron's scheduler reads ``max_lr`` / ``min_lr`` from the groups, so a resume with a
    changed ``train.lr`` or ``train.min_lr`` kept the old values for the rest of the run;
    the config wins, as for the other schedule fields (the scheduler overrides them). And
    a checkpoint written before megasmoe used torch's fused Adam kernel carries the loop's
    ``fused`` / ``foreach`` flags: the kernel is this run's choice.
    """
    groups = optimizer.param_groups
    if len(groups) != len(settings):
        return  # another model structure: the model load has refused it already
    for group, kept in zip(groups, settings):
        group.update({k: v for k, v in kept.items() if v is not None})


def _unshare_adam_steps(optimizer) -> None:
    """Give every parameter its own Adam ``step`` tensor.

    megatron-core 0.16.1's distributed optimizer (non-Apex/TE path) restores one step
    tensor shared by all parameter states; torch Adam increments it in place once per
    parameter, so the bias correction after a resume would be wrong.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for st in opt.optimizer.state.values():
            if torch.is_tensor(st.get("step")):
                st["step"] = st["step"].clone()


@contextlib.contextmanager
def _distributed_optimizer_step_fix():
    """Work around megatron-core 0.16.1's distributed-optimizer load without Apex/TE.

    ``DistributedOptimizer.load_state_dict`` adds a torch-Adam ``step`` to every state
    (the non-Apex/TE path), then ``_set_main_param_and_optimizer_states`` copies every
    state key from the loaded tensors, which carry no ``step``: KeyError 'step'. During
    the load, the step is set aside and restored after each copy.
    """
    from megatron.core.optimizer import distrib_optimizer as do

    if getattr(do, "HAVE_APEX_OR_TE", True):
        yield
        return
    original = do.DistributedOptimizer._set_main_param_and_optimizer_states

    def set_states(self, model_param, tensors):
        group_index, group_order = self.model_param_group_index_map[model_param]
        state = self.optimizer.state[self.optimizer.param_groups[group_index]["params"][group_order]]
        step = state.pop("step", None) if "step" not in tensors else None
        try:
            original(self, model_param, tensors)
        finally:
            if step is not None:
                state["step"] = step

    do.DistributedOptimizer._set_main_param_and_optimizer_states = set_states
    try:
        yield
    finally:
        do.DistributedOptimizer._set_main_param_and_optimizer_states = original


def _strategies(trainer):
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing.strategies.fully_parallel import (
        FullyParallelLoadStrategyWrapper,
        FullyParallelSaveStrategyWrapper,
    )
    from megatron.core.dist_checkpointing.strategies.torch import (
        TorchDistLoadShardedStrategy,
        TorchDistSaveShardedStrategy,
    )

    group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    save = FullyParallelSaveStrategyWrapper(TorchDistSaveShardedStrategy("torch_dist", 1), group)
    load = FullyParallelLoadStrategyWrapper(TorchDistLoadShardedStrategy(), group)
    return save, load


def _versions() -> dict:
    import megatron.core

    import megasmoe

    return {"megasmoe": megasmoe.__version__,
            "megatron_core": getattr(megatron.core, "__version__", "unknown"),
            "torch": torch.__version__}


def save_checkpoint(trainer, root: Path, keep_last: int, keep_every: int = 0,
                    async_queue=None) -> Path:
    """Save the trainer's state at its current step; returns the final directory.

    Collective: every rank calls it. With ``async_queue`` (a megatron-core
    AsyncCallsQueue) the tensors are written in the background and the checkpoint is
    finalised (meta, rename, ``latest``) when the queue finalises the request; the
    caller must call ``async_queue.maybe_finalize_async_calls`` regularly and with
    blocking=True before exiting.
    """
    from megatron.core import dist_checkpointing

    from megasmoe.config import to_dict

    root = Path(root)
    step = trainer.step
    final = iteration_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    if dist.get_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        remove_leftovers(root)  # of saves that crashed or were killed, this one's included
        tmp.mkdir()
    dist.barrier()
    save_strategy, _ = _strategies(trainer)
    state = build_sharded_state_dict(trainer, is_loading=False)
    # log_window: the losses since the last train/loss log (the same on every rank), so
    # a mid-interval resume logs the same average as an uninterrupted run.
    state["progress"] = {"step": step, "consumed_samples": trainer.consumed_samples,
                         "log_window": list(getattr(trainer, "log_window", []))}
    meta = {
        "step": step,
        "consumed_samples": trainer.consumed_samples,
        "config": to_dict(trainer.cfg),
        "layout": layout_of(trainer.cfg),
        "versions": _versions(),
        "permanent": bool(keep_every and step % keep_every == 0),
    }

    def finalize() -> None:
        _IN_FLIGHT.discard(str(tmp))
        if dist.get_rank() == 0:
            try:
                _publish(tmp, final, root, meta, keep_last)
            except BaseException:
                _abandon(tmp)
                raise

    try:
        with _helpers_ignore_stop_signals(async_save=async_queue is not None):
            request = dist_checkpointing.save(state, str(tmp), sharded_strategy=save_strategy,
                                              async_sharded_save=async_queue is not None)
            if async_queue is not None:
                request.add_finalize_fn(finalize)
                _IN_FLIGHT.add(str(tmp))
                async_queue.schedule_async_request(request)  # forks the background writer
                return final
        dist.barrier()
        finalize()
    except BaseException:
        # The save is lost on every rank (the others fail in the next collective); rank 0
        # has not renamed it, so only this save's own directory goes.
        _IN_FLIGHT.discard(str(tmp))
        _abandon(tmp)
        raise
    dist.barrier()
    return final


@contextlib.contextmanager
def _helpers_ignore_stop_signals(async_save: bool):
    """Start megatron's save helper processes with SIGTERM/SIGUSR1 blocked, and give its
    writer the results queue this save needs (megasmoe.checkpoint_queue).

    SLURM delivers the time-limit SIGUSR1 (and scancel's SIGTERM) to every process of the
    job step, not only to the trainer. megatron-core 0.16.1's torch_dist writer
    (``FileSystemWriterAsync``) keeps its results queue in a ``multiprocessing`` Manager
    started with the *spawn* context at the first save and reused by every later one; a
    spawned process does not inherit Python's signal handlers, so the signal killed it,
    and the next save died on both ranks with BrokenPipeError (``queue.put``) and left its
    ``.tmp`` directory behind. The signal mask, unlike handlers, survives fork and exec:
    processes started while it is blocked here (the Manager, the forked writers, the
    async writer) never act on these signals. The trainer's own process still gets them:
    another thread takes the signal or it is delivered when the mask is restored, and its
    handler only sets a flag.
    """
    if not hasattr(signal, "pthread_sigmask"):
        use_results_queue(async_save)
        yield
        return
    from multiprocessing import resource_tracker

    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        # Python starts its resource tracker on first use and then *unblocks* SIGINT and
        # SIGTERM in the caller: start it now (it keeps SIGUSR1 blocked), then block again.
        resource_tracker.ensure_running()
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        use_results_queue(async_save)
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@dataclass
class Resumed:
    """What a load restored."""

    path: Path
    step: int
    consumed_samples: int
    same_layout: bool


def load_checkpoint(trainer, ckpt_dir: Path) -> Resumed:
    """Load a checkpoint into the trainer (any layout). Collective."""
    from megatron.core import dist_checkpointing

    ckpt_dir = Path(ckpt_dir)
    meta = read_meta(ckpt_dir)
    if meta.get("weights_only"):
        # An imported model (megasmoe convert from-hf): weights only, fresh optimizer.
        from megasmoe.convert.weights_only import load_weights_only

        return load_weights_only(trainer, ckpt_dir)
    check_compatible(meta, trainer.cfg, ckpt_dir)
    same_layout = meta["layout"] == layout_of(trainer.cfg)
    _, load_strategy = _strategies(trainer)
    state = build_sharded_state_dict(trainer, is_loading=True, with_rng=same_layout)
    chunks = trainer.unwrapped
    check_model_tensors([state[_model_key(i, len(chunks))] for i in range(len(chunks))],
                        ckpt_dir, meta, trainer.cfg)
    own_root = getattr(trainer, "ckpt_root", None)
    if dist.get_rank() == 0 and own_root is not None and ckpt_dir.parent == Path(own_root):
        remove_leftovers(own_root)  # resuming its own run: no save of it is under way
    with _no_sharded_tensor_deprecation():
        loaded = dist_checkpointing.load(state, str(ckpt_dir), sharded_strategy=load_strategy)
    for i, chunk in enumerate(chunks):
        chunk.load_state_dict(loaded[_model_key(i, len(chunks))], strict=True)
    configured = _run_group_settings(trainer.optimizer)
    with _distributed_optimizer_step_fix():
        trainer.optimizer.load_state_dict(loaded["optimizer"])
    _unshare_adam_steps(trainer.optimizer)
    _restore_run_group_settings(trainer.optimizer, configured)
    trainer.scheduler.load_state_dict(loaded["scheduler"])
    if same_layout:
        _set_rng_state(loaded["rng"])
    progress = loaded["progress"]
    trainer.step = int(progress["step"])
    trainer.consumed_samples = int(progress["consumed_samples"])
    trainer.log_window = [float(x) for x in progress.get("log_window", [])]
    return Resumed(ckpt_dir, trainer.step, trainer.consumed_samples, same_layout)


@contextlib.contextmanager
def _no_sharded_tensor_deprecation():
    """Silence torch's "Please use DTensor instead and we are deprecating ShardedTensor"
    FutureWarning during a load.

    megatron-core 0.16.1's torch_dist load builds torch ShardedTensors (torch 2.13 marks
    their ``__torch_function__`` deprecated), so every rank printed it on every resume;
    the user can do nothing about it. Only this message, only around the load.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*deprecating ShardedTensor",
                                category=FutureWarning)
        yield
