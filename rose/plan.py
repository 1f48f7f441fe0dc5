"""Scheduling: the steps a config needs, in what order, what must run, and what may go.

Both drivers execute this plan. `rose.runner` walks it in one process; the
Snakemake rules take their inputs, outputs, `temp()` flags and log paths from
it and call `execute` for the work. So the two drivers agree on every path and
on when an intermediate may go, and can continue each other's run directories.

Everything about a stage itself (its wildcards, files, steps, the call) is in
its record (`rose.stages.STAGES`); this module only combines records. A step is
one stage at one place: a stage (`hessians`) plus its wildcards
(`variant=rose-0.5, layer=3`). Paths come from `rose.layout.RunLayout`; the
Snakemake output patterns are the same layout calls with `{variant}`-style
placeholders, so there is one source for every file name.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from rose.allocation import LAYERS, OWL
from rose.artifacts import remove_path
from rose.config import ConfigError, RunConfig, Variant
from rose.handoff import Handoff
from rose.layout import DENSE, RunLayout
from rose.model_info import ModelInfo, load_checked
from rose.stages import STAGES
from rose.stages.spec import EVALUATE, PRUNE, REPORT, PathSet, Stage, StageContext


@dataclass(frozen=True)
class Step:
    stage: str
    wildcards: tuple[tuple[str, str], ...]
    inputs: dict[str, PathSet] = field(compare=False, hash=False)
    outputs: dict[str, Path] = field(compare=False, hash=False)
    temporary: frozenset[Path] = field(compare=False, hash=False)

    @property
    def key(self) -> tuple[str, tuple[tuple[str, str], ...]]:
        return self.stage, self.wildcards

    @property
    def record(self) -> Stage:
        return STAGES[self.stage]

    def input_paths(self) -> list[Path]:
        return [
            p
            for value in self.inputs.values()
            for p in (value if isinstance(value, list) else [value])
        ]

    def describe(self) -> str:
        return " ".join([self.stage, *(f"{k}={v}" for k, v in self.wildcards)])


class Plan:
    """The steps of one config; `info` (model.json) is needed for anything that depends on the depth."""

    def __init__(self, cfg: RunConfig, info: ModelInfo | None = None):
        self.cfg = cfg
        self._info: ModelInfo | None = None
        self.layout = RunLayout(cfg.run_dir)
        self.variants: dict[str, Variant] = {v.name: v for v in cfg.variants}
        # one allocation per non-uniform target, shared by the methods: 'owl-0.7' -> a variant
        self.allocations = {v.target: v for v in cfg.variants if not v.allocation.is_uniform}
        self.info = info

    @property
    def info(self) -> ModelInfo | None:
        return self._info

    @info.setter
    def info(self, info: ModelInfo | None) -> None:
        """Once the depth is known, a per-layer list must match it (one line naming the key)."""
        if info is not None:
            check_allocation_lengths(self.cfg, info.prune_layers)
        self._info = info

    @property
    def depth(self) -> int:
        """Decoder layers the run prunes."""
        if self.info is None:
            raise RuntimeError("the model's depth is known only after prepare_model (model.json)")
        return self.info.prune_layers

    # ------------------------------------------------------------ names for the records and rules

    @property
    def models(self) -> list[str]:
        """Every evaluated model: dense first, then the variants."""
        return [DENSE, *self.variants]

    @property
    def formats(self) -> list[str]:
        return list(self.cfg.export_formats)

    @property
    def uses_outliers(self) -> bool:
        return any(v.allocation.kind == OWL for v in self.allocations.values())

    @property
    def metrics(self) -> list[str]:
        evaluation = self.cfg.evaluation
        return [p.name for p in evaluation.perplexity] if evaluation else []

    @property
    def zero_shot(self) -> bool:
        return self.cfg.evaluation is not None and self.cfg.evaluation.zero_shot is not None

    def is_temporary(self, stage: str, output: str) -> bool:
        return not self.cfg.keep_intermediates and output in STAGES[stage].temporary

    def output_patterns(self, stage: str) -> dict[str, str]:
        """Outputs with Snakemake wildcards in place of the values (`{variant}`, `{layer}`, ...)."""
        placeholders = {w: f"{{{w}}}" for w in STAGES[stage].wildcards}
        return {k: str(v) for k, v in STAGES[stage].outputs(self.layout, placeholders).items()}

    def log_path(self, stage: str, wildcards: Mapping[str, str]) -> Path:
        return self.layout.log(stage, {w: wildcards[w] for w in STAGES[stage].wildcards})

    def log_pattern(self, stage: str) -> str:
        return str(self.log_path(stage, {w: f"{{{w}}}" for w in STAGES[stage].wildcards}))

    # ------------------------------------------------------------ one step

    def outputs(self, stage: str, wildcards: Mapping[str, str]) -> dict[str, Path]:
        return STAGES[stage].outputs(self.layout, wildcards)

    def inputs(self, stage: str, wildcards: Mapping[str, str]) -> dict[str, PathSet]:
        """What a step reads: model.json (every stage but the one that writes it), then its own."""
        record = STAGES[stage]
        inputs: dict[str, PathSet] = {"model": self.layout.model_json} if record.reads_model else {}
        inputs.update(record.inputs(self, wildcards))
        return inputs

    def step(self, stage: str, **wildcards: str | int) -> Step:
        record = STAGES[stage]
        w = {k: str(wildcards[k]) for k in record.wildcards}
        outputs = self.outputs(stage, w)
        temporary = frozenset(
            path for name, path in outputs.items() if self.is_temporary(stage, name)
        )
        return Step(stage, tuple(w.items()), self.inputs(stage, w), outputs, temporary)

    def model_step(self) -> Step:
        """The step that writes model.json: it runs before the depth is known."""
        return next(self.step(n) for n, r in STAGES.items() if not r.reads_model)

    def context(self, stage: str, handoff: Handoff | None = None, **wildcards: str | int):
        """What the stage function of one step is called with."""
        step = self.step(stage, **wildcards)
        return StageContext(
            self.cfg, stage, dict(step.wildcards), step.inputs, step.outputs, self.info, handoff
        )

    # ------------------------------------------------------------ the whole graph

    def stage_steps(self, stage: str) -> list[Step]:
        """Every step of one stage in this run."""
        return [self.step(stage, **w) for w in STAGES[stage].steps(self)]

    def outputs_of(self, *stages: str) -> list[Path]:
        """The outputs of every step of `stages` (their inputs are not needed: the model's depth
        need not be known yet, so `rule all` can ask for them before prepare_model ran)."""
        return [
            path
            for stage in stages
            for w in STAGES[stage].steps(self)
            for path in self.outputs(stage, {k: str(v) for k, v in w.items()}).values()
        ]

    @staticmethod
    def _phases(evaluate: bool, report: bool) -> set[str]:
        return {PRUNE} | ({EVALUATE} if evaluate else set()) | ({REPORT} if report else set())

    def targets(self, evaluate: bool = True, report: bool = True) -> list[Path]:
        """What a finished run has: the outputs of its final stages (the reassembled models,
        then the evaluations and exports, then the report), phase by phase."""
        out = []
        for phase in (PRUNE, EVALUATE, REPORT):
            if phase in self._phases(evaluate, report):
                out += self.outputs_of(
                    *(n for n, r in STAGES.items() if r.final and r.phase == phase)
                )
        return out

    def steps(self, evaluate: bool = True, report: bool = True) -> list[Step]:
        """Every step of the run, each after the producers of its inputs: in the order the
        targets ask for them, depth first, so the runner goes variant by variant, layer by
        layer, and a layer's stages run back to back (what the in-memory handoff needs)."""
        phases = self._phases(evaluate, report)
        every = [
            step
            for name, record in STAGES.items()
            if record.phase in phases
            for step in self.stage_steps(name)
        ]
        made_by = producers(every)
        ordered: list[Step] = []
        seen: set[tuple] = set()
        roots = [made_by[t] for t in self.targets(evaluate, report)] + every
        for root in roots:
            if root.key in seen:
                continue
            seen.add(root.key)
            stack = [(root, iter(root.input_paths()))]
            while stack:
                step, pending = stack[-1]
                for path in pending:
                    producer = made_by.get(path)
                    if producer is not None and producer.key not in seen:
                        seen.add(producer.key)
                        stack.append((producer, iter(producer.input_paths())))
                        break
                else:
                    stack.pop()
                    ordered.append(step)
        return ordered


