"""End to end on a tiny random Llama: the workflow, the runner, the reassembled models, resume."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import TINY_VARIANTS as VARIANTS
from pipeline_utils import (
    REPO,
    kill_when,
    pruned_count,
    run_snakemake,
    snakemake_cmd,
    weights_digest,
    write_config,
)
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from rose import config as rose_config
from rose import runner

pytestmark = pytest.mark.e2e  # every test runs or reads a workflow run


@pytest.fixture(scope="module")
def workflow_run(tiny_workflow_run):
    """One Snakemake run (Python API) of every method at 50% and 2:4 (tests/conftest.py)."""
    return tiny_workflow_run


def test_workflow_equals_in_process_runner(workflow_run, tmp_path):
    run_dir, cfg_path = workflow_run
    cfg = rose_config.load(cfg_path, {"results_dir": str(tmp_path)})
    runner.run(cfg, evaluate=False, report=False)
    for variant in VARIANTS:
        assert weights_digest(run_dir, variant) == weights_digest(tmp_path / "tiny", variant), (
            variant
        )


def test_jobs_run_as_threads_hand_artifacts_over_in_memory(workflow_run):
    """The fixture runs jobs as threads of the controller (the workstation profile's
    setting): a layer's Hessians, order, prune and forward jobs take what the job before
    wrote from memory (rose.handoff), as each job's own log records."""
    run_dir, _ = workflow_run
    logs = run_dir / "logs" / "rose-0.5"
    for job, artifact in (
        ("layer_1/hessians.log", "layer_1/inputs.h5"),
        ("layer_1/order.log", "layer_1/hessians.h5"),
        ("layer_1/prune.log", "layer_1/order.h5"),
        ("layer_2/forward.log", "layer_1/pruned.safetensors"),  # layer 1's forward
        ("layer_2/forward.log", "layer_1/inputs.h5"),
    ):
        text = (logs / job).read_text()
        assert f"rose-0.5/{artifact}: taken from memory" in text, (job, text[-2000:])


def test_reassembled_layer_shards_are_the_pruned_layer_files(workflow_run):
    """A variant's pruned Linears are stored once: each pruned-layer file is hard-linked into the
    reassembled model as its shard of that layer, the index names every tensor's file, and
    transformers loads the directory (no model.safetensors, which it would load alone)."""
    run_dir, _ = workflow_run
    for variant in ("rose-0.5", "magnitude-2of4"):
        model = run_dir / variant / "model"
        manifest = json.loads((model / "pruning.json").read_text())
        index = json.loads((model / "model.safetensors.index.json").read_text())["weight_map"]
        assert not (model / "model.safetensors").exists()
        for layer in range(3):
            pruned = run_dir / variant / f"layer_{layer}" / "pruned.safetensors"
            shard = model / f"model-layer-{layer:05d}.safetensors"
            assert (shard.stat().st_dev, shard.stat().st_ino) == (
                pruned.stat().st_dev,
                pruned.stat().st_ino,
            )
            assert manifest["layer_shards"][shard.name] == "hard link"
            assert {n for n, f in index.items() if f == shard.name} == set(load_file(pruned))
        loaded = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
        state = loaded.state_dict()
        assert set(index) <= set(state) | {"lm_head.weight"}
        for layer in range(3):
            for name, tensor in load_file(
                run_dir / variant / f"layer_{layer}" / "pruned.safetensors"
            ).items():
                assert torch.equal(state[name], tensor), name


def test_intermediates_are_removed_by_default(workflow_run):
    run_dir, _ = workflow_run
    assert not list(run_dir.rglob("hessians.h5"))
    assert not list(run_dir.rglob("inputs.h5"))
    assert (
        len(list(run_dir.rglob("order.h5"))) == 3 * 4
    )  # rose and sparsegpt keep their diagnostics
    assert not [p for p in run_dir.rglob("*") if ".tmp-" in p.name]


def _linears(model):
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            yield name, module.weight.detach()


