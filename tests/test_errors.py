"""Bad input: one line naming the problem, exit 1, and nothing a later run would trust."""

from __future__ import annotations

import subprocess

import pytest
from pipeline_utils import snakemake_cmd, write_config
from tiny import make_tiny_model

from rose.cli import main


def _run(capsys, cfg, *sets):
    args = ["run", "--config", str(cfg), "--no-eval", "-q"]
    for item in sets:
        args += ["--set", item]
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("rose: error:")]
    return code, errors


# the first four are refused by the runner's first stage (prepare_model, the calibration
# capture): those cases start a pipeline (e2e); the others are refused before it starts
E2E = pytest.mark.e2e
CASES = [
    pytest.param("model.source=/nonexistent/model", "no such model directory", marks=E2E),
    pytest.param("calibration.seqlen=1024", "exceeds the model's context (512 tokens)", marks=E2E),
    pytest.param("calibration.nsamples=5000", "fewer than nsamples x seqlen", marks=E2E),
    pytest.param("calibration.source.path=/nonexistent.txt", "does not exist", marks=E2E),
    ("sparsities=[1.2]", "sparsities.0 = 1.2"),
    ("sparsities=['3:2']", "N:M sparsity needs 0 < N < M, got 3:2"),
    ("sparsities=['2:0']", "N:M sparsity needs 0 < N < M, got 2:0"),
    ("prune.blocksize=0", "prune.blocksize"),
    ("methods=[obs]", "methods.0 = 'obs'"),
    ("mystery=1", "mystery"),
]


@pytest.mark.parametrize("override,message", CASES)
def test_bad_input_is_one_clear_line(
    capsys, tmp_path, tiny_llama_dir, tiny_text_file, override, message
):
    cfg = write_config(tmp_path / "c.yaml", tiny_llama_dir, tiny_text_file, tmp_path / "results")
    code, errors = _run(capsys, cfg, override)
    assert code == 1
    assert len(errors) == 1 and message in errors[0], errors
    run_dir = tmp_path / "results" / "tiny"
    assert not list(run_dir.rglob("*.h5")) and not list(run_dir.rglob("*.safetensors"))


@pytest.mark.e2e
def test_unsupported_architecture(capsys, tmp_path, tiny_text_file):
    from transformers import GPT2Config, GPT2LMHeadModel

    model_dir = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=256)).save_pretrained(
        model_dir
    )
    cfg = write_config(tmp_path / "c.yaml", model_dir, tiny_text_file, tmp_path / "results")
    code, errors = _run(capsys, cfg)
    assert code == 1 and "unsupported architecture 'gpt2'" in errors[0]
    assert not (tmp_path / "results" / "tiny" / "model.json").exists()


@pytest.mark.e2e
def test_model_config_mismatch(capsys, tmp_path, tiny_text_file):
    """A config whose widths the weights do not have."""
    import json

    model_dir = make_tiny_model(tmp_path / "m")
    config = json.loads((model_dir / "config.json").read_text())
    config["intermediate_size"] = 400
    (model_dir / "config.json").write_text(json.dumps(config))
    cfg = write_config(
        tmp_path / "c.yaml", model_dir, tiny_text_file, tmp_path / "results", methods=["magnitude"]
    )
    code, errors = _run(capsys, cfg)
    assert (
        code == 1
        and "model/config mismatch: layer 0 mlp.gate_proj.weight has shape (328, 200)" in errors[0]
    ), errors


@pytest.mark.e2e
def test_changed_config_on_an_existing_run_is_refused(
    capsys, tmp_path, tiny_llama_dir, tiny_text_file
):
    cfg = write_config(
        tmp_path / "c.yaml",
        tiny_llama_dir,
        tiny_text_file,
        tmp_path / "results",
        methods=["magnitude"],
    )
    assert _run(capsys, cfg)[0] == 0
    code, errors = _run(capsys, cfg, "calibration.seed=7")
    assert code == 1 and "calibration.seed = 0" in errors[0] and "7" in errors[0]


def test_snakemake_reports_bad_config_in_one_line(tmp_path, tiny_llama_dir, tiny_text_file):
    cfg = write_config(
        tmp_path / "c.yaml", tiny_llama_dir, tiny_text_file, tmp_path / "results", sparsities=[1.5]
    )
    result = subprocess.run(snakemake_cmd(cfg, tmp_path, "-n"), capture_output=True, text=True)
    assert result.returncode != 0
    assert (
        "config: sparsities.0 = 1.5: a sparsity is a fraction in [0, 1)"
        in result.stdout + result.stderr
    )
