#!/usr/bin/env bash
#SBATCH --job-name=megasmoe
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=2
#SBATCH --time=01:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
#
# Pretrain with megasmoe, locally or as a SLURM batch job.
#
#   bash launch/pretrain.sh [CONFIG.yaml] [key=value ...]      local: torchrun on this machine
#   sbatch launch/pretrain.sh [CONFIG.yaml] [key=value ...]    SLURM: srun + torchrun per node
#
# CONFIG defaults to configs/tiny-cpu.yaml. Locally the number of processes is the
# config's world size. Under SLURM one task is one training process (one per GPU):
# nodes x --ntasks-per-node must equal the config's world size. Every #SBATCH default
# above is overridable on the sbatch command line, e.g.
#   sbatch --nodes=4 --ntasks-per-node=8 --gpus-per-node=8 --time=12:00:00 \
#          --signal=B:USR1@600 launch/pretrain.sh configs/big.yaml parallel.world_size=32
# Submit from the repository root (or set MEGASMOE_ROOT); see docs/slurm.md.
#
# Under SLURM, in order:
#   1. the run directory (run.dir or runs/<run.name>) gets logs/slurm-<jobid>.out: all
#      output from here on is appended there (the --output file above only names it);
#   2. pre-flight (python -m megasmoe.launch preflight): the config validates for
#      nodes x tasks per node processes, every node sees the same code, config, data and
#      run directory and has torch with gloo/NCCL, the rendezvous port is reachable.
#      Any problem: one line `megasmoe: ... error: ...` and exit 2 before training;
#   3. one srun step: one torchrun per node with c10d rendezvous on the first node of
#      the allocation, port 20000 + job id mod 20000 (MEGASMOE_LAUNCHER=srun instead
#      starts one `megasmoe pretrain` per task, RANK etc. from SLURM_PROCID/...);
#      `python -m megasmoe.launch --dry-run CONFIG ...` prints these commands;
#   4. time limit: --signal=B:USR1@<s> makes SLURM signal this script <s> seconds
#      before the limit (SLURM may be up to a minute early). The trap forwards SIGUSR1 to
#      the srun step (srun passes it to its tasks; torchrun is told to forward it to its
#      workers) once the trainer runs (earlier it would kill workers still starting up;
#      the signal is held until the log shows training started, at most
#      MEGASMOE_SIGNAL_HOLD_S seconds, default 120). Every worker saves a
#      checkpoint at the next step boundary and exits with 75; this script then runs
#      `scontrol requeue $SLURM_JOB_ID` if a new checkpoint was published, and the
#      requeued job (same id, same log) resumes from it.
#      SIGTERM (scancel, preemption) is passed on but never requeues by itself.
#   5. lost node: when a rank's peer dies (a node crashed, its processes were killed), the
#      survivors' watchdog (train.collective_timeout, at most 60 s) prints one line
#      `megasmoe: lost rank R (node N): ...; last complete checkpoint: ...`, writes it to
#      a marker file on the run directory and exits; the batch script kills the step if it
#      has not ended MEGASMOE_LOST_GRACE_S (default 30) seconds later, then runs
#      `scontrol requeue`: the job waits for nodes and resumes from the last complete
#      checkpoint. At most MEGASMOE_MAX_LOST_REQUEUES (default 3) times per job (counted
#      in the job's log); after that it exits 76. MEGASMOE_NO_REQUEUE=1 exits 76 at once.
#
# Environment: MEGASMOE_LAUNCHER=torchrun|srun, MEGASMOE_NPROC_PER_NODE (processes per
# node if not the tasks per node), MEGASMOE_SRUN_ARGS (extra srun options, e.g. pyxis
# --container-image=...), MEGASMOE_PYTHON (python command for the helpers here),
# MEGASMOE_NO_REQUEUE=1 (checkpoint but do not requeue; no requeue after a lost node either),
# MEGASMOE_MAX_LOST_REQUEUES, MEGASMOE_LOST_GRACE_S (see 5.), MEGASMOE_LAUNCH=local (ignore
# SLURM: plain local torchrun), MEGASMOE_ROOT (repository root). This script sets
# MEGASMOE_CALLER_DIR: the directory relative paths in the arguments are relative to.
#
# A run directory another live job trains in is refused before torchrun starts (one
# line naming the holder, exit 2); a lock left by a dead job is taken over (a requeued
# job takes over its own). Killing torchrun kills its workers.
set -euo pipefail

# Under sbatch the script runs from a spool copy: find the repository.
if [ -n "${MEGASMOE_ROOT:-}" ]; then
    root="$MEGASMOE_ROOT"
elif [ -n "${SLURM_JOB_ID:-}" ] && [ -n "${SLURM_SUBMIT_DIR:-}" ] \
        && [ -f "${SLURM_SUBMIT_DIR}/launch/pretrain.sh" ]; then
    root="$SLURM_SUBMIT_DIR"
else
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
fi
if [ ! -f "$root/megasmoe/launch/__init__.py" ]; then
    echo "megasmoe: launch error: cannot find the repository (got '$root'); submit from the repository root or set MEGASMOE_ROOT" >&2
    exit 2
