"""The pipeline's stages: one module per stage family, one record per stage.

Every module of this package that defines `STAGES` (a tuple of
`rose.stages.spec.Stage` records) contributes them: the scheduler (`rose.plan`),
the runner, the estimators (`rose.resources`, `rose.preflight`) and the
Snakemake rules look stages up in `STAGES` here, so a new stage is its record
and function in a stages module, and its rule. Each stage function takes a
`StageContext` and writes its outputs atomically; the rules and the in-process
runner call exactly these functions, so the workflow and `python -m rose run`
produce identical bytes.
"""

from __future__ import annotations

import importlib
import pkgutil

from rose.stages.spec import Stage, StageContext


def _collect() -> dict[str, Stage]:
    found: dict[str, Stage] = {}
    for module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
        for stage in getattr(importlib.import_module(f"{__name__}.{module}"), "STAGES", ()):
            if stage.name in found:
                raise RuntimeError(f"stage {stage.name!r} is defined twice")
            found[stage.name] = stage
    return found


STAGES: dict[str, Stage] = _collect()

__all__ = ["STAGES", "Stage", "StageContext"]
