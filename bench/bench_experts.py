"""Benchmark: forward+backward time of the expert backends, grouped / sequential and FP8.

    .venv/bin/python bench/bench_experts.py [--repeats N] [--threads T]

One process (world size 1, gloo). For each shape (hidden H, expert FFN I, experts E,
routed token rows T = tokens x top-k) the experts module of each candidate is built
from megasmoe's own spec (``moe.expert_backend`` / ``train.fp8``) on the same weights
and fed the same permuted tokens (a random top-2 routing: uneven expert loads, as in
training). Candidates run round-robin within one loop (sequential, grouped, grouped +
FP8 tensorwise, grouped + FP8 rowwise, then again), so machine noise hits all of them
alike; the table gives the median milliseconds of forward + backward, the spread
(interquartile range as a percentage of the median) and the ratio to sequential.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402

SHAPES = [  # (H, I, E, routed rows T)
    (128, 256, 8, 1024),    # the tiny-cpu model's MoE layer, one micro batch of 4 x 128
    (512, 1024, 8, 2048),
    (256, 512, 32, 2048),   # many small experts (64 rows each on average)
]
CANDIDATES = [("sequential", None), ("grouped", None), ("grouped", "tensorwise"),
              ("grouped", "rowwise")]


def build(shape, backend: str, fp8, dtype: str):
    from megasmoe.config import load_config, validate
    from megasmoe.experts import build_experts
    from megasmoe.model import to_transformer_config

    hidden, ffn, experts, _ = shape
    cfg = validate(load_config(None, [
        "parallel.world_size=1", f"model.hidden_size={hidden}", "model.num_layers=1",
        f"moe.ffn_hidden_size={ffn}", f"moe.num_experts={experts}",
        f"moe.expert_backend={backend}", f"train.fp8={fp8 or 'null'}",
        f"train.precision={dtype}", "data.source=mock"]), 1)
    module = build_experts(cfg, to_transformer_config(cfg))
    return cfg, module


def copy_weights(src, dst) -> None:
    """The same expert weights in either backend (row e = expert e's nn.Linear weight)."""
    from megasmoe.experts import local_expert_weights

    with torch.no_grad():
        for (a1, a2), (b1, b2) in zip(local_expert_weights(src), local_expert_weights(dst)):
            b1.copy_(a1)
            b2.copy_(a2)


def inputs(shape, dtype: torch.dtype):
    hidden, _, experts, rows = shape
    gen = torch.Generator().manual_seed(0)
    # Top-2 routing of rows / 2 tokens over softmax(noise): uneven loads, some tiny.
    logits = torch.randn(rows // 2, experts, generator=gen) * 1.5
    chosen = logits.topk(2, dim=-1).indices.flatten()
    tokens_per_expert = torch.bincount(chosen, minlength=experts)
    x = torch.randn(rows, hidden, generator=gen).to(dtype)
    probs = torch.rand(rows, generator=gen).to(dtype)
    return x, tokens_per_expert, probs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15, help="round-robin rounds (>= 2)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    args = parser.parse_args(argv)
    if args.repeats < 2:
        parser.error("--repeats must be at least 2 (the spread needs two rounds)")
    torch.set_num_threads(args.threads)

    from megasmoe.config import load_config, validate
    from megasmoe.training.distributed import destroy_distributed, init_distributed

    init_distributed(validate(load_config(None, ["parallel.world_size=1"]), 1))
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    print(f"device: cpu, {args.threads} thread(s), torch {torch.__version__}, {args.dtype}; "
          f"median of {args.repeats} round-robin rounds, forward + backward")
    print(f"{'H x I, E, rows':<22}{'candidate':<22}{'ms':>9}{'IQR %':>8}{'vs seq':>8}")
    for shape in SHAPES:
        modules = {}
        for backend, fp8 in CANDIDATES:
            _, modules[(backend, fp8)] = build(shape, backend, fp8, args.dtype)
        ref = modules[CANDIDATES[0]]
        for key, module in modules.items():
            copy_weights(ref, module)
        x, tpe, probs = inputs(shape, dtype)

        def step(module):
            inp = x.detach().requires_grad_(True)
            out, _ = module(inp, tpe, probs)
            out.float().square().mean().backward()

        samples = {key: [] for key in modules}
        for key, module in modules.items():
            step(module)  # warm-up
        for _ in range(args.repeats):
            for key, module in modules.items():
                start = time.perf_counter()
                step(module)
                samples[key].append(time.perf_counter() - start)
        seq = statistics.median(samples[CANDIDATES[0]])
        label = f"{shape[0]}x{shape[1]}, {shape[2]}, {shape[3]}"
        for (backend, fp8), s in samples.items():
            med = statistics.median(s)
            q = statistics.quantiles(s, n=4)
            name = backend + (f" fp8 {fp8}" if fp8 else "")
            print(f"{label:<22}{name:<22}{med * 1e3:>9.2f}{(q[2] - q[0]) / med * 100:>8.1f}"
                  f"{med / seq:>8.2f}")
            label = ""
    destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