fi

# Where the user ran the command from: relative paths they give (config file, run.dir,
# data paths) are relative to it, not to the repository this script changes into.
# Under sbatch this script runs from a spool copy; sbatch was run in SLURM_SUBMIT_DIR.
if [ -n "${SLURM_JOB_ID:-}" ] && [ -n "${SLURM_SUBMIT_DIR:-}" ] \
        && [ "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)" != "$root" ]; then
    MEGASMOE_CALLER_DIR="$SLURM_SUBMIT_DIR"
else
    MEGASMOE_CALLER_DIR="$PWD"
fi
export MEGASMOE_CALLER_DIR   # read by megasmoe.config; inherited by srun steps and workers

config="configs/tiny-cpu.yaml"   # the default everywhere (megasmoe launch too)
if [ $# -gt 0 ] && [[ "$1" == *.yaml || "$1" == *.yml ]]; then
    config="$1"
    shift
    # A relative config path: the caller's directory first, else the repository.
    if [[ "$config" != /* ]] && [ -f "$MEGASMOE_CALLER_DIR/$config" ]; then
        config="$MEGASMOE_CALLER_DIR/$config"
    fi
fi
cd "$root"

if [ -x "$root/.venv/bin/python" ]; then
    bin="$root/.venv/bin"
else
    bin="$(dirname "$(command -v python3)")"
fi
# The python that runs megasmoe's helpers in the batch script (a command prefix is
# fine, e.g. `srun --ntasks=1 --container-image=... python3` when only a container has one).
read -r -a py <<<"${MEGASMOE_PYTHON:-$bin/python}"

# ----------------------------------------------------------------------------- local
if [ -z "${SLURM_JOB_ID:-}" ] || [ "${MEGASMOE_LAUNCH:-}" = local ] || ! command -v srun >/dev/null 2>&1; then
    # Validate before anything starts; prints the world size (or a one-line config error).
    nproc="$("$bin/python" -m megasmoe.cli world-size "$config" "$@")"
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( $(nproc) / nproc > 0 ? $(nproc) / nproc : 1 ))}"
    # exec keeps this pid: the workers check that torchrun (their parent) is still this
    # process when they ask to die with it (megasmoe.training.lifecycle).
    MEGASMOE_LAUNCHER_PID=$$ exec "$bin/torchrun" --standalone --nproc-per-node="$nproc" \
        -m megasmoe.cli pretrain "$config" "$@"
fi

# ----------------------------------------------------------------------------- SLURM
# Traps first: SLURM's USR1 may come at any time (bash would die of it untrapped).
got_usr1=0 got_term=0 pending=0 pending_since=0 forwarded=0 requeued=0 pid="" usr1_at=""
hold_max="${MEGASMOE_SIGNAL_HOLD_S:-120}"   # hold SIGUSR1 at most this long for the trainer
on_usr1() {
    got_usr1=1 pending=1 pending_since="$SECONDS" usr1_at="$(date '+%T')"
    echo "megasmoe: SIGUSR1 at $usr1_at (time limit near)"
}
on_term() {
    [ "$requeued" = 1 ] && return 0   # SLURM ends this run of the job after `scontrol requeue`
    got_term=1
    echo "megasmoe: SIGTERM at $(date '+%T'); passing it on"
    if [ -n "$pid" ]; then kill -TERM "$pid" 2>/dev/null || true; fi
}
trap on_usr1 USR1
trap on_term TERM
job="$SLURM_JOB_ID"
restarts="${SLURM_RESTART_COUNT:-0}"
# The job's shape, for helpers that run inside a job step (where SLURM_* are the step's).
export MEGASMOE_TASKS_PER_NODE="${SLURM_TASKS_PER_NODE:-}"
export MEGASMOE_GPUS_ON_NODE="${SLURM_GPUS_ON_NODE:-}"
run_dir="$("${py[@]}" -m megasmoe.launch run-dir "$config" "$@")"   # exit 2 on a bad config
mkdir -p "$run_dir/logs"
log="$run_dir/logs/slurm-$job.out"
echo "megasmoe: job $job (start $((restarts + 1))) logs to $log"
exec >>"$log" 2>&1
echo "==== megasmoe job $job start $((restarts + 1)) on $(hostname) at $(date '+%F %T'): $config $*"
# A signal in the first seconds was announced on the batch output: say it in the run log too.
[ "$got_usr1" = 1 ] && echo "megasmoe: SIGUSR1 at $usr1_at (time limit near; before this log opened)"
echo "nodes: ${SLURM_JOB_NODELIST:-?} (${SLURM_JOB_NUM_NODES:-1}), tasks per node: ${SLURM_TASKS_PER_NODE:-?}"

tmp="$run_dir/logs/.launch-$job"   # on the run directory: seen by a container step too
mkdir -p "$tmp"
trap 'rm -rf "$tmp"' EXIT
if ! "${py[@]}" -m megasmoe.launch preflight --argv-file="$tmp/argv" --env-file="$tmp/env" \
        "$config" "$@"; then
    echo "megasmoe: pre-flight failed; not starting training (job $job)"
    exit 2
fi
mapfile -d '' step <"$tmp/argv"
while IFS= read -r kv; do export "$kv"; done <"$tmp/env"

latest() { cat "$run_dir/checkpoints/latest" 2>/dev/null || echo none; }
before="$(latest)"
start_bytes="$(stat -c %s "$log")"
this_start() { tail -c +"$((start_bytes + 1))" "$log"; }   # the log of this start only
trainer_running() { grep -q "megasmoe: training " < <(this_start); }
# The watchdog of a rank that lost a peer appends its message here (megasmoe.launch.watchdog).
export MEGASMOE_LOST_MARKER="$tmp/lost-peer"
rm -f "$MEGASMOE_LOST_MARKER"
lost_grace="${MEGASMOE_LOST_GRACE_S:-30}" lost_since="" lost_killed=0

echo "megasmoe: starting the job step at $(date '+%T')"
echo "+ ${step[*]}"
"${step[@]}" &
pid=$!
while kill -0 "$pid" 2>/dev/null; do
    if [ "$pending" = 1 ] && { trainer_running || (( SECONDS - pending_since >= hold_max )); }; then
        echo "megasmoe: forwarding SIGUSR1 to the job step: checkpoint and stop"
        kill -USR1 "$pid" 2>/dev/null || true
        pending=0 forwarded=1
    fi
    # A lost node may leave its part of the step unaccounted for (its slurmstepd died too):
    # srun would wait for it until slurmctld calls the node down. Do not wait that long.
    if [ -z "$lost_since" ] && [ -s "$MEGASMOE_LOST_MARKER" ]; then
        lost_since="$SECONDS"
    elif [ -n "$lost_since" ] && [ "$lost_killed" = 0 ] && (( SECONDS - lost_since >= lost_grace )); then
        echo "megasmoe: a peer was lost $lost_grace s ago and the job step still runs; killing it"
        kill -KILL "$pid" 2>/dev/null || true
        lost_killed=1
    fi
    sleep 1 &
    wait $! 2>/dev/null || true
done
set +e
wait "$pid"
rc=$?
set -e
after="$(latest)"
echo "megasmoe: job step exited with $rc at $(date '+%T'); latest checkpoint: $after"

if [ "$rc" = 0 ]; then
    exit 0
fi
if [ "$got_term" = 1 ]; then
    echo "megasmoe: stopped by SIGTERM (scancel or preemption); not requeueing here"
    exit "$rc"
fi
# Lost node: the watchdog's marker (or its line in this start's log; torchrun turns the
# workers' exit 76 into 1, so the code alone does not tell).
lost="$(head -n 1 "$MEGASMOE_LOST_MARKER" 2>/dev/null || true)"
[ -n "$lost" ] || lost="$(this_start | grep -m 1 -o "megasmoe: lost rank .*" || true)"
if [ -n "$lost" ]; then
    max_lost="${MEGASMOE_MAX_LOST_REQUEUES:-3}"
    done_lost="$(grep -c "^megasmoe: lost a node: requeueing job $job " "$log" || true)"
    echo "megasmoe: the job step lost a peer: $lost"
    if [ -n "${MEGASMOE_NO_REQUEUE:-}" ]; then
        echo "megasmoe: MEGASMOE_NO_REQUEUE is set, not requeueing; resubmit to resume from $after"
        exit 76
    fi
    if (( done_lost >= max_lost )); then
        echo "megasmoe: job $job was requeued after a lost node $done_lost times already" \
             "(MEGASMOE_MAX_LOST_REQUEUES=$max_lost); not again: check the nodes, resubmit to resume from $after"
        exit 76
    fi
    echo "megasmoe: lost a node: requeueing job $job ($((done_lost + 1)) of at most $max_lost); it resumes from $after"
    requeued=1
    if scontrol requeue "$job"; then
        exit 0
    fi
    requeued=0
    echo "megasmoe: scontrol requeue failed (submitted with --no-requeue?); resubmit to resume from $after"
    exit 76
fi
if [ "$got_usr1" = 1 ] || [ "$rc" = 75 ]; then
    if [ "$forwarded" = 0 ] && [ "$rc" != 75 ]; then
        echo "megasmoe: the job step ended before the signal could be forwarded"
    fi
    if [ "$after" = "$before" ]; then
        echo "megasmoe: no new checkpoint in this job ($after); not requeueing (give the job more --time, or a larger --signal lead)"
        exit "$rc"
    fi
    if [ -n "${MEGASMOE_NO_REQUEUE:-}" ]; then
        echo "megasmoe: checkpoint $after saved; MEGASMOE_NO_REQUEUE is set, not requeueing"
        exit 75
    fi
    echo "megasmoe: checkpoint $after saved; requeueing job $job"
    requeued=1
    if scontrol requeue "$job"; then
        exit 0
    fi
    requeued=0
    echo "megasmoe: scontrol requeue failed (submitted with --no-requeue?); resubmit to resume"
    exit 75
fi
exit "$rc"
