"""Exports (`rose.export`), model cards (`rose.model_card`) and the 2:4 inference benchmark.

Tiny models are pruned by the real pipeline (`rose.runner.run`), then exported
with the export stage (`rose.stages.export.export_variant`) directly:

- round trip of `dense` and `compressed` for unstructured 0.5 / 0.7, 2:4 and 4:8,
  float32 and bfloat16 weights: the weights read back from the compressed
  export (rose's reader and a model loaded from it) equal the dense export bit
  for bit, the sizes equal the format's arithmetic and are below dense, and a
  sparsity the format cannot beat (0) is exported anyway with a ratio above 1;
- the model card against pruning.json, the evaluation JSONs, the weights and export.json;
- a kill inside an export leaves nothing that looks finished, and the rerun is identical;
- bad input (unknown format, compressed-tensors missing, foreign or missing source) is
  one error line before anything is written;
- the benchmark says that no accelerated 2:4 path exists without a GPU, and exits 0.

Interop with other readers of the format (compressed-tensors' own compressors
and `from_pretrained` on transformers 4.x, which this venv cannot hold next to
transformers 5) is checked by `test_legacy_compressed_tensors_reads_the_export`
when ROSE_CT_LEGACY names a directory holding such a stack (see its docstring).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from faults_utils import Hook, kill_tree, popen, wait_for
from packaging.version import Version
from pipeline_utils import REPO, write_config
from safetensors import safe_open
from tiny import make_tiny_model

from rose import checkpoint as ck
from rose import cli, export, model_card
from rose import config as rose_config
from rose.artifacts import ArtifactError
from rose.checkpoint import Checkpoint
from rose.layout import RunLayout
from rose.model_info import ModelInfo
from rose.plan import Plan
from rose.runner import run
from rose.stages.export import export_variant

needs_ct = pytest.mark.skipif(
    importlib.util.find_spec("compressed_tensors") is None,
    reason="compressed-tensors not installed",
)
SPARSITIES = [0.5, 0.7, "2:4", "4:8"]
VARIANTS = ["magnitude-0.5", "magnitude-0.7", "magnitude-2of4", "magnitude-4of8"]

# ---------------------------------------------------------------- runs


def _prune(root: Path, name: str, dtype: torch.dtype, text: Path, sparsities: list, **extra):
    model = make_tiny_model(root / f"{name}-model", dtype=dtype)
    path = write_config(
        root / f"{name}.yaml",
        model,
        text,
        root / "results",
        run=name,
        methods=extra.pop("methods", ["magnitude"]),
        sparsities=sparsities,
        **extra,
    )
    cfg = rose_config.load(path)
    run(cfg, evaluate=bool(cfg.evaluation), report=False)
    return cfg


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_text_file):
    """Two pruned runs: float32 and bfloat16 weights (bf16 also at sparsity 0)."""
    root = tmp_path_factory.mktemp("export_runs")
    return {
        "float32": _prune(root, "fp32", torch.float32, tiny_text_file, SPARSITIES),
        "bfloat16": _prune(root, "bf16", torch.bfloat16, tiny_text_file, [0.0, *SPARSITIES]),
    }


def export_model(cfg, variant: str, fmt: str, out: Path, **kw) -> dict:
    """The export stage of one variant and format, written to `out`."""
    plan = Plan(cfg, ModelInfo.load(RunLayout(cfg.run_dir).model_json))
    ctx = plan.context("export", variant=variant, format=fmt)
    return export_variant(dataclasses.replace(ctx, outputs={"export_dir": Path(out)}), **kw)


def _export(cfg, variant: str, fmt: str, **kw) -> tuple[Path, dict]:
    out = cfg.run_dir / variant / "export" / fmt
    if not (out / export.EXPORT_RECORD).is_file():
        export_model(cfg, variant, fmt, out, **kw)
    return out, json.loads((out / export.EXPORT_RECORD).read_text())


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    checkpoint = Checkpoint.open(directory)
    return {name: checkpoint.read(name) for name in checkpoint.names()}


def _digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def _stored_bytes(weight: torch.Tensor, fmt: str) -> int:
    """What the format stores for one weight, from its definition."""
    rows, cols = weight.shape
    mask_bytes = rows * ((cols + 7) // 8)
    if fmt == export.SPARSE_24_BITMASK:
        return rows * cols // 2 * weight.element_size() + mask_bytes + 2 * 8
    nonzero = int(
        (
            weight.contiguous().view({2: torch.int16, 4: torch.int32}[weight.element_size()]) != 0
        ).sum()
    )
    return nonzero * weight.element_size() + mask_bytes + rows * 8 + 2 * 8


# ---------------------------------------------------------------- round trips


@pytest.mark.e2e
@needs_ct
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_round_trip_is_bit_identical_and_smaller(runs, dtype, variant):
    cfg = runs[dtype]
    dense_dir, dense_record = _export(cfg, variant, "dense")
    packed_dir, record = _export(cfg, variant, "compressed")
    model_dir = RunLayout(cfg.run_dir).model_dir(variant)
    dense = _tensors(dense_dir)
    assert next(iter(dense.values())).dtype == getattr(torch, dtype)

    # the dense export is the reassembled model, byte for byte
    for file in model_dir.glob("*.safetensors"):
        assert (dense_dir / file.name).read_bytes() == file.read_bytes()
    assert dense_record["sizes"]["ratio"] == 1.0 and dense_record["compression"] is None

    # rose's reader and a model built from the compressed export give the dense weights back exactly
    back = dict(export.decompressed_tensors(packed_dir))
    assert sorted(back) == sorted(dense)
    for name, tensor in dense.items():
        assert export.same_bits(back[name], tensor), name
    model = export.load_model(packed_dir)
    state = model.state_dict()
    for name, tensor in dense.items():
        assert export.same_bits(state[name], tensor), name

    # the config.json entry compressed-tensors reads
    fmt = export.SPARSE_24_BITMASK if variant.endswith("2of4") else export.SPARSE_BITMASK
    quant = json.loads((packed_dir / "config.json").read_text())["quantization_config"]
    linears = sorted(json.loads((model_dir / "pruning.json").read_text())["linears"])
    assert quant["quant_method"] == "compressed-tensors"
    assert quant["sparsity_config"]["format"] == fmt == record["compression"]
    assert (
        quant["sparsity_config"]["targets"] == linears and quant["sparsity_config"]["ignore"] == []
    )
    assert quant["sparsity_config"]["sparsity_structure"] == {"2of4": "2:4", "4of8": "4:8"}.get(
        variant.split("-")[1], "unstructured"
    )
    zeros = sum(int((t == 0).sum()) for t in dense.values())
    assert quant["sparsity_config"]["global_sparsity"] == pytest.approx(
        zeros / sum(t.numel() for t in dense.values())
    )
    with safe_open(str(packed_dir / "model.safetensors"), framework="pt") as fh:
        stored = set(fh.keys())
    for module in linears:
        assert (
            f"{module}.weight" not in stored
            and {f"{module}.{p}" for p in export.PARTS[fmt]} <= stored
        )

    # sizes: the file sizes, and the format's own arithmetic for the pruned Linears
    sizes = record["sizes"]
    weights = sum(p.stat().st_size for p in packed_dir.glob("*.safetensors"))
    dense_weights = sum(  # shards and index: the pruned-layer files linked in, and the rest
        p.stat().st_size for p in [*model_dir.glob("*.safetensors"), model_dir / ck.INDEX]
    )
    assert sizes["weights_bytes"] == weights and sizes["dense_weights_bytes"] == dense_weights
    assert sizes["ratio"] == pytest.approx(weights / dense_weights)
    assert sizes["linear_stored_bytes"] == sum(
        _stored_bytes(dense[f"{m}.weight"], fmt) for m in linears
    )
    assert sizes["ratio"] < 1 and sizes["smaller_than_dense"]
    sparsity = {"0.5": 0.5, "0.7": 0.7, "2of4": 0.5, "4of8": 0.5}[variant.split("-")[1]]
    element = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    # values + 1 bit per weight (+ 8 bytes per row of row offsets for the general bitmask)
    assert sizes["linear_ratio"] >= (1 - sparsity) + 1 / (8 * element)
    assert sizes["linear_ratio"] < (1 - sparsity) + 1 / (8 * element) + (
        0.03 if fmt == export.SPARSE_BITMASK else 0.001
    )
    assert export.verify_export(packed_dir)["variant"] == variant


@pytest.mark.e2e
@needs_ct
def test_sparsity_the_format_cannot_beat_is_exported_anyway(runs):
    cfg = runs["bfloat16"]
    out, record = _export(cfg, "magnitude-0", "compressed")
    assert record["sizes"]["ratio"] > 1 and not record["sizes"]["smaller_than_dense"]
    assert record["sizes"]["linear_ratio"] > 1
    back = dict(export.decompressed_tensors(out))
    for name, tensor in _tensors(RunLayout(cfg.run_dir).model_dir("magnitude-0")).items():
        assert export.same_bits(back[name], tensor), name
    assert "not smaller than the dense weights" in (out / "README.md").read_text()


@pytest.mark.e2e
@needs_ct
def test_sharded_export_round_trips_through_its_index(runs, tmp_path):
    cfg = runs["float32"]
    layout = RunLayout(cfg.run_dir)
    out = tmp_path / "sharded"
    record = export_model(cfg, "magnitude-0.7", "compressed", out, shard_bytes=400_000)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 2 and (out / "model.safetensors.index.json").is_file()
    assert record["files"].keys() >= set(shards)
    back = dict(export.decompressed_tensors(out))
    for name, tensor in _tensors(layout.model_dir("magnitude-0.7")).items():
        assert export.same_bits(back[name], tensor), name
    # a plain dense copy, by the command line
    assert cli.main(["export", "decompress", str(out), str(tmp_path / "plain")]) == 0
    plain = _tensors(tmp_path / "plain")
    assert "quantization_config" not in json.loads((tmp_path / "plain" / "config.json").read_text())
    for name, tensor in plain.items():
        assert export.same_bits(back[name], tensor), name


def test_compression_keeps_negative_zero_nan_and_short_groups():
    pytest.importorskip("compressed_tensors")
    weight = torch.tensor(
        [
            [1.5, 0.0, -0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
            [float("nan"), 2.0, 0.0, 0.0, 0.0, -3.0, 0.0, 0.0],
        ],
        dtype=torch.bfloat16,
    )
    for fmt in (export.SPARSE_BITMASK, export.SPARSE_24_BITMASK):
        parts = export.compress_weight(weight, fmt)
        assert export.same_bits(export.decompress_weight(parts, fmt), weight), fmt
    parts = export.compress_weight(weight, export.SPARSE_24_BITMASK)
    assert parts["compressed"].shape == (2, 4)  # every group of 4 stores exactly 2 values
    assert parts["bitmask"].dtype == torch.uint8 and parts["bitmask"].shape == (2, 1)
    with pytest.raises(
        export.ExportError, match=r"not 2:4 sparse \(row 0, columns 0-3 hold 3 nonzeros\)"
    ):
        export.compress_weight(torch.tensor([[1.0, 2.0, 3.0, 0.0]]), export.SPARSE_24_BITMASK, "w")


def _stack_without_sparse_compressors(transformers_version: str, ct_version: str) -> bool:
    """transformers >= 5 with compressed-tensors >= 0.15, compared as versions (as strings,
    "0.9" < "0.15" is False); a pre-release counts as its release (5.0.0rc1 as 5.0.0)."""
    return Version(transformers_version).release >= (5,) and Version(ct_version).release >= (0, 15)


@pytest.mark.parametrize(
    "transformers_version, ct_version, expected",
    [
        ("5.24.0", "0.20.1", True),
        ("5.0.0", "0.15.0", True),
        ("5.0.0", "0.15", True),
        ("5.0.0rc1", "0.15.0a20250101", True),  # pre-releases count as their release
        ("5.0.0", "0.9.1", False),  # "0.9.1" < "0.15" is False as strings
        ("5.0.0", "0.14.0", False),
        ("4.57.1", "0.20.1", False),
        ("10.0.0", "1.0.0", True),
    ],
)
def test_the_stack_check_compares_versions_as_numbers(transformers_version, ct_version, expected):
    assert _stack_without_sparse_compressors(transformers_version, ct_version) is expected


@pytest.mark.e2e
@needs_ct
def test_transformers_5_does_not_decompress_the_format(runs):
    """Why `rose.export.load_model` exists: compressed-tensors >= 0.15 dropped its sparse compressors,
    and transformers 5 loads the directory with the pruned Linears missing (initialised at random).
    If this starts to fail, a newer stack reads the format: update README.md and rose/model_card.py."""
    import compressed_tensors
    import transformers
    from transformers import AutoModelForCausalLM

    if not _stack_without_sparse_compressors(
        transformers.__version__, compressed_tensors.__version__
    ):
        pytest.skip("an older stack: test_legacy_compressed_tensors_reads_the_export covers it")
    cfg = runs["float32"]
    out, _ = _export(cfg, "magnitude-0.5", "compressed")
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    dense = _tensors(RunLayout(cfg.run_dir).model_dir("magnitude-0.5"))
    state = model.state_dict()
    linear = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(state[linear], dense[linear])


LEGACY_CHECK = r"""
import json, sys, torch, transformers
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.config import SparsityCompressionConfig
out = {}
for packed, dense_dir in json.loads(sys.argv[1]):
    quant = json.load(open(packed + "/config.json"))["quantization_config"]["sparsity_config"]
    dtype = json.load(open(dense_dir + "/config.json")).get("torch_dtype") or json.load(open(dense_dir + "/config.json")).get("dtype")
    key = "dtype" if tuple(map(int, transformers.__version__.split(".")[:2])) >= (4, 56) else "torch_dtype"
    dense = {}
    for shard in sorted(__import__("glob").glob(dense_dir + "/*.safetensors")):
        dense.update(load_file(shard))
    ours = load_file(packed + "/model.safetensors")
    config = SparsityCompressionConfig.load_from_registry(quant["format"], **quant)
    theirs = BaseCompressor.load_from_registry(quant["format"], config=config).compress(
        dict(dense), compression_targets=set(quant["targets"]))
    same_files = sorted(theirs) == sorted(ours) and all(
        theirs[k].dtype == ours[k].dtype and torch.equal(theirs[k], ours[k]) for k in ours)
    try:
        state = AutoModelForCausalLM.from_pretrained(packed, **{key: getattr(torch, dtype)}).state_dict()
        loaded = all(torch.equal(state[k].view(torch.uint8), v.contiguous().view(torch.uint8)) for k, v in dense.items())
    except Exception as exc:
        loaded = type(exc).__name__ + ": " + str(exc).splitlines()[0]
    out[packed] = {"same_tensors_as_compressed_tensors": same_files, "from_pretrained_bit_identical": loaded}
