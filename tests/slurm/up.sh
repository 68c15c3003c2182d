#!/usr/bin/env bash
# Start a one-node SLURM cluster on this machine (munge, slurmctld, slurmd), with all state under
# $AXIS_SLURM_DIR (default /tmp/axis-slurm), shaped like a site with CPU and GPU nodes:
# - two partitions over the one node: `cpu` (the default) and `gpu`, the names profiles/slurm's
#   partitions.yaml routes jobs to;
# - 4 GPUs as GRES on the node (fake device files, nothing detected: SLURM schedules and accounts GRES
#   it is told about, so GPU jobs are placed as on a real cluster while their programs run on the CPU);
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
MpiDefault=none
ReturnToService=2
MinJobAge=3600
GresTypes=gpu
SlurmdParameters=config_overrides
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory Gres=gpu:$gpus State=UNKNOWN
PartitionName=cpu Nodes=localhost Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=localhost Default=NO MaxTime=INFINITE State=UP
EOF
# gres.conf is read from slurm.conf's folder; nothing is detected. SLURM 22.05 drops a GPU without a
# device file and wants a character device there: each fake GPU is a twin of /dev/null (a plain file
# where mknod is not allowed: slurmd then logs an error per GPU but counts it all the same).
mkdir -p "$dir/dev"
for i in $(seq 0 $(( gpus - 1 ))); do
  if [ ! -c "$dir/dev/gpu$i" ]; then
    rm -f "$dir/dev/gpu$i"
    mknod "$dir/dev/gpu$i" c 1 3 2>/dev/null || touch "$dir/dev/gpu$i"
  fi
done
cat > "$dir/gres.conf.new" <<EOF
AutoDetect=off
NodeName=localhost Name=gpu Count=$gpus File=$dir/dev/gpu[0-$(( gpus - 1 ))]
EOF
export SLURM_CONF="$dir/slurm.conf"
fingerprint=$(cat "$new" "$dir/gres.conf.new" | sha256sum | cut -d' ' -f1)
# What runs now: "<configuration fingerprint> <slurmctld pid> <slurmd pid>", recorded once the cluster
# is up. Daemons running under any other record (another configuration, or started by something else,
# e.g. an older version of this script) are restarted, and their saved state (jobs, nodes, partitions of
# that configuration, e.g. the old `debug` partition) cleared.
daemons() { echo "$(cat "$dir/slurmctld.pid" 2>/dev/null) $(cat "$dir/slurmd.pid" 2>/dev/null)"; }
recorded=$(cat "$dir/running" 2>/dev/null || true)
clear_state=0
if running "$dir/slurmctld.pid" || running "$dir/slurmd.pid"; then
  if [ "$recorded" != "$fingerprint $(daemons)" ]; then
    stop "$dir/slurmd.pid"
    stop "$dir/slurmctld.pid"
    clear_state=1
  fi
elif [ "${recorded%% *}" != "$fingerprint" ]; then
  clear_state=1
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
    slurmctld -f "$SLURM_CONF" -c
  else
    slurmctld -f "$SLURM_CONF"
  fi
fi
if ! running "$dir/slurmd.pid"; then
  slurmd -f "$SLURM_CONF" -N localhost
fi
for i in $(seq 60); do
  # A daemon that died (e.g. on a bad configuration) will not come back: say so now, not in minutes.
  if [ "$i" -gt 5 ] && ! { running "$dir/slurmctld.pid" && running "$dir/slurmd.pid"; }; then
    break
  fi
  # Up, and with this configuration: both partitions, the node idle (or busy) with its GPUs.
  state=$(timeout 5 sinfo -h -p cpu,gpu -o "%P %T %G" 2>/dev/null || true)
  if grep -qE "^gpu (idle|mixed|alloc)[^ ]* gpu:$gpus" <<<"$state" && grep -qE "^cpu\*? (idle|mixed|alloc)" <<<"$state"; then
    echo "$fingerprint $(daemons)" > "$dir/running"
    echo "export SLURM_CONF=$SLURM_CONF"
    exit 0
  fi
  sleep 1
done
echo "SLURM did not come up; logs in $dir/log" >&2
tail -n 20 "$dir/log/"*.log >&2
exit 1
