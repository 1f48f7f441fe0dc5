"""Run a whole config in one process: the plan's steps, with the same artifacts as the workflow.

Useful without Snakemake and as the baseline for the workflow's overhead. It
resumes as Snakemake does: an artifact that exists is trusted (it was renamed
into place only when complete, and is validated when read), a missing one is
made, walking back through the plan (`rose.plan.needed_steps`) to what is on
disk. An intermediate is removed once every step that reads it has run, as
Snakemake's temp() files are, so the two drivers continue each other's run
directories.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from rose import plan as graph
from rose import preflight
from rose.artifacts import exclusive_lock, remove_path
from rose.config import RunConfig, write_effective
from rose.layout import RunLayout
from rose.model_info import load_checked
from rose.provenance import check_run

log = logging.getLogger("rose")


@dataclass(frozen=True)
class StageTiming:
    stage: str
    variant: str
    layer: int | None
    seconds: float


@dataclass
class RunResult:
    layout: RunLayout
    timings: list[StageTiming] = field(default_factory=list)


def _timed(cfg: RunConfig, step: graph.Step, result: RunResult, depth: int | None) -> None:
    w = dict(step.wildcards)
    layer = int(w["layer"]) if "layer" in w else None
    where = f" {w.get('variant') or w.get('model') or w.get('allocation', '')}".rstrip()
    where += f" {w['metric']}" if "metric" in w else ""
    where += f" layer {layer + 1}/{depth}" if layer is not None and depth else ""
    log.info("stage %s%s", step.stage, where)
    started = time.perf_counter()
    graph.execute(cfg, step.stage, w)
    stage = f"perplexity-{w['metric']}" if step.stage == "evaluate_perplexity" else step.stage
    stage = "zero_shot" if stage == "evaluate_zero_shot" else stage
    result.timings.append(
        StageTiming(
            stage, w.get("variant") or w.get("model", ""), layer, time.perf_counter() - started
        )
    )


def _run(cfg: RunConfig, evaluate: bool, report: bool, force: bool | None = None) -> RunResult:
    check_run(cfg)
    # Jobs, disk, memory and time from the model's config; refuses a run whose disk peak
    # does not fit in results_dir (force, or ROSE_FORCE=1, starts it anyway).
    preflight.check(cfg, "runner", evaluate=evaluate, report=report, force=force)
    write_effective(cfg)
    plan = graph.Plan(cfg)
    result = RunResult(plan.layout)
    if not plan.layout.model_json.exists():
        _timed(cfg, plan.step("prepare_model"), result, None)
    plan.info = load_checked(plan.layout.model_json, cfg.model.source)
    steps = plan.steps(evaluate=evaluate, report=report)
    need = graph.needed_steps(steps, plan.targets(evaluate=evaluate, report=False))
    readers = graph.consumers(steps)
    temporary = {path for s in steps for path in s.temporary}
    pending = set(need)  # keys of the steps still to run
    for step in steps:
        if step.stage == "report" or step.key in need:
            _timed(cfg, step, result, plan.info.prune_layers)
            pending.discard(step.key)
            # An intermediate goes once no step that still has to run reads it.
            # (an intermediate nothing reads, the last dense layer's outputs, goes at once)
            for path in [*step.input_paths(), *step.temporary]:
                if path in temporary and not any(r.key in pending for r in readers.get(path, [])):
                    remove_path(path)
    graph.remove_consumed_intermediates(steps)
    return result


def run(
    cfg: RunConfig, evaluate: bool = True, report: bool = True, force: bool | None = None
) -> RunResult:
    """Everything the workflow does, in this process (one runner per run directory at a time).

    `force`: start even when the pre-flight predicts more disk than results_dir has free.
    """
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(RunLayout(cfg.run_dir).lock, f"run directory {cfg.run_dir}"):
        return _run(cfg, evaluate, report, force)
