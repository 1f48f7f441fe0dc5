"""The task graph, described once: the steps a config needs, what each reads and writes.

Both drivers execute this description. `rose.runner` walks it in one process;
the Snakemake rules take their inputs, outputs, `temp()` flags and wildcard
constraints from it and call `execute` for the work. So the two drivers agree
on every path and on when an intermediate may go, and can continue each
other's run directories.

A step is one stage at one place: a stage (`hessians`) plus its wildcards
(`variant=rose-0.5, layer=3`). Paths come from `rose.layout.RunLayout`; the
Snakemake output patterns are the same layout calls with `{variant}`-style
placeholders, so there is one source for every file name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from rose.allocation import LAYERS, OWL
from rose.artifacts import remove_path
from rose.config import ConfigError, RunConfig
from rose.handoff import Handoff
from rose.layout import DENSE, RunLayout
from rose.methods import NEEDS_HESSIAN, NEEDS_ORDER
from rose.model_info import ModelInfo, load_checked

PathSet = Path | list[Path]


@dataclass(frozen=True)
class Stage:
    """One kind of step: its wildcards, its outputs (by name) and which of them are intermediates."""

    name: str
    wildcards: tuple[str, ...]
    outputs: Callable[[RunLayout, Mapping[str, str]], dict[str, Path]]
    temporary: frozenset[str] = (
        frozenset()
    )  # outputs removed once every step that reads them has run
    directories: frozenset[str] = frozenset()  # outputs that are directories
    gpu: bool = False  # tensor math: runs on the GPU when the config's device allows


def _layer(w: Mapping[str, str]) -> int | str:
    """An int for concrete steps, the `{layer}` placeholder itself for Snakemake patterns."""
    value = w["layer"]
    return int(value) if str(value).isdigit() else value


STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage("prepare_model", (), lambda L, w: {"model": L.model_json}),
        Stage("capture_calibration", (), lambda L, w: {"tokens": L.tokens}),
        Stage(
            "embed_calibration",
            (),
            lambda L, w: {"inputs": L.inputs(DENSE, 0)},
            frozenset({"inputs"}),
            gpu=True,
        ),
        # Layer 0's Hessians: the dense layer on the shared embeddings, the same for every variant.
        Stage(
            "shared_hessians",
            (),
            lambda L, w: {"hessians": L.shared_hessians},
            frozenset({"hessians"}),
            gpu=True,
        ),
        # OWL's dense statistics pass: the dense layer on the dense inputs, measuring its
        # outliers; its outputs are the next layer's dense inputs (the last layer's go unread).
        Stage(
            "outliers",
            ("layer",),
            lambda L, w: {
                "outliers": L.outliers(_layer(w)),
                "outputs": L.dense_outputs(_layer(w)),
            },
            frozenset({"outputs"}),
            gpu=True,
        ),
        # Per-layer sparsities of one non-uniform target, shared by every method.
        Stage(
            "allocate",
            ("allocation",),
            lambda L, w: {"allocation": L.allocation(w["allocation"])},
        ),
        Stage(
            "hessians",
            ("variant", "layer"),
            lambda L, w: {"hessians": L.variant_hessians(w["variant"], _layer(w))},
            frozenset({"hessians"}),
            gpu=True,
        ),
        Stage(
            "order",
            ("variant", "layer"),
            lambda L, w: {"order": L.order(w["variant"], _layer(w))},
            gpu=True,
        ),
        Stage(
            "prune",
            ("variant", "layer"),
            lambda L, w: {
                "pruned": L.pruned(w["variant"], _layer(w)),
                "stats": L.stats(w["variant"], _layer(w)),
            },
            gpu=True,
        ),
        # The pruned layer i-1 run on its inputs: layer i's inputs (layer >= 1; layer 0 is the embedding).
        Stage(
            "forward",
            ("variant", "layer"),
            lambda L, w: {"inputs": L.forward_inputs(w["variant"], _layer(w))},
            frozenset({"inputs"}),
            gpu=True,
        ),
        Stage(
            "assemble",
            ("variant",),
            lambda L, w: {"model_dir": L.model_dir(w["variant"])},
            directories=frozenset({"model_dir"}),
        ),
        Stage(
            "evaluate_perplexity",
            ("model", "metric"),
            lambda L, w: {"result": L.perplexity(w["model"], w["metric"])},
            gpu=True,
        ),
        Stage(
            "evaluate_zero_shot",
            ("model",),
            lambda L, w: {"result": L.zero_shot(w["model"])},
            gpu=True,
        ),
        # A shippable copy of a variant (dense: hard links; compressed: compressed-tensors
        # bitmasks) with its model card, made once the variant's evaluations exist.
        Stage(
            "export",
            ("variant", "format"),
            lambda L, w: {"export_dir": L.export_dir(w["variant"], w["format"])},
            directories=frozenset({"export_dir"}),
        ),
        Stage(
            "report",
            (),
            lambda L, w: {
                "csv": L.report_dir / "summary.csv",
                "md": L.report_dir / "summary.md",
                "plots": L.report_dir / "plots",
            },
            directories=frozenset({"plots"}),
        ),
    )
}


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
        self.variants = {v.name: v for v in cfg.variants}
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

    # ------------------------------------------------------------ names for the rules

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

    def is_temporary(self, stage: str, output: str) -> bool:
        return not self.cfg.keep_intermediates and output in STAGES[stage].temporary

    def output_patterns(self, stage: str) -> dict[str, str]:
        """Outputs with Snakemake wildcards in place of the values (`{variant}`, `{layer}`, ...)."""
        spec = STAGES[stage]
        return {
            k: str(v)
            for k, v in spec.outputs(self.layout, {w: f"{{{w}}}" for w in spec.wildcards}).items()
        }

    def log_path(self, stage: str, wildcards: Mapping[str, str]) -> Path:
        return self.layout.log(stage, {w: wildcards[w] for w in STAGES[stage].wildcards})

    def log_pattern(self, stage: str) -> str:
        return str(self.log_path(stage, {w: f"{{{w}}}" for w in STAGES[stage].wildcards}))

    # ------------------------------------------------------------ one step

    def _depth(self) -> int:
        if self.info is None:
            raise RuntimeError("the model's depth is known only after prepare_model (model.json)")
        return self.info.prune_layers

    def outputs(self, stage: str, wildcards: Mapping[str, str]) -> dict[str, Path]:
        return STAGES[stage].outputs(self.layout, wildcards)

    def inputs(self, stage: str, wildcards: Mapping[str, str]) -> dict[str, PathSet]:
        """What a step reads; the one description both drivers use."""
        L = self.layout
        if stage == "prepare_model":
            return {}
        inputs: dict[str, PathSet] = {"model": L.model_json}
        if stage == "embed_calibration":
            inputs["tokens"] = L.tokens
        elif stage == "shared_hessians":
            inputs["inputs"] = L.inputs(DENSE, 0)
        elif stage == "outliers":
            inputs["inputs"] = L.inputs(DENSE, int(wildcards["layer"]))
        elif stage == "allocate":
            if self.allocations[wildcards["allocation"]].allocation.kind == OWL:
                inputs["outliers"] = [L.outliers(i) for i in range(self._depth())]
        elif stage in ("hessians", "order", "prune", "forward"):
            variant, layer = wildcards["variant"], int(wildcards["layer"])
            method = self.variants[variant].method
            if stage == "hessians":
                inputs["inputs"] = L.inputs(variant, layer)
            elif stage == "order":
                inputs["hessians"] = L.hessians(variant, layer)
            elif stage == "prune":
                if method in NEEDS_HESSIAN:
                    inputs["hessians"] = L.hessians(variant, layer)
                if method in NEEDS_ORDER:
                    inputs["order"] = L.order(variant, layer)
            else:
                inputs["inputs"] = L.inputs(variant, layer - 1)
                inputs["pruned"] = L.pruned(variant, layer - 1)
            if stage in ("order", "prune") and not self.variants[variant].allocation.is_uniform:
                inputs["allocation"] = L.allocation(self.variants[variant].target)
        elif stage == "assemble":
            layers = range(self._depth())
            inputs["pruned"] = [L.pruned(wildcards["variant"], i) for i in layers]
            inputs["stats"] = [L.stats(wildcards["variant"], i) for i in layers]
        elif stage in ("evaluate_perplexity", "evaluate_zero_shot"):
            if (
                wildcards["model"] != DENSE
            ):  # dense is the prepared checkpoint that model.json names
                inputs["model_dir"] = L.model_dir(wildcards["model"])
        elif stage == "export":
            variant = wildcards["variant"]
            inputs["model_dir"] = L.model_dir(variant)
            # the model card quotes every evaluation of the variant and of dense
            inputs["evals"] = [
                p for p in self.evaluation_outputs() if p.parent.parent.name in (variant, DENSE)
            ]
        elif stage == "report":
            inputs["models"] = [L.model_dir(v) for v in self.variants]
            inputs["evals"] = self.evaluation_outputs()
            inputs["exports"] = self.export_outputs()
        return inputs

    def step(self, stage: str, **wildcards: str | int) -> Step:
        spec = STAGES[stage]
        w = {k: str(wildcards[k]) for k in spec.wildcards}
        outputs = self.outputs(stage, w)
        temporary = frozenset(
            path for name, path in outputs.items() if self.is_temporary(stage, name)
        )
        return Step(stage, tuple(w.items()), self.inputs(stage, w), outputs, temporary)

    # ------------------------------------------------------------ the whole graph

    def evaluation_outputs(self) -> list[Path]:
        evaluation = self.cfg.evaluation
        if evaluation is None:
            return []
        out = [self.layout.perplexity(m, name) for m in self.models for name in self.metrics]
        if evaluation.zero_shot is not None:
            out += [self.layout.zero_shot(m) for m in self.models]
        return out

    def export_outputs(self) -> list[Path]:
        return [
            self.layout.export_dir(v, f) for v in self.variants for f in self.cfg.export_formats
        ]

    def variant_steps(self, variant: str) -> Iterator[Step]:
        """A variant's layer chain, layer by layer, then its reassembly."""
        method = self.variants[variant].method
        depth = self._depth()
        for layer in range(depth):
            if method in NEEDS_HESSIAN and layer > 0:  # layer 0's: shared_hessians
                yield self.step("hessians", variant=variant, layer=layer)
            if method in NEEDS_ORDER:
                yield self.step("order", variant=variant, layer=layer)
            yield self.step("prune", variant=variant, layer=layer)
            if method in NEEDS_HESSIAN and layer + 1 < depth:
                yield self.step("forward", variant=variant, layer=layer + 1)
        yield self.step("assemble", variant=variant)

    def steps(self, evaluate: bool = True, report: bool = True) -> list[Step]:
        """Every step of the run in an order that respects dependencies (variant by variant)."""
        out = [
            self.step("prepare_model"),
            self.step("capture_calibration"),
            self.step("embed_calibration"),
        ]
        if any(v.method in NEEDS_HESSIAN for v in self.variants.values()):
            out.append(self.step("shared_hessians"))
        if self.uses_outliers:
            out += [self.step("outliers", layer=i) for i in range(self._depth())]
        out += [self.step("allocate", allocation=t) for t in self.allocations]
        for variant in self.variants:
            out.extend(self.variant_steps(variant))
        if evaluate and self.cfg.evaluation is not None:
            for model in self.models:
                out.extend(
                    self.step("evaluate_perplexity", model=model, metric=m) for m in self.metrics
                )
                if self.cfg.evaluation.zero_shot is not None:
                    out.append(self.step("evaluate_zero_shot", model=model))
        if evaluate:  # exports carry the evaluations in their model cards
            for variant in self.variants:
                out.extend(
                    self.step("export", variant=variant, format=f) for f in self.cfg.export_formats
                )
        if report:
            out.append(self.step("report"))
        return out

    def targets(self, evaluate: bool = True, report: bool = True) -> list[Path]:
        """What a finished run has: every reassembled model, the evaluations, the report."""
        out = [self.layout.model_dir(v) for v in self.variants]
        if evaluate:
            out += self.evaluation_outputs() + self.export_outputs()
        if report:
            out.append(self.layout.report_dir / "summary.csv")
        return out


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
    from rose import stages

    w = {k: str(v) for k, v in (wildcards or {}).items()}
    plan = Plan(cfg)
    if stage != "prepare_model":
        plan.info = load_checked(plan.layout.model_json, cfg.model.source)
    step = plan.step(stage, **{k: w[k] for k in STAGES[stage].wildcards})
    i, o = step.inputs, step.outputs
    model = plan.layout.model_json
    if stage == "prepare_model":
        stages.prepare_model(cfg, o["model"])
    elif stage == "capture_calibration":
        stages.capture_calibration(cfg, model, o["tokens"])
    elif stage == "embed_calibration":
        stages.embed_calibration(cfg, model, i["tokens"], o["inputs"], handoff=handoff)
    elif stage == "shared_hessians":
        stages.compute_hessians(cfg, model, None, 0, i["inputs"], o["hessians"], handoff=handoff)
    elif stage == "outliers":
        stages.outlier_statistics(
            cfg, model, int(w["layer"]), i["inputs"], o["outliers"], o["outputs"], handoff=handoff
        )
    elif stage == "allocate":
        stages.allocate(
            cfg, model, plan.allocations[w["allocation"]], i.get("outliers"), o["allocation"]
        )
    elif stage == "hessians":
        stages.compute_hessians(
            cfg, model, w["variant"], int(w["layer"]), i["inputs"], o["hessians"], handoff=handoff
        )
    elif stage == "order":
        stages.compute_order(
            cfg,
            model,
            w["variant"],
            int(w["layer"]),
            i["hessians"],
            o["order"],
            i.get("allocation"),
            handoff=handoff,
        )
    elif stage == "prune":
        stages.prune_layer(
            cfg,
            model,
            w["variant"],
            int(w["layer"]),
            i.get("hessians"),
            i.get("order"),
            o["pruned"],
            o["stats"],
            i.get("allocation"),
            handoff=handoff,
        )
    elif stage == "forward":
        layer = int(w["layer"]) - 1
        stages.forward_layer(
            cfg, model, w["variant"], layer, i["inputs"], i["pruned"], o["inputs"], handoff=handoff
        )
    elif stage == "assemble":
        stages.assemble_model(cfg, model, w["variant"], i["pruned"], i["stats"], o["model_dir"])
    elif stage == "evaluate_perplexity":
        stages.evaluate_perplexity(cfg, model, w["model"], w["metric"], o["result"])
    elif stage == "evaluate_zero_shot":
        stages.evaluate_zero_shot(cfg, model, w["model"], o["result"])
    elif stage == "export":
        from rose.export import export_model

        export_model(cfg, model, w["variant"], w["format"], o["export_dir"])
    elif stage == "report":
        stages.build_report(cfg, plan.layout.run_dir, plan.layout.report_dir)
    else:
        raise ValueError(f"unknown stage {stage!r}")
