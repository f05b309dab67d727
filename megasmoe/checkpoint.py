"""Distributed checkpoints: save, verify, resume (also on another parallel layout).

Format: megatron-core ``dist_checkpointing`` (torch_dist, fully parallel save/load
wrappers). Every tensor is stored with its global shape and offset, so a checkpoint
saved at one TP/PP/EP/DP layout loads into any other; the distributed optimizer uses
the ``fully_reshardable`` format for the same reason.

Layout of ``<run dir>/checkpoints/``::

    iter_0000100/            a complete checkpoint (megatron files + megasmoe.json)
    iter_0000200/
    latest                   "iter_0000200": written last, atomically (tmp, fsync, rename)

A checkpoint is first written to ``iter_XXXXXXX.tmp``; after every rank finished, rank 0
writes ``megasmoe.json`` (step, data position, config, versions, layout, and a manifest
of every file with its size), fsyncs, renames the directory to its final name and only
then moves ``latest``. A crash at any point leaves the previous checkpoint and
``latest`` untouched. On resume a checkpoint whose manifest does not match the files
on disk (truncated or missing files, unreadable metadata) is skipped in favour of the
newest complete one, with a warning naming both. A save that fails removes its
``.tmp`` directory; whatever a killed save leaves is removed by the next save or resume.

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
import json
import os
import random
import re
import shutil
import signal
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megasmoe.checkpoint_queue import STOP_SIGNALS, use_results_queue

__all__ = [
    "CheckpointError",
    "SHARDING_METADATA",
    "checkpoint_root",
    "iteration_dir",
    "list_checkpoints",
    "verify_checkpoint",
    "find_resume_checkpoint",
    "read_meta",
    "save_checkpoint",
    "load_checkpoint",
    "prune_checkpoints",
    "MODEL_SHAPE_FIELDS",
    "check_resume_compatible",
    "read_latest",
    "remove_leftovers",
    "STOP_SIGNALS",
]

# Keys of chained (dense + expert) optimizers must not depend on the layout, and the
# distributed optimizer must be stored in a layout-independent ("canonical") form.
SHARDING_METADATA = {
    "distrib_optim_sharding_type": "fully_reshardable",
    "chained_optim_avoid_prefix": True,
}
META_FILE = "megasmoe.json"
LATEST = "latest"
_ITER_RE = re.compile(r"^iter_(\d{7})$")
_TMP_RE = re.compile(r"^iter_\d{7}\.tmp$")


# Temporary directories of asynchronous saves still being written by this process:
# remove_leftovers must not delete them.
_IN_FLIGHT: set[str] = set()

# Fields whose change makes a checkpoint incompatible with the model being built.
MODEL_SHAPE_FIELDS = (
    "model.num_layers", "model.hidden_size", "model.num_heads", "model.num_query_groups",
    "model.ffn_hidden_size", "model.vocab_size", "model.share_embeddings",
    "moe.num_experts", "moe.ffn_hidden_size", "moe.layer_freq", "moe.shared_expert_size",
)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names it and the fix.

    ``same_on_every_rank``: the check read only the checkpoint's metadata and the config,
    so every rank raises the same error (the CLI prints it once, from rank 0).
    """

    def __init__(self, message: str, same_on_every_rank: bool = False):
        super().__init__(message)
        self.same_on_every_rank = same_on_every_rank


def checkpoint_root(run_dir: Path) -> Path:
    """``<run dir>/checkpoints``."""
    return Path(run_dir) / "checkpoints"


def iteration_dir(root: Path, step: int) -> Path:
    """``<root>/iter_0000100`` for step 100."""
    return Path(root) / f"iter_{step:07d}"


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, dir) of final-named checkpoint directories, oldest first (not verified)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _ITER_RE.match(child.name)
        if m and child.is_dir():
            found.append((int(m.group(1)), child))
    return sorted(found)


def read_meta(ckpt_dir: Path) -> dict:
    """The megasmoe.json of a checkpoint (CheckpointError if absent or unreadable)."""
    path = Path(ckpt_dir) / META_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{ckpt_dir}: no readable {META_FILE} ({e}); not a complete "
                              f"megasmoe checkpoint") from None


