"""GPU check: one run on the lent GPU machine -> ``gpu_check.json`` + ``gpu_check.md``.

    bash bench/gpu/run.sh                      # what a user types (checks, then runs this)
    python bench/gpu/gpu_check.py --out DIR [--cpu-smoke] [--work DIR]

Sections, in order, each with a time budget (the whole run stays under 8 minutes):

1. ``device``: GPU name, SM, memory; torch, CUDA, cuDNN, NCCL, megatron-core, Transformer
   Engine, megasmoe version and git revision.
2. ``peaks``: measured dense matmul peaks, fp32 (no TF32), bf16 and FP8 e4m3
   (``torch._scaled_mm``), 8192^3, CUDA events, median of the timed calls.
3. ``experts``: every expert backend and precision (sequential fp32 = the reference,
   sequential bf16, grouped bf16, grouped + FP8 tensorwise, grouped + FP8 rowwise; te
   when Transformer Engine imports) at a Mixtral-like and a fine-grained shape, built
   from megasmoe's own layer spec (the real SequentialMLP / GroupedMLP modules with a
   real TransformerConfig at world size 1), on the same weights and routed tokens: max
   relative error of the output and of the input gradient against sequential fp32, and
   forward+backward TFLOP/s (6 x tokens x topk x 3 x H x F) as a fraction of the
   measured peak of the precision the GEMMs run in.
4. ``routers``: the real megasmoe model built per registered router, its first MoE
   layer forward+backward (ms per step) at a mid shape.
5. ``training``: ``torchrun --standalone --nproc-per-node=1 -m megasmoe.cli pretrain``
   (NCCL, world size 1), 30 steps, bf16 and again with ``train.fp8=rowwise`` on the
   grouped backend: tokens/s, train/tflops_per_gpu, MFU (against the measured bf16
   peak) and loss, read from the run's metrics.jsonl.

A section that raises or runs past its budget is recorded as ``failed`` with its error in
the JSON, the later sections still run, and the process exits 1: nothing is skipped
silently. Documented absences (Transformer Engine not installed) are recorded as such.

``--cpu-smoke`` is for CI only: every section at tiny shapes on CPU (gloo, FP8 through
``torch._scaled_mm`` on CPU, a few training steps), so a broken script shows without a
GPU. Its numbers mean nothing. ``MEGASMOE_GPU_CHECK_FAIL=<section>`` makes that section
raise at its start (for testing the failure path). The JSON schema is documented in
docs/benchmarks.md ("GPU check").
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform as _platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SCHEMA = 1
SECTIONS = ("device", "peaks", "experts", "routers", "training")
FAIL_ENV = "MEGASMOE_GPU_CHECK_FAIL"
REV_ENV = "MEGASMOE_GPU_CHECK_REV"  # the commit, where the copy run carries no .git

# Seconds per section on the GPU; their sum (430 s) leaves room under 8 minutes for
# process start and the imports. The smoke budgets are generous: CI machines are loaded.
BUDGETS = {"device": 20, "peaks": 30, "experts": 150, "routers": 60, "training": 170}
SMOKE_BUDGETS = {"device": 30, "peaks": 30, "experts": 120, "routers": 120, "training": 240}

# Expert shapes: (name, hidden H, expert FFN F, experts E, top-k, tokens).
EXPERT_SHAPES = [("mixtral", 4096, 14336, 8, 2, 8192), ("fine_grained", 2048, 768, 64, 8, 8192)]
SMOKE_EXPERT_SHAPES = [("mixtral", 64, 224, 8, 2, 64), ("fine_grained", 32, 48, 16, 4, 64)]

# Candidates: (label, moe.expert_backend, train.precision, train.fp8, peak it runs against).
CANDIDATES = [
    ("sequential fp32", "sequential", "fp32", None, "fp32"),
    ("sequential bf16", "sequential", "bf16", None, "bf16"),
    ("grouped bf16", "grouped", "bf16", None, "bf16"),
    ("grouped fp8 tensorwise", "grouped", "bf16", "tensorwise", "fp8"),
    ("grouped fp8 rowwise", "grouped", "bf16", "rowwise", "fp8"),
]
TE_CANDIDATE = ("te bf16", "te", "bf16", None, "bf16")

ROUTER_SHAPE = ["model.num_layers=2", "model.hidden_size=1024", "model.num_heads=8",
                "moe.num_experts=16", "moe.topk=2", "moe.ffn_hidden_size=2048",
                "train.seq_length=1024", "train.micro_batch_size=4"]
SMOKE_ROUTER_SHAPE = ["model.num_layers=1", "model.hidden_size=32", "model.num_heads=2",
                      "moe.num_experts=4", "moe.topk=2", "moe.ffn_hidden_size=32",
                      "train.seq_length=16", "train.micro_batch_size=2"]

TRAIN_STEPS = 30
TRAIN_SHAPE = ["model.num_layers=8", "model.hidden_size=1024", "model.num_heads=16",
               "moe.num_experts=8", "moe.topk=2", "moe.ffn_hidden_size=2048",
               "train.seq_length=1024", "train.micro_batch_size=8",
               "train.global_batch_size=32", "train.log_interval=5"]
SMOKE_TRAIN_STEPS = 4
SMOKE_TRAIN_SHAPE = ["model.num_layers=1", "model.hidden_size=32", "model.num_heads=2",
                     "moe.num_experts=4", "moe.topk=2", "moe.ffn_hidden_size=32",
                     "train.seq_length=32", "train.micro_batch_size=2",
                     "train.global_batch_size=2", "train.log_interval=2"]
# Both on the grouped backend, so the comparison isolates FP8.
TRAIN_RUNS = [("bf16", ["moe.expert_backend=grouped"]),
              ("fp8 rowwise", ["train.fp8=rowwise", "moe.expert_backend=grouped"])]


class BudgetExceeded(RuntimeError):
    """A section ran past its time budget."""


class Check:
    """The run's state: results so far, the clock, where outputs go."""

    def __init__(self, out: Path, work: Path, smoke: bool):
        self.out, self.work, self.smoke = out, work, smoke
        self.t0 = time.perf_counter()
        self.cuda = torch.cuda.is_available() and not smoke
        self.budgets = SMOKE_BUDGETS if smoke else BUDGETS
        self.result = {
            "schema": SCHEMA,
            "mode": "cpu-smoke" if smoke else "gpu",
            "ok": False,
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "seconds": 0.0,
            "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
            "sections": {name: {"status": "not run", "seconds": 0.0,
                                "budget_s": float(self.budgets[name]), "error": None}
                         for name in SECTIONS},
            "device": {}, "peaks": {}, "experts": {}, "routers": {}, "training": {},
        }
        self._section_start = 0.0
        self._section = ""

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def say(self, msg: str) -> None:
        print(f"[{self.elapsed():6.1f} s] {msg}", flush=True)

    def left(self) -> float:
        """Seconds left of the running section's budget."""
        return self.budgets[self._section] - (time.perf_counter() - self._section_start)

    def within_budget(self, what: str) -> None:
        if self.left() < 0:
            raise BudgetExceeded(f"time budget of {self.budgets[self._section]} s exceeded "
                                 f"before {what}")

    def device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.cuda else torch.device("cpu")

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def run(self, name: str, fn) -> None:
        self._section, self._section_start = name, time.perf_counter()
        sec = self.result["sections"][name]
        self.say(f"{name}: start (budget {self.budgets[name]} s)")
        try:
            if os.environ.get(FAIL_ENV) == name:
                raise RuntimeError(f"injected failure ({FAIL_ENV}={name})")
            fn(self)
            if self.left() < 0:
                raise BudgetExceeded(f"took longer than its time budget of "
                                     f"{self.budgets[name]} s")
            sec["status"] = "ok"
        except Exception as e:  # noqa: BLE001 - recorded, reported, and the run fails
            sec["status"] = "failed"
            sec["error"] = f"{type(e).__name__}: {e}".strip()
            sys.stderr.write(traceback.format_exc())
        sec["seconds"] = round(time.perf_counter() - self._section_start, 2)
        self.say(f"{name}: {sec['status']} ({sec['seconds']:.1f} s)"
                 + (f": {sec['error'].splitlines()[0]}" if sec["error"] else ""))
        self.write()

    def write(self) -> None:
        r = self.result
        r["seconds"] = round(self.elapsed(), 2)
        r["ok"] = all(s["status"] == "ok" for s in r["sections"].values())
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.out / "gpu_check.json.tmp"
        tmp.write_text(json.dumps(r, indent=1, allow_nan=False) + "\n")
        tmp.replace(self.out / "gpu_check.json")
        (self.out / "gpu_check.md").write_text(markdown(r))


