"""The benchmarks' `rose run` wrapper keeps the timing of every step a killed run finished, so
a resumed run is timed over all of its steps (benchmarks/bench_owl.run_ours)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml
from faults_utils import Hook
from pipeline_utils import REPO, write_config

sys.path.insert(0, str(REPO / "benchmarks"))

import bench_owl as owl  # noqa: E402


@pytest.mark.e2e
def test_a_resumed_run_is_timed_over_the_steps_the_killed_one_finished(
    tmp_path: Path, tiny_llama_dir: Path, tiny_text_file: Path
) -> None:
    results = tmp_path / "results"
    config = write_config(
        tmp_path / "c.yaml", tiny_llama_dir, tiny_text_file, results, methods=["sparsegpt"]
    )
    cfg_dict = yaml.safe_load(config.read_text())
    run_dir, variant, layers = results / "tiny", "sparsegpt-0.5", 3
    setup = owl.Setup(
        args=None,
        workdir=tmp_path,
        dense_dir=tiny_llama_dir,
        layers=layers,
        truncate=False,
        dtype="float32",
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        peer_python=None,
        blocksize=128,
        percdamp=0.01,
    )
    # killed just before its second layer's pruned weights are put in place
    _, cmd, env = owl.ours_command(setup, cfg_dict, "tiny")
    hook = Hook(
        tmp_path / "hook",
        "kill",
        "rename",
        {"root": str(run_dir), "match": f"{variant}/layer_1/pruned.safetensors", "before": True},
    )
    killed = subprocess.run(
        cmd,
        env={**hook.env(), **{k: env[k] for k in ("OMP_NUM_THREADS", "BENCH_STEP_LOG")}},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:] + killed.stderr[-2000:]
    assert hook.fired() is not None
    earlier = owl.read_step_log(owl.ours_step_log(setup, "tiny"))
    assert [t["layer"] for t in earlier if t["stage"] == "prune"] == [0]

    owl.run_ours(setup, cfg_dict, "tiny", "test")
    result = json.loads(owl.ours_result(setup, "tiny").read_text())
    assert result["rc"] == 0 and result["timings_earlier"] == len(earlier)
    assert result["timings"][: len(earlier)] == earlier
    steps = Counter((t["stage"], t["variant"], t["layer"]) for t in result["timings"])
    assert max(steps.values()) == 1, "a step was timed twice"
    pruned = sorted(t["layer"] for t in result["timings"] if t["stage"] == "prune")
    assert pruned == list(range(layers))

    # a fresh run directory starts a fresh log
    shutil.rmtree(run_dir)
    owl.run_ours(setup, cfg_dict, "tiny", "test")
    again = json.loads(owl.ours_result(setup, "tiny").read_text())
    assert again["timings_earlier"] == 0
    assert sorted(t["layer"] for t in again["timings"] if t["stage"] == "prune") == pruned
