"""The pipeline stages: one module per stage family, each stage one function.

Each stage reads artifacts and writes one atomically; the Snakemake rules and
the in-process runner (`rose.runner`) call exactly these functions, so the
workflow and `python -m rose run` produce identical bytes. The package
re-exports every stage, so callers write `stages.prune_layer(...)`.
"""

from rose.model_info import prepare_model
from rose.stages.allocation import allocate, outlier_statistics
from rose.stages.assemble import assemble_model
from rose.stages.calibration import capture_calibration, embed_calibration
from rose.stages.evaluation import build_report, evaluate_perplexity, evaluate_zero_shot
from rose.stages.layer import (
    compute_hessians,
    compute_order,
    forward_layer,
    prune_layer,
)

__all__ = [
    "allocate",
    "outlier_statistics",
    "assemble_model",
    "build_report",
    "capture_calibration",
    "compute_hessians",
    "compute_order",
    "embed_calibration",
    "evaluate_perplexity",
    "evaluate_zero_shot",
    "forward_layer",
    "prepare_model",
    "prune_layer",
]
