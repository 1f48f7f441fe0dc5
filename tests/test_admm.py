"""The ADMM solver (rose/admm.py) and its methods against float64 references and their rules.

- A refit reaches, row by row, the least-squares optimum on the kept columns, never ends
  above its start, and keeps every method's mask bit for bit (unstructured, 2:4, 4:8).
- The admm method meets the exact count rule (per matrix; N of every M per row group),
  with ties to the lower index, and is bit-deterministic.
- Bad settings stop with one line naming the key; provenance changes only where ADMM decides.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from reference import prune_count, ref_objective, ref_support_optimum

from rose import config as rose_config
from rose.admm import AdmmSettings, admm_prune, ramp, refit, solver_units
from rose.artifacts import config_hash
from rose.methods import MethodName, method_names, prune_weight, reconstruction_error
from rose.provenance import run_identity, variant_settings
from rose.sparsity import Sparsity


def _problem(rows=24, cols=40, n=96, seed=0, correlated=0.4):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, cols, generator=g)
    X = X @ (torch.eye(cols) + correlated * torch.randn(cols, cols, generator=g))
    X[:, 3] = 0  # a dead input, as the sweep sees them
    H = X.T @ X / n
    W = torch.randn(rows, cols, generator=g)
    return W, H


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "magnitude"])
def test_refit_reaches_the_support_least_squares_optimum(seed, method):
    W, H = _problem(seed=seed)
    base = prune_weight(method, W, H, 0.6)
    out, stats = refit(W, base.weight, H, base.mask, AdmmSettings(cg_iterations=60))
    optimum = ref_support_optimum(W, H, base.mask)
    best, got = ref_objective(W, optimum, H), ref_objective(W, out, H)
    assert got <= best * (1 + 1e-4)  # float32 CG within 0.01% of the float64 optimum
    assert torch.allclose(out.double(), optimum, atol=2e-3, rtol=1e-3)
    assert stats.after <= stats.before and not stats.kept_start
    assert stats.residual < 1e-3


@pytest.mark.parametrize("seed", [0, 1])
def test_admm_iterations_alone_approach_the_optimum(seed):
    """The fixed-mask ADMM (W-step with the factor, projection, dual update) converges to the
    same optimum as CG, from SparseGPT's weights: within 1% after 30 iterations."""
    W, H = _problem(seed=seed)
    base = prune_weight("sparsegpt", W, H, 0.6)
    settings = AdmmSettings(refit_iterations=30, cg_iterations=0, rho=0.1, rho_growth=1.2)
    out, stats = refit(W, base.weight, H, base.mask, settings)
    best = ref_objective(W, ref_support_optimum(W, H, base.mask), H)
    assert ref_objective(W, out, H) <= best * 1.01
    assert stats.iterations == 30 and len(stats.penalties) == 30
    assert stats.penalties == sorted(stats.penalties)


@pytest.mark.parametrize(
    "settings",
    [
        AdmmSettings(refit_iterations=0, cg_iterations=1),
        AdmmSettings(refit_iterations=1, cg_iterations=0),
        AdmmSettings(refit_iterations=5, cg_iterations=3, rho=5.0),
        AdmmSettings(),
    ],
)
def test_a_refit_never_ends_above_its_start(settings):
    for seed in range(4):
        W, H = _problem(seed=seed, correlated=1.5)  # ill-conditioned
        base = prune_weight("sparsegpt", W, H, 0.7)
        out, stats = refit(W, base.weight, H, base.mask, settings)
        assert ref_objective(W, out, H) <= ref_objective(W, base.weight, H) * (1 + 1e-6)
        assert stats.after <= stats.before


def test_a_refit_that_would_end_higher_keeps_its_start():
    """Started at the optimum, rounding could only move it up: the start is returned as is."""
    W, H = _problem()
    base = prune_weight("sparsegpt", W, H, 0.5)
    optimum = ref_support_optimum(W, H, base.mask).float()
    out, stats = refit(W, optimum, H, base.mask, AdmmSettings(refit_iterations=1, rho=1e-3))
    assert ref_objective(W, out, H) <= ref_objective(W, optimum, H) * (1 + 1e-6)
    if stats.kept_start:
        assert torch.equal(out, optimum)


