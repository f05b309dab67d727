#!/usr/bin/env bash
# Every CPU benchmark of docs/benchmarks.md, one after the other (run on a quiet machine):
#   bash bench/run_all.sh [OUT_DIR]
# Writes the logs to OUT_DIR (default /tmp/megasmoe-bench-all) and prints a summary.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out="${1:-/tmp/megasmoe-bench-all}"
py=.venv/bin/python
export OMP_NUM_THREADS=1
# A private corpus cache, so the first default run includes the corpus preparation.
export MEGASMOE_CACHE="$out/cache"
rm -rf "$out"; mkdir -p "$out"
echo "== $(date -u +%F) $(uptime)"
for n in 1 2; do
    echo "== default command, run $n ($([ $n = 1 ] && echo fresh || echo cached) corpus)"
    /usr/bin/time -v bash launch/pretrain.sh configs/tiny-cpu.yaml "run.dir=$out/default$n" \
        > "$out/default$n.log" 2> "$out/default$n.time"
    grep -E "Elapsed|Maximum resident" "$out/default$n.time"
done
$py - "$out/default2/metrics.jsonl" <<'PY'
import json, sys
recs = [json.loads(line) for line in open(sys.argv[1])]
tps = sorted(r["train/tokens_per_sec"] for r in recs if "train/tokens_per_sec" in r)
mem = max(r.get("train/mem_gb", 0) for r in recs)
last = [r for r in recs if "valid/loss" in r][-1]
print(f"peak train/mem_gb {mem:.2f}, median tokens/s {tps[len(tps) // 2]:,.0f}, "
      f"valid loss {last['valid/loss']:.3f} at step {last['step']}")
PY
echo "== bench_train, world size 1"; $py bench/bench_train.py --steps 20
echo "== bench_train, EP=2 over 2 processes"
.venv/bin/torchrun --standalone --nproc-per-node 2 bench/bench_train.py configs/tiny-cpu.yaml \
    --steps 20 2> "$out/bench_train_ep2.err"
echo "== bench_vs_hf (world size 1, against a plain transformers Mixtral loop)"
$py bench/bench_vs_hf.py --variant moe.expert_backend=sequential --variant "" \
    2> "$out/bench_vs_hf.err"
echo "== bench_routers"; $py bench/bench_routers.py 2> "$out/bench_routers.err"
echo "== bench_attention"; $py bench/bench_attention.py --repeats 30 2> "$out/bench_attention.err"
echo "== bench_experts"; $py bench/bench_experts.py 2> "$out/bench_experts.err"
echo "== bench_checkpoint"; $py bench/bench_checkpoint.py 2> "$out/bench_checkpoint.err"
echo "== bench_preprocess"; $py bench/bench_preprocess.py --repeats 3
echo "== $(uptime)"
