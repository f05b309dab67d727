"""Hugging Face conversion (megasmoe/convert): export, import, logit parity, refusals.

Real transformers, CPU, fp32. The expensive parts are module fixtures, built once:

* the tiny model trained 10 steps at EP=2, TP=2+SP with full-width q/k norms (exported
  as OLMoE) and TP=2+SP+PP=2 (torchrun, gloo), and a mixed variant at PP=2 (dense
  layer, shared expert, top-k of softmax, GQA, padded vocabulary), each exported to HF
  with its data tokenizer: logits within 1e-4 of
  megasmoe's on the same tokens, every next token the same, the same loss within 1e-4;
  damaged copies of the EP=2 checkpoint are refused, naming the missing expert shard;
* tiny randomly initialised Mixtral, Qwen2-MoE, GLM4-MoE, OLMoE and Qwen3-MoE built with
  transformers' config classes: HF -> megasmoe -> HF is bitwise identical per tensor, megasmoe's
  logits match the source's, and training resumes from the import (EP=2);
* one small untrained megasmoe checkpoint per router / config (built in-process at
  world size 1 and saved weights-only): every exportable router matches its HF
  logits, the others are refused with their message.

The parity batch is ``eval_token_ids``: SAMPLE_TEXT encoded by the exported tokenizer
when there is one (trained runs carry the data pipeline's), else fixed random ids.
"""

from __future__ import annotations

import glob
import json
import math
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import FAST, REPO, read_metrics, run_megasmoe
from megasmoe.convert import ConversionError, add_subcommand, from_hf, to_hf, verify
from megasmoe.convert.parity import random_token_ids

SAMPLE_TEXT = ("Sparse mixture of experts routes every token to a few experts. The router "
               "picks the experts, the experts transform the token, and the gate weights "
               "combine their outputs. ")
TRAIN = [*FAST, "train.steps=10"]
LAYOUTS = {
    "ep2": ["parallel.ep=2"],
    # Full-width q/k norms (TP-sharded weights): OLMoE.
    "tp2_qknorm": ["parallel.ep=1", "parallel.tp=2", "parallel.sp=true", "model.qk_norm=full"],
    # q/k/v biases (TP-sharded with the grouped QKV rows): Qwen2-MoE.
    "tp2_pp2": ["parallel.world_size=4", "parallel.ep=1", "parallel.tp=2", "parallel.sp=true",
                "parallel.pp=2", "model.qkv_bias=true"],
    # Per-layer checkpoint keys split over two stages, a dense layer, a gated shared
    # expert, top-k of softmax, GQA and a padded vocabulary (4000 -> 4096): Qwen2-MoE.
    "pp2_mixed": ["parallel.ep=1", "parallel.pp=2", "moe.layer_freq=[1,0,1,1]",
                  "moe.shared_expert_size=64", "moe.shared_expert_gate=true",
                  "model.ffn_hidden_size=192",
                  "moe.router.pre_softmax=true", "model.num_query_groups=2",
                  "model.vocab_size=4000", "data.source=mock"],
    # Router logit biases, written as GPT-OSS's router bias (no remote code): HyperRouter's
    # generated b at EP=2, DSMoE's steering bias at TP=2+SP.
    "ep2_hyper": ["parallel.ep=2", "moe.router.name=hyper"],
    "tp2_steer": ["parallel.ep=1", "parallel.tp=2", "parallel.sp=true",
                  "moe.router.name=domain_steer", "moe.router.file={root}/steering.json"],
}
STEERING = {"mode": "additive", "lambda": 0.5, "experts": {"0": [1], "1": [2, 3], "3": [0]}}
TOL = 1e-4
# Everything here is local: never ask the Hub (no network on the test machines).
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def eval_token_ids(vocab_size: int, hf_dir: Path | None = None) -> torch.Tensor:
    """The parity batch [2, 33]: SAMPLE_TEXT tokenised when the export has a tokenizer,
    else fixed random ids from the vocabulary."""
    if hf_dir is not None and (Path(hf_dir) / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        ids = AutoTokenizer.from_pretrained(str(hf_dir))(SAMPLE_TEXT, add_special_tokens=False)
        ids = ids["input_ids"]
        while len(ids) < 66:
            ids = ids + ids
        return torch.tensor(ids[:66]).reshape(2, 33)
    return random_token_ids(vocab_size, batch=2, length=33, seed=0)


def hf_tensors(hf_dir: Path) -> dict:
    """Every tensor of an HF directory's safetensors files."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(glob.glob(str(Path(hf_dir) / "*.safetensors"))):
        out.update(load_file(f))
    return out


def assert_router_bias(hf_dir: Path, name: str, num_layers: int) -> None:
    """Some layer's exported router bias (``name`` with {} for the layer) is not constant
    over the experts (a constant one would fold away), so the target must hold it."""
    tensors = hf_tensors(hf_dir)
    biases = [tensors[name.format(i)] for i in range(num_layers) if name.format(i) in tensors]
    assert biases and any(b.max() > b.min() for b in biases)


def assert_gpt_oss_experts_are_the_checkpoints(run: Path, hf_dir: Path) -> None:
    """GPT-OSS's experts hold the checkpoint's weights bit for bit (gate/up interleaved,
    transposed; its activation made SiLU by config, not by rescaled weights), the up
    bias is -1 and every other expert bias 0."""
    from megasmoe.convert.megatron_layout import ModelShape, to_canonical
    from megasmoe.convert.reader import read_checkpoint

    checkpoint = read_checkpoint(run)
    canonical, _ = to_canonical(checkpoint.tensors, ModelShape.from_config(checkpoint.config))
    hf = hf_tensors(hf_dir)
    p = "model.layers.0.mlp.experts"
    gate_up, bias = hf[f"{p}.gate_up_proj"], hf[f"{p}.gate_up_proj_bias"]
    assert torch.equal(gate_up[..., 0::2], canonical["layers.0.experts.gate"].transpose(1, 2))
    assert torch.equal(gate_up[..., 1::2], canonical["layers.0.experts.up"].transpose(1, 2))
    assert torch.equal(hf[f"{p}.down_proj"], canonical["layers.0.experts.down"].transpose(1, 2))
    assert bool((bias[:, 0::2] == 0).all()) and bool((bias[:, 1::2] == -1).all())
    assert not hf[f"{p}.down_proj_bias"].any()


def assert_greedy_generate_matches_logits(hf_dir: Path, token_ids: torch.Tensor,
                                          remote_code: bool = False) -> None:
    """``generate`` (greedy, 5 tokens) picks what the full-sequence logits pick."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), trust_remote_code=remote_code)
    ids = token_ids[:, :8]
    want = ids
    with torch.no_grad():
        for _ in range(5):
            next_id = model(want).logits[:, -1].argmax(-1, keepdim=True)
            want = torch.cat([want, next_id], dim=1)
        got = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)


