"""Evaluation stages (perplexity, zero-shot) and the report over all of them.

The stages are given a model name, "dense" or a variant, and resolve its
directory here: this is the one place that knows the dense model is the
prepared checkpoint itself, not a reassembled copy.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from rose import data
from rose.artifacts import atomic_write_json
from rose.config import RunConfig
from rose.layout import DENSE, RunLayout
from rose.model_info import ModelInfo
from rose.sizing import EVAL_JSON, MB, REPORT, REPORT_PER_VARIANT, blocks
from rose.stages.spec import EVALUATE, Stage, StageContext
from rose.stages.spec import REPORT as REPORT_PHASE


def _model_dir(cfg: RunConfig, info: ModelInfo, model_name: str) -> Path:
    """The dense model is the prepared checkpoint; a variant is its reassembled directory."""
    if model_name == DENSE:
        return Path(info.path)
    cfg.variant(model_name)  # refuses a name that is not a variant of this config
    return RunLayout(cfg.run_dir).model_dir(model_name)


def evaluate_perplexity(ctx: StageContext) -> dict[str, Any]:
    """Token-level perplexity of one model on one evaluation text (paper protocol)."""
    from rose import evaluate  # lm-eval and its stack: only for the evaluation steps

    cfg, info = ctx.cfg, ctx.model_info
    model_name, metric_name = ctx.wildcards["model"], ctx.wildcards["metric"]
    if cfg.evaluation is None:
        raise ValueError("evaluation is off in this config")
    spec = next((p for p in cfg.evaluation.perplexity if p.name == metric_name), None)
    if spec is None:
        raise ValueError(f"no perplexity evaluation named {metric_name!r} in the config")
    model_dir = _model_dir(cfg, info, model_name)
    if info.max_positions and spec.seqlen > info.max_positions:
        raise ValueError(
            f"evaluation {metric_name}: seqlen {spec.seqlen} exceeds the model's context ({info.max_positions})"
        )
    tokenizer = data.tokenizer_for(Path(info.path), trust_remote_code=cfg.model.trust_remote_code)
    windows = data.eval_windows(tokenizer, spec.source, spec.seqlen, spec.max_windows)
    protocol = {
        "source": asdict(spec.source),
        "seqlen": spec.seqlen,
        "windows": int(windows.shape[0]),
        "max_windows": spec.max_windows,
        "definition": "exp(mean token NLL) over non-overlapping windows",
    }
    result = evaluate.perplexity_report(
        model_dir,
        metric_name,
        windows,
        cfg.evaluation.batch_size,
        ctx.device,
        protocol,
    )
    result["variant"] = model_name
    result["model_fingerprint"] = info.fingerprint
    atomic_write_json(ctx.outputs["result"], result)
    return result


def evaluate_zero_shot(ctx: StageContext) -> dict[str, Any]:
    """lm-eval zero-shot accuracy of one model (acc_norm where the task has it)."""
    from rose import evaluate  # lm-eval and its stack: only for the evaluation steps

    cfg, info, model_name = ctx.cfg, ctx.model_info, ctx.wildcards["model"]
    if cfg.evaluation is None or cfg.evaluation.zero_shot is None:
        raise ValueError("zero-shot evaluation is off in this config")
    model_dir = _model_dir(cfg, info, model_name)
    result = evaluate.zero_shot_report(model_dir, cfg.evaluation.zero_shot, ctx.device)
    result["variant"] = model_name
    result["model_fingerprint"] = info.fingerprint
    atomic_write_json(ctx.outputs["result"], result)
    return result


def build_report(ctx: StageContext) -> dict[str, Any]:
    """summary.csv / summary.md and the plots for every variant plus dense."""
    from rose import report  # matplotlib: only for the report step

    layout = ctx.layout
    return report.build_report(
        layout.run_dir, [v.name for v in ctx.cfg.variants], layout.report_dir
    )


def _model_dir_input(plan, w) -> dict:
    """dense is the prepared checkpoint that model.json names; a variant its reassembled model."""
    return {} if w["model"] == DENSE else {"model_dir": plan.layout.model_dir(w["model"])}


def _evaluation_estimate(tokens: str):
    def estimate(f) -> tuple[float, float]:
        scored = getattr(f, tokens)
        return 1.2 * f.params * f.dbytes, (
            2 * f.params * scored / f.eval_flops + f.io(f.params * f.dbytes)
        )

    return estimate


EVALUATIONS = ("evaluate_perplexity", "evaluate_zero_shot")


def evaluation_outputs(plan) -> list[Path]:
    """Every evaluation result of the run (perplexities, then zero-shot), every model's."""
    return plan.outputs_of(*EVALUATIONS)


def _report_inputs(plan, w) -> dict:
    return {
        "models": [plan.layout.model_dir(v) for v in plan.variants],
        "evals": evaluation_outputs(plan),
        "exports": plan.outputs_of("export"),
    }


STAGES = (
    Stage(
        "evaluate_perplexity",
        evaluate_perplexity,
        outputs=lambda L, w: {"result": L.perplexity(w["model"], w["metric"])},
        estimate=_evaluation_estimate("perplexity_tokens"),
        wildcards=("model", "metric"),
        steps=lambda plan: [{"model": m, "metric": x} for m in plan.models for x in plan.metrics],
        inputs=_model_dir_input,
        gpu=True,
        phase=EVALUATE,
        final=True,
        label=lambda w: f"perplexity-{w['metric']}",
        aliases=("evaluate",),  # its older name, still accepted under `resources:`
        gpu_memory=lambda g: g.evaluation(zero_shot=False),
        writes=lambda s, name, w: float(EVAL_JSON),
    ),
    Stage(
        "evaluate_zero_shot",
        evaluate_zero_shot,
        outputs=lambda L, w: {"result": L.zero_shot(w["model"])},
        estimate=_evaluation_estimate("zero_shot_tokens"),
        wildcards=("model",),
        steps=lambda plan: [{"model": m} for m in plan.models] if plan.zero_shot else [],
        inputs=_model_dir_input,
        gpu=True,
        phase=EVALUATE,
        final=True,
        label=lambda w: "zero_shot",
        gpu_memory=lambda g: g.evaluation(zero_shot=True),
        writes=lambda s, name, w: float(EVAL_JSON),
    ),
    # The report runs last (after the exports), and every time: it reads whatever results exist.
    Stage(
        "report",
        build_report,
        outputs=lambda L, w: {
            "csv": L.report_dir / "summary.csv",
            "md": L.report_dir / "summary.md",
            "plots": L.report_dir / "plots",
        },
        estimate=lambda f: (1024 * MB, 10.0 + 2.0 * f.variants),
        inputs=_report_inputs,
        directories=frozenset({"plots"}),
        phase=REPORT_PHASE,
        final=True,
        always=True,
        threads=1,
        writes=lambda s, name, w: (
            blocks(REPORT + REPORT_PER_VARIANT * len(s.cfg.variants))
            if name == "plots"
            else s.block
        ),
    ),
)