# --------------------------------------------------------------------------- timing


def time_ms(check: Check, fn, warmup: int, repeats: int) -> float:
    """Median milliseconds of ``fn()`` (CUDA events on GPU, perf_counter on CPU)."""
    for _ in range(warmup):
        fn()
    check.sync()
    samples = []
    for _ in range(repeats):
        if check.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t) * 1e3)
    return statistics.median(samples)


def finite(x: float, what: str) -> float:
    if not math.isfinite(x):
        raise ValueError(f"{what} is not finite ({x})")
    return float(x)


# --------------------------------------------------------------------------- 1. device


def _version(module: str) -> str | None:
    try:
        mod = __import__(module, fromlist=["__version__"])
    except Exception:  # noqa: BLE001 - absent
        return None
    return str(getattr(mod, "__version__", "unknown"))


def _git(*args: str) -> str | None:
    """git's output in the checkout, or None (no git, or a copy without .git)."""
    try:
        proc = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
    except OSError:
        return None
    return proc.stdout if proc.returncode == 0 else None


def section_device(check: Check) -> None:
    import megatron.core  # noqa: F401 - must import: the check runs megasmoe on it

    import megasmoe

    rev, dirty = _git("rev-parse", "HEAD"), _git("status", "--porcelain", "--untracked-files=no")
    d = {
        "name": "cpu", "sm": None, "memory_gb": None, "count": 0,
        "python": _platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "nccl": None,
        "megatron_core": _version("megatron.core"),
        "transformer_engine": _version("transformer_engine") or "not installed",
        "megasmoe": megasmoe.__version__,
        "git_rev": os.environ.get(REV_ENV) or (rev.strip() if rev is not None
                                               else f"unknown (no git; set {REV_ENV})"),
        "git_dirty": bool(dirty.strip()) if dirty is not None and not os.environ.get(REV_ENV)
        else None,
        "distributed_backend": "nccl" if check.cuda else "gloo",
    }
    if check.cuda:
        props = torch.cuda.get_device_properties(0)
        d.update(name=props.name, sm=f"{props.major}.{props.minor}",
                 memory_gb=round(props.total_memory / 2**30, 1),
                 count=torch.cuda.device_count(),
                 nccl=".".join(map(str, torch.cuda.nccl.version())))
    check.result["device"] = d
    check.say(f"device: {d['name']} sm {d['sm']}, torch {d['torch']}, CUDA {d['cuda']}, "
              f"megatron-core {d['megatron_core']}, TE {d['transformer_engine']}, "
              f"megasmoe {d['megasmoe']} @ {d['git_rev'][:12]}")


