"""Probe of torch-SDPA core attention against megatron's DotProductAttention (one process
group, run by tests/test_attention.py under python or torchrun).

    attention_probe.py OUT.pt [key=value ...]

``module`` results (world size 1 only): SDPAttention and DotProductAttention built with
the same megatron arguments, on the same q / k / v [s, b, heads, dim] with GQA: the
largest output and input-gradient differences in fp32 and bf16, for the causal mask,
an explicit boolean mask, and a non-default softmax_scale; plus controls (SDPA with the
mask or scale changed) that must differ. ``model`` results (every rank): the real
megasmoe model built by ``build_model_chunks`` with model.attention=sdpa and =unfused
from the same layout-invariant weights, one micro batch of tokens: per-token losses,
logits (world size 1), every local parameter gradient and the global gradient norm.
"""

from __future__ import annotations

import os
import sys
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402


def _core_attention(cls, tc, mask_type, scale=None):
    from megatron.core.transformer.enums import AttnMaskType

    return cls(config=tc, layer_number=1, attn_mask_type=getattr(AttnMaskType, mask_type),
               attention_type="self", softmax_scale=scale, cp_comm_type=None,
               pg_collection=None)


def module_results() -> dict:
    """Max |SDPA - DotProductAttention| of outputs and q/k/v gradients, per case."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megasmoe.attention import SDPAttention

    s, b, heads, groups, dim = 64, 2, 8, 2, 16
    gen = torch.Generator().manual_seed(0)
    qkv = [torch.randn(s, b, n, dim, generator=gen) for n in (heads, groups, groups)]
    grad_out = torch.randn(s, b, heads * dim, generator=gen)
    # A padding-style mask (megatron: True = masked): the last 8 keys of batch 1 hidden.
    pad = torch.zeros(b, 1, s, s, dtype=torch.bool)
    pad[1, :, :, -8:] = True
    out = {}

    def run(cls, dtype, mask_type, mask=None, scale=None):
        tc = TransformerConfig(num_layers=1, hidden_size=heads * dim, num_attention_heads=heads,
                               num_query_groups=groups, kv_channels=dim,
                               bf16=dtype == torch.bfloat16, params_dtype=dtype,
                               masked_softmax_fusion=False, attention_dropout=0.0)
        attn = _core_attention(cls, tc, mask_type, scale)
        q, k, v = (t.to(dtype).clone().requires_grad_(True) for t in qkv)
        o = attn(q, k, v, mask)
        o.backward(grad_out.to(dtype))
        return [o] + [t.grad for t in (q, k, v)]

    def diff(a, b):
        return max((x.double() - y.double()).abs().max().item() for x, y in zip(a, b))

    cases = {"causal": ("causal", None, None), "mask": ("padding", pad, None),
             "scale": ("causal", None, 0.3)}
    for case, (mask_type, mask, scale) in cases.items():
        exact = run(DotProductAttention, torch.float64, mask_type, mask, scale)
        out[f"{case}/max"] = max(t.abs().max().item() for t in exact)
        for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            ref = run(DotProductAttention, dtype, mask_type, mask, scale)
            got = run(SDPAttention, dtype, mask_type, mask, scale)
            out[f"{dtype_name}/{case}"] = diff(got, ref)
            # Each path's own error against fp64 (bf16: megatron's rounding vs SDPA's).
            out[f"{dtype_name}/{case}/err_sdpa"] = diff(got, exact)
            out[f"{dtype_name}/{case}/err_unfused"] = diff(ref, exact)
    # Dropout draws from megatron's tensor-parallel RNG stream: a replay of the
    # tracker's state gives the same output, the next draw another one.
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    tc = TransformerConfig(num_layers=1, hidden_size=heads * dim, num_attention_heads=heads,
                           num_query_groups=groups, kv_channels=dim, attention_dropout=0.5)
    attn = _core_attention(SDPAttention, tc, "causal")
    tracker = get_cuda_rng_tracker()
    states = tracker.get_states()
    first, second = attn(*qkv, None), attn(*qkv, None)
    tracker.set_states(states)
    replay = attn(*qkv, None)
    attn.eval()
    plain = attn(*qkv, None)
    out["dropout/replay"] = (replay - first).abs().max().item()
    out["dropout/next"] = (second - first).abs().max().item()
    out["dropout/vs_eval"] = (first - plain).abs().max().item()
    # Controls: a path with the mask or scale wrong is far from the reference.
    ref = run(DotProductAttention, torch.float32, "causal")
    out["control/no_mask"] = diff(run(SDPAttention, torch.float32, "no_mask"), ref)
    out["control/scale"] = diff(run(SDPAttention, torch.float32, "causal", scale=0.3), ref)
    return out


def model_results(cfg) -> dict:
    """Losses, logits and gradients of the model with each core attention."""
    from megatron.core import parallel_state

    from megasmoe.model import build_model_chunks, layout_invariant_init, to_transformer_config

    t = cfg.train
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.model.vocab_size, (t.micro_batch_size, t.seq_length + 1),
                           generator=gen)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    position_ids = torch.arange(t.seq_length).expand_as(inputs)
    results = {}
    for attention in ("sdpa", "unfused"):
        cfg.model.attention = attention
        tc = to_transformer_config(cfg)
        (model,) = build_model_chunks(cfg, tc)
        layout_invariant_init([model], cfg.run.seed, cfg.model.init_std, cfg.model.num_layers)
        core = type(model.decoder.layers[0].self_attention.core_attention).__name__
        loss = model(inputs, position_ids, None, labels=labels)  # [b, s] per token
        loss.sum().backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()
                 if p.grad is not None}
        sq = torch.stack([g.double().pow(2).sum() for g in grads.values()]).sum()
        # Each TP rank holds its slice of the sharded weights (and a partial sum of
        # the replicated ones): the sum over ranks of the squares is a norm to compare.
        torch.distributed.all_reduce(sq, group=parallel_state.get_tensor_model_parallel_group())
        entry = {"core": core, "loss": loss.detach(), "grads": grads,
                 "grad_norm": sq.sqrt().item()}
        if parallel_state.get_tensor_model_parallel_world_size() == 1:
            with torch.no_grad():
                entry["logits"] = model(inputs, position_ids, None)
        results[attention] = entry
    return results


def main(argv) -> int:
    out_path, overrides = argv[0], argv[1:]
    from megasmoe.config import load_config, validate
    from megasmoe.training.distributed import destroy_distributed, init_distributed

    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = validate(load_config("configs/tiny-cpu.yaml", [
        "checkpoint.enabled=false", "logging.tensorboard=false", "data.source=mock",
        *overrides]), world)
    init_distributed(cfg)
    results = {"model": model_results(cfg)}
    if world == 1:
        results["module"] = module_results()
    rank = torch.distributed.get_rank()
    torch.save(results, out_path if world == 1 else f"{out_path}.rank{rank}")
    destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
