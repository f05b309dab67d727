"""Megatron-core in this one process (world size 1, gloo, CPU): what import and verify build.

A conversion runs on one CPU process whatever layout the checkpoint was trained on.
``single_process`` starts a private gloo group (a file store, no port) and megatron's
parallel state with every parallel size 1, and tears both down afterwards.
``single_process_config`` turns a saved megasmoe config into the world-size-1, fp32 one.
"""

from __future__ import annotations

import contextlib
import copy
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import torch.distributed as dist

from megasmoe.convert.errors import ConversionError

__all__ = ["single_process", "single_process_config", "config_from_dict"]

_SINGLE_PROCESS_PARALLEL = {"tp": 1, "pp": 1, "vpp": None, "ep": 1, "etp": 1, "cp": 1,
                            "sp": False, "world_size": 1, "dp": 1}


def config_from_dict(tree: dict):
    """A type-checked ``Config`` from nested dicts (a run's megasmoe.json ``config``)."""
    from megasmoe.config import Config, _build

    tree = copy.deepcopy(tree)
    moe = tree.get("moe") or {}
    if "grouped_gemm" in moe:  # saved before moe.expert_backend replaced it
        grouped = moe.pop("grouped_gemm")
        moe.setdefault("expert_backend", "te" if grouped else "sequential")
    return _build(Config, tree, "")


def single_process_config(tree: dict, run_dir: str | Path | None = None):
    """The saved config ``tree`` re-laid out for one process: all parallel sizes 1, fp32.

    The model fields are kept as saved (the checkpoint's shape); the batch is shrunk to
    one sequence so the batch checks pass on one rank. Returns a validated Config.
    """
    from megasmoe.config import validate

    tree = copy.deepcopy(tree)
    tree["parallel"] = {**tree.get("parallel", {}), **_SINGLE_PROCESS_PARALLEL}
    moe = tree.setdefault("moe", {})
    if moe.get("expert_backend") == "te":  # same checkpoint tensors, no TE needed
        moe["expert_backend"] = "grouped"
    train = tree.setdefault("train", {})
    train.update(precision="fp32", micro_batch_size=1, global_batch_size=1, recompute=False,
                 fp8=None)
    tree.setdefault("model", {})["dropout"] = 0.0
    if run_dir is not None:
        tree.setdefault("run", {})["dir"] = str(run_dir)
    return validate(config_from_dict(tree), 1)


@contextlib.contextmanager
def single_process(cfg) -> Iterator[None]:
    """Run the body with a world-size-1 gloo group and megatron's parallel state.

    Refuses to run inside a larger process group (a conversion is one process).
    """
    from megatron.core import parallel_state

    from megasmoe import platform

    platform.activate()
    started, store = False, None
    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise ConversionError(
                f"conversion runs in one process, but this one is rank {dist.get_rank()} of "
                f"{dist.get_world_size()}; run it without torchrun")
    else:
        store = Path(tempfile.mkdtemp(prefix="megasmoe-convert-")) / "pg"
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
        started = True
    own_state = not parallel_state.model_parallel_is_initialized()
    try:
        if own_state:
            parallel_state.initialize_model_parallel()
        platform.seed_rng_streams(cfg.run.seed, tp_rank=0, ep_rank=0, etp_rank=0)
        yield
    finally:
        if own_state and parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        if started:
            dist.destroy_process_group()
            shutil.rmtree(store.parent, ignore_errors=True)
