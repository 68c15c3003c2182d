#!/usr/bin/env bash
# Start a one-node SLURM cluster on this machine (munge, slurmctld, slurmd), with all state under
# $AXIS_SLURM_DIR (default /tmp/axis-slurm). No accounting: the workflow's profile polls with squeue,
# so MinJobAge keeps finished jobs visible for 300 s. Prints the line to export SLURM_CONF.
# Needs Debian's packages: apt-get install slurm-wlm munge.
set -euo pipefail
dir=${AXIS_SLURM_DIR:-/tmp/axis-slurm}
mkdir -p "$dir"/{spool,state,log,munge}
chmod 700 "$dir/munge"
if [ ! -f "$dir/munge/munge.key" ]; then
  dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
  chmod 400 "$dir/munge/munge.key"
fi
if ! { [ -f "$dir/munge/munged.pid" ] && kill -0 "$(cat "$dir/munge/munged.pid")" 2>/dev/null; }; then
  munged --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" \
    --pid-file="$dir/munge/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munge/munged.seed"
fi
cpus=$(nproc)
memory=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 2048 ))
cat > "$dir/slurm.conf" <<EOF
ClusterName=axis
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmctldPort=${AXIS_SLURMCTLD_PORT:-16817}
SlurmdPort=${AXIS_SLURMD_PORT:-16818}
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
MinJobAge=300
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
export SLURM_CONF="$dir/slurm.conf"
# Job steps (srun inside a batch job) read the default path, not SLURM_CONF: point it at ours, unless
# the machine has a SLURM configuration of its own.
default_conf=/etc/slurm/slurm.conf
if [ ! -e "$default_conf" ] || grep -q "^ClusterName=axis$" "$default_conf" 2>/dev/null; then
  mkdir -p /etc/slurm
  ln -sf "$SLURM_CONF" "$default_conf"
fi
if ! { [ -f "$dir/slurmctld.pid" ] && kill -0 "$(cat "$dir/slurmctld.pid")" 2>/dev/null; }; then
  slurmctld -f "$SLURM_CONF"
fi
if ! { [ -f "$dir/slurmd.pid" ] && kill -0 "$(cat "$dir/slurmd.pid")" 2>/dev/null; }; then
  slurmd -f "$SLURM_CONF" -N localhost
fi
for _ in $(seq 60); do
  if sinfo -h -o %T 2>/dev/null | grep -qE "idle|mixed|alloc"; then
    echo "export SLURM_CONF=$SLURM_CONF"
    exit 0
  fi
  sleep 1
done
echo "SLURM did not come up; logs in $dir/log" >&2
tail -n 20 "$dir/log/"*.log >&2
exit 1
