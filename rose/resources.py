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
from rose.plan import STAGES as PLAN_STAGES

# Stages whose work is tensor math (the plan's `gpu` hint): they get a GPU unless `device: cpu`.
GPU_STAGES = frozenset(name for name, stage in PLAN_STAGES.items() if stage.gpu)
CPU_STAGES = frozenset(name for name, stage in PLAN_STAGES.items() if not stage.gpu)
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
# Calibration defaults when the config leaves them out (the paper's 128 x 2048).
FALLBACK_CALIBRATION: Mapping[str, int] = MappingProxyType({"nsamples": 128, "seqlen": 2048})

DEFAULT_THREADS: Mapping[str, int] = MappingProxyType(
    {
        "prepare_model": 4,
        "capture_calibration": 2,
        "embed_calibration": 4,
        "shared_hessians": 4,
        "outliers": 4,
        "allocate": 1,
        "hessians": 4,
        "order": 4,
        "prune": 4,
        "forward": 4,
        "assemble": 4,
        "export": 1,
        "evaluate_perplexity": 4,
        "evaluate_zero_shot": 4,
        "report": 1,
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
_DTYPE_BYTES = MappingProxyType({"float32": 4, "float64": 8, "float16": 2, "bfloat16": 2})
_MB = 1024 * 1024
# Rough sustained throughputs (FLOP/s) and I/O rate (B/s) for the runtime guess;
# deliberately pessimistic: a too-long limit costs queue priority, a too-short
# one costs the job.
_FLOPS = MappingProxyType({"gpu": 5e12, "cpu": 2e10})  # float32 layer math (sweep, Hessians)
_EVAL_FLOPS = MappingProxyType({"gpu": 5e13, "cpu": 2e10})  # half-precision inference
_IO_RATE = 150e6
_RUNTIME_SAFETY = 3.0
_MIN_RUNTIME = 10  # minutes
_MEM_SAFETY = 1.3
# MB: interpreter, torch, CUDA context
_BASE_MEM = MappingProxyType({"gpu": 6 * 1024, "cpu": 3 * 1024})
# Evaluation size when the config does not bound it: WikiText-2 test is ~0.3M
# LLaMA tokens; a zero-shot task scores ~3000 docs x ~400 tokens (all choices).
_PPL_TOKENS = 5e5
_ZERO_SHOT_DOCS = 3000
_ZERO_SHOT_TOKENS_PER_DOC = 400
_ZERO_SHOT_TASKS = 7

# Older spelling kept working: both evaluation rules size alike.
_ALIASES = MappingProxyType({"evaluate": "evaluate_perplexity"})
# Stages that do another stage's work on other inputs: sized by its formulas.
_SIZED_AS = MappingProxyType({"shared_hessians": "hessians"})


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


def _number(value: Any) -> float | None:
    """A finite number (JSON int/float, or a numeric string), else None; bools are not numbers."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _usable_shape(raw: Mapping[str, Any]) -> bool:
    """num_layers >= 0 (0 still sizes one layer), hidden_size > 0, parameters > 0."""
    layers, hidden, params = (_number(raw.get(key)) for key in _SHAPE_KEYS)
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
        size.update({key: raw[key] for key in DETAIL_KEYS if _number(raw.get(key))})
    if raw.get("dtype") is not None:
        size["dtype"] = raw["dtype"]
    return size


def model_size(cfg: Mapping[str, Any], wildcards: Any = None) -> dict[str, Any]:
    """The size of this run's model: load_model_size(model_json_path(cfg, wildcards))."""
    return load_model_size(model_json_path(cfg, wildcards))


def _calibration_tokens(cfg: Mapping[str, Any]) -> int:
    calib = cfg.get("calibration") or {}
    nsamples = calib.get("nsamples") or FALLBACK_CALIBRATION["nsamples"]
    seqlen = calib.get("seqlen") or FALLBACK_CALIBRATION["seqlen"]
    return int(nsamples) * int(seqlen)


def _eval_tokens(stage: str, cfg: Mapping[str, Any]) -> float:
    """Tokens one evaluation job scores, bounded by max_windows / limit when set."""
    evaluation = cfg.get("evaluation") or {}
    if stage == "evaluate_perplexity":
        specs = evaluation.get("perplexity") or []
        seqlen = (cfg.get("calibration") or {}).get("seqlen") or FALLBACK_CALIBRATION["seqlen"]
        bounded = [
            p["max_windows"] * (p.get("seqlen") or seqlen) for p in specs if p.get("max_windows")
        ]
        return float(max(bounded)) if bounded and len(bounded) == len(specs) else _PPL_TOKENS
    zero_shot = evaluation.get("zero_shot") or {}
    tasks = len(zero_shot.get("tasks") or range(_ZERO_SHOT_TASKS))
    docs = zero_shot.get("limit") or _ZERO_SHOT_DOCS
    return float(tasks * docs * _ZERO_SHOT_TOKENS_PER_DOC)


# Optional keys of `size` with exact per-layer figures (rose.preflight computes them from
# the model's config.json, mixture-of-experts layers included). Each one present replaces the
# value that estimate_resources otherwise derives from the totals (which assume a dense LLaMA).
DETAIL_KEYS = (
    "layer_parameters",  # weights of the largest decoder layer
    "active_layer_parameters",  # weights one token goes through (MoE: the routed experts only)
    "hessian_elements",  # sum of in_features^2 over a layer's input groups (experts included)
    "hessian_token_flops",  # Hessian accumulation FLOPs per calibration token
    "sweep_flops",  # sum of rows * cols^2 + cols^3 over a layer's Linears
)


def _layer_figures(size: Mapping[str, Any]) -> dict[str, float]:
    """Per-layer weights, Hessian elements and FLOPs: `size`'s detail keys, else derived.

    Derived: a decoder layer holds about parameters / num_layers weights
    (embeddings included, so it errs high), and its widest input is the MLP's
    intermediate width, solved from layer ~ 2 h^2 (attention, GQA) + 3 h I.
    """
    params = float(size["parameters"])
    h = float(size["hidden_size"])
    layer = params / size["num_layers"]
    inter = max(h, (layer - 2 * h * h) / (3 * h))
    hess_elements = 3 * h * h + inter * inter  # qkv, o, gate/up, down input groups
    derived = {
        "layer_parameters": layer,
        "active_layer_parameters": layer,
        "hessian_elements": hess_elements,
        "hessian_token_flops": 2 * hess_elements,
        "sweep_flops": layer * inter + inter**3 + 3 * h**3,  # rows*cols^2 + cols^3 terms
    }
    for key in DETAIL_KEYS:
        value = _number(size.get(key))
        if value is not None and value > 0:
            derived[key] = value
    return derived


def stage_estimate(
    stage: str, cfg: Mapping[str, Any], size: Mapping[str, Any]
) -> tuple[float, float]:
    """(host bytes held at the peak beyond the interpreter, seconds) for one job of `stage`.

    No safety factors: estimate_resources adds them for the cluster request;
    rose.preflight prints these. Hessians are float64 here to err high.
    """
    stage = check_stage(stage)
    kind = "gpu" if uses_gpu(stage, cfg) else "cpu"
    params = float(size["parameters"])
    fig = _layer_figures(size)
    h = float(size["hidden_size"])
    layer = fig["layer_parameters"]
    dbytes = _DTYPE_BYTES.get(str(size["dtype"]), 4)
    tokens = _calibration_tokens(cfg)
    acts = tokens * h * 4  # one layer's hidden states, float32
    hess = 8 * fig["hessian_elements"]
    weights32 = layer * 4
    sweep_flops = fig["sweep_flops"]
    fwd_flops = 2 * tokens * fig["active_layer_parameters"]
    host = {  # bytes held at the peak, beyond the interpreter
        "prepare_model": 6 * 1024 * _MB,  # streams shards; GGUF sources are small
        "capture_calibration": 1024 * _MB,
        "embed_calibration": 2 * acts + params / size["num_layers"] * dbytes,
        "outliers": 3 * weights32 + 2 * acts,
        "allocate": 256 * _MB,
        "hessians": 2 * weights32 + acts + hess,
        "order": 2 * weights32 + 2 * hess,
        "prune": 3 * weights32 + 2 * hess,
        "forward": 2 * weights32 + 2 * acts,
        "assemble": 4 * layer * dbytes + min(5 * 1024 * _MB, params * dbytes),  # + one shard
        "export": 4 * layer * dbytes + 300 * _MB,  # one tensor at a time, a few copies of it
        "evaluate_perplexity": 1.2 * params * dbytes,
        "evaluate_zero_shot": 1.2 * params * dbytes,
        "report": 1024 * _MB,
    }[_SIZED_AS.get(stage, stage)]
    seconds = {
        "prepare_model": 40 * 60.0,  # size unknown until it ran: a 70B download
        "capture_calibration": 120.0,
        "embed_calibration": 2 * acts / _IO_RATE,
        "outliers": fwd_flops / _FLOPS[kind] + 3 * acts / _IO_RATE + 2 * layer * dbytes / _IO_RATE,
        "allocate": 5.0,
        "hessians": (fwd_flops + tokens * fig["hessian_token_flops"]) / _FLOPS[kind]
        + 2 * acts / _IO_RATE,
        "order": sweep_flops / _FLOPS[kind] + 2 * hess / _IO_RATE,
        "prune": 2 * sweep_flops / _FLOPS[kind] + 2 * hess / _IO_RATE,
        "forward": fwd_flops / _FLOPS[kind] + 3 * acts / _IO_RATE,
        "assemble": 2 * params * dbytes / _IO_RATE,
        "export": 2 * params * dbytes / _IO_RATE,
        "evaluate_perplexity": 2 * params * _eval_tokens(stage, cfg) / _EVAL_FLOPS[kind]
        + params * dbytes / _IO_RATE,
        "evaluate_zero_shot": 2 * params * _eval_tokens(stage, cfg) / _EVAL_FLOPS[kind]
        + params * dbytes / _IO_RATE,
        "report": 60.0,
    }[_SIZED_AS.get(stage, stage)]
    return host, seconds


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
    mem_mb = _BASE_MEM[kind] + _MEM_SAFETY * host / _MB
    runtime = _RUNTIME_SAFETY * seconds / 60
    return {
        "mem_mb": int(math.ceil(mem_mb / 256) * 256),
        "runtime": int(max(_MIN_RUNTIME, math.ceil(runtime))),
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
    return DEFAULT_THREADS[stage]


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
