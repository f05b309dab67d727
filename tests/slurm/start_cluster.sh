#!/usr/bin/env bash
# Start a single-node SLURM cluster on this machine, for tests/test_slurm.py and CI.
#
#   bash tests/slurm/start_cluster.sh     # install (once), configure, start, wait until idle
#   bash tests/slurm/start_cluster.sh --nodes 2   # that, plus the 2-node cluster beside it
#                                                 # (tests/slurm/two_nodes.sh, SLURM_CONF=/etc/slurm-2node/slurm.conf)
#   bash tests/slurm/stop_cluster.sh      # stop the daemons again
#
# Needs root (apt-get, daemons as root) on Debian/Ubuntu. Installs Debian's slurmctld,
# slurmd, slurm-client and munge with apt-get (skipped when they are present), writes
# /etc/slurm/slurm.conf (one node: this host, its CPUs and memory as `slurmd -C` sees
# them; one partition `debug`; requeue allowed; short timeouts), starts munged,
# slurmctld and slurmd by hand (no systemd) and waits until `sinfo` shows the node idle.
# Idempotent: a second call with the cluster up only checks it and returns in < 1 s.
#
# Refuses to overwrite a /etc/slurm/slurm.conf that it did not write (a real cluster).
# Logs: /var/log/slurm/{slurmctld,slurmd}.log; finished jobs: /var/log/slurm/jobcomp.log.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

case "${1:-} ${2:-}" in
    " "|"--nodes 1") ;;
    "--nodes 2")  # the single-node cluster (packages, munge) first, then the two nodes
        bash "${BASH_SOURCE[0]}"
        exec bash "$(dirname "${BASH_SOURCE[0]}")/two_nodes.sh" start ;;
    *) echo "start_cluster: error: usage: $0 [--nodes 1|2]" >&2; exit 2 ;;
esac

MARK="# written by megasmoe tests/slurm/start_cluster.sh"
CONF=/etc/slurm/slurm.conf
STATE=/var/lib/slurm
LOGS=/var/log/slurm
say() { echo "start_cluster: $*" >&2; }
die() { say "error: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "needs root (installs packages and runs the SLURM daemons as root)"

node_state() { sinfo -h -N -o '%t' 2>/dev/null | head -n 1 | tr -d '*~#!%$@^-'; }
node_up() { case "$(node_state)" in idle|alloc|mix|comp) return 0 ;; esac; return 1; }

# 1. Packages (Debian: slurmctld, slurmd, slurm-client, munge).
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
        || ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
    say "installing slurmctld slurmd slurm-client munge (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt_log="$(mktemp)"
    if ! { apt-get update -q && apt-get install -y -q --no-install-recommends \
            slurmctld slurmd slurm-client munge; } >"$apt_log" 2>&1; then
        cat "$apt_log" >&2
        die "apt-get could not install the SLURM packages"
    fi
    rm -f "$apt_log"
fi

# 2. slurm.conf: this host as the one node.
if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
    die "$CONF exists and was not written by this script; not touching a real cluster's config"
fi
host="$(hostname -s)"
hw="$(slurmd -C | head -n 1)"          # NodeName=... CPUs=... Boards=... RealMemory=...
cpus="$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$hw")"
mem="$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")"
topo="$(grep -o 'Boards=[0-9]* SocketsPerBoard=[0-9]* CoresPerSocket=[0-9]* ThreadsPerCore=[0-9]*' <<<"$hw" || true)"
mem=$(( mem * 9 / 10 ))                # leave slack: a node reporting less memory drains
mkdir -p /etc/slurm "$STATE/slurmctld" "$STATE/slurmd" "$LOGS"
new="$(mktemp)"
cat >"$new" <<EOF
$MARK
# A single-node test cluster: do not use for anything else.
ClusterName=megasmoe
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job may start again once its old credential expired (default 120 s).
AuthInfo=cred_expire=10
StateSaveLocation=$STATE/slurmctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
$(test_cluster_settings "$LOGS")
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus $topo RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
# Fast path: same config, everything up already.
if cmp -s "$new" "$CONF" && pgrep -x munged >/dev/null && pgrep -x slurmctld >/dev/null \
        && pgrep -x slurmd >/dev/null && node_up; then
    rm -f "$new"
    say "cluster already up: $(sinfo -h -N -o '%N %t %c CPUs %m MB')"
    exit 0
fi
if ! cmp -s "$new" "$CONF" 2>/dev/null; then
    mv "$new" "$CONF"
    chmod 0644 "$CONF"
    changed=1
else
    rm -f "$new"
    changed=0
fi

# 3. munge: key and daemon.
mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
if [ ! -s /etc/munge/munge.key ]; then
    mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null \
        || dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
fi
chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
chmod 0700 /etc/munge /var/log/munge
chmod 0400 /etc/munge/munge.key
chmod 0755 /run/munge
if ! pgrep -x munged >/dev/null; then
    runuser -u munge -- /usr/sbin/munged
fi
for _ in $(seq 50); do munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
munge -n </dev/null | unmunge >/dev/null || die "munged does not answer"

# 4. SLURM daemons (restarted when the config changed).
if [ "$changed" = 1 ]; then
    for pidfile in /run/slurmd.pid /run/slurmctld.pid; do   # the daemons this script started
        pid="$(cat "$pidfile" 2>/dev/null || true)"
        [ -n "$pid" ] || continue
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    done
fi
pgrep -x slurmctld >/dev/null || slurmctld
for _ in $(seq 100); do scontrol ping >/dev/null 2>&1 && break; sleep 0.1; done
scontrol ping >/dev/null 2>&1 || die "slurmctld does not answer (see $LOGS/slurmctld.log)"
pgrep -x slurmd >/dev/null || slurmd

# 5. Wait for the node to be idle (resume it if an earlier life left it down/drained).
for i in $(seq 300); do
    state="$(node_state)"
    case "$state" in
        idle|alloc|mix|comp) say "cluster up: $(sinfo -h -N -o '%N %t %c CPUs %m MB')"; exit 0 ;;
        down|drain|drained|draining|fail) scontrol update nodename="$host" state=resume 2>/dev/null || true ;;
    esac
    sleep 0.2
done
die "node $host is '$(node_state)', not up, after 60 s (see $LOGS/slurmd.log, $LOGS/slurmctld.log)"
