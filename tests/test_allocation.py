"""Non-uniform sparsity: OWL's formula, its properties, its stages, and uniform runs untouched."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pipeline_utils import model_tensors, weights_digest, write_config
from safetensors.torch import load_file

from rose import allocation as alloc
from rose import config as rose_config
from rose import plan as graph
from rose import runner
from rose.config import ConfigError
from rose.model_info import ModelInfo
from rose.provenance import variant_settings
from rose.report import build_report
from rose.sparsity import prune_count

OWL_ENTRY = {"kind": "owl", "m": 5, "lambda": 0.1}

# ---------------------------------------------------------------- the formula


def plain_owl(densities, parameters, target, lam):
    """OWL written out element by element, as the paper states it."""
    low, high = min(densities), max(densities)
    scaled = []
    for d in densities:
        scaled.append(0.0 if high == low else (d - low) / (high - low) * 2 * lam)
    total = sum(parameters)
    mean = sum(s * p for s, p in zip(scaled, parameters, strict=True)) / total
    return [1 - (s - mean + 1 - target) for s in scaled]


def plain_density(weights, norms, m):
    scores = [
        abs(float(w[i, j])) * float(n[j])
        for w, n in zip(weights, norms, strict=True)
        for i in range(w.shape[0])
        for j in range(w.shape[1])
    ]
    mean = sum(scores) / len(scores)
    return sum(1 for s in scores if s > m * mean) / len(scores)


@pytest.mark.parametrize("sizes", ["equal", "unequal"])
def test_owl_sparsities_match_the_formula_written_out(sizes):
    rng = np.random.default_rng(0)
    for _ in range(20):
        layers = int(rng.integers(2, 40))
        densities = rng.uniform(0, 0.05, layers).tolist()
        parameters = (
            [1000] * layers if sizes == "equal" else rng.integers(500, 5000, layers).tolist()
        )
        target, lam = float(rng.uniform(0.3, 0.8)), float(rng.uniform(0.0, 0.15))
        got = alloc.owl_sparsities(densities, parameters, target, lam)
        assert got == pytest.approx(plain_owl(densities, parameters, target, lam), abs=1e-12)
    # equal sizes: the shift is OWL's plain mean, so the plain mean is the target
    got = alloc.owl_sparsities([0.01, 0.03, 0.02], [7, 7, 7], 0.7, 0.08)
    assert sum(got) / 3 == pytest.approx(0.7)
    assert got == pytest.approx([0.78, 0.62, 0.70])


def test_outlier_density_matches_the_definition_written_out():
    torch.manual_seed(0)
    weights = [torch.randn(7, 5), torch.randn(3, 5) * 4, torch.randn(6, 9)]
    norms = [torch.rand(5), torch.rand(5), torch.rand(9) * 3]
    for m in (0.5, 1.0, 2.0, 3.0):
        assert alloc.outlier_density(weights, norms, m) == plain_density(weights, norms, m)
    # the mean is over the whole layer: a matrix of large scores holds the outliers
    assert alloc.outlier_density(weights, norms, 2.0) > 0


densities_st = st.lists(
    st.floats(0, 1, allow_nan=False, allow_infinity=False), min_size=1, max_size=60
)


@settings(max_examples=300, deadline=None)
@given(
    densities=densities_st,
    sizes=st.data(),
    target=st.floats(0.0, 0.95),
    lam=st.floats(0.0, 0.49),
)
def test_owl_properties(densities, sizes, target, lam):
    parameters = sizes.draw(
        st.lists(st.integers(1, 10**9), min_size=len(densities), max_size=len(densities))
    )
    try:
        got = alloc.owl_sparsities(densities, parameters, target, lam)
    except alloc.AllocationError as exc:
        # refused only when some layer would leave [0, 1): say which, and the key
        assert "allocation" in str(exc) and "outside [0, 1)" in str(exc)
        plain = plain_owl(densities, parameters, target, lam)
        assert any(not (0 <= s < 1) for s in plain)
        return
    assert all(0.0 <= s < 1.0 for s in got)
    assert alloc.weighted_mean(got, parameters) == pytest.approx(target, abs=alloc.MEAN_TOLERANCE)
    assert max(got) - min(got) <= 2 * lam + 1e-12
    order = sorted(range(len(got)), key=lambda i: densities[i])
    for lower, higher in zip(order, order[1:], strict=False):
        # more outliers never means a higher sparsity
        assert got[higher] <= got[lower] + 1e-12


def test_owl_refuses_a_layer_pushed_out_of_range():
    with pytest.raises(alloc.AllocationError, match=r"allocation: layer 0 .* outside \[0, 1\)"):
        alloc.owl_sparsities([0.0, 1.0], [1, 1], 0.95, 0.1)


# ---------------------------------------------------------------- config


def _cfg(**extra):
    base = {
        "run": "x",
        "model": {"source": "pypi:smollm2"},
        "calibration": {"source": {"kind": "wiki-offline"}, "nsamples": 4, "seqlen": 8},
        "methods": ["rose", "wanda"],
        "sparsities": [0.7],
    }
    return rose_config.from_dict({**base, **extra})


def test_variant_names_show_the_allocation_and_uniform_is_unchanged():
    plain = _cfg()
    both = _cfg(allocation=["uniform", OWL_ENTRY, {"kind": "layers", "fractions": [0.5] * 30}])
    assert [v.name for v in plain.variants] == ["rose-0.7", "wanda-0.7"]
    assert [v.name for v in both.variants] == [
        "rose-0.7",
        "rose-owl-0.7",
        "rose-layers",
        "wanda-0.7",
        "wanda-owl-0.7",
        "wanda-layers",
    ]
    # a uniform variant's artifacts are stamped as before: existing run directories stay valid
    for name in ("rose-0.7", "wanda-0.7"):
        assert variant_settings(plain, plain.variant(name)) == variant_settings(
            both, both.variant(name)
        )
    assert "allocation" in variant_settings(both, both.variant("rose-owl-0.7"))


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            {"allocation": "owl", "sparsities": [0.5, "2:4"]},
            r"^config: sparsities = '2:4': an N:M target cannot be allocated per layer by allocation \(owl\)",
        ),
        (
            {"allocation": [{"kind": "layers", "fractions": [0.5, 1.0]}]},
            r"^config: allocation\.0\.fractions\.1 = 1\.0: ",
        ),
        (
            {"allocation": {"kind": "layers", "fractions": [-0.1]}},
            r"^config: allocation\.fractions\.0 = -0\.1: ",
        ),
        ({"allocation": {"kind": "owl", "lambda": 0.5}}, r"^config: allocation\.lambda = 0\.5: "),
        ({"allocation": {"kind": "owl", "m": 0}}, r"^config: allocation\.m = 0: "),
        ({"allocation": ["owl", {"kind": "owl"}]}, r"two entries are named 'owl'"),
        ({"allocation": {"kind": "owl", "fractions": [0.5]}}, r"allocation\.fractions: only for"),
    ],
)
def test_bad_allocations_are_one_line_errors_naming_the_key(extra, message):
    with pytest.raises(ConfigError, match=message) as info:
        _cfg(**extra)
    assert "\n" not in str(info.value)


def test_owl_entry_with_its_own_fractional_targets_beside_nm():
    cfg = _cfg(
        sparsities=[0.5, "2:4"], allocation=["uniform", {"kind": "owl", "sparsities": [0.7]}]
    )
    assert [v.name for v in cfg.variants if v.method == "rose"] == [
        "rose-0.5",
        "rose-2of4",
        "rose-owl-0.7",
    ]


def test_a_layers_list_of_the_wrong_length_is_refused_with_the_key(tmp_path):
    cfg = _cfg(allocation={"kind": "layers", "fractions": [0.5, 0.6]})
    info = ModelInfo(**{**_info_fields(), "prune_layers": 3})
    with pytest.raises(
        ConfigError,
        match=r"^config: allocation\.fractions has 2 values, the model prunes 3 decoder layers$",
    ):
        graph.Plan(cfg, info)


def _info_fields():
    import dataclasses

    return {f.name: None for f in dataclasses.fields(ModelInfo)}


# ---------------------------------------------------------------- the stages, end to end


METHODS = ["rose", "sparsegpt", "wanda", "magnitude"]


def _every_method_at_70(root: Path, model: Path, text: Path, **extra) -> Path:
    return write_config(
        root / "c.yaml", model, text, root / "results", methods=METHODS, sparsities=[0.7], **extra
    )


@pytest.fixture(scope="module")
def owl_run(tmp_path_factory, tiny_llama_dir, tiny_text_file):
    root = tmp_path_factory.mktemp("owl")
    path = _every_method_at_70(
        root, tiny_llama_dir, tiny_text_file, allocation=["uniform", OWL_ENTRY]
    )
    cfg = rose_config.load(path)
    runner.run(cfg, evaluate=False, report=True)
    return cfg, path


def _zeros_expected(method: str, shape: tuple[int, int], p: float, blocksize: int = 128) -> int:
    rows, cols = shape
    if method == "magnitude":
        return prune_count(rows * cols, p)
    if method == "wanda":
        return rows * prune_count(cols, p)
    widths = [min(blocksize, cols - s) for s in range(0, cols, blocksize)]
    return sum(prune_count(rows * w, p) for w in widths)


@pytest.mark.e2e
def test_owl_run_prunes_each_layer_to_exactly_its_allocated_sparsity(owl_run):
    cfg, _ = owl_run
    run_dir = cfg.run_dir
    record = json.loads((run_dir / "allocation" / "owl-0.7.json").read_text())
    fractions = [e["sparsity"] for e in record["layers"]]
    assert record["settings"] == {"kind": "owl", "name": "owl", "m": 5.0, "lambda": 0.1}
    assert len(fractions) == 3 and len(set(fractions)) == 3  # not uniform
    densities = [e["outlier_density"] for e in record["layers"]]
    assert fractions == pytest.approx(
        plain_owl(densities, [e["parameters"] for e in record["layers"]], 0.7, 0.1)
    )
    for method in ("rose", "sparsegpt", "wanda", "magnitude"):
        model = model_tensors(run_dir / f"{method}-owl-0.7" / "model")
        manifest = json.loads(
            (run_dir / f"{method}-owl-0.7" / "model" / "pruning.json").read_text()
        )
        for layer, fraction in enumerate(fractions):
            linears = {
                k: v
                for k, v in model.items()
                if k.startswith(f"model.layers.{layer}.") and "proj" in k
            }
            assert len(linears) == 7
            for name, weight in linears.items():
                zeros = int((weight == 0).sum())
                assert zeros == _zeros_expected(method, tuple(weight.shape), fraction), (
                    method,
                    name,
                )
            entry = manifest["layers"][layer]
            assert entry["target"] == fraction
            assert entry["achieved"] == pytest.approx(fraction, abs=0.01)
    # the uniform variants of the same run stay at the uniform target in every layer
    manifest = json.loads((run_dir / "rose-0.7" / "model" / "pruning.json").read_text())
    assert [e["target"] for e in manifest["layers"]] == [0.7, 0.7, 0.7]
    assert manifest["allocation"] == {"kind": "uniform"}


@pytest.mark.e2e
def test_outlier_statistics_are_the_dense_models_own(owl_run, tiny_llama_dir):
    """The statistics pass's densities against the whole transformers model's Linear inputs."""
    import h5py
    from transformers import AutoModelForCausalLM

    cfg, _ = owl_run
    with h5py.File(cfg.run_dir / "calib" / "tokens.h5", "r") as fh:
        tokens = torch.from_numpy(fh["tokens"][()].astype(np.int64))
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    sums: dict[str, torch.Tensor] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:

            def hook(_m, args, name=name):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                sums[name] = sums.get(name, 0) + (x * x).sum(0)

            hooks.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(tokens)
    for layer in range(3):
        names = [n for n in sums if n.startswith(f"model.layers.{layer}.")]
        weights = [model.get_submodule(n).weight.detach() for n in names]
        norms = [torch.sqrt(sums[n]) for n in names]
        record = json.loads(
            (cfg.run_dir / "dense" / f"layer_{layer}" / "outliers.json").read_text()
        )
        expected = alloc.outlier_density(weights, norms, 5.0)
        assert record["outlier_density"]["5"] == pytest.approx(
            expected, abs=3 / record["parameters"]
        )
        assert record["parameters"] == sum(w.numel() for w in weights)
    # intermediates of the dense pass are gone once used
    assert not list((cfg.run_dir / "dense").rglob("outputs.h5"))


@pytest.mark.e2e
def test_report_has_the_allocation_column_and_the_layer_sparsity_plot(owl_run):
    cfg, _ = owl_run
    header = (cfg.run_dir / "report" / "summary.csv").read_text().splitlines()
    assert header[0].split(",")[:4] == ["variant", "method", "sparsity", "allocation"]
    rows = {line.split(",")[0]: line.split(",")[3] for line in header[1:]}
    assert rows["rose-owl-0.7"] == "owl m=5 lambda=0.1" and rows["rose-0.7"] == "uniform"
    from rose.report import layer_sparsity_figure, load_manifest

    variants = [v.name for v in cfg.variants]
    fig = layer_sparsity_figure({v: load_manifest(cfg.run_dir, v) for v in variants})
    lines = fig.axes[0].get_lines()
    assert len(lines) == 2 * len(variants)  # achieved and target, per variant
    out = build_report(cfg.run_dir, variants, cfg.run_dir / "report")
    assert "layer_sparsity" in out["plots"]


@pytest.mark.e2e
def test_uniform_variants_are_byte_identical_with_and_without_owl_beside_them(
    owl_run, tmp_path, tiny_llama_dir, tiny_text_file
):
    plain = rose_config.load(_every_method_at_70(tmp_path, tiny_llama_dir, tiny_text_file))
    runner.run(plain, evaluate=False, report=False)
    cfg, _ = owl_run
    for method in ("rose", "sparsegpt", "wanda", "magnitude"):
        assert weights_digest(plain.run_dir, f"{method}-0.7") == weights_digest(
            cfg.run_dir, f"{method}-0.7"
        )
    # and OWL changed the weights it was meant to change
    assert weights_digest(cfg.run_dir, "rose-owl-0.7") != weights_digest(cfg.run_dir, "rose-0.7")


@pytest.mark.e2e
def test_a_layers_list_prunes_each_layer_to_its_fraction(tmp_path, tiny_llama_dir, tiny_text_file):
    path = write_config(
        tmp_path / "l.yaml",
        tiny_llama_dir,
        tiny_text_file,
        tmp_path / "results",
        methods=["magnitude"],
        allocation={"kind": "layers", "name": "ramp", "fractions": [0.2, 0.5, 0.8]},
    )
    cfg = rose_config.load(path)
    runner.run(cfg, evaluate=False, report=False)
    manifest = json.loads((cfg.run_dir / "magnitude-ramp" / "model" / "pruning.json").read_text())
    assert [e["target"] for e in manifest["layers"]] == [0.2, 0.5, 0.8]
    assert [round(e["achieved"], 3) for e in manifest["layers"]] == [0.2, 0.5, 0.8]
    assert not (cfg.run_dir / "dense").exists()  # no statistics pass without OWL


@pytest.mark.e2e
def test_kill_during_the_statistics_pass_resumes_to_the_same_bytes(
    owl_run, tmp_path, tiny_llama_dir, tiny_text_file
):
    from faults_utils import Hook, popen, rose_cmd

    cfg, path = owl_run
    config = yaml_copy(path, tmp_path / "kill.yaml", tmp_path / "results")
    hook = Hook(tmp_path / "hook", "kill", "h5-write", {"match": "/dense/layer_1/"})
    proc = popen(rose_cmd(["run", "--config", str(config), "--no-eval", "-q"]), env=hook.env())
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == -9, out
    assert hook.fired() is not None
    run_dir = tmp_path / "results" / "tiny"
    layer0 = run_dir / "dense" / "layer_0" / "outliers.json"
    assert layer0.exists() and not (run_dir / "dense" / "layer_1" / "outliers.json").exists()
    assert not (run_dir / "allocation").exists()
    before = layer0.stat().st_mtime_ns
    done = subprocess.run(
        [sys.executable, "-m", "rose", "run", "--config", str(config), "--no-eval", "-q"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert layer0.stat().st_mtime_ns == before  # layer 0's statistics were not redone
    resumed = json.loads((run_dir / "allocation" / "owl-0.7.json").read_text())
    clean = json.loads((cfg.run_dir / "allocation" / "owl-0.7.json").read_text())
    assert resumed["layers"] == clean["layers"]
    for variant in ("rose-owl-0.7", "wanda-owl-0.7", "rose-0.7"):
        assert weights_digest(run_dir, variant) == weights_digest(cfg.run_dir, variant)
    assert not list(run_dir.rglob("*.tmp-*"))


def yaml_copy(src: Path, dst: Path, results: Path) -> Path:
    import yaml

    data = yaml.safe_load(src.read_text())
    data["results_dir"] = str(results)
    data["methods"] = ["rose", "wanda"]
    dst.write_text(yaml.safe_dump(data))
    return dst


@pytest.mark.e2e
def test_lambda_too_large_for_the_target_stops_with_the_key(
    tmp_path, tiny_llama_dir, tiny_text_file
):
    path = write_config(
        tmp_path / "big.yaml",
        tiny_llama_dir,
        tiny_text_file,
        tmp_path / "results",
        methods=["magnitude"],
        sparsities=[0.95],
        allocation={"kind": "owl", "lambda": 0.3},
    )
    done = subprocess.run(
        [sys.executable, "-m", "rose", "run", "--config", str(path), "--no-eval", "-q"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert "allocation: layer" in last and "outside [0, 1)" in last, done.stderr[-2000:]
    assert not (tmp_path / "results" / "tiny" / "allocation" / "owl-0.95.json").exists()


@pytest.mark.e2e
@pytest.mark.parametrize(
    "family, calibrate_all", [("mixtral", True), ("qwen2_moe", False)], ids=["mixtral", "qwen2_moe"]
)
def test_owl_on_mixture_of_experts_counts_every_expert_matrix(
    tmp_path, tiny_text_file, family, calibrate_all
):
    """The statistics pass sees each routed expert through the Hessian stage's own hooks: every
    expert matrix counts in its layer's density, and each gets its layer's allocated fraction."""
    from tiny import make_tiny_model

    model_dir = make_tiny_model(tmp_path / family, family=family, num_layers=2)
    path = write_config(
        tmp_path / "moe.yaml",
        model_dir,
        tiny_text_file,
        tmp_path / "results",
        methods=["wanda"],
        sparsities=[0.6],
        allocation={"kind": "owl", "lambda": 0.15},
        moe={"calibrate_all_experts": calibrate_all},
    )
    cfg = rose_config.load(path)
    runner.run(cfg, evaluate=False, report=False)
    record = json.loads((cfg.run_dir / "allocation" / "owl-0.6.json").read_text())
    fractions = [e["sparsity"] for e in record["layers"]]
    assert fractions[0] != fractions[1]
    manifest = json.loads((cfg.run_dir / "wanda-owl-0.6" / "model" / "pruning.json").read_text())
    experts = [e for e in manifest["linears"].values() if e.get("expert") is not None]
    assert experts
    for layer, fraction in enumerate(fractions):
        entries = [e for e in manifest["linears"].values() if e["layer"] == layer]
        outliers = json.loads(
            (cfg.run_dir / "dense" / f"layer_{layer}" / "outliers.json").read_text()
        )
        assert outliers["parameters"] == sum(e["shape"][0] * e["shape"][1] for e in entries)
        for entry in entries:
            rows, cols = entry["shape"]
            assert entry["sparsity"] == pytest.approx(
                rows * prune_count(cols, fraction) / (rows * cols), abs=1e-6
            )


def _unreachable_expert(model_dir: Path, expert: int = 3) -> None:
    """Layer 0's router row of `expert` := the mean of experts 0 and 1's: with top-1 routing its
    logit never exceeds both of theirs, so no token is routed to it."""
    from safetensors.torch import save_file

    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    name = "model.layers.0.block_sparse_moe.gate.weight"
    router = tensors[name].clone()
    router[expert] = (router[0] + router[1]) / 2
    tensors[name] = router
    save_file(tensors, str(path), metadata={"format": "pt"})


def _routed_norms_by_hand(model_dir: Path, tokens: torch.Tensor, calibrate_all: bool = False):
    """Layer 0's input-column norms per unit, from the full transformers model: the inputs of
    its attention Linears (every token), and each expert's gate/up and down inputs recomputed
    from the MoE block's input and the router's top-k, routed tokens only (or every token).
    Root mean square over the tokens (zero for none). Nothing of rose's hooks or routing."""
    from transformers import AutoModelForCausalLM
    from transformers.activations import ACT2FN

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    config = model.config
    layer = model.model.layers[0]
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        layer.get_submodule(name).register_forward_pre_hook(
            lambda _m, args, name=name: seen.setdefault(name, args[0].detach())
        )
        for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp")
    ]
    with torch.no_grad():
        model(tokens)
    for hook in hooks:
        hook.remove()

    def rms(x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, x.shape[-1]).double()
        return (x * x).sum(0).div(max(x.shape[0], 1)).sqrt()

    norms = {name: rms(seen[name]) for name in ("self_attn.q_proj", "self_attn.o_proj")}
    x = seen["mlp"].reshape(-1, config.hidden_size).double()
    router = layer.mlp.gate.weight.detach().double()
    logits = x @ router.T
    k = config.num_experts_per_tok
    ranked = logits.sort(dim=-1, descending=True).values
    assert float((ranked[:, k - 1] - ranked[:, k]).min()) > 1e-6, "a near-tie: fragile routing"
    chosen = logits.topk(k, dim=-1).indices
    act = ACT2FN[config.hidden_act]
    stacked = layer.mlp.experts
    inter = stacked.gate_up_proj.shape[1] // 2
    counts = []
    for e in range(stacked.gate_up_proj.shape[0]):
        routed = (chosen == e).any(dim=-1)
        counts.append(int(routed.sum()))
        xe = x if calibrate_all else x[routed]
        gate_up = stacked.gate_up_proj[e].detach().double()
        mid = act(xe @ gate_up[:inter].T) * (xe @ gate_up[inter:].T)
        norms[f"expert {e} in"], norms[f"expert {e} mid"] = rms(xe), rms(mid)
    return norms, counts, x.shape[0]


