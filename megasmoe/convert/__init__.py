"""Hugging Face conversion: export (to_hf), import (from_hf), logit parity (verify).

    to_hf(run_or_checkpoint, out_dir, allow_drop=False)   megasmoe checkpoint -> HF dir
    from_hf(hf_dir, out_run)                              HF dir -> megasmoe run dir
    verify(run_or_checkpoint, hf_dir, token_ids)          max |logit diff|, agreement

Export targets (first that holds the model exactly): Mixtral (softmax over the top-k
logits, all layers MoE, no shared expert), Qwen2-MoE (either softmax rule, shared
expert, dense layers, q/k/v biases), GLM4-MoE (sigmoid routing, expert selection bias,
partial RoPE), OLMoE (full-width q/k norms), Qwen3-MoE (per-head q/k norms), GPT-OSS
(a router logit bias); with ``--remote-code`` megasmoe's own (archs/remote.py). Routers plug
in through ``megasmoe.convert.routers.register_exporter``. CLI: ``add_subcommand``
registers ``convert to-hf|from-hf|verify`` on an argparse subparsers object; also
``python -m megasmoe.convert ...``. docs/conversion.md has the details.
"""

from __future__ import annotations

from megasmoe.convert.cli import add_subcommand
from megasmoe.convert.errors import ConversionError

__all__ = ["to_hf", "from_hf", "verify", "add_subcommand", "ConversionError"]


def to_hf(run_or_checkpoint, out_dir, *, allow_drop: bool = False, **kwargs):
    """Export a megasmoe checkpoint (any layout) to a Hugging Face directory.

    See ``megasmoe.convert.export.to_hf`` for the keyword arguments (tokenizer,
    max_shard_size, check). Returns an ExportReport.
    """
    from megasmoe.convert.export import to_hf as _to_hf

    return _to_hf(run_or_checkpoint, out_dir, allow_drop=allow_drop, **kwargs)


def from_hf(hf_dir, out_run, overrides=()):
    """Import an HF Mixtral / Qwen2-MoE / GLM4-MoE directory as a megasmoe run directory
    (config.yaml + weights-only checkpoint). Returns an ImportReport."""
    from megasmoe.convert.importer import from_hf as _from_hf

    return _from_hf(hf_dir, out_run, overrides)


def verify(run_or_checkpoint, hf_dir, token_ids=None):
    """Feed ``token_ids`` [B, S+1] through megasmoe's model and the HF model; returns a
    VerifyReport (max |logit difference|, next-token agreement, both losses)."""
    from megasmoe.convert.parity import verify as _verify

    return _verify(run_or_checkpoint, hf_dir, token_ids)