def check_allocation_lengths(cfg: RunConfig, depth: int) -> None:
    """A `layers` list must have one fraction per pruned decoder layer of this model."""
    for allocation in cfg.allocations:
        if allocation.kind == LAYERS and len(allocation.fractions) != depth:
            raise ConfigError(
                f"config: {allocation.key}.fractions has {len(allocation.fractions)} values, "
                f"the model prunes {depth} decoder layers"
            )


# ---------------------------------------------------------------- make-like scheduling


def producers(steps: Iterable[Step]) -> dict[Path, Step]:
    return {path: step for step in steps for path in step.outputs.values()}


def consumers(steps: Iterable[Step]) -> dict[Path, list[Step]]:
    out: dict[Path, list[Step]] = {}
    for step in steps:
        for path in step.input_paths():
            out.setdefault(path, []).append(step)
    return out


def needed_steps(steps: list[Step], targets: Iterable[Path]) -> set[tuple]:
    """Keys of the steps that must run: a missing target's producer, and, recursively, the
    producers of its missing inputs (an artifact on disk is trusted; readers validate it).
    This is how a run resumes at layer 57 and walks back only to the last inputs on disk."""
    made_by = producers(steps)
    need: set[tuple] = set()
    stack = [Path(t) for t in targets]
    while stack:
        path = stack.pop()
        if path.exists():
            continue
        step = made_by.get(path)
        if step is None:
            raise FileNotFoundError(f"{path}: missing, and no step of this run produces it")
        if step.key in need:
            continue
        need.add(step.key)
        stack.extend(step.input_paths())
    return need


