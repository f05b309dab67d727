"""train/tflops_per_gpu's FLOPs count against the real megatron-core model's parameters.

6 x (the matmul parameters one token passes through) + the attention scores: the
parameters are counted on the model megasmoe builds (world size 1), routed experts
weighted by top-k / num_experts, the embedding lookup left out (unless it is also the
output layer), so a formula that forgot GQA, head_dim, dense layers, the shared expert
or the padded vocabulary would fail.
"""

from __future__ import annotations

import pytest
import torch

from megasmoe.config import load_config, validate
from megasmoe.convert.runtime import single_process
from megasmoe.model import build_model_chunks, to_transformer_config
from megasmoe.training.trainer import flops_per_token

CASES = {
    "tiny": [],
    # Dense layer, GQA, a head width of its own, gated shared expert, padded vocabulary.
    "mixed": ["moe.layer_freq=[1,0,1,1]", "model.num_query_groups=2", "model.head_dim=48",
              "moe.shared_expert_size=64", "moe.shared_expert_gate=true",
              "model.ffn_hidden_size=192", "model.vocab_size=4000"],
    "tied": ["model.share_embeddings=true"],
}


@pytest.mark.parametrize("case", list(CASES))
def test_flops_per_token_counts_the_models_matmul_parameters(case, tmp_path):
    cfg = validate(load_config("configs/tiny-cpu.yaml", [
        "parallel.world_size=1", "parallel.ep=1", "train.global_batch_size=4",
        "train.micro_batch_size=4", f"run.dir={tmp_path}", *CASES[case]]), 1)
    with single_process(cfg), torch.no_grad():
        (model,) = build_model_chunks(cfg, to_transformer_config(cfg))
        active = 0.0
        for name, param in model.named_parameters():
            if param.dim() < 2:
                continue  # norms and biases
            if "embedding.word_embeddings" in name and not cfg.model.share_embeddings:
                continue  # a lookup, not a matmul (tied: it is the output layer too)
            share = cfg.moe.topk / cfg.moe.num_experts if ".mlp.experts." in name else 1.0
            active += param.numel() * share
    m = cfg.model
    query_width = m.num_heads * (m.head_dim or m.hidden_size // m.num_heads)
    want = 6 * active + 12 * m.num_layers * cfg.train.seq_length * query_width
    assert flops_per_token(cfg) == pytest.approx(want, rel=1e-12)