def assert_bitwise_equal(a: dict, b: dict) -> None:
    """Same names, dtypes, shapes and bits."""
    assert a.keys() == b.keys(), sorted(a.keys() ^ b.keys())[:10]
    differ = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not differ, differ[:10]


def assert_parity(report, padded: bool = False) -> None:
    """Logits within TOL, every next token the same, HF loss = megasmoe loss."""
    assert report.max_abs_logit_diff < TOL, report.summary()
    assert report.next_token_agreement == 1.0, report.summary()
    assert abs(report.hf_loss - report.megatron_loss_unpadded) < TOL, report.summary()
    if not padded:  # vocabulary without megatron padding: the training loss itself
        assert abs(report.hf_loss - report.megatron_loss) < TOL, report.summary()


# ----------------------------------------------------------------------------- trained runs


class TrainedRuns:
    """Runs of the tiny model trained at several layouts, and their exports (lazily)."""

    def __init__(self, root: Path):
        self.root = root
        self._exports: dict = {}

    def run(self, layout: str) -> Path:
        run_dir = self.root / layout
        if not (run_dir / "checkpoints" / "latest").exists():
            overrides = [o.format(root=self.root) for o in LAYOUTS[layout]]
            (self.root / "steering.json").write_text(json.dumps(STEERING))
            nproc = 4 if "parallel.world_size=4" in overrides else 2
            run_megasmoe(["pretrain", "configs/tiny-cpu.yaml", *TRAIN, f"run.dir={run_dir}",
                          *overrides], nproc=nproc)
        return run_dir

    def export(self, layout: str):
        if layout not in self._exports:
            out = self.root / f"{layout}_hf"
            # Small shards so the index really spans several files.
            self._exports[layout] = to_hf(self.run(layout), out, max_shard_size=4 * 2**20)
        return self._exports[layout]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> TrainedRuns:
    return TrainedRuns(tmp_path_factory.mktemp("convert_trained"))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_export_matches_megasmoe_logits_and_loss(trained, layout):
    from megasmoe.data.tokenizer import load_tokenizer
    from transformers import AutoTokenizer

    report = trained.export(layout)
    out = report.out_dir
    mixed = layout == "pp2_mixed"
    architecture = {"pp2_mixed": "Qwen2MoeForCausalLM", "tp2_pp2": "Qwen2MoeForCausalLM",
                    "tp2_qknorm": "OlmoeForCausalLM", "ep2_hyper": "GptOssForCausalLM",
                    "tp2_steer": "GptOssForCausalLM"}.get(layout, "MixtralForCausalLM")
    assert report.architecture == architecture
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and shards == set(report.files)
    assert all((out / f).is_file() for f in shards)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [architecture]
    vocab = 4000 if mixed else 4096
    assert (config["vocab_size"], config["num_experts_per_tok"]) == (vocab, 2)
    assert hf_tensors(out)["model.embed_tokens.weight"].shape == (vocab, 128)  # un-padded
    if layout == "tp2_pp2":  # the trained q/k/v biases, written as Qwen2-MoE's
        assert hf_tensors(out)["model.layers.3.self_attn.k_proj.bias"].abs().max() > 0
    if architecture == "GptOssForCausalLM":  # a per-expert router bias, no remote code
        assert_router_bias(out, "model.layers.{}.mlp.router.bias", config["num_hidden_layers"])
        assert "auto_map" not in config and not list(out.glob("*.py"))
    if mixed:  # megasmoe's learned shared-expert gate, written as Qwen2-MoE's
        assert hf_tensors(out)["model.layers.0.mlp.shared_expert_gate.weight"].abs().max() > 0
        assert (config["mlp_only_layers"], config["shared_expert_intermediate_size"],
                config["norm_topk_prob"], config["num_key_value_heads"]) == ([1], 64, False, 2)
    data_tokenizer = json.loads((report.checkpoint / "megasmoe.json").read_text())[
        "config"]["data"]["tokenizer"]
    if data_tokenizer:  # the run's data tokenizer comes along and encodes like training did
        assert report.tokenizer == Path(data_tokenizer) and not report.notes
        hf_tok = AutoTokenizer.from_pretrained(str(out))
        assert hf_tok(SAMPLE_TEXT, add_special_tokens=False)["input_ids"] == \
            load_tokenizer(data_tokenizer).encode(SAMPLE_TEXT)
        generation = json.loads((out / "generation_config.json").read_text())
        assert generation["eos_token_id"] == load_tokenizer(data_tokenizer).eod
    else:  # mock data: no tokenizer
        assert report.tokenizer is None and not (out / "tokenizer_config.json").exists()
    assert_parity(verify(trained.run(layout), out, eval_token_ids(vocab, out)), padded=mixed)


def _copy_checkpoint(trained, tmp_path: Path) -> Path:
    src = trained.run("ep2") / "checkpoints" / "iter_0000010"
    dst = tmp_path / "iter_0000010"
    shutil.copytree(src, dst)
    return dst


