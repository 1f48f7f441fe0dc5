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

import dataclasses
import json
import logging
import math
import os
import shutil
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from rose import plan as graph
from rose import resources
from rose.config import ConfigError, RunConfig
from rose.layout import DENSE, RunLayout
from rose.methods import NEEDS_HESSIAN

log = logging.getLogger("rose")

FORCE_ENV = "ROSE_FORCE"
BLOCK = 4096  # du counts whole filesystem blocks: every file and directory is at least this
DTYPE_BYTES = {"float32": 4, "float64": 8, "float16": 2, "bfloat16": 2}
_SAFETENSORS_DTYPES = {"F32": "float32", "F64": "float64", "F16": "float16", "BF16": "bfloat16"}
# Small files, measured on the tiny and SmolLM2 runs and rounded up.
_H5_OVERHEAD = 16 * 1024  # superblock, object headers, attributes (provenance)
_ORDER_PER_LINEAR = 16 * 1024  # five datasets and a group per Linear in order.h5
_STATS_PER_LINEAR = 512  # stats.json, pruning.json: one JSON record per Linear
_EVAL_JSON = 16 * 1024
_REPORT = 1024 * 1024  # summary.csv/md and four plots
_REPORT_PER_VARIANT = 64 * 1024
_LOG = 8 * 1024  # one Snakemake job log (the runner writes none)
_TOKENIZER_PER_TOKEN = (
    120  # tokenizer.json + vocab/merges per vocabulary entry, when not measurable
)
# Rough rates for prepare_model (the estimator's 40 minutes assume a 70B download).
_DOWNLOAD_RATE = 50e6
_PREPARE_BASE = 10.0
# Host memory of the interpreter with torch, transformers and lm-eval imported (measured:
# 0.6 GB on CPU), and with a CUDA context; each stage's own peak (rose.resources) comes on top.
_INTERPRETER = {"cpu": 1.0e9, "cuda": 3.0e9}
_JOB_OVERHEAD = 0.5  # seconds: open the checkpoint, build the layer, write the artifact
LOCAL_TEXT = frozenset({"file", "wiki-offline"})
_LOCAL_CAPTURE = 5.0  # tokenising a local text; hub sets keep rose.resources' 2 minutes
_REPORT_BASE = 10.0
_REPORT_PER_VARIANT_S = 2.0

GGUF_ARCHITECTURES = {
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "qwen2moe": "qwen2_moe",
    "qwen3moe": "qwen3_moe",
    "gemma2": "gemma2",
    "gemma3": "gemma3_text",
    "phi3": "phi3",
}


class PreflightError(ValueError):
    """The run does not fit: one line naming the shortfall and the config keys that reduce it."""


# ---------------------------------------------------------------- shapes from config fields


@dataclass(frozen=True)
class LinearShape:
    """One prunable Linear: weight [rows, cols]; Linears with the same `group` share a Hessian."""

    name: str
    rows: int
    cols: int
    group: str
    tokens_fraction: float = 1.0  # share of the tokens it sees (a routed expert: top_k / experts)

    @property
    def numel(self) -> int:
        return self.rows * self.cols


@dataclass(frozen=True)
class LayerShape:
    linears: tuple[LinearShape, ...]
    other_parameters: int  # norms, biases, routers: kept dense

    @property
    def parameters(self) -> int:
        return sum(lin.numel for lin in self.linears) + self.other_parameters

    @property
    def active_parameters(self) -> int:
        """Weights one token goes through (a routed expert counts with its token share)."""
        return int(
            sum(lin.numel * lin.tokens_fraction for lin in self.linears) + self.other_parameters
        )

    def groups(self) -> dict[str, tuple[int, float]]:
        """Input group -> (in_features, token share): one Hessian each."""
        out: dict[str, tuple[int, float]] = {}
        for lin in self.linears:
            out.setdefault(lin.group, (lin.cols, lin.tokens_fraction))
        return out

    @property
    def hessian_elements(self) -> int:
        return sum(cols * cols for cols, _ in self.groups().values())

    @property
    def hessian_token_flops(self) -> float:
        return sum(2.0 * cols * cols * share for cols, share in self.groups().values())

    @property
    def sweep_flops(self) -> float:
        return float(sum(lin.rows * lin.cols**2 + lin.cols**3 for lin in self.linears))