# --------------------------------------------------------------------------- 2. peaks


def section_peaks(check: Check) -> None:
    n = 256 if check.smoke else 8192
    dev = check.device()
    warmup, repeats = (1, 2) if check.smoke else (3, 10)
    flops = 2.0 * n ** 3
    gen = torch.Generator(device=dev).manual_seed(0)
    a32 = torch.randn(n, n, device=dev, generator=gen)
    b32 = torch.randn(n, n, device=dev, generator=gen)
    peaks = {"size": [n, n, n], "flops": flops, "timed_calls": repeats,
             "tf32": bool(torch.backends.cuda.matmul.allow_tf32)}
    peaks["fp32_tflops"] = finite(flops / time_ms(check, lambda: a32 @ b32, warmup, repeats)
                                  / 1e9, "fp32 peak")
    a, b = a32.bfloat16(), b32.bfloat16()
    peaks["bf16_tflops"] = finite(flops / time_ms(check, lambda: a @ b, warmup, repeats) / 1e9,
                                  "bf16 peak")
    from megasmoe.experts.fp8 import E4M3, quantize

    qa, sa = quantize(a32, E4M3)
    qb, sb = quantize(b32, E4M3)  # b as [N, K] row-major; _scaled_mm takes its transpose
    out_dtype = torch.bfloat16

    def fp8():
        return torch._scaled_mm(qa, qb.t(), scale_a=sa, scale_b=sb, out_dtype=out_dtype)

    peaks["fp8_tflops"] = finite(flops / time_ms(check, fp8, warmup, repeats) / 1e9, "fp8 peak")
    # The FP8 product is a product: its error against fp32 is float8 rounding, not garbage.
    ref = a32 @ b32.t()
    peaks["fp8_max_rel_error"] = finite(((fp8().float() - ref).abs().max()
                                         / ref.abs().max()).item(), "fp8 error")
    if peaks["fp8_max_rel_error"] > 0.1:
        raise ValueError(f"FP8 matmul max relative error {peaks['fp8_max_rel_error']:.3f} "
                         f"> 0.1: the float8 GEMM is wrong")
    check.result["peaks"] = peaks
    check.say(f"peaks at {n}^3: fp32 {peaks['fp32_tflops']:.1f}, bf16 {peaks['bf16_tflops']:.1f}, "
              f"fp8 {peaks['fp8_tflops']:.1f} TFLOP/s")


