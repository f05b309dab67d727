"""Read a megasmoe checkpoint's model tensors, whole, on one CPU process, after checking it.

A megasmoe checkpoint is a megatron-core ``torch_dist`` checkpoint: every tensor is
stored as chunks with global offsets, whatever TP/PP/EP layout wrote it. Before
reading, three checks refuse an incomplete checkpoint and name what is missing:

1. the manifest (``megasmoe.json``): a missing or truncated file is named together
   with the tensors (layers, experts) stored in it;
2. the storage index: every chunk must point into a file that holds it;
3. coverage: the chunks of each model tensor must tile its global shape exactly once;
   a hole is reported per layer and expert (``expert 5 of layer 2 is not stored``).

Only model tensors are read (optimizer states and RNG objects are skipped), with
``torch.distributed.checkpoint`` and no process group.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megasmoe.convert.errors import ConversionError

__all__ = ["MegatronCheckpoint", "resolve_checkpoint", "read_checkpoint", "checkpoint_problems",
           "index_axes"]

_ITER_RE = re.compile(r"^iter_(\d{7})$")
_LAYER_KEY = re.compile(r"^decoder\.layers\.(\d+)\.")


@dataclass
class MegatronCheckpoint:
    """The model part of one megasmoe checkpoint.

    ``tensors`` maps megatron's checkpoint keys to global (unsharded) tensors; a stacked
    key (``decoder.layers.<name>``) has the global layer index as its first axis, a
    per-layer key (``decoder.layers.<i>.<name>``, written when layers differ, e.g. with
    ``moe.layer_freq``) has none. ``config`` is the resolved config the run trained with.
    """

    path: Path
    meta: dict
    config: dict
    tensors: dict = field(default_factory=dict)


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint directory meant by ``path`` (iteration dir, run dir or checkpoints dir).

    A run or checkpoints directory means the checkpoint ``latest`` names (else the newest
    ``iter_*``). Unlike resuming, an incomplete ``latest`` is not silently replaced by an
    older checkpoint: the export would otherwise be of another step.
    """
    from megasmoe.checkpoint import LATEST, META_FILE

    path = Path(path)
    if (path / META_FILE).is_file() or _ITER_RE.match(path.name):
        return path
    for root in (path, path / "checkpoints"):
        marker = root / LATEST
        if marker.is_file():
            name = marker.read_text().strip()
            return root / name
        iters = sorted(p for p in root.glob("iter_*") if _ITER_RE.match(p.name)) \
            if root.is_dir() else []
        if iters:
            return iters[-1]
    raise ConversionError(f"{path}: no megasmoe checkpoint (looked for megasmoe.json, "
                          f"checkpoints/latest and iter_* directories)")


def _axis_names(key: str) -> list[str]:
    names = []
    if key.startswith("decoder.layers.") and not _LAYER_KEY.match(key):
        names.append("layer")  # a stacked key: the global layer index comes first
    if ".experts.experts." in key:
        names.append("expert")
    return names


def index_axes(key: str) -> int:
    """Leading axes of a checkpoint key that index layers and experts (not weight dims)."""
    return len(_axis_names(key))


def _is_model_tensor(key: str, item) -> bool:
    return hasattr(item, "chunks") and not key.startswith("optimizer.") \
        and "_extra_state" not in key


def _cells(key: str, offsets, sizes) -> list[tuple]:
    n = index_axes(key)
    ranges = [range(o, o + s) for o, s in zip(offsets[:n], sizes[:n])]
    cells = [()]
    for r in ranges:
        cells = [c + (i,) for c in cells for i in r]
    return cells


def _ranges(ids: list[int]) -> str:
    ids = sorted(set(ids))
    out, start = [], None
    for i, x in enumerate(ids):
        if start is None:
            start = x
        if i + 1 == len(ids) or ids[i + 1] != x + 1:
            out.append(str(start) if start == x else f"{start}-{x}")
            start = None
    return ",".join(out)


def _describe_cells(key: str, cells) -> str:
    """'layer 2 experts 4-7; layer 3 expert 5' for the index cells of ``key``."""
    names = _axis_names(key)
    m = _LAYER_KEY.match(key)
    layer = f"layer {m.group(1)} " if m else ""
    cells = sorted(set(cells))
    if not names:
        return (layer + "whole tensor").strip()
    if len(names) == 1:
        plural = "s" if len(cells) > 1 else ""
        return f"{layer}{names[0]}{plural} {_ranges([c[0] for c in cells])}"
    groups: dict[int, list[int]] = {}
    for a, b in cells:
        groups.setdefault(a, []).append(b)
    parts = [f"layer {a} expert{'s' if len(b) > 1 else ''} {_ranges(b)}"
             for a, b in sorted(groups.items())]
    return "; ".join(parts)


