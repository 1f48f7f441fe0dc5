"""Pre-flight: what a run will cost, from the model's config alone, before anything runs.

`python -m rose plan` prints it, and both drivers check it first: the number of
jobs per stage (from `rose.plan`, the same steps the drivers run), and per stage
the disk it writes, the host RAM and GPU memory it holds, and a rough time, plus
the run's peak disk in `results_dir`. A run whose predicted peak does not fit in
the free space is refused before its first job, with one line naming what takes
the space and the config keys that reduce it (`--force`, or `ROSE_FORCE=1` for
Snakemake, starts it anyway).

Nothing here reads a weight. The shapes come from config.json (a local
directory, a hub id's config, the prepared checkpoint that model.json names) or
from a GGUF file's header, and every Linear's shape is computed from the config
fields (mixture-of-experts layers included, each expert with its own Hessians,
although the pipeline does not prune those families yet).

Disk is predicted by walking the plan's steps with the drivers' cleanup rules:

- `python -m rose run` goes variant by variant, layer by layer, and removes an
  intermediate once no step still to run reads it: its peak is that walk's
  maximum (usually the end of the run, when every pruned layer and reassembled
  model is kept).
- Snakemake may run any ready job, of any variant, in any order (with one core
  too: it may take layer 5 of every variant before layer 6 of any), so each
  variant may hold its largest set of intermediates (two layers' inputs, or
  inputs and Hessians) at the same time: its peak is everything kept at the
  end plus the shared layer-0 inputs plus every variant's largest set at once.

A resumed run counts what is already on disk (at its actual size) and only the
steps that still have to run, so the space it needs is the peak minus what is
already there. Times are FLOPs over rough device throughputs (rose.resources)
plus disk I/O: an order of magnitude, not a promise.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rose import checkpoint as ckpt
from rose import plan as graph
from rose import resources
from rose.config import ConfigError, RunConfig
from rose.device import compute_dtype, storage_dtype
from rose.errors import first_line
from rose.layout import DENSE, RunLayout
from rose.model_info import ModelInfo
from rose.sizing import (
    BLOCK,
    DTYPE_BYTES,
    IO_RATE,
    LAYER_FLOPS,
    TOKENIZER_PER_TOKEN,
    DiskSizer,
    GpuFigures,
    ModelShape,
    Source,
    blocks,
    detail_sizes,
    model_shape,
)
from rose.stages import STAGES

log = logging.getLogger("rose")

FORCE_ENV = "ROSE_FORCE"
_LOG = 8 * 1024  # one Snakemake job log (the runner writes none)
HESSIANS = "Hessians"  # the disk category of a layer's Hessians (stage records' `disk`)
# Host memory of the interpreter with torch, transformers and lm-eval imported (measured:
# 0.6 GB on CPU), and with a CUDA context; each stage's own peak (rose.resources) comes on top.
_INTERPRETER = {"cpu": 1.0e9, "cuda": 3.0e9}
_JOB_OVERHEAD = 0.5  # seconds: open the checkpoint, build the layer, write the artifact


class PreflightError(ValueError):
    """The run does not fit: one line naming the shortfall and the config keys that reduce it."""


# ---------------------------------------------------------------- the model's config, no weights


@dataclass(frozen=True)
class ModelSource:
    """What the pre-flight knows of the model, and what preparing it writes."""

    config: Any
    dtype: str  # of the prepared checkpoint (GGUF: float32 after dequantisation)
    origin: str  # where the config was read, for the printout
    kind: str  # prepared | directory | hub | gguf | pickle
    copy_dir: Path | None = None  # run_dir/model, when prepare_model writes a converted copy
    side_bytes: int | None = None  # config/tokenizer files copied next to each reassembled model
    parameters: int | None = None  # exact, from model.json


def _dtype_name(value: Any) -> str | None:
    if value is None:
        return None
    name = str(value).removeprefix("torch.")
    return name if name in DTYPE_BYTES else None


def _safetensors_dtype(path: Path) -> str | None:
    """The dtype of the first layer weight in a safetensors dir, from one shard header."""
    for shard in sorted(path.glob("*.safetensors")):
        try:
            meta = ckpt.tensor_meta(shard)
        except (ckpt.ModelSourceError, KeyError):
            continue
        for name, (dtype, _) in sorted(meta.items(), key=lambda kv: ".layers." not in kv[0]):
            if name.endswith(".weight"):
                return _dtype_name(dtype)
    return None


def _side_bytes(path: Path) -> int:
    return sum(
        blocks(f.stat().st_size)
        for f in path.iterdir()
        if f.is_file() and not ckpt.is_weight_file(f.name)
    )


def _auto_config(source: str | Path, cfg: RunConfig, **kwargs: Any) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(
            str(source), trust_remote_code=cfg.model.trust_remote_code, **kwargs
        )
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError, ... for these
        raise ckpt.ModelSourceError(
            f"model {source}: cannot read its config.json ({first_line(exc)})"
        ) from None


def read_source(cfg: RunConfig) -> ModelSource:
    """The model's config as the run will see it, resolved like rose.checkpoint.prepare_model.

    model.json (a prepared run) wins; else a converted copy already under
    run_dir/model; else the source itself: a GGUF header, a local directory's
    config.json, or a hub id's config.json (one small download, or the cache).
    """
    layout = RunLayout(cfg.run_dir)
    copy_dir = cfg.run_dir / "model"
    if layout.model_json.exists():
        info = ModelInfo.load(layout.model_json)
        path = Path(info.path)
        copied = path.resolve() == copy_dir.resolve()
        return ModelSource(
            _auto_config(path, cfg),
            info.dtype,
            f"{path}/config.json (model.json)",
            "prepared",
            copy_dir if copied else None,
            _side_bytes(path),
            info.parameters,
        )
    source = cfg.model.source
    if source in ckpt.PACKAGED or source.endswith(".gguf"):
        if (copy_dir / "config.json").is_file():  # converted by an earlier, interrupted run
            return ModelSource(
                _auto_config(copy_dir, cfg),
                "float32",
                f"{copy_dir}/config.json",
                "gguf",
                copy_dir,
                _side_bytes(copy_dir),
            )
        gguf = ckpt.packaged_gguf(source) if source in ckpt.PACKAGED else Path(source).expanduser()
        if not gguf.is_file():
            raise ckpt.ModelSourceError(f"model.source {source}: GGUF file does not exist")
        return ModelSource(
            ckpt.gguf_config(gguf), "float32", f"{gguf} (GGUF header)", "gguf", copy_dir
        )
    path = Path(source).expanduser()
    if path.is_dir():
        config = _auto_config(path, cfg)
        # Pickle weights are converted into run_dir/model; safetensors are used in place (and so
        # is a directory without weights, which prepare_model will refuse: sized all the same).
        pickle = not ((path / ckpt.INDEX).is_file() or any(path.glob("*.safetensors"))) and bool(
            list(path.glob("*.bin")) + list(path.glob("*.pt"))
        )
        dtype = _dtype_name(getattr(config, "dtype", None)) or _safetensors_dtype(path)
        return ModelSource(
            config,
            dtype or "float32",
            f"{path}/config.json",
            "pickle" if pickle else "directory",
            copy_dir if pickle else None,
            _side_bytes(path),
        )
    if path.exists() or source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise ckpt.ModelSourceError(
            f"model.source {source}: no such model directory, .gguf file or hub id"
        )
    config = _auto_config(source, cfg, revision=cfg.model.revision)
    return ModelSource(
        config,
        _dtype_name(getattr(config, "dtype", None)) or "float32",
        f"{source} (hub config.json)",
        "hub",
    )


# ---------------------------------------------------------------- the prediction


@dataclass
class StageRow:
    stage: str
    jobs: int = 0
    to_run: int = 0
    writes: float = 0.0  # bytes written per job (mean)
    host: float = (
        0.0  # bytes of host RAM per job: the interpreter + the stage's peak (rose.resources)
    )
    gpu: float = 0.0  # bytes of GPU memory per job (allocated by torch; 0 on CPU)
    seconds: float = 0.0  # per job


@dataclass
class DiskPeak:
    """Bytes under run_dir at a driver's peak, by what holds them."""

    total: float
    parts: dict[str, tuple[int, float]]  # category -> (files, bytes)
    where: str  # the step at the peak, or a description


