#!/usr/bin/env bash
# Stop the one-node SLURM cluster that up.sh started, by its pid files.
set -u
dir=${AXIS_SLURM_DIR:-/tmp/axis-slurm}
for pidfile in "$dir/slurmd.pid" "$dir/slurmctld.pid" "$dir/munge/munged.pid"; do
  if [ -f "$pidfile" ]; then
    kill "$(cat "$pidfile")" 2>/dev/null || true
    rm -f "$pidfile"
  fi
done
# up.sh points /etc/slurm/slurm.conf at our cluster for job steps. Left behind, it makes every SLURM
# command (and so every Snakemake start: the SLURM plugin runs `scontrol show config` when it loads)
# wait ~9 s for a controller that is gone.
default_conf=/etc/slurm/slurm.conf
if [ -L "$default_conf" ] && [ "$(readlink "$default_conf")" = "$dir/slurm.conf" ]; then
  rm -f "$default_conf"
fi