def test_export_refuses_a_missing_expert_shard_file(trained, tmp_path):
    ckpt = _copy_checkpoint(trained, tmp_path)
    (ckpt / "__1_0.distcp").unlink()
    with pytest.raises(ConversionError) as err:
        to_hf(ckpt, tmp_path / "out")
    msg = str(err.value)
    assert "__1_0.distcp is missing" in msg
    assert "decoder.layers.mlp.experts.experts.linear_fc1.weight: layer 0 expert" in msg
    assert not (tmp_path / "out").exists()


def test_export_refuses_a_checkpoint_missing_an_expert_chunk(trained, tmp_path):
    """A checkpoint whose index simply lacks layer 2 / expert 5 (no file is damaged)."""
    from torch.distributed.checkpoint import FileSystemReader

    ckpt = _copy_checkpoint(trained, tmp_path)
    key = "decoder.layers.mlp.experts.experts.linear_fc2.weight"
    metadata = FileSystemReader(str(ckpt)).read_metadata()
    item = metadata.state_dict_metadata[key]
    item.chunks = [c for c in item.chunks if tuple(c.offsets[:2]) != (2, 5)]
    metadata.storage_data = {i: s for i, s in metadata.storage_data.items()
                             if not (i.fqn == key and tuple(i.offset[:2]) == (2, 5))}
    with open(ckpt / ".metadata", "wb") as f:
        pickle.dump(metadata, f)
    meta = json.loads((ckpt / "megasmoe.json").read_text())
    meta["manifest"][".metadata"] = (ckpt / ".metadata").stat().st_size  # files look complete
    (ckpt / "megasmoe.json").write_text(json.dumps(meta))
    with pytest.raises(ConversionError, match=r"linear_fc2\.weight: layer 2 expert 5 not "
                                              r"stored \(missing expert shard\)"):
        to_hf(ckpt, tmp_path / "out")


def test_export_refuses_token_dropping(trained, tmp_path):
    ckpt = _copy_checkpoint(trained, tmp_path)
    meta = json.loads((ckpt / "megasmoe.json").read_text())
    meta["config"]["moe"]["capacity_factor"] = 1.25
    (ckpt / "megasmoe.json").write_text(json.dumps(meta))
    with pytest.raises(ConversionError, match=r"^moe\.capacity_factor=1\.25 drops tokens"):
        to_hf(ckpt, tmp_path / "out")


# ----------------------------------------------------------------------------- HF round trips


def _hf_common() -> dict:
    return dict(vocab_size=300, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                tie_word_embeddings=False, bos_token_id=None, eos_token_id=None)


def perturb_qk_norms(model, seed: int) -> None:
    """Per-channel q/k norm weights (HF inits them to ones), so their layout matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
                norm.weight.copy_(1 + torch.randn(norm.weight.shape, generator=gen) / 4)


def build_hf(kind: str, **changes):
    """A tiny randomly initialised HF MoE model (transformers' own config classes)."""
    import transformers as tf

    torch.manual_seed(0)
    common = {**_hf_common(), **changes.pop("common", {})}
    if kind == "mixtral":
        return tf.MixtralForCausalLM(tf.MixtralConfig(
            **common, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, **changes))
    if kind in ("qwen2_moe", "qwen2_moe_real"):
        model = tf.Qwen2MoeForCausalLM(tf.Qwen2MoeConfig(
            **common, intermediate_size=96, moe_intermediate_size=32,
            shared_expert_intermediate_size=48, num_experts=4, num_experts_per_tok=2,
            norm_topk_prob=False, mlp_only_layers=[1], **changes))
        gen = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for layer in model.model.layers:
                if hasattr(layer.mlp, "shared_expert_gate"):
                    gate = layer.mlp.shared_expert_gate.weight
                    if kind == "qwen2_moe_real":  # as in Qwen's checkpoints
                        gate.copy_(torch.randn(gate.shape, generator=gen))
                    else:  # zero: what an ungated megasmoe model exports (sigmoid(0) * 2 W)
                        gate.zero_()
                if kind == "qwen2_moe_real":  # Qwen's attention has trained q/k/v biases
                    for proj in ("q_proj", "k_proj", "v_proj"):
                        bias = getattr(layer.self_attn, proj).bias
                        bias.copy_(torch.randn(bias.shape, generator=gen) / 10)
        return model
    if kind in ("glm4_moe", "glm4_moe_qk_norm", "glm4_moe_air"):
        air = kind == "glm4_moe_air"  # GLM-4.5-Air's attention: half RoPE, q/k/v biases
        common["rope_parameters"] = {**common["rope_parameters"],
                                     "partial_rotary_factor": 0.5 if air else 1.0}
        qk_norm = kind == "glm4_moe_qk_norm"
        model = tf.Glm4MoeForCausalLM(tf.Glm4MoeConfig(
            **common, intermediate_size=96, moe_intermediate_size=32, n_shared_experts=1,
            n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=1,
            routed_scaling_factor=2.5, num_mtp_layers=0, use_qk_norm=qk_norm,
            attention_bias=air, **changes))
        with torch.no_grad():  # a DeepSeek-V3 style selection bias
            gen = torch.Generator().manual_seed(1)
            for layer in model.model.layers[1:]:
                layer.mlp.gate.e_score_correction_bias.copy_(torch.randn(4, generator=gen) / 10)
            for layer in model.model.layers if air else []:
                for proj in ("q_proj", "k_proj", "v_proj"):
                    bias = getattr(layer.self_attn, proj).bias
                    bias.copy_(torch.randn(bias.shape, generator=gen) / 10)
        if qk_norm:
            perturb_qk_norms(model, seed=1)
        return model
    if kind == "qwen3_moe":
        model = tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(
            **common, head_dim=24, intermediate_size=96, moe_intermediate_size=32,
            num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[1],
            **changes))
        perturb_qk_norms(model, seed=4)
        return model
    if kind == "olmoe":
        model = tf.OlmoeForCausalLM(tf.OlmoeConfig(
            **common, intermediate_size=32, num_experts=4, num_experts_per_tok=2, **changes))
        perturb_qk_norms(model, seed=2)
        return model
    raise ValueError(kind)


