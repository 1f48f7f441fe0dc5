"""Helpers to run the workflow and the in-process runner on tiny models in tests."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))


def write_config(path: Path, model_dir: Path, text_file: Path, results: Path, **extra) -> Path:
    config = {
        "run": "tiny",
        "results_dir": str(results),
        "model": {"source": str(model_dir)},
        "calibration": {
            "source": {"kind": "file", "path": str(text_file), "split": "head"},
            "nsamples": 6,
            "seqlen": 32,
            "batch_size": 4,
        },
        "methods": ["rose", "magnitude"],
        "sparsities": [0.5],
        "device": "cpu",
        "evaluation": None,
    }
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    path.write_text(yaml.safe_dump(config))
    return path


def snakemake_cmd(configfile: Path, workdir: Path, *extra: str) -> list[str]:
    return [
        SNAKEMAKE,
        "--snakefile",
        str(REPO / "Snakefile"),
        "--directory",
        str(workdir),
        "--configfile",
        str(configfile),
        "--cores",
        "2",
        "--force-use-threads",
        "--rerun-incomplete",
        *extra,
    ]


def run_snakemake(
    configfile: Path, workdir: Path, *extra: str, check: bool = True
) -> subprocess.CompletedProcess:
    result = subprocess.run(
        snakemake_cmd(configfile, workdir, *extra), capture_output=True, text=True, timeout=600
    )
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


def run_snakemake_api(configfile: Path, workdir: Path, targets: list[str] | None = None) -> None:
    """The workflow through Snakemake's Python API (threads: one torch import)."""
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import (
        ConfigSettings,
        DAGSettings,
        ExecutionSettings,
        OutputSettings,
        ResourceSettings,
    )

    with SnakemakeApi(OutputSettings()) as api:
        workflow = api.workflow(
            resource_settings=ResourceSettings(cores=2),
            config_settings=ConfigSettings(configfiles=[configfile]),
            snakefile=REPO / "Snakefile",
            workdir=workdir,
        )
        dag = workflow.dag(DAGSettings(targets=targets or []))
        dag.execute_workflow(
            executor="local", execution_settings=ExecutionSettings(use_threads=True)
        )


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def weights_digest(run_dir: Path, variant: str) -> dict[str, str]:
    """Bytes of every pruned layer file and of the reassembled weights of one variant."""
    out = {}
    for file in sorted((run_dir / variant).glob("layer_*/pruned.safetensors")):
        out[str(file.relative_to(run_dir))] = digest(file)
    for file in sorted((run_dir / variant / "model").glob("*.safetensors")):
        out[str(file.relative_to(run_dir))] = digest(file)
    return out


def model_tensors(model_dir: Path) -> dict:
    """Every tensor of a model directory, whatever its shards (a reassembled model's are its
    pruned-layer files plus the rest, through its index)."""
    from rose.checkpoint import Checkpoint

    checkpoint = Checkpoint.open(model_dir)
    return {name: checkpoint.read(name) for name in checkpoint.names()}


def pruned_count(run_dir: Path) -> int:
    return len(list(Path(run_dir).rglob("pruned.safetensors")))


def kill_when(cmd: list[str], ready, timeout: float = 300, cwd: Path | None = None) -> bool:
    """Start `cmd` in its own session, SIGKILL the whole group once `ready()` holds.

    Returns True when the kill landed while the command was still running (it had not
    finished on its own), so tests can assert that they interrupted real work."""
    import os
    import signal
    import time

    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, cwd=cwd
    )
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and proc.poll() is None:
            if ready():
                break
            time.sleep(0.05)
    finally:
        killed = proc.poll() is None
        if killed:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return killed