print("RESULT " + json.dumps(out))
"""


@pytest.mark.e2e
@needs_ct
@pytest.mark.skipif(
    not os.environ.get("ROSE_CT_LEGACY"),
    reason="set ROSE_CT_LEGACY to a legacy stack (see docstring)",
)
def test_legacy_compressed_tensors_reads_the_export(runs):
    """compressed-tensors' own compressor writes the same tensors, and transformers 4.x decompresses them.

    ROSE_CT_LEGACY: a directory put first on PYTHONPATH, holding transformers 4.x with a
    compressed-tensors that still has sparse compressors, e.g.
        pip install --no-deps --target /tmp/ct-legacy transformers==4.55.4 compressed-tensors==0.11.0 \
            huggingface-hub==0.34.4 tokenizers==0.21.4 frozendict
    (transformers 4.57 + compressed-tensors 0.14 also reads sparse-24-bitmask, but its
    sparse-bitmask loader fails on the meta device, for any checkpoint of that format)."""
    pairs = []
    for dtype in ("float32", "bfloat16"):
        cfg = runs[dtype]
        for variant in VARIANTS:
            packed, _ = _export(cfg, variant, "compressed")
            pairs.append([str(packed), str(RunLayout(cfg.run_dir).model_dir(variant))])
    env = {**os.environ, "PYTHONPATH": os.environ["ROSE_CT_LEGACY"]}
    result = subprocess.run(
        [sys.executable, "-c", LEGACY_CHECK, json.dumps(pairs)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    line = [x for x in result.stdout.splitlines() if x.startswith("RESULT ")]
    assert line, result.stderr[-3000:]
    for packed, found in json.loads(line[0][7:]).items():
        assert found == {
            "same_tensors_as_compressed_tensors": True,
            "from_pretrained_bit_identical": True,
        }, packed


MEMORY_PROBE = r"""
import json, re, sys, threading, time
from pathlib import Path
from rose import export
from rose.sparsity import Sparsity