# --------------------------------------------------------------------------- 3. experts


def _expert_module(check: Check, shape, backend: str, precision: str, fp8):
    """The experts module megasmoe's layer spec builds for this backend (world size 1)."""
    from megasmoe.config import load_config, validate
    from megasmoe.experts import build_experts
    from megasmoe.model import to_transformer_config

    _, hidden, ffn, experts, topk, _ = shape
    cfg = validate(load_config(None, [
        "parallel.world_size=1", f"model.hidden_size={hidden}", "model.num_layers=1",
        "model.num_heads=8" if hidden % 8 == 0 else "model.num_heads=1",
        f"moe.ffn_hidden_size={ffn}", f"moe.num_experts={experts}", f"moe.topk={topk}",
        f"moe.expert_backend={backend}", f"train.fp8={fp8 or 'null'}",
        f"train.precision={precision}", "data.source=mock"]), 1)
    module = build_experts(cfg, to_transformer_config(cfg))
    return module.to(check.device())


def _expert_weights(module) -> list[tuple]:
    """[(fc1, fc2)] per local expert: SequentialMLP, GroupedMLP, or TE's GroupedLinear."""
    from megasmoe.experts import local_expert_weights

    try:
        return local_expert_weights(module)
    except TypeError:  # TEGroupedMLP: GroupedLinear keeps weight0..weight{E-1}
        n = module.num_local_experts
        return [(getattr(module.linear_fc1, f"weight{e}"), getattr(module.linear_fc2, f"weight{e}"))
                for e in range(n)]


def _routing(check: Check, shape):
    """Permuted tokens of a top-k routing over random logits (uneven, as in training)."""
    _, hidden, _, experts, topk, tokens = shape
    logits = torch.randn(tokens, experts, generator=torch.Generator().manual_seed(0))
    chosen = logits.topk(topk, dim=-1).indices.flatten()
    # tokens_per_expert stays on the host, as megatron's token dispatchers hand it over.
    tokens_per_expert = torch.bincount(chosen, minlength=experts)
    rows, dev = tokens * topk, check.device()
    gen = torch.Generator(device=dev).manual_seed(1)
    x = torch.randn(rows, hidden, generator=gen, device=dev)
    probs = torch.rand(rows, generator=gen, device=dev)
    dy = torch.randn(rows, hidden, generator=gen, device=dev)
    return x, tokens_per_expert, probs, dy


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.float() - ref).abs().max() / ref.abs().max().clamp(min=1e-30)).item()


