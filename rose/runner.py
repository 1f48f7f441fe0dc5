"""Run a whole config in one process, with the same stages and artifacts as the workflow.

Useful without Snakemake and as the baseline for the workflow's overhead. It
resumes like the workflow does: an artifact that exists is trusted (it was
renamed into place only when complete, and is validated when read), a missing
one is made. Intermediates are removed as soon as nothing needs them, in the
same order the workflow's temp() files are, so the two can resume each other's
run directories.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rose import stages
from rose.artifacts import exclusive_lock, remove_path
from rose.config import RunConfig, Variant
from rose.layout import DENSE, RunLayout
from rose.methods import NEEDS_HESSIAN

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
    report: dict | None = None

    def seconds_by_stage(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for t in self.timings:
            out[t.stage] = out.get(t.stage, 0.0) + t.seconds
        return out


class Runner:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.layout = RunLayout(cfg.run_dir)
        self.result = RunResult(self.layout)
        self.info: stages.ModelInfo | None = None

    def _timed(self, stage: str, variant: str, layer: int | None, fn: Callable[[], object]) -> None:
        where = f" {variant}" if variant else ""
        where += f" layer {layer + 1}/{self.info.prune_layers}" if layer is not None and self.info else ""
        log.info("stage %s%s", stage, where)
        started = time.perf_counter()
        fn()
        self.result.timings.append(StageTiming(stage, variant, layer, time.perf_counter() - started))

    def _ensure(self, path: Path, stage: str, variant: str, layer: int | None, fn: Callable[[], object]) -> None:
        if not path.exists():
            self._timed(stage, variant, layer, fn)

    # ------------------------------------------------------------ shared stages

    def prepare(self) -> stages.ModelInfo:
        L, cfg = self.layout, self.cfg
        self._ensure(L.model_json, "prepare_model", "", None, lambda: stages.prepare_model(cfg, L.model_json))
        self.info = stages.ModelInfo.load(L.model_json)
        return self.info

    def _layer0_inputs(self) -> None:
        L, cfg = self.layout, self.cfg
        self._ensure(
            L.tokens, "capture_calibration", "", None, lambda: stages.capture_calibration(cfg, L.model_json, L.tokens)
        )
        path = L.inputs("", 0)
        self._ensure(
            path, "embed_calibration", "", None, lambda: stages.embed_calibration(cfg, L.model_json, L.tokens, path)
        )

    # ------------------------------------------------------------ per variant

    def _done(self, variant: str, layer: int) -> bool:
        return self.layout.pruned(variant, layer).exists() and self.layout.stats(variant, layer).exists()

    def _inputs(self, variant: str, layer: int) -> Path:
        """Make layer `layer`'s inputs, walking back to the last inputs still on disk if needed."""
        L = self.layout
        if layer == 0:
            self._layer0_inputs()
            return L.inputs(variant, 0)
        if L.inputs(variant, layer).exists():
            return L.inputs(variant, layer)
        start = layer - 1
        while start > 0 and not L.inputs(variant, start).exists():
            start -= 1
        self._inputs(variant, start)
        for i in range(start, layer):
            if not self._done(variant, i):
                self._prune(variant, i)
            self._forward(variant, i)
        return L.inputs(variant, layer)

    def _forward(self, variant: str, layer: int) -> None:
        L, cfg = self.layout, self.cfg
        out = L.inputs(variant, layer + 1)
        self._ensure(
            out,
            "forward",
            variant,
            layer,
            lambda: stages.forward_layer(
                cfg, L.model_json, variant, layer, L.inputs(variant, layer), L.pruned(variant, layer), out
            ),
        )

    def _prune(self, variant_name: str, layer: int) -> None:
        L, cfg = self.layout, self.cfg
        variant = cfg.variant(variant_name)
        hessians = order = None
        if variant.method in NEEDS_HESSIAN:
            inputs = self._inputs(variant_name, layer)
            hessians = L.hessians(variant_name, layer)
            self._ensure(
                hessians,
                "hessians",
                variant_name,
                layer,
                lambda: stages.compute_hessians(cfg, L.model_json, variant_name, layer, inputs, hessians),
            )
        if variant.method in stages.METHODS_WITH_ORDER:
            order = L.order(variant_name, layer)
            self._ensure(
                order,
                "order",
                variant_name,
                layer,
                lambda: stages.compute_order(cfg, L.model_json, variant_name, layer, hessians, order),
            )
        self._timed(
            "prune",
            variant_name,
            layer,
            lambda: stages.prune_layer(
                cfg, L.model_json, variant_name, layer, hessians, order, L.pruned(variant_name, layer), L.stats(variant_name, layer)
            ),
        )

    def _needs_inputs(self, variant: Variant) -> bool:
        return variant.method in NEEDS_HESSIAN

    def prune_variant(self, variant: Variant) -> None:
        L, cfg, info = self.layout, self.cfg, self.info
        name = variant.name
        if L.model_dir(name).exists():
            return
        for layer in range(info.prune_layers):
            if not self._done(name, layer):
                self._prune(name, layer)
            last = layer + 1 == info.prune_layers
            if self._needs_inputs(variant) and not last and not self._done(name, layer + 1):
                self._inputs(name, layer + 1)
            if not cfg.keep_intermediates:
                remove_path(L.hessians(name, layer))
                if layer > 0 and (last or L.inputs(name, layer + 1).exists() or self._done(name, layer + 1)):
                    remove_path(L.inputs(name, layer))
        self._timed(
            "assemble",
            name,
            None,
            lambda: stages.assemble_model(
                cfg,
                L.model_json,
                name,
                [L.pruned(name, i) for i in range(info.prune_layers)],
                [L.stats(name, i) for i in range(info.prune_layers)],
                L.model_dir(name),
            ),
        )

    # ------------------------------------------------------------ evaluation

    def evaluate(self) -> None:
        L, cfg, info = self.layout, self.cfg, self.info
        if cfg.evaluation is None:
            return
        for name in [DENSE] + [v.name for v in cfg.variants]:
            model_dir = Path(info.path) if name == DENSE else L.model_dir(name)
            for spec in cfg.evaluation.perplexity:
                out = L.perplexity(name, spec.name)
                self._ensure(
                    out,
                    f"perplexity-{spec.name}",
                    name,
                    None,
                    lambda out=out, spec=spec, name=name, model_dir=model_dir: stages.evaluate_perplexity(
                        cfg, L.model_json, name, spec.name, model_dir, out
                    ),
                )
            if cfg.evaluation.zero_shot is not None:
                out = L.zero_shot(name)
                self._ensure(
                    out,
                    "zero_shot",
                    name,
                    None,
                    lambda out=out, name=name, model_dir=model_dir: stages.evaluate_zero_shot(
                        cfg, L.model_json, name, model_dir, out
                    ),
                )

    def run(self, evaluate: bool = True, report: bool = True) -> RunResult:
        stages.check_run(self.cfg)
        self.prepare()
        variants = self.cfg.variants
        for variant in variants:
            self.prune_variant(variant)
        if not self.cfg.keep_intermediates:
            remove_path(self.layout.inputs("", 0))
        if evaluate:
            self.evaluate()
        if report:
            def make_report() -> None:
                self.result.report = stages.build_report(self.cfg, self.layout.run_dir, self.layout.report_dir)

            self._timed("report", "", None, make_report)
        return self.result


def run(cfg: RunConfig, evaluate: bool = True, report: bool = True) -> RunResult:
    """Everything the workflow does, in this process (one runner per run directory at a time)."""
    with exclusive_lock(cfg.run_dir / ".rose.lock", f"run directory {cfg.run_dir}"):
        return Runner(cfg).run(evaluate=evaluate, report=report)
