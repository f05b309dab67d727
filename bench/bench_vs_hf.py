"""Benchmark: megasmoe's trainer against a plain transformers Mixtral training loop.

    .venv/bin/python bench/bench_vs_hf.py [CONFIG] [key=value ...] [--rounds R] [--steps S]
                                          [--profile] [--json FILE]

Both run in this one process at world size 1, at the same shape (the config's layers,
hidden size, heads, experts, top-k, expert FFN size, vocabulary, sequence length, micro
and global batch), with the same optimizer settings (AdamW, lr, betas, weight decay,
gradient clipping, gradient accumulation over micro batches), in fp32 on CPU:

- megasmoe: the real ``Trainer`` (megatron-core GPT-MoE, megatron's optimizer and
  gradient buffers, the config's router, dispatcher and expert backend, its data loader);
- plain: ``transformers.MixtralForCausalLM`` (SDPA attention, untied embeddings,
  router aux loss on) with ``torch.optim.AdamW`` and ``clip_grad_norm_``, on random
  token ids: the loop a researcher writes in 30 lines.

The candidates are interleaved round-robin (R rounds of S steps each, after a warm-up),
so drift on a shared machine hits both alike; reported are each side's median tokens/s
and the per-round ratio megasmoe / plain (median, min, max). ``--profile`` adds one
profiled round per side and prints where the step time goes by category (GEMMs,
attention, element-wise, MoE permutation, communication, optimizer, other).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402

# Operator-name fragments -> category for the profile breakdown (first match wins).
CATEGORIES = (
    ("gemm", ("aten::mm", "aten::bmm", "aten::addmm", "aten::_grouped_mm", "aten::matmul",
              "aten::linear", "aten::_scaled_mm")),
    ("attention", ("scaled_dot_product", "flash_attention", "aten::_softmax", "baddbmm")),
    ("moe permute/route", ("index_select", "index_add", "index_copy", "scatter", "gather",
                           "aten::topk", "aten::sort", "argsort", "masked_select",
                           "nonzero", "bincount", "histc", "aten::index", "one_hot",
                           "cumsum")),
    ("communication", ("c10d::", "alltoall", "allreduce", "all_gather", "_AllToAll",
                       "broadcast")),
    ("optimizer", ("Optimizer.", "lerp", "addcdiv", "addcmul", "_foreach", "aten::sqrt")),
    ("copies/cat", ("aten::cat", "aten::copy_", "aten::_to_copy", "aten::clone",
                    "aten::contiguous", "aten::fill_", "aten::zero_")),
    ("element-wise", ("aten::mul", "aten::add", "aten::sub", "aten::div", "silu", "aten::exp",
                      "aten::pow", "aten::rsqrt", "aten::mean", "aten::sum", "aten::neg",
                      "aten::sigmoid", "aten::softmax", "log_softmax", "aten::max",
                      "aten::where", "aten::cos", "aten::sin", "nll_loss", "aten::norm",
                      "vector_norm", "aten::abs", "aten::clamp")),
)


def categorise(averages) -> dict[str, float]:
    """Self CPU seconds per category from ``profiler.key_averages()``."""
    totals: dict[str, float] = {}
    for evt in averages:
        name = evt.key
        seconds = evt.self_cpu_time_total / 1e6
        category = "other (Python, autograd, views)"
        for cat, fragments in CATEGORIES:
            if any(f in name for f in fragments):
                category = cat
                break
        totals[category] = totals.get(category, 0.0) + seconds
    return totals


class Megasmoe:
    """megasmoe's Trainer at world size 1; ``step()`` is one optimizer step.

    Several variants (e.g. expert backends) live in one process: the first one starts
    the process group; each later one re-seeds the RNG streams as a fresh process would.
    """

    def __init__(self, config: str, overrides: list[str], steps: int, variant: str = ""):
        from megatron.core import parallel_state as ps
        from megatron.core.num_microbatches_calculator import (
            destroy_num_microbatches_calculator,
        )

        from megasmoe import platform
        from megasmoe.config import load_config, validate
        from megasmoe.training.data import resolve_data
        from megasmoe.training.distributed import init_distributed
        from megasmoe.training.trainer import Trainer

        self.name = f"megasmoe[{variant}]" if variant else "megasmoe"
        overrides = ["parallel.world_size=1", "parallel.ep=1", *overrides,
                     *[v for v in variant.split(",") if v],
                     f"train.steps={steps}", "checkpoint.enabled=false",
                     "logging.tensorboard=false", "run.dir=/tmp/megasmoe-bench-vs-hf"]
        self.cfg = validate(load_config(config, overrides), None)
        resolve_data(self.cfg)
        if ps.model_parallel_is_initialized():
            # The micro-batch calculator is global; every variant has the same batch.
            destroy_num_microbatches_calculator()
            platform.seed_rng_streams(self.cfg.run.seed, tp_rank=0, ep_rank=0, etp_rank=0)
        else:
            init_distributed(self.cfg)
        self.trainer = Trainer(self.cfg)
        self.trainer._train_iters = self.trainer._iterators(self.trainer.train_ds, 0)
        for m in self.trainer.model:
            m.train()

    def step(self) -> None:
        self.trainer.train_step()

    def parameters(self) -> int:
        return sum(p.numel() for m in self.trainer.model for p in m.parameters())


class PlainMixtral:
    """A plain transformers Mixtral training loop at the same shape and optimizer."""

    name = "plain"

    def __init__(self, cfg):
        from transformers import MixtralConfig, MixtralForCausalLM

        m, e, t = cfg.model, cfg.moe, cfg.train
        torch.manual_seed(cfg.run.seed)
        hf = MixtralConfig(
            vocab_size=m.vocab_size, hidden_size=m.hidden_size,
            intermediate_size=e.ffn_hidden_size, num_hidden_layers=m.num_layers,
            num_attention_heads=m.num_heads,
            num_key_value_heads=m.num_query_groups or m.num_heads,
            num_local_experts=e.num_experts, num_experts_per_tok=e.topk,
            max_position_embeddings=t.seq_length, rope_theta=float(m.rope_base),
            rms_norm_eps=m.norm_eps, tie_word_embeddings=m.share_embeddings,
            output_router_logits=e.aux_loss_coeff > 0, router_aux_loss_coef=e.aux_loss_coeff,
            initializer_range=m.init_std, attn_implementation="sdpa",
        )
        self.model = MixtralForCausalLM(hf).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=t.lr,
                                     betas=(t.adam_beta1, t.adam_beta2),
                                     weight_decay=t.weight_decay)
        self.clip = t.clip_grad
        self.micro = t.micro_batch_size
        self.accumulation = t.global_batch_size // t.micro_batch_size
        self.seq = t.seq_length
        self.vocab = m.vocab_size
        self.gen = torch.Generator().manual_seed(cfg.run.seed)

    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def step(self) -> None:
        from megasmoe.platform.cpu import device_mode_suspended

        # A plain loop runs without megasmoe's CPU platform layer (whose device mode
        # sees every torch call in this process): measure it as it runs alone.
        with device_mode_suspended():
            self._step()

    def _step(self) -> None:
        for _ in range(self.accumulation):
            ids = torch.randint(0, self.vocab, (self.micro, self.seq), generator=self.gen)
            loss = self.model(input_ids=ids, labels=ids).loss
            (loss / self.accumulation).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def timed(side, steps: int) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) for ``steps`` optimizer steps of ``side``.

    CPU time is the steadier number on a shared machine (it does not count time the
    process waits for a core); wall time is what a user sees.
    """
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        side.step()
    return time.perf_counter() - wall, time.process_time() - cpu


