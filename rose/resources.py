"""Per-job cluster requests: threads, host memory, wall time, GPUs, SLURM placement.

A 70B run and a 135M run need very different requests, and a layer job that
dies for lack of memory should come back bigger. So memory and runtime are
estimated from results/<run>/model.json (written by the `prepare_model`
checkpoint), multiplied by Snakemake's `attempt` on retries, and any value can
be pinned from the config's optional `resources:` section.

Pure estimation, no Snakemake: every function takes the run config (Snakemake's
`config`, or the raw mapping `rose.config` validates) explicitly.
workflow/rules/common.smk holds the glue rules use (stage_threads, stage_resources) (see docs/cluster.md):

    rule prune:
        threads: stage_threads("prune")
        resources: **stage_resources("prune")
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from rose.layout import RunLayout
from rose.sizing import DETAIL_KEYS, MB, Source, number, stage_figures
from rose.stages import STAGES as RECORDS

# Stages whose work is tensor math (their records' `gpu`): they get a GPU unless `device: cpu`.
GPU_STAGES = frozenset(name for name, stage in RECORDS.items() if stage.gpu)
CPU_STAGES = frozenset(name for name, stage in RECORDS.items() if not stage.gpu)
STAGES = GPU_STAGES | CPU_STAGES

# Used until model.json exists (first dry run, prepare_model itself): a 7B LLaMA.
FALLBACK_MODEL: Mapping[str, Any] = MappingProxyType(
    {
        "num_layers": 32,
        "hidden_size": 4096,
        "parameters": 6_738_415_616,
        "dtype": "float16",
    }
)
# On CPU-only runs the tensor stages are the compute: give them more cores.
CPU_DEVICE_THREADS = 8

# Keys of `config["resources"]` that steer the estimate and are never passed on
# to Snakemake as resources.
CONTROL_KEYS = frozenset({"threads", "max_mem_mb", "max_runtime", "gpu_stages", "cpu_stages"})
# Resources only meaningful for jobs that hold a GPU.
GPU_ONLY_KEYS = frozenset({"gpu", "gpu_model", "gres", "cpus_per_gpu", "tasks_per_gpu"})
# Resources scaled by `attempt` even when pinned in the config.
SCALED_KEYS = frozenset({"mem_mb", "runtime"})

# The model.json fields that size a layer; they are used together or not at all.
_SHAPE_KEYS = ("num_layers", "hidden_size", "parameters")
# Safety factors of a cluster request over the estimate.
RUNTIME_SAFETY = 3.0
MIN_RUNTIME = 10  # minutes
MEM_SAFETY = 1.3
# MB: interpreter, torch, CUDA context
BASE_MEM: Mapping[str, int] = MappingProxyType({"gpu": 6 * 1024, "cpu": 3 * 1024})

# Other names of stages (older spellings) that a `resources:` section may use.
_ALIASES = MappingProxyType({a: n for n, r in RECORDS.items() for a in r.aliases})


def _settings(cfg: Mapping[str, Any]) -> Mapping[str, Any]:
    """The `resources:` section of the config (optional, free-form)."""
    value = cfg.get("resources") or {}
    if not isinstance(value, Mapping):
        raise ValueError(f"config: resources must be a mapping, got {type(value).__name__}")
    return value


def check_stage(stage: str) -> str:
    """The canonical stage name, or a one-line ValueError naming the known ones."""
    stage = _ALIASES.get(stage, stage)
    if stage not in STAGES:
        raise ValueError(f"resources: unknown stage {stage!r} (known: {', '.join(sorted(STAGES))})")
    return stage


def uses_gpu(stage: str, cfg: Mapping[str, Any]) -> bool:
    """True when `stage` runs its math on a GPU under this config."""
    return check_stage(stage) in GPU_STAGES and cfg.get("device", "auto") != "cpu"


def stage_overrides(stage: str, cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Pinned values for `stage`: all-stage scalars < gpu_stages/cpu_stages < per-rule.

    GPU-only keys (gpu, gpu_model, gres, ...) given at the top level or under
    `gpu_stages` reach GPU stages only, so `resources: {gpu: 1}` never puts a
    GPU request on the report job.
    """
    stage = check_stage(stage)
    settings = _settings(cfg)
    is_gpu_stage = stage in GPU_STAGES
    merged: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, Mapping) or key in CONTROL_KEYS - {"threads"}:
            continue
        if key in GPU_ONLY_KEYS and not is_gpu_stage:
            continue
        merged[key] = value
    group = settings.get("gpu_stages" if is_gpu_stage else "cpu_stages") or {}
    merged.update(group)
    per_rule = settings.get(stage) or {}
    if not isinstance(per_rule, Mapping):
        raise ValueError(f"config: resources.{stage} must be a mapping, got {per_rule!r}")
    merged.update(per_rule)
    return merged


def model_json_path(cfg: Mapping[str, Any], wildcards: Any = None) -> Path:
    """results/<run>/model.json; a `run` wildcard wins over config['run']."""
    run = getattr(wildcards, "run", None) if wildcards is not None else None
    run = run or cfg.get("run")
    return RunLayout(Path(cfg.get("results_dir", "results")) / str(run)).model_json


def _usable_shape(raw: Mapping[str, Any]) -> bool:
    """num_layers >= 0 (0 still sizes one layer), hidden_size > 0, parameters > 0."""
    layers, hidden, params = (number(raw.get(key)) for key in _SHAPE_KEYS)
    if layers is None or hidden is None or params is None:
        return False
    return layers >= 0 and hidden > 0 and params > 0


