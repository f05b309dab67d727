"""The planner's per-rank memory against the measured peak of real runs on CPU.

Each layout trains 3 steps of a model made large enough that its state and activations,
not the interpreter, dominate (the tiny config at d 256, experts 1024 wide, 4 x 256
tokens per micro batch: 28M parameters). Measured: ``train/mem_gb`` of the last step in
metrics.jsonl, rank 0's peak RSS (``ru_maxrss``), which includes the Python + torch +
megatron-core baseline (megasmoe.plan.CPU_BASELINE_GB, measured once as in
docs/planning.md). Estimated: ``estimate_memory(cfg, stage=0, device="cpu")``, rank 0's
pipeline stage. The estimate must be within 15% of the measurement.
"""

from __future__ import annotations

import pytest

from conftest import read_metrics, run_megasmoe

from megasmoe.config import load_config, validate
from megasmoe.plan import GB, estimate_memory

CALIBRATION = [
    "model.hidden_size=256", "moe.ffn_hidden_size=1024", "train.seq_length=256",
    "train.micro_batch_size=4", "train.global_batch_size=8", "train.steps=3",
    "train.warmup_steps=1", "train.log_interval=1", "train.eval_interval=0",
    "train.eval_iters=1", "logging.progress=false", "logging.tensorboard=false",
    "checkpoint.enabled=false",
]
LAYOUTS = {
    "ws1": (1, ["parallel.ep=1"]),
    "ws1-recompute": (1, ["parallel.ep=1", "train.recompute=true"]),
    "ep2": (2, ["parallel.ep=2"]),
    "ep2-distopt": (2, ["parallel.ep=2", "train.distributed_optimizer=true"]),
    "tp2-sp": (2, ["parallel.ep=1", "parallel.tp=2", "parallel.sp=true"]),
    "pp2": (2, ["parallel.ep=1", "parallel.pp=2"]),
    "pp2-distopt-recompute": (2, ["parallel.ep=1", "parallel.pp=2",
                                  "train.distributed_optimizer=true", "train.recompute=true"]),
}
TOLERANCE = 0.15


def _overrides(name: str) -> list[str]:
    nproc, extra = LAYOUTS[name]
    return [*CALIBRATION, f"parallel.world_size={nproc}", *extra]


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_memory_estimate_within_15_percent_of_measured_peak(name, tmp_path):
    nproc = LAYOUTS[name][0]
    run_dir = tmp_path / name
    # torchrun: a process of its own from the start (the warm launcher's forked ranks
    # share the imported libraries' pages, and their peak RSS is lower).
    run_megasmoe(["pretrain", "configs/tiny-cpu.yaml", *_overrides(name),
                  f"run.dir={run_dir}"], nproc=nproc, launcher="torchrun")
    measured = [r["train/mem_gb"] for r in read_metrics(run_dir) if "train/mem_gb" in r][-1]
    cfg = validate(load_config("configs/tiny-cpu.yaml", _overrides(name)), nproc)
    estimate = estimate_memory(cfg, stage=0, device="cpu").total / GB
    error = estimate / measured - 1
    print(f"{name}: measured {measured:.3f} GB, estimated {estimate:.3f} GB ({error:+.1%})")
    assert abs(error) <= TOLERANCE, (name, measured, estimate)
