"""Is a checkpoint this run's model? Checks before and during a resume, each failing in
one line that names the differing fields and the fix."""

from __future__ import annotations

from pathlib import Path

from megasmoe.checkpoint.store import CheckpointError, checkpoint_root, iteration_dir, \
    read_latest, read_meta

__all__ = ["MODEL_SHAPE_FIELDS", "check_compatible", "check_resume_compatible",
           "check_model_tensors"]


# Fields whose change makes a checkpoint incompatible with the model being built.
MODEL_SHAPE_FIELDS = (
    "model.num_layers", "model.hidden_size", "model.num_heads", "model.num_query_groups",
    "model.ffn_hidden_size", "model.vocab_size", "model.share_embeddings",
    "moe.num_experts", "moe.ffn_hidden_size", "moe.layer_freq", "moe.shared_expert_size",
)

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
