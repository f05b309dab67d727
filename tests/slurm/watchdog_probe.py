"""One rank of a 2-process gloo job for tests/test_slurm_watchdog.py (env:// from the test).

    python tests/slurm/watchdog_probe.py RUN_DIR TIMEOUT MODE

Starts the process groups as training does (megasmoe.training.distributed, so the
watchdog and train.collective_timeout=TIMEOUT apply), prints every group's timeout, then:
MODE=allreduce: all-reduces until killed (a peer's death ends it); MODE=finish-early:
rank 1 returns at once and rank 0 keeps going for 1.5 x TIMEOUT before it ends too (a
finished peer is not a lost one).
"""

import sys
import time

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megasmoe.config import load_config, validate
from megasmoe.training.distributed import destroy_distributed, init_distributed

run_dir, timeout, mode = sys.argv[1], sys.argv[2], sys.argv[3]
cfg = validate(load_config(None, ["parallel.world_size=2", "parallel.ep=2",
                                  f"train.collective_timeout={timeout}", f"run.dir={run_dir}"]), 2)
init_distributed(cfg)
try:
    groups = {"world": dist.group.WORLD, "ep": ps.get_expert_model_parallel_group(),
              "dp": ps.get_data_parallel_group(), "tp": ps.get_tensor_model_parallel_group()}
    for name, group in groups.items():
        seconds = group._get_backend(torch.device("cpu")).options._timeout.total_seconds()
        print(f"timeout {name} {seconds:g}", flush=True)
    print("ready", flush=True)
    if mode == "allreduce":
        x = torch.ones(4)
        while True:
            dist.all_reduce(x)
            x.fill_(1)
            time.sleep(0.05)
    elif mode == "finish-early" and dist.get_rank() == 0:
        time.sleep(1.5 * float(timeout.rstrip("s")))
finally:
    destroy_distributed()
print("done", flush=True)
