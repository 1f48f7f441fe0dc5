#!/usr/bin/env bash
# Stop the one-node cluster started by .ci/slurm-up.sh: cancel our jobs, stop the
# daemons by the pids in their pid files (never by name), remove state and config.
# Safe to run when nothing is running. Packages stay installed.
set -u
D=${SLURM_CI_DIR:-/tmp/slurm-ci}

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop() { # stop <pidfile> <name>: TERM, wait up to 10 s, then KILL
  local f=$1 p
  [ -s "$f" ] || return 0
  p=$(cat "$f")
  if kill -0 "$p" 2>/dev/null; then
    kill -TERM "$p"
    for _ in $(seq 1 40); do kill -0 "$p" 2>/dev/null || break; sleep 0.25; done
    if kill -0 "$p" 2>/dev/null; then
      echo "slurm-down: force-killing $2 ($p)"
      kill -KILL "$p"
    fi
  fi
  rm -f "$f"
}

if alive "$D/slurmctld.pid" && command -v scancel >/dev/null; then
  scancel --user="$(id -un)" 2>/dev/null || true
  # let slurmd tear the job steps down before it goes away
  for _ in $(seq 1 60); do [ -z "$(squeue -h -t running,completing 2>/dev/null)" ] && break; sleep 0.25; done
fi
stop "$D/slurmd.pid" slurmd
stop "$D/slurmctld.pid" slurmctld
stop /run/munge/munged.pid munged
rm -rf "$D" /etc/slurm/slurm.conf /etc/slurm/gres.conf
exit 0
