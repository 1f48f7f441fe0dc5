#!/usr/bin/env bash
# Start a one-node SLURM cluster (munge + slurmctld + slurmd) on this machine, for
# testing `snakemake --executor slurm`. Debian/Ubuntu, run as root, works without
# systemd (containers, CI VMs). Recipe and pitfalls: docs/cluster.md.
#
#   SLURM_FAKE_GPUS=N  advertise N fake GPUs (gres/gpu on /dev/null-like devices),
#                      so jobs asking for --gpus/--gres are scheduled (they run on CPU)
#   SLURM_CI_DIR=dir   state, spool, logs, pid files (default /tmp/slurm-ci)
#
# Partitions: debug (default) and gpu, both on the one node.
# Idempotent: a cluster left running by an earlier call is stopped first (by the
# pids in SLURM_CI_DIR). Accounting is off, so `sacct` does not work: run
# snakemake with `--slurm-status-command squeue`. Stop with .ci/slurm-down.sh.
set -euo pipefail
exec </dev/null # daemons started with fd 0 closed break every srun ("Task launch ... failed")
HERE=$(cd "$(dirname "$0")" && pwd)
D=${SLURM_CI_DIR:-/tmp/slurm-ci}
GPUS=${SLURM_FAKE_GPUS:-0}
NODE=$(hostname -s)
T0=$SECONDS
say() { echo "[slurm-up ${SECONDS}s] $*"; }

[ "$(id -u)" = 0 ] || { echo "slurm-up.sh: must run as root (it installs packages and starts daemons)" >&2; exit 2; }
[[ "$GPUS" =~ ^[0-9]+$ ]] || { echo "slurm-up.sh: SLURM_FAKE_GPUS must be a number, got '$GPUS'" >&2; exit 2; }

# ---- 0. an earlier cluster of ours: stop it (only our pids)
"$HERE/slurm-down.sh" >/dev/null 2>&1 || true

# ---- 1. packages (Debian slurm-wlm 22.05+ and munge)
PKGS="munge slurmctld slurmd slurm-client"
missing=""
for p in $PKGS; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  command -v apt-get >/dev/null || { echo "slurm-up.sh: missing packages:$missing and no apt-get" >&2; exit 2; }
  made_policy=0 # keep the postinst scripts from starting services
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    made_policy=1
  fi
  log=${TMPDIR:-/tmp}/slurm-apt.log
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing >"$log" 2>&1; then
    # stale package lists on a fresh machine: update once and retry
    DEBIAN_FRONTEND=noninteractive apt-get update -q >>"$log" 2>&1 || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing >>"$log" 2>&1 \
      || { tail -30 "$log"; [ $made_policy = 1 ] && rm -f /usr/sbin/policy-rc.d; exit 1; }
  fi
  [ $made_policy = 1 ] && rm -f /usr/sbin/policy-rc.d
fi
say "packages ready:${missing:- (already installed)}"

# ---- 2. state dirs, munge
rm -rf "$D"
mkdir -p "$D/state" "$D/spool" "$D/log"
[ -s /etc/munge/munge.key ] || runuser -u munge -- mungekey --create
install -d -o munge -g munge -m 0755 /run/munge
runuser -u munge -- /usr/sbin/munged
for _ in $(seq 1 40); do munge -n </dev/null >/dev/null 2>&1 && break; sleep 0.25; done
munge -n </dev/null | unmunge >/dev/null
say "munged up (pid $(cat /run/munge/munged.pid))"

# ---- 3. slurm.conf (+ gres.conf): the node line copies CPUs/RealMemory from slurmd -C
NODELINE=$(slurmd -C | head -1)
GRES=""
if [ "$GPUS" -gt 0 ]; then
  for i in $(seq 0 $((GPUS - 1))); do mknod -m 666 "$D/fakegpu$i" c 1 3; done # same numbers as /dev/null
  echo "NodeName=$NODE Name=gpu File=$D/fakegpu[0-$((GPUS - 1))]" >/etc/slurm/gres.conf
  GRES=" Gres=gpu:$GPUS"
else
  rm -f /etc/slurm/gres.conf
fi
cat >/etc/slurm/slurm.conf <<EOF
ClusterName=ci
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
ReturnToService=2
SchedulerType=sched/backfill
MinJobAge=3600
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool
SlurmctldPidFile=$D/slurmctld.pid
SlurmdPidFile=$D/slurmd.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd.log
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
$([ "$GPUS" -gt 0 ] && echo GresTypes=gpu)
$NODELINE$GRES NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=ALL Default=NO MaxTime=INFINITE State=UP
EOF

# ---- 4. slurmctld + slurmd (both daemonize)
slurmctld
slurmd
node_state() { sinfo -h -N -o %T 2>/dev/null | sort -u; } # one line per partition
for _ in $(seq 1 120); do [ "$(node_state)" = idle ] && break; sleep 0.25; done
if [ "$(node_state)" != idle ]; then
  sinfo -N -l
  tail -n 20 "$D"/log/*.log
  exit 1
fi
say "slurmctld + slurmd up, node $NODE idle ($(sinfo -h -N -o '%c CPUs, %m MB, gres %G' | head -1))"

# ---- 5. smoke test: a step, a batch job, and a GPU request when GPUs are faked
srun -N1 -n1 true
J=$(sbatch --parsable -o /dev/null --wrap true) # sbatch --wait polls slowly (~10 s); poll squeue
for _ in $(seq 1 120); do [ "$(squeue -h -j "$J" -t all -o %T)" = COMPLETED ] && break; sleep 0.25; done
[ "$(squeue -h -j "$J" -t all -o %T)" = COMPLETED ] || { echo "slurm-up.sh: batch job $J did not complete" >&2; exit 1; }
if [ "$GPUS" -gt 0 ]; then
  [ -n "$(srun --gpus=1 printenv CUDA_VISIBLE_DEVICES)" ] || { echo "slurm-up.sh: fake GPU not handed out" >&2; exit 1; }
fi
say "smoke test ok; cluster ready in $((SECONDS - T0)) s (logs: $D/log)"
