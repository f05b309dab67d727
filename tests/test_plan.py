"""Recipes and the planner: published parameter counts, validated layouts, the CLI.

Parameter counts are taken from megatron-core's GPTModel as megasmoe builds it (world
size 1, gloo, on the meta device: shapes without memory), and must equal the published
totals and active counts within 2% (they are published to 0.1B, rounded or cut; in
practice the totals agree to 0.3% and Mixtral's to the parameter); the planner's own
count must equal the built model's exactly. Commands run as a user types them.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO

from megasmoe.config import ConfigError, load_config, validate
from megasmoe.plan import Hardware, count_parameters, search_layouts

# (published total, published active) in billions, at the precision published.
PUBLISHED = {
    "mixtral-8x7b": (46.7, 12.9),    # Mistral AI, Mixtral of Experts (2024)
    "olmoe-1b-7b": (6.9, 1.3),       # Muennighoff et al., OLMoE (2024)
    "qwen3-30b-a3b": (30.5, 3.3),    # Qwen3 technical report (2025)
    "deepseek-moe-16b": (16.4, 2.8),  # Dai et al., DeepSeekMoE (2024)
}
TOO_FEW = {"mixtral-8x7b": 8, "olmoe-1b-7b": 1, "qwen3-30b-a3b": 2, "deepseek-moe-16b": 1}
NODES = {"mixtral-8x7b": 4, "olmoe-1b-7b": 1, "qwen3-30b-a3b": 2, "deepseek-moe-16b": 1}
RECIPES = [*PUBLISHED, "router-small"]


def megasmoe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megasmoe.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def _meta_counts(cfg) -> tuple[int, int]:
    """(total, active) of the real model built on the meta device at world size 1."""
    import torch

    from megasmoe.convert.runtime import single_process
    from megasmoe.model import build_model_chunks, to_transformer_config

    with single_process(cfg), torch.device("meta"):
        (model,) = build_model_chunks(cfg, to_transformer_config(cfg))
        total = experts = 0
        for name, param in model.named_parameters():
            assert param.device.type == "meta", name  # nothing allocated
            total += param.numel()
            experts += param.numel() if ".mlp.experts." in name else 0
    return total, total - experts + experts * cfg.moe.topk // cfg.moe.num_experts


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_recipe_parameters_are_the_published_models(name):
    # One process, TP=1: the vocabulary is padded to a multiple of 128 (all four
    # published vocabularies already are: 32000, 50304, 151936, 102400).
    cfg = validate(load_config(f"configs/{name}.yaml", [
        "parallel.world_size=1", "parallel.tp=1", "parallel.sp=false", "parallel.pp=1",
        "parallel.ep=1", "parallel.etp=1", "train.global_batch_size=1",
        "train.micro_batch_size=1"]), 1)
    total, active = _meta_counts(cfg)
    want_total, want_active = PUBLISHED[name]
    # Published to 0.1B, rounded or cut (Qwen3's 3.35B active is published as 3.3B).
    assert total / 1e9 == pytest.approx(want_total, rel=0.02), total
    assert active / 1e9 == pytest.approx(want_active, rel=0.02), active
    count = count_parameters(cfg)
    assert (count.total, count.active) == (total, active)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_checks_and_launches_on_its_nodes(name):
    check = megasmoe("check", f"configs/{name}.yaml")
    assert check.returncode == 0, check.stderr
    nodes = NODES.get(name, 1)
    ws = load_config(f"configs/{name}.yaml").parallel.world_size
    dry = megasmoe("launch", "--dry-run", "--nodes", str(nodes), "--nproc-per-node",
                   str(ws // nodes), f"configs/{name}.yaml")
    assert dry.returncode == 0, dry.stderr
    assert f"--nnodes={nodes}" in dry.stdout


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_recipe_fits_its_gpus_and_is_refused_on_too_few(name):
    ok = megasmoe("plan", f"configs/{name}.yaml", "--gpu-memory", "80GB")
    assert ok.returncode == 0, ok.stderr
    assert "fits in 80 GB" in ok.stdout
    few = megasmoe("plan", f"configs/{name}.yaml", "--gpus", str(TOO_FEW[name]), "--gpu-memory", "80GB",
                   "--layouts")
    assert few.returncode == 2 and few.stdout == ""
    lines = few.stderr.strip().splitlines()
    assert lines and all(line.startswith("megasmoe: plan: ") for line in lines)
    assert any("GB per GPU > 80 GB" in line for line in lines), few.stderr


def test_launch_refuses_a_recipe_on_too_few_nodes():
    dry = megasmoe("launch", "--dry-run", "--nodes", "1", "--nproc-per-node", "8",
                   "configs/mixtral-8x7b.yaml")
    assert dry.returncode == 2
    (line,) = dry.stderr.strip().splitlines()
    assert "needs 32 processes" in line and "8" in line


def test_layouts_listed_are_the_ones_that_validate():
    """Every listed layout passes megasmoe check at that GPU count, and fits."""
    cfg = load_config("configs/olmoe-1b-7b.yaml")
    plans, problems = search_layouts(cfg, Hardware(gpus=16, memory_gb=80))
    assert plans and not problems
    for plan in plans:
        assert plan.memory.total <= 80 * 2**30
        p, t = plan.cfg.parallel, plan.cfg.train
        overrides = [f"parallel.{k}={getattr(p, k)}" for k in ("tp", "pp", "ep", "etp", "cp")]
        overrides += [f"parallel.vpp={p.vpp if p.vpp else 'null'}", f"parallel.sp={p.sp}",
                      "parallel.world_size=16", f"train.recompute={t.recompute}",
                      f"train.distributed_optimizer={t.distributed_optimizer}"]
        validate(load_config("configs/olmoe-1b-7b.yaml", overrides), 16)
    out = megasmoe("plan", "configs/olmoe-1b-7b.yaml", "--gpus", "16", "--gpu-memory", "80GB",
                   "--layouts", "--top", "5")
    assert out.returncode == 0, out.stderr
    assert f"{len(plans)} layouts fit on 16 GPUs of 80 GB" in out.stdout
    assert plans[0].layout() in out.stdout


def test_plan_table_and_router_override():
    out = megasmoe("plan", "configs/qwen3-30b-a3b.yaml", "moe.router.name=sigmoid_bias",
                   "--gpu-memory", "80GB")
    assert out.returncode == 0, out.stderr
    for row in ("30.53B parameters, 3.35B active", "GFLOPs per token", "weights",
                "optimizer, distributed", "activations, full recompute", "fits in 80 GB",
                "ep ", "pp "):
        assert row in out.stdout, row


def test_plan_errors_are_one_line():
    bad = megasmoe("plan", "configs/olmoe-1b-7b.yaml", "--gpu-memory", "lots")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "megasmoe: config error: --gpu-memory='lots': write a size such as 80GB"]
    with pytest.raises(ConfigError):
        validate(load_config("configs/mixtral-8x7b.yaml"), 8)


@pytest.mark.parametrize("name", RECIPES)
def test_every_router_is_a_one_line_override(name):
    from megasmoe.routers import registered_routers

    # Three routers need a second override, which their one-line error names: smoe_dropout
    # is frozen (no balance loss), unified varies the experts per token (allgather), simsmoe
    # counts expert pairs in its forward, which activation recompute would run twice.
    extra = {"smoe_dropout": ["moe.aux_loss_type=none"], "unified": ["moe.dispatcher=allgather"],
             "simsmoe": ["train.recompute=false"]}
    for router in registered_routers():
        validate(load_config(f"configs/{name}.yaml",
                             [f"moe.router.name={router}", *extra.get(router, [])]))