@pytest.mark.parametrize("variant", VARIANTS)
def test_reassembled_model_loads_with_expected_sparsity(workflow_run, tiny_llama_dir, variant):
    run_dir, _ = workflow_run
    model = AutoModelForCausalLM.from_pretrained(run_dir / variant / "model")
    dense = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    linears = dict(_linears(model))
    assert len(linears) == 3 * 7
    for name, weight in linears.items():
        zero = weight == 0
        if variant.endswith("2of4"):
            groups = zero.reshape(weight.shape[0], -1, 4).sum(-1)
            assert bool((groups >= 2).all()), f"{name}: a group of 4 with fewer than 2 zeros"
        else:
            assert 0.49 <= float(zero.float().mean()) <= 0.51, name
    # everything that is not a pruned Linear is the dense model's, and the head stays tied
    dense_state = dense.state_dict()
    for name, tensor in model.state_dict().items():
        if not any(name.startswith(lin) for lin in linears):
            assert torch.equal(tensor, dense_state[name]), name
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    logits = model(torch.randint(3, 256, (1, 16))).logits
    assert bool(torch.isfinite(logits).all())


def test_pruning_json_records_settings_and_per_linear_stats(workflow_run):
    run_dir, _ = workflow_run
    manifest = json.loads((run_dir / "rose-0.5" / "model" / "pruning.json").read_text())
    assert manifest["method"] == "rose" and manifest["sparsity"] == "0.5"
    assert (
        manifest["blocksize"] == 128
        and manifest["percdamp"] == 0.01
        and manifest["threshold"] == 0.5
    )
    assert manifest["calibration"]["nsamples"] == 6 and manifest["calibration"]["seqlen"] == 32
    assert {"torch", "transformers", "rose"} <= set(manifest["versions"])
    assert len(manifest["linears"]) == 21
    entry = manifest["linears"]["model.layers.1.mlp.down_proj"]
    for key in ("sparsity", "relative_range", "columnar", "reconstruction_error", "seconds"):
        assert key in entry
    assert entry["reconstruction_error"] > 0
    assert abs(manifest["achieved_sparsity"] - 0.5) < 0.01


def test_rose_equals_sparsegpt_where_no_layer_is_reordered(workflow_run):
    """ROSE differs from SparseGPT only in Linears it reorders."""
    run_dir, _ = workflow_run
    for layer in range(3):
        stats = json.loads((run_dir / "rose-0.5" / f"layer_{layer}" / "stats.json").read_text())[
            "linears"
        ]
        rose_w = load_file(run_dir / "rose-0.5" / f"layer_{layer}" / "pruned.safetensors")
        sgpt_w = load_file(run_dir / "sparsegpt-0.5" / f"layer_{layer}" / "pruned.safetensors")
        if layer == 0:  # same inputs, so untouched Linears must match bit for bit
            for name, entry in stats.items():
                if not entry["reordered"]:
                    key = f"model.layers.{layer}.{name}.weight"
                    assert torch.equal(rose_w[key], sgpt_w[key]), name


@pytest.mark.parametrize("kill_after", [0, 2, 4])
def test_kill_and_resume_gives_identical_weights(
    workflow_run, tmp_path, tiny_llama_dir, tiny_text_file, kill_after
):
    """SIGKILL the controller after `kill_after` pruned layers, rerun: same bytes as a clean run."""
    clean_dir, _ = workflow_run
    results = tmp_path / "results"
    cfg = write_config(
        tmp_path / "config.yaml",
        tiny_llama_dir,
        tiny_text_file,
        results,
        methods=["rose", "sparsegpt"],
        sparsities=[0.5],
    )
    targets = [str(results / "tiny" / v / "model") for v in ("rose-0.5", "sparsegpt-0.5")]
    ready = (
        (lambda: (results / "tiny" / "calib" / "tokens.h5").exists())
        if kill_after == 0
        else (lambda: pruned_count(results) >= kill_after)
    )
    killed = kill_when(snakemake_cmd(cfg, tmp_path, *targets), ready)
    # the kill landed mid-run: the controller was still working, and not every layer was pruned
    assert killed
    assert kill_after <= pruned_count(results) < 6
    assert not all((results / "tiny" / v / "model").exists() for v in ("rose-0.5", "sparsegpt-0.5"))
    subprocess.run(snakemake_cmd(cfg, tmp_path, "--unlock"), check=True, capture_output=True)
    run_snakemake(cfg, tmp_path, *targets)
    for variant in ("rose-0.5", "sparsegpt-0.5"):
        assert weights_digest(results / "tiny", variant) == weights_digest(clean_dir, variant)