def remove_consumed_intermediates(steps: list[Step]) -> list[Path]:
    """Remove temporary artifacts that no step needs any more, e.g. left behind by a kill
    between a step and its cleanup. Both drivers call this at the end of a successful run.

    A step is settled when each of its outputs exists, or is an intermediate already
    consumed (every step reading it is settled); an intermediate goes when all its readers are.
    """
    readers = consumers(steps)
    temporary = {path for step in steps for path in step.temporary}
    settled: dict[tuple, bool] = {}

    def is_settled(step: Step) -> bool:
        if step.key not in settled:
            settled[step.key] = all(
                path.exists()
                or (path in temporary and all(is_settled(r) for r in readers.get(path, [])))
                for path in step.outputs.values()
            )
        return settled[step.key]

    removed = []
    for step in reversed(steps):  # readers first: shallow recursion
        is_settled(step)
    for step in steps:
        for path in sorted(step.temporary):
            if path.exists() and all(is_settled(r) for r in readers.get(path, [])):
                remove_path(path)
                removed.append(path)
    return removed


# ---------------------------------------------------------------- doing one step


def execute(
    cfg: RunConfig,
    stage: str,
    wildcards: Mapping[str, str] | None = None,
    handoff: Handoff | None = None,
) -> None:
    """Run one step: the single entry point of every Snakemake rule and of the runner.

    `handoff`: what earlier steps of this process wrote, kept in memory (`rose.handoff`)."""
    record = STAGES.get(stage)
    if record is None:
        raise ValueError(f"unknown stage {stage!r} (known: {', '.join(sorted(STAGES))})")
    w = {k: str(v) for k, v in (wildcards or {}).items()}
    plan = Plan(cfg)
    if record.reads_model:
        plan.info = load_checked(plan.layout.model_json, cfg.model.source)
    record.run(plan.context(stage, handoff, **{k: w[k] for k in record.wildcards}))