@dataclass
class Prediction:
    cfg: RunConfig
    source: ModelSource
    shape: ModelShape
    device: str  # cpu | cuda
    compute_dtype: str
    storage_dtype: str
    rows: dict[str, StageRow]
    existing: float  # bytes of this run's artifacts already on disk
    runner: DiskPeak
    snakemake: DiskPeak
    final: float  # bytes under run_dir when the run is done (runner)
    variants_with_inputs: int
    layer_inputs: float  # bytes of one layer's inputs
    hessians: float  # bytes of one layer's Hessians (largest layer)
    pruned_layer: float = 0.0  # bytes of one layer's pruned weights (largest layer)
    notes: list[str] = field(default_factory=list)

    @property
    def handoff_held(self) -> float:
        """Host memory the in-process handoff holds at most (rose.handoff): the layer's inputs
        and the next layer's being written, the shared layer-0 inputs, one layer's Hessians and
        its pruned weights; capped by handoff_memory."""
        return 3 * self.layer_inputs + self.hessians + self.pruned_layer

    @property
    def host_peak(self) -> float:
        return max((r.host for r in self.rows.values() if r.to_run), default=0.0)

    @property
    def gpu_peak(self) -> float:
        return max((r.gpu for r in self.rows.values() if r.to_run), default=0.0)

    @property
    def seconds(self) -> float:
        return sum(r.seconds * r.to_run for r in self.rows.values())

    def peak(self, driver: str) -> DiskPeak:
        return self.snakemake if driver == "snakemake" else self.runner

    def needed(self, driver: str) -> float:
        """Free space this run still needs: its peak minus what is already on disk."""
        return max(0.0, self.peak(driver).total - self.existing)