def section_experts(check: Check) -> None:
    shapes = SMOKE_EXPERT_SHAPES if check.smoke else EXPERT_SHAPES
    warmup, repeats = (1, 1) if check.smoke else (2, 5)
    peaks = check.result["peaks"]
    te = check.result["device"].get("transformer_engine", "not installed")
    candidates = list(CANDIDATES) + ([TE_CANDIDATE] if te != "not installed" else [])
    out = {"flops_formula": "6 x tokens x topk x 3 x H x F (SwiGLU: fc1 2F x H, fc2 H x F; "
                            "forward 2, backward 4 FLOPs per multiply-add)",
           "error_formula": "max|y - y_ref| / max|y_ref| (y_ref: sequential fp32, same "
                            "weights and tokens)",
           "te": te if te != "not installed" else "not installed (Transformer Engine does "
                                                  "not import here: the te backend is not measured)",
           "timed_calls": repeats, "shapes": [], "rows": []}
    check.result["experts"] = out
    for shape in shapes:
        name, hidden, ffn, experts, topk, tokens = shape
        out["shapes"].append({"name": name, "hidden": hidden, "ffn": ffn, "experts": experts,
                              "topk": topk, "tokens": tokens})
        flops = 6.0 * tokens * topk * 3 * hidden * ffn
        x, tpe, probs, dy = _routing(check, shape)
        ref_module = None
        ref_y = ref_dx = None
        for label, backend, precision, fp8, peak in candidates:
            check.within_budget(f"{name} / {label}")
            dtype = torch.float32 if precision == "fp32" else torch.bfloat16
            module = _expert_module(check, shape, backend, precision, fp8)
            if ref_module is None:
                ref_module = module
            else:
                with torch.no_grad():
                    for (a1, a2), (b1, b2) in zip(_expert_weights(ref_module),
                                                  _expert_weights(module)):
                        b1.copy_(a1)
                        b2.copy_(a2)
            xin, pin, gout = x.to(dtype), probs.to(dtype), dy.to(dtype)

            def step():
                inp = xin.detach().requires_grad_(True)
                y, _ = module(inp, tpe, pin)
                y.backward(gout)
                return y, inp.grad

            y, dx = step()
            if ref_y is None:
                ref_y, ref_dx = y.detach().float(), dx.float()
            module.zero_grad(set_to_none=True)
            ms = time_ms(check, step, warmup, repeats)
            tflops = flops / ms / 1e9
            row = {"shape": name, "candidate": label, "backend": backend, "precision": precision,
                   "fp8": fp8, "peak": peak,
                   "max_rel_error": finite(_rel(y, ref_y), f"{label} error"),
                   "grad_max_rel_error": finite(_rel(dx, ref_dx), f"{label} grad error"),
                   "ms": finite(ms, f"{label} ms"), "flops": flops,
                   "tflops": finite(tflops, f"{label} TFLOP/s"),
                   "fraction_of_peak": (finite(tflops / peaks[f"{peak}_tflops"], "fraction")
                                        if f"{peak}_tflops" in peaks else None)}
            out["rows"].append(row)
            check.say(f"experts {name} {label}: {ms:.2f} ms, {tflops:.1f} TFLOP/s "
                      f"({_f(row['fraction_of_peak'], '.2f')} of {peak} peak), max rel err "
                      f"{row['max_rel_error']:.2e}")
            if module is not ref_module:
                del module
            if check.cuda:
                torch.cuda.empty_cache()
        del ref_module
        if check.cuda:
            torch.cuda.empty_cache()
    if any(r["fraction_of_peak"] is None for r in out["rows"]):
        raise RuntimeError("no measured peaks (the peaks section failed): no fraction of peak")
    bad = [r for r in out["rows"] if r["max_rel_error"] > (0.15 if r["fp8"] else 0.03)]
    if bad:
        raise ValueError("expert outputs off the sequential fp32 reference: " + ", ".join(
            f"{r['shape']} {r['candidate']} {r['max_rel_error']:.3g}" for r in bad))


# --------------------------------------------------------------------------- 4. routers


