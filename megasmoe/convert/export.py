"""``to_hf``: a megasmoe checkpoint (any layout) -> a Hugging Face model directory.

Steps, all on one CPU process: read and check the checkpoint (reader.py); megatron
tensors -> canonical per-layer tensors (megatron_layout.py); each MoE layer's router ->
a plain gate by the router's exporter (routers.py); pick the first architecture that
holds the model exactly (archs/: Mixtral, Qwen2-MoE, GLM4-MoE, OLMoE, Qwen3-MoE, GPT-OSS;
with ``remote_code`` also megasmoe's own, archs/remote.py); write
sharded safetensors + index, config.json, generation_config.json and the tokenizer;
then load the result with transformers and require that every tensor was filled and
none was left over. Every megatron tensor must be written: one that is not is an
error, unless ``allow_drop`` (then it is listed in the report).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from megasmoe.convert.archs import EXPORT_TARGETS, MODELING_FILE, REMOTE_TARGET, Arch, Tensors
from megasmoe.convert.errors import ConversionError
from megasmoe.convert.hf_io import DEFAULT_MAX_SHARD_BYTES, write_json, write_safetensors
from megasmoe.convert.megatron_layout import ModelShape, to_canonical
from megasmoe.convert.reader import read_checkpoint
from megasmoe.convert.routers import (RouterContext, Routing, export_gate, refuse_logit_bias,
                                      router_options)
from megasmoe.convert.tokenizer import find_tokenizer, write_tokenizer

__all__ = ["ExportReport", "HFState", "to_hf", "choose_target", "hf_state_dict"]


@dataclass
class ExportReport:
    """What ``to_hf`` wrote."""

    checkpoint: Path
    out_dir: Path
    architecture: str
    routing: Routing
    files: list = field(default_factory=list)
    dropped: list = field(default_factory=list)
    """Megatron tensors not written (only with allow_drop)."""
    tokenizer: Optional[Path] = None
    notes: list = field(default_factory=list)
    """Known differences that are not errors (e.g. a tokenizer conversion)."""
    reader_note: Optional[str] = None
    """What a reader of the chosen architecture must know (Arch.reader_note)."""

    def summary(self) -> str:
        """Human-readable lines for the CLI."""
        r = self.routing
        rule = (f"{r.score_function}, top-{r.topk}, "
                f"{'renormalised' if r.normalize else 'not renormalised'}"
                + (f", x{r.scaling}" if r.scaling else "")
                + (", expert selection bias" if r.selection_bias else ""))
        lines = [f"exported {self.checkpoint} -> {self.out_dir}",
                 f"  architecture {self.architecture} (routing: {rule})",
                 f"  {len(self.files)} safetensors shard(s), tokenizer: "
                 f"{self.tokenizer or 'none (the run has none)'}"]
        if self.dropped:
            lines.append("  DROPPED (--allow-drop): " + "; ".join(self.dropped))
        lines += [f"  note: {n}" for n in self.notes]
        if self.reader_note:
            lines.append(f"  readers: {self.reader_note}")
        return "\n".join(lines)


def _refuse_config(cfg: dict) -> None:
    moe = cfg["moe"]
    if moe.get("capacity_factor") is not None:
        raise ConversionError(
            f"moe.capacity_factor={moe['capacity_factor']} drops tokens beyond expert capacity "
            f"(also at inference) and Hugging Face MoE architectures are dropless; only "
            f"checkpoints trained with moe.capacity_factor=null export exactly")


def _export_routers(canonical: dict, shape: ModelShape, cfg: dict, allow_drop: bool,
                    dropped: list) -> Routing:
    """Replace each MoE layer's ``router.*`` tensors by ``gate.*`` (a per-expert logit
    bias as ``gate.bias``); returns the routing."""
    name = cfg["moe"]["router"]["name"]
    options = router_options(cfg)
    routing = None
    for i, is_moe in enumerate(shape.moe_layers):
        if not is_moe:
            continue
        prefix = f"layers.{i}.router."
        tensors = {k[len(prefix):]: canonical.pop(k) for k in list(canonical)
                   if k.startswith(prefix)}
        gate = export_gate(RouterContext(name, i, tensors, options, cfg), allow_drop, dropped)
        canonical[f"layers.{i}.gate.weight"] = gate.weight
        if gate.bias is not None:
            canonical[f"layers.{i}.gate.bias"] = gate.bias
        if gate.selection_bias is not None:
            canonical[f"layers.{i}.gate.selection_bias"] = gate.selection_bias
        if routing is not None and gate.routing != routing:
            raise ConversionError(f"router {name}: layer {i} routes with {gate.routing}, "
                                  f"earlier layers with {routing}")
        routing = gate.routing
    if routing is None:  # no MoE layer at all
        routing = Routing("softmax", True, cfg["moe"]["topk"])
    return routing


def _check_layer_kinds(canonical: dict, shape: ModelShape) -> None:
    """MoE layers (per moe.layer_freq) must hold experts, dense layers an MLP."""
    for i, is_moe in enumerate(shape.moe_layers):
        want = f"layers.{i}.experts.gate" if is_moe else f"layers.{i}.mlp.gate"
        if want not in canonical:
            kind = "MoE" if is_moe else "dense"
            raise ConversionError(f"layer {i} is {kind} per moe.layer_freq but the checkpoint "
                                  f"has no {kind} MLP tensors for it")


def choose_target(shape: ModelShape, routing: Routing, extra: dict,
                  remote_code: bool = False) -> Arch:
    """The first architecture that holds the model exactly; ConversionError naming why
    each one cannot. megasmoe's own (remote-code) architecture is tried only with
    ``remote_code``: first for a router logit bias (exact in every dtype, where GPT-OSS
    adds 1 to its up projection), last otherwise."""
    targets = EXPORT_TARGETS
    if remote_code:
        targets = ((REMOTE_TARGET, *targets) if extra.get("logit_bias")
                   else (*targets, REMOTE_TARGET))
    reasons = []
    for arch in targets:
        why = arch.unsupported(shape, routing, extra)
        if why is None and extra.get("logit_bias") and not arch.router_bias:
            why = "no router logit bias"
        if why is None:
            return arch
        reasons.append(f"{arch.name}: {why}")
    raise ConversionError("no standard architecture holds this model exactly ("
                          + "; ".join(reasons) + ")")


def _choose_or_drop_bias(canonical: dict, shape: ModelShape, routing: Routing, extra: dict,
                         cfg: dict, allow_drop: bool, remote_code: bool, dropped: list) -> Arch:
    """``choose_target``; when only the router logit bias stands in the way, refuse it
    naming the router and the ways out, or with ``allow_drop`` drop it (listed) and
    write the model without it."""
    try:
        return choose_target(shape, routing, extra, remote_code)
    except ConversionError:
        if not extra["logit_bias"]:
            raise
    # Raises the per-target reasons when the bias is not the only obstacle.
    arch = choose_target(shape, routing, {**extra, "logit_bias": False}, remote_code)
    name = cfg["moe"]["router"]["name"]
    biased = sorted(int(k.split(".")[1]) for k in canonical if k.endswith(".gate.bias"))
    if not allow_drop:
        gpt_oss = next(a for a in EXPORT_TARGETS if a.router_bias)
        raise refuse_logit_bias(
            name, biased[0], canonical[f"layers.{biased[0]}.gate.bias"],
            gpt_oss.unsupported(shape, routing, extra),
            REMOTE_TARGET.unsupported(shape, routing, extra) if remote_code else None)
    for i in biased:
        del canonical[f"layers.{i}.gate.bias"]
        dropped.append(f"layer {i}: router logit bias of {name}")
    extra["logit_bias"] = False
    return arch


@dataclass
class HFState:
    """A checkpoint in HF terms, before anything is written."""

    arch: Arch
    tensors: dict
    routing: Routing
    shape: ModelShape
    extra: dict
    dropped: list


def hf_state_dict(checkpoint, allow_drop: bool = False, remote_code: bool = False) -> HFState:
    """The HF tensors of a read checkpoint, the chosen architecture and what was dropped.

    ``remote_code``: megasmoe's own architecture (loads with trust_remote_code) may be
    written: for a router logit bias, or a model no standard architecture holds.
    """
    cfg = checkpoint.config
    _refuse_config(cfg)
    shape = ModelShape.from_config(cfg)
    canonical, unknown = to_canonical(checkpoint.tensors, shape)
    dropped: list = []
    if unknown:
        if not allow_drop:
            raise ConversionError(f"megatron tensors the converter cannot place: "
                                  f"{', '.join(sorted(unknown))}; pass --allow-drop to export "
                                  f"without them")
        dropped += sorted(unknown)
    routing = _export_routers(canonical, shape, cfg, allow_drop, dropped)
    _check_layer_kinds(canonical, shape)
    extra = {"aux_loss_coeff": cfg["moe"].get("aux_loss_coeff", 0.0),
             "shared_expert_gate": any(k.endswith(".shared.gate_weight") for k in canonical),
             "logit_bias": any(k.endswith(".gate.bias") for k in canonical)}
    arch = _choose_or_drop_bias(canonical, shape, routing, extra, cfg, allow_drop, remote_code,
                                dropped)
    tensors = Tensors(canonical, f"checkpoint {checkpoint.path}")
    hf = arch.export(tensors, shape, routing, extra)
    if tensors.unused():
        left = ", ".join(tensors.unused())
        if not allow_drop:
            raise ConversionError(f"{arch.name} has no place for: {left}; pass --allow-drop to "
                                  f"export without them")
        dropped.append(left)
    return HFState(arch, hf, routing, shape, extra, dropped)


def _hf_config(arch: Arch, shape: ModelShape, routing: Routing, extra: dict, dtype: torch.dtype,
               tok) -> "object":
    cls = arch.config_cls()
    ids = {"bos_token_id": getattr(tok, "bos_token_id", None),
           "eos_token_id": getattr(tok, "eos_token_id", None),
           "pad_token_id": getattr(tok, "pad_token_id", None)}
    config = cls(**arch.hf_config(shape, routing, extra), **ids)
    config.architectures = [arch.architecture]
    config.dtype = dtype
    return config


def _write_config(config, out_dir: Path, shape: ModelShape) -> None:
    config.save_pretrained(str(out_dir))
    path = out_dir / "config.json"
    data = json.loads(path.read_text())
    # Readers older than transformers 5 look for these top-level keys.
    data.setdefault("rope_theta", float(shape.rope_base))
    data.setdefault("torch_dtype", data.get("dtype"))
    if data.get("model_type") == "glm4_moe":
        data.setdefault("partial_rotary_factor", shape.rotary_percent)
    write_json(path, data)


def _check_loads(out_dir: Path, dtype: torch.dtype, remote_code: bool = False) -> None:
    """Load the export with transformers: no missing, unexpected or mismatched tensor."""
    from transformers import AutoModelForCausalLM

    try:
        # remote_code: the modeling file is megasmoe's own, just written here.
        _, info = AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=dtype,
                                                       output_loading_info=True,
                                                       trust_remote_code=remote_code)
    except Exception as e:  # noqa: BLE001 - transformers raises many types here
        raise ConversionError(f"transformers cannot load {out_dir}: {e}") from None
    bad = {k: sorted(v) for k, v in info.items() if v}
    if bad:
        raise ConversionError(f"transformers loaded {out_dir} with problems: {bad}")


def to_hf(run_or_checkpoint: str | Path, out_dir: str | Path, *, allow_drop: bool = False,
          tokenizer: Optional[str | Path] = None,
          max_shard_size: int = DEFAULT_MAX_SHARD_BYTES, check: bool = True,
          remote_code: bool = False) -> ExportReport:
    """Export a megasmoe checkpoint to a Hugging Face directory (see the module docstring).

    ``run_or_checkpoint``: a run dir (its ``latest`` checkpoint), checkpoints dir or
    ``iter_XXXXXXX`` dir, at any parallel layout. ``tokenizer``: overrides the run's.
    ``check``: load the written model with transformers and require every tensor filled
    (needs the model's size in memory once more). ``remote_code``: write megasmoe's own
    architecture with its modeling file (readers need trust_remote_code) for a router
    logit bias (hyper, steered domain_steer; exact in every dtype, where GPT-OSS adds 1
    to its up projection) or when no standard architecture holds the model. The directory must be
    empty or absent.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConversionError(f"{out_dir} exists and is not empty; export into a new directory")
    checkpoint = read_checkpoint(run_or_checkpoint)
    state = hf_state_dict(checkpoint, allow_drop, remote_code)
    arch, routing, shape = state.arch, state.routing, state.shape
    dtype = checkpoint.tensors["embedding.word_embeddings.weight"].dtype
    run_dir = checkpoint.path.parent.parent if checkpoint.path.parent.name == "checkpoints" \
        else None
    tok_source = find_tokenizer(checkpoint.config, run_dir, tokenizer)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        tok = write_tokenizer(tok_source, out_dir) if tok_source is not None else None
        if tok is not None and tok.vocab_size and tok.vocab_size > shape.vocab_size:
            raise ConversionError(f"tokenizer {tok_source} has {tok.vocab_size} tokens, "
                                  f"model.vocab_size is {shape.vocab_size}")
        config = _hf_config(arch, shape, routing, state.extra, dtype, tok)
        _write_config(config, out_dir, shape)
        if arch.remote_code:
            shutil.copyfile(Path(__file__).with_name(MODELING_FILE), out_dir / MODELING_FILE)
        from transformers import GenerationConfig

        GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                         pad_token_id=config.pad_token_id).save_pretrained(str(out_dir))
        files = write_safetensors(state.tensors, out_dir, max_shard_size)
        state.tensors = {}
        if check:
            _check_loads(out_dir, dtype, arch.remote_code)
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise
    return ExportReport(checkpoint.path, out_dir, arch.architecture, routing, files,
                        state.dropped, tok_source, list(tok.notes) if tok is not None else [],
                        arch.reader_note)