def _disk_size(path: Path, seen: set[tuple[int, int]] | None = None) -> float:
    """Bytes a file or directory tree occupies (allocated blocks, as du counts them): a file
    hard-linked in several places counts once per `seen` (the inodes counted so far)."""
    seen = set() if seen is None else seen
    try:
        st = path.lstat()
    except OSError:
        return 0.0
    if st.st_nlink > 1 and not path.is_dir():
        if (st.st_dev, st.st_ino) in seen:
            return 0.0
        seen.add((st.st_dev, st.st_ino))
    total = float(getattr(st, "st_blocks", 0) * 512 or st.st_size)
    if path.is_dir() and not path.is_symlink():
        for child in sorted(path.iterdir()):
            total += _disk_size(child, seen)
    return total


def resolve_kind(cfg: RunConfig) -> str:
    """The device the tensor stages will use: cuda when the config asks for it or auto finds one."""
    if cfg.device == "cuda":
        return "cuda"
    if cfg.device == "cpu":
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _dtypes(cfg: RunConfig, model_dtype: str, kind: str) -> tuple[str, str]:
    """(compute dtype, layer-input storage dtype): rose.device's rules."""
    info = _model_info(cfg, model_dtype)
    dtype = compute_dtype(cfg, info, torch.device(kind))
    return str(dtype).removeprefix("torch."), str(storage_dtype(dtype))


