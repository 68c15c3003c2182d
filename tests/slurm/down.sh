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
