#!/usr/bin/env bash
# A 2-node SLURM test cluster on this one machine (start_cluster.sh --nodes 2 runs this).
#
#   bash tests/slurm/two_nodes.sh start    # make the namespaces, start the daemons, wait idle
#   bash tests/slurm/two_nodes.sh stop     # stop the daemons, remove everything it made
#   export SLURM_CONF=/etc/slurm-2node/slurm.conf   # then sbatch/srun/sinfo talk to it
#
# Each node is a slurmd in its own network namespace (msmoe-n1, msmoe-n2: a veth into the
# bridge msmoebr0, addresses 10.77.0.11 and .12) and its own UTS namespace (hostname
# msmoe1, msmoe2); slurmctld runs in a UTS namespace named msmoectl on the bridge address
# 10.77.0.1. The three names go into /etc/hosts (shared by every namespace) between marker
# lines and come out again on stop. Own ports, config (SLURM_CONF), state and logs: the
# single-node cluster (start_cluster.sh) keeps running beside it. munged is shared (its
# socket is a file, which every network namespace reaches).
#
# Node 2 also has a mount namespace of its own with an empty tmpfs over NODE_LOCAL
# (/var/tmp/megasmoe-node-local): a directory there on the host (and node 1) is missing on
# node 2, like a node-local /tmp on a real cluster (for the pre-flight's shared-run-dir test).
# Job steps inherit their node's namespaces: `ip netns pids msmoe-n2` lists node 2's processes.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

CONF_DIR=/etc/slurm-2node
CONF=$CONF_DIR/slurm.conf
STATE=/var/lib/slurm-2node
LOGS=/var/log/slurm-2node
RUN=/run/slurm-2node
BRIDGE=msmoebr0
NET=10.77.0
NODE_LOCAL=/var/tmp/megasmoe-node-local
HOSTS_MARK="# megasmoe tests/slurm/two_nodes.sh"
MARK="# written by megasmoe tests/slurm/two_nodes.sh"
export SLURM_CONF=$CONF
say() { echo "two_nodes: $*" >&2; }
die() { say "error: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "needs root (namespaces, bridge, SLURM daemons)"

states() { sinfo -h -N -o '%N %t' 2>/dev/null | tr -d '*~#!%$@^-' | sort -u; }
all_up() {
    local s
    s="$(states)"
    [ "$(grep -cE ' (idle|alloc|mix|comp)$' <<<"$s")" = 2 ]
}
pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop() {
    if [ -f "$CONF" ] && scontrol ping >/dev/null 2>&1; then
        scancel --user=root 2>/dev/null || true
    fi
    for pidfile in "$RUN"/slurmd-msmoe1.pid "$RUN"/slurmd-msmoe2.pid "$RUN"/slurmctld.pid; do
        pid="$(cat "$pidfile" 2>/dev/null || true)"
        [ -n "$pid" ] || continue
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
        rm -f "$pidfile"
    done
    for n in 1 2; do
        # Whatever still runs in a node's network namespace (a job's leftovers) goes too.
        if [ -e /var/run/netns/msmoe-n$n ]; then
            for pid in $(ip netns pids msmoe-n$n 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
            ip netns del msmoe-n$n 2>/dev/null || true
        fi
        ip link del veth-msmoe$n 2>/dev/null || true
    done
    ip link del "$BRIDGE" 2>/dev/null || true
    sed -i "\\|$HOSTS_MARK|d" /etc/hosts
    say "stopped"
}

start() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        || die "slurmctld/slurmd missing: run tests/slurm/start_cluster.sh first (it installs them)"
    pgrep -x munged >/dev/null || die "munged is not running: run tests/slurm/start_cluster.sh first"
    mkdir -p "$CONF_DIR" "$STATE/ctld" "$LOGS" "$RUN" "$NODE_LOCAL"
    if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
        die "$CONF exists and was not written by this script"
    fi
    cat >"$CONF.new" <<EOF
$MARK
# The 2-node test cluster: do not use for anything else. See tests/slurm/two_nodes.sh.
ClusterName=megasmoe2
SlurmctldHost=msmoectl($NET.1)
SlurmctldPort=6917
SlurmdPort=6918
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd-%n.log
$(test_cluster_settings "$LOGS")
NodeName=msmoe1 NodeAddr=$NET.11 CPUs=1 RealMemory=4000 State=UNKNOWN
NodeName=msmoe2 NodeAddr=$NET.12 CPUs=1 RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=msmoe[1-2] Default=YES MaxTime=INFINITE State=UP
EOF
    if cmp -s "$CONF.new" "$CONF" && pid_alive "$RUN/slurmctld.pid" \
            && [ -e /var/run/netns/msmoe-n1 ] && [ -e /var/run/netns/msmoe-n2 ]; then
        rm -f "$CONF.new"
        # A node whose slurmd died (a test killed the node) boots again; jobs go on.
        for n in 1 2; do pid_alive "$RUN/slurmd-msmoe$n.pid" || { say "restarting msmoe$n"; start_slurmd $n; }; done
        wait_up
        return 0
    fi
    stop 2>/dev/null   # a half-made or outdated one: start clean
    mkdir -p "$RUN"
    mv "$CONF.new" "$CONF"

    # Network: a bridge on the host, one namespace + veth per node.
    ip link add "$BRIDGE" type bridge
    ip addr add "$NET.1/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
    for n in 1 2; do
        ip netns add msmoe-n$n
        ip link add veth-msmoe$n type veth peer name eth0 netns msmoe-n$n
        ip link set veth-msmoe$n master "$BRIDGE" up
        ip -n msmoe-n$n addr add "$NET.1$n/24" dev eth0
        ip -n msmoe-n$n link set eth0 up
        ip -n msmoe-n$n link set lo up
    done
    printf '%s\n' "$NET.1 msmoectl $HOSTS_MARK" "$NET.11 msmoe1 $HOSTS_MARK" \
        "$NET.12 msmoe2 $HOSTS_MARK" >>/etc/hosts

    # Daemons. nsenter, not `ip netns exec` (which remounts /sys: slurmd then finds no cgroup fs).
    unshare -u sh -c 'hostname msmoectl && exec slurmctld' </dev/null
    for _ in $(seq 100); do scontrol ping >/dev/null 2>&1 && break; sleep 0.1; done
    scontrol ping >/dev/null 2>&1 || die "slurmctld does not answer (see $LOGS/slurmctld.log)"
    start_slurmd 1
    start_slurmd 2
    wait_up
}

# slurmd of node $1 in its namespaces (node 2 with its node-local tmpfs).
start_slurmd() {
    if [ "$1" = 1 ]; then
        nsenter --net=/var/run/netns/msmoe-n1 unshare -u \
            sh -c 'hostname msmoe1 && exec slurmd -N msmoe1' </dev/null
    else
        nsenter --net=/var/run/netns/msmoe-n2 unshare -u -m --propagation private \
            sh -c "hostname msmoe2 && mount -t tmpfs -o size=16m msmoe2-local $NODE_LOCAL && exec slurmd -N msmoe2" </dev/null
    fi
}

wait_up() {
    for _ in $(seq 300); do
        if all_up; then say "cluster up: $(states | tr '\n' ' ')"; return 0; fi
        for node in msmoe1 msmoe2; do
            if states | grep -qE "^$node (down|drain|drained|fail)"; then
                scontrol update nodename=$node state=resume 2>/dev/null || true
            fi
        done
        sleep 0.2
    done
    die "nodes not idle after 60 s: $(states | tr '\n' ' ') (see $LOGS/)"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    *) die "usage: $0 start|stop" ;;
esac