def _model_info(
    cfg: RunConfig, dtype: str, shape: ModelShape | None = None, parameters: int = 0
) -> ModelInfo:
    """A model.json as prepare_model would write it, from the config alone."""
    layers = shape.num_layers if shape is not None else 0
    return ModelInfo(
        path="",
        source=cfg.model.source,
        fingerprint="",
        model_type=shape.model_type if shape is not None else "",
        num_layers=layers,
        prune_layers=min(cfg.layers or layers, layers),
        hidden_size=shape.hidden_size if shape is not None else 0,
        max_positions=shape.max_positions if shape is not None else None,
        dtype=dtype,
        parameters=parameters,
    )


def _tally(items: Iterable[tuple[str, float]]) -> dict[str, tuple[int, float]]:
    parts: dict[str, tuple[int, float]] = {}
    for category, size in items:
        n, total = parts.get(category, (0, 0.0))
        parts[category] = (n + 1, total + size)
    return parts


def _chain(step: graph.Step) -> str | None:
    """The chain of intermediates a step belongs to: its variant's, or the dense statistics
    pass's (a layer step of no variant), or none (the shared steps)."""
    w = dict(step.wildcards)
    return w.get("variant") or (DENSE if "layer" in w else None)


def predict(
    cfg: RunConfig,
    evaluate: bool = True,
    report: bool = True,
    source: ModelSource | None = None,
    kind: str | None = None,
) -> Prediction:
    """Jobs, disk, memory and time of this config's run, from the model's config alone."""
    source = source or read_source(cfg)
    shape = model_shape(source.config)
    parameters = source.parameters or shape.parameters
    kind = kind or resolve_kind(cfg)
    compute, storage = _dtypes(cfg, source.dtype, kind)
    info = _model_info(cfg, source.dtype, shape, parameters)
    plan = graph.Plan(cfg, info)
    steps = plan.steps(evaluate=evaluate, report=report)
    need = graph.needed_steps(steps, plan.targets(evaluate=evaluate, report=False))
    runs = [s for s in steps if s.record.always or s.key in need]
    side = (
        source.side_bytes
        if source.side_bytes is not None
        else blocks(shape.vocab_size * TOKENIZER_PER_TOKEN)
    )
    sizer = DiskSizer(
        cfg,
        shape,
        parameters,
        DTYPE_BYTES.get(source.dtype, 4),
        DTYPE_BYTES[storage],
        side + 2 * BLOCK,
        0.0,
    )
    copy = sizer.model if source.copy_dir is not None else 0.0
    depth = info.prune_layers

    # ------------------------------------------------ disk: walk the runner's order
    layout = plan.layout
    sizes: dict[Path, float] = {}
    category: dict[Path, str] = {}
    for step in steps:
        for name, path in step.outputs.items():
            sizes[path] = step.record.writes(sizer, name, dict(step.wildcards))
            category[path] = step.record.disk.get(name, "small files")
    copy_path = source.copy_dir
    present: dict[Path, float] = {}
    seen_inodes: set[tuple[int, int]] = set()
    for path in sizes:
        if path.exists():
            present[path] = _disk_size(path, seen_inodes)
    if copy_path is not None and copy_path.exists():
        present[copy_path] = _disk_size(copy_path, seen_inodes)
        category[copy_path] = "model copy"
    present[layout.run_dir / "run.json"] = 3.0 * BLOCK  # run.json, config.effective.yaml, the lock
    category[layout.run_dir / "run.json"] = "small files"
    dirs = {p.parent for p in sizes} | {layout.run_dir}
    existing = sum(present.values())

    temporary = {path for s in steps for path in s.temporary}
    readers = graph.consumers(steps)
    pending = {s.key for s in runs}
    chain_of = {path: _chain(s) for s in steps for path in s.outputs.values()}
    chain_peak: dict[str, float] = {}
    chain_temp: dict[str, float] = {}
    tracked: set[Path] = set()  # intermediates of a chain written in this walk
    total = existing
    best = (total, dict(present), "before the first step")
    dir_bytes = BLOCK * len(dirs)
    for step in runs:
        writing = {p: sizes[p] for p in step.outputs.values()}
        # preparing the model may write a converted copy of it beside model.json
        if layout.model_json in writing and copy_path is not None and copy_path not in present:
            writing[copy_path] = copy
            category[copy_path] = "model copy"
        during = total + sum(writing.values())
        if during > best[0]:
            best = (
                during,
                {**present, **{p: present.get(p, 0.0) + s for p, s in writing.items()}},
                step.describe(),
            )
        for path, size in writing.items():
            chain = chain_of.get(path)
            if path in temporary and chain:
                chain_temp[chain] = chain_temp.get(chain, 0.0) + size
                tracked.add(path)
        for chain, temp in chain_temp.items():
            chain_peak[chain] = max(chain_peak.get(chain, 0.0), temp)
        for path, size in writing.items():
            total += size - present.get(path, 0.0)
            present[path] = size
        pending.discard(step.key)
        for path in step.input_paths():
            if (
                path in temporary
                and path in present
                and not any(r.key in pending for r in readers.get(path, []))
            ):
                total -= present.pop(path)
                if path in tracked:
                    chain_temp[chain_of[path]] -= sizes[path]
    final = total

    def peak(value: float, state: Mapping[Path, float], where: str) -> DiskPeak:
        parts = _tally((category.get(p, "small files"), s) for p, s in state.items())
        n, small = parts.get("small files", (0, 0.0))
        parts["small files"] = (n + len(dirs), small + dir_bytes)
        return DiskPeak(value + dir_bytes, parts, where)

    runner = peak(*best)
    # Snakemake: everything kept at the end, the shared intermediates (of no chain) while any
    # step still to run reads them, and every chain's largest set of intermediates at once;
    # plus one log per job.
    logs = _LOG * len(runs)
    state = dict(present)
    made_by = graph.producers(steps)
    run_keys = {s.key for s in runs}
    extra = []
    for path in sorted(temporary):
        if chain_of.get(path) is not None or path in state:
            continue
        if made_by[path].key in run_keys and any(r.key in need for r in readers.get(path, [])):
            extra.append((f"shared {category[path]}", sizes[path]))
    transient = [(v, t) for v, t in chain_peak.items() if t > 0]
    snake_total = final + sum(s for _, s in extra) + sum(t for _, t in transient) + logs
    parts = _tally((category.get(p, "small files"), s) for p, s in state.items())
    for name, size in extra:
        n, b = parts.get(name, (0, 0.0))
        parts[name] = (n + 1, b + size)
    for _chain_name, temp in transient:
        n, b = parts.get("intermediates", (0, 0.0))
        parts["intermediates"] = (n + 1, b + temp)
    n, small = parts.get("small files", (0, 0.0))
    parts["small files"] = (n + len(dirs) + len(runs), small + dir_bytes + logs)
    snakemake = DiskPeak(snake_total + dir_bytes, parts, "every variant's intermediates at once")

    # ------------------------------------------------ per stage: jobs, writes, memory, time
    raw = dict(cfg.raw)
    raw["device"] = kind
    largest = shape.largest_layer(depth)
    size = {
        "num_layers": shape.num_layers,
        "hidden_size": shape.hidden_size,
        "parameters": parameters,
        "dtype": source.dtype,
        **detail_sizes(largest, cfg.moe.calibrate_all_experts),
    }
    figures_source = Source(source.kind, copy, sizer.model)
    gpu = GpuFigures(cfg, shape, largest, DTYPE_BYTES[compute])
    rows: dict[str, StageRow] = {}
    for step in steps:  # in the order the runner takes them: the pipeline's order
        row = rows.setdefault(step.stage, StageRow(step.stage))
        row.jobs += 1
        row.to_run += step.record.always or step.key in need
        row.writes += sum(sizes[p] for p in step.outputs.values())
        if layout.model_json in step.outputs.values():
            row.writes += copy
    for row in rows.values():
        record = STAGES[row.stage]
        row.writes /= max(row.jobs, 1)
        host, seconds = resources.stage_estimate(
            row.stage, raw, size, variants=len(cfg.variants), source=figures_source
        )
        on_gpu = kind == "cuda" and row.stage in resources.GPU_STAGES
        row.host = _INTERPRETER["cuda" if on_gpu else "cpu"] + host
        row.seconds = seconds + _JOB_OVERHEAD
        if on_gpu:
            row.gpu = record.gpu_memory(gpu)

    notes = []
    if source.kind == "hub":
        notes.append(
            f"the hub snapshot ({human(sizer.model)}) goes to the Hugging Face cache (HF_HUB_CACHE), "
            "outside results_dir, unless it is cached already"
        )
    device_memory = _device_memory() if kind == "cuda" else None
    for row in rows.values():
        if device_memory and row.to_run and row.gpu > device_memory:
            notes.append(
                f"{row.stage} needs about {human(row.gpu)} of GPU memory, more than this GPU's "
                f"{human(device_memory)}"
            )
    hessians = [  # one layer's Hessians, as the disk breakdown calls them
        sizes[path]
        for s in steps
        for name, path in s.outputs.items()
        if s.record.disk.get(name) == HESSIANS
    ]
    return Prediction(
        cfg=cfg,
        source=source,
        shape=shape,
        device=kind,
        compute_dtype=compute,
        storage_dtype=storage,
        rows=rows,
        existing=existing,
        runner=runner,
        final=final + dir_bytes,
        snakemake=snakemake if snakemake.total >= runner.total else runner,
        variants_with_inputs=sum(1 for v in cfg.variants if v.needs_hessian),
        layer_inputs=sizer.inputs,
        hessians=max(hessians, default=0.0),
        pruned_layer=float(largest.parameters * sizer.dbytes),
        notes=notes,
    )


