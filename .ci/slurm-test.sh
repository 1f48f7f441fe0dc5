#!/usr/bin/env bash
# End-to-end test of the cluster path: the workflow on a tiny model through
# `snakemake --executor slurm` on a one-node SLURM started here (.ci/slurm-up.sh).
#
#   .ci/slurm-test.sh [REPO] [VENV]      # as root; installs slurm with apt if missing
#
# 1. local reference run (workstation profile), rose and magnitude
# 2. slurm-cpu profile, magnitude: no job asks for a GPU; one job is scancel'ed
#    mid-run and snakemake resubmits it with twice the memory
# 3. slurm profile, rose, 2 fake GPUs: GPU stages ask for --gpus=1 on partition
#    $ROSE_SLURM_PARTITION; the controller is SIGKILLed mid-chain and its jobs
#    cancelled; the rerun finds the lock, --unlock, the same command resumes
#    without redoing finished jobs
# 4. pruned layers are 50% sparse, and every artifact but logs and report equals
#    the local run's bytes (JSON: equal but for wall-clock "*seconds" fields)
# KEEP=1 keeps the work dir. About 4 minutes on 2 cores: each SLURM job costs
# ~12 s (two snakemake start-ups plus the status-check cadence).
set -euo pipefail
exec </dev/null
REPO=$(cd "${1:-$(dirname "$0")/..}" && pwd)
VENV=$(cd "${2:-$REPO/.venv}" && pwd)
SMK=$VENV/bin/snakemake
PY=$VENV/bin/python
export PATH="$VENV/bin:$PATH" # jobs run `python3 -m snakemake` from PATH (sbatch --export=ALL)
export SLURM_CI_DIR=${SLURM_CI_DIR:-/tmp/slurm-ci}
W=$(mktemp -d /tmp/rose-slurm-test.XXXX)
T0=$SECONDS
say() { echo "[slurm-test ${SECONDS}s] $*"; }
fail() {
  echo "[slurm-test] FAIL: $*" >&2
  exit 1
}