def section_routers(check: Check) -> None:
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from megasmoe.config import load_config, validate
    from megasmoe.model import build_model_chunks, layout_invariant_init, to_transformer_config
    from megasmoe.routers import registered_routers

    shape = SMOKE_ROUTER_SHAPE if check.smoke else ROUTER_SHAPE
    warmup, repeats = (1, 2) if check.smoke else (3, 10)
    base = ["parallel.world_size=1", "parallel.ep=1", "moe.dispatcher=allgather",
            "moe.expert_backend=grouped", "data.source=mock",
            f"train.precision={'bf16' if check.cuda else 'fp32'}", *shape]
    extra = {"smoe_dropout": ["moe.aux_loss_type=none"]}
    rows = []
    cfg = None
    for name in registered_routers():
        check.within_budget(f"router {name}")
        cfg = validate(load_config(None, [*base, f"moe.router.name={name}",
                                          *extra.get(name, [])]), 1)
        (model,) = build_model_chunks(cfg, to_transformer_config(cfg))
        layout_invariant_init([model], cfg.run.seed, cfg.model.init_std, cfg.model.num_layers)
        model = model.to(check.device())
        layer = next(m for m in model.modules() if isinstance(m, MoELayer))
        layer.train()
        dtype = next(layer.parameters()).dtype
        t = cfg.train
        x = torch.randn(t.seq_length, t.micro_batch_size, cfg.model.hidden_size,
                        generator=torch.Generator().manual_seed(0)).to(check.device(), dtype)

        def step():
            inp = x.detach().requires_grad_(True)
            out, _ = layer(inp)
            out.float().square().mean().backward()

        ms = finite(time_ms(check, step, warmup, repeats), f"{name} ms")
        rows.append({"router": name, "ms": ms})
        check.say(f"routers {name}: {ms:.2f} ms")
        del model
    topk = {r["router"]: r["ms"] for r in rows}["topk"]
    for r in rows:
        r["vs_topk"] = r["ms"] / topk
    m, e, t = cfg.model, cfg.moe, cfg.train
    check.result["routers"] = {
        "shape": {"seq": t.seq_length, "batch": t.micro_batch_size, "hidden": m.hidden_size,
                  "ffn": e.ffn_hidden_size, "experts": e.num_experts, "topk": e.topk,
                  "expert_backend": "grouped", "precision": t.precision,
                  "dispatcher": "allgather"},
        "timed_calls": repeats, "rows": rows}


