#!/usr/bin/env bash
# GPU check for the lent GPU machine (one H100/H200): bash bench/gpu/run.sh
#
# Writes $OUT/gpu_check.json and $OUT/gpu_check.md ($OUT defaults to bench/gpu/out):
# device and versions, measured matmul peaks, every expert backend and precision against
# sequential fp32, the MoE layer per router, and a 30-step NCCL training run in bf16 and
# FP8 (bench/gpu/gpu_check.py; schema and how to run it: docs/benchmarks.md, "GPU check").
#
# Exit codes: 0 every section ok; 1 a section failed (its error is in the JSON); 2 this
# machine cannot run the check (no CUDA GPU, torch or megatron-core missing: one line on
# stderr); 124 the whole run outlasted its limit (MEGASMOE_GPU_CHECK_TIMEOUT, 470 s).
#
# Where megatron-core does not import, wheels in .whl/ (megatron_core-0.16.1 cp312) are
# installed into /tmp/site (MEGASMOE_GPU_CHECK_SITE) and put on PYTHONPATH after the
# repository root, so megasmoe is imported from this checkout.
#
# CI only: MEGASMOE_GPU_CHECK_CPU_SMOKE=1 runs every section at tiny shapes on CPU with
# gloo (gpu_check.py --cpu-smoke), to catch a broken script without a GPU; never numbers.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
repo=$(pwd)
me=bench/gpu/run.sh

py=${PYTHON:-}
if [ -z "$py" ]; then
    if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
fi
smoke=()
if [ "${MEGASMOE_GPU_CHECK_CPU_SMOKE:-0}" = 1 ]; then smoke=(--cpu-smoke); fi

if ! "$py" -c 'import torch' >/dev/null 2>&1; then
    echo "$me: torch does not import with $py; run it on the lent GPU machine (docs/benchmarks.md)" >&2
    exit 2
fi
if [ ${#smoke[@]} -eq 0 ] && ! "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; then
    echo "$me: no CUDA GPU (torch.cuda.is_available() is False); run it on the lent GPU machine (docs/benchmarks.md)" >&2
    exit 2
fi

export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
if ! "$py" -c 'import megatron.core' >/dev/null 2>&1; then
    site=${MEGASMOE_GPU_CHECK_SITE:-/tmp/site}
    if compgen -G '.whl/*.whl' >/dev/null; then
        echo "$me: installing $(ls .whl/*.whl | tr '\n' ' ')into $site"
        "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$site" .whl/*.whl
        export PYTHONPATH="$repo:$site${PYTHONPATH#"$repo"}"
    fi
    if ! "$py" -c 'import megatron.core' >/dev/null 2>&1; then
        echo "$me: megatron-core does not import; carry megatron_core-0.16.1-cp312-cp312-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl in .whl/ (docs/benchmarks.md)" >&2
        exit 2
    fi
fi

export PYTHONUNBUFFERED=1
out=${OUT:-bench/gpu/out}
limit=${MEGASMOE_GPU_CHECK_TIMEOUT:-470}
echo "$me: $py bench/gpu/gpu_check.py --out $out ${smoke[*]:-} (limit ${limit} s)"
rc=0
timeout --kill-after=10 "$limit" "$py" bench/gpu/gpu_check.py --out "$out" ${smoke[@]+"${smoke[@]}"} || rc=$?
if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    echo "$me: FAILED: the check outlasted its ${limit} s limit; $out/gpu_check.json holds the sections that finished" >&2
    exit 124
fi
if [ "$rc" -ne 0 ]; then
    echo "$me: FAILED (exit $rc); see $out/gpu_check.json" >&2
fi
exit "$rc"