def _manifest(ckpt_dir: Path) -> dict[str, int]:
    return {
        str(p.relative_to(ckpt_dir)): p.stat().st_size
        for p in sorted(Path(ckpt_dir).rglob("*"))
        if p.is_file() and p.name != META_FILE
    }


def verify_checkpoint(ckpt_dir: Path) -> Optional[str]:
    """None if complete, else the reason (missing meta, missing or truncated file,
    unreadable megatron metadata)."""
    try:
        meta = read_meta(ckpt_dir)
    except CheckpointError as e:
        return str(e)
    for rel, size in meta.get("manifest", {}).items():
        path = Path(ckpt_dir) / rel
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} has {path.stat().st_size} bytes, expected {size} (truncated)"
    return metadata_problem(ckpt_dir)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def metadata_problem(ckpt_dir: Path) -> Optional[str]:
    """None if megatron's metadata files of a checkpoint can be read, else the reason.

    Reads ``.metadata`` (torch_dist's pickled index of every tensor chunk) and
    ``metadata.json``: a corrupt one would otherwise fail every rank's load (or
    ``inspect``) with a raw UnpicklingError traceback. Files that are absent are left to
    the manifest check.
    """
    from torch.distributed.checkpoint import FileSystemReader

    ckpt_dir = Path(ckpt_dir)
    if (ckpt_dir / ".metadata").is_file():
        try:
            FileSystemReader(str(ckpt_dir)).read_metadata()
        except Exception as e:  # any unpickling error: the file is not usable
            return f"{ckpt_dir / '.metadata'} is unreadable ({_one_line(e)})"
    if (ckpt_dir / "metadata.json").is_file():
        try:
            json.loads((ckpt_dir / "metadata.json").read_text())
        except (OSError, ValueError) as e:
            return f"{ckpt_dir / 'metadata.json'} is unreadable ({_one_line(e)})"
    return None


def read_latest(root: Path) -> Optional[Path]:
    """The checkpoint directory ``<root>/latest`` names (not verified); None without one."""
    try:
        name = (Path(root) / LATEST).read_text().strip()
    except OSError:
        return None
    return Path(root) / name if _ITER_RE.match(name) else None


def find_resume_checkpoint(root: Path, step: Optional[int] = None) -> Optional[Path]:
    """The checkpoint to resume from: ``step`` if given, else ``latest``, verified.

    A named or latest checkpoint that fails verification is skipped for the newest
    complete older one, with a warning naming both. None when there is nothing to resume.
    """
    root = Path(root)
    candidates = list_checkpoints(root)
    if step is not None:
        wanted = iteration_dir(root, step)
        problem = verify_checkpoint(wanted) if wanted.is_dir() else f"{wanted} does not exist"
        if problem:
            raise CheckpointError(f"checkpoint.resume_step={step}: {problem}; pick a step from "
                                  f"{[s for s, _ in candidates]}")
        return wanted
    latest = read_latest(root)
    if latest is None and not candidates:
        return None
    newest_first = sorted(candidates, reverse=True)
    if latest is not None:
        # Never resume past the marker: a newer directory without marker is unfinished.
        newest_first = [(s, d) for s, d in newest_first if d.name <= latest.name]
    for s, d in newest_first:
        problem = verify_checkpoint(d)
        if problem is None:
            if latest is not None and d != latest:
                warnings.warn(f"megasmoe: checkpoint {latest} is incomplete or corrupt; "
                              f"resuming from {d} instead", stacklevel=2)
            return d
        warnings.warn(f"megasmoe: skipping checkpoint {d}: {problem}", stacklevel=2)
    return None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    _fsync_dir(path.parent)


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


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


def _lr_bounds(optimizer) -> list:
    """Each param group's ``max_lr`` / ``min_lr`` (megatron's per-group schedule bounds)."""
    return [(g.get("max_lr"), g.get("min_lr")) for g in optimizer.param_groups]


def _restore_lr_bounds(optimizer, bounds: list) -> None:
    """Put back the config's schedule bounds after an optimizer state was loaded.

    torch's ``load_state_dict`` restores every param-group key from the checkpoint, and
    megatron's scheduler reads ``max_lr`` / ``min_lr`` from the groups, so a resume with a
    changed ``train.lr`` or ``train.min_lr`` kept the old values for the rest of the run.
    The config wins, as for the other schedule fields (the scheduler overrides them).
    """
    groups = optimizer.param_groups
    if len(groups) != len(bounds):
        return  # another model structure: the model load has refused it already
    for group, (max_lr, min_lr) in zip(groups, bounds):
        if max_lr is not None:
            group["max_lr"] = max_lr
        if min_lr is not None:
            group["min_lr"] = min_lr


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