# --------------------------------------------------------------------------- 5. training


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} was not written")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def section_training(check: Check) -> None:
    from megasmoe.config import load_config, validate
    from megasmoe.plan import flops_per_token

    steps = SMOKE_TRAIN_STEPS if check.smoke else TRAIN_STEPS
    shape = SMOKE_TRAIN_SHAPE if check.smoke else TRAIN_SHAPE
    peak = check.result["peaks"].get("bf16_tflops")
    out = {"steps": steps, "config": "configs/tiny-cpu.yaml", "overrides": [], "runs": [],
           "mfu_peak": "measured dense bf16 peak (peaks.bf16_tflops), for bf16 and FP8 runs",
           "launcher": "torchrun --standalone --nproc-per-node=1 -m megasmoe.cli pretrain"}
    check.result["training"] = out
    for label, extra in TRAIN_RUNS:
        budget = check.left()
        if budget < 5:
            raise BudgetExceeded(f"time budget exhausted before the {label} run")
        run_dir = check.work / f"train-{label.replace(' ', '-')}"
        overrides = ["parallel.world_size=1", "parallel.ep=1", f"train.steps={steps}",
                     "train.warmup_steps=2", "train.eval_interval=0", "train.eval_iters=1",
                     "train.precision=bf16", "checkpoint.enabled=false",
                     "logging.progress=false", f"run.dir={run_dir}", *shape, *extra]
        out["overrides"] = overrides[:len(overrides) - len(extra)]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node=1", "-m", "megasmoe.cli", "pretrain", "configs/tiny-cpu.yaml",
               *overrides]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
        if check.smoke:
            env.setdefault("OMP_NUM_THREADS", "1")
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                                  timeout=budget)
        except subprocess.TimeoutExpired as e:
            raise BudgetExceeded(f"the {label} training run ran past the section's budget "
                                 f"({budget:.0f} s left): {str(e.stderr or '')[-500:]}") from None
        wall = time.perf_counter() - start
        (check.work / f"train-{label.replace(' ', '-')}.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
            raise RuntimeError(f"the {label} training run exited {proc.returncode}:\n"
                               + "\n".join(tail))
        records = [r for r in _metrics(run_dir) if "train/loss" in r]
        if not records or records[-1]["step"] != steps:
            raise RuntimeError(f"the {label} run logged no train/loss at step {steps}")
        # The first logged window holds start-up (CUDA context, kernel selection):
        # throughput is the median of the later windows.
        later = records[1:] or records
        tps = statistics.median(r["train/tokens_per_sec"] for r in later)
        if "train/tflops_per_gpu" in records[-1]:
            tflops = statistics.median(r["train/tflops_per_gpu"] for r in later)
        elif check.smoke:  # the trainer logs TFLOP/s on GPU only; the same formula here
            cfg = validate(load_config("configs/tiny-cpu.yaml", overrides), 1)
            tflops = flops_per_token(cfg) * tps / 1e12
        else:
            raise RuntimeError("train/tflops_per_gpu missing from metrics.jsonl on GPU")
        given = dict(x.split("=", 1) for x in extra)
        run = {"label": label, "precision": "bf16", "fp8": given.get("train.fp8"),
               "expert_backend": given.get("moe.expert_backend", "sequential"),
               "distributed_backend": "gloo" if check.smoke else "nccl", "world_size": 1,
               "steps": steps, "tokens_per_step": None, "wall_s": round(wall, 2),
               "tokens_per_s": finite(tps, "tokens/s"),
               "tflops_per_gpu": finite(tflops, "TFLOP/s"),
               "mfu": finite(tflops / peak, "MFU") if peak else None,
               "loss_first": finite(records[0]["train/loss"], "first loss"),
               "loss_last": finite(records[-1]["train/loss"], "last loss"),
               "valid_loss": None, "mem_gb": records[-1].get("train/mem_gb")}
        valid = [r for r in _metrics(run_dir) if "valid/loss" in r]
        if valid:
            run["valid_loss"] = finite(valid[-1]["valid/loss"], "valid loss")
        run["tokens_per_step"] = _tokens_per_step(overrides)
        out["runs"].append(run)
        check.say(f"training {label}: {tps:,.0f} tokens/s, {tflops:.1f} TFLOP/s, "
                  f"MFU {_f(run['mfu'], '.3f')}, loss {run['loss_first']:.3f} -> {run['loss_last']:.3f} "
                  f"({wall:.0f} s)")
    if peak is None:
        raise RuntimeError("no measured bf16 peak (the peaks section failed): no MFU")
    losses = [r["loss_last"] for r in out["runs"]]
    if len(losses) == 2 and abs(losses[1] - losses[0]) > 0.05 * losses[0] + (1.0 if check.smoke else 0):
        raise ValueError(f"FP8 rowwise final loss {losses[1]:.4f} is more than 5% off bf16's "
                         f"{losses[0]:.4f}")


def _tokens_per_step(overrides: list[str]) -> int:
    kv = dict(o.split("=", 1) for o in overrides)
    return int(kv["train.global_batch_size"]) * int(kv["train.seq_length"])


# --------------------------------------------------------------------------- markdown


def _f(x, fmt: str) -> str:
    return "" if x is None else format(x, fmt)


def markdown(r: dict) -> str:
    d, p = r["device"], r["peaks"]
    lines = [f"# GPU check ({r['mode']}, {r['started']})", ""]
    if r["mode"] == "cpu-smoke":
        lines += ["**CPU smoke run (CI): tiny shapes on CPU; the numbers mean nothing.**", ""]
    lines += [f"Result: **{'ok' if r['ok'] else 'FAILED'}** in {r['seconds']:.0f} s. Device: "
              f"{d.get('name')} (sm {d.get('sm')}, {d.get('memory_gb')} GiB); torch {d.get('torch')}, "
              f"CUDA {d.get('cuda')}, cuDNN {d.get('cudnn')}, NCCL {d.get('nccl')}, megatron-core "
              f"{d.get('megatron_core')}, Transformer Engine {d.get('transformer_engine')}, "
              f"megasmoe {d.get('megasmoe')} @ {str(d.get('git_rev'))[:12]}"
              f"{' (dirty)' if d.get('git_dirty') else ''}.", "",
              "| section | status | seconds | budget s | error |", "|---|---|---|---|---|"]
    for name, s in r["sections"].items():
        err = (s["error"] or "").splitlines()[0][:160] if s["error"] else ""
        lines.append(f"| {name} | {s['status']} | {s['seconds']:.1f} | {s['budget_s']:.0f} | {err} |")
    if p:
        lines += ["", f"Measured peaks ({' x '.join(map(str, p['size']))} matmul, median of "
                      f"{p['timed_calls']}): fp32 {p['fp32_tflops']:.4g}, bf16 {p['bf16_tflops']:.4g}, "
                      f"FP8 e4m3 {p['fp8_tflops']:.4g} TFLOP/s (FP8 max rel. error "
                      f"{p['fp8_max_rel_error']:.3f})."]
    ex = r["experts"]
    if ex.get("rows"):
        lines += ["", "Expert backends, forward + backward (" + ex["flops_formula"] + "); error: "
                  + ex["error_formula"] + ". te: " + ex["te"] + ".", "",
                  "| shape | candidate | max rel err | grad max rel err | ms | TFLOP/s | of peak |",
                  "|---|---|---|---|---|---|---|"]
        shapes = {s["name"]: s for s in ex["shapes"]}
        for row in ex["rows"]:
            s = shapes[row["shape"]]
            label = (f"{row['shape']} (H {s['hidden']}, F {s['ffn']}, E {s['experts']}, "
                     f"top-{s['topk']}, {s['tokens']} tokens)")
            lines.append(f"| {label} | {row['candidate']} | {row['max_rel_error']:.2e} | "
                         f"{row['grad_max_rel_error']:.2e} | {row['ms']:.2f} | "
                         f"{row['tflops']:.4g} | {_f(row['fraction_of_peak'], '.3g')} {row['peak']} |")
    ro = r["routers"]
    if ro.get("rows"):
        s = ro["shape"]
        lines += ["", f"MoE layer forward + backward per router (seq {s['seq']} x batch "
                      f"{s['batch']} x H {s['hidden']}, F {s['ffn']}, {s['experts']} experts "
                      f"top-{s['topk']}, {s['expert_backend']}, {s['precision']}):", "",
                  "| router | ms | vs topk |", "|---|---|---|"]
        lines += [f"| {x['router']} | {x['ms']:.2f} | {x['vs_topk']:.2f} |" for x in ro["rows"]]
    tr = r["training"]
    if tr.get("runs"):
        lines += ["", f"Training, {tr['steps']} steps, world size 1 ({tr['launcher']}); MFU "
                      f"against the {tr['mfu_peak']}:", "",
                  "| run | backend | tokens/s | TFLOP/s | MFU | loss first -> last | valid loss | wall s |",
                  "|---|---|---|---|---|---|---|---|"]
        for x in tr["runs"]:
            lines.append(f"| {x['label']} | {x['distributed_backend']}, {x['expert_backend']} | "
                         f"{x['tokens_per_s']:,.0f} | {x['tflops_per_gpu']:.4g} | {_f(x['mfu'], '.3g')} | "
                         f"{x['loss_first']:.3f} -> {x['loss_last']:.3f} | "
                         f"{_f(x['valid_loss'], '.3f')} | {x['wall_s']:.0f} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--work", default=None,
                        help="scratch folder for the training runs (default: $MEGASMOE_GPU_CHECK_WORK, "
                             "else a new temp folder)")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="CI only: every section at tiny shapes on CPU (gloo); no numbers")
    args = parser.parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("gpu_check.py: no CUDA GPU (torch.cuda.is_available() is False); run it on the "
              "lent GPU machine (docs/benchmarks.md)", file=sys.stderr)
        return 2
    work = Path(args.work or os.environ.get("MEGASMOE_GPU_CHECK_WORK")
                or tempfile.mkdtemp(prefix="megasmoe-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    check = Check(Path(args.out), work, args.cpu_smoke)
    if check.smoke:
        torch.set_num_threads(1)

    from megasmoe.config import load_config, validate
    from megasmoe.training.distributed import destroy_distributed, init_distributed

    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    check.say(f"gpu_check: {check.result['mode']}, out {check.out}, work {work}")
    init_distributed(validate(load_config(None, ["parallel.world_size=1"]), 1))
    try:
        for name, fn in (("device", section_device), ("peaks", section_peaks),
                         ("experts", section_experts), ("routers", section_routers)):
            check.run(name, fn)
    finally:
        destroy_distributed()  # the training runs start their own process group
    if check.cuda:
        torch.cuda.empty_cache()  # the training runs are other processes on this GPU
    check.run("training", section_training)
    check.write()
    failed = [n for n, s in check.result["sections"].items() if s["status"] != "ok"]
    check.say(f"wrote {check.out / 'gpu_check.json'} and {check.out / 'gpu_check.md'}")
    if failed:
        print(f"gpu_check: FAILED: {', '.join(failed)} (errors in {check.out / 'gpu_check.json'})",
              file=sys.stderr)
        return 1
    check.say("gpu_check: all sections ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
