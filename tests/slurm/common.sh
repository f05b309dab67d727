# Sourced by start_cluster.sh and two_nodes.sh: the slurm.conf settings both test clusters share.

# The shared settings; $1 = the cluster's log directory (for the finished-jobs log).
test_cluster_settings() {
    cat <<EOF
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$1/jobcomp.log
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
JobRequeue=1
# Short timeouts: a test cluster should notice things fast.
MinJobAge=120
SlurmctldTimeout=10
SlurmdTimeout=30
MessageTimeout=10
InactiveLimit=0
KillWait=10
# A job at its time limit is killed one minute late, so that the
# "--signal=B:USR1@N" path has time to checkpoint and requeue in tests.
OverTimeLimit=1
EOF
}
