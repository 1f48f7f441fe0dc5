"""The export stage: a shippable copy of a variant in one format, with its model card.

It runs once the variant's evaluations exist, so the card quotes every number
of the run (the formats themselves live in `rose.export`).
"""

from __future__ import annotations

from typing import Any

from rose.artifacts import config_hash
from rose.checkpoint import SHARD_BYTES
from rose.export import ExportRequest, check_formats, export_directory
from rose.layout import DENSE
from rose.provenance import variant_settings
from rose.stages.evaluation import evaluation_outputs
from rose.stages.spec import EVALUATE, Stage, StageContext


def export_variant(ctx: StageContext, shard_bytes: int = SHARD_BYTES) -> dict[str, Any]:
    """`<variant>/model/` -> `<variant>/export/<format>/` (atomic), with model card and export.json."""
    fmt, variant = ctx.wildcards["format"], ctx.variant
    check_formats([fmt])
    request = ExportRequest(
        variant=variant.name,
        sparsity=variant.sparsity,
        model_dir=ctx.layout.model_dir(variant.name),
        fingerprint=ctx.model_info.fingerprint,
        config_hash=config_hash(variant_settings(ctx.cfg, variant)),
        run=ctx.cfg.run,
    )
    return export_directory(
        request, fmt, ctx.outputs["export_dir"], run_dir=ctx.cfg.run_dir, shard_bytes=shard_bytes
    )


def _inputs(plan, w) -> dict:
    variant = w["variant"]
    return {
        "model_dir": plan.layout.model_dir(variant),
        # the model card quotes every evaluation of the variant and of dense
        "evals": [p for p in evaluation_outputs(plan) if p.parent.parent.name in (variant, DENSE)],
    }


STAGES = (
    Stage(
        "export",
        export_variant,
        outputs=lambda L, w: {"export_dir": L.export_dir(w["variant"], w["format"])},
        # one tensor at a time, a few copies of it
        estimate=lambda f: (4 * f.layer * f.dbytes + 300 * 1024**2, f.io(2 * f.params * f.dbytes)),
        wildcards=("variant", "format"),
        steps=lambda plan: [
            {"variant": v, "format": x} for v in plan.variants for x in plan.formats
        ],
        inputs=_inputs,
        directories=frozenset({"export_dir"}),
        phase=EVALUATE,
        final=True,
        threads=1,
        # dense: hard links to model/; compressed: below the dense size
        writes=lambda s, name, w: s.side if w["format"] == "dense" else s.model,
        disk={"export_dir": "exports"},
    ),
)
