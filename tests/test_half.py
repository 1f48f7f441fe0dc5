"""16-bit checkpoints (bfloat16, float16) end to end on CPU.

ROSE.md: the sweep runs in float32 whatever the model dtype, and the weights are
written back in the model's dtype. `model.dtype: auto` computes the layer forwards
in float32 on CPU; an explicit `bfloat16` / `float16` computes them in that dtype
(float16 on CPU included: every op the pipeline uses has a CPU half kernel in
torch >= 2.2). Either way the reassembled model must be a checkpoint of the same
dtype as the input, every tensor of it, half sparse, and loadable.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from pipeline_utils import write_config
from safetensors import safe_open
from tiny import make_tiny_model
from transformers import AutoModelForCausalLM

from rose import config as rose_config
from rose import runner

pytestmark = pytest.mark.e2e  # every test reads a half-precision run

VARIANTS = ("rose-0.5", "magnitude-0.5")
LINEAR_SUFFIXES = tuple(
    f"{n}.weight"
    for n in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
)
# A ROSE/SparseGPT block prunes exactly floor(p * numel) weights; an OBS update can
# also leave an unpruned weight at exactly 0 after rounding to 16 bits (it needs
# |w| below the format's smallest subnormal: never seen, tolerated up to 0.1%).
EXTRA_ZEROS = 1e-3


def _tensors(model_dir) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as fh:
            out.update({name: fh.get_tensor(name) for name in fh.keys()})
    return out


@pytest.fixture(scope="module", params=["bfloat16", "float16"])
def checkpoint(request, tmp_path_factory):
    dtype = getattr(torch, request.param)
    path = make_tiny_model(
        tmp_path_factory.mktemp(f"tiny_{request.param}"), family="llama", dtype=dtype
    )
    tensors = _tensors(path)
    assert tensors and {t.dtype for t in tensors.values()} == {dtype}  # really a 16-bit checkpoint
    return request.param, path, tensors


@pytest.fixture(scope="module", params=["auto", "explicit"])
def half_run(request, checkpoint, tmp_path_factory, tiny_text_file):
    name, path, tensors = checkpoint
    setting = "auto" if request.param == "auto" else name
    tmp = tmp_path_factory.mktemp(f"run_{name}_{request.param}")
    cfg = rose_config.load(
        write_config(
            tmp / "c.yaml",
            path,
            tiny_text_file,
            tmp / "results",
            model={"source": str(path), "dtype": setting},
            methods=["rose", "magnitude"],
            sparsities=[0.5],
        )
    )
    assert cfg.model.dtype == setting
    runner.run(cfg, evaluate=False, report=False)
    return getattr(torch, name), tensors, cfg.run_dir


@pytest.mark.parametrize("variant", VARIANTS)
def test_reassembled_model_keeps_the_checkpoint_dtype(half_run, variant):
    dtype, dense, run_dir = half_run
    pruned = _tensors(run_dir / variant / "model")
    assert sorted(pruned) == sorted(dense)
    for name, tensor in pruned.items():
        assert tensor.dtype == dtype, (name, tensor.dtype)
        assert tensor.shape == dense[name].shape, name
        if not name.endswith(LINEAR_SUFFIXES):  # embeddings and norms are copied, bit for bit
            assert torch.equal(tensor, dense[name]), name


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_linear_is_half_sparse(half_run, variant):
    dtype, dense, run_dir = half_run
    pruned = _tensors(run_dir / variant / "model")
    linears = [n for n in pruned if n.endswith(LINEAR_SUFFIXES)]
    assert len(linears) == 3 * 7
    zeros_total = numel_total = 0
    for name in linears:
        weight = pruned[name]
        zeros, numel = int((weight == 0).sum()), weight.numel()
        assert int((dense[name] == 0).sum()) == 0, name  # no zero to start with
        if variant.startswith("magnitude"):  # floor(p * numel) per matrix, nothing else moves
            assert zeros == math.floor(0.5 * numel), name
            assert torch.equal(weight[weight != 0], dense[name][weight != 0]), name
        else:
            assert math.floor(0.5 * numel) <= zeros <= (0.5 + EXTRA_ZEROS) * numel, (
                name,
                zeros,
                numel,
            )
            assert not torch.equal(weight, dense[name].masked_fill(weight == 0, 0)), (
                name
            )  # OBS updates
        zeros_total += zeros
        numel_total += numel
    manifest = json.loads((run_dir / variant / "model" / "pruning.json").read_text())
    assert manifest["achieved_sparsity"] == pytest.approx(zeros_total / numel_total, abs=1e-9)
    assert 0.5 <= manifest["achieved_sparsity"] <= 0.5 + EXTRA_ZEROS


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_pruned_model_loads_and_gives_finite_logits(half_run, variant):
    dtype, _, run_dir = half_run
    model = AutoModelForCausalLM.from_pretrained(run_dir / variant / "model", dtype="auto")
    assert model.dtype == dtype
    tokens = torch.randint(3, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(tokens).logits
    assert logits.dtype == dtype and logits.shape == (2, 24, 256)
    assert bool(torch.isfinite(logits).all())
    assert float(logits.float().std()) > 0
