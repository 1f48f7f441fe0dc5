"""Cluster support: profiles, per-rule resources, and the SLURM end-to-end script.

The fast tests need no SLURM. The end-to-end test starts a one-node SLURM with
apt and root (.ci/slurm-test.sh, about 4 minutes), so it runs only when
ROSE_TEST_SLURM=1 is set.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from rose import resources

REPO = Path(__file__).resolve().parents[1]
PROFILES = REPO / "workflow" / "profiles"

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
    one, two, three = (resources.resolve_resources(stage, cfg, attempt) for attempt in (1, 2, 3))
    assert two["mem_mb"] == 2 * one["mem_mb"] and three["mem_mb"] == 3 * one["mem_mb"]
    assert two["runtime"] == 2 * one["runtime"]


@pytest.mark.parametrize("stage", LAYER_STAGES + ["evaluate_perplexity", "evaluate_zero_shot"])
def test_memory_grows_with_model_size(tmp_path, stage):
    mems, runtimes = [], []
    for i, size in enumerate((TINY, SEVEN_B, SEVENTY_B)):
        cfg = run_config(tmp_path / str(i), size)
        got = resources.resolve_resources(stage, cfg)
        mems.append(got["mem_mb"])
        runtimes.append(got["runtime"])
    assert mems[0] < mems[1] < mems[2], mems
    assert runtimes[0] <= runtimes[1] <= runtimes[2], runtimes
    assert mems[0] < 8 * 1024, "a tiny model should not ask for much memory"


def test_seventy_b_layer_jobs_fit_one_large_node(tmp_path):
    cfg = run_config(tmp_path, SEVENTY_B)
    for stage in LAYER_STAGES:
        got = resources.resolve_resources(stage, cfg)
        # the Hessian of the 28672-wide down_proj alone is 6.6 GB in float64
        assert 16 * 1024 < got["mem_mb"] < 128 * 1024, (stage, got)
        assert got["gpu"] == 1


# attempt-1 estimates for a 7B LLaMA with 128 x 2048 calibration tokens on a GPU
SEVEN_B_ESTIMATES = {
    "prepare_model": (11264, 120),
    "capture_calibration": (4608, 10),
    "embed_calibration": (17408, 10),
    "shared_hessians": (16128, 10),
    "outliers": (19968, 10),
    "allocate": (3584, 10),
    "hessians": (16128, 10),
    "order": (13568, 10),
    "prune": (14592, 10),
    "forward": (18944, 10),
    "assemble": (12032, 10),
    "export": (5632, 10),
    "evaluate_perplexity": (26368, 12),
    "evaluate_zero_shot": (26368, 118),
    "report": (4608, 10),
}


def test_seven_b_estimates_are_pinned(tmp_path):
    """Exact numbers, so a change to the estimate is a deliberate one (update docs/cluster.md too)."""
    cfg = run_config(tmp_path, SEVEN_B)
    assert set(SEVEN_B_ESTIMATES) == resources.STAGES
    got = {
        stage: (r["mem_mb"], r["runtime"])
        for stage in resources.STAGES
        for r in [resources.resolve_resources(stage, cfg)]
    }
    assert got == SEVEN_B_ESTIMATES


def test_docs_table_matches_the_estimate():
    """docs/cluster.md's "What each rule requests" table is what the estimator gives."""
    sizes = {
        "SmolLM2-135M": dict(
            num_layers=30, hidden_size=576, parameters=134_515_008, dtype="bfloat16"
        ),
        "LLaMA-2-7B": SEVEN_B,
        "LLaMA-2-70B": dict(
            num_layers=80, hidden_size=8192, parameters=68_976_648_192, dtype="float16"
        ),
    }
    lines = (REPO / "docs" / "cluster.md").read_text().splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| stage | GPU | threads |"))
    columns = [c.strip() for c in lines[header].strip("|").split("|")]
    assert columns[3:] == list(sizes), columns
    cfg = {"calibration": {"nsamples": 128, "seqlen": 2048}}
    seen = set()
    for line in lines[header + 2 :]:
        if not line.startswith("|"):
            break
        stage, gpu, threads, *cells = (c.strip() for c in line.strip("|").split("|"))
        stage = stage.strip("`")
        seen.add(stage)
        assert gpu == ("1" if resources.uses_gpu(stage, cfg) else "-"), stage
        assert int(threads) == resources.resolve_threads(stage, cfg), stage
        for model, cell in zip(sizes, cells, strict=True):
            est = resources.estimate_resources(stage, cfg, sizes[model])
            mem, runtime = re.fullmatch(r"(\d+) GB, (\d+) min", cell).groups()
            # the table rounds to whole GiB (x.5 either way)
            assert abs(int(mem) - est["mem_mb"] / 1024) <= 0.5, (stage, model, cell, est)
            assert int(runtime) == est["runtime"], (stage, model, cell, est)
    assert seen == resources.STAGES