def anon():
    return int(re.search(r"RssAnon:\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024

export._ct()  # imports first: only the export itself is measured
model_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
request = export.ExportRequest("magnitude-0.5", Sparsity(0.5), model_dir, "probe", "x")
peak, done = [0], []
def sample():
    while not done:
        peak[0] = max(peak[0], anon())
        time.sleep(0.001)
base = anon()
thread = threading.Thread(target=sample)
thread.start()
export.export_directory(request, "compressed", out)
done.append(1)
thread.join()
print("PEAK", peak[0] - base)
"""


def _pruned_dir(path: Path, layers: int) -> int:
    """A magnitude-0.5 model directory made by hand (no pipeline): hidden 384, MLP 1536; its weight bytes."""
    from safetensors.torch import load_file, save_file

    make_tiny_model(
        path,
        hidden_size=384,
        intermediate_size=1536,
        num_layers=layers,
        num_heads=6,
        num_kv_heads=6,
    )
    tensors = load_file(str(path / "model.safetensors"))
    linears = {}
    for name, tensor in tensors.items():
        if name.endswith("proj.weight"):
            cut = tensor.abs().flatten().kthvalue(tensor.numel() // 2).values
            tensor[tensor.abs() <= cut] = 0
            module = name.removesuffix(".weight")
            linears[module] = {
                "layer": int(name.split(".")[2]),
                "shape": list(tensor.shape),
                "sparsity": 0.5,
                "reordered": False,
            }
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "pruning.json").write_text(
        json.dumps(
            {
                "variant": "magnitude-0.5",
                "method": "magnitude",
                "sparsity": "0.5",
                "achieved_sparsity": 0.5,
                "model": {"source": "probe", "fingerprint": "probe"},
                "linears": linears,
                "pruned_layers": layers,
                "total_linears": len(linears),
                "reordered_linears": 0,
                "blocksize": 128,
                "percdamp": 0.01,
                "threshold": 0.5,
                "reorder": "adaptive",
                "prune_seconds": 0.0,
                "versions": {},
                "calibration": {"nsamples": 1, "seqlen": 1, "seed": 0, "source": {"kind": "file"}},
            }
        )
    )
    return sum(t.numel() * t.element_size() for t in tensors.values())


@needs_ct
def test_export_memory_is_flat_in_depth(tmp_path):
    """Peak extra memory of a compressed export: the same for 2 and 6 decoder layers (one tensor at a time).

    glibc keeps freed buffers of up to 32 MiB mapped unless its mmap threshold is fixed; with it fixed,
    resident anonymous memory follows live memory, which is what is measured."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_ARENA_MAX": "2"}
    peaks, sizes = {}, {}
    for layers in (2, 6):
        sizes[layers] = _pruned_dir(tmp_path / f"d{layers}", layers)
        result = subprocess.run(
            [
                sys.executable,
                "-c",
                MEMORY_PROBE,
                str(tmp_path / f"d{layers}"),
                str(tmp_path / f"o{layers}"),
            ],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=300,
            env=env,
        )
        assert result.returncode == 0, result.stderr[-2000:]
        peaks[layers] = int(result.stdout.split("PEAK")[1])
    assert sizes[6] > 2.5 * sizes[2] and sizes[6] > 55e6  # 3x the weights of the 2-layer model...
    assert peaks[6] < peaks[2] + 3e6  # ...the same peak: a few times its largest tensor (2.4 MB)
    assert peaks[6] < 0.25 * sizes[6]


# ---------------------------------------------------------------- the model card


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tiny_text_file):
    """A ROSE run with perplexity and zero-shot evaluation of dense and the variant, exported."""
    root = tmp_path_factory.mktemp("card_run")
    tasks = root / "tasks"
    _tiny_task(tasks)
    text = {"kind": "file", "path": str(tiny_text_file), "split": "tail"}
    cfg = _prune(
        root,
        "card",
        torch.float32,
        tiny_text_file,
        [0.5],
        methods=["rose"],
        evaluation={
            "batch_size": 2,
            "perplexity": [
                {"name": "tail", "source": text, "seqlen": 32, "max_windows": 4},
                {"name": "tail16", "source": text, "seqlen": 16, "max_windows": 3},
            ],
            "zero_shot": {
                "tasks": ["tiny_mc"],
                "limit": 12,
                "batch_size": 4,
                "task_dirs": [str(tasks)],
            },
        },
    )
    formats = (
        ["dense", "compressed"] if importlib.util.find_spec("compressed_tensors") else ["dense"]
    )
    return cfg, {fmt: _export(cfg, "rose-0.5", fmt) for fmt in formats}


