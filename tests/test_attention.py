"""Core attention through torch SDPA equals megatron's DotProductAttention.

tests/attention_probe.py builds both on the same inputs: module level (q / k / v with
GQA, causal and explicit masks, a non-default scale; fp32, bf16 against fp64) and the
whole megasmoe model (same layout-invariant weights, model.attention=sdpa vs unfused)
at world size 1 and at TP=2+SP under torchrun (gloo). Controls show a wrong mask or
scale is caught. The context-parallel refusal and the call-time refusals are checked
without a process group.
"""

from __future__ import annotations

import types

import pytest
import torch

from conftest import REPO, launch

PROBE = REPO / "tests" / "attention_probe.py"
# GQA (4 heads, 2 key/value groups: at TP=2 each rank holds 2 heads sharing 1 group),
# heads of 24 (not hidden / heads = 32), partial RoPE and per-head q/k norms.
MODEL = ["model.num_query_groups=2", "model.head_dim=24", "model.rotary_percent=0.5",
         "model.qk_norm=head", "train.micro_batch_size=2", "parallel.ep=1"]
FP32 = 1e-5


def _probe(out, nproc: int, overrides: list[str]) -> list[dict]:
    argv = [str(PROBE), str(out), *overrides]
    proc = launch(argv, nproc, 600, {"PYTHONPATH": str(REPO)}, rank_env=True)
    assert proc.returncode == 0, f"{' '.join(argv)}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    paths = [out] if nproc == 1 else [f"{out}.rank{r}" for r in range(nproc)]
    return [torch.load(p, weights_only=False) for p in paths]


@pytest.fixture(scope="module")
def ws1(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("attn") / "ws1.pt"
    return _probe(out, 1, [*MODEL, "parallel.world_size=1"])[0]


@pytest.fixture(scope="module")
def tp2(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("attn") / "tp2.pt"
    return _probe(out, 2, [*MODEL, "parallel.tp=2", "parallel.sp=true"])


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[n] - b[n]).abs().max().item() for n in a)


def test_module_equals_dot_product_attention_fp32(ws1):
    """Outputs and q/k/v gradients, GQA, causal / explicit mask / scale=0.3: ~1e-6."""
    m = ws1["module"]
    for case in ("causal", "mask", "scale"):
        assert m[f"fp32/{case}"] < FP32, (case, m)
    # A wrong mask or scale is far off: the comparison can see the mistakes.
    assert m["control/no_mask"] > 0.1 and m["control/scale"] > 0.1, m


def test_dropout_draws_from_megatrons_rng_tracker(ws1):
    """Training-mode dropout under the tensor-parallel RNG fork: replaying the tracker's
    states replays the output; the next draw and eval mode differ."""
    m = ws1["module"]
    assert m["dropout/replay"] == 0.0, m
    assert m["dropout/next"] > 0.1 and m["dropout/vs_eval"] > 0.1, m


def test_module_bf16_within_four_ulps(ws1):
    """bf16: SDPA and megatron agree within 2^-6 of the largest value (4 bf16 ulps), and
    SDPA's own error against fp64 is as small as that (megatron's is ~2^-7)."""
    m = ws1["module"]
    for case in ("causal", "mask", "scale"):
        bound = m[f"{case}/max"] * 2**-6
        assert m[f"bf16/{case}"] <= bound, (case, m)
        assert m[f"bf16/{case}/err_sdpa"] <= bound, (case, m)


def test_model_sdpa_equals_unfused_at_world_size_1(ws1):
    """Same weights: logits, per-token losses and every gradient within fp32 tolerance."""
    sdpa, unfused = ws1["model"]["sdpa"], ws1["model"]["unfused"]
    assert (sdpa["core"], unfused["core"]) == ("SDPAttention", "DotProductAttention")
    assert (sdpa["logits"] - unfused["logits"]).abs().max().item() < FP32
    assert (sdpa["loss"] - unfused["loss"]).abs().max().item() < FP32
    assert _max_diff(sdpa["grads"], unfused["grads"]) < FP32
    assert abs(sdpa["grad_norm"] - unfused["grad_norm"]) <= 1e-6 * unfused["grad_norm"]


def test_model_sdpa_equals_unfused_at_tp2_sp(tp2, ws1):
    """TP=2+SP, each rank 2 heads on 1 key/value group: losses and local gradients of
    sdpa equal unfused on every rank, and the losses equal world size 1."""
    for rank in tp2:
        sdpa, unfused = rank["model"]["sdpa"], rank["model"]["unfused"]
        assert sdpa["core"] == "SDPAttention"
        assert (sdpa["loss"] - unfused["loss"]).abs().max().item() < FP32
        assert _max_diff(sdpa["grads"], unfused["grads"]) < FP32
        assert abs(sdpa["grad_norm"] - unfused["grad_norm"]) <= 1e-6 * unfused["grad_norm"]
        want = ws1["model"]["sdpa"]["loss"]
        assert (sdpa["loss"] - want).abs().max().item() < FP32


def test_context_parallel_refused_in_one_line():
    from megasmoe.config import ConfigError, load_config, validate

    for attention in ("sdpa", "unfused"):
        cfg = load_config("configs/tiny-cpu.yaml", [f"model.attention={attention}",
                                                    "parallel.cp=2", "parallel.ep=1"])
        with pytest.raises(ConfigError) as err:
            validate(cfg)
        msg = str(err.value)
        assert "\n" not in msg and f"model.attention={attention}" in msg and "cp=1" in msg
    cfg = load_config("configs/tiny-cpu.yaml", ["model.attention=flash"])
    with pytest.raises(ConfigError, match="model.attention='flash' is unknown; use auto, sdpa"):
        validate(cfg)


def test_sdpa_refuses_what_it_cannot_do():
    """Context parallelism at construction; attention bias and packed sequences at call."""
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megasmoe.attention import SDPAttention
    from megasmoe.model import core_attention_module

    assert core_attention_module("auto", use_te=False) is SDPAttention
    assert core_attention_module("auto", use_te=True) is None  # TE's spec stays
    tp1 = types.SimpleNamespace(tp=types.SimpleNamespace(size=lambda: 1))

    def build(**config):
        tc = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4,
                               attention_dropout=0.0, **config)
        return SDPAttention(tc, 1, AttnMaskType.causal, "self", pg_collection=tp1)

    with pytest.raises(ValueError, match="no context parallelism"):
        build(context_parallel_size=2)
    attn = build()
    q = torch.zeros(4, 1, 4, 8)
    with pytest.raises(ValueError, match="attention bias"):
        attn(q, q, q, None, attention_bias=torch.zeros(1, 4, 4, 4))
    with pytest.raises(ValueError, match="packed sequences"):
        attn(q, q, q, None, packed_seq_params=PackedSeqParams(qkv_format="thd"))
    assert attn(q, q, q, None).shape == (4, 1, 32)