def profile_breakdown(side, steps: int) -> dict[str, float]:
    """Share of self CPU time per category over ``steps`` profiled steps."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            side.step()
    totals = categorise(prof.key_averages())
    whole = sum(totals.values())
    return {k: v / whole for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default="configs/tiny-cpu.yaml")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--variant", action="append", default=[],
                        help="a megasmoe variant: comma-separated key=value on top of the "
                             "config (repeatable; default: the config as is)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (>= 2)")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per side first")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--profile", action="store_true", help="print a time breakdown")
    parser.add_argument("--json", help="also write the result as JSON to this file")
    args = parser.parse_args(argv)
    if args.rounds < 2:
        parser.error("--rounds must be at least 2 (the spread needs two rounds)")
    if "WORLD_SIZE" in os.environ:
        parser.error("run it as one process (no torchrun): the comparison is at world size 1")
    if args.threads:
        torch.set_num_threads(args.threads)

    total = args.warmup + args.rounds * args.steps + (args.steps if args.profile else 0) + 1
    megas = [Megasmoe(args.config, args.overrides, total, v) for v in (args.variant or [""])]
    plain = PlainMixtral(megas[0].cfg)
    sides = (*megas, plain)
    for side in sides:
        timed(side, args.warmup)
    t = megas[0].cfg.train
    tokens = args.steps * t.global_batch_size * t.seq_length
    rates: dict[str, list[float]] = {s.name: [] for s in sides}
    cpu_rates: dict[str, list[float]] = {s.name: [] for s in sides}
    for r in range(args.rounds):
        # Rotate who goes first so no side always follows the same neighbour.
        for side in sides[r % len(sides):] + sides[:r % len(sides)]:
            wall, cpu = timed(side, args.steps)
            rates[side.name].append(tokens / wall)
            cpu_rates[side.name].append(tokens / cpu)

    def ratio(table, name):
        values = [a / b for a, b in zip(table[name], table["plain"])]
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}

    result = {
        "config": args.config, "overrides": args.overrides, "variants": args.variant,
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "rounds": args.rounds, "steps_per_round": args.steps,
        "tokens_per_step": t.global_batch_size * t.seq_length,
        "parameters": {s.name: s.parameters() for s in sides},
        "tokens_per_sec": {k: statistics.median(v) for k, v in rates.items()},
        "tokens_per_cpu_sec": {k: statistics.median(v) for k, v in cpu_rates.items()},
        "ratio_over_plain": {m.name: ratio(rates, m.name) for m in megas},
        "cpu_ratio_over_plain": {m.name: ratio(cpu_rates, m.name) for m in megas},
    }
    print(f"{args.rounds} rounds x {args.steps} steps, {result['threads']} threads; "
          f"per-round ratio to plain: median [min, max]")
    for s in sides:
        line = (f"{s.name:40s} {result['tokens_per_sec'][s.name]:8,.0f} tokens/s  "
                f"{result['tokens_per_cpu_sec'][s.name]:8,.0f} tokens/cpu-s  "
                f"{result['parameters'][s.name]:,} parameters")
        if s is not plain:
            r, c = result["ratio_over_plain"][s.name], result["cpu_ratio_over_plain"][s.name]
            line += (f"  ratio {r['median']:.3f} [{r['min']:.3f}, {r['max']:.3f}]"
                     f"  cpu ratio {c['median']:.3f} [{c['min']:.3f}, {c['max']:.3f}]")
        print(line)
    if args.profile:
        result["breakdown"] = {s.name: profile_breakdown(s, args.steps) for s in sides}
        cats = []
        for s in sides:
            cats += [c for c in result["breakdown"][s.name] if c not in cats]
        print(f"{'share of profiled CPU time':34s}" + "".join(f" {s.name[:18]:>18s}" for s in sides))
        for c in cats:
            print(f"{c:34s}" + "".join(
                f" {result['breakdown'][s.name].get(c, 0):18.1%}" for s in sides))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    from megasmoe.training.distributed import destroy_distributed

    for m in megas:
        m.trainer.close()
    destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
