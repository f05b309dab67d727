"""Expert backends (moe.expert_backend): grouped equals sequential; checkpoints interchange.

* config: the replaced ``moe.grouped_gemm``, an unknown backend, ``te`` without
  Transformer Engine and FP8 with ``sequential`` are refused in one line (exit 2);
* module level (tests/experts_probe.py, the real GPTModel and its MoE layers built
  twice in one process, same layout-invariant weights): ``grouped`` gives the MoE-layer
  outputs, loss and every gradient of ``sequential`` within 1e-5 (in practice bitwise)
  at world size 1, EP=2 and ETP=2, and emits the same sharded checkpoint tensors (keys,
  global shapes, offsets, replica ids, values);
* training: 20 steps at EP=2 (2 processes) give the same losses with either backend;
  a checkpoint saved by one resumes with the other (steps 11 and 12 within 1e-5, the
  second after an optimizer step on the loaded Adam state);
* the distributed optimizer's state, saved by ``grouped`` at EP=2, resumes with
  ``sequential`` at DP=2;
* the HF export of a ``grouped`` run passes verify.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FAST, REPO, launch, run_megasmoe, train_losses

CONFIG = "configs/tiny-cpu.yaml"
PROBE = REPO / "tests" / "experts_probe.py"
EP2 = ["parallel.ep=2"]
TOL = 1e-5


def check(*overrides: str) -> subprocess.CompletedProcess:
    """``megasmoe check`` (no torch, no process group)."""
    return subprocess.run([sys.executable, "-m", "megasmoe.cli", "check", CONFIG, *overrides],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("overrides, message", [
    (["moe.grouped_gemm=true"], "moe.grouped_gemm was replaced by moe.expert_backend; "
                                "set moe.expert_backend=grouped"),
    (["moe.expert_backend=grouped_gemm"], "moe.expert_backend='grouped_gemm' is unknown; use "
                                          "sequential, grouped or te; did you mean 'grouped'?"),
    (["moe.expert_backend=sequential", "train.fp8=rowwise"],
     "train.fp8=rowwise runs the expert GEMMs in FP8 and needs "
                            "moe.expert_backend=grouped (or te)"),
    (["moe.expert_backend=grouped", "train.fp8=mxfp8"], "train.fp8=mxfp8 is a Transformer "
                                                        "Engine recipe; set moe.expert_backend=te"),
    (["moe.expert_backend=grouped", "train.fp8=e4m3"], "train.fp8='e4m3' is unknown"),
])
def test_refused_in_one_line(overrides, message):
    proc = check(*overrides)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("megasmoe: config error: "), proc.stderr
    assert message in lines[0], lines[0]


def test_te_backend_without_transformer_engine_is_refused():
    import importlib.util

    if importlib.util.find_spec("transformer_engine") is not None:
        pytest.skip("Transformer Engine is installed here")
    proc = check("moe.expert_backend=te")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "megasmoe: config error: moe.expert_backend=te needs Transformer Engine, which is "
        "not installed here; use moe.expert_backend=grouped (same checkpoint) or install "
        "the te extra"]


# ------------------------------------------------------------------ module level


PROBE_LAYOUTS = {
    "ws1": (["parallel.world_size=1", "parallel.ep=1"], 1),
    "ep2": (EP2, 2),
    "etp2": (["parallel.ep=1", "parallel.etp=2"], 2),
    "ws1_bf16": (["parallel.world_size=1", "parallel.ep=1", "train.precision=bf16"], 1),
}


def run_probe(out: Path, overrides: list[str], nproc: int) -> dict:
    proc = launch([str(PROBE), str(out), *overrides], nproc, 300, rank_env=True)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("layout", list(PROBE_LAYOUTS))
def test_grouped_equals_sequential_on_the_same_weights(layout, tmp_path):
    overrides, nproc = PROBE_LAYOUTS[layout]
    got = run_probe(tmp_path / "probe.json", overrides, nproc)
    assert got["missing_outputs"] == 0 and got["grad_scale"] > 1e-3, got
    for name in ("moe_output", "loss", "expert_grad", "other_grad"):
        assert got[name] <= TOL, (layout, name, got)
    assert got["layout_differs"] == 0 and got["values_differ"] == 0, got
    # 4 MoE layers x local experts x (fc1 gate, fc1 up, fc2) on the rank that reports.
    assert got["num_sharded_expert_tensors"] == 4 * (4 if layout == "ep2" else 8) * 3


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_grouped_linear_uses_torch_grouped_mm_and_falls_back_per_expert(dtype):
    """The model's shapes run torch's grouped_mm on CPU; a shape it refuses (rows not a
    multiple of 16 bytes) runs one matmul per expert, with the same result."""
    import torch

    from megasmoe.experts.grouped import _grouped_mm_reason, grouped_linear

    dtype = getattr(torch, dtype)
    assert _grouped_mm_reason("cpu", dtype, 128, 512) is None
    assert _grouped_mm_reason("cpu", dtype, 256, 128) is None
    gen = torch.Generator().manual_seed(0)
    counts = [5, 0, 11, 3]
    for k in (64, 66):  # 66 x 2 or 4 bytes: not a multiple of 16 -> per-expert fallback
        assert (_grouped_mm_reason("cpu", dtype, k, 32) is None) == (k == 64)
        x = torch.randn(sum(counts), k, generator=gen).to(dtype).requires_grad_()
        w = torch.randn(4, 32, k, generator=gen).to(dtype).requires_grad_()
        y = grouped_linear(x, w, torch.tensor(counts))
        y.sum().backward()  # a stride-0 gradient
        x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        y2 = torch.cat([p @ w2[e].t() for e, p in enumerate(torch.split(x2, counts))])
        y2.backward(torch.ones_like(y2))
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        for a, b in ((y, y2), (x.grad, x2.grad), (w.grad, w2.grad)):
            assert torch.allclose(a.float(), b.float(), rtol=tol, atol=tol)
        assert not w.grad[1].any()


# ------------------------------------------------------------------ training and checkpoints


def pretrain_args(run_dir: Path, backend: str, *overrides: str) -> list[str]:
    return ["pretrain", CONFIG, *FAST, "train.steps=20", f"run.dir={run_dir}",
            f"moe.expert_backend={backend}", *EP2, *overrides]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """20 steps at EP=2 with each backend, checkpoints at 10 and 20."""
    root = tmp_path_factory.mktemp("experts")
    out = {}
    for backend in ("sequential", "grouped"):
        out[backend] = root / backend
        run_megasmoe(pretrain_args(out[backend], backend, "checkpoint.interval=10"), nproc=2)
    return out


def test_twenty_steps_same_losses(runs):
    seq, grp = train_losses(runs["sequential"]), train_losses(runs["grouped"])
    assert sorted(seq) == sorted(grp) == list(range(1, 21))
    for step in range(1, 21):
        assert abs(seq[step] - grp[step]) <= TOL, (step, seq[step], grp[step])
    assert grp[20] < grp[1] - 0.5  # it trains


@pytest.mark.parametrize("saved, resumed", [("grouped", "sequential"),
                                            ("sequential", "grouped")])
def test_checkpoint_resumes_with_the_other_backend(runs, saved, resumed, tmp_path):
    from megasmoe import checkpoint as ckpt

    run_dir = tmp_path / "run"
    root = ckpt.checkpoint_root(run_dir)
    root.mkdir(parents=True)
    src = ckpt.checkpoint_root(runs[saved]) / "iter_0000010"
    shutil.copytree(src, root / src.name)
    (root / "latest").write_text(src.name)
    proc = run_megasmoe(pretrain_args(run_dir, resumed, "train.exit_at_step=12"), nproc=2)
    assert "at step 10" in proc.stdout, proc.stdout
    got, want = train_losses(run_dir), train_losses(runs[saved])
    assert sorted(got) == [11, 12]
    for step in (11, 12):
        assert abs(got[step] - want[step]) <= TOL, (step, got[step], want[step])


def test_distributed_optimizer_grouped_ep2_resumes_as_sequential_dp2(tmp_path):
    """The distributed optimizer's fully reshardable state goes through GroupedMLP's
    checkpoint factory too: saved by grouped at EP=2, resumed by sequential at DP=2."""
    from megasmoe import checkpoint as ckpt

    dist_opt = ["train.distributed_optimizer=true", "train.exit_at_step=7"]
    src = tmp_path / "src"
    run_megasmoe(pretrain_args(src, "grouped", *dist_opt, "checkpoint.interval=5"), nproc=2)
    dst = tmp_path / "dst"
    root = ckpt.checkpoint_root(dst)
    root.mkdir(parents=True)
    shutil.copytree(ckpt.checkpoint_root(src) / "iter_0000005", root / "iter_0000005")
    (root / "latest").write_text("iter_0000005")
    proc = run_megasmoe(pretrain_args(dst, "sequential", *dist_opt, "parallel.ep=1"), nproc=2)
    assert "new parallel layout" in proc.stdout, proc.stdout
    got, want = train_losses(dst), train_losses(src)
    assert sorted(got) == [6, 7]
    for step in (6, 7):
        assert abs(got[step] - want[step]) <= TOL, (step, got[step], want[step])


def test_hf_export_of_a_grouped_run_verifies(runs, tmp_path):
    pytest.importorskip("transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from megasmoe.convert import to_hf, verify
    from megasmoe.convert.parity import random_token_ids

    report = to_hf(runs["grouped"], tmp_path / "hf")
    assert report.architecture == "MixtralForCausalLM"
    parity = verify(runs["grouped"], tmp_path / "hf", random_token_ids(4096, batch=2,
                                                                        length=33, seed=0))
    assert parity.max_abs_logit_diff < 1e-4, parity.summary()
    assert parity.next_token_agreement == 1.0, parity.summary()
    assert abs(parity.hf_loss - parity.megatron_loss) < 1e-4, parity.summary()