def _abandon(tmp: Path) -> None:
    """Remove the directory of a save that failed (best effort: what stays behind, e.g.
    files another rank is still writing, is removed by the next save)."""
    shutil.rmtree(tmp, ignore_errors=True)


def remove_leftovers(root: Path) -> list[Path]:
    """Delete ``iter_*.tmp`` directories under ``root`` (saves that failed or were
    killed), except asynchronous saves this process is still writing. Rank 0 of the run
    that owns ``root`` calls it, at every save and at resume. Returns what it removed."""
    root = Path(root)
    removed = []
    if not root.is_dir():
        return removed
    for child in sorted(root.iterdir()):
        if _TMP_RE.match(child.name) and child.is_dir() and str(child) not in _IN_FLIGHT:
            shutil.rmtree(child, ignore_errors=True)
            print(f"megasmoe: removed {child}, left by an unfinished save", file=sys.stderr,
                  flush=True)
            removed.append(child)
    return removed


def _publish(tmp: Path, final: Path, root: Path, meta: dict, keep_last: int) -> None:
    """Rank 0, after every rank wrote: manifest + meta, rename, move ``latest``, prune."""
    _fsync_tree(tmp)
    meta = {**meta, "manifest": _manifest(tmp)}
    _atomic_write(tmp / META_FILE, json.dumps(meta, indent=1, default=str))
    replace_dir(tmp, final)
    _fsync_dir(root)
    _atomic_write(root / LATEST, final.name)
    prune_checkpoints(root, keep_last)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories atomically (Linux renameat2 RENAME_EXCHANGE); False if unsupported."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def replace_dir(new: Path, final: Path) -> None:
    """Put directory ``new`` at ``final``; an existing ``final`` is replaced atomically.

    Re-saving a step (a signal right after a save, or a run resumed from an older
    step) must not leave a moment where ``latest`` names a missing directory: the two
    are exchanged in one rename and the old one, now at ``new``, deleted after. Where
    the kernel cannot exchange, the old one is renamed aside first (a short window).
    """
    if not final.exists():
        new.rename(final)
        return
    if _exchange(new, final):
        shutil.rmtree(new)
        return
    aside = final.with_name(final.name + ".old.tmp")  # a leftover *.tmp is cleaned later
    final.rename(aside)
    new.rename(final)
    shutil.rmtree(aside)


