"""Benchmark: preprocessing throughput (MB of text per second) with 1 and 2 workers.

    .venv/bin/python bench/bench_preprocess.py [--repeats N] [--vocab-size V]

Tokenizes the whole embedded corpus (all splits, ~4 MB of text) into an indexed dataset
with the default tokenizer (trained once into a temporary cache, not timed), once per
worker count and repeat in this one run; reports the best time of each worker count,
the throughput ratio 2 workers / 1 worker, and checks both outputs are byte-identical.
Wall time includes starting the worker pool, as a user of `megasmoe preprocess` sees it.
The CPU column (this process + its workers) and the load average in the header tell a
busy machine (wall time far above CPU time) from a slow pipeline.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import resource
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megasmoe.data import SPLITS, corpus_documents, prepare_default_data  # noqa: E402
from megasmoe.data.preprocess import preprocess_documents  # noqa: E402


def _cpu_seconds() -> float:
    # Workers are joined when preprocessing returns, so RUSAGE_CHILDREN includes them.
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="runs per worker count")
    parser.add_argument("--vocab-size", type=int, default=4096)
    args = parser.parse_args(argv)

    docs = [d for s in SPLITS for d in corpus_documents(s)]
    with tempfile.TemporaryDirectory(prefix="megasmoe-bench-pre-") as tmp:
        tmp = Path(tmp)
        tokenizer = prepare_default_data(tmp / "cache", args.vocab_size)["tokenizer"]
        best = {}
        for _ in range(args.repeats):
            for workers in (1, 2):
                cpu = _cpu_seconds()
                s = preprocess_documents(docs, tmp / f"w{workers}", tokenizer, workers,
                                         progress=False)
                s["cpu"] = _cpu_seconds() - cpu
                if workers not in best or s["seconds"] < best[workers]["seconds"]:
                    best[workers] = s
        same = all(filecmp.cmp(tmp / f"w1{ext}", tmp / f"w2{ext}", shallow=False)
                   for ext in (".bin", ".idx"))

    mb = best[1]["bytes"] / 1e6
    print(f"corpus: {len(docs)} documents, {mb:.2f} MB of text, {best[1]['tokens']} tokens; "
          f"vocab {args.vocab_size}; {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}; best of {args.repeats}")
    print(f"{'workers':>7}  {'seconds':>7}  {'CPU s':>6}  {'MB/s':>6}  {'Ktok/s':>7}")
    for w, s in sorted(best.items()):
        print(f"{w:>7}  {s['seconds']:7.2f}  {s['cpu']:6.2f}  {mb / s['seconds']:6.2f}  "
              f"{s['tokens'] / s['seconds'] / 1e3:7.1f}")
    print(f"ratio 2 workers / 1 worker: {best[1]['seconds'] / best[2]['seconds']:.2f}x; "
          f"outputs identical: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