def test_model_json_missing_falls_back(tmp_path):
    cfg = run_config(tmp_path, None)
    assert resources.model_size(cfg) == resources.FALLBACK_MODEL
    assert resources.resolve_resources("prune", cfg) == resources.resolve_resources(
        "prune", run_config(tmp_path / "b", dict(resources.FALLBACK_MODEL))
    )


def test_model_json_path_is_the_run_layouts(tmp_path):
    from rose.layout import RunLayout

    cfg = run_config(tmp_path, TINY)
    layout = RunLayout(Path(cfg["results_dir"]) / "r")
    assert resources.model_json_path(cfg) == layout.model_json
    assert resources.model_json_path(cfg, SimpleNamespace(run="o")).parent.name == "o"
    assert resources.model_json_path({"run": "r"}) == Path("results", "r", "model.json")


def test_model_json_lacking_fields(tmp_path):
    """A partial model.json never mixes its shape with the fallback's: that asked for terabytes."""
    fallback = dict(resources.FALLBACK_MODEL)
    for i, missing in enumerate(("num_layers", "hidden_size", "parameters")):
        cfg = run_config(tmp_path / str(i), {k: v for k, v in TINY.items() if k != missing})
        size = resources.model_size(cfg)
        assert size == {**fallback, "dtype": TINY["dtype"]}, missing
        for stage in resources.STAGES:
            got = resources.resolve_resources(stage, cfg)
            want = resources.estimate_resources(stage, cfg, size)
            assert {k: got[k] for k in want} == want
            assert got["mem_mb"] < 64 * 1024, (missing, stage, got)
    # dtype alone missing: the shape is still the file's
    cfg = run_config(tmp_path / "d", {k: v for k, v in TINY.items() if k != "dtype"})
    assert resources.model_size(cfg) == {**TINY, "dtype": fallback["dtype"]}
    tiny = run_config(tmp_path / "t", {**TINY, "dtype": fallback["dtype"]})
    assert resources.resolve_resources("prune", cfg) == resources.resolve_resources("prune", tiny)
    # unusable values or a file that is not a mapping: the fallback, not an exception
    for i, raw in enumerate(
        (
            {**TINY, "hidden_size": 0},
            {**TINY, "parameters": "many"},
            {**TINY, "num_layers": True},
            [1, 2],
        )
    ):
        path = tmp_path / f"bad{i}" / "results" / "r" / "model.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(raw))
        cfg = run_config(tmp_path / f"bad{i}", None)
        assert resources.model_size(cfg)["hidden_size"] == fallback["hidden_size"], raw
        assert resources.resolve_resources("hessians", cfg)["mem_mb"] < 64 * 1024


def test_run_wildcard_picks_model_json(tmp_path):
    cfg = run_config(tmp_path, TINY)
    assert resources.model_size(cfg, SimpleNamespace(run="r"))["hidden_size"] == 200
    assert resources.model_size(cfg, SimpleNamespace(run="other")) == resources.FALLBACK_MODEL


def test_gpu_only_for_gpu_stages_unless_device_cpu(tmp_path):
    cfg = run_config(tmp_path, TINY)
    for stage in resources.GPU_STAGES:
        assert resources.resolve_resources(stage, cfg)["gpu"] == 1
    for stage in resources.CPU_STAGES:
        assert "gpu" not in resources.resolve_resources(stage, cfg)
    cpu = run_config(tmp_path, TINY, device="cpu")
    for stage in resources.STAGES:
        assert "gpu" not in resources.resolve_resources(stage, cpu)
    assert resources.resolve_threads("prune", cpu) == resources.CPU_DEVICE_THREADS
    assert resources.resolve_threads("prune", cfg) == 4
    assert resources.resolve_threads("report", cpu) == 1


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
    prune = resources.resolve_resources("prune", cfg, 2)
    assert prune["mem_mb"] == 100000  # pinned values still scale with attempt
    assert prune["runtime"] == 25  # ... up to the cap
    assert prune["gpu_model"] == "a100" and prune["slurm_partition"] == "gpu"
    report = resources.resolve_resources("report", cfg)
    assert "gpu_model" not in report and "gpu" not in report  # GPU keys stay off CPU stages
    assert report["slurm_partition"] == "batch" and report["slurm_account"] == "proj"
    assemble = resources.resolve_resources("assemble", cfg)
    assert assemble["gres"] == "gpu:1" and "gpu" not in assemble
    assert resources.resolve_threads("prune", cfg) == 16
    assert resources.resolve_threads("order", cfg) == 2
    assert "threads" not in prune and "max_runtime" not in prune


def test_gpu_zero_turns_gpu_requests_off(tmp_path):
    cfg = run_config(tmp_path, TINY, resources={"gpu": 0})
    assert "gpu" not in resources.resolve_resources("prune", cfg)