def word_level_tokenizer(vocab_size: int):
    """A transformers tokenizer over SAMPLE_TEXT's words (with </s> as end of document)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted(set(SAMPLE_TEXT.replace(".", " ").replace(",", " ").split()))
    vocab = {"[UNK]": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    assert len(vocab) <= vocab_size
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="</s>")


class RoundTrips:
    """HF source -> megasmoe run -> HF export, per architecture (lazily)."""

    def __init__(self, root: Path):
        self.root = root
        self.done: dict = {}

    def get(self, kind: str):
        if kind not in self.done:
            src, run, back = (self.root / f"{kind}_{p}" for p in ("src", "run", "back"))
            build_hf(kind).save_pretrained(str(src))
            if kind == "mixtral":
                word_level_tokenizer(300).save_pretrained(str(src))
            imported = from_hf(src, run)
            exported = to_hf(run, back)
            self.done[kind] = (src, run, back, imported, exported)
        return self.done[kind]


@pytest.fixture(scope="module")
def round_trips(tmp_path_factory) -> RoundTrips:
    return RoundTrips(tmp_path_factory.mktemp("convert_round_trip"))


ROUND_TRIP = {
    "mixtral": ("MixtralForCausalLM", {"name": "topk", "score_function": "softmax",
                                       "pre_softmax": False}),
    "qwen2_moe": ("Qwen2MoeForCausalLM", {"name": "topk", "score_function": "softmax",
                                          "pre_softmax": True}),
    # As Qwen's checkpoints: a nonzero shared-expert gate (moe.shared_expert_gate=true)
    # and nonzero q/k/v biases (model.qkv_bias=true).
    "qwen2_moe_real": ("Qwen2MoeForCausalLM", {"name": "topk", "score_function": "softmax",
                                                "pre_softmax": True}),
    "glm4_moe": ("Glm4MoeForCausalLM", {"name": "sigmoid_bias", "topk_scaling_factor": 2.5}),
    # GLM-4.5-Air's attention: model.rotary_percent=0.5, model.qkv_bias=true.
    "glm4_moe_air": ("Glm4MoeForCausalLM", {"name": "sigmoid_bias",
                                            "topk_scaling_factor": 2.5}),
    # GLM4-MoE's per-head q/k norms (use_qk_norm): model.qk_norm=head.
    "glm4_moe_qk_norm": ("Glm4MoeForCausalLM", {"name": "sigmoid_bias",
                                                "topk_scaling_factor": 2.5}),
    # Per-head q/k norms (model.qk_norm=head), head_dim 24 != 64 / 4, a dense layer.
    "qwen3_moe": ("Qwen3MoeForCausalLM", {"name": "topk", "score_function": "softmax",
                                          "pre_softmax": False}),
    # OLMoE's full-width q/k norms: megasmoe's model.qk_norm=full.
    "olmoe": ("OlmoeForCausalLM", {"name": "topk", "score_function": "softmax",
                                   "pre_softmax": True}),
}


@pytest.mark.parametrize("kind", list(ROUND_TRIP))
def test_hf_round_trip_is_bitwise_and_logits_match(round_trips, kind):
    src, run, back, imported, exported = round_trips.get(kind)
    architecture, router = ROUND_TRIP[kind]
    assert imported.router == router
    assert exported.architecture == architecture
    assert_bitwise_equal(hf_tensors(src), hf_tensors(back))
    a, b = (json.loads((d / "config.json").read_text()) for d in (src, back))
    for field in ("num_hidden_layers", "hidden_size", "num_key_value_heads", "vocab_size",
                  "num_experts_per_tok", "norm_topk_prob", "mlp_only_layers",
                  "shared_expert_intermediate_size", "first_k_dense_replace",
                  "routed_scaling_factor", "n_shared_experts"):
        assert a.get(field) == b.get(field), field
    if kind.startswith("qwen2_moe"):
        real = str(kind == "qwen2_moe_real").lower()
        config = (run / "config.yaml").read_text()
        assert f"shared_expert_gate: {real}" in config and f"qkv_bias: {real}" in config
    # megasmoe's own model (megatron, world size 1) against the source HF model.
    assert_parity(verify(run, src, eval_token_ids(300, back)), padded=True)
    if kind == "mixtral":  # the tokenizer travels: HF -> run's data.tokenizer -> HF
        from transformers import AutoTokenizer

        config = (run / "config.yaml").read_text()
        assert f"tokenizer: {run / 'tokenizer' / 'tokenizer.json'}" in config
        assert "source: mock" in config
        a_tok, b_tok = (AutoTokenizer.from_pretrained(str(d)) for d in (src, back))
        assert a_tok(SAMPLE_TEXT)["input_ids"] == b_tok(SAMPLE_TEXT)["input_ids"]
        assert b_tok.eos_token == "</s>"


def test_training_resumes_from_an_import(round_trips, tmp_path):
    """``bash launch/pretrain.sh <import>/config.yaml`` continues training the import.

    The import is a weights-only checkpoint at step 0: the trainer loads the weights
    (resharded to EP=2), starts a fresh optimizer, and runs 3 steps at EP=2.
    """
    _, run, _, _, _ = round_trips.get("mixtral")
    run_dir = tmp_path / "continued"
    shutil.copytree(run, run_dir)
    config = (run_dir / "config.yaml").read_text().replace(f"dir: {run}", f"dir: {run_dir}")
    (run_dir / "config.yaml").write_text(config)
    cmd = ["bash", "launch/pretrain.sh", str(run_dir / "config.yaml"), "train.steps=3",
           "train.warmup_steps=1", "train.log_interval=1", "train.eval_interval=0",
           "train.eval_iters=1", "train.seq_length=32", "parallel.world_size=2",
           "parallel.ep=2", "logging.progress=false"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**env, "OMP_NUM_THREADS": "1", "MEGASMOE_LAUNCH": "local"})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert f"resumed from {run_dir}/checkpoints/iter_0000000 at step 0" in out
    losses = [r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "iter_0000003"


@pytest.mark.parametrize("kind, changes, message", [
    ("olmoe", {"clip_qkv": 8.0}, r"^clip_qkv: 8\.0"),
    ("mixtral", {"sliding_window": 16}, r"^sliding_window: 16"),
    ("mixtral", {"hidden_act": "gelu"}, r"^hidden_act: 'gelu'"),
])
def test_import_refuses_what_megasmoe_cannot_represent(tmp_path, kind, changes, message):
    model = build_hf(kind, **changes)
    model.save_pretrained(str(tmp_path / "src"))
    with pytest.raises(ConversionError, match=message):
        from_hf(tmp_path / "src", tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


# ----------------------------------------------------------------------------- every router

SMALL = ["model.num_layers=2", "model.hidden_size=64", "model.num_heads=4",
         "model.vocab_size=512", "moe.num_experts=4", "moe.ffn_hidden_size=64",
         "train.seq_length=32", "parallel.world_size=1", "parallel.ep=1",
         "train.global_batch_size=1", "train.micro_batch_size=1", "train.precision=fp32"]


def make_checkpoint(run_dir: Path, overrides: list[str], mutate=None) -> Path:
    """An untrained megasmoe checkpoint (layout-invariant init), saved weights-only."""
    from megasmoe.config import load_config, validate
    from megasmoe.convert.runtime import single_process
    from megasmoe.convert.weights_only import save_weights_only
    from megasmoe.model import build_model_chunks, layout_invariant_init, to_transformer_config

    cfg = validate(load_config("configs/tiny-cpu.yaml",
                               [*SMALL, *overrides, f"run.dir={run_dir}"]), 1)
    with single_process(cfg), torch.no_grad():
        chunks = build_model_chunks(cfg, to_transformer_config(cfg))
        layout_invariant_init(chunks, cfg.run.seed, cfg.model.init_std, cfg.model.num_layers)
        if mutate is not None:
            mutate(chunks)
        save_weights_only(chunks, cfg, run_dir / "checkpoints", {})
    return run_dir


def random_expert_bias(chunks) -> None:
    gen = torch.Generator().manual_seed(0)
    for name, buf in chunks[0].named_buffers():
        if name.endswith("router.expert_bias"):
            buf.copy_(torch.randn(buf.shape, generator=gen) / 20)


def random_qkv_bias(chunks) -> None:
    gen = torch.Generator().manual_seed(0)
    for name, param in chunks[0].named_parameters():
        if name.endswith("linear_qkv.bias"):
            param.copy_(torch.randn(param.shape, generator=gen) / 10)


@pytest.fixture(scope="module")
def steering_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("steer") / "steering.json"
    path.write_text(json.dumps({"mode": "additive", "lambda": 0.5,
                                "experts": {"0": [1], "1": [2, 3]}}))
    return path


EXPORTABLE = {
    # case: (overrides, architecture, experts per token)
    "topk": ([], "MixtralForCausalLM", 2),
    "topk_pre_softmax": (["moe.router.pre_softmax=true"], "Qwen2MoeForCausalLM", 2),
    "topk_sigmoid": (["moe.router.score_function=sigmoid"], "Glm4MoeForCausalLM", 2),
    "topk_scaled": (["moe.router.topk_scaling_factor=1.5"], "MixtralForCausalLM", 2),
    "sigmoid_bias": (["moe.router.name=sigmoid_bias"], "Glm4MoeForCausalLM", 2),
    "sigmoid_qk_norm_head": (["moe.router.score_function=sigmoid", "model.qk_norm=head"],
                             "Glm4MoeForCausalLM", 2),
    # GLM-4.5-style attention: RoPE on half of each head, q/k/v biases (random).
    "sigmoid_partial_rope_qkv_bias": (["moe.router.score_function=sigmoid",
                                       "model.rotary_percent=0.5", "model.qkv_bias=true"],
                                      "Glm4MoeForCausalLM", 2),
    "xmoe": (["moe.router.name=xmoe"], "MixtralForCausalLM", 2),
    "stablemoe": (["moe.router.name=stablemoe"], "MixtralForCausalLM", 2),
    "smoe_dropout": (["moe.router.name=smoe_dropout", "moe.aux_loss_type=none",
                      "moe.router.inference_k=3"], "MixtralForCausalLM", 3),
    "domain_steer_no_file": (["moe.router.name=domain_steer"], "MixtralForCausalLM", 2),
    "spectral_c0": (["moe.router.name=spectral", "moe.router.c=0.0", "moe.router.k_svd=8"],
                    "MixtralForCausalLM", 2),
    "tied_gqa": (["model.share_embeddings=true", "model.num_query_groups=2"],
                 "MixtralForCausalLM", 2),
    "head_dim": (["model.head_dim=24"], "MixtralForCausalLM", 2),
    "qk_norm_head": (["model.qk_norm=head", "model.head_dim=24", "moe.layer_freq=[0,1]",
                      "model.ffn_hidden_size=96"], "Qwen3MoeForCausalLM", 2),
    "dense_shared_padded": (["moe.layer_freq=[0,1]", "moe.shared_expert_size=48",
                             "model.ffn_hidden_size=96", "model.vocab_size=500"],
                            "Qwen2MoeForCausalLM", 2),
    # A per-expert router logit bias: GPT-OSS (its router bias), no remote code.
    "hyper": (["moe.router.name=hyper"], "GptOssForCausalLM", 2),
    "domain_steer": (["moe.router.name=domain_steer", "moe.router.file={steering}"],
                     "GptOssForCausalLM", 2),
    "hyper_gqa_qkv_bias_tied": (["moe.router.name=hyper", "model.num_query_groups=2",
                                 "model.qkv_bias=true", "model.head_dim=24",
                                 "model.share_embeddings=true"], "GptOssForCausalLM", 2),
    "hyper_bf16": (["moe.router.name=hyper", "train.precision=bf16"], "GptOssForCausalLM", 2),
    # S2MoE's inference is one noise-free pass with inference_k (default moe.topk // 2).
    "stochastic": (["moe.router.name=stochastic"], "MixtralForCausalLM", 1),
}


@pytest.mark.parametrize("case", list(EXPORTABLE))
def test_router_exports_with_logit_parity(tmp_path, steering_file, case):
    overrides, architecture, k = EXPORTABLE[case]
    overrides = [o.format(steering=steering_file) for o in overrides]
    mutate = {"sigmoid_bias": random_expert_bias,
              "sigmoid_partial_rope_qkv_bias": random_qkv_bias,
              "hyper_gqa_qkv_bias_tied": random_qkv_bias}.get(case)
    run = make_checkpoint(tmp_path / "run", overrides, mutate)
    report = to_hf(run, tmp_path / "hf")
    assert report.architecture == architecture and report.routing.topk == k
    assert not report.dropped
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    vocab = 500 if case == "dense_shared_padded" else 512
    assert config["vocab_size"] == vocab
    if case == "sigmoid_bias":
        bias = hf_tensors(tmp_path / "hf")["model.layers.0.mlp.gate.e_score_correction_bias"]
        assert bias.abs().max() > 0
    if architecture == "GptOssForCausalLM":
        assert_router_bias(tmp_path / "hf", "model.layers.{}.mlp.router.bias", 2)
        assert "auto_map" not in config and not list((tmp_path / "hf").glob("*.py"))
        assert "readers: GPT-OSS with its extras made inert" in report.summary()
        assert_gpt_oss_experts_are_the_checkpoints(run, tmp_path / "hf")
        with pytest.raises(ConversionError, match=r"^model_type='gpt_oss' is an export target"):
            from_hf(tmp_path / "hf", tmp_path / "back")
        if case == "hyper":  # generate (KV cache, sinks, masks) is greedy by its own logits
            assert_greedy_generate_matches_logits(tmp_path / "hf", eval_token_ids(vocab))
    assert_parity(verify(run, tmp_path / "hf", eval_token_ids(vocab)),
                  padded=case == "dense_shared_padded")


REFUSED = {
    "unified": (["moe.router.name=unified", "moe.dispatcher=allgather"],
                r"^router unified cannot be exported to a standard architecture; its "
                r"cross-token top-k .*; its W_r was trained under this cross-token "
                r"selection, .*train with topk$"),
    "spectral": (["moe.router.name=spectral", "moe.router.k_svd=8"],
                 r"^router spectral cannot be exported to a standard architecture; "
                 r"moe\.router\.c=0\.5"),
    # A router logit bias with what GPT-OSS lacks: megasmoe's own architecture only.
    "hyper_shared_expert": (["moe.router.name=hyper", "moe.shared_expert_size=48"],
                            r"^router hyper cannot be exported to a standard architecture; "
                            r"layer 0 adds a per-expert bias to the router logits .*; GPT-OSS, "
                            r"the standard target with a router logit bias, cannot hold this "
                            r"model \(moe\.shared_expert_size=48 .*\); pass --remote-code"),
    "domain_steer_qk_norm": (["moe.router.name=domain_steer", "moe.router.file={steering}",
                              "model.qk_norm=head"],
                             r"^router domain_steer cannot be exported to a standard "
                             r"architecture; layer 0 adds a per-expert bias .* \(model\."
                             r"qk_norm=head"),
    "vq": (["moe.router.name=vq"],
           r"^router vq cannot be exported to a standard architecture; VQMoE adds to every "
           r"token the expert its nearest codebook entry picks, .*--remote-code architecture "
           r"does not implement either; dropping that branch would change the model$"),
    "sigmoid_dense_in_between": (["moe.router.score_function=sigmoid", "moe.layer_freq=[1,0]"],
                                 r"glm4_moe: moe\.layer_freq puts dense layers after MoE "
                                 r"layers"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_unsupported_router_or_config_is_refused(tmp_path, steering_file, case):
    overrides, message = REFUSED[case]
    overrides = [o.format(steering=steering_file) for o in overrides]
    run = make_checkpoint(tmp_path / "run", overrides)
    with pytest.raises(ConversionError, match=message):
        to_hf(run, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


REMOTE = {
    # A router logit bias with --remote-code: megasmoe's own architecture before GPT-OSS
    # (exact in every dtype, where GPT-OSS adds 1 to its up projection).
    "hyper": ["moe.router.name=hyper"],
    "domain_steer": ["moe.router.name=domain_steer", "moe.router.file={steering}"],
    "hyper_qk_norm_head": ["moe.router.name=hyper", "model.qk_norm=head"],
    # ... with everything else the remote architecture holds.
    "hyper_mixed": ["moe.router.name=hyper", "moe.layer_freq=[0,1]", "moe.shared_expert_size=48",
                    "moe.shared_expert_gate=true", "model.ffn_hidden_size=96",
                    "model.qkv_bias=true", "model.qk_norm=full", "model.num_query_groups=2",
                    "model.head_dim=24", "model.rotary_percent=0.5",
                    "model.share_embeddings=true", "model.vocab_size=500"],
}


@pytest.mark.parametrize("case", list(REMOTE))
def test_router_logit_bias_exports_with_remote_code(tmp_path, steering_file, case):
    """--remote-code: hyper's generated bias and DSMoE's steering bias as megasmoe's own
    architecture, exact by logits."""
    from transformers import AutoModelForCausalLM

    overrides = [o.format(steering=steering_file) for o in REMOTE[case]]
    run = make_checkpoint(tmp_path / "run", overrides)
    out = tmp_path / "hf"
    report = to_hf(run, out, remote_code=True)
    assert report.architecture == "MegasmoeMoeForCausalLM" and not report.dropped
    assert "readers: megasmoe's own architecture: load with trust_remote_code=True" in \
        report.summary()
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "megasmoe_moe" and config["router_bias"] is True
    assert config["auto_map"]["AutoModelForCausalLM"] == \
        "modeling_megasmoe.MegasmoeMoeForCausalLM"
    assert (out / "modeling_megasmoe.py").is_file()
    moe_layer = 1 if case == "hyper_mixed" else 0
    bias = hf_tensors(out)[f"model.layers.{moe_layer}.mlp.gate.bias"]
    assert bias.abs().max() > 0 and bias.max() > bias.min()
    vocab = 500 if case == "hyper_mixed" else 512
    assert_parity(verify(run, out, eval_token_ids(vocab)), padded=case == "hyper_mixed")
    # Never a silent plain model: without trust_remote_code transformers refuses it.
    with pytest.raises(Exception, match="trust_remote_code"):
        AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=False)
    if case == "hyper":  # generate (no KV cache) is greedy decoding by its own logits
        assert_greedy_generate_matches_logits(out, eval_token_ids(vocab), remote_code=True)


def test_gpt_oss_needs_a_transformers_that_reads_its_swiglu_fields(tmp_path, monkeypatch):
    """A transformers that hard-codes GPT-OSS's activation would load a different model:
    the logit bias is then refused, naming transformers."""
    from megasmoe.convert.archs import gpt_oss

    monkeypatch.setattr(gpt_oss, "_honours_swiglu_fields", lambda: False)
    run = make_checkpoint(tmp_path / "run", ["moe.router.name=hyper"])
    with pytest.raises(ConversionError, match=r"cannot hold this model \(transformers .* "
                                              r"hard-codes GPT-OSS's SwiGLU"):
        to_hf(run, tmp_path / "hf")


def test_gpt_oss_folds_a_routing_scaling_factor_into_down_projections():
    """GPT-OSS has no routed scaling factor: x s folds into the down projections."""
    from megasmoe.convert.archs import Tensors
    from megasmoe.convert.archs.gpt_oss import _experts

    gen = torch.Generator().manual_seed(0)
    canon = {f"layers.0.experts.{n}": torch.randn(shape, generator=gen)
             for n, shape in (("gate", (2, 3, 4)), ("up", (2, 3, 4)), ("down", (2, 4, 3)))}
    plain = _experts(Tensors(canon, "test"), 0, "e", None)
    scaled = _experts(Tensors(canon, "test"), 0, "e", 1.5)
    assert torch.equal(scaled["e.down_proj"], plain["e.down_proj"] * 1.5)
    assert torch.equal(scaled["e.gate_up_proj"], plain["e.gate_up_proj"])


def test_remote_code_is_a_last_resort_without_a_logit_bias(tmp_path):
    """A model without a router logit bias that a standard architecture holds is written
    as that one even with --remote-code."""
    run = make_checkpoint(tmp_path / "run", [])
    report = to_hf(run, tmp_path / "hf", remote_code=True)
    assert report.architecture == "MixtralForCausalLM"
    assert not (tmp_path / "hf" / "modeling_megasmoe.py").exists()


def test_allow_drop_keeps_a_bias_gpt_oss_holds(tmp_path):
    run = make_checkpoint(tmp_path / "run", ["moe.router.name=hyper"])
    report = to_hf(run, tmp_path / "hf", allow_drop=True)
    assert report.architecture == "GptOssForCausalLM" and not report.dropped


def test_a_bias_that_is_not_the_only_obstacle_is_not_blamed_or_dropped(tmp_path):
    """Without its bias no standard target holds this model either: the error lists
    every target's reason, and --allow-drop drops nothing."""
    run = make_checkpoint(tmp_path / "run", ["moe.router.name=hyper", "model.qk_norm=full",
                                             "moe.shared_expert_size=48"])
    for allow_drop in (False, True):
        with pytest.raises(ConversionError, match=r"^no standard architecture holds this model "
                                                  r"exactly \(mixtral: .*; olmoe: moe\."
                                                  r"shared_expert_size=48"):
            to_hf(run, tmp_path / "hf", allow_drop=allow_drop)