def _tiny_task(directory: Path) -> None:
    import random

    rng = random.Random(0)
    directory.mkdir(parents=True)
    rows = []
    for _ in range(12):
        rows.append(
            {
                "context": " ".join(f"w{rng.randrange(253)}" for _ in range(5)),
                "choices": [" ".join(f"w{rng.randrange(253)}" for _ in range(2)) for _ in range(3)],
                "label": rng.randrange(3),
            }
        )
    data = directory / "tiny_mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (directory / "tiny_mc.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    validation: {data}\noutput_type: multiple_choice\nvalidation_split: validation\n"
        'doc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: label\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )


def _table(text: str, heading: str) -> list[list[str]]:
    """Rows of the first markdown table after `heading` (cells stripped, header and rule dropped)."""
    section = text.split(heading, 1)[1]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    block = []
    for line in section.splitlines()[section.splitlines().index(rows[0]) :]:
        if not line.startswith("|"):
            break
        block.append([c.strip() for c in line.strip("|").split("|")])
    return block[2:]


def _card_tables(text: str) -> tuple[list[list[str]], list[list[str]]]:
    evaluation = text.split("## Evaluation", 1)[1].split("## Per-layer", 1)[0]
    tables, current = [], []
    for line in evaluation.splitlines():
        if line.startswith("|"):
            current.append([c.strip() for c in line.strip("|").split("|")])
        elif current:
            tables.append(current[2:])
            current = []
    return tables[0], tables[1]


