"""Run a whole config in one process: the plan's steps, with the same artifacts as the workflow.

Useful without Snakemake and as the baseline for the workflow's overhead. It
resumes as Snakemake does: an artifact that exists is trusted (it was renamed
into place only when complete, and is validated when read), a missing one is
made, walking back through the plan (`rose.plan.needed_steps`) to what is on
disk. An intermediate is removed once every step that reads it has run, as
Snakemake's temp() files are, so the two drivers continue each other's run
directories.

Consecutive stages of a layer hand their artifacts over in memory (`rose.handoff`,
bounded by `handoff_memory`): each artifact is still written, but the next stage
does not read it back. Every step's artifact bytes written, read from disk and
taken from memory are recorded with its timing.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from rose import plan as graph
from rose import preflight
from rose.artifacts import exclusive_lock, remove_path
from rose.config import RunConfig, write_effective
from rose.handoff import Handoff, make_handoff
from rose.layout import RunLayout
from rose.model_info import load_checked
from rose.provenance import check_run

log = logging.getLogger("rose")


def _file_bytes(path: Path) -> int:
    """Size of a file, or of everything under a directory (0 when missing)."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    try:
        return path.stat().st_size
    except OSError:
        return 0


@dataclass(frozen=True)
class StageTiming:
    stage: str
    variant: str
    layer: int | None
    seconds: float
    # artifact bytes (the step's declared inputs and outputs; model weights are not artifacts)
    bytes_written: int = 0
    bytes_read: int = 0  # read from disk
    bytes_from_memory: int = 0  # taken from the handoff instead of read back


@dataclass
class RunResult:
    layout: RunLayout
    timings: list[StageTiming] = field(default_factory=list)
    handoff_budget: int = 0

    def io_totals(self) -> dict[str, int]:
        return {
            key: sum(getattr(t, key) for t in self.timings)
            for key in ("bytes_written", "bytes_read", "bytes_from_memory")
        }


def _timed(
    cfg: RunConfig,
    step: graph.Step,
    result: RunResult,
    depth: int | None,
    handoff: Handoff | None = None,
) -> None:
    w = dict(step.wildcards)
    layer = int(w["layer"]) if "layer" in w else None
    where = f" {w.get('variant') or w.get('model') or w.get('allocation', '')}".rstrip()
    where += f" {w['metric']}" if "metric" in w else ""
    where += f" layer {layer + 1}/{depth}" if layer is not None and depth else ""
    log.info("stage %s%s", step.stage, where)
    started = time.perf_counter()
    graph.execute(cfg, step.stage, w, handoff)
    seconds = time.perf_counter() - started
    served = handoff.drain_served() if handoff is not None else set()
    inputs = set(step.input_paths())
    result.timings.append(
        StageTiming(
            step.record.label_of(w),
            w.get("variant") or w.get("model", ""),
            layer,
            seconds,
            bytes_written=sum(_file_bytes(p) for p in step.outputs.values()),
            bytes_read=sum(_file_bytes(p) for p in inputs - served),
            bytes_from_memory=sum(_file_bytes(p) for p in inputs & served),
        )
    )


def _run(cfg: RunConfig, evaluate: bool, report: bool, force: bool | None = None) -> RunResult:
    check_run(cfg)
    # Jobs, disk, memory and time from the model's config; refuses a run whose disk peak
    # does not fit in results_dir (force, or ROSE_FORCE=1, starts it anyway).
    preflight.check(cfg, "runner", evaluate=evaluate, report=report, force=force)
    write_effective(cfg)
    plan = graph.Plan(cfg)
    handoff = make_handoff(cfg.handoff_memory)
    result = RunResult(plan.layout, handoff_budget=handoff.budget if handoff else 0)
    if not plan.layout.model_json.exists():
        _timed(cfg, plan.model_step(), result, None)
    plan.info = load_checked(plan.layout.model_json, cfg.model.source)
    steps = plan.steps(evaluate=evaluate, report=report)
    need = graph.needed_steps(steps, plan.targets(evaluate=evaluate, report=False))
    readers = graph.consumers(steps)
    temporary = {path for s in steps for path in s.temporary}
    pending = set(need)  # keys of the steps still to run
    for step in steps:
        if step.record.always or step.key in need:
            _timed(cfg, step, result, plan.info.prune_layers, handoff)
            pending.discard(step.key)
            # An intermediate goes once no step that still has to run reads it.
            # (an intermediate nothing reads, the last dense layer's outputs, goes at once)
            for path in [*step.input_paths(), *step.temporary]:
                if path in temporary and not any(r.key in pending for r in readers.get(path, [])):
                    remove_path(path)
            # Memory goes once no step of a layer chain still reads it (reassembly, long
            # after, reads from disk).
            if handoff is not None:
                for path in [*step.input_paths(), *step.outputs.values()]:
                    if not any(r.key in pending and r.record.chain for r in readers.get(path, [])):
                        handoff.forget(path)
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
