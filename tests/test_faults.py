"""Fault injection: try to break the guarantees, count the cases.

Every case must end either in a clear error naming the file or key and what to
do (exit 1, one `rose: error:` line, nothing a later run would trust), or, after
rerunning the same command, in weights bit-identical to a clean run.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from pipeline_utils import REPO, snakemake_cmd, weights_digest, write_config
from tiny import make_tiny_model

from rose.cli import main

VARIANT = "rose-0.5"
RESULTS: list[tuple[str, bool]] = []  # counted by conftest.pytest_terminal_summary


@dataclass(frozen=True)
class Fault:
    name: str
    artifact: str  # path under the run dir, relative
    needs: tuple[str, ...]  # what to delete first so the artifact is read again
    damage: str  # truncate | flip | swap-layer | swap-run


ARTIFACTS = {
    "tokens": ("calib/tokens.h5", ("calib/inputs.h5", VARIANT)),
    "hessians": (f"{VARIANT}/layer_1/hessians.h5", (f"{VARIANT}/layer_1/pruned.safetensors", f"{VARIANT}/layer_1/stats.json", f"{VARIANT}/model")),
    "order": (f"{VARIANT}/layer_1/order.h5", (f"{VARIANT}/layer_1/pruned.safetensors", f"{VARIANT}/layer_1/stats.json", f"{VARIANT}/model")),
    "inputs": (f"{VARIANT}/layer_1/inputs.h5", (f"{VARIANT}/layer_1/hessians.h5", f"{VARIANT}/layer_1/order.h5", f"{VARIANT}/layer_1/pruned.safetensors", f"{VARIANT}/layer_1/stats.json", f"{VARIANT}/model")),
    "pruned": (f"{VARIANT}/layer_1/pruned.safetensors", (f"{VARIANT}/model",)),
    "stats": (f"{VARIANT}/layer_1/stats.json", (f"{VARIANT}/model",)),
    "model.json": ("model.json", (f"{VARIANT}/model",)),
}
DAMAGE = {
    "tokens": ("truncate", "flip", "swap-run"),
    "hessians": ("truncate", "flip", "swap-layer", "swap-run"),
    "order": ("truncate", "flip", "swap-layer"),
    "inputs": ("truncate", "flip", "swap-run"),
    "pruned": ("truncate", "flip", "swap-layer", "swap-run"),
    "stats": ("truncate", "swap-layer"),
    "model.json": ("truncate", "flip"),
}
FAULTS = [
    Fault(f"{damage} {name}", ARTIFACTS[name][0], ARTIFACTS[name][1], damage)
    for name in ARTIFACTS
    for damage in DAMAGE[name]
]


@pytest.fixture
def record(request):
    outcome = {"ok": False}
    yield outcome
    RESULTS.append((request.node.name, outcome["ok"]))


def _config(tmp: Path, model: Path, text: Path, results: Path, **extra) -> Path:
    return write_config(tmp / "c.yaml", model, text, results, methods=["rose"], sparsities=[0.5], keep_intermediates=True, **extra)


def _run(cfg: Path, capsys, *sets: str) -> tuple[int, list[str]]:
    args = ["run", "--config", str(cfg), "--no-eval", "-q"]
    for item in sets:
        args += ["--set", item]
    code = main(args)
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("rose: error:")]
    return code, errors


@pytest.fixture(scope="module")
def clean(tmp_path_factory, tiny_llama_dir, tiny_text_file):
    """A clean run (intermediates kept) and one with another calibration seed, for swaps."""
    tmp = tmp_path_factory.mktemp("clean")
    for name, seed in (("a", 0), ("b", 1)):
        cfg = write_config(
            tmp / f"{name}.yaml", tiny_llama_dir, tiny_text_file, tmp / name,
            methods=["rose"], sparsities=[0.5], keep_intermediates=True,
            calibration={"source": {"kind": "file", "path": str(tiny_text_file), "split": "head"},
                         "nsamples": 6, "seqlen": 32, "batch_size": 4, "seed": seed},
        )
        assert main(["run", "--config", str(cfg), "--no-eval", "-q"]) == 0
    return tmp / "a" / "tiny", tmp / "b" / "tiny"


def _damage(path: Path, how: str, run_dir: Path, other_run: Path) -> None:
    rel = path.relative_to(run_dir)
    if how == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif how == "flip":
        data = bytearray(path.read_bytes())
        for offset in range(len(data) // 2, min(len(data), len(data) // 2 + 64)):
            data[offset] ^= 0x5A
        path.write_bytes(bytes(data))
    elif how == "swap-layer":
        shutil.copyfile(run_dir / str(rel).replace("layer_1", "layer_0"), path)
    elif how == "swap-run":
        shutil.copyfile(other_run / rel, path)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


@pytest.mark.parametrize("fault", FAULTS, ids=[f.name for f in FAULTS])
def test_damaged_artifact_is_named_then_rerun_is_identical(fault, clean, tmp_path, tiny_llama_dir, tiny_text_file, capsys, record):
    run_a, run_b = clean
    results = tmp_path / "results"
    shutil.copytree(run_a, results / "tiny")
    run_dir = results / "tiny"
    for item in fault.needs:
        _remove(run_dir / item)
    target = run_dir / fault.artifact
    _damage(target, fault.damage, run_dir, run_b)
    cfg = _config(tmp_path, tiny_llama_dir, tiny_text_file, results)
    code, errors = _run(cfg, capsys)
    if code != 0:  # refused, naming the file and what to do
        assert code == 1 and len(errors) == 1 and target.name in errors[0], errors
        assert "delete" in errors[0] or "another" in errors[0], errors
        _remove(target)
        code, errors = _run(cfg, capsys)
        assert code == 0, errors
    # else the damage hit bytes that hold no data (HDF5 free space): the checksums still match
    assert weights_digest(run_dir, VARIANT) == weights_digest(run_a, VARIANT), f"{fault.name}: damaged data was trusted"
    record["ok"] = True


@pytest.mark.parametrize("key,value", [("calibration.seed", "3"), ("prune.percdamp", "0.05"), ("prune.blocksize", "64")])
def test_changed_config_names_the_key(key, value, clean, tmp_path, tiny_llama_dir, tiny_text_file, capsys, record):
    results = tmp_path / "results"
    shutil.copytree(clean[0], results / "tiny")
    code, errors = _run(_config(tmp_path, tiny_llama_dir, tiny_text_file, results), capsys, f"{key}={value}")
    assert code == 1 and key in errors[0] and "new run name" in errors[0], errors
    record["ok"] = True


def test_disk_full_leaves_nothing_and_rerun_is_identical(clean, tmp_path, tiny_llama_dir, tiny_text_file, capsys, monkeypatch, record):
    from rose import stages

    results = tmp_path / "results"
    cfg = _config(tmp_path, tiny_llama_dir, tiny_text_file, results)
    real = stages.save_file
    calls = {"n": 0}

    def full(tensors, path, metadata=None):
        calls["n"] += 1
        if calls["n"] == 2:  # layer 1's pruned weights
            Path(path).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(stages, "save_file", full)
    code, errors = _run(cfg, capsys)
    assert code == 1 and "no space left" in errors[0], errors
    layer = results / "tiny" / VARIANT / "layer_1"
    assert not (layer / "pruned.safetensors").exists()
    assert not [p for p in layer.iterdir() if ".tmp-" in p.name]
    monkeypatch.setattr(stages, "save_file", real)
    assert _run(cfg, capsys)[0] == 0
    assert weights_digest(results / "tiny", VARIANT) == weights_digest(clean[0], VARIANT)
    record["ok"] = True


def test_nan_weight_names_layer_and_linear(tmp_path, tiny_text_file, capsys, record):
    import torch
    from safetensors.torch import load_file, save_file

    model = make_tiny_model(tmp_path / "m")
    tensors = load_file(model / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})
    code, errors = _run(_config(tmp_path, model, tiny_text_file, tmp_path / "results"), capsys)
    assert code == 1 and "layer 1" in errors[0] and "up_proj" in errors[0], errors
    assert not (tmp_path / "results" / "tiny" / VARIANT / "layer_1" / "pruned.safetensors").exists()
    del torch
    record["ok"] = True


def _popen(cmd: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True, cwd=REPO, **kw)


def _wait_for(condition, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and not condition():
        time.sleep(0.02)


def test_two_runners_on_one_run_directory(clean, tmp_path, tiny_llama_dir, tiny_text_file, record):
    cfg = _config(tmp_path, tiny_llama_dir, tiny_text_file, tmp_path / "results")
    cmd = [sys.executable, "-m", "rose", "run", "--config", str(cfg), "--no-eval", "-q"]
    first = _popen(cmd)
    _wait_for(lambda: (tmp_path / "results" / "tiny" / ".rose.lock").exists())
    second = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    first.wait()
    assert second.returncode == 1 and "in use by another run" in second.stderr
    assert first.returncode == 0
    assert weights_digest(tmp_path / "results" / "tiny", VARIANT) == weights_digest(clean[0], VARIANT)
    record["ok"] = True


KILL_DRIVER = textwrap.dedent(
    """
    import os, signal, sys
    from rose import artifacts
    real = artifacts.H5StreamWriter.write
    state = {"n": 0}
    def write(self, block):
        if "layer_2" in str(self.path):
            state["n"] += 1
            if state["n"] == 2:
                os.kill(os.getpid(), signal.SIGKILL)
        return real(self, block)
    artifacts.H5StreamWriter.write = write
    from rose.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