@pytest.mark.e2e
def test_model_card_numbers_equal_the_run_artifacts(evaluated):
    cfg, exports = evaluated
    run_dir = cfg.run_dir
    manifest = json.loads((RunLayout(run_dir).model_dir("rose-0.5") / "pruning.json").read_text())
    evals = {
        p.stem: json.loads(p.read_text()) for p in (run_dir / "rose-0.5" / "eval").glob("*.json")
    }
    dense_evals = {
        p.stem: json.loads(p.read_text()) for p in (run_dir / "dense" / "eval").glob("*.json")
    }
    assert sorted(evals) == ["perplexity-tail", "perplexity-tail16", "zero_shot"]
    weights = _tensors(RunLayout(run_dir).model_dir("rose-0.5"))
    for fmt, (out, record) in exports.items():
        text = (out / "README.md").read_text()
        meta = model_card.parse_front_matter(text)
        # front matter: the hub's model-card keys, and every number again, unrounded
        assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
        assert {"pruned", "sparsity", "rose"} <= set(meta["tags"])
        assert ("compressed-tensors" in meta["tags"]) == (fmt == "compressed")
        assert "base_model" not in meta  # a local directory is not a hub id
        results = {
            (r["dataset"]["name"], r["metrics"][0]["type"]): r["metrics"][0]["value"]
            for r in meta["model-index"][0]["results"]
        }
        want = {
            (n.removeprefix("perplexity-"), "perplexity"): e["value"]
            for n, e in evals.items()
            if n != "zero_shot"
        }
        want.update({(t, s["metric"]): s["value"] for t, s in evals["zero_shot"]["tasks"].items()})
        assert results == want

        # perplexity table: value, dense value, tokens, windows x seqlen
        ppl_rows, zs_rows = _card_tables(text)
        assert len(ppl_rows) == 2
        for row in ppl_rows:
            data, base = evals[f"perplexity-{row[0]}"], dense_evals[f"perplexity-{row[0]}"]
            assert row[1:5] == [
                f"{data['value']:.4f}",
                f"{base['value']:.4f}",
                str(data["tokens"]),
                f"{data['windows']} x {data['seqlen']}",
            ]
        # zero-shot table and mean
        zs, dense_zs = evals["zero_shot"], dense_evals["zero_shot"]
        task = zs["tasks"]["tiny_mc"]
        assert zs_rows[0] == [
            "tiny_mc",
            task["metric"],
            f"{task['value']:.4f}",
            f"{task['stderr']:.4f}",
            f"{dense_zs['tasks']['tiny_mc']['value']:.4f}",
            str(task["docs"]),
            task["source"],
        ]
        assert zs_rows[1][0] == "mean" and zs_rows[1][2] == f"{zs['mean']:.4f}"
        assert zs_rows[1][4] == f"{dense_zs['mean']:.4f}"
        assert (
            f"lm-eval {zs['lm_eval_version']}" in text and f"limit {zs['limit']} documents" in text
        )

        # pruning and calibration settings
        pruning = dict(row[:2] for row in _table(text, "## Pruning"))
        assert pruning["method"] == "rose" and pruning["allocation"] == "uniform"
        assert (
            pruning["achieved sparsity (pruned Linears)"] == f"{manifest['achieved_sparsity']:.4f}"
        )
        assert (
            pruning["reordered Linears (ROSE)"]
            == f"{manifest['reordered_linears']} of {manifest['total_linears']}"
        )
        assert pruning["pruned decoder layers"] == "3 of 3"
        calib = manifest["calibration"]
        assert (
            f"{calib['nsamples']} sequences x {calib['seqlen']} tokens = {calib['nsamples'] * calib['seqlen']} tokens"
            in text
        )

        # per-layer sparsity: counted here from the weights themselves
        layers = _table(text, "## Per-layer sparsity")
        assert [row[0] for row in layers] == ["0", "1", "2"]
        for row in layers:
            linear = [
                t
                for n, t in weights.items()
                if n.startswith(f"model.layers.{row[0]}.") and n.endswith("proj.weight")
            ]
            zeros, total = sum(int((t == 0).sum()) for t in linear), sum(t.numel() for t in linear)
            assert row[1:6] == [
                f"{zeros / total:.4f}",
                str(zeros),
                str(total),
                "7",
                str(
                    sum(
                        e["reordered"]
                        for e in manifest["linears"].values()
                        if e["layer"] == int(row[0])
                    )
                ),
            ]

        # sizes: those of export.json, which test_round_trip checks against the files
        sizes = dict((row[0], row[1:]) for row in _table(text, "## Files and size"))
        assert sizes["weights (safetensors)"][0].split()[0] == str(record["sizes"]["weights_bytes"])
        assert sizes["weights (safetensors)"][1] == f"{record['sizes']['ratio']:.4f}"
        assert set(record["evaluations"]) == {
            str(p.relative_to(run_dir))
            for m in ("rose-0.5", "dense")
            for p in (run_dir / m / "eval").glob("*.json")
        }
        assert ("from rose.export import load_model" in text) == (fmt == "compressed")


