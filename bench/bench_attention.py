"""Benchmark: core attention forward+backward, torch SDPA vs megatron's DotProductAttention.

    .venv/bin/python bench/bench_attention.py [CONFIG] [key=value ...] [--seq N ...] [--repeats N]

One process (world size 1, gloo). Both modules are built as the model builds them
(the config's heads, query groups, head width and precision) and run on the same random
q / k / v [seq, micro_batch_size, heads, head_dim] at each --seq length: output.backward
of a fixed gradient. Round robin (sdpa, unfused, sdpa, ...) so both see the same machine
load; the table reports the median milliseconds, the spread (min-max) and unfused / sdpa.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default="configs/tiny-cpu.yaml")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--seq", type=int, nargs="+", default=[128, 1024])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)

    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megasmoe import platform
    from megasmoe.attention import SDPAttention
    from megasmoe.config import load_config, validate
    from megasmoe.model import to_transformer_config
    from megasmoe.training.distributed import destroy_distributed, init_distributed

    cfg = validate(load_config(args.config, [
        "parallel.world_size=1", "parallel.ep=1", "checkpoint.enabled=false",
        "logging.tensorboard=false", "data.source=mock", *args.overrides]), 1)
    init_distributed(cfg)
    tc = to_transformer_config(cfg)
    modules = {name: cls(config=tc, layer_number=1, attn_mask_type=AttnMaskType.causal,
                         attention_type="self", softmax_scale=None, cp_comm_type=None,
                         pg_collection=None)
               for name, cls in (("sdpa", SDPAttention), ("unfused", DotProductAttention))}
    device, dtype = platform.device(), tc.params_dtype
    heads, groups, dim = tc.num_attention_heads, tc.num_query_groups, tc.kv_channels
    batch = cfg.train.micro_batch_size
    rows = []
    for seq in args.seq:
        gen = torch.Generator().manual_seed(0)
        qkv = [torch.randn(seq, batch, n, dim, generator=gen).to(device, dtype)
               for n in (heads, groups, groups)]
        grad = torch.randn(seq, batch, heads * dim, generator=gen).to(device, dtype)

        def step(module):
            q, k, v = (t.detach().requires_grad_(True) for t in qkv)
            module(q, k, v, None).backward(grad)

        samples = {name: [] for name in modules}
        for name, module in modules.items():
            step(module)  # warm-up
        for _ in range(args.repeats):
            for name, module in modules.items():
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                start = time.perf_counter()
                step(module)
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                samples[name].append((time.perf_counter() - start) * 1e3)
        rows.append((seq, samples))
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"device: {name}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"batch {batch}, {heads} heads, {groups} query groups, head_dim {dim}, {dtype}, "
          f"causal, forward+backward, {args.repeats} rounds")
    print(f"{'seq':>6}{'sdpa ms':>10}{'(min-max)':>16}{'unfused ms':>12}{'(min-max)':>16}"
          f"{'unfused/sdpa':>14}")
    for seq, s in rows:
        med = {n: statistics.median(v) for n, v in s.items()}
        spread = {n: f"({min(v):.2f}-{max(v):.2f})" for n, v in s.items()}
        print(f"{seq:>6}{med['sdpa']:>10.2f}{spread['sdpa']:>16}{med['unfused']:>12.2f}"
              f"{spread['unfused']:>16}{med['unfused'] / med['sdpa']:>14.2f}")
    destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