def prune_checkpoints(root: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints, sparing permanent ones.

    A checkpoint is permanent when its megasmoe.json says so (checkpoint.keep_every) or
    when a file named KEEP is put in its directory. ``latest`` is never deleted.
    """
    if keep_last <= 0:
        return []
    found = list_checkpoints(root)
    latest = read_latest(root)
    removed = []
    for step, d in found[:-keep_last]:
        if d == latest or (d / "KEEP").exists():
            continue
        try:
            if read_meta(d).get("permanent"):
                continue
        except CheckpointError:
            pass
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    return removed


@dataclass
class Resumed:
    """What a load restored."""

    path: Path
    step: int
    consumed_samples: int
    same_layout: bool


def check_compatible(meta: dict, cfg, ckpt_dir: Path) -> None:
    """Refuse a checkpoint whose model shape differs, naming the differing fields."""
    from megasmoe.config import to_dict

    saved, now = meta["config"], to_dict(cfg)
    diffs = []
    for dotted in MODEL_SHAPE_FIELDS:
        section, name = dotted.split(".")
        a, b = saved.get(section, {}).get(name), now[section][name]
        if a != b:
            diffs.append(f"{dotted} {a!r} -> {b!r}")
    saved_dist = meta.get("layout", {}).get("distributed_optimizer")
    if saved_dist is not None and saved_dist != cfg.train.distributed_optimizer:
        # The plain optimizer stores no fp32 main parameters; the distributed one needs them.
        raise CheckpointError(
            f"{ckpt_dir} was written with train.distributed_optimizer={str(saved_dist).lower()}; "
            f"resume with the same value (switching optimizer type is not supported)",
            same_on_every_rank=True)
    if diffs:
        raise CheckpointError(
            f"{ckpt_dir} holds a different model shape ({'; '.join(diffs)}); resume with the "
            f"checkpoint's values or start a new run.dir", same_on_every_rank=True)


def check_resume_compatible(cfg) -> None:
    """Before any process starts: the checkpoint this run would resume from (``latest``,
    or checkpoint.resume_step) holds this model's shape and optimizer type, else
    CheckpointError (one line, exit 2, no torchrun report). Reads only its megasmoe.json;
    a missing or unreadable one is left to the trainer, which falls back to an older
    checkpoint. Router tensors are checked later, in the workers (check_model_tensors)."""
    c = cfg.checkpoint
    if not (c.resume or c.resume_step is not None):
        return
    root = checkpoint_root(cfg.run.path)
    path = iteration_dir(root, c.resume_step) if c.resume_step is not None else read_latest(root)
    if path is None:
        return
    try:
        meta = read_meta(path)
    except CheckpointError:
        return
    if not meta.get("weights_only"):
        check_compatible(meta, cfg, path)


def _router_changes(meta: dict, cfg) -> list[str]:
    """``moe.router.<field> old -> new`` for each router field that differs from the
    checkpoint's config (the usual cause of a router tensor mismatch)."""
    from megasmoe.config import to_dict

    def flat(router: dict) -> dict:
        router = dict(router)
        router.update(router.pop("options", {}) or {})
        return router

    saved = flat(meta["config"].get("moe", {}).get("router", {}))
    now = flat(to_dict(cfg)["moe"]["router"])
    return [f"moe.router.{k} {saved.get(k)!r} -> {now.get(k)!r}"
            for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]


def check_model_tensors(model_states: list, ckpt_dir: Path, meta: dict, cfg) -> None:
    """Refuse a checkpoint that lacks a tensor the model needs, or holds one at another
    global shape, naming the tensors and the router fields that changed (megatron's own
    error is a long traceback per rank). Reads only the checkpoint's metadata."""
    from megatron.core.dist_checkpointing import load_tensors_metadata
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    stored = load_tensors_metadata(str(ckpt_dir))
    missing, reshaped = set(), set()
    for state in model_states:
        for sh in nested_values(state):
            if not isinstance(sh, ShardedTensor) or sh.key.endswith("_extra_state"):
                continue
            if sh.key not in stored:
                missing.add(sh.key)
            elif tuple(stored[sh.key].global_shape) != tuple(sh.global_shape):
                reshaped.add(f"{sh.key} {list(stored[sh.key].global_shape)} -> "
                             f"{list(sh.global_shape)}")
    if not missing and not reshaped:
        return
    what = []
    if missing:
        more = " ..." if len(missing) > 4 else ""
        what.append("lacks " + ", ".join(sorted(missing)[:4]) + more)
    if reshaped:
        what.append("holds at another shape " + ", ".join(sorted(reshaped)[:4]))
    changes = _router_changes(meta, cfg)
    why = f" ({'; '.join(changes)})" if changes else ""
    raise CheckpointError(f"{ckpt_dir} {'; '.join(what)}{why}; resume with the checkpoint's "
                          f"values or start a new run.dir", same_on_every_rank=True)


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
    configured = _lr_bounds(trainer.optimizer)
    with _distributed_optimizer_step_fix():
        trainer.optimizer.load_state_dict(loaded["optimizer"])
    _unshare_adam_steps(trainer.optimizer)
    _restore_lr_bounds(trainer.optimizer, configured)
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


# ---------------------------------------------------------------------------- inspect


def _inspection_target(path: Path) -> tuple[Path, Optional[Path], list[str]]:
    """(checkpoint to inspect, its checkpoints root or None, problems found on the way).

    An iteration directory is inspected as given. For a run or checkpoints directory it is
    the newest checkpoint, the one ``latest`` names (else the newest ``iter_*``), broken
    or not: inspecting the older one a resume falls back to would hide the breakage.
    """
    path = Path(path)
    is_iteration = _ITER_RE.match(path.name) and path.is_dir()
    if is_iteration or (path / META_FILE).is_file() or (path / ".metadata").is_file():
        root = path.parent if (path.parent / LATEST).exists() else None
        return path, root, []
    for root in (path, checkpoint_root(path)):
        marker = root / LATEST
        found = list_checkpoints(root)
        if not (marker.exists() or found):
            continue
        latest = read_latest(root)
        if latest is not None and latest.is_dir():
            return latest, root, []
        if not marker.exists():
            return found[-1][1], root, []
        problem = (f"{marker} names {latest.name}, which does not exist" if latest is not None
                   else f"{marker} does not name a checkpoint ({_read_text(marker)!r})")
        if not found:
            raise CheckpointError(f"{problem}, and {root} holds no iter_* directory")
        return found[-1][1], root, [problem]  # the newest directory, and the marker's problem
    raise CheckpointError(f"{path}: no megasmoe checkpoint found (looked for {META_FILE}, "
                          f"checkpoints/latest, iter_* directories)")


def _read_text(path: Path) -> str:
    try:
        return path.read_text().strip()[:40]
    except OSError as e:
        return _one_line(e)


def expert_layout_problems(ckpt_dir: Path) -> list[str]:
    """Expert tensors whose stored chunks overlap, leave holes or repeat an expert id.

    Reads only torch_dist metadata: each expert tensor's chunks must tile its global
    shape exactly once, so every global expert id is stored once and only once.
    """
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(str(ckpt_dir)).read_metadata()
    problems = []
    for key, item in meta.state_dict_metadata.items():
        if ".experts." not in key or "_extra_state" in key or not hasattr(item, "chunks"):
            continue
        total = 1
        for n in item.size:
            total *= n
        seen = set()
        covered = 0
        for chunk in item.chunks:
            ident = (tuple(chunk.offsets), tuple(chunk.sizes))
            if ident in seen:
                problems.append(f"{key}: chunk at {list(chunk.offsets)} stored twice")
            seen.add(ident)
            vol = 1
            for n in chunk.sizes:
                vol *= n
            covered += vol
        if covered != total:
            problems.append(f"{key}: chunks cover {covered} of {total} elements "
                            f"({'overlap' if covered > total else 'missing experts'})")
    return problems


def _ensure_single_process_group() -> bool:
    if dist.is_initialized():
        return False
    import tempfile

    init = Path(tempfile.mkdtemp()) / "pg"
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=0, world_size=1)
    return True