@dataclass(frozen=True)
class ModelShape:
    model_type: str
    hidden_size: int
    vocab_size: int
    max_positions: int | None
    tie_word_embeddings: bool
    layers: tuple[LayerShape, ...]
    final_parameters: int  # final norm (and its bias)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def embedding_parameters(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def parameters(self) -> int:
        """As the checkpoint stores them: a tied lm_head is not a tensor of its own."""
        head = 0 if self.tie_word_embeddings else self.embedding_parameters
        return (
            self.embedding_parameters
            + head
            + self.final_parameters
            + sum(x.parameters for x in self.layers)
        )

    def largest_layer(self, depth: int | None = None) -> LayerShape:
        return max(self.layers[: depth or None], key=lambda x: (x.parameters, x.hessian_elements))


def _get(config: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def _moe_layer(config: Any, index: int) -> bool:
    experts = _get(config, "num_local_experts", "num_experts", default=0) or 0
    if experts <= 0:
        return False
    if index in (_get(config, "mlp_only_layers", default=()) or ()):
        return False
    step = _get(config, "decoder_sparse_step", default=1) or 1
    return (index + 1) % step == 0


def layer_shape(config: Any, index: int) -> LayerShape:
    """The Linears of decoder layer `index` from config fields: LLaMA-style attention and MLP,
    Phi-3's fused projections, and mixture-of-experts MLPs (Mixtral, Qwen2/3-MoE) with every
    expert counted; each expert's gate/up share one Hessian, its down has its own."""
    model_type = str(getattr(config, "model_type", ""))
    h = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    kv = int(_get(config, "num_key_value_heads", default=heads))
    head_dim = int(_get(config, "head_dim", default=h // heads))
    q_out, kv_out = heads * head_dim, kv * head_dim
    linears: list[LinearShape] = []
    other = 2 * h  # input and post-attention norms
    if model_type.startswith("gemma"):
        other += 2 * h  # pre/post feed-forward norms
    if model_type in ("qwen3", "qwen3_moe", "gemma3_text", "gemma3"):
        other += 2 * head_dim  # q_norm, k_norm
    if model_type == "phi3":
        linears.append(LinearShape("self_attn.qkv_proj", q_out + 2 * kv_out, h, "attn_in"))
    else:
        linears += [
            LinearShape("self_attn.q_proj", q_out, h, "attn_in"),
            LinearShape("self_attn.k_proj", kv_out, h, "attn_in"),
            LinearShape("self_attn.v_proj", kv_out, h, "attn_in"),
        ]
    linears.append(LinearShape("self_attn.o_proj", h, q_out, "attn_out"))
    if model_type in ("qwen2", "qwen2_moe"):
        other += q_out + 2 * kv_out  # q/k/v biases
    elif getattr(config, "attention_bias", False):
        other += q_out + 2 * kv_out + h

    def mlp(prefix: str, inter: int, share: float = 1.0) -> None:
        nonlocal other
        if model_type == "phi3":
            linears.append(LinearShape(f"{prefix}gate_up_proj", 2 * inter, h, f"{prefix}in", share))
        else:
            linears.append(LinearShape(f"{prefix}gate_proj", inter, h, f"{prefix}in", share))
            linears.append(LinearShape(f"{prefix}up_proj", inter, h, f"{prefix}in", share))
        linears.append(LinearShape(f"{prefix}down_proj", h, inter, f"{prefix}out", share))
        if getattr(config, "mlp_bias", False):
            other += 2 * inter + h

    if _moe_layer(config, index):
        experts = int(_get(config, "num_local_experts", "num_experts"))
        top_k = int(_get(config, "num_experts_per_tok", default=1))
        inter = int(_get(config, "moe_intermediate_size", "intermediate_size"))
        for e in range(experts):
            mlp(f"mlp.experts.{e}.", inter, min(1.0, top_k / experts))
        other += experts * h  # the router, kept dense
        shared = int(_get(config, "shared_expert_intermediate_size", default=0) or 0)
        if shared:
            mlp("mlp.shared_expert.", shared)
            other += h  # shared_expert_gate [1, hidden]
    else:
        mlp("mlp.", int(config.intermediate_size))
    return LayerShape(tuple(linears), other)


def model_shape(config: Any) -> ModelShape:
    """Every decoder layer's Linears, the embedding and head, from config fields alone."""
    num_layers = int(config.num_hidden_layers)
    return ModelShape(
        model_type=str(getattr(config, "model_type", "")),
        hidden_size=int(config.hidden_size),
        vocab_size=int(config.vocab_size),
        max_positions=_get(config, "max_position_embeddings"),
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        layers=tuple(layer_shape(config, i) for i in range(num_layers)),
        final_parameters=int(config.hidden_size),
    )


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
            with shard.open("rb") as fh:
                (length,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(min(length, 100 * 1024**2)))
        except (OSError, ValueError, struct.error):
            continue
        header.pop("__metadata__", None)
        for name, meta in sorted(header.items(), key=lambda kv: ".layers." not in kv[0]):
            if name.endswith(".weight"):
                return _SAFETENSORS_DTYPES.get(meta.get("dtype"))
    return None


def _side_bytes(path: Path) -> int:
    from rose.checkpoint import is_weight_file

    return sum(
        _blocks(f.stat().st_size)
        for f in path.iterdir()
        if f.is_file() and not is_weight_file(f.name)
    )


def _auto_config(source: str | Path, cfg: RunConfig, **kwargs: Any) -> Any:
    from transformers import AutoConfig

    from rose.checkpoint import ModelSourceError
    from rose.errors import first_line

    try:
        return AutoConfig.from_pretrained(
            str(source), trust_remote_code=cfg.model.trust_remote_code, **kwargs
        )
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError, ... for these
        raise ModelSourceError(
            f"model {source}: cannot read its config.json ({first_line(exc)})"
        ) from None


def read_source(cfg: RunConfig) -> ModelSource:
    """The model's config as the run will see it, resolved like rose.checkpoint.prepare_model.

    model.json (a prepared run) wins; else a converted copy already under
    run_dir/model; else the source itself: a GGUF header, a local directory's
    config.json, or a hub id's config.json (one small download, or the cache).
    """
    from rose import checkpoint as ckpt
    from rose.model_info import ModelInfo

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
        return ModelSource(gguf_config(gguf), "float32", f"{gguf} (GGUF header)", "gguf", copy_dir)
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


# GGUF value types (gguf spec): the size of each scalar, and the two variable-length kinds.
_GGUF_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def _gguf_header(path: Path) -> tuple[dict[str, Any], set[str]]:
    """Scalar metadata and tensor names of a GGUF file, reading only its header.

    (gguf.GGUFReader parses the whole tokenizer into Python objects: seconds.)
    Arrays are skipped, but their length is kept (the vocabulary size).
    """
    with path.open("rb") as fh:

        def read(fmt: str) -> Any:
            size = struct.calcsize(fmt)
            return struct.unpack(fmt, fh.read(size))[0]

        def string() -> str:
            return fh.read(read("<Q")).decode("utf-8", "replace")

        def skip(kind: int) -> None:
            if kind == _GGUF_STRING:
                fh.seek(read("<Q"), 1)
            else:
                fh.seek(struct.calcsize(_GGUF_SCALARS[kind]), 1)

        if fh.read(4) != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file")
        version = read("<I")
        if version < 2:
            raise ValueError(f"{path}: GGUF version {version} is not supported")
        n_tensors, n_kv = read("<Q"), read("<Q")
        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key, kind = string(), read("<I")
            if kind == _GGUF_STRING:
                meta[key] = string()
            elif kind == _GGUF_ARRAY:
                item, count = read("<I"), read("<Q")
                meta[key] = count  # only its length is kept
                if item == _GGUF_STRING:
                    for _ in range(count):
                        skip(item)
                elif item in _GGUF_SCALARS:
                    fh.seek(count * struct.calcsize(_GGUF_SCALARS[item]), 1)
                else:
                    raise ValueError(f"{path}: nested GGUF array in {key}")
            elif kind in _GGUF_SCALARS:
                meta[key] = read(_GGUF_SCALARS[kind])
            else:
                raise ValueError(f"{path}: unknown GGUF value type {kind} for {key}")
        names = set()
        for _ in range(n_tensors):
            names.add(string())
            fh.seek(8 * read("<I") + 4 + 8, 1)  # dims, type, offset
    return meta, names


def gguf_config(path: Path) -> Any:
    """A transformers config from a GGUF header (the fields the shapes need; no tensor read)."""
    from transformers import AutoConfig

    meta, names = _gguf_header(path)
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not sized by the pre-flight")

    def key(name: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{name}", default)

    hidden = int(key("embedding_length"))
    heads = int(key("attention.head_count"))
    fields: dict[str, Any] = {
        "hidden_size": hidden,
        "num_hidden_layers": int(key("block_count")),
        "intermediate_size": int(key("feed_forward_length", 4 * hidden)),
        "num_attention_heads": heads,
        "num_key_value_heads": int(key("attention.head_count_kv", heads)),
        "head_dim": int(key("attention.key_length", hidden // heads)),
        "vocab_size": int(key("vocab_size", meta.get("tokenizer.ggml.tokens", 0))),
        "max_position_embeddings": key("context_length"),
        "tie_word_embeddings": "output.weight" not in names,
    }
    if key("expert_count"):
        experts = int(key("expert_count"))
        fields["num_local_experts" if arch == "llama" else "num_experts"] = experts
        fields["num_experts_per_tok"] = int(key("expert_used_count", 1))
        if key("expert_feed_forward_length"):
            fields["moe_intermediate_size"] = int(key("expert_feed_forward_length"))
        if key("expert_shared_feed_forward_length"):
            fields["shared_expert_intermediate_size"] = int(
                key("expert_shared_feed_forward_length")
            )
    model_type = GGUF_ARCHITECTURES[arch]
    if model_type == "llama" and fields.get("num_local_experts"):
        model_type = "mixtral"
    return AutoConfig.for_model(model_type, **fields)


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


def _blocks(nbytes: float) -> float:
    return float(math.ceil(max(nbytes, 1) / BLOCK) * BLOCK)


def _disk_size(path: Path) -> float:
    """Bytes a file or directory tree occupies (allocated blocks, as du counts them)."""
    try:
        st = path.lstat()
    except OSError:
        return 0.0
    total = float(getattr(st, "st_blocks", 0) * 512 or st.st_size)
    if path.is_dir() and not path.is_symlink():
        for child in path.iterdir():
            total += _disk_size(child)
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
    import torch

    from rose.device import compute_dtype, storage_dtype

    info = SimpleNamespace(dtype=model_dtype)
    dtype = compute_dtype(cfg, info, torch.device(kind))  # type: ignore[arg-type]
    return str(dtype).removeprefix("torch."), str(storage_dtype(dtype))


def _model_info(cfg: RunConfig, source: ModelSource, shape: ModelShape, parameters: int):
    from rose.model_info import ModelInfo

    depth = min(cfg.layers or shape.num_layers, shape.num_layers)
    values = {
        "path": "",
        "source": cfg.model.source,
        "fingerprint": "",
        "model_type": shape.model_type,
        "num_layers": shape.num_layers,
        "prune_layers": depth,
        "hidden_size": shape.hidden_size,
        "max_positions": shape.max_positions,
        "dtype": source.dtype,
        "parameters": parameters,
    }
    return ModelInfo(**{f.name: values.get(f.name) for f in dataclasses.fields(ModelInfo)})


class _Sizer:
    """Predicted bytes of every artifact a step writes (rounded to whole blocks)."""

    def __init__(
        self, cfg: RunConfig, source: ModelSource, shape: ModelShape, parameters: int, storage: str
    ):
        self.cfg, self.shape = cfg, shape
        c = cfg.calibration
        self.dbytes = DTYPE_BYTES.get(source.dtype, 4)
        self.tokens = c.nsamples * c.seqlen
        self.inputs = _blocks(self.tokens * shape.hidden_size * DTYPE_BYTES[storage] + _H5_OVERHEAD)
        side = (
            source.side_bytes
            if source.side_bytes is not None
            else _blocks(shape.vocab_size * _TOKENIZER_PER_TOKEN)
        )
        self.side = side + 2 * BLOCK
        self.model = _blocks(parameters * self.dbytes) + self.side
        depth = min(cfg.layers or shape.num_layers, shape.num_layers)
        self.linears = sum(len(x.linears) for x in shape.layers[:depth])
        self.copy = self.model if source.copy_dir is not None else 0.0

    def layer(self, w: Mapping[str, str]) -> Any:
        return self.shape.layers[int(w["layer"])]

    def output(self, stage: str, name: str, w: Mapping[str, str]) -> float:
        if stage in ("prepare_model", "report") and name not in ("plots",):
            return float(BLOCK)
        if stage == "capture_calibration":
            return _blocks(self.tokens * 4 + _H5_OVERHEAD)
        if name == "inputs":
            return self.inputs
        if name == "outputs":  # the dense statistics pass: the next layer's dense inputs
            return self.inputs
        if stage in ("outliers", "allocate"):
            return float(BLOCK)
        if stage in ("hessians", "shared_hessians"):
            layer = self.layer(w) if "layer" in w else self.shape.layers[0]
            groups = layer.groups()
            return _blocks(4 * layer.hessian_elements + _H5_OVERHEAD + len(groups) * 1024)
        if stage == "order":
            cfgb = self.cfg.prune.blocksize
            total = _H5_OVERHEAD
            for lin in self.layer(w).linears:
                blocks = math.ceil(lin.cols / cfgb)
                total += (
                    16 * lin.cols + 16 * blocks + 4 * min(64, lin.rows) * blocks + _ORDER_PER_LINEAR
                )
            return _blocks(total)
        if name == "pruned":
            linears = self.layer(w).linears
            return _blocks(self.dbytes * sum(x.numel for x in linears) + 128 * len(linears) + 1024)
        if name == "stats":
            return _blocks(_STATS_PER_LINEAR * len(self.layer(w).linears) + 1024)
        if name == "model_dir":
            return self.model + _blocks(_STATS_PER_LINEAR * self.linears + 4096) + BLOCK
        if stage == "export":  # dense: hard links to model/; compressed: below the dense size
            return self.side if w["format"] == "dense" else self.model
        if name == "result":
            return float(_EVAL_JSON)
        if name == "plots":
            return _blocks(_REPORT + _REPORT_PER_VARIANT * len(self.cfg.variants))
        return float(BLOCK)


CATEGORIES = {
    ("prepare_model", "copy"): "model copy",
    ("capture_calibration", "tokens"): "calibration tokens",
    ("embed_calibration", "inputs"): "layer inputs",
    ("forward", "inputs"): "layer inputs",
    ("outliers", "outputs"): "layer inputs",
    ("hessians", "hessians"): "Hessians",
    ("shared_hessians", "hessians"): "Hessians",
    ("order", "order"): "order files",
    ("prune", "pruned"): "pruned layers",
    ("assemble", "model_dir"): "reassembled models",
    ("export", "export_dir"): "exports",
}


def _category(stage: str, name: str) -> str:
    return CATEGORIES.get((stage, name), "small files")


def _tally(items: Iterable[tuple[str, float]]) -> dict[str, tuple[int, float]]:
    parts: dict[str, tuple[int, float]] = {}
    for category, size in items:
        n, total = parts.get(category, (0, 0.0))
        parts[category] = (n + 1, total + size)
    return parts


def _gpu_bytes(
    stage: str, shape: ModelShape, layer: LayerShape, cfg: RunConfig, cbytes: int
) -> float:
    """torch-allocated GPU memory of one job (the CUDA context, ~0.5 GB, comes on top)."""
    c = cfg.calibration
    h = shape.hidden_size
    widest = max(lin.rows for lin in layer.linears)
    batch_tokens = c.batch_size * c.seqlen
    acts = batch_tokens * (6 * h + 3 * widest) * cbytes  # hidden, q/k/v, MLP intermediates
    hess = 4.0 * layer.hessian_elements
    big = max(layer.linears, key=lambda x: x.rows * x.cols + x.cols**2)
    if stage == "embed_calibration":
        return shape.embedding_parameters * cbytes + 2 * batch_tokens * h * cbytes
    if stage in ("hessians", "shared_hessians"):
        widest_in = max(lin.cols for lin in layer.linears)
        return layer.parameters * cbytes + acts + hess + batch_tokens * widest_in * 4
    if stage == "order":
        return hess + 4.0 * 4 * big.rows * big.cols
    if stage == "prune":
        return hess + big.rows * big.cols * (cbytes + 3 * 4 + 1) + 5.0 * 4 * big.cols**2
    if stage == "forward":
        return layer.parameters * cbytes + acts
    if stage == "outliers":  # the forward, plus column norms and one matrix's scores (float64)
        return layer.parameters * cbytes + acts + 8.0 * big.rows * big.cols
    if stage in ("evaluate_perplexity", "evaluate_zero_shot"):
        ev = cfg.evaluation
        seqlen = max([p.seqlen for p in ev.perplexity] + [c.seqlen]) if ev else c.seqlen
        batch = ev.batch_size if ev else 1
        if stage == "evaluate_zero_shot" and ev and ev.zero_shot:
            batch = ev.zero_shot.batch_size
        logits = 2 * batch * seqlen * shape.vocab_size * 4
        return shape.parameters * cbytes + logits + batch * seqlen * (6 * h + 3 * widest) * cbytes
    return 0.0


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
    info = _model_info(cfg, source, shape, parameters)
    plan = graph.Plan(cfg, info)
    steps = plan.steps(evaluate=evaluate, report=report)
    need = graph.needed_steps(steps, plan.targets(evaluate=evaluate, report=False))
    runs = [s for s in steps if s.stage == "report" or s.key in need]
    sizer = _Sizer(cfg, source, shape, parameters, storage)
    depth = info.prune_layers

    # ------------------------------------------------ disk: walk the runner's order
    layout = plan.layout
    sizes: dict[Path, float] = {}
    category: dict[Path, str] = {}
    for step in steps:
        for name, path in step.outputs.items():
            sizes[path] = sizer.output(step.stage, name, dict(step.wildcards))
            category[path] = _category(step.stage, name)
    copy_path = source.copy_dir
    present: dict[Path, float] = {}
    for path in sizes:
        if path.exists():
            present[path] = _disk_size(path)
    if copy_path is not None and copy_path.exists():
        present[copy_path] = _disk_size(copy_path)
        category[copy_path] = "model copy"
    present[layout.run_dir / "run.json"] = 3.0 * BLOCK  # run.json, config.effective.yaml, the lock
    category[layout.run_dir / "run.json"] = "small files"
    dirs = {p.parent for p in sizes} | {layout.run_dir}
    existing = sum(present.values())

    temporary = {path for s in steps for path in s.temporary}
    readers = graph.consumers(steps)
    pending = {s.key for s in runs}
    variant_of = {
        # the dense statistics pass keeps its own chain of intermediates, like a variant
        path: dict(s.wildcards).get("variant") or (DENSE if s.stage == "outliers" else None)
        for s in steps
        for path in s.outputs.values()
    }
    shared = layout.inputs(DENSE, 0)
    variant_peak: dict[str, float] = {}
    variant_temp: dict[str, float] = {}
    tracked: set[Path] = (
        set()
    )  # intermediates written in this walk, by variant (not the shared inputs)
    total = existing
    best = (total, dict(present), "before the first step")
    dir_bytes = BLOCK * len(dirs)
    for step in runs:
        writing = {p: sizes[p] for p in step.outputs.values()}
        if step.stage == "prepare_model" and copy_path is not None and copy_path not in present:
            writing[copy_path] = sizer.copy
            category[copy_path] = "model copy"
        during = total + sum(writing.values())
        if during > best[0]:
            best = (
                during,
                {**present, **{p: present.get(p, 0.0) + s for p, s in writing.items()}},
                step.describe(),
            )
        for path, size in writing.items():
            variant = variant_of.get(path)
            if path in temporary and variant and path != shared:
                variant_temp[variant] = variant_temp.get(variant, 0.0) + size
                tracked.add(path)
        for variant, temp in variant_temp.items():
            variant_peak[variant] = max(variant_peak.get(variant, 0.0), temp)
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
                    variant = variant_of[path]
                    variant_temp[variant] -= sizes[path]
    final = total

    def peak(value: float, state: Mapping[Path, float], where: str) -> DiskPeak:
        parts = _tally((category.get(p, "small files"), s) for p, s in state.items())
        n, small = parts.get("small files", (0, 0.0))
        parts["small files"] = (n + len(dirs), small + dir_bytes)
        return DiskPeak(value + dir_bytes, parts, where)

    runner = peak(*best)
    # Snakemake: everything kept at the end, the shared layer-0 inputs while any variant still
    # reads them, and every variant's largest set of intermediates at once; plus one log per job.
    logs = _LOG * len(runs)
    state = dict(present)
    extra = []
    for path, name, producer in (
        (shared, "shared inputs", "embed_calibration"),
        (layout.shared_hessians, "shared layer-0 Hessians", "shared_hessians"),
    ):
        needed = any(r.key in need for r in readers.get(path, [])) and (
            path in present or any(s.stage == producer for s in runs)
        )
        if needed and path not in state and path in sizes:
            extra.append((name, sizes[path]))
    transient = [(v, t) for v, t in variant_peak.items() if t > 0]
    snake_total = final + sum(s for _, s in extra) + sum(t for _, t in transient) + logs
    parts = _tally((category.get(p, "small files"), s) for p, s in state.items())
    for name, size in extra:
        n, b = parts.get(name, (0, 0.0))
        parts[name] = (n + 1, b + size)
    for _variant, temp in transient:
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
        "layer_parameters": largest.parameters,
        "active_layer_parameters": largest.active_parameters,
        "hessian_elements": largest.hessian_elements,
        # moe.calibrate_all_experts (the default): every expert's Hessians see every token
        "hessian_token_flops": sum(2.0 * cols * cols for cols, _ in largest.groups().values())
        if (cfg.raw.get("moe") or {}).get("calibrate_all_experts", True)
        else largest.hessian_token_flops,
        "sweep_flops": largest.sweep_flops,
    }
    cbytes = DTYPE_BYTES[compute]
    rows: dict[str, StageRow] = {}
    for step in steps:
        row = rows.setdefault(step.stage, StageRow(step.stage))
        row.jobs += 1
        row.to_run += step.stage == "report" or step.key in need
        row.writes += sum(sizes[p] for p in step.outputs.values())
    rows = {name: rows[name] for name in graph.STAGES if name in rows}  # in pipeline order
    for row in rows.values():
        row.writes /= max(row.jobs, 1)
        if row.stage == "prepare_model":
            row.writes += sizer.copy
        host, seconds = resources.stage_estimate(row.stage, raw, size)
        on_gpu = kind == "cuda" and row.stage in resources.GPU_STAGES
        if row.stage == "prepare_model":
            host, seconds = _prepare_estimate(source, sizer, shape, parameters)
        elif row.stage == "capture_calibration" and cfg.calibration.source.kind in LOCAL_TEXT:
            seconds = _LOCAL_CAPTURE
        elif row.stage == "report":
            seconds = _REPORT_BASE + _REPORT_PER_VARIANT_S * len(cfg.variants)
        row.host = _INTERPRETER["cuda" if on_gpu else "cpu"] + host
        row.seconds = seconds + _JOB_OVERHEAD
        if on_gpu:
            row.gpu = _gpu_bytes(row.stage, shape, largest, cfg, cbytes)

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
    if shape.model_type not in _pipeline_families():
        notes.append(
            f"{shape.model_type}: sized from its config, but rose does not prune this family yet"
        )
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
        variants_with_inputs=sum(1 for v in cfg.variants if v.method in NEEDS_HESSIAN),
        layer_inputs=sizer.inputs,
        hessians=max(sizes[p] for s in steps if s.stage == "hessians" for p in s.outputs.values())
        if any(s.stage == "hessians" for s in steps)
        else 0.0,
        pruned_layer=float(largest.parameters * sizer.dbytes),
        notes=notes,
    )


def _device_memory() -> float | None:
    """Memory of the GPU the stages would use, when there is one here (a login node has none)."""
    import torch

    if not torch.cuda.is_available():
        return None
    return float(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)


def _pipeline_families() -> set[str]:
    try:
        from rose.family import FAMILIES
    except Exception:  # pragma: no cover - the family table is optional for sizing
        return set()
    return set(FAMILIES)


def _prepare_estimate(
    source: ModelSource, sizer: _Sizer, shape: ModelShape, parameters: int
) -> tuple[float, float]:
    """(host bytes, seconds) of prepare_model: checking a safetensors checkpoint reads headers
    only; a GGUF file is dequantised whole through transformers (float32 model, its quantised
    tensors and the state dict it saves); pickle shards are streamed; a hub model is downloaded."""
    seconds = _PREPARE_BASE + 0.05 * shape.num_layers
    host = 256e6
    if source.kind == "gguf":
        host += 3 * 4 * parameters
    elif source.kind == "pickle":
        host += 2 * min(sizer.copy, 2 * 1024**3)  # one shard read, one written
    if source.copy_dir is not None and source.kind != "prepared":
        seconds += 2 * sizer.copy / resources._IO_RATE
    if source.kind == "hub":
        seconds += sizer.model / _DOWNLOAD_RATE
    return host, seconds


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
    if category in ("shared inputs", "shared layer-0 Hessians"):
        what = "inputs" if category == "shared inputs" else "Hessians"
        return f"the shared layer-0 {what} of {human(total)}"
    if category == "model copy":
        return f"the converted model copy of {human(total)}"
    if category in ("small files", "order files", "calibration tokens"):
        return f"{category} {human(total)}"
    return f"{files} {category} of {human(each)}"


_KEYS = {
    "layer inputs": "calibration.nsamples/seqlen",
    "intermediates": "calibration.nsamples/seqlen",
    "shared inputs": "calibration.nsamples/seqlen",
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
        f"{resources._FLOPS['gpu' if pred.device == 'cuda' else 'cpu'] / 1e12:g} TFLOP/s (float32 layer math) "
        f"and disk at {resources._IO_RATE / 1e6:.0f} MB/s"
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