def test_resume_after_intermediates_were_removed(
    workflow_run, tmp_path, tiny_llama_dir, tiny_text_file
):
    """Losing a finished layer's outputs regenerates the removed inputs behind it, bit-identically."""
    clean_dir, _ = workflow_run
    results = tmp_path / "results"
    cfg = write_config(
        tmp_path / "config.yaml",
        tiny_llama_dir,
        tiny_text_file,
        results,
        methods=["rose"],
        sparsities=[0.5],
    )
    target = str(results / "tiny" / "rose-0.5" / "model")
    run_snakemake(cfg, tmp_path, target)
    import shutil

    shutil.rmtree(results / "tiny" / "rose-0.5" / "model")
    for name in ("pruned.safetensors", "stats.json"):
        (results / "tiny" / "rose-0.5" / "layer_2" / name).unlink()
    run_snakemake(cfg, tmp_path, target)
    assert weights_digest(results / "tiny", "rose-0.5") == weights_digest(clean_dir, "rose-0.5")


def test_in_process_runner_resumes_after_kill(
    workflow_run, tmp_path, tiny_llama_dir, tiny_text_file
):
    clean_dir, _ = workflow_run
    results = tmp_path / "results"
    cfg = write_config(
        tmp_path / "config.yaml",
        tiny_llama_dir,
        tiny_text_file,
        results,
        methods=["rose"],
        sparsities=[0.5],
    )
    cmd = [
        str(Path(os.sys.executable)),
        "-m",
        "rose",
        "run",
        "--config",
        str(cfg),
        "--no-eval",
        "-q",
    ]
    killed = kill_when(cmd, lambda: pruned_count(results) >= 2, cwd=REPO)
    assert killed and 2 <= pruned_count(results) < 3  # interrupted mid-run
    assert not (results / "tiny" / "rose-0.5" / "model").exists()
    subprocess.run(cmd, check=True, capture_output=True, cwd=REPO)
    assert weights_digest(results / "tiny", "rose-0.5") == weights_digest(clean_dir, "rose-0.5")


def test_report_rule_and_snakemake_report(tmp_path, tiny_llama_dir, tiny_text_file):
    """The default target ends in the report; `snakemake --report` bundles it."""
    results = tmp_path / "results"
    text = {"kind": "file", "path": str(tiny_text_file), "split": "tail"}
    cfg = write_config(
        tmp_path / "config.yaml",
        tiny_llama_dir,
        tiny_text_file,
        results,
        methods=["rose", "magnitude"],
        sparsities=[0.5, 0.6],
        evaluation={
            "batch_size": 2,
            "perplexity": [{"name": "tail", "source": text, "seqlen": 32, "max_windows": 4}],
        },
    )
    out = run_snakemake(cfg, tmp_path)
    summary = (results / "tiny" / "report" / "summary.csv").read_text()
    for model in ("dense", "rose-0.5", "rose-0.6", "magnitude-0.5", "magnitude-0.6"):
        assert model in summary
    assert "| rose-0.5 |" in out.stdout  # printed at the end of the run
    plots = sorted(p.name for p in (results / "tiny" / "report" / "plots").glob("*.png"))
    assert plots == [
        "block_loss_heatmap.png",
        "perplexity_vs_sparsity.png",
        "reconstruction_error.png",
        "relative_range.png",
    ]
    run_snakemake(cfg, tmp_path, "--report", str(tmp_path / "report.zip"))
    assert (tmp_path / "report.zip").stat().st_size > 10_000
