# Shared by all rules: the validated config, artifact paths, and input functions.
import re
from pathlib import Path

from snakemake.exceptions import WorkflowError

from rose import stages
from rose.config import ConfigError, from_dict
from rose.layout import DENSE, RunLayout
from rose.joblog import log_to
from rose.methods import NEEDS_HESSIAN

try:
    CFG = from_dict(config)
except ConfigError as exc:  # one line naming the key and value, before any job runs
    raise WorkflowError(str(exc)) from None

try:  # a run directory belongs to one model/calibration/prune setting
    stages.check_run(CFG, write=False)
except ValueError as exc:
    raise WorkflowError(str(exc)) from None


onstart:
    stages.check_run(CFG)


LAYOUT = RunLayout(CFG.run_dir)
RUN = str(CFG.run_dir)
VARIANTS = {v.name: v for v in CFG.variants}
MODELS = [DENSE, *VARIANTS]
EVALUATION = CFG.evaluation


def keep_or_temp(path):
    """Layer inputs and Hessians are large: removed once consumed unless keep_intermediates."""
    return path if CFG.keep_intermediates else temp(path)


wildcard_constraints:
    variant="|".join(re.escape(v) for v in VARIANTS) or "^$",
    model="|".join(re.escape(m) for m in MODELS),
    layer=r"\d+",
    metric="|".join(re.escape(p.name) for p in (EVALUATION.perplexity if EVALUATION else ())) or "^$",


def model_json(wildcards=None):
    """model.json comes from a checkpoint: the layer count is known only after it."""
    return checkpoints.prepare_model.get().output[0]


def prune_layers():
    return stages.ModelInfo.load(model_json()).prune_layers


def method_of(wildcards):
    return VARIANTS[wildcards.variant].method


def prune_inputs(wildcards):
    layer = int(wildcards.layer)
    inputs = {"model": model_json()}
    if method_of(wildcards) in NEEDS_HESSIAN:
        inputs["hessians"] = str(LAYOUT.hessians(wildcards.variant, layer))
    if method_of(wildcards) in stages.METHODS_WITH_ORDER:
        inputs["order"] = str(LAYOUT.order(wildcards.variant, layer))
    return inputs


def variant_layers(wildcards):
    n = prune_layers()
    return {
        "model": model_json(),
        "pruned": [str(LAYOUT.pruned(wildcards.variant, i)) for i in range(n)],
        "stats": [str(LAYOUT.stats(wildcards.variant, i)) for i in range(n)],
    }


def evaluated_model(wildcards):
    """Dense is the prepared checkpoint (model.json points at it); a variant its reassembled dir."""
    if wildcards.model == DENSE:
        return []
    return str(LAYOUT.model_dir(wildcards.model))


def eval_outputs():
    if EVALUATION is None:
        return []
    outputs = [str(LAYOUT.perplexity(m, p.name)) for m in MODELS for p in EVALUATION.perplexity]
    if EVALUATION.zero_shot is not None:
        outputs += [str(LAYOUT.zero_shot(m)) for m in MODELS]
    return outputs


def final_outputs(wildcards):
    return [
        *(str(LAYOUT.model_dir(v)) for v in VARIANTS),
        str(LAYOUT.report_dir / "summary.csv"),
    ]
