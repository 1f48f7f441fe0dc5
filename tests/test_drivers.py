"""The two drivers (Snakemake and `python -m rose run`) read a config alike and share run directories."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pipeline_utils import (
    REPO,
    kill_when,
    pruned_count,
    snakemake_cmd,
    weights_digest,
    write_config,
)

from rose import config as rose_config
from rose import runner

ROSE_CLI = [sys.executable, "-m", "rose"]
VARIANT = "rose-0.5"


def _effective_from_check(config: Path) -> dict:
    out = subprocess.run(
        [*ROSE_CLI, "check", "--config", str(config)], capture_output=True, text=True, check=True
    )
    return yaml.safe_load(
        "\n".join(line for line in out.stdout.splitlines() if not line.startswith("#"))
    )


@pytest.mark.e2e
def test_a_partial_config_means_the_same_to_both_drivers(tmp_path, tiny_llama_dir, tiny_text_file):
    """No evaluation and no prune section: Snakemake must not fill them in from config/config.yaml
    (it used to deep-merge --configfile into the default, so the demo's zero-shot tasks ran)."""
    partial = {
        "run": "partial",
        "results_dir": str(tmp_path / "results"),
        "model": {"source": str(tiny_llama_dir)},
        "calibration": {
            "source": {"kind": "file", "path": str(tiny_text_file)},
            "nsamples": 2,
            "seqlen": 16,
        },
        "methods": ["magnitude"],
        "sparsities": [0.5],
        "device": "cpu",
    }
    config = tmp_path / "partial.yaml"
    config.write_text(yaml.safe_dump(partial))
    from_check = _effective_from_check(config)
    model_json = tmp_path / "results" / "partial" / "model.json"
    # the default config/config.yaml is found next to the Snakefile, so a merge would show here
    subprocess.run(
        snakemake_cmd(config, tmp_path, str(model_json)), check=True, capture_output=True
    )
    from_snakemake = yaml.safe_load(
        (tmp_path / "results" / "partial" / "config.effective.yaml").read_text()
    )
    assert from_snakemake == from_check
    assert from_check["evaluation"] is None
    assert from_check["prune"] == {
        "blocksize": 128,
        "percdamp": 0.01,
        "threshold": 0.5,
        "reorder": "adaptive",
        "layers": None,
    }
    # and the in-process runner records the same
    runner.run(rose_config.load(config), evaluate=False, report=False)
    assert (
        yaml.safe_load((tmp_path / "results" / "partial" / "config.effective.yaml").read_text())
        == from_check
    )


def test_empty_evaluation_turns_evaluation_off_for_both_drivers(
    tmp_path, tiny_llama_dir, tiny_text_file
):
    config = write_config(
        tmp_path / "c.yaml", tiny_llama_dir, tiny_text_file, tmp_path / "results", evaluation={}
    )
    assert _effective_from_check(config)["evaluation"] is None
    dry = subprocess.run(
        snakemake_cmd(config, tmp_path, "-n"), check=True, capture_output=True, text=True
    )
    assert "evaluate_" not in dry.stdout + dry.stderr


@pytest.fixture(scope="module")
def clean_digest(tiny_workflow_run):
    """rose-0.5 of an uninterrupted run of the same settings: the session's workflow run
    (tests/conftest.py), which tests/test_pipeline.py shows equals the in-process runner's."""
    run_dir, _ = tiny_workflow_run
    return weights_digest(run_dir, VARIANT)


def _config(tmp_path, tiny_llama_dir, tiny_text_file) -> tuple[Path, Path]:
    results = tmp_path / "results"
    return write_config(
        tmp_path / "c.yaml", tiny_llama_dir, tiny_text_file, results, methods=["rose"]
    ), results / "tiny"


def _assert_mid_run(run_dir: Path, killed: bool) -> None:
    """The kill interrupted real work: some layers pruned, the model not yet reassembled."""
    assert killed, "the command finished before it could be killed"
    assert 1 <= pruned_count(run_dir) < 3
    assert not (run_dir / VARIANT / "model").exists()


@pytest.mark.e2e
def test_runner_finishes_what_a_killed_snakemake_started(
    tmp_path, tiny_llama_dir, tiny_text_file, clean_digest
):
    config, run_dir = _config(tmp_path, tiny_llama_dir, tiny_text_file)
    target = str(run_dir / VARIANT / "model")
    killed = kill_when(snakemake_cmd(config, tmp_path, target), lambda: pruned_count(run_dir) >= 1)
    _assert_mid_run(run_dir, killed)
    subprocess.run(
        [*ROSE_CLI, "run", "--config", str(config), "--no-eval", "-q"],
        check=True,
        capture_output=True,
    )
    assert weights_digest(run_dir, VARIANT) == clean_digest
    assert not list(run_dir.rglob("inputs.h5")) and not list(run_dir.rglob("hessians.h5"))


@pytest.mark.e2e
def test_snakemake_finishes_what_a_killed_runner_started(
    tmp_path, tiny_llama_dir, tiny_text_file, clean_digest
):
    config, run_dir = _config(tmp_path, tiny_llama_dir, tiny_text_file)
    cmd = [*ROSE_CLI, "run", "--config", str(config), "--no-eval", "-q"]
    killed = kill_when(cmd, lambda: pruned_count(run_dir) >= 1, cwd=REPO)
    _assert_mid_run(run_dir, killed)
    subprocess.run(
        snakemake_cmd(config, tmp_path, str(run_dir / VARIANT / "model")),
        check=True,
        capture_output=True,
    )
    assert weights_digest(run_dir, VARIANT) == clean_digest
    assert not list(run_dir.rglob("inputs.h5")) and not list(run_dir.rglob("hessians.h5"))
