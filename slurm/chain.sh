#!/usr/bin/env bash
# Submit a chain of N jobs for one long run: each starts when the previous one ended
# (--dependency=afterany), resumes from the run directory's latest checkpoint and
# trains until its own time limit (checkpointing on SIGUSR1, like every job).
#
#   bash slurm/chain.sh N [sbatch options ...] -- [CONFIG.yaml] [key=value ...]
#   bash slurm/chain.sh 5 --time=24:00:00 --nodes=4 --ntasks-per-node=8 --gpus-per-node=8 \
#        -- configs/mixtral-8x7b.yaml data.prefixes=[/data/mine/text_document]
#
# Use it where jobs may not requeue themselves (--no-requeue policies, or a cap on
# restarts): the links set MEGASMOE_NO_REQUEUE=1, so a link that reaches its time limit
# checkpoints and ends, and the next link continues. afterany, not afterok: a link that
# failed or timed out still hands over to the next one, which resumes from the last good
# checkpoint. A link that finds the run already finished exits after a quick start.
# Cancel the rest with `scancel <ids>` (printed below). Run from the repository root.
set -euo pipefail
n="${1:?usage: bash slurm/chain.sh N [sbatch options ...] -- [CONFIG.yaml] [key=value ...]}"
shift
opts=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do opts+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift

cd "$(dirname "${BASH_SOURCE[0]}")/.."
prev=""
ids=()
for i in $(seq 1 "$n"); do
    dep=()
    [ -n "$prev" ] && dep=(--dependency="afterany:$prev")
    prev="$(MEGASMOE_NO_REQUEUE=1 sbatch --parsable "${dep[@]}" "${opts[@]}" \
        launch/pretrain.sh "$@")"
    prev="${prev%%;*}"
    ids+=("$prev")
    echo "link $i/$n: job $prev${dep:+ (after ${dep[0]#--dependency=afterany:})}"
done
echo "chain: ${ids[*]}"
