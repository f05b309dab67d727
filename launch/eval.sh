#!/usr/bin/env bash
#SBATCH --job-name=megasmoe-eval
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=2
#SBATCH --time=00:30:00
#SBATCH --output=slurm-%x-%j.out
#
# Evaluate a megasmoe checkpoint (megasmoe eval), locally or as a SLURM batch job.
#
#   bash launch/eval.sh RUN|CHECKPOINT [key=value ...] [options]     local: torchrun
#   sbatch launch/eval.sh RUN|CHECKPOINT [key=value ...] [options]   SLURM: srun + torchrun per node
#
# The number of processes is the evaluated layout's world size: the run's own layout,
# or the one the overrides give (parallel.world_size=1 parallel.ep=1, parallel.tp=2
# parallel.sp=true, ...). Everything (checkpoint, config, data files, questions) is
# checked before torchrun starts; a problem is one line and exit code 2. Under SLURM
# the job step is the one megasmoe.launch plans for pretraining (one torchrun per node,
# c10d rendezvous on the first node, port 20000 + job id mod 20000); nodes x tasks per
# node must equal the world size. No requeue: an evaluation is simply run again.
# Options and outputs: docs/evaluation.md.
set -euo pipefail

if [ -n "${MEGASMOE_ROOT:-}" ]; then
    root="$MEGASMOE_ROOT"
elif [ -n "${SLURM_JOB_ID:-}" ] && [ -n "${SLURM_SUBMIT_DIR:-}" ] \
        && [ -f "${SLURM_SUBMIT_DIR}/launch/eval.sh" ]; then
    root="$SLURM_SUBMIT_DIR"
else
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
fi
if [ $# -lt 1 ]; then
    echo "usage: bash launch/eval.sh RUN|CHECKPOINT [key=value ...] [options]" >&2
    exit 2
fi
# Relative paths (RUN, --data/--mc files) are the caller's; make RUN absolute here.
target="$1"
shift
[[ "$target" == /* ]] || target="$PWD/$target"
export MEGASMOE_CALLER_DIR="${MEGASMOE_CALLER_DIR:-$PWD}"
if [ -x "$root/.venv/bin/python" ]; then
    bin="$root/.venv/bin"
else
    bin="$(dirname "$(command -v python3)")"
fi

if [ -z "${SLURM_JOB_ID:-}" ] || [ "${MEGASMOE_LAUNCH:-}" = local ] || ! command -v srun >/dev/null 2>&1; then
    nproc="$("$bin/python" -m megasmoe.cli eval "$target" "$@" --world-size)"
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( $(nproc) / nproc > 0 ? $(nproc) / nproc : 1 ))}"
    cd "$root"
    MEGASMOE_LAUNCHER_PID=$$ exec "$bin/torchrun" --standalone --nproc-per-node="$nproc" \
        -m megasmoe.cli eval "$target" "$@"
fi

argv_file="$(mktemp)"
trap 'rm -f "$argv_file"' EXIT
"$bin/python" -m megasmoe.cli eval "$target" "$@" --slurm-argv="$argv_file"
mapfile -d '' step <"$argv_file"
cd "$root"
echo "+ ${step[*]} eval $target $*"
"${step[@]}" eval "$target" "$@"