@pytest.mark.parametrize("case", ["top-2", "unreachable expert"])
def test_owl_expert_statistics_are_over_the_tokens_routed_to_the_expert(
    tmp_path, tiny_text_file, monkeypatch, case
):
    """OWL's ||X_j|| is over the tokens a Linear sees: for a routed expert, the tokens its
    router sends it, even with moe.calibrate_all_experts (the default, which only decides the
    Hessians). The column norms the statistics pass measures equal a reference routed by hand
    from the full model, not the all-token norms; an expert no token reaches has zero norms,
    and the layer's density stays finite and is the definition's over those norms."""
    import h5py
    from tiny import make_tiny_model

    from rose import checkpoint as ck
    from rose import family
    from rose.layout import RunLayout

    model_dir = make_tiny_model(
        tmp_path / "mixtral",
        family="mixtral",
        num_layers=1,
        num_experts_per_tok=2 if case == "top-2" else 1,
    )
    if case == "unreachable expert":
        _unreachable_expert(model_dir)
    path = write_config(
        tmp_path / "c.yaml",
        model_dir,
        tiny_text_file,
        tmp_path / "results",
        methods=["wanda"],
        sparsities=[0.6],
        allocation={"kind": "owl", "m": 5},
        moe={"calibrate_all_experts": True},
    )
    cfg = rose_config.load(path)
    for stage in ("prepare_model", "capture_calibration", "embed_calibration"):
        graph.execute(cfg, stage)
    measured = []
    density = alloc.outlier_density

    def recording(weights, columns, m):
        measured.append((weights, columns))
        return density(weights, columns, m)

    monkeypatch.setattr(alloc, "outlier_density", recording)
    graph.execute(cfg, "outliers", {"layer": "0"})
    layout = RunLayout(cfg.run_dir)
    record = json.loads(layout.outliers(0).read_text())
    with h5py.File(layout.tokens, "r") as fh:
        tokens = torch.from_numpy(fh["tokens"][()].astype(np.int64))
    routed, counts, total = _routed_norms_by_hand(model_dir, tokens)
    everything, _, _ = _routed_norms_by_hand(model_dir, tokens, calibrate_all=True)
    assert sum(counts) == total * (2 if case == "top-2" else 1)
    assert (counts[3] == 0) == (case == "unreachable expert")

    checkpoint = ck.Checkpoint.open(model_dir)
    units = family.layer_units(
        checkpoint.config, 0, checkpoint.layer_names("model.layers.0."), False
    )
    weights, columns = measured[0]
    assert len(columns) == len(units.names())
    reference = []
    for name, got in zip(units.names(), columns, strict=True):
        unit = units.units[name]
        if unit.expert is None:
            key = "self_attn.o_proj" if name == "self_attn.o_proj" else "self_attn.q_proj"
        else:
            key = f"expert {unit.expert} {'mid' if unit.part == 'down' else 'in'}"
        want = routed[key]
        reference.append(want)
        torch.testing.assert_close(
            got.double(), want, rtol=1e-5, atol=1e-6 * float(want.abs().max() or 1.0), msg=name
        )
        if unit.expert is not None and counts[unit.expert] < total:
            # the all-token norms the pass used before: measurably different
            assert not torch.allclose(got.double(), everything[key], rtol=1e-3), name
        if unit.expert is not None and counts[unit.expert] == 0:
            assert torch.equal(got, torch.zeros_like(got)), name
    expected = alloc.outlier_density(weights, reference, 5.0)
    got = record["outlier_density"]["5"]
    assert math.isfinite(got) and 0 < got < 1
    assert got == pytest.approx(expected, abs=3 / record["parameters"])
