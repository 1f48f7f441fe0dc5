"""Cluster support: profiles, per-rule resources, and the SLURM end-to-end script.

The fast tests need no SLURM. The end-to-end test starts a one-node SLURM with
apt and root (.ci/slurm-test.sh, about 4 minutes), so it runs only when
ROSE_TEST_SLURM=1 is set.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]
PROFILES = REPO / "workflow" / "profiles"
RESOURCES_SMK = REPO / "workflow" / "rules" / "resources.smk"

SEVEN_B = dict(num_layers=32, hidden_size=4096, parameters=6_738_415_616, dtype="float16")
SEVENTY_B = dict(num_layers=80, hidden_size=8192, parameters=70_553_706_496, dtype="bfloat16")
TINY = dict(num_layers=3, hidden_size=200, parameters=500_000, dtype="float32")


# ---------------------------------------------------------------- profiles


def load_profile(name: str, env: dict[str, str] | None = None) -> dict:
    """The profile as Snakemake reads it (YTE templating included)."""
    from snakemake.profiles import ProfileConfigFileParser

    path = PROFILES / name / "config.yaml"
    old = dict(os.environ)
    try:
        for key in ("ROSE_SLURM_PARTITION", "ROSE_SLURM_ACCOUNT"):
            os.environ.pop(key, None)
        os.environ.update(env or {})
        with open(path) as stream:
            return dict(ProfileConfigFileParser().parse(stream))
    finally:
        os.environ.clear()
        os.environ.update(old)


def snakemake_options() -> set[str]:
    from snakemake.cli import get_argument_parser

    parser = get_argument_parser()
    return {opt.lstrip("-") for action in parser._actions for opt in action.option_strings}


@pytest.mark.parametrize("name", ["workstation", "slurm", "slurm-cpu"])
def test_profile_keys_are_snakemake_options(name):
    profile = load_profile(name)
    unknown = sorted(set(profile) - snakemake_options())
    assert not unknown, f"profile {name}: not snakemake options: {unknown}"


@pytest.mark.parametrize("name", ["slurm", "slurm-cpu"])
def test_slurm_profiles(name):
    profile = load_profile(name)
    assert profile["executor"] == "slurm"
    assert int(profile["retries"]) >= 1  # retries are what make `attempt` grow
    defaults = profile["default-resources"]
    assert not any(d.startswith(("slurm_partition", "slurm_account")) for d in defaults)
    set_env = load_profile(name, {"ROSE_SLURM_PARTITION": "gpu", "ROSE_SLURM_ACCOUNT": "proj1"})
    assert "slurm_partition=gpu" in set_env["default-resources"]
    assert "slurm_account=proj1" in set_env["default-resources"]


def test_cpu_profile_turns_gpus_off():
    assert load_profile("slurm-cpu")["config"] == ["device=cpu"]
    assert "config" not in load_profile("slurm")


def test_profiles_parse_in_snakemake_cli(monkeypatch):
    from snakemake.cli import parse_args

    monkeypatch.setenv("ROSE_SLURM_PARTITION", "gpu")
    _, args = parse_args(["--profile", str(PROFILES / "slurm")])
    assert args.executor == "slurm" and args.retries == 2 and args.rerun_incomplete
    assert "slurm_partition" in args.default_resources
    _, args = parse_args(["--profile", str(PROFILES / "workstation")])
    assert args.executor in (None, "local") and args.force_use_threads


# ---------------------------------------------------------------- resources


def resources_module(config: dict) -> dict:
    """resources.smk executed as Python with `config` in its namespace."""
    namespace = {"config": config}
    exec(compile(RESOURCES_SMK.read_text(), str(RESOURCES_SMK), "exec"), namespace)
    return namespace


def run_config(tmp_path: Path, size: dict | None, **extra) -> dict:
    cfg = {
        "run": "r",
        "results_dir": str(tmp_path / "results"),
        "calibration": {"nsamples": 128, "seqlen": 2048},
        **extra,
    }
    if size is not None:
        path = tmp_path / "results" / "r" / "model.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**size, "path": "x", "model_type": "llama"}))
    return cfg


LAYER_STAGES = ["hessians", "order", "prune", "forward"]


@pytest.mark.parametrize(
    "stage", LAYER_STAGES + ["embed_calibration", "evaluate_perplexity", "assemble"]
)
def test_memory_and_runtime_scale_with_attempt(tmp_path, stage):
    cfg = run_config(tmp_path, SEVEN_B)
    r = resources_module(cfg)
    one, two, three = (r["resolve_resources"](stage, cfg, attempt) for attempt in (1, 2, 3))
    assert two["mem_mb"] == 2 * one["mem_mb"] and three["mem_mb"] == 3 * one["mem_mb"]
    assert two["runtime"] == 2 * one["runtime"]


@pytest.mark.parametrize("stage", LAYER_STAGES + ["evaluate_perplexity", "evaluate_zero_shot"])
def test_memory_grows_with_model_size(tmp_path, stage):
    mems, runtimes = [], []
    for i, size in enumerate((TINY, SEVEN_B, SEVENTY_B)):
        cfg = run_config(tmp_path / str(i), size)
        got = resources_module(cfg)["resolve_resources"](stage, cfg)
        mems.append(got["mem_mb"])
        runtimes.append(got["runtime"])
    assert mems[0] < mems[1] < mems[2], mems
    assert runtimes[0] <= runtimes[1] <= runtimes[2], runtimes
    assert mems[0] < 8 * 1024, "a tiny model should not ask for much memory"


def test_seventy_b_layer_jobs_fit_one_large_node(tmp_path):
    cfg = run_config(tmp_path, SEVENTY_B)
    r = resources_module(cfg)
    for stage in LAYER_STAGES:
        got = r["resolve_resources"](stage, cfg)
        # the Hessian of the 28672-wide down_proj alone is 6.6 GB in float64
        assert 16 * 1024 < got["mem_mb"] < 128 * 1024, (stage, got)
        assert got["gpu"] == 1


def test_model_json_missing_falls_back(tmp_path):
    cfg = run_config(tmp_path, None)
    r = resources_module(cfg)
    assert r["model_size"](cfg) == r["FALLBACK_MODEL"]
    assert r["resolve_resources"]("prune", cfg) == r["resolve_resources"](
        "prune", run_config(tmp_path / "b", r["FALLBACK_MODEL"])
    )


def test_run_wildcard_picks_model_json(tmp_path):
    cfg = run_config(tmp_path, TINY)
    r = resources_module(cfg)
    assert r["model_size"](cfg, SimpleNamespace(run="r"))["hidden_size"] == 200
    assert r["model_size"](cfg, SimpleNamespace(run="other")) == r["FALLBACK_MODEL"]


def test_gpu_only_for_gpu_stages_unless_device_cpu(tmp_path):
    cfg = run_config(tmp_path, TINY)
    r = resources_module(cfg)
    for stage in r["GPU_STAGES"]:
        assert r["resolve_resources"](stage, cfg)["gpu"] == 1
    for stage in r["CPU_STAGES"]:
        assert "gpu" not in r["resolve_resources"](stage, cfg)
    cpu = run_config(tmp_path, TINY, device="cpu")
    for stage in r["STAGES"]:
        assert "gpu" not in resources_module(cpu)["resolve_resources"](stage, cpu)
    r_cpu = resources_module(cpu)
    assert r_cpu["stage_threads"]("prune") > r["stage_threads"]("prune")


def test_config_overrides(tmp_path):
    cfg = run_config(
        tmp_path,
        SEVEN_B,
        resources={
            "gpu_model": "a100",
            "slurm_partition": "batch",
            "gpu_stages": {"slurm_partition": "gpu"},
            "prune": {"mem_mb": 50000, "runtime": 30, "threads": 16},
            "assemble": {"gres": "gpu:1"},
            "report": {"slurm_account": "proj"},
            "max_runtime": 25,
            "threads": 2,
        },
    )
    r = resources_module(cfg)
    prune = r["resolve_resources"]("prune", cfg, 2)
    assert prune["mem_mb"] == 100000  # pinned values still scale with attempt
    assert prune["runtime"] == 25  # ... up to the cap
    assert prune["gpu_model"] == "a100" and prune["slurm_partition"] == "gpu"
    report = r["resolve_resources"]("report", cfg)
    assert "gpu_model" not in report and "gpu" not in report  # GPU keys stay off CPU stages
    assert report["slurm_partition"] == "batch" and report["slurm_account"] == "proj"
    assemble = r["resolve_resources"]("assemble", cfg)
    assert assemble["gres"] == "gpu:1" and "gpu" not in assemble
    assert r["stage_threads"]("prune") == 16 and r["stage_threads"]("order") == 2
    assert "threads" not in prune and "max_runtime" not in prune


def test_gpu_zero_turns_gpu_requests_off(tmp_path):
    cfg = run_config(tmp_path, TINY, resources={"gpu": 0})
    assert "gpu" not in resources_module(cfg)["resolve_resources"]("prune", cfg)


def test_max_mem_caps(tmp_path):
    cfg = run_config(tmp_path, SEVENTY_B, resources={"max_mem_mb": 20000})
    assert resources_module(cfg)["resolve_resources"]("prune", cfg, 3)["mem_mb"] == 20000


def test_stage_resources_for_rules(tmp_path):
    cfg = run_config(tmp_path, TINY, resources={"order": {"slurm_partition": "short"}})
    r = resources_module(cfg)
    kwargs = r["stage_resources"]("hessians")
    # no partition key: the profile's default-resources still apply
    assert set(kwargs) == {"mem_mb", "runtime", "gpu"}
    wildcards = SimpleNamespace(variant="rose-0.5", layer="1")
    assert kwargs["mem_mb"](wildcards, 2) == 2 * kwargs["mem_mb"](wildcards, 1)
    assert kwargs["runtime"](wildcards, 1) >= 10 and kwargs["gpu"] == 1
    assert r["stage_resources"]("order")["slurm_partition"] == "short"
    # the lazy values see a model.json written after the rules were defined
    path = Path(cfg["results_dir"]) / "r" / "model.json"
    before = kwargs["mem_mb"](wildcards, 1)
    path.write_text(json.dumps(SEVENTY_B))
    assert kwargs["mem_mb"](wildcards, 1) > before


def test_bad_input_is_one_clear_error(tmp_path):
    cfg = run_config(tmp_path, TINY)
    r = resources_module(cfg)
    with pytest.raises(ValueError, match="unknown stage 'prnue'"):
        r["stage_resources"]("prnue")
    bad = run_config(tmp_path, TINY, resources=["gpu"])
    with pytest.raises(ValueError, match="resources must be a mapping"):
        resources_module(bad)["resolve_resources"]("prune", bad)
    bad = run_config(tmp_path, TINY, resources={"prune": 3})
    with pytest.raises(ValueError, match="resources.prune must be a mapping"):
        resources_module(bad)["resolve_resources"]("prune", bad)


# ---------------------------------------------------------------- end to end


def _slurm_skip_reason() -> str | None:
    if os.environ.get("ROSE_TEST_SLURM") != "1":
        return "set ROSE_TEST_SLURM=1 to start a one-node SLURM (root, apt, ~4 min)"
    if sys.platform != "linux" or os.geteuid() != 0:
        return "the SLURM test installs packages and starts daemons: needs root on Linux"
    if not shutil.which("apt-get") and not shutil.which("slurmctld"):
        return "no apt-get to install slurm, and slurm is not installed"
    if (
        shutil.which("slurmctld")
        and subprocess.run(["pgrep", "-x", "slurmctld"], capture_output=True).returncode == 0
    ):
        if not Path(os.environ.get("SLURM_CI_DIR", "/tmp/slurm-ci"), "slurmctld.pid").exists():
            return "a slurmctld not started by .ci/slurm-up.sh is running here"
    return None


@pytest.mark.slow
@pytest.mark.skipif(_slurm_skip_reason() is not None, reason=_slurm_skip_reason() or "")
def test_workflow_on_one_node_slurm():
    venv = Path(sys.executable).parent.parent
    proc = subprocess.run(
        ["timeout", "-k", "15", "420", str(REPO / ".ci" / "slurm-test.sh"), str(REPO), str(venv)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "all checks passed" in out
    assert "byte-equal to the local run" in out