def _device_memory() -> float | None:
    """Memory of the GPU the stages would use, when there is one here (a login node has none)."""
    if not torch.cuda.is_available():
        return None
    return float(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)


# ---------------------------------------------------------------- printing and refusing


def human(nbytes: float) -> str:
    """Decimal units, as disks are sold: 8.6 GB."""
    value = float(nbytes)
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if abs(value) < 1000 or unit == "PB":
            if unit == "B":
                return f"{value:.0f} B"
            return f"{value:.1f} {unit}" if abs(value) < 100 else f"{value:.0f} {unit}"
        value /= 1000
    raise AssertionError


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s" if seconds >= 1 else f"{seconds:.1f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def _parameters(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"


def _count(n: float) -> str:
    return f"{n:,}"


def free_space(path: Path) -> float:
    """Free bytes (for this user) on the filesystem that holds `path` or its nearest existing parent."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return float(shutil.disk_usage(path).free)


def _describe(category: str, files: int, total: float, pred: Prediction) -> str:
    each = total / max(files, 1)
    if category == "intermediates":
        two = 2 * pred.layer_inputs
        what = (
            f"2 layer inputs of {human(pred.layer_inputs)}"
            if abs(each - two) < 0.05 * two
            else f"{human(each)} of layer inputs and Hessians"
        )
        return f"{files} variants x {what}"
    if category in ("shared layer inputs", "shared Hessians"):
        what = "inputs" if category == "shared layer inputs" else "Hessians"
        return f"the shared layer-0 {what} of {human(total)}"
    if category == "model copy":
        return f"the converted model copy of {human(total)}"
    if category in ("small files", "order files", "calibration tokens"):
        return f"{category} {human(total)}"
    return f"{files} {category} of {human(each)}"


_KEYS = {
    "layer inputs": "calibration.nsamples/seqlen",
    "intermediates": "calibration.nsamples/seqlen",
    "shared layer inputs": "calibration.nsamples/seqlen",
    "reassembled models": "fewer variants per run (methods, sparsities)",
    "pruned layers": "fewer variants per run (methods, sparsities)",
    "order files": "fewer variants per run (methods, sparsities)",
    "model copy": "a safetensors model.source (used in place, not copied)",
}


def shortfall(
    pred: Prediction, driver: str, free: float | None = None, force_hint: str | None = None
) -> str | None:
    """The one-line refusal when the run's remaining peak does not fit in the free space, else None."""
    free = free_space(pred.cfg.run_dir) if free is None else free
    needed = pred.needed(driver)
    if needed <= free:
        return None
    peak = pred.peak(driver)
    ranked = sorted(peak.parts.items(), key=lambda kv: -kv[1][1])
    shown = [(c, n, b) for c, (n, b) in ranked if b > 0][:4]
    parts = " + ".join(_describe(c, n, b, pred) for c, n, b in shown)
    who = "Snakemake, every variant at once" if driver == "snakemake" else "python -m rose run"
    there = (
        f"; {human(pred.existing)} of it already there" if pred.existing > 4 * BLOCK * 16 else ""
    )
    keys: list[str] = []
    if pred.cfg.keep_intermediates:
        keys.append("keep_intermediates: false")
    for c, _, _ in shown:
        key = _KEYS.get(c)
        if key and key not in keys:
            keys.append(key)
    if any(c == "pruned layers" for c, _, _ in shown):
        keys.append("prune.layers")
    keys.append("another results_dir")
    force = force_hint or ("ROSE_FORCE=1" if driver == "snakemake" else "--force")
    return (
        f"{pred.cfg.run_dir} needs about {human(needed)} free for this run "
        f"(peak, {who}: {human(peak.total)} = {parts}{there}); {human(free)} free. "
        f"Reduce it with {', '.join(keys[:-1])} or {keys[-1]}; {force} to start anyway."
    )


def format_report(pred: Prediction, driver: str | None = None, free: float | None = None) -> str:
    """The table `rose plan` prints (and both drivers log before their first job)."""
    cfg, shape, src = pred.cfg, pred.shape, pred.source
    c = cfg.calibration
    depth = min(cfg.layers or shape.num_layers, shape.num_layers)
    params = src.parameters or shape.parameters
    lines = [
        f"rose plan: run {cfg.run} -> {cfg.run_dir}",
        f"model: {cfg.model.source}: {shape.model_type}, {shape.num_layers} layers"
        + (f" ({depth} pruned)" if depth < shape.num_layers else "")
        + f", hidden {shape.hidden_size}, {_parameters(params)} parameters, {src.dtype}"
        f" (config: {src.origin}; no weights read)",
        f"device: {pred.device}, computes in {pred.compute_dtype}, stores layer inputs as {pred.storage_dtype}; "
        f"calibration {c.nsamples} x {c.seqlen} tokens: one layer's inputs {human(pred.layer_inputs)}, "
        f"one layer's Hessians {human(pred.hessians)}",
        f"variants: {len(cfg.variants)} ({pred.variants_with_inputs} keep layer inputs)"
        f"{', keep_intermediates: true' if cfg.keep_intermediates else ''}",
        "",
    ]
    header = (
        "stage",
        "jobs",
        "to run",
        "writes/job",
        "host RAM/job",
        "GPU mem/job",
        "time/job",
        "time, to run",
    )
    table = [header]
    for row in pred.rows.values():
        table.append(
            (
                row.stage,
                _count(row.jobs),
                _count(row.to_run),
                human(row.writes),
                human(row.host),
                human(row.gpu) if row.gpu else "-",
                duration(row.seconds),
                duration(row.seconds * row.to_run),
            )
        )
    total_jobs = sum(r.jobs for r in pred.rows.values())
    to_run = sum(r.to_run for r in pred.rows.values())
    table.append(
        (
            "run",
            _count(total_jobs),
            _count(to_run),
            "",
            f"max {human(pred.host_peak)}",
            f"max {human(pred.gpu_peak)}" if pred.gpu_peak else "-",
            "",
            duration(pred.seconds),
        )
    )
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for i, r in enumerate(table):
        cells = [r[0].ljust(widths[0])] + [
            v.rjust(w) for v, w in zip(r[1:], widths[1:], strict=True)
        ]
        lines.append("  ".join(cells).rstrip())
        if i == 0 or i == len(table) - 2:
            lines.append("  ".join("-" * w for w in widths))
    free = free_space(cfg.run_dir) if free is None else free
    lines += [
        "",
        f"disk under {cfg.run_dir} ({human(free)} free on its filesystem):",
        f"  at the end of the run: {human(pred.final)}"
        + (f"; already there: {human(pred.existing)}" if pred.existing > 4 * BLOCK * 16 else ""),
    ]
    for name, peak_driver in (("python -m rose run", "runner"), ("Snakemake", "snakemake")):
        peak = pred.peak(peak_driver)
        ranked = sorted(peak.parts.items(), key=lambda kv: -kv[1][1])
        parts = " + ".join(_describe(cat, n, b, pred) for cat, (n, b) in ranked if b > 0)
        mark = "  <- this run" if driver == peak_driver else ""
        lines.append(f"  peak, {name}: {human(peak.total)} ({parts}){mark}")
    lines.append(
        "  (Snakemake may run any ready job of any variant, so its peak holds every variant's largest "
        "set of intermediates at once)"
    )
    lines.append(
        "host RAM: the interpreter (1 GB; 3 GB with CUDA) + the stage's peak as rose.resources sizes it "
        "(SLURM jobs request 1.3 x that peak + 3 GB, 6 GB with a GPU); GPU memory: what torch allocates "
        "(the CUDA context comes on top); times are rough: FLOPs at "
        f"{LAYER_FLOPS['gpu' if pred.device == 'cuda' else 'cpu'] / 1e12:g} TFLOP/s (float32 layer math) "
        f"and disk at {IO_RATE / 1e6:.0f} MB/s"
    )
    if cfg.handoff_memory != 0:
        lines.append(
            f"handoff (python -m rose run, workstation profile): up to {human(pred.handoff_held)} "
            "of host RAM keeps a layer's artifacts for its next stage (not read back), within "
            f"handoff_memory = {cfg.handoff_memory} ('auto': a quarter of the available memory)"
        )
    lines += [f"note: {n}" for n in pred.notes]
    return "\n".join(lines)


def forced(force: bool | None = None) -> bool:
    """--force, or ROSE_FORCE=1 in the environment (how Snakemake runs are forced)."""
    if force:
        return True
    return os.environ.get(FORCE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def check(
    cfg: RunConfig,
    driver: str = "runner",
    evaluate: bool = True,
    report: bool = True,
    force: bool | None = None,
    echo: Callable[[str], Any] | None = None,
) -> Prediction | None:
    """The start-of-run check of both drivers: print the plan, refuse a run that does not fit.

    A model whose config cannot be read here is left to prepare_model, which
    reports it properly: the check is skipped with a warning. A shortfall raises
    PreflightError (one line), unless forced (`force`, or ROSE_FORCE=1).
    """
    from rose.errors import first_line

    echo = echo or log.info
    try:
        pred = predict(cfg, evaluate=evaluate, report=report)
        free = free_space(cfg.run_dir)
    except ConfigError:  # the config does not fit this model (a per-layer list's length)
        raise
    except Exception as exc:  # the stages will say what is wrong with the model, properly
        log.warning("pre-flight skipped: %s", first_line(exc))
        return None
    for line in format_report(pred, driver, free).splitlines():
        echo(line)
    problem = shortfall(pred, driver, free)
    if problem is not None:
        if not forced(force):
            raise PreflightError(problem)
        log.warning("%s (forced: starting anyway)", problem)
    return pred