@pytest.mark.e2e
def test_model_card_refuses_evaluations_of_another_model(evaluated, tmp_path):
    cfg, _ = evaluated
    copy = tmp_path / "run"
    shutil.copytree(cfg.run_dir / "rose-0.5" / "eval", copy / "rose-0.5" / "eval")
    fingerprint = json.loads((cfg.run_dir / "model.json").read_text())["fingerprint"]
    assert model_card.collect_evaluations(copy, "rose-0.5", fingerprint)["perplexity"]
    path = copy / "rose-0.5" / "eval" / "perplexity-tail.json"
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "model_fingerprint": "0123456789abcdef"}))
    with pytest.raises(
        ArtifactError,
        match=r"perplexity-tail.json: evaluation of 'rose-0.5' \(model 0123456789abcdef\)",
    ):
        model_card.collect_evaluations(copy, "rose-0.5", fingerprint)
    path.write_text(json.dumps({**data, "variant": "dense"}))
    with pytest.raises(ArtifactError, match="expected 'rose-0.5'"):
        model_card.collect_evaluations(copy, "rose-0.5", fingerprint)


@pytest.mark.e2e
def test_model_card_of_the_reassembled_directory(evaluated, tmp_path):
    """`<variant>/model/`'s own card: everything but the evaluations, which read that directory."""
    cfg, _ = evaluated
    model_dir = tmp_path / "model"
    shutil.copytree(RunLayout(cfg.run_dir).model_dir("rose-0.5"), model_dir)
    model_card.write_model_card(
        model_dir, cfg.run_dir, "rose-0.5", evaluations_pending=True, run=cfg.run
    )
    text = (model_dir / "README.md").read_text()
    meta = model_card.parse_front_matter(text)
    assert "model-index" not in meta and meta["pipeline_tag"] == "text-generation"
    assert "The evaluations read this directory" in text and "## Per-layer sparsity" in text
    assert "AutoModelForCausalLM.from_pretrained" in text
    # the same directory with evaluations read from the run
    model_card.write_model_card(model_dir, cfg.run_dir, "rose-0.5", run=cfg.run)
    assert model_card.parse_front_matter((model_dir / "README.md").read_text())["model-index"]


