#!/usr/bin/env bash
# Start a one-node SLURM cluster on this machine (munge, slurmctld, slurmd), with all state under
# $AXIS_SLURM_DIR (default /tmp/axis-slurm), shaped like a site with CPU and GPU nodes:
# - two partitions over the one node: `cpu` (the default) and `gpu`, the names profiles/slurm's
#   partitions.yaml routes jobs to;
# - 4 GPUs as GRES on the node (no device files, nothing detected: SLURM schedules and accounts GRES it
#   is told about, so GPU jobs are placed as on a real cluster while their programs run on the CPU);
# - more CPUs declared than the machine has (SlurmdParameters=config_overrides), so that a paper-shaped
#   job (vLLM with tensor parallel 2: 4 threads per task, 2 GPUs) can be scheduled on a 2-core machine.
# No accounting: the workflow's profile polls with squeue, and MinJobAge keeps finished jobs visible (and
# their records readable with `scontrol show job`) for an hour.
# Idempotent: a cluster already running with this configuration is left alone; one running with another
# (an older version of this script, other settings) is restarted with this one and its old state cleared.
# Prints the line to export SLURM_CONF. Needs Debian's packages: apt-get install slurm-wlm munge.
# Settings: AXIS_SLURM_DIR, AXIS_SLURMCTLD_PORT, AXIS_SLURMD_PORT, AXIS_SLURM_CPUS (declared, default
# 16), AXIS_SLURM_GPUS (declared, default 4).
set -euo pipefail
dir=${AXIS_SLURM_DIR:-/tmp/axis-slurm}
mkdir -p "$dir"/{spool,state,log,munge}
chmod 700 "$dir/munge"
if [ ! -f "$dir/munge/munge.key" ]; then
  dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
  chmod 400 "$dir/munge/munge.key"
fi

running() {  # running PIDFILE: the daemon of that pid file is alive
  [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

stop() {  # stop PIDFILE: stop that daemon and wait until it has exited
  if running "$1"; then
    local pid
    pid=$(cat "$1")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 100); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$1"
}

if ! running "$dir/munge/munged.pid"; then
  munged --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" \
    --pid-file="$dir/munge/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munge/munged.seed"
fi

cpus=${AXIS_SLURM_CPUS:-16}
gpus=${AXIS_SLURM_GPUS:-4}
memory=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 2048 ))
new="$dir/slurm.conf.new"
cat > "$new" <<EOF
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
AccountingStorageTRES=gres/gpu
MpiDefault=none
ReturnToService=2
MinJobAge=3600
GresTypes=gpu
SlurmdParameters=config_overrides
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory Gres=gpu:$gpus State=UNKNOWN
PartitionName=cpu Nodes=localhost Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=localhost Default=NO MaxTime=INFINITE State=UP
EOF
# gres.conf is read from slurm.conf's folder. No File= (there are no devices) and no detection.
cat > "$dir/gres.conf.new" <<EOF
AutoDetect=off
NodeName=localhost Name=gpu Count=$gpus
EOF
export SLURM_CONF="$dir/slurm.conf"
fingerprint=$(cat "$new" "$dir/gres.conf.new" | sha256sum | cut -d' ' -f1)
# The daemons record the configuration they were started with; any other one means a restart.
if [ "$(cat "$dir/started-with" 2>/dev/null)" != "$fingerprint" ]; then
  stop "$dir/slurmd.pid"
  stop "$dir/slurmctld.pid"
  clear_state=1
else
  clear_state=0
fi
mv "$new" "$SLURM_CONF"
mv "$dir/gres.conf.new" "$dir/gres.conf"
# Job steps (srun inside a batch job) read the default path, not SLURM_CONF: point it at ours, unless
# the machine has a SLURM configuration of its own.
default_conf=/etc/slurm/slurm.conf
if [ ! -e "$default_conf" ] || grep -q "^ClusterName=axis$" "$default_conf" 2>/dev/null; then
  mkdir -p /etc/slurm
  ln -sf "$SLURM_CONF" "$default_conf"
fi
if ! running "$dir/slurmctld.pid"; then
  if [ "$clear_state" = 1 ]; then
    # Saved jobs, nodes and partitions of another configuration (e.g. the old `debug` partition) go.
    slurmctld -f "$SLURM_CONF" -c
  else
    slurmctld -f "$SLURM_CONF"
  fi
fi
if ! running "$dir/slurmd.pid"; then
  slurmd -f "$SLURM_CONF" -N localhost
fi
echo "$fingerprint" > "$dir/started-with"
for _ in $(seq 60); do
  # Up, and with this configuration: both partitions, the node idle (or busy) with its GPUs.
  if sinfo -h -p cpu,gpu -o "%P %T %G" 2>/dev/null | grep -qE "^gpu (idle|mixed|alloc)[^ ]* gpu:$gpus" \
      && sinfo -h -p cpu -o "%T" 2>/dev/null | grep -qE "idle|mixed|alloc"; then
    echo "export SLURM_CONF=$SLURM_CONF"
    exit 0
  fi
  sleep 1
done
echo "SLURM did not come up; logs in $dir/log" >&2
tail -n 20 "$dir/log/"*.log >&2
exit 1