def test_max_mem_caps(tmp_path):
    cfg = run_config(tmp_path, SEVENTY_B, resources={"max_mem_mb": 20000})
    assert resources.resolve_resources("prune", cfg, 3)["mem_mb"] == 20000


def test_rule_resources(tmp_path):
    cfg = run_config(tmp_path, TINY, resources={"order": {"slurm_partition": "short"}})
    kwargs = resources.rule_resources("hessians", cfg)
    # no partition key: the profile's default-resources still apply
    assert set(kwargs) == {"mem_mb", "runtime", "gpu"}
    wildcards = SimpleNamespace(variant="rose-0.5", layer="1")
    assert kwargs["mem_mb"](wildcards, 2) == 2 * kwargs["mem_mb"](wildcards, 1)
    assert kwargs["mem_mb"](wildcards, 1) == resources.resolve_resources("hessians", cfg)["mem_mb"]
    assert kwargs["runtime"](wildcards, 1) >= 10 and kwargs["gpu"] == 1
    assert resources.rule_resources("order", cfg)["slurm_partition"] == "short"
    # the lazy values see a model.json written after the rules were defined
    path = Path(cfg["results_dir"]) / "r" / "model.json"
    before = kwargs["mem_mb"](wildcards, 1)
    path.write_text(json.dumps(SEVENTY_B))
    assert kwargs["mem_mb"](wildcards, 1) > before


def test_bad_input_is_one_clear_error(tmp_path):
    cfg = run_config(tmp_path, TINY)
    with pytest.raises(ValueError, match="unknown stage 'prnue'"):
        resources.rule_resources("prnue", cfg)
    with pytest.raises(ValueError, match="unknown stage 'prnue'"):
        resources.resolve_threads("prnue", cfg)
    bad = run_config(tmp_path, TINY, resources=["gpu"])
    with pytest.raises(ValueError, match="resources must be a mapping"):
        resources.resolve_resources("prune", bad)
    bad = run_config(tmp_path, TINY, resources={"prune": 3})
    with pytest.raises(ValueError, match="resources.prune must be a mapping"):
        resources.resolve_resources("prune", bad)


def _dry_run_jobs(output: str) -> dict[str, dict]:
    """{rule: {"threads": n, "resources": {...}}} from `snakemake -n`'s job listing."""
    jobs: dict[str, dict] = {}
    current = None
    for line in output.splitlines():
        head = line.split()
        if len(head) == 2 and head[0] in ("rule", "checkpoint") and head[1].endswith(":"):
            current = jobs.setdefault(head[1][:-1], {"threads": 1, "resources": {}})
        elif current is not None and line.startswith("    threads: "):
            current["threads"] = int(line.split(": ", 1)[1])
        elif current is not None and line.startswith("    resources: "):
            pairs = line.split(": ", 1)[1].split(", ")
            current["resources"] = dict(p.split("=", 1) for p in pairs)
    return jobs


def test_rules_request_what_the_estimator_says(tmp_path, tiny_llama_dir, tiny_text_file):
    """The rules' resource glue (workflow/rules/common.smk), through a real `snakemake -n`."""
    import yaml
    from pipeline_utils import snakemake_cmd, write_config

    pins = {"prepare_model": {"threads": 3, "slurm_partition": "short"}, "report": {"mem_mb": 1234}}
    text = {"kind": "file", "path": str(tiny_text_file), "split": "tail"}
    configfile = write_config(
        tmp_path / "c.yaml",
        tiny_llama_dir,
        tiny_text_file,
        tmp_path / "results",
        evaluation={
            "perplexity": [{"name": "tail", "source": text, "seqlen": 32, "max_windows": 4}]
        },
        resources=pins,
    )
    cfg = yaml.safe_load(configfile.read_text())
    proc = subprocess.run(
        snakemake_cmd(configfile, tmp_path, "-n", "--cores", "16"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    jobs = _dry_run_jobs(proc.stdout + proc.stderr)
    assert {"prepare_model", "evaluate_perplexity", "report"} <= set(jobs), sorted(jobs)
    assert (
        jobs["evaluate_perplexity"]["threads"] == resources.CPU_DEVICE_THREADS
    )  # GPU stage, device: cpu
    assert jobs["prepare_model"]["threads"] == 3
    assert jobs["prepare_model"]["resources"]["slurm_partition"] == "short"
    assert jobs["report"]["resources"]["mem_mb"] == "1234"
    for rule, job in jobs.items():
        if rule not in resources.STAGES:
            continue
        want = resources.resolve_resources(rule, cfg)
        got = job["resources"]
        assert (int(got["mem_mb"]), int(got["runtime"])) == (want["mem_mb"], want["runtime"]), rule
        assert "gpu" not in got  # device: cpu
        assert job["threads"] == resources.resolve_threads(rule, cfg), rule


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
        ["timeout", "-k", "15", "1500", str(REPO / ".ci" / "slurm-test.sh"), str(REPO), str(venv)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "all checks passed" in out
    assert "byte-equal to the local run" in out
