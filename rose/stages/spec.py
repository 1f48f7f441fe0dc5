"""A stage, described once: the record every driver, estimator and rule reads, and its context.

A `Stage` says everything the rest of the pipeline needs to know of one kind of
step, next to the function that does it: its wildcards, which steps of a run it
has, what each reads and writes, which outputs are intermediates, whether it
runs on the GPU and takes part in the in-memory handoff, its label in timings,
its cluster request and `rose plan` estimates, and the call itself. `rose.plan`
schedules steps by looking their stage up; the runner, `rose.resources`,
`rose.preflight` and the Snakemake rules read the same records, so adding a
stage touches its own module and its rule.

A stage function takes one `StageContext`: the config, the step's wildcards,
inputs and outputs, the prepared model's description and the handoff, with the
device, dtype, variant and checkpoint derived from them on first use.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from rose.device import compute_dtype, resolve_device
from rose.layout import RunLayout

if TYPE_CHECKING:
    from rose import family
    from rose.checkpoint import Checkpoint
    from rose.config import RunConfig, Variant
    from rose.handoff import Handoff
    from rose.model_info import ModelInfo
    from rose.plan import Plan
    from rose.sizing import DiskSizer, GpuFigures, StageFigures

PathSet = Path | list[Path]
Wildcards = Mapping[str, str]

# Which `Plan.steps(evaluate, report)` include a stage: pruning always, the rest on request.
PRUNE, EVALUATE, REPORT = "prune", "evaluate", "report"


def _nothing(plan: Plan, w: Wildcards) -> dict[str, PathSet]:
    return {}


def _once(plan: Plan) -> list[dict[str, Any]]:
    return [{}]


def _no_gpu(g: GpuFigures) -> float:
    return 0.0


def _one_block(s: DiskSizer, name: str, w: Wildcards) -> float:
    return s.block


@dataclass(frozen=True)
class Stage:
    """One kind of step; `rose.stages.STAGES` lists them in pipeline order."""

    name: str
    run: Callable[[StageContext], Any]  # the work of one step
    outputs: Callable[[RunLayout, Wildcards], dict[str, Path]]  # by name; patterns for Snakemake
    estimate: Callable[[StageFigures], tuple[float, float]]  # (host bytes at the peak, seconds)
    wildcards: tuple[str, ...] = ()
    # the steps a run has: one wildcard mapping each (none: a stage with one step)
    steps: Callable[[Plan], Iterable[Mapping[str, Any]]] = _once
    # what a step reads besides model.json (every stage but prepare_model reads that)
    inputs: Callable[[Plan, Wildcards], dict[str, PathSet]] = _nothing
    reads_model: bool = True
    # outputs removed once every step that reads them has run (unless keep_intermediates)
    temporary: frozenset[str] = frozenset()
    directories: frozenset[str] = frozenset()  # outputs that are directories
    gpu: bool = False  # tensor math: runs on the GPU when the config's device allows
    # a layer chain's step: what it reads was just written by the step before, so the
    # in-process drivers keep its inputs in memory for it (rose.handoff)
    chain: bool = False
    phase: str = PRUNE
    final: bool = False  # its outputs are results of the run (what `rule all` asks for)
    always: bool = False  # rerun by the runner every time (it reads every result there is)
    label: Callable[[Wildcards], str] | None = None  # in timings, when not the stage's name
    aliases: tuple[str, ...] = ()  # other names of it in a config's `resources:` section
    threads: int = 4  # per job, on a GPU machine (CPU-only runs give tensor stages more)
    gpu_memory: Callable[[GpuFigures], float] = _no_gpu  # bytes torch allocates per job
    writes: Callable[[DiskSizer, str, Wildcards], float] = _one_block  # bytes of an output
    # output -> what `rose plan` calls its bytes in the disk breakdown
    disk: Mapping[str, str] = field(default_factory=dict)

    def label_of(self, wildcards: Wildcards) -> str:
        return self.label(wildcards) if self.label is not None else self.name


@dataclass
class StageContext:
    """What one step works with. Built by `rose.plan.execute` (or `Plan.context` in tests)."""

    cfg: RunConfig
    stage: str
    wildcards: Mapping[str, str]
    inputs: Mapping[str, PathSet]
    outputs: Mapping[str, Path]
    info: ModelInfo | None = None  # model.json; None only for prepare_model, which writes it
    handoff: Handoff | None = None  # what earlier steps of this process wrote, in memory

    @property
    def layout(self) -> RunLayout:
        return RunLayout(self.cfg.run_dir)

    @property
    def layer(self) -> int:
        return int(self.wildcards["layer"])

    @cached_property
    def variant(self) -> Variant | None:
        """The step's variant; None for the shared and dense steps."""
        name = self.wildcards.get("variant")
        return self.cfg.variant(name) if name is not None else None

    @cached_property
    def device(self) -> torch.device:
        return resolve_device(self.cfg.device)

    @cached_property
    def dtype(self) -> torch.dtype:
        return compute_dtype(self.cfg, self.model_info, self.device)

    @property
    def model_info(self) -> ModelInfo:
        if self.info is None:
            raise RuntimeError(f"{self.stage}: model.json is read only after prepare_model")
        return self.info

    @cached_property
    def _model(self) -> tuple[Checkpoint, family.Family]:
        from rose.model_info import open_model

        return open_model(self.model_info)

    @property
    def checkpoint(self) -> Checkpoint:
        return self._model[0]

    @property
    def family(self) -> family.Family:
        return self._model[1]