def test_sigkill_inside_an_hdf5_write(clean, tmp_path, tiny_llama_dir, tiny_text_file, record):
    cfg = _config(tmp_path, tiny_llama_dir, tiny_text_file, tmp_path / "results")
    args = ["run", "--config", str(cfg), "--no-eval", "-q"]
    killed = subprocess.run([sys.executable, "-c", KILL_DRIVER, *args], capture_output=True, cwd=REPO)
    assert killed.returncode == -signal.SIGKILL
    layer = tmp_path / "results" / "tiny" / VARIANT / "layer_2"
    assert not (layer / "inputs.h5").exists() and [p for p in layer.iterdir() if ".tmp-" in p.name]
    subprocess.run([sys.executable, "-m", "rose", *args], check=True, capture_output=True, cwd=REPO)
    assert not [p for p in layer.iterdir() if ".tmp-" in p.name]
    assert weights_digest(tmp_path / "results" / "tiny", VARIANT) == weights_digest(clean[0], VARIANT)
    record["ok"] = True


@pytest.mark.parametrize("when", ["hessians.h5", "order.h5"])
def test_sigkill_of_the_runner_inside_a_layer(when, clean, tmp_path, tiny_llama_dir, tiny_text_file, record):
    cfg = _config(tmp_path, tiny_llama_dir, tiny_text_file, tmp_path / "results")
    cmd = [sys.executable, "-m", "rose", "run", "--config", str(cfg), "--no-eval", "-q"]
    proc = _popen(cmd)
    _wait_for(lambda: (tmp_path / "results" / "tiny" / VARIANT / "layer_1" / when).exists())
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    subprocess.run(cmd, check=True, capture_output=True, cwd=REPO)
    assert weights_digest(tmp_path / "results" / "tiny", VARIANT) == weights_digest(clean[0], VARIANT)
    record["ok"] = True