@pytest.mark.parametrize("method", ["rose", "sparsegpt", "wanda", "magnitude"])
@pytest.mark.parametrize("sparsity", ["0.5", "0.8", "2:4", "4:8"])
def test_refit_keeps_every_methods_mask_and_lowers_its_error(method, sparsity):
    W, H = _problem(rows=32, cols=64)
    plain = prune_weight(method, W, H, sparsity)
    refitted = prune_weight(f"{method}+admm", W, H, sparsity)
    assert torch.equal(refitted.mask, plain.mask)
    assert bool((refitted.weight[plain.mask] == 0).all())
    assert torch.equal(refitted.unrefitted, plain.weight)
    assert refitted.solver is not None and refitted.solver.kind == "refit"
    assert reconstruction_error(W, refitted.weight, H) <= reconstruction_error(
        W, plain.weight, H
    ) * (1 + 1e-6)


@pytest.mark.parametrize("start", ["dense", "sparsegpt", "rose"])
@pytest.mark.parametrize("fraction", [0.3, 0.6, 0.9])
def test_admm_prunes_exactly_the_count_of_the_matrix(start, fraction):
    W, H = _problem(seed=1)
    result = prune_weight("admm", W, H, fraction, _settings(start=start))
    assert int(result.mask.sum()) == prune_count(W.numel(), fraction)
    assert bool((result.weight[result.mask] == 0).all())
    assert result.solver.kind == "admm"


@pytest.mark.parametrize("start", ["dense", "sparsegpt"])
@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8), (1, 4)])
def test_admm_prunes_n_of_every_m_in_each_row_group(start, n, m):
    W, H = _problem(seed=2)
    result = prune_weight("admm", W, H, f"{n}:{m}", _settings(start=start))
    groups = result.mask.reshape(W.shape[0], -1, m).sum(-1)
    assert bool((groups == n).all())
    assert bool((result.weight[result.mask] == 0).all())


def test_admm_ties_go_to_the_lower_index_and_runs_are_bit_identical():
    """Equal weights on an identity Hessian: every magnitude ties, so the first count go."""
    W, H = torch.ones(8, 16), torch.eye(16)
    _, mask, _ = admm_prune(W, H, Sparsity(0.25), AdmmSettings(iterations=1, ramp_iterations=0))
    expected = torch.zeros(W.numel(), dtype=torch.bool)
    expected[: prune_count(W.numel(), 0.25)] = True
    assert torch.equal(mask.reshape(-1), expected)
    W, H = _problem(seed=3)
    a = prune_weight("admm", W, H, 0.6)
    b = prune_weight("admm", W, H, 0.6)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.mask, b.mask)


def test_admm_from_a_start_never_ends_above_it():
    for seed in range(3):
        W, H = _problem(seed=seed, correlated=1.0)
        for start in ("sparsegpt", "rose"):
            base = prune_weight(start, W, H, 0.7)
            result = prune_weight("admm", W, H, 0.7, _settings(start=start, iterations=3))
            assert ref_objective(W, result.weight, H) <= ref_objective(W, base.weight, H) * (
                1 + 1e-6
            )


def test_admm_beats_sparsegpt_on_a_correlated_layer():
    """What the solver is for: a lower layer-output error than SparseGPT's at 70%."""
    W, H = _problem(rows=48, cols=64, n=256, correlated=0.8)
    sparsegpt = reconstruction_error(W, prune_weight("sparsegpt", W, H, 0.7).weight, H)
    for method in ("admm", "sparsegpt+admm"):
        assert reconstruction_error(W, prune_weight(method, W, H, 0.7).weight, H) < sparsegpt


def test_the_ramp_is_cubic_and_reaches_the_target():
    assert ramp(0.7, 0, 10) == 0
    assert ramp(0.7, 5, 10) == pytest.approx(0.7 * (1 - 0.5**3))
    assert ramp(0.7, 10, 10) == ramp(0.7, 14, 10) == 0.7
    assert all(ramp(0.7, k, 10) <= ramp(0.7, k + 1, 10) for k in range(12))


# ---------------------------------------------------------------- names and settings


def test_method_names_and_the_schema_list_the_same_methods():
    enum = rose_config.schema()["properties"]["methods"]["items"]["enum"]
    assert sorted(enum) == sorted(method_names())
    assert MethodName.parse("rose+admm") == MethodName("rose", refit=True)
    assert MethodName.parse("rose+admm").needs_order
    assert MethodName.parse("magnitude+admm").needs_hessian
    assert not MethodName.parse("magnitude").needs_hessian


def _settings(**changes) -> object:
    from rose.methods import PruneSettings

    return PruneSettings(admm=dataclasses.replace(AdmmSettings(), **changes))


