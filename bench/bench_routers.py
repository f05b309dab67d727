"""Benchmark: forward+backward time of each router and of its whole MoE layer, vs topk.

    .venv/bin/python bench/bench_routers.py [CONFIG] [key=value ...] [--repeats N]
        [--only LABEL,...]

One process (world size 1, gloo). For every registered router the real megasmoe model
is built at the config's shape; the first MoE layer is timed on the same random input
[seq_length, micro_batch_size, hidden]: the router alone (probs.sum().backward()) and the
whole MoE layer (output.sum().backward()), median of --repeats runs, all in one run. The
table reports milliseconds and ratios to ``topk`` (goal: within 1.10x for the MoE layer
except routers that are heavier by design: unified, spectral's first call, hyper).
Routers that run experts inside the layer are timed on normal steps and on the steps
that do the extra work: ``compete`` (normal: frequency 0) and ``compete_step`` (a
competition step, every expert on every token), ``simsmoe`` (no pair armed) and
``simsmoe_cka`` (every pair armed: CKA on each). ``--only`` times just the given rows
(``topk``, the reference, always).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402


def _time(fn, repeats: int) -> float:
    fn()  # warm-up (and spectral's one-off SVD)
    samples = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default="configs/tiny-cpu.yaml")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--only", default=None,
                        help="comma-separated row labels to time (topk always)")
    args = parser.parse_args(argv)

    from megatron.core.num_microbatches_calculator import destroy_num_microbatches_calculator
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from megasmoe import platform
    from megasmoe.config import load_config, validate
    from megasmoe.routers import registered_routers
    from megasmoe.training.data import resolve_data
    from megasmoe.training.distributed import destroy_distributed, init_distributed
    from megasmoe.training.trainer import Trainer

    base = ["parallel.world_size=1", "parallel.ep=1", "moe.dispatcher=allgather",
            "checkpoint.enabled=false", "logging.tensorboard=false",
            "run.dir=/tmp/megasmoe-bench", *args.overrides]
    extra = {"smoe_dropout": ["moe.aux_loss_type=none"], "compete": ["moe.router.frequency=0"]}
    # label -> (router, overrides): the expensive steps of the expert-output routers.
    variants = {"compete_step": ("compete", ["moe.router.frequency=1"]),
                # v2 caps competition at max_layers = 3 of the layers: lift the cap so
                # the timed first layer competes.
                "compete_v2_step": ("compete", ["moe.router.version=v2",
                                                "moe.router.frequency=1",
                                                "moe.router.max_layers=4"]),
                "simsmoe_cka": ("simsmoe", ["moe.router.cont_freq=-1", "moe.router.tau=-1"])}
    entries = [(n, n, extra.get(n, [])) for n in registered_routers()]
    entries += [(label, n, o) for label, (n, o) in variants.items()]
    if args.only:
        wanted = {"topk", *args.only.split(",")}
        unknown = wanted - {label for label, _, _ in entries}
        if unknown:
            parser.error(f"--only: unknown rows {sorted(unknown)}")
        entries = [e for e in entries if e[0] in wanted]
    rows = []
    initialised = False
    for label, name, overrides in entries:
        cfg = validate(load_config(args.config, [*base, f"moe.router.name={name}",
                                                 *overrides]), 1)
        resolve_data(cfg)
        if not initialised:
            init_distributed(cfg)
            initialised = True
        trainer = Trainer(cfg)
        layer = next(m for m in trainer.unwrapped[0].modules() if isinstance(m, MoELayer))
        layer.train()
        for router in trainer.routers:  # step 0: competition / armed pairs take effect
            router.on_train_step(0, cfg.train.steps)
        t = cfg.train
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(t.seq_length, t.micro_batch_size, cfg.model.hidden_size,
                        generator=gen).to(platform.device())

        def router_step():
            inp = x.detach().requires_grad_(True)
            probs, _ = layer.router(inp)
            probs.sum().backward()

        def layer_step():
            inp = x.detach().requires_grad_(True)
            out, _ = layer(inp)
            out.sum().backward()

        rows.append((label, _time(router_step, args.repeats), _time(layer_step, args.repeats)))
        trainer.close()
        destroy_num_microbatches_calculator()
    ref = {r[0]: r for r in rows}["topk"]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"device: {device}; shape: seq {t.seq_length} x batch {t.micro_batch_size} x "
          f"hidden {cfg.model.hidden_size}, {cfg.moe.num_experts} experts, top-{cfg.moe.topk}")
    print(f"{'router':<16}{'router ms':>11}{'vs topk':>9}{'MoE layer ms':>14}{'vs topk':>9}")
    for name, r_s, l_s in rows:
        print(f"{name:<16}{r_s * 1e3:>11.3f}{r_s / ref[1]:>9.2f}{l_s * 1e3:>14.3f}{l_s / ref[2]:>9.2f}")
    destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