def test_allow_drop_exports_without_the_bias_and_says_so(tmp_path):
    run = make_checkpoint(tmp_path / "run", ["moe.router.name=hyper", "moe.shared_expert_size=48"])
    report = to_hf(run, tmp_path / "hf", allow_drop=True)
    assert report.architecture == "Qwen2MoeForCausalLM"
    assert report.dropped == ["layer 0: router logit bias of hyper",
                              "layer 1: router logit bias of hyper"]
    assert "DROPPED (--allow-drop)" in report.summary()
    parity = verify(run, tmp_path / "hf", eval_token_ids(512))  # loads; routing differs
    assert 0 < parity.max_abs_logit_diff


# ----------------------------------------------------------------------------- tokenizer, CLI


@pytest.fixture(scope="module")
def sentencepiece_model(tmp_path_factory) -> Path:
    """A tokenizer as megasmoe's data pipeline trains them (lossless SentencePiece BPE)."""
    from megasmoe.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("spm")
    return train_tokenizer(None, root / "sp", vocab_size=300, texts=[SAMPLE_TEXT * 20] * 5)


def test_tokenizer_from_the_run_config_is_exported(tmp_path, sentencepiece_model):
    """A SentencePiece model named by a config field (as the data pipeline will write it)."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    run = make_checkpoint(tmp_path / "run", [])
    meta_path = run / "checkpoints" / "iter_0000000" / "megasmoe.json"
    original = meta_path.read_text()
    meta = json.loads(original)
    meta["config"]["data"]["tokenizer_model"] = str(sentencepiece_model)
    meta_path.write_text(json.dumps(meta))
    report = to_hf(run, tmp_path / "hf")
    meta_path.write_text(original)  # megasmoe's config has no such field yet (verify builds it)
    assert report.tokenizer == sentencepiece_model
    assert report.notes == []  # transformers' conversion agrees with SentencePiece
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    sp = spm.SentencePieceProcessor(model_file=str(sentencepiece_model))
    for text in (SAMPLE_TEXT, "  spaces\tand\n\nlines 123 ünï 🤖 "):
        ids = sp.encode(text)
        assert tok(text, add_special_tokens=False)["input_ids"] == ids
        assert tok.decode(ids) == sp.decode(ids) == text
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (1, 2, 3)
    ids = eval_token_ids(512, tmp_path / "hf")  # real text now
    assert ids.tolist()[0][:5] == sp.encode(SAMPLE_TEXT)[:5]
    assert_parity(verify(run, tmp_path / "hf", ids))


def test_foreign_sentencepiece_conversion_mismatch_is_reported(tmp_path):
    """A SentencePiece model with its default rules (dummy prefix, NFKC): transformers'
    conversion does not encode like it, and the export says so."""
    import sentencepiece as spm

    (tmp_path / "corpus.txt").write_text((SAMPLE_TEXT + "\n") * 50)
    spm.SentencePieceTrainer.train(input=str(tmp_path / "corpus.txt"),
                                   model_prefix=str(tmp_path / "sp"), vocab_size=120,
                                   model_type="bpe", minloglevel=2)
    run = make_checkpoint(tmp_path / "run", [])
    report = to_hf(run, tmp_path / "hf", tokenizer=tmp_path / "sp.model")
    assert len(report.notes) == 1 and "differs from SentencePiece" in report.notes[0]
    assert "note: tokenizer: transformers' conversion" in report.summary()


def test_tokenizer_json_in_the_run_dir_is_exported(tmp_path):
    from transformers import AutoTokenizer

    run = make_checkpoint(tmp_path / "run", [])
    tokenizer = word_level_tokenizer(512).backend_tokenizer
    tokenizer.save(str(run / "tokenizer.json"))
    report = to_hf(run, tmp_path / "hf")
    assert report.tokenizer == run / "tokenizer.json"
    hf_tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert hf_tok(SAMPLE_TEXT, add_special_tokens=False)["input_ids"] == \
        tokenizer.encode(SAMPLE_TEXT).ids
    assert hf_tok.eos_token == "</s>"  # the end-of-document token training used


def test_cli_handlers(tmp_path, capsys):
    import argparse

    parser = argparse.ArgumentParser(prog="megasmoe")
    add_subcommand(parser.add_subparsers(dest="command", required=True))
    run = make_checkpoint(tmp_path / "run", ["moe.router.name=unified",
                                             "moe.dispatcher=allgather"])
    args = parser.parse_args(["convert", "to-hf", str(run), str(tmp_path / "hf")])
    assert args.fn(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("megasmoe: convert error: router unified cannot be exported")
    assert len(err.splitlines()) == 1
    good = make_checkpoint(tmp_path / "good", [])
    args = parser.parse_args(["convert", "to-hf", str(good), str(tmp_path / "hf2")])
    assert args.fn(args) == 0
    args = parser.parse_args(["convert", "verify", str(good), str(tmp_path / "hf2")])
    assert args.fn(args) == 0
    out = capsys.readouterr().out
    assert "architecture MixtralForCausalLM" in out and "next-token agreement    1.0000" in out
    assert "tokens: random token ids (seed 0)" in out
    assert out.strip().splitlines()[-1].startswith("PASS: max |logit difference|")
    # Shards readable like any new file (some safetensors versions write 0600).
    umask = os.umask(0)
    os.umask(umask)
    assert all((f.stat().st_mode & 0o777) == 0o666 & ~umask
               for f in (tmp_path / "hf2").glob("*.safetensors"))
    hyper = make_checkpoint(tmp_path / "hyper", ["moe.router.name=hyper"])
    args = parser.parse_args(["convert", "to-hf", str(hyper), str(tmp_path / "hf3"),
                              "--remote-code"])
    assert args.fn(args) == 0
    assert "architecture MegasmoeMoeForCausalLM" in capsys.readouterr().out
    # A model that is not the checkpoint's: FAIL and exit 1 (usable as a script gate).
    args = parser.parse_args(["convert", "verify", str(good), str(tmp_path / "hf3")])
    assert args.fn(args) == 1
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith(
        "FAIL: max |logit difference|")


def test_cli_verify_on_text_with_the_exports_tokenizer(trained, tmp_path, capsys):
    import argparse

    report = trained.export("ep2")
    parser = argparse.ArgumentParser(prog="megasmoe")
    add_subcommand(parser.add_subparsers(dest="command", required=True))
    text = tmp_path / "text.txt"
    text.write_text(SAMPLE_TEXT * 10)
    args = parser.parse_args(["convert", "verify", str(trained.run("ep2")),
                              str(report.out_dir), "--text", str(text)])
    assert args.fn(args) == 0
    out = capsys.readouterr().out
    assert f"tokens: 2 x 33 tokens of {text} (the export's tokenizer)" in out
    assert out.strip().splitlines()[-1].startswith("PASS")
    text.write_text("Hi.")
    assert args.fn(args) == 2
    assert "fewer than one row of --length 33" in capsys.readouterr().err


def test_cli_names_the_install_command_without_the_hf_extra(tmp_path, capsys, monkeypatch):
    import argparse
    import importlib.util

    from megasmoe.convert import cli

    real = importlib.util.find_spec
    monkeypatch.setattr(cli.importlib.util, "find_spec",
                        lambda name, *a: None if name == "transformers" else real(name, *a))
    parser = argparse.ArgumentParser(prog="megasmoe")
    add_subcommand(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["convert", "to-hf", str(tmp_path / "run"), str(tmp_path / "hf")])
    assert args.fn(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("megasmoe: convert error: transformers not installed: conversion needs the "
                   "'hf' extra; run `bash launch/setup.sh hf` (or pip install 'megasmoe[hf]')")
    assert not (tmp_path / "hf").exists()


def test_module_entry_point_prints_one_line_errors(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "megasmoe.convert", "to-hf",
                           str(tmp_path / "nothing"), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(
        f"megasmoe: convert error: {tmp_path / 'nothing'}: no megasmoe checkpoint")
