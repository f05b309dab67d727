#!/usr/bin/env bash
# Stop the single-node test cluster started by tests/slurm/start_cluster.sh.
#
#   bash tests/slurm/stop_cluster.sh           # stop slurmd, slurmctld, munged
#   bash tests/slurm/stop_cluster.sh --purge   # also forget jobs and the saved state
#
# Only acts when /etc/slurm/slurm.conf was written by start_cluster.sh. Also tears down
# the 2-node cluster (start_cluster.sh --nodes 2) if it runs: daemons, namespaces, bridge,
# /etc/hosts lines.
set -euo pipefail

if [ -f /etc/slurm-2node/slurm.conf ] || ip link show msmoebr0 >/dev/null 2>&1; then
    bash "$(dirname "${BASH_SOURCE[0]}")/two_nodes.sh" stop
fi

MARK="# written by megasmoe tests/slurm/start_cluster.sh"
CONF=/etc/slurm/slurm.conf
if [ ! -f "$CONF" ] || ! grep -qF "$MARK" "$CONF"; then
    echo "stop_cluster: $CONF is not the test cluster's; nothing to stop" >&2
    exit 0
fi
if command -v scancel >/dev/null && scontrol ping >/dev/null 2>&1; then
    scancel --user="$(id -un)" 2>/dev/null || true
fi
stop() {  # stop a daemon by its pid file (else by exact name), wait up to 10 s
    local name="$1" pidfile="$2" pid=""
    [ -f "$pidfile" ] && pid="$(cat "$pidfile" 2>/dev/null || true)"
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || pid="$(pgrep -x "$name" | head -n 1 || true)"
    [ -n "$pid" ] || return 0
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
}
stop slurmd /run/slurmd.pid
stop slurmctld /run/slurmctld.pid
stop munged /run/munge/munged.pid
if [ "${1:-}" = "--purge" ]; then
    rm -rf /var/lib/slurm/slurmctld/* /var/lib/slurm/slurmd/*
fi
echo "stop_cluster: stopped" >&2