def load_model_size(path: str | Path) -> dict[str, Any]:
    """num_layers, hidden_size, parameters, dtype from one model.json.

    A missing or unreadable file gives FALLBACK_MODEL. The three shape fields
    are only used as a set: a model.json lacking one of them (or holding a
    non-numeric or non-positive value) sizes the job as FALLBACK_MODEL's shape,
    since mixing, say, a 135M model's hidden size with a 7B parameter count
    would ask for terabytes. A missing dtype alone falls back to FALLBACK_MODEL's.
    """
    size = dict(FALLBACK_MODEL)
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return size
    if not isinstance(raw, Mapping):
        return size
    if _usable_shape(raw):
        size.update({key: raw[key] for key in _SHAPE_KEYS})
        # prune.layers or a partial model: the layers actually present still size a layer.
        size["num_layers"] = max(1, int(float(size["num_layers"])))
        # mixture-of-experts models: model.json has the exact per-layer sizes (DETAIL_KEYS)
        size.update({key: raw[key] for key in DETAIL_KEYS if number(raw.get(key))})
    if raw.get("dtype") is not None:
        size["dtype"] = raw["dtype"]
    return size


def model_size(cfg: Mapping[str, Any], wildcards: Any = None) -> dict[str, Any]:
    """The size of this run's model: load_model_size(model_json_path(cfg, wildcards))."""
    return load_model_size(model_json_path(cfg, wildcards))


def stage_estimate(
    stage: str,
    cfg: Mapping[str, Any],
    size: Mapping[str, Any],
    variants: int | None = None,
    source: Source | None = None,
) -> tuple[float, float]:
    """(host bytes held at the peak beyond the interpreter, seconds) for one job of `stage`:
    its record's estimate from the run's figures (`rose.sizing.StageFigures`).

    No safety factors: estimate_resources adds them for the cluster request;
    rose.preflight prints these (knowing the source and the variants, which sharpens
    prepare_model's and the report's figures). Hessians are float64 here to err high.
    """
    stage = check_stage(stage)
    kind = "gpu" if uses_gpu(stage, cfg) else "cpu"
    return RECORDS[stage].estimate(stage_figures(kind, cfg, size, variants, source))


def estimate_resources(
    stage: str, cfg: Mapping[str, Any], size: Mapping[str, Any]
) -> dict[str, int]:
    """Unscaled (attempt 1) estimate {'mem_mb', 'runtime'} for one job of `stage`.

    `size` is what model_size returns (optionally with DETAIL_KEYS); see
    stage_estimate for what is counted. mem_mb is the interpreter (plus CUDA)
    and 1.3 x the stage's peak; runtime is 3 x the estimate, at least 10 minutes.
    """
    stage = check_stage(stage)
    kind = "gpu" if uses_gpu(stage, cfg) else "cpu"
    host, seconds = stage_estimate(stage, cfg, size)
    mem_mb = BASE_MEM[kind] + MEM_SAFETY * host / MB
    runtime = RUNTIME_SAFETY * seconds / 60
    return {
        "mem_mb": int(math.ceil(mem_mb / 256) * 256),
        "runtime": int(max(MIN_RUNTIME, math.ceil(runtime))),
    }


def resolve_resources(
    stage: str, cfg: Mapping[str, Any], attempt: int = 1, wildcards: Any = None
) -> dict[str, Any]:
    """All resources of one `stage` job at `attempt`: estimate, then config pins, then caps."""
    values: dict[str, Any] = estimate_resources(stage, cfg, model_size(cfg, wildcards))
    if uses_gpu(stage, cfg):
        values["gpu"] = 1
    pinned = stage_overrides(stage, cfg)
    values.update({k: v for k, v in pinned.items() if k != "threads"})
    if values.get("gpu") in (0, None) or values.get("gres"):
        values.pop("gpu", None)  # gpu: 0 turns the request off; gres replaces it
    for key in SCALED_KEYS:
        if key in values:
            values[key] = int(values[key]) * int(attempt)
    settings = _settings(cfg)
    if settings.get("max_mem_mb"):
        values["mem_mb"] = min(values["mem_mb"], int(settings["max_mem_mb"]))
    if settings.get("max_runtime"):
        values["runtime"] = min(values["runtime"], int(settings["max_runtime"]))
    return values


def resolve_threads(stage: str, cfg: Mapping[str, Any]) -> int:
    """Threads (= SLURM --cpus-per-task) for `stage`; `resources.threads` or `resources.<stage>.threads` pins it."""
    stage = check_stage(stage)
    pinned = stage_overrides(stage, cfg)
    if "threads" in pinned:
        return int(pinned["threads"])
    if stage in GPU_STAGES and not uses_gpu(stage, cfg):
        return CPU_DEVICE_THREADS
    return RECORDS[stage].threads


def rule_resources(stage: str, cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments for a rule's `resources:` under this config.

    mem_mb and runtime are callables of (wildcards, attempt), Snakemake's
    names for them, so they see model.json once the checkpoint wrote it and
    grow on retries; everything else is fixed by the config and given as plain
    values, and keys not requested are left out so the profile's
    default-resources still apply.
    """
    stage = check_stage(stage)

    def lazy(key: str) -> Callable[[Any, int], Any]:
        def value(wildcards: Any, attempt: int) -> Any:
            return resolve_resources(stage, cfg, attempt, wildcards)[key]

        return value

    static = resolve_resources(stage, cfg)
    return {key: lazy(key) if key in SCALED_KEYS else val for key, val in static.items()}
