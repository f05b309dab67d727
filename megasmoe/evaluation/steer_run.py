"""DSMoE on a megasmoe model: the discovery pass and ``apply``.

``discover`` runs inside a process group at any layout without pipeline or context
parallelism (world size 1, EP, TP+SP, DP): every data-parallel rank takes its share
of a domain's windows, the model runs forward and the gradient of the summed LM loss
with respect to the embedding output is taken (every rank runs the same number of
passes: EP's all-to-all and TP's collectives are inside them). A forward hook on each
router recomputes its choice in fp32 from the router's input. Importances are gathered
into one [windows, seq] tensor on every rank (each rank fills its windows and, under
sequence parallelism, its sequence slice), so the percentile is the domain's; then
each rank counts its own tokens and the counts are summed. Without sequence
parallelism the TP ranks hold copies of the same tokens: only TP rank 0 contributes.

``apply_steering`` writes a steered run in one process: the run's config with
``moe.router.name=domain_steer`` and the steering file copied in, and a weights-only
checkpoint (``megasmoe.convert.weights_only``) whose routers hold the steering bias.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from megasmoe import checkpoint as ckpt
from megasmoe.config import ConfigError
from megasmoe.data.errors import DataError
from megasmoe.evaluation import steer as S
from megasmoe.evaluation.engine import load_model_tensors

__all__ = ["run_config", "newest_checkpoint", "build_model", "refuse_layout",
           "run_tokenizer", "domain_counts", "filler_ids", "discover", "apply_steering",
           "STEERABLE_ROUTERS"]

STEERABLE_ROUTERS = ("topk", "domain_steer")
"""Routers whose trained tensors and routing ``domain_steer`` reproduces exactly."""


# ---------------------------------------------------------------------------- the run


def _run_tree(run_dir: Path) -> dict:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise DataError(f"{run_dir}: no config.yaml; give a run directory (runs/<name>)")
    return yaml.safe_load(path.read_text())


def run_config(run_dir: Path, overrides: list[str], world_size: int | None):
    """The run's saved config laid out for this command: the parallel section reset to
    its defaults (the launcher's world size), then ``overrides``. Validated."""
    from megasmoe.config import ParallelConfig, load_config, validate

    reset = [f"parallel.{f.name}={yaml.safe_dump(f.default).splitlines()[0]}"
             for f in dataclasses.fields(ParallelConfig)]
    cfg = load_config(Path(run_dir) / "config.yaml", [*reset, *overrides])
    return validate(cfg, world_size)


def newest_checkpoint(run_dir: Path) -> Path:
    """The checkpoint a resume would load (``latest``, verified); DataError without one."""
    found = ckpt.find_resume_checkpoint(ckpt.checkpoint_root(run_dir))
    if found is None:
        raise DataError(f"{run_dir}: no checkpoint under {ckpt.checkpoint_root(run_dir)}; "
                        f"train the run first (bash launch/pretrain.sh ...)")
    return found


def build_model(cfg) -> list:
    """This rank's model chunks (un-wrapped), on the platform's device."""
    from megasmoe.model import build_model_chunks, to_transformer_config

    chunks = build_model_chunks(cfg, to_transformer_config(cfg))
    if torch.cuda.is_available():
        chunks = [c.cuda(torch.cuda.current_device()) for c in chunks]
    return chunks


# ---------------------------------------------------------------------------- discovery


def refuse_layout(cfg) -> None:
    p = cfg.parallel
    if p.pp > 1 or p.cp > 1:
        raise ConfigError(f"steer discover needs whole layers and whole sequences on a rank "
                          f"(parallel.pp={p.pp}, parallel.cp={p.cp}); set parallel.pp=1 "
                          f"parallel.cp=1 (EP, TP+SP and DP are supported)")


class _Capture:
    """Hooks: the embedding output (kept in the graph) and each router's fp32 choice."""

    def __init__(self, chunk):
        from megasmoe.training.telemetry import routers

        self.emb = None
        self.maps: dict[int, torch.Tensor] = {}
        self.handles = [chunk.embedding.register_forward_hook(self._on_embedding)]
        for r in routers([chunk]):
            self.handles.append(r.register_forward_hook(self._on_router))

    def _on_embedding(self, module, args, output):
        self.emb = output

    def _on_router(self, router, args, output):
        with torch.no_grad():
            logits = router.gating(args[0].detach().float())
            _, routing_map = router.routing(logits)
        self.maps[router.layer_number - 1] = routing_map.reshape(
            -1, router.config.num_moe_experts).cpu()

    def remove(self) -> None:
        """Remove every hook."""
        for h in self.handles:
            h.remove()


def domain_counts(chunks: list, cfg, windows: "S.Windows", filler: torch.Tensor,
                  percentile: float = S.IMPORTANCE_PERCENTILE) -> dict:
    """One domain's counts over all ranks: {"important", "total"} [layers, experts]
    (float64, exact integers), "tokens" and "important_tokens". Collective.

    ``filler`` [vocab] bool marks stopword/punctuation token ids.
    """
    from megatron.core import parallel_state as ps

    refuse_layout(cfg)
    (chunk,) = chunks
    device = next(chunk.parameters()).device
    mbs, L = cfg.train.micro_batch_size, cfg.model.num_layers
    E = cfg.moe.num_experts
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    sp = cfg.parallel.sp and tp > 1
    counts_here = sp or tp_rank == 0
    S_len = windows.tokens.shape[1]
    local = slice(tp_rank * S_len // tp, (tp_rank + 1) * S_len // tp) if sp else slice(None)
    per_pass = mbs * dp
    passes = -(-len(windows) // per_pass)
    wins = windows.padded(passes * per_pass, pad_id=int(windows.tokens[0, 0]))
    importance = torch.zeros(wins.tokens.shape, dtype=torch.float64)
    stored = []
    capture = _Capture(chunk)
    chunk.eval()
    model = _forward_module(chunk, cfg)
    try:
        for g in range(passes):
            idx = torch.arange(mbs) + g * per_pass + dp_rank * mbs
            tokens = wins.tokens[idx].to(device)
            positions = torch.arange(S_len, device=device).expand_as(tokens)
            loss = model(tokens, positions, None, labels=wins.labels[idx].to(device))
            total = (loss.float() * wins.loss_mask[idx].to(device)).sum()
            (grad,) = torch.autograd.grad(total, capture.emb)
            imp = S.token_importance(grad, capture.emb.detach())  # [S_local, B]
            if counts_here:
                importance[idx, local] = imp.t().to(torch.float64).cpu()
            stored.append((idx, dict(capture.maps)))
            capture.emb, capture.maps = None, {}
    finally:
        capture.remove()
    if dist.is_initialized():
        importance = importance.to(device)
        dist.all_reduce(importance)
        importance = importance.cpu()
    valid = wins.valid
    important = torch.zeros_like(valid)
    important[valid] = S.important_tokens(importance[valid], filler[wins.tokens[valid]],
                                          percentile)
    n_imp = torch.zeros(L, E, dtype=torch.float64)
    n_tot = torch.zeros(L, E, dtype=torch.float64)
    if counts_here:
        for idx, maps in stored:
            imp_t = important[idx][:, local].t().reshape(-1)  # router order: s-major
            val_t = valid[idx][:, local].t().reshape(-1)
            for layer, rmap in maps.items():
                n_imp[layer] += rmap[imp_t].sum(0).to(torch.float64)
                n_tot[layer] += rmap[val_t].sum(0).to(torch.float64)
    if dist.is_initialized():
        both = torch.stack([n_imp, n_tot]).to(device)
        dist.all_reduce(both)
        n_imp, n_tot = both.cpu()
    return {"important": n_imp, "total": n_tot, "tokens": int(valid.sum()),
            "important_tokens": int(important.sum())}


def _forward_module(chunk, cfg):
    """The chunk as the trainer runs it: wrapped in Float16Module under bf16."""
    from megatron.core.transformer.module import Float16Module

    from megasmoe.model import to_transformer_config

    tc = to_transformer_config(cfg)
    return Float16Module(tc, chunk) if tc.bf16 else chunk


def filler_ids(tokenizer, windows: list) -> torch.Tensor:
    """[vocab] bool: the token ids of these windows that are stopwords or punctuation."""
    size = max(int(tokenizer.vocab_size), 1 + max(int(w.tokens.max()) for w in windows))
    filler = torch.zeros(size, dtype=torch.bool)
    for tid in sorted(set().union(*(set(w.tokens[w.valid].tolist()) for w in windows))):
        filler[tid] = S.is_filler(tokenizer.decode([tid]))
    return filler


def _per_layer(t: torch.Tensor, layers: list[int], as_int: bool) -> dict:
    return {str(layer): [int(v) if as_int else float(v) for v in t[layer].tolist()]
            for layer in layers}


def discover(chunks: list, cfg, domains: list[tuple[str, str, "S.Windows"]], target: str,
             top_n: int, mode: str, lam: float, provenance: dict) -> tuple[dict, list[str]]:
    """Score every domain, pick the target's global top-N pairs; returns the steering
    document (identical on every rank) and notes for the user. Collective."""
    from megasmoe.config import moe_layer_pattern

    layers = [i for i, moe in enumerate(moe_layer_pattern(cfg.moe.layer_freq,
                                                           cfg.model.num_layers)) if moe]
    filler = filler_ids(run_tokenizer(cfg), [w for _, _, w in domains])
    notes, summaries, chosen = [], {}, None
    for name, source, windows in domains:
        c = domain_counts(chunks, cfg, windows, filler)
        scores = S.pair_scores(c["important"], c["total"])
        summaries[name] = {
            "source": source, "tokens": c["tokens"], "important_tokens": c["important_tokens"],
            "scores": _per_layer(scores, layers, as_int=False),
            "important": _per_layer(c["important"], layers, as_int=True),
            "routed": _per_layer(c["total"], layers, as_int=True),
        }
        if name == target:
            pairs = len(layers) * cfg.moe.num_experts
            if top_n > pairs:
                notes.append(f"--top-n {top_n} exceeds the model's {pairs} (layer, expert) "
                             f"pairs; steering all {pairs} would shift every logit of a layer "
                             f"alike; pass a smaller --top-n")
            chosen = S.top_pairs(scores, layers, min(top_n, pairs))
    provenance = {**provenance, "top_n": len(chosen), "percentile": S.IMPORTANCE_PERCENTILE,
                  "stopwords": "nltk-english", "router": "top-k recomputed in fp32",
                  "importance": "||grad_emb sum(LM loss) * emb||_2"}
    doc = S.steering_document(target, chosen, mode, lam, summaries, provenance)
    return doc, notes


def run_tokenizer(cfg):
    """The run's tokenizer (data.tokenizer); vocab facts only for mock data."""
    from megasmoe.training.data import load_run_tokenizer

    return load_run_tokenizer(cfg)


# ---------------------------------------------------------------------------- apply


def _check_steerable(tree: dict, run_dir: Path) -> None:
    router = dict(tree.get("moe", {}).get("router", {}) or {})
    name = router.pop("name", "topk")
    if name not in STEERABLE_ROUTERS:
        raise ConfigError(f"{run_dir} was trained with moe.router.name={name}; steering "
                          f"replaces the router with domain_steer, which has the tensors and "
                          f"routing of {' and '.join(STEERABLE_ROUTERS)} only")
    odd = {k: v for k, v in router.items() if k in ("score_function", "pre_softmax",
                                                    "topk_scaling_factor")
           and v not in ("softmax", False, None)}
    if odd:
        raise ConfigError(f"{run_dir}: its topk router sets {odd}; domain_steer routes with "
                          f"softmax over the top-k logits only, so the steered run would "
                          f"route differently beyond the steering; steer a run trained with "
                          f"the topk defaults")


def _check_moe_layers(path: Path, cfg) -> None:
    from megasmoe.config import moe_layer_pattern
    from megasmoe.routers.options import read_steering_file

    pattern = moe_layer_pattern(cfg.moe.layer_freq, cfg.model.num_layers)
    steering = read_steering_file(str(path), cfg.model.num_layers, cfg.moe.num_experts)
    for layer in steering["experts"]:
        if not pattern[layer]:
            raise ConfigError(f"moe.router.file='{path}': layer {layer} is a dense layer (no "
                              f"router) in this model (moe.layer_freq={cfg.moe.layer_freq}); "
                              f"remove it or discover the file on this run")


def apply_steering(run_dir: Path, steering: Path, out: Path) -> Path:
    """Write the steered run ``out`` from ``run_dir``'s newest checkpoint; returns the
    checkpoint written. Refuses (ConfigError/DataError, nothing written) a steering file
    naming layers or experts the model lacks, a router domain_steer cannot stand for,
    or an ``out`` that exists and is not empty."""
    from megasmoe.config import save_config, to_dict, validate
    from megasmoe.convert.runtime import config_from_dict, single_process, single_process_config
    from megasmoe.convert.weights_only import save_weights_only

    run_dir, steering, out = Path(run_dir), Path(steering).resolve(), Path(out).resolve()
    tree = _run_tree(run_dir)
    source = newest_checkpoint(run_dir)
    _check_steerable(tree, run_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"--out {out} exists and is not empty; give a new run directory")
    if not steering.is_file():
        raise DataError(f"{steering}: no such steering file; write one with megasmoe steer "
                        f"discover")

    def steered(file: Path) -> dict:
        new = copy.deepcopy(tree)
        new.setdefault("run", {})["dir"] = str(out)
        new.setdefault("moe", {})["router"] = {"name": "domain_steer", "file": str(file)}
        return new

    cfg = validate(config_from_dict(steered(steering)))  # range errors name the file
    _check_moe_layers(steering, cfg)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        shutil.copyfile(steering, out / "steer.json")
        final = validate(config_from_dict(steered(out / "steer.json")))
        one = single_process_config(to_dict(final), out)
        with single_process(one):
            chunks = build_model(one)
            load_model_tensors(chunks, one, source, rebuilt=("steering_bias",))
            meta = ckpt.read_meta(source)
            path = save_weights_only(chunks, one, ckpt.checkpoint_root(out), {
                "steered_from": {"run": str(run_dir.resolve()), "checkpoint": str(source),
                                 "step": int(meta.get("step", 0)),
                                 "steering_file": str(steering)}})
        save_config(final, out / "config.yaml")
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        else:
            for child in out.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        raise
    return path
