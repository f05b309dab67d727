"""``megasmoe checkpoint inspect``: what a checkpoint holds, and whether it is whole.

Reads a checkpoint on one process, at any layout it was saved with: megasmoe.json,
torch_dist's metadata (global shapes, every expert's chunks) and, for a checkpoint
without other problems, every value (NaN/Inf). A damaged checkpoint is reported, never
raised on; the last line of the text says what a resume would do.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from megasmoe.checkpoint.saveload import _no_sharded_tensor_deprecation
from megasmoe.checkpoint.store import (_ITER_RE, _TMP_RE, LATEST, META_FILE, CheckpointError,
                                       _one_line, checkpoint_root, find_resume_checkpoint,
                                       list_checkpoints, metadata_problem, read_latest,
                                       read_meta, verify_checkpoint)

__all__ = ["inspect_checkpoint", "format_inspection", "expert_layout_problems",
           "load_full_tensors"]


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