BASE = {
    "run": "r",
    "model": {"source": "m"},
    "calibration": {"source": {"kind": "wiki-offline"}, "nsamples": 2, "seqlen": 8},
    "methods": ["sparsegpt"],
    "sparsities": [0.7],
}


def _cfg(**changes):
    raw = copy.deepcopy(BASE)
    raw.update(changes)
    return rose_config.from_dict(raw)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"methods": ["dense+admm"]}, r"^config: methods\.0 = 'dense\+admm': dense has no refit"),
        ({"methods": ["admm+admm"]}, r"^config: methods\.0 = 'admm\+admm': admm has no refit"),
        ({"methods": ["foo+admm"]}, r"^config: methods\.0 = 'foo\+admm': unknown method"),
        ({"prune": {"admm": {"iterations": 0}}}, r"^config: prune\.admm\.iterations = 0: "),
        ({"prune": {"admm": {"rho": 0}}}, r"^config: prune\.admm\.rho = 0: "),
        ({"prune": {"admm": {"rho": -1.0}}}, r"^config: prune\.admm\.rho = -1\.0: "),
        ({"prune": {"admm": {"start": "wanda"}}}, r"^config: prune\.admm\.start = 'wanda': "),
        ({"prune": {"admm": {"step": 1}}}, r"^config: prune\.admm = .*'step' was unexpected"),
        ({"prune": {"admm": {"cg_iterations": -1}}}, r"^config: prune\.admm\.cg_iterations = -1: "),
    ],
)
def test_bad_admm_settings_stop_with_one_line_naming_the_key(changes, message):
    with pytest.raises(rose_config.ConfigError, match=message) as info:
        _cfg(**changes)
    assert "\n" not in str(info.value)


def test_admm_settings_decide_only_the_admm_variants_and_the_run_only_when_changed():
    plain = _cfg()
    both = _cfg(methods=["sparsegpt", "sparsegpt+admm", "admm"])
    assert [v.name for v in both.variants] == ["sparsegpt-0.7", "sparsegpt+admm-0.7", "admm-0.7"]
    assert both.raw["prune"]["admm"] == dataclasses.asdict(AdmmSettings())  # filled in: used
    assert "admm" not in plain.raw["prune"]
    hash_of = lambda cfg, name: config_hash(variant_settings(cfg, cfg.variant(name)))  # noqa: E731
    # adding ADMM variants with the defaults changes neither the plain variant nor the run
    assert hash_of(plain, "sparsegpt-0.7") == hash_of(both, "sparsegpt-0.7")
    assert run_identity(plain) == run_identity(both)
    tuned = _cfg(methods=["sparsegpt", "sparsegpt+admm", "admm"], prune={"admm": {"rho": 0.5}})
    assert hash_of(tuned, "sparsegpt-0.7") == hash_of(plain, "sparsegpt-0.7")
    assert hash_of(tuned, "admm-0.7") != hash_of(both, "admm-0.7")
    assert hash_of(tuned, "sparsegpt+admm-0.7") != hash_of(both, "sparsegpt+admm-0.7")
    assert run_identity(tuned) != run_identity(both)
    assert tuned.prune.admm.rho == 0.5


def test_the_plan_counts_the_solvers_work_and_memory():
    from rose.resources import stage_estimate

    size = {
        "parameters": 7e9,
        "num_layers": 32,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32000,
        "dtype": "float16",
        "model_type": "llama",
    }
    plain = stage_estimate("prune", BASE, size)
    refit = stage_estimate("prune", {**BASE, "methods": ["sparsegpt+admm"]}, size)
    admm = stage_estimate("prune", {**BASE, "methods": ["admm"]}, size)
    assert refit[0] > plain[0] and refit[1] > plain[1]
    assert admm[1] > refit[1]  # a sweep and 20 iterations against the refit's CG
    assert solver_units(AdmmSettings(), refit=True) < solver_units(AdmmSettings(), refit=False)


def test_the_documented_defaults_are_the_codes():
    """docs/configuration.md's prune.admm rows list AdmmSettings' defaults (one source)."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "configuration.md").read_text()
    documented: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("| `prune.admm."):
            keys, defaults = line.split("|")[1:3]
            names = [k.strip(" `").removeprefix("prune.admm.") for k in keys.split(",")]
            values = [v.strip(" `") for v in defaults.split(",")]
            documented.update(zip(names, values, strict=True))
    defaults = dataclasses.asdict(AdmmSettings())
    assert set(documented) == set(defaults)
    for key, value in defaults.items():
        assert documented[key] == (f"{value:g}" if isinstance(value, float) else str(value)), key
