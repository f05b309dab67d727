"""``from_hf``: a Hugging Face MoE directory -> a megasmoe run directory that trains on.

The HF config is mapped to megasmoe config fields by its architecture (archs/), its
tensors to canonical ones and then to megatron's checkpoint tensors. megasmoe's own
model is built in one process (world size 1, fp32), its weights are filled in through
megatron's sharded state dict (so stacked and per-layer keys are whatever megatron
uses for this model), and it is saved as a weights-only checkpoint in megasmoe's
format (weights_only.py): ``checkpoints/iter_0000000`` + megasmoe.json manifest +
``latest``. ``config.yaml`` is the new run's config (its parallel layout is left to be
derived at launch); ``launch/pretrain.sh <run>/config.yaml`` then starts from the
imported weights at step 0 on any layout, once ``load_checkpoint`` dispatches
weights-only checkpoints to ``load_weights_only`` (docs/conversion.md).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from megasmoe.convert.archs import Tensors, arch_for_model_type
from megasmoe.convert.errors import ConversionError
from megasmoe.convert.hf_io import read_config, read_safetensors
from megasmoe.convert.megatron_layout import ModelShape, to_megatron
from megasmoe.convert.runtime import config_from_dict, single_process, single_process_config
from megasmoe.convert.weights_only import save_weights_only

__all__ = ["ImportReport", "from_hf", "imported_config"]


@dataclass
class ImportReport:
    """What ``from_hf`` wrote."""

    hf_dir: Path
    run_dir: Path
    checkpoint: Path
    architecture: str
    router: dict
    notes: list

    def summary(self) -> str:
        """Human-readable lines for the CLI."""
        lines = [f"imported {self.hf_dir} ({self.architecture}) -> {self.run_dir}",
                 f"  router {self.router}",
                 f"  checkpoint {self.checkpoint}",
                 f"  continue training: bash launch/pretrain.sh {self.run_dir / 'config.yaml'}"]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "router":
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def imported_config(overrides: dict, run_dir: Path, extra: Sequence[str] = ()):
    """The megasmoe Config of an import: defaults, the HF fields, then ``extra``
    ``key=value`` overrides (e.g. parallel.ep=2, train.steps=100); run.dir = run_dir.

    Returned unresolved (parallel.world_size/dp/etp as given, so config.yaml still
    derives them from the launch) after checking that a copy validates.
    """
    from megasmoe.config import Config, apply_overrides, to_dict, validate

    tree = _merge(to_dict(Config()), overrides)
    tree["run"].update(name=run_dir.name, dir=str(run_dir))
    apply_overrides(tree, list(extra))
    validate(config_from_dict(tree))
    return config_from_dict(tree)


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                    "chat_template.jinja")


def copy_hf_tokenizer(hf_dir: Path, run_dir: Path, notes: list):
    """Copy an HF directory's tokenizer files to ``<run>/tokenizer/``; returns the file
    ``data.tokenizer`` should name (tokenizer.json, else tokenizer.model), or None."""
    import shutil

    found = [n for n in _TOKENIZER_FILES if (hf_dir / n).is_file()]
    main = next((n for n in ("tokenizer.json", "tokenizer.model") if n in found), None)
    if main is None:
        return None
    dest = run_dir / "tokenizer"
    dest.mkdir(parents=True, exist_ok=True)
    for name in found:
        shutil.copy2(hf_dir / name, dest / name)
    try:
        from megasmoe.data.tokenizer import load_tokenizer

        load_tokenizer(dest / main)
    except Exception as e:  # noqa: BLE001 - the data pipeline's refusal, as a note
        notes.append(f"the tokenizer was copied to {dest} but megasmoe's data pipeline cannot "
                     f"use it ({e}); data.tokenizer is left unset")
        return None
    return dest / main


def _sharded_tensors(tree):
    # One walker for the whole project: megasmoe.model's.
    from megasmoe.model import sharded_tensors

    return sharded_tensors(tree)


@torch.no_grad()
def fill_model(chunks: list, canonical: dict, shape: ModelShape) -> None:
    """Copy canonical tensors into megatron model chunks; every weight and every
    canonical tensor must be used."""
    shards = [sh for c in chunks for sh in _sharded_tensors(c.sharded_state_dict())
              if sh.data is not None]
    keys = {sh.key: tuple(sh.global_shape) for sh in shards}
    full, used = to_megatron(canonical, keys, shape)
    unused = sorted(set(canonical) - used)
    if unused:
        raise ConversionError(f"the megasmoe model has no place for: {', '.join(unused)}")
    for sh in shards:
        pre = sh.prepend_axis_num  # leading axes of size 1 (layer, expert) in the key
        index = tuple(sh.global_offset[:pre]) + tuple(
            slice(o, o + n) for o, n in zip(sh.global_offset[pre:], sh.local_shape))
        sh.data.copy_(full[sh.key][index].reshape(sh.data.shape).to(sh.data.dtype))


def from_hf(hf_dir: str | Path, out_run: str | Path, overrides: Sequence[str] = ()) -> ImportReport:
    """Import an HF Mixtral / Qwen2-MoE / GLM4-MoE / OLMoE directory as a megasmoe run.

    ``overrides``: ``key=value`` config overrides for the new run (layout, training).
    Refuses (ConversionError, naming the HF field or tensor) anything megasmoe's model
    would not reproduce exactly (OLMoE's q/k norms become model.qk_norm=full). The HF
    tokenizer is copied to ``<out_run>/tokenizer/`` and named in data.tokenizer. In a
    script, call it under ``if __name__ == "__main__":`` (megatron's checkpoint writer
    starts a spawn-method helper process, which re-imports the main module).
    """
    from megasmoe import checkpoint as ckpt
    from megasmoe.config import save_config, to_dict

    hf_dir, out_run = Path(hf_dir), Path(out_run).resolve()
    if ckpt.checkpoint_root(out_run).exists():
        raise ConversionError(f"{out_run} already has checkpoints; import into a new run dir")
    hf_cfg = read_config(hf_dir)
    arch = arch_for_model_type(hf_cfg.get("model_type", ""))
    tensors = Tensors(read_safetensors(hf_dir), str(hf_dir))
    imported = arch.import_checkpoint(hf_cfg, tensors)
    notes = []
    leftover = tensors.unused()
    L = hf_cfg["num_hidden_layers"]
    mtp = [k for k in leftover if k.startswith("model.layers.")
           and int(k.split(".")[2]) >= L]
    if mtp:
        notes.append(f"{len(mtp)} tensors of layers >= num_hidden_layers (multi-token "
                     f"prediction heads) are not part of the causal LM and were not imported")
        leftover = [k for k in leftover if k not in mtp]
    if leftover:
        raise ConversionError(f"{arch.name}: HF tensors with no place in megasmoe: "
                              f"{', '.join(leftover[:10])}"
                              + (f" (+{len(leftover) - 10} more)" if len(leftover) > 10 else ""))
    # No training data comes with a model: config.yaml trains on mock data until
    # data.source/prefixes name data tokenized with the imported tokenizer.
    out_run.mkdir(parents=True, exist_ok=True)
    tokenizer = copy_hf_tokenizer(hf_dir, out_run, notes)
    imported.overrides["data"] = {"source": "mock",
                                  "tokenizer": str(tokenizer) if tokenizer else None}
    notes.append("config.yaml trains on mock data: set data.source=indexed and data.prefixes "
                 "to data preprocessed with " + (str(tokenizer) if tokenizer else
                                                 "the model's tokenizer"))
    dtype = next(iter(imported.canonical.values())).dtype
    if dtype != torch.float32:
        notes.append(f"weights were {dtype}; stored as float32 (exact)")
    canonical = {k: v.float() for k, v in imported.canonical.items()}
    cfg = imported_config(imported.overrides, out_run, overrides)
    shape = ModelShape.from_config(to_dict(cfg))
    # Build the model at world size 1, fill it, save it weights-only.
    one = single_process_config(to_dict(cfg), out_run)
    with single_process(one):
        from megasmoe.model import build_model_chunks, to_transformer_config

        chunks = build_model_chunks(one, to_transformer_config(one))
        fill_model(chunks, canonical, shape)
        path = save_weights_only(chunks, one, ckpt.checkpoint_root(out_run), {
            "imported_from": {"path": str(hf_dir.resolve()), "architecture": arch.architecture}})
    save_config(cfg, out_run / "config.yaml")
    return ImportReport(hf_dir, out_run, path, arch.architecture,
                        dict(imported.overrides["moe"]["router"]), notes)
