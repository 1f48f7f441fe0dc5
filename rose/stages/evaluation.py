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
from rose.device import resolve_device
from rose.layout import DENSE, RunLayout
from rose.model_info import ModelInfo


def _model_dir(cfg: RunConfig, info: ModelInfo, model_name: str) -> Path:
    """The dense model is the prepared checkpoint; a variant is its reassembled directory."""
    if model_name == DENSE:
        return Path(info.path)
    cfg.variant(model_name)  # refuses a name that is not a variant of this config
    return RunLayout(cfg.run_dir).model_dir(model_name)


def evaluate_perplexity(
    cfg: RunConfig, model_json: str | Path, model_name: str, metric_name: str, out_json: str | Path
) -> dict[str, Any]:
    """Token-level perplexity of one model on one evaluation text (paper protocol)."""
    from rose import evaluate

    info = ModelInfo.load(model_json)
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
        resolve_device(cfg.device),
        protocol,
    )
    result["variant"] = model_name
    result["model_fingerprint"] = info.fingerprint
    atomic_write_json(out_json, result)
    return result


def evaluate_zero_shot(
    cfg: RunConfig, model_json: str | Path, model_name: str, out_json: str | Path
) -> dict[str, Any]:
    """lm-eval zero-shot accuracy of one model (acc_norm where the task has it)."""
    from rose import evaluate

    info = ModelInfo.load(model_json)
    if cfg.evaluation is None or cfg.evaluation.zero_shot is None:
        raise ValueError("zero-shot evaluation is off in this config")
    model_dir = _model_dir(cfg, info, model_name)
    result = evaluate.zero_shot_report(
        model_dir, cfg.evaluation.zero_shot, resolve_device(cfg.device)
    )
    result["variant"] = model_name
    result["model_fingerprint"] = info.fingerprint
    atomic_write_json(out_json, result)
    return result


def build_report(cfg: RunConfig, run_dir: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """summary.csv / summary.md and the plots for every variant plus dense."""
    from rose import report

    return report.build_report(Path(run_dir), [v.name for v in cfg.variants], Path(out_dir))
