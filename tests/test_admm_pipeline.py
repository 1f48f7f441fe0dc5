"""ADMM variants end to end: a refit and the admm method, uniform and OWL, under both drivers.

One clean in-process run is the reference every other run must reproduce bit for bit:
the Snakemake run, and a `python -m rose run` killed inside the prune stage (in the
middle of a layer's Linears) and resumed.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from faults_utils import Hook
from pipeline_utils import REPO, run_snakemake, weights_digest, write_config

from rose import config as rose_config
from rose import runner
from rose.artifacts import read_json
from rose.layout import RunLayout

pytestmark = pytest.mark.e2e

METHODS = ["sparsegpt", "sparsegpt+admm", "wanda+admm", "admm"]
ALLOCATIONS = ["uniform", {"kind": "owl", "m": 5, "lambda": 0.1}]
VARIANTS = [
    "sparsegpt-0.5",
    "sparsegpt+admm-0.5",
    "wanda+admm-0.5",
    "admm-0.5",
    "sparsegpt-owl-0.5",
    "sparsegpt+admm-owl-0.5",
    "wanda+admm-owl-0.5",
    "admm-owl-0.5",
]
SOLVER = {"iterations": 6, "ramp_iterations": 4, "cg_iterations": 5}


def _config(tmp, model, text):
    return write_config(
        tmp / "c.yaml",
        model,
        text,
        tmp / "results",
        methods=METHODS,
        allocation=ALLOCATIONS,
        prune={"admm": SOLVER},
    )


@pytest.fixture(scope="module")
def clean(tmp_path_factory, tiny_llama_dir, tiny_text_file):
    """The reference run (in process): its config and run directory."""
    tmp = tmp_path_factory.mktemp("admm_clean")
    cfg = rose_config.load(_config(tmp, tiny_llama_dir, tiny_text_file))
    runner.run(cfg, evaluate=False, report=False)
    return cfg, tmp / "results" / "tiny"


def _digests(run_dir):
    return {v: weights_digest(run_dir, v) for v in VARIANTS}


def test_every_admm_variant_is_assembled_with_its_solver_recorded(clean):
    cfg, run_dir = clean
    assert sorted(v.name for v in cfg.variants) == sorted(VARIANTS)
    layout = RunLayout(run_dir)
    for variant in VARIANTS:
        manifest = read_json(run_dir / variant / "model" / "pruning.json")
        assert manifest["method"] == variant.rsplit("-", 1)[0].removesuffix("-owl")
        uses_admm = "admm" in variant
        assert ("admm" in manifest) == uses_admm
        for entry in manifest["linears"].values():
            assert entry["reconstruction_error"] is not None
            if not uses_admm:
                assert "solver" not in entry
                continue
            solver = entry["solver"]
            assert solver["kind"] == ("admm" if variant.startswith("admm") else "refit")
            assert solver["seconds"] > 0 and solver["penalties"]
            if solver["kind"] == "refit":
                assert solver["after"] <= solver["before"]
                # the refit never raises the layer-output error of its method's mask
                assert entry["reconstruction_error"] <= entry["reconstruction_error_before"] * (
                    1 + 1e-6
                )
            else:  # from the dense weights: the objective starts at 0 and ends positive
                assert solver["before"] == 0 < solver["after"]
                assert solver["iterations"] == SOLVER["iterations"]
        stats = read_json(layout.stats(variant, 0))  # the layer's own record carries the same
        for name, entry in stats["linears"].items():
            assert manifest["linears"][f"model.layers.0.{name}"] == entry


def test_a_refit_keeps_its_methods_mask_bit_for_bit(clean):
    """sparsegpt+admm's zeros are sparsegpt's (layer 0 sees the same dense inputs in both)."""
    _, run_dir = clean
    from pipeline_utils import model_tensors

    plain = model_tensors(run_dir / "sparsegpt-0.5" / "model")
    refit = model_tensors(run_dir / "sparsegpt+admm-0.5" / "model")
    layer0 = [n for n in plain if n.startswith("model.layers.0.") and n.endswith("proj.weight")]
    assert layer0
    for name in layer0:
        assert bool(((plain[name] == 0) == (refit[name] == 0)).all()), name
        assert not bool((plain[name] == refit[name]).all()), f"{name}: the refit changed nothing"


def test_snakemake_reproduces_the_runner_bit_for_bit(
    clean, tmp_path, tiny_llama_dir, tiny_text_file
):
    _, run_dir = clean
    config = _config(tmp_path, tiny_llama_dir, tiny_text_file)
    targets = [str(tmp_path / "results" / "tiny" / v / "model") for v in VARIANTS]
    run_snakemake(config, tmp_path, *targets)
    assert _digests(tmp_path / "results" / "tiny") == _digests(run_dir)


def test_a_kill_inside_the_prune_stage_resumes_bit_identical(
    clean, tmp_path, tiny_llama_dir, tiny_text_file
):
    _, run_dir = clean
    config = _config(tmp_path, tiny_llama_dir, tiny_text_file)
    # the tenth refitted Linear: a few layers in, some of that layer's solves done, none written
    hook = Hook(
        tmp_path / "hook",
        "kill",
        "call",
        {"module": "rose.methods", "func": "prune_weight", "contains": "+admm", "n": 3 + 7},
    )
    cmd = [sys.executable, "-m", "rose", "run", "--config", str(config), "--no-eval", "-q"]
    killed = subprocess.run(cmd, env=hook.env(), cwd=REPO, capture_output=True)
    assert killed.returncode != 0 and hook.fired() is not None, killed.stdout[-2000:]
    resumed = tmp_path / "results" / "tiny"
    assert any(not (resumed / v / "model").exists() for v in VARIANTS)
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
    assert _digests(resumed) == _digests(run_dir)
    assert not list(resumed.rglob("hessians.h5"))