CTRL="" # pid of the background `timeout ... snakemake`
cleanup() {
  local rc=$?
  set +e
  [ -n "$CTRL" ] && kill -0 "$CTRL" 2>/dev/null && kill -KILL "$CTRL"
  if [ $rc -ne 0 ]; then
    echo "---- diagnostics (work dir $W)"
    for f in "$W"/*.log; do [ -f "$f" ] && { echo "== $f"; tail -n 30 "$f"; }; done
    for f in $(ls -t "$W"/*/.snakemake/slurm_logs/*/*.log "$W"/*/.snakemake/slurm_logs/*/*/*.log 2>/dev/null | head -3); do
      echo "== $f"
      tail -n 30 "$f"
    done
    for f in "$SLURM_CI_DIR"/log/*.log; do [ -f "$f" ] && { echo "== $f"; tail -n 15 "$f"; }; done
  fi
  "$REPO/.ci/slurm-down.sh"
  if [ "${KEEP:-0}" = 1 ]; then echo "kept $W"; else rm -rf "$W"; fi
  echo "[slurm-test ${SECONDS}s] exit $rc"
  exit $rc
}
trap cleanup EXIT

SLURM_FAKE_GPUS=2 "$REPO/.ci/slurm-up.sh"

# ---- fixtures: tiny model, text, one config per work dir
"$PY" - "$REPO" "$W" <<'PYEOF'
import sys
from pathlib import Path

repo, work = Path(sys.argv[1]), Path(sys.argv[2])
sys.path.insert(0, str(repo / "tests"))
from tiny import make_tiny_model, tiny_text

make_tiny_model(work / "tiny", family="llama")  # 3 layers; the runs prune the first 2
(work / "text.txt").write_text(tiny_text())
for name, methods in (("local", "rose, magnitude"), ("cpu", "magnitude"), ("gpu", "rose")):
    (work / name / "config").mkdir(parents=True)
    (work / name / "config" / "config.yaml").write_text(f"""run: slurmtest
results_dir: results
model: {{source: {work / 'tiny'}}}
calibration: {{source: {{kind: file, path: {work / 'text.txt'}}}, nsamples: 4, seqlen: 32, batch_size: 2}}
methods: [{methods}]
sparsities: [0.5]
prune: {{layers: 2}}
device: auto
evaluation: null
""")
PYEOF
RES=results/slurmtest
LOCAL_TARGETS=() GPU_TARGETS=() # default target (all: models and report)
if [ "${SLURM_TEST_NO_REPORT:-0}" = 1 ]; then # debugging aid: stop at the assembled models
  LOCAL_TARGETS=($RES/rose-0.5/model $RES/magnitude-0.5/model) GPU_TARGETS=($RES/rose-0.5/model)
fi
SLURM_ARGS=(-s "$REPO/Snakefile" --configfile config/config.yaml
  --slurm-status-command squeue # no slurmdbd here, so no sacct
  --slurm-init-seconds-before-status-checks 1 --max-threads 1 --verbose)

count() { grep -c -- "$1" || true; } # count <pattern> <text: matching lines (no SIGPIPE under pipefail)
run_bg() {                          # run_bg <log> <args...>: snakemake in the background, as a user starts it
  local log=$1
  shift
  timeout -k 10 420 "$SMK" "$@" >"$log" 2>&1 &
  CTRL=$!
}
finish() { # finish <what>: wait for the background snakemake
  wait "$CTRL" || fail "$1 failed"
  CTRL=""
}
wait_running() { # wait_running <comment> <seconds>: print the id of the RUNNING job with that comment
  local id
  for _ in $(seq 1 $(($2 * 5))); do
    id=$(squeue -h -t running -o '%i %k' | awk -v c="$1" '$2 == c {print $1}')
    [ -n "$id" ] && { echo "$id"; return 0; }
    kill -0 "$CTRL" 2>/dev/null || return 1
    sleep 0.2
  done
  return 1
}

# ---- 1. local reference
cd "$W/local"
timeout -k 10 120 "$SMK" "${LOCAL_TARGETS[@]}" -s "$REPO/Snakefile" --configfile config/config.yaml \
  --profile "$REPO/workflow/profiles/workstation" --cores 2 >"$W/local.log" 2>&1 || fail "local run failed"
say "local reference run done"

# ---- 2. CPU profile (magnitude): no GPU requested; a scancel'ed job comes back with twice the memory
cd "$W/cpu"
run_bg "$W/cpu.log" $RES/magnitude-0.5/model "${SLURM_ARGS[@]}" --profile "$REPO/workflow/profiles/slurm-cpu"
J=$(wait_running rule_prune_wildcards_magnitude-0.5_0 120) || fail "prune job for layer 0 never ran"
scancel "$J"
say "scancel'ed job $J (prune, layer 0)"
finish "slurm-cpu run"
calls=$(grep "sbatch call:" "$W/cpu.log")
[ "$(count "--comment rule_prune" <<<"$calls")" -ge 2 ] || fail "prune was not submitted"
[ "$(count "--gpus\|--gres" <<<"$calls")" = 0 ] || fail "the slurm-cpu profile asked for a GPU"
mem=($(grep -- "--comment rule_prune_wildcards_magnitude-0.5_0 " <<<"$calls" | sed -n 's/.* --mem \([0-9]*\).*/\1/p'))
[ ${#mem[@]} = 2 ] || fail "the cancelled job was not resubmitted exactly once (--mem: ${mem[*]})"
[ "${mem[1]}" -ge $((2 * mem[0] - 16)) ] || fail "the retry did not double the memory: ${mem[*]} MB"
say "slurm-cpu profile ok: $(count . <<<"$calls") jobs, no GPU asked for, retry asked for ${mem[0]} -> ${mem[1]} MB"

# ---- 3. GPU profile (rose, fake GPUs): kill the controller mid-chain, unlock, resume
cd "$W/gpu"
export ROSE_SLURM_PARTITION=gpu # read by the profile
GPU_ARGS=("${GPU_TARGETS[@]}" "${SLURM_ARGS[@]}" --profile "$REPO/workflow/profiles/slurm")
run_bg "$W/gpu1.log" "${GPU_ARGS[@]}"
J=$(wait_running rule_hessians_wildcards_rose-0.5_1 360) || fail "hessians job for layer 1 never ran"
SMK_PID=$(ps -o pid= --ppid "$CTRL" | head -n 1 | tr -d ' ') # timeout's child is snakemake
[ -n "$SMK_PID" ] || fail "no snakemake process under timeout ($CTRL)"
kill -KILL "$SMK_PID" # like a lost login session: no cleanup, the lock stays
wait "$CTRL" 2>/dev/null || true
CTRL=""
for id in $(squeue -h -o %i); do scancel "$id"; done
say "controller $SMK_PID killed while job $J (hessians, layer 1) ran; its jobs cancelled"

if timeout -k 10 60 "$SMK" "${GPU_ARGS[@]}" >"$W/gpu-locked.log" 2>&1; then
  fail "a rerun after a killed controller should find the directory locked"
fi
[ "$(count "--unlock" <"$W/gpu-locked.log")" -gt 0 ] || fail "the locked rerun did not point to --unlock"
timeout -k 10 60 "$SMK" "${GPU_ARGS[@]}" --unlock >"$W/gpu-unlock.log" 2>&1 || fail "snakemake --unlock failed"
run_bg "$W/gpu2.log" "${GPU_ARGS[@]}"
finish "resumed run"
say "resumed run done"

calls=$(cat "$W/gpu1.log" "$W/gpu2.log" | grep "sbatch call:")
for stage in embed_calibration hessians order prune forward; do
  n=$(grep -- "--comment rule_${stage}" <<<"$calls" | count "--gpus=1")
  [ "$n" -gt 0 ] || fail "$stage did not ask for a GPU"
done
n=$(grep -- "--comment rule_\(prepare_model\|capture_calibration\|assemble\|report\)" <<<"$calls" | count "--gpus")
[ "$n" = 0 ] || fail "a CPU stage asked for a GPU"
[ "$(count " -p gpu " <<<"$calls")" = "$(count . <<<"$calls")" ] || fail "a job missed partition gpu (ROSE_SLURM_PARTITION)"
redone=$(grep "sbatch call:" "$W/gpu2.log" | count "--comment rule_\(prepare_model\|capture_calibration\|embed_calibration\|[a-z]*_wildcards_rose-0.5_0\) ")
[ "$redone" = 0 ] || fail "the resumed run redid $redone finished jobs"
say "GPU requests, partition and resume ok: $(count "sbatch call:" <"$W/gpu1.log") jobs, then $(count "sbatch call:" <"$W/gpu2.log") after the resume"

# ---- 4. the artifacts: pruned layers 50% sparse, same bytes as the local run
"$PY" - "$W" <<'PYEOF'
import json
import sys
from pathlib import Path

from safetensors.numpy import load_file

work = Path(sys.argv[1])
res = "results/slurmtest"


def strip(obj):
    """JSON without wall-clock fields (seconds, prune_seconds, ...)."""
    if isinstance(obj, dict):
        return {k: strip(v) for k, v in obj.items() if not k.endswith("seconds")}
    if isinstance(obj, list):
        return [strip(v) for v in obj]
    return obj


def card(path: Path) -> list[str]:
    """A model card without its wall-clock line."""
    return [line for line in path.read_text().splitlines() if "pruning time" not in line]


def same(a: Path, b: Path) -> bool:
    if a.suffix == ".json":
        return strip(json.loads(a.read_text())) == strip(json.loads(b.read_text()))
    if a.name == "README.md":
        return card(a) == card(b)
    return a.read_bytes() == b.read_bytes()


local = work / "local" / res
for name, required in (
    ("cpu", ["magnitude-0.5/layer_0/pruned.safetensors", "magnitude-0.5/layer_1/pruned.safetensors",
             "magnitude-0.5/model/config.json"]),
    ("gpu", ["calib/tokens.h5", "rose-0.5/layer_0/order.h5", "rose-0.5/layer_1/order.h5",
             "rose-0.5/layer_1/pruned.safetensors", "rose-0.5/model/config.json", "report/summary.csv"]),
):
    root = work / name / res
    files = sorted(
        p.relative_to(root) for p in root.rglob("*")
        # logs, the report (it lists the run's variants and times) and the invocation's own
        # settings (config.effective.yaml: each profile's resources) are not compared
        # exports: copies of model/ (compared) plus cards and records that quote wall-clock times
        if p.is_file() and not {"logs", "report", "export"} & set(p.relative_to(root).parts)
        and not p.name.startswith(".snakemake") and p.name != "config.effective.yaml"
    )
    missing = [r for r in required if not (root / r).is_file()]
    assert not missing, f"{name}: missing {missing}"
    differ = [str(r) for r in files if (local / r).is_file() and not same(root / r, local / r)]
    assert not differ, f"{name}: differs from the local run: {differ}"
    compared = sum((local / r).is_file() for r in files)
    print(f"[slurm-test] {name}: {compared} artifacts byte-equal to the local run's")

for name, variant in (("gpu", "rose-0.5"), ("cpu", "magnitude-0.5")):
    tensors = {}
    for shard in sorted((work / name / res / variant / "model").glob("*.safetensors")):
        tensors.update(load_file(shard))
    for layer, lo, hi in ((0, 0.49, 0.51), (1, 0.49, 0.51), (2, 0.0, 0.01)):
        mats = [t for n, t in tensors.items() if f".layers.{layer}." in n and t.ndim == 2]
        assert mats, f"{variant}: no weights for layer {layer}"
        zero = sum(int((t == 0).sum()) for t in mats) / sum(t.size for t in mats)
        assert lo <= zero <= hi, f"{variant} layer {layer}: {zero:.3f} zeros, expected {lo}..{hi}"
    print(f"[slurm-test] {variant}: layers 0-1 are 50% sparse, layer 2 untouched")
PYEOF
say "all checks passed in $((SECONDS - T0)) s"