def load_full_tensors(ckpt_dir: Path) -> dict:
    """Every tensor of a checkpoint, unsharded, on this one process (CPU)."""
    from megatron.core import dist_checkpointing

    from megasmoe import platform

    platform.activate()
    started = _ensure_single_process_group()
    try:
        with _no_sharded_tensor_deprecation():
            return dist_checkpointing.load_plain_tensors(str(ckpt_dir))
    finally:
        if started:
            dist.destroy_process_group()


def inspect_checkpoint(path: Path, check_values: bool = True) -> dict:
    """Summary and integrity report of a checkpoint (see ``megasmoe checkpoint inspect``).

    ``path``: an iteration directory, or a run / checkpoints directory (then its newest
    checkpoint). Returns {"path", "meta" (None if unreadable), "tensors": {key: (shape,
    dtype)}, "problems": [...], "loadable", "root", "resume", "leftovers"}. Problems:
    missing or truncated files, unreadable metadata, an expert stored twice or missing,
    NaN/Inf values; each is one line, nothing raises for a damaged checkpoint. When there
    are problems and the checkpoint belongs to a run, "resume" is the checkpoint a resume
    would load instead (None: none is complete).
    """
    from megatron.core import dist_checkpointing

    ckpt_dir, root, problems = _inspection_target(path)
    incomplete = verify_checkpoint(ckpt_dir)
    if incomplete:
        problems.append(incomplete)
    try:
        meta = read_meta(ckpt_dir)
    except CheckpointError:
        meta = None  # verify_checkpoint has said why
    tensors = {}
    unreadable = metadata_problem(ckpt_dir)
    if unreadable and unreadable != incomplete:
        problems.append(unreadable)
    if not unreadable:
        problems += expert_layout_problems(ckpt_dir)
        for key, sh in dist_checkpointing.load_tensors_metadata(str(ckpt_dir)).items():
            tensors[key] = (tuple(sh.global_shape), str(sh.dtype).replace("torch.", ""))
    loadable = incomplete is None
    if check_values and not problems:  # a damaged checkpoint cannot be read back at all
        try:
            for key, value in _flatten(load_full_tensors(ckpt_dir)):
                if torch.is_tensor(value) and value.is_floating_point():
                    bad = (~torch.isfinite(value)).sum().item()
                    if bad:
                        problems.append(f"{key}: {bad} NaN/Inf values")
        except Exception as e:  # e.g. a shard damaged in place (same size)
            problems.append(f"{ckpt_dir}: the tensors cannot be read ({_one_line(e)})")
            loadable = False
    resume = None
    if problems and root is not None:
        with warnings.catch_warnings():  # the report says it, once
            warnings.simplefilter("ignore")
            resume = find_resume_checkpoint(root)
    leftovers = sorted(d for d in root.iterdir() if _TMP_RE.match(d.name)) if root else []
    return {"path": ckpt_dir, "meta": meta, "tensors": tensors, "problems": problems,
            "loadable": loadable, "root": root, "resume": resume, "leftovers": leftovers}