def test_model_card_pure_function_cases():
    manifest = {
        "variant": "wanda-2of4",
        "method": "wanda",
        "sparsity": "2:4",
        "achieved_sparsity": 0.5,
        "blocksize": 128,
        "percdamp": 0.01,
        "threshold": 0.5,
        "reorder": "adaptive",
        "pruned_layers": 2,
        "calibration": {
            "nsamples": 4,
            "seqlen": 8,
            "seed": 0,
            "source": {"kind": "c4", "split": "train"},
        },
        "model": {"source": "pypi:smollm2", "fingerprint": "f"},
        "versions": {"rose": "0.1.0"},
        "prune_seconds": 1.0,
        "reordered_linears": 0,
        "total_linears": 2,
        "allocation": {"kind": "owl", "name": "owl", "m": 5.0, "lambda": 0.08},
        "layers": [
            {"layer": 0, "target": 0.55, "achieved": 0.5, "parameters": 32},
            {"layer": 1, "target": 0.3, "achieved": 0.25, "parameters": 64},
        ],
        "linears": {
            "model.layers.0.mlp.up_proj": {
                "layer": 0,
                "shape": [4, 8],
                "sparsity": 0.5,
                "reordered": False,
            },
            "model.layers.1.mlp.up_proj": {
                "layer": 1,
                "shape": [4, 16],
                "sparsity": 0.25,
                "reordered": True,
            },
        },
    }
    text = model_card.model_card_text(manifest, num_layers=30)
    meta = model_card.parse_front_matter(text)
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "semi-structured-sparsity" in meta["tags"] and "model-index" not in meta
    assert "| allocation | owl m=5 lambda=0.08 |" in text and "| 2-29 | not pruned |" in text
    # a non-uniform allocation puts each layer's own target beside its zeros
    assert "| layer | sparsity | target | zero weights |" in text
    assert "| 1 | 0.2500 | 0.3000 | 16 | 64 | 1 | 1 |" in text
    assert "This variant was not evaluated" in text
    assert model_card.base_model("meta-llama/Llama-2-7b-hf") == "meta-llama/Llama-2-7b-hf"
    assert (
        model_card.base_model("/data/models/llama") is None
        and model_card.base_model("./x/y") is None
    )


# ---------------------------------------------------------------- resume after a kill


@pytest.mark.e2e
@needs_ct
def test_kill_inside_an_export_leaves_nothing_trusted_and_rerun_is_identical(runs, tmp_path):
    cfg = runs["bfloat16"]
    out = tmp_path / "export" / "compressed"
    export_model(cfg, "magnitude-2of4", "compressed", out, shard_bytes=300_000)
    clean = _digests(out)
    shutil.rmtree(out)

    script = (
        "import sys; sys.path.insert(0, {tests!r}); from rose import config; "
        "from test_export import export_model; "
        f"cfg = config.load({str(cfg.run_dir.parent.parent / 'bf16.yaml')!r}); "
        f"export_model(cfg, 'magnitude-2of4', 'compressed', {str(out)!r}, shard_bytes=300_000)"
    ).replace("{tests!r}", repr(str(Path(__file__).parent)))
    hook = Hook(
        tmp_path / "hook",
        "kill",
        "call",
        {"module": "rose.export", "func": "_encode", "contains": "model.layers.2."},
    )
    proc = popen([sys.executable, "-c", script], env=hook.env())
    output = (
        kill_tree(proc)
        if not wait_for(lambda: proc.poll() is not None, 300)
        else proc.communicate()[0]
    )
    assert hook.fired() and "model.layers.2." in hook.fired()["where"], output
    assert proc.returncode == -9  # killed by the hook, mid-export
    assert not out.exists()
    partial = list(out.parent.glob("compressed.tmp-*"))
    assert len(partial) == 1  # the killed writer's temporary, never renamed into place
    assert (
        any(partial[0].glob("*.safetensors")) and not (partial[0] / export.EXPORT_RECORD).exists()
    )

    export_model(cfg, "magnitude-2of4", "compressed", out, shard_bytes=300_000)
    assert _digests(out) == clean
    assert not list(out.parent.glob("compressed.tmp-*"))  # the killed writer's temporary is gone
    export.verify_export(out)


