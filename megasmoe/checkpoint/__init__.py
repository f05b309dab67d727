"""Distributed checkpoints: save, verify, resume (also on another parallel layout).

- ``store``: the checkpoints directory on disk: ``iter_*`` names, ``latest``, the
  manifest check, atomic publication of a finished save, pruning (no torch).
- ``saveload``: the collective save and load of a trainer's state through megatron-core
  ``dist_checkpointing``, at any layout; signals during a save.
- ``compat``: whether a checkpoint holds this run's model (before any process starts,
  and against the tensors in the workers).
- ``inspection``: ``megasmoe checkpoint inspect``.

Everything callers use is importable from ``megasmoe.checkpoint`` itself.
"""

from megasmoe.checkpoint.compat import (MODEL_SHAPE_FIELDS, check_compatible,
                                        check_model_tensors, check_resume_compatible)
from megasmoe.checkpoint.inspection import (expert_layout_problems, format_inspection,
                                            inspect_checkpoint, load_full_tensors)
from megasmoe.checkpoint.saveload import (SHARDING_METADATA, Resumed,
                                          build_sharded_state_dict, layout_of,
                                          load_checkpoint, save_checkpoint)
from megasmoe.checkpoint.store import (LATEST, META_FILE, CheckpointError, checkpoint_root,
                                       find_resume_checkpoint, iteration_dir,
                                       list_checkpoints, metadata_problem, prune_checkpoints,
                                       read_latest, read_meta, remove_leftovers, replace_dir,
                                       verify_checkpoint)
from megasmoe.checkpoint_queue import STOP_SIGNALS

__all__ = [
    "CheckpointError", "LATEST", "META_FILE", "MODEL_SHAPE_FIELDS", "Resumed",
    "SHARDING_METADATA", "STOP_SIGNALS", "build_sharded_state_dict", "check_compatible",
    "check_model_tensors", "check_resume_compatible", "checkpoint_root",
    "expert_layout_problems", "find_resume_checkpoint", "format_inspection",
    "inspect_checkpoint", "iteration_dir", "layout_of", "list_checkpoints",
    "load_checkpoint", "load_full_tensors", "metadata_problem", "prune_checkpoints",
    "read_latest", "read_meta", "remove_leftovers", "replace_dir", "save_checkpoint",
    "verify_checkpoint",
]
