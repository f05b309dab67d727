#!/usr/bin/env bash
#SBATCH --job-name=megasmoe
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --time=01:00:00
#SBATCH --output=slurm-%x-%j.out
#
# Pretrain with megasmoe.
#
#   bash launch/pretrain.sh [CONFIG.yaml] [key=value ...]      local: torchrun on this machine
#   sbatch launch/pretrain.sh [CONFIG.yaml] [key=value ...]    SLURM: one torchrun per node
#
# CONFIG defaults to configs/tiny-cpu.yaml. The number of processes is the config's
# parallel.world_size (or tp x pp x cp x dp). Every #SBATCH default above can be
# overridden on the sbatch command line (e.g. sbatch --nodes=4 --time=2:00:00 ...).
set -euo pipefail

# Under sbatch the script runs from a spool copy: find the repo from the submit dir.
if [ -n "${SLURM_SUBMIT_DIR:-}" ] && [ -f "${SLURM_SUBMIT_DIR}/launch/pretrain.sh" ]; then
    root="$SLURM_SUBMIT_DIR"
else
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
fi
cd "$root"

config="configs/tiny-cpu.yaml"
if [ $# -gt 0 ] && [[ "$1" == *.yaml || "$1" == *.yml ]]; then
    config="$1"
    shift
fi

if [ -x "$root/.venv/bin/python" ]; then
    bin="$root/.venv/bin"
else
    bin="$(dirname "$(command -v python3)")"
fi
# Validate before anything starts; prints the world size (or a one-line config error).
nproc="$("$bin/python" -m megasmoe.cli world-size "$config" "$@")"

if [ -n "${SLURM_JOB_ID:-}" ] && command -v srun >/dev/null 2>&1; then
    nodes="${SLURM_JOB_NUM_NODES:-1}"
    if (( nproc % nodes != 0 )); then
        echo "megasmoe: config error: world size $nproc is not divisible by $nodes nodes; change parallel.* or --nodes" >&2
        exit 2
    fi
    head="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
    # A port per job so that jobs sharing a head node do not collide.
    port=$(( 20000 + SLURM_JOB_ID % 20000 ))
    exec srun --ntasks-per-node=1 --kill-on-bad-exit=1 \
        "$bin/torchrun" --nnodes="$nodes" --nproc-per-node=$(( nproc / nodes )) \
        --rdzv-backend=c10d --rdzv-endpoint="$head:$port" --rdzv-id="$SLURM_JOB_ID" \
        -m megasmoe.cli pretrain "$config" "$@"
fi

export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( $(nproc) / nproc > 0 ? $(nproc) / nproc : 1 ))}"
exec "$bin/torchrun" --standalone --nproc-per-node="$nproc" \
    -m megasmoe.cli pretrain "$config" "$@"