def _coverage_problems(metadata) -> list[str]:
    """Model tensors whose chunks overlap or leave holes, per layer/expert cell."""
    problems = []
    for key, item in metadata.state_dict_metadata.items():
        if not _is_model_tensor(key, item):
            continue
        n = index_axes(key)
        inner = 1
        for s in item.size[n:]:
            inner *= s
        covered: dict[tuple, int] = {}
        seen = set()
        for chunk in item.chunks:
            ident = (tuple(chunk.offsets), tuple(chunk.sizes))
            if ident in seen:
                problems.append(f"{key}: chunk at {list(chunk.offsets)} is stored twice")
            seen.add(ident)
            vol = 1
            for s in chunk.sizes[n:]:
                vol *= s
            for cell in _cells(key, chunk.offsets, chunk.sizes):
                covered[cell] = covered.get(cell, 0) + vol
        all_cells = _cells(key, [0] * n, list(item.size[:n]))
        missing = [c for c in all_cells if covered.get(c, 0) < inner]
        over = [c for c in all_cells if covered.get(c, 0) > inner]
        if missing:
            problems.append(f"{key}: {_describe_cells(key, missing)} not stored (missing "
                            f"{'expert shard' if '.experts.' in key else 'shard'})")
        if over:
            problems.append(f"{key}: {_describe_cells(key, over)} stored more than once")
    return problems


def _storage_problems(ckpt_dir: Path, metadata) -> list[str]:
    """Chunks whose file is missing or too short, named with their layers/experts."""
    by_file: dict[str, list] = {}
    for index, info in metadata.storage_data.items():
        by_file.setdefault(info.relative_path, []).append((index, info))
    problems = []
    for rel, entries in sorted(by_file.items()):
        path = ckpt_dir / rel
        size = path.stat().st_size if path.is_file() else None
        bad: dict[str, list] = {}
        for index, info in entries:
            if size is not None and info.offset + info.length <= size:
                continue
            item = metadata.state_dict_metadata.get(index.fqn)
            if item is None or not _is_model_tensor(index.fqn, item) or index.offset is None:
                continue
            chunk = next((c for c in item.chunks if tuple(c.offsets) == tuple(index.offset)),
                         None)
            sizes = chunk.sizes if chunk is not None else [1] * len(index.offset)
            bad.setdefault(index.fqn, []).extend(_cells(index.fqn, index.offset, sizes))
        if size is None or bad:
            what = "is missing" if size is None else f"is truncated ({size} bytes)"
            held = "; ".join(f"{k}: {_describe_cells(k, sorted(set(c)))}" for k, c in
                             sorted(bad.items()))
            problems.append(f"{rel} {what}" + (f"; it holds {held}" if held else ""))
    return problems


def checkpoint_problems(ckpt_dir: Path) -> list[str]:
    """Everything that makes ``ckpt_dir`` unusable for export; [] when it is complete."""
    from torch.distributed.checkpoint import FileSystemReader

    from megasmoe.checkpoint import verify_checkpoint

    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return [f"{ckpt_dir} does not exist"]
    problems = []
    try:
        metadata = FileSystemReader(str(ckpt_dir)).read_metadata()
    except Exception as e:  # noqa: BLE001 - any unreadable index is the same problem
        return [f"{ckpt_dir}/.metadata is unreadable ({type(e).__name__}: {e})"]
    problems += _storage_problems(ckpt_dir, metadata)
    problems += _coverage_problems(metadata)
    manifest = verify_checkpoint(ckpt_dir)
    if manifest and not problems:
        problems.append(manifest)
    return problems


def read_checkpoint(path: str | Path) -> MegatronCheckpoint:
    """Check and read the model tensors of a checkpoint (see the module docstring).

    Raises ConversionError naming the checkpoint and every problem found.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    from megasmoe.checkpoint import read_meta

    ckpt_dir = resolve_checkpoint(path)
    problems = checkpoint_problems(ckpt_dir)
    if problems:
        raise ConversionError(f"checkpoint {ckpt_dir} is incomplete: {' | '.join(problems)}")
    meta = read_meta(ckpt_dir)
    metadata = FileSystemReader(str(ckpt_dir)).read_metadata()
    tensors = {
        key: torch.empty(tuple(item.size), dtype=item.properties.dtype)
        for key, item in metadata.state_dict_metadata.items() if _is_model_tensor(key, item)
    }
    dcp.load(tensors, storage_reader=FileSystemReader(str(ckpt_dir)), no_dist=True)
    return MegatronCheckpoint(path=ckpt_dir, meta=meta, config=meta["config"], tensors=tensors)
