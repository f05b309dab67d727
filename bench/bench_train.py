"""Benchmark: training-step throughput and the share of step time spent in the router.

    .venv/bin/python bench/bench_train.py [CONFIG] [key=value ...] [--steps N] [--warmup W]
    .venv/bin/torchrun --nproc-per-node 2 bench/bench_train.py configs/tiny-cpu.yaml

Times `--steps` training steps of the real Trainer after `--warmup` steps and reports
tokens/s, the share of step time spent fetching data (goal < 2%) and, from hooks
around every router (forward: pre/post hooks; backward: the gradient hooks on the
router's output probs and its input), the router's forward + backward time as a share
of the step time. Both numbers come from the same run.
Without torchrun it runs as one process (parallel.world_size=1, parallel.ep=1 are
added). On GPU the hooks synchronise the device, which slightly slows the whole step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402


class RouterTimer:
    """Accumulates wall time inside router forward and backward passes."""

    def __init__(self, routers):
        self.seconds = 0.0
        self._fwd_start = {}
        self._bwd_start = {}
        for r in routers:
            r.register_forward_pre_hook(self._pre)
            r.register_forward_hook(self._post)

    @staticmethod
    def _now() -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def _pre(self, module, args, kwargs=None):
        self._fwd_start[id(module)] = self._now()
        x = args[0]
        if x.requires_grad:
            # Gradient w.r.t. the router input arrives last: end of the router backward.
            x.register_hook(lambda g, m=id(module): self._bwd_end(m))

    def _post(self, module, args, output):
        self.seconds += self._now() - self._fwd_start.pop(id(module))
        probs = output[0]
        if probs.requires_grad:
            probs.register_hook(lambda g, m=id(module): self._bwd_begin(m))

    def _bwd_begin(self, key):
        self._bwd_start[key] = self._now()

    def _bwd_end(self, key):
        start = self._bwd_start.pop(key, None)
        if start is not None:
            self.seconds += self._now() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default="configs/tiny-cpu.yaml")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", help="also write the result as JSON to this file")
    args = parser.parse_args(argv)

    from megasmoe.config import load_config, validate
    from megasmoe.training import telemetry
    from megasmoe.training.data import resolve_data
    from megasmoe.training.distributed import destroy_distributed, init_distributed, is_main
    from megasmoe.training.trainer import Trainer

    launched = "WORLD_SIZE" in os.environ
    overrides = list(args.overrides)
    if not launched:
        overrides = ["parallel.world_size=1", "parallel.ep=1", *overrides]
    overrides += [f"train.steps={args.steps + args.warmup + 1}", "checkpoint.enabled=false",
                  "logging.tensorboard=false", "run.dir=/tmp/megasmoe-bench"]
    cfg = validate(load_config(args.config, overrides),
                   int(os.environ["WORLD_SIZE"]) if launched else None)
    resolve_data(cfg)
    init_distributed(cfg)
    trainer = Trainer(cfg)
    trainer._train_iters = trainer._iterators(trainer.train_ds, 0)
    for m in trainer.model:
        m.train()
    for _ in range(args.warmup):
        trainer.train_step()
    timer = RouterTimer(telemetry.routers(trainer.unwrapped))
    data_seconds = [0.0]

    class TimedIterator:
        """Counts the time spent fetching micro batches from the data loader."""

        def __init__(self, it):
            self.it = it

        def __iter__(self):
            return self

        def __next__(self):
            start = time.perf_counter()
            try:
                return next(self.it)
            finally:
                data_seconds[0] += time.perf_counter() - start

    trainer._train_iters = [TimedIterator(it) for it in trainer._train_iters]
    start = time.perf_counter()
    for _ in range(args.steps):
        trainer.train_step()
    elapsed = time.perf_counter() - start
    t = cfg.train
    result = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "world_size": cfg.parallel.world_size,
        "layout": f"tp={cfg.parallel.tp} pp={cfg.parallel.pp} ep={cfg.parallel.ep} "
                  f"dp={cfg.parallel.dp}",
        "router": cfg.moe.router.name,
        "steps": args.steps,
        "step_time_s": elapsed / args.steps,
        "tokens_per_sec": args.steps * t.global_batch_size * t.seq_length / elapsed,
        "router_share": timer.seconds / elapsed,
        "data_loader_share": data_seconds[0] / elapsed,
    }
    if is_main():
        print(json.dumps(result, indent=1))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
    trainer.close()
    destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
