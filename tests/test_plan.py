"""The task graph (rose.plan): steps, paths, Snakemake patterns, resume walk-back, intermediates."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from rose import plan as graph
from rose.config import from_dict
from rose.layout import RunLayout
from rose.model_info import ModelInfo

DEPTH = 4


def _cfg(tmp_path: Path, **extra):
    raw = {
        "run": "p",
        "results_dir": str(tmp_path),
        "model": {"source": "unused"},
        "calibration": {"source": {"kind": "file", "path": "x.txt"}, "nsamples": 2, "seqlen": 8},
        "methods": ["rose", "wanda", "magnitude"],
        "sparsities": [0.5, "2:4"],
        "evaluation": {
            "perplexity": [{"name": "a", "source": {"kind": "file", "path": "x.txt"}}],
            "zero_shot": {"tasks": ["piqa"]},
        },
    }
    raw.update(extra)
    return from_dict(raw)


def _info(depth: int = DEPTH) -> ModelInfo:
    return ModelInfo(
        path="/m",
        source="unused",
        fingerprint="f",
        model_type="llama",
        num_layers=depth,
        prune_layers=depth,
        hidden_size=8,
        max_positions=None,
        dtype="float32",
        parameters=1,
    )


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")


def test_step_counts_per_stage(tmp_path):
    plan = graph.Plan(_cfg(tmp_path), _info())
    counts = Counter(s.stage for s in plan.steps())
    # rose: hessians+order+prune per layer, forward for layers 1..3; wanda: no order; magnitude:
    # prune only; layer 0's Hessians once for every variant
    assert counts == {
        "prepare_model": 1,
        "capture_calibration": 1,
        "embed_calibration": 1,
        "shared_hessians": 1,
        "hessians": 2 * 2 * (DEPTH - 1),
        "order": 2 * DEPTH,
        "prune": 3 * 2 * DEPTH,
        "forward": 2 * 2 * (DEPTH - 1),
        "assemble": 6,
        "evaluate_perplexity": 7,
        "evaluate_zero_shot": 7,
        "export": 6,  # the default format, dense, per variant
        "report": 1,
    }


def test_steps_are_in_dependency_order_and_every_input_has_a_producer(tmp_path):
    plan = graph.Plan(_cfg(tmp_path), _info())
    steps = plan.steps()
    made = set()
    for step in steps:
        for path in step.input_paths():
            assert path in made, f"{step.describe()} reads {path} before anything makes it"
        made.update(step.outputs.values())
    assert len(graph.producers(steps)) == sum(len(s.outputs) for s in steps)  # no path made twice


def test_snakemake_patterns_are_the_concrete_paths(tmp_path):
    plan = graph.Plan(_cfg(tmp_path), _info())
    for step in plan.steps():
        patterns = plan.output_patterns(step.stage)
        for name, path in step.outputs.items():
            assert patterns[name].format(**dict(step.wildcards)) == str(path)
        assert plan.log_pattern(step.stage).format(**dict(step.wildcards)) == str(
            plan.log_path(step.stage, dict(step.wildcards))
        )


def test_layer0_inputs_and_hessians_are_shared_and_later_ones_are_per_variant(tmp_path):
    plan = graph.Plan(_cfg(tmp_path), _info())
    L = RunLayout(plan.cfg.run_dir)
    shared = plan.step("shared_hessians")
    assert shared.inputs["inputs"] == L.run_dir / "calib" / "inputs.h5"
    assert shared.outputs["hessians"] == L.run_dir / "calib" / "hessians.h5"
    for variant in ("rose-0.5", "rose-2of4", "wanda-0.5"):
        for stage in ("order", "prune") if variant != "wanda-0.5" else ("prune",):
            inputs = plan.inputs(stage, {"variant": variant, "layer": "0"})
            assert inputs["hessians"] == shared.outputs["hessians"]
        assert plan.inputs(stage, {"variant": variant, "layer": "1"})["hessians"] == (
            L.layer_dir(variant, 1) / "hessians.h5"
        )
    assert not [
        s for s in plan.steps() if s.stage == "hessians" and dict(s.wildcards)["layer"] == "0"
    ]
    # the shared file is an intermediate: it goes once every variant's layer 0 has read it
    readers = graph.consumers(plan.steps())[shared.outputs["hessians"]]
    assert {dict(r.wildcards)["variant"] for r in readers} == {
        v for v in plan.variants if not v.startswith("magnitude")
    }
    forward = plan.step("forward", variant="rose-0.5", layer=2)
    assert forward.inputs["inputs"] == L.layer_dir("rose-0.5", 1) / "inputs.h5"
    assert forward.inputs["pruned"] == L.pruned("rose-0.5", 1)
    assert forward.outputs["inputs"] == L.layer_dir("rose-0.5", 2) / "inputs.h5"
    assert set(plan.inputs("prune", {"variant": "magnitude-0.5", "layer": "1"})) == {"model"}
    assert set(plan.inputs("prune", {"variant": "wanda-0.5", "layer": "1"})) == {
        "model",
        "hessians",
    }
    assert set(plan.inputs("prune", {"variant": "rose-0.5", "layer": "1"})) == {
        "model",
        "hessians",
        "order",
    }
    assert "model_dir" not in plan.inputs("evaluate_perplexity", {"model": "dense", "metric": "a"})


def test_temporaries_follow_keep_intermediates(tmp_path):
    temp = {p.name for s in graph.Plan(_cfg(tmp_path), _info()).steps() for p in s.temporary}
    assert temp == {"inputs.h5", "hessians.h5"}
    kept = graph.Plan(_cfg(tmp_path, keep_intermediates=True), _info()).steps()
    assert not any(s.temporary for s in kept)


def test_resume_walks_back_only_to_the_last_inputs_on_disk(tmp_path):
    """A run that died at layer 6 of 8: layers 0-5 pruned, inputs of layer 4 kept (5's removed
    by a kill between steps): only forward 5..6 and layer 6 onwards run, nothing of layers 0-4."""
    cfg = _cfg(tmp_path, methods=["rose"], sparsities=[0.5], evaluation=None, export=None)
    plan = graph.Plan(cfg, _info(8))
    L = plan.layout
    for path in (L.model_json, L.tokens):
        _touch(path)
    for layer in range(6):
        _touch(L.pruned("rose-0.5", layer))
        _touch(L.stats("rose-0.5", layer))
        _touch(L.order("rose-0.5", layer))
    _touch(L.inputs("rose-0.5", 4))
    steps = plan.steps(report=False)
    need = graph.needed_steps(steps, plan.targets(report=False))
    ran = sorted(graph.Step(*key, {}, {}, frozenset()).describe() for key in need)
    expected = {
        "assemble variant=rose-0.5",
        "forward variant=rose-0.5 layer=5",
        "forward variant=rose-0.5 layer=6",
        "forward variant=rose-0.5 layer=7",
    }
    expected |= {
        f"{s} variant=rose-0.5 layer={i}" for s in ("hessians", "order", "prune") for i in (6, 7)
    }
    assert set(ran) == expected
    assert not any(("layer=4" in r or "embed" in r or "capture" in r) for r in ran)


def test_nothing_runs_on_a_finished_run_and_a_missing_target_with_no_producer_is_named(tmp_path):
    cfg = _cfg(tmp_path, methods=["magnitude"], sparsities=[0.5], evaluation=None, export=None)
    plan = graph.Plan(cfg, _info(2))
    _touch(plan.layout.model_dir("magnitude-0.5"))
    steps = plan.steps(report=False)
    assert graph.needed_steps(steps, plan.targets(report=False)) == set()
    with pytest.raises(FileNotFoundError, match="no step of this run produces it"):
        graph.needed_steps(steps, [tmp_path / "elsewhere.h5"])


def test_consumed_intermediates_are_removed_only_when_every_reader_is_complete(tmp_path):
    cfg = _cfg(tmp_path, methods=["rose"], sparsities=[0.5], evaluation=None)
    plan = graph.Plan(cfg, _info(3))
    L = plan.layout
    _touch(L.hessians("rose-0.5", 1))  # read by order and prune of layer 1
    _touch(L.inputs("rose-0.5", 1))  # read by hessians 1 and forward 2
    _touch(L.order("rose-0.5", 1))
    assert graph.remove_consumed_intermediates(plan.steps(report=False)) == []
    _touch(L.pruned("rose-0.5", 1))
    _touch(L.stats("rose-0.5", 1))
    removed = graph.remove_consumed_intermediates(plan.steps(report=False))
    assert removed == [L.hessians("rose-0.5", 1)]  # inputs 1 still feed forward 2 (not done)
    assert L.inputs("rose-0.5", 1).exists()
    _touch(L.inputs("rose-0.5", 2))
    assert graph.remove_consumed_intermediates(plan.steps(report=False)) == [
        L.inputs("rose-0.5", 1)
    ]


def test_depth_dependent_steps_need_model_json(tmp_path):
    plan = graph.Plan(_cfg(tmp_path))
    assert (
        plan.inputs("hessians", {"variant": "rose-0.5", "layer": "3"})["inputs"].name == "inputs.h5"
    )
    with pytest.raises(RuntimeError, match="prepare_model"):
        plan.steps()


def test_exports_follow_their_variant_evaluations_and_feed_the_report(tmp_path):
    cfg = _cfg(tmp_path, export={"formats": ["dense", "compressed"]})
    plan = graph.Plan(cfg, _info())
    L = plan.layout
    step = plan.step("export", variant="wanda-2of4", format="compressed")
    assert step.outputs == {"export_dir": L.export_dir("wanda-2of4", "compressed")}
    assert step.inputs["model_dir"] == L.model_dir("wanda-2of4")
    assert set(step.inputs["evals"]) == {L.perplexity(m, "a") for m in ("dense", "wanda-2of4")} | {
        L.zero_shot(m) for m in ("dense", "wanda-2of4")
    }
    report = plan.step("report")
    assert L.export_dir("rose-0.5", "dense") in report.inputs["exports"]
    assert "export" not in {s.stage for s in plan.steps(evaluate=False)}
    assert (
        plan.log_path("export", {"variant": "rose-0.5", "format": "dense"}).name
        == "export-dense.log"
    )
