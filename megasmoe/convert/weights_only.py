"""Weights-only checkpoints: a model and nothing else (what an import produces).

A megasmoe checkpoint normally holds model, optimizer, scheduler and RNG state. An
imported model has no optimizer history, and writing a placeholder one does not work
with megatron-core 0.16.1: its optimizer ``sharded_state_dict`` drops the Adam step
when it is 0 (``if step:``), and loading the moments then fails on the missing step.
So the import writes the model alone, in megasmoe's own format (``iter_0000000/``,
megasmoe.json with manifest, ``latest``; written by ``megasmoe.checkpoint.store._publish``), with
``"weights_only": true`` in megasmoe.json.

``load_weights_only`` is how a trainer resumes from such a checkpoint: the model's
tensors are loaded (resharded to the trainer's layout, cast to its precision), the
optimizer, scheduler and RNG streams stay as the trainer built them, at step 0.
``megasmoe.checkpoint.load_checkpoint`` has to call it for checkpoints marked
weights-only (docs/conversion.md has the three-line change).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch.distributed as dist

__all__ = ["save_weights_only", "load_weights_only", "is_weights_only"]


def _model_state(chunks: list) -> dict:
    from megasmoe.checkpoint import SHARDING_METADATA

    n = len(chunks)
    return {("model" if n == 1 else f"model{i}"): c.sharded_state_dict(metadata=SHARDING_METADATA)
            for i, c in enumerate(chunks)}


def is_weights_only(meta: dict) -> bool:
    """True for a checkpoint written by ``save_weights_only``."""
    return bool(meta.get("weights_only"))


def save_weights_only(chunks: list, cfg, root: Path, extra_meta: dict) -> Path:
    """Save the model chunks as ``<root>/iter_0000000`` (weights only) and mark it latest.

    Runs in one process (world size 1, megatron's parallel state initialised).
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    from megasmoe import checkpoint as ckpt
    from megasmoe.checkpoint.saveload import _versions
    from megasmoe.checkpoint.store import _publish
    from megasmoe.config import to_dict

    root = Path(root)
    final = ckpt.iteration_dir(root, 0)
    tmp = final.with_name(final.name + ".tmp")
    root.mkdir(parents=True, exist_ok=True)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    state = _model_state(chunks)
    state["progress"] = {"step": 0, "consumed_samples": 0}
    dist_checkpointing.save(state, str(tmp),
                            sharded_strategy=TorchDistSaveShardedStrategy("torch_dist", 1))
    layout = ckpt.layout_of(cfg)
    layout["distributed_optimizer"] = None  # no optimizer state: any optimizer may resume
    meta = {"step": 0, "consumed_samples": 0, "config": to_dict(cfg), "layout": layout,
            "versions": _versions(), "permanent": False, "weights_only": True,
            **extra_meta}
    _publish(tmp, final, root, meta, keep_last=0)
    return final


def load_weights_only(trainer, ckpt_dir: Path):
    """Load a weights-only checkpoint into a built trainer (any layout). Collective.

    Returns ``megasmoe.checkpoint.Resumed`` at step 0 with 0 samples consumed; the
    optimizer (fresh), scheduler (from the config) and RNG streams are left as built.
    """
    from megatron.core import dist_checkpointing

    from megasmoe import checkpoint as ckpt
    from megasmoe.checkpoint.saveload import _strategies

    ckpt_dir = Path(ckpt_dir)
    meta = ckpt.read_meta(ckpt_dir)
    ckpt.check_compatible(meta, trainer.cfg, ckpt_dir)
    _, load_strategy = _strategies(trainer)
    state = _model_state(trainer.unwrapped)
    loaded = dist_checkpointing.load(state, str(ckpt_dir), sharded_strategy=load_strategy)
    for key, chunk in zip(state, trainer.unwrapped):
        chunk.load_state_dict(loaded[key], strict=True)
    # Mixed precision keeps fp32 main copies of the weights: refresh them.
    trainer.optimizer.reload_model_params()
    if dist.is_initialized():
        dist.barrier()
    return ckpt.Resumed(ckpt_dir, 0, 0, same_layout=False)