def test_sigkill_of_a_snakemake_job_process(clean, tmp_path, tiny_llama_dir, tiny_text_file, record):
    """Jobs as subprocesses (no --force-use-threads): kill one mid-chain, rerun."""
    results = tmp_path / "results"
    cfg = _config(tmp_path, tiny_llama_dir, tiny_text_file, results)
    target = str(results / "tiny" / VARIANT / "model")
    cmd = [c for c in snakemake_cmd(cfg, tmp_path, target) if c != "--force-use-threads"]
    proc = _popen(cmd)
    victim = None
    deadline = time.time() + 180
    while victim is None and time.time() < deadline and proc.poll() is None:
        if (results / "tiny" / VARIANT / "layer_0" / "pruned.safetensors").exists():
            out = subprocess.run(["pgrep", "-f", "--", "--target-jobs"], capture_output=True, text=True).stdout.split()
            victim = next((int(p) for p in out if int(p) != proc.pid), None)
        time.sleep(0.05)
    if victim is not None:
        os.kill(victim, signal.SIGKILL)
    proc.wait()
    assert victim is not None and proc.returncode != 0, "no job process was caught running"
    subprocess.run(snakemake_cmd(cfg, tmp_path, target), check=True, capture_output=True)
    assert weights_digest(results / "tiny", VARIANT) == weights_digest(clean[0], VARIANT)
    record["ok"] = True


def test_two_snakemake_controllers(clean, tmp_path, tiny_llama_dir, tiny_text_file, record):
    results = tmp_path / "results"
    cfg = _config(tmp_path, tiny_llama_dir, tiny_text_file, results)
    target = str(results / "tiny" / VARIANT / "model")
    first = _popen(snakemake_cmd(cfg, tmp_path, target))
    _wait_for(lambda: any((tmp_path / ".snakemake" / "locks").glob("*")) if (tmp_path / ".snakemake" / "locks").exists() else False)
    second = subprocess.run(snakemake_cmd(cfg, tmp_path, target), capture_output=True, text=True)
    first.wait()
    assert second.returncode != 0 and "lock" in (second.stdout + second.stderr).lower()
    assert first.returncode == 0
    assert weights_digest(results / "tiny", VARIANT) == weights_digest(clean[0], VARIANT)
    record["ok"] = True