@pytest.mark.e2e
def test_corrupt_export_is_detected(runs, tmp_path):
    cfg = runs["float32"]
    out, _ = _export(cfg, "magnitude-0.5", "dense")
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    shard = sorted(copy.glob("model-layer-*.safetensors"))[0]  # a pruned layer's, linked in
    shard.unlink()
    shutil.copy(out / shard.name, shard)  # unlink the hard link first
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x5A
    shard.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=f"{shard.name}: checksum mismatch"):
        export.verify_export(copy)
    assert cli.main(["export", "verify", str(out)]) == 0


# ---------------------------------------------------------------- bad input


@pytest.mark.e2e
def test_unknown_or_unavailable_format_is_one_line_before_any_work(runs, monkeypatch, tmp_path):
    with pytest.raises(export.ExportError) as info:
        export.check_formats(["dense", "zip"])
    assert str(info.value) == "export format 'zip' is unknown (known: dense, compressed)"
    with pytest.raises(export.ExportError, match="listed twice"):
        export.check_formats(["dense", "dense"])
    assert export.check_formats(
        ["dense", "compressed"] if export.compressed_tensors_available() else ["dense"]
    )

    cfg = runs["float32"]
    out = tmp_path / "zip"
    with pytest.raises(export.ExportError, match="'zip' is unknown"):
        export_model(cfg, "magnitude-0.5", "zip", out)
    assert not out.exists() and not list(tmp_path.iterdir())

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "compressed_tensors" else real(name, *a),
    )
    with pytest.raises(export.ExportError) as info:
        export.check_formats(["dense", "compressed"])
    assert "\n" not in str(info.value) and "pip install 'rose-pipeline[export]'" in str(info.value)
    assert export.check_formats(["dense"]) == ("dense",)
    with pytest.raises(export.ExportError, match="needs the compressed-tensors package"):
        export_model(cfg, "magnitude-0.5", "compressed", out)
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.e2e
def test_foreign_or_missing_source_is_refused(runs, tmp_path):
    cfg = runs["float32"]
    layout = RunLayout(cfg.run_dir)
    request = export.ExportRequest(
        variant="magnitude-0.5",
        sparsity=cfg.variant("magnitude-0.5").sparsity,
        model_dir=layout.model_dir("magnitude-0.7"),
        fingerprint=json.loads(layout.model_json.read_text())["fingerprint"],
        config_hash="x",
    )
    with pytest.raises(
        ArtifactError, match=re.escape("pruning.json: made for {'variant': 'magnitude-0.7'")
    ):
        export.export_directory(request, "dense", tmp_path / "out")
    missing = export.ExportRequest(**{**request.__dict__, "model_dir": tmp_path / "nowhere"})
    with pytest.raises(ArtifactError, match="no pruning.json"):
        export.export_directory(missing, "dense", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- the inference benchmark


BENCH = REPO / "benchmarks" / "bench_inference.py"


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="a GPU is present: the benchmark would measure"
)
def test_inference_benchmark_says_no_accelerated_path_without_a_gpu():
    result = subprocess.run(
        [sys.executable, str(BENCH)], capture_output=True, text=True, cwd=REPO, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "bench_inference: no accelerated 2:4 path on this machine"
    )
    assert "nothing measured" in lines[0] and "|" not in result.stdout


@pytest.mark.e2e
def test_inference_benchmark_harness_runs_in_check_mode(runs):
    model_dir = RunLayout(runs["float32"].run_dir).model_dir("magnitude-2of4")
    result = subprocess.run(
        [
            sys.executable,
            str(BENCH),
            "--check",
            "--model-dir",
            str(model_dir),
            "--batches",
            "1",
            "3",
            "--prompt",
            "8",
            "--new-tokens",
            "2",
            "--repeats",
            "1",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| magnitude-2of4 |")]
    assert [row.split("|")[2].strip() for row in rows] == ["1", "3"]
    assert all("| 21/21 | 0.00e+00 |" in row for row in rows)
    assert "check mode" in result.stdout and math.isfinite(float(rows[0].split("|")[4]))
