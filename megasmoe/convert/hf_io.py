"""Hugging Face directories: sharded safetensors with an index, config.json, reading back."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from megasmoe.convert.errors import ConversionError

__all__ = ["INDEX_FILE", "DEFAULT_MAX_SHARD_BYTES", "write_safetensors", "read_safetensors",
           "write_json", "read_config"]

INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _readable_like_other_files(path: Path) -> None:
    """Give ``path`` the mode a newly created file gets (0666 minus the umask): some
    safetensors versions write 0600, which teammates on a shared cluster cannot read."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def write_safetensors(tensors: dict, out_dir: Path,
                      max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[str]:
    """Write ``tensors`` as ``model-0000i-of-0000n.safetensors`` shards plus the index.

    Tensors keep their order (layer by layer); a shard is closed before it would pass
    ``max_shard_bytes`` (a single larger tensor gets a shard of its own). Returns the
    shard file names.
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        n = _nbytes(t)
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    total = len(shards)
    files = [f"model-{i + 1:05d}-of-{total:05d}.safetensors" for i in range(total)]
    weight_map = {}
    for names, fname in zip(shards, files):
        # clone: per-expert slices share storage, which safetensors refuses.
        part = {n: tensors[n].detach().to("cpu").contiguous().clone() for n in names}
        save_file(part, str(out_dir / fname), metadata={"format": "pt"})
        _readable_like_other_files(out_dir / fname)
        weight_map.update({n: fname for n in names})
    index = {"metadata": {"total_size": sum(_nbytes(t) for t in tensors.values())},
             "weight_map": weight_map}
    write_json(out_dir / INDEX_FILE, index)
    return files


def read_safetensors(hf_dir: Path) -> dict:
    """Every tensor of an HF directory (sharded with an index, or one model.safetensors)."""
    from safetensors.torch import load_file

    hf_dir = Path(hf_dir)
    index = hf_dir / INDEX_FILE
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (hf_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        found = [p.name for p in hf_dir.glob("*.bin")]
        hint = f" (found {', '.join(found)}: convert them to safetensors first)" if found else ""
        raise ConversionError(f"{hf_dir}: no model.safetensors or {INDEX_FILE}{hint}")
    tensors: dict = {}
    for fname in files:
        path = hf_dir / fname
        if not path.is_file():
            raise ConversionError(f"{hf_dir}: {fname} is listed in {INDEX_FILE} but missing")
        tensors.update(load_file(str(path)))
    return tensors


def write_json(path: Path, data: dict) -> None:
    """Write JSON (indented, sorted keys, newline at the end) atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_config(hf_dir: Path) -> dict:
    """config.json of an HF directory."""
    path = Path(hf_dir) / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConversionError(f"{path}: cannot read ({e})") from None
