"""Benchmark: checkpoint save/load time and size, and the training stall a save causes.

    .venv/bin/python bench/bench_checkpoint.py [CONFIG] [key=value ...]
    .venv/bin/torchrun --nproc-per-node 2 bench/bench_checkpoint.py configs/tiny-cpu.yaml

Measured in one run of the real Trainer: mean step time without saving; a synchronous
save (wall time = stall); an asynchronous save (the stall is only the part that blocks
the training loop: planning and the copy to the writer; the rest overlaps the next
steps); load time; checkpoint size on disk. Goal on GPU: async stall under 10% of the
synchronous save.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")


def _size_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default="configs/tiny-cpu.yaml")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args(argv)

    import torch.distributed as dist
    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

    from megasmoe import checkpoint as ckpt
    from megasmoe.config import load_config, validate
    from megasmoe.training.data import resolve_data
    from megasmoe.training.distributed import destroy_distributed, init_distributed, is_main
    from megasmoe.training.trainer import Trainer

    launched = "WORLD_SIZE" in os.environ
    overrides = list(args.overrides)
    if not launched:
        overrides = ["parallel.world_size=1", "parallel.ep=1", *overrides]
    root = Path("/tmp/megasmoe-bench-ckpt")
    overrides += [f"train.steps={4 * args.steps + 10}", "logging.tensorboard=false",
                  f"run.dir={root}", "checkpoint.resume=false"]
    cfg = validate(load_config(args.config, overrides),
                   int(os.environ["WORLD_SIZE"]) if launched else None)
    resolve_data(cfg)
    init_distributed(cfg)
    if is_main() and root.exists():
        shutil.rmtree(root)
    dist.barrier()
    trainer = Trainer(cfg)
    trainer._train_iters = trainer._iterators(trainer.train_ds, 0)
    for m in trainer.model:
        m.train()
    trainer.train_step()

    def steps(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            trainer.train_step()
        return (time.perf_counter() - start) / n

    step_time = steps(args.steps)
    ckpt_root = ckpt.checkpoint_root(cfg.run.path)

    start = time.perf_counter()
    path = ckpt.save_checkpoint(trainer, ckpt_root, keep_last=0)
    sync_save = time.perf_counter() - start
    size = _size_mb(path)

    queue = AsyncCallsQueue()
    trainer.train_step()
    start = time.perf_counter()
    ckpt.save_checkpoint(trainer, ckpt_root, keep_last=0, async_queue=queue)
    async_stall = time.perf_counter() - start
    overlapped_step = steps(1)
    start = time.perf_counter()
    queue.maybe_finalize_async_calls(blocking=True)
    async_tail = time.perf_counter() - start
    queue.close()

    start = time.perf_counter()
    ckpt.load_checkpoint(trainer, path)
    load_time = time.perf_counter() - start
    if is_main():
        print(f"layout: {cfg.parallel.world_size} process(es), tp={cfg.parallel.tp} "
              f"ep={cfg.parallel.ep}; checkpoint {size:.1f} MB")
        print(f"step time (no save)        {step_time * 1e3:8.1f} ms")
        print(f"synchronous save (stall)   {sync_save * 1e3:8.1f} ms")
        print(f"asynchronous save stall    {async_stall * 1e3:8.1f} ms  "
              f"({async_stall / sync_save:.0%} of synchronous)")
        print(f"  next step while writing  {overlapped_step * 1e3:8.1f} ms; "
              f"wait at finalize {async_tail * 1e3:.1f} ms")
        print(f"load                       {load_time * 1e3:8.1f} ms")
    trainer.close()
    destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