def _flatten(tree, prefix=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _flatten(v, f"{prefix}{k}.")
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from _flatten(v, f"{prefix}{i}.")
    else:
        yield prefix.rstrip("."), tree


def format_inspection(report: dict, all_tensors: bool = False) -> str:
    """The human-readable text of ``inspect_checkpoint``; its last line is the verdict
    ("ok: ..." or "FAIL: ..." naming the checkpoint, its first problem and, for a run,
    the checkpoint a resume would use)."""
    meta, path = report["meta"], report["path"]
    lines = [f"checkpoint {path}"]
    if meta is not None:
        cfg = meta.get("config", {})
        m, e, lay = cfg.get("model", {}), cfg.get("moe", {}), meta.get("layout", {})
        lines += [
            f"  step {meta.get('step')}, consumed samples {meta.get('consumed_samples')}",
            f"  versions {meta.get('versions')}",
            f"  layout tp={lay.get('tp')} pp={lay.get('pp')} ep={lay.get('ep')} "
            f"dp={lay.get('dp')} world={lay.get('world_size')} "
            f"distributed_optimizer={lay.get('distributed_optimizer')}",
            f"  model layers={m.get('num_layers')} hidden={m.get('hidden_size')} "
            f"heads={m.get('num_heads')} vocab={m.get('vocab_size')}; moe "
            f"experts={e.get('num_experts')} topk={e.get('topk')} "
            f"router={e.get('router', {}).get('name')}",
        ]
    if report["tensors"]:
        lines.append("  tensors (global shapes):")
        for key, (shape, dtype) in sorted(report["tensors"].items()):
            if all_tensors or not key.startswith("optimizer."):
                lines.append(f"    {key}: {list(shape)} {dtype}")
    for d in report.get("leftovers", []):
        lines.append(f"  note: {d.name} is left by an unfinished save (resume ignores it; "
                     f"the next save or resume removes it)")
    problems = report["problems"]
    if not problems:
        lines.append("ok: files complete, every expert stored once, no NaN/Inf")
        return "\n".join(lines)
    lines.append("PROBLEMS:")
    lines += [f"  - {p}" for p in problems]
    lines.append(_verdict(report))
    return "\n".join(lines)


def _verdict(report: dict) -> str:
    """One line: which checkpoint is broken, why, and what a resume would do instead."""
    path, problems, root = report["path"], report["problems"], report.get("root")
    more = f" (+{len(problems) - 1} more above)" if len(problems) > 1 else ""
    state = "is broken" if not report.get("loadable") else "has problems"
    head = f"FAIL: checkpoint {path} {state}: {problems[0]}{more}"
    if root is None:
        return head
    resume = report.get("resume")
    if resume is None:
        return head + "; a resume finds no complete checkpoint and would start from step 0"
    if resume != path:
        return head + f"; a resume would use {resume} instead"
    if report.get("loadable"):
        return head + "; a resume would still load it"
    return head + ("; a resume would still pick it and fail: set checkpoint.resume_step to "
                   "an older step")
