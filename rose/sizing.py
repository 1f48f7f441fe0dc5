"""What the estimators know of a run's size, for the stages' own estimate functions.

Each stage record (`rose.stages.spec.Stage`) estimates its jobs from the figures
here: `StageFigures` (host memory and time; `rose.resources` turns them into
cluster requests, `rose plan` prints them), `GpuFigures` (GPU memory, `rose plan`)
and `DiskSizer` (the bytes of every output, `rose plan`'s disk walk). The shapes
of a model's layers come from the family table (`rose.family`), so they are
the units the stages prune, mixture-of-experts layers included, and the figures
are computed once per run, not per stage.

Pure arithmetic, no I/O: the throughputs are deliberately pessimistic rough
numbers (a too-long cluster limit costs queue priority, a too-short one the job).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from rose import family
from rose.admm import AdmmSettings, solver_units
from rose.methods import MethodName

if TYPE_CHECKING:
    from rose.config import RunConfig

MB = 1024 * 1024
BLOCK = 4096  # du counts whole filesystem blocks: every file and directory is at least this
DTYPE_BYTES: Mapping[str, int] = MappingProxyType(
    {"float32": 4, "float64": 8, "float16": 2, "bfloat16": 2}
)
# Sustained FLOP/s of float32 layer math (sweep, Hessians) and of half-precision inference.
LAYER_FLOPS: Mapping[str, float] = MappingProxyType({"gpu": 5e12, "cpu": 2e10})
EVAL_FLOPS: Mapping[str, float] = MappingProxyType({"gpu": 5e13, "cpu": 2e10})
IO_RATE = 150e6  # B/s, disk
DOWNLOAD_RATE = 50e6  # B/s, a hub download
# Calibration when the config leaves it out (the paper's 128 x 2048).
FALLBACK_CALIBRATION: Mapping[str, int] = MappingProxyType({"nsamples": 128, "seqlen": 2048})
# Evaluation size when the config does not bound it: WikiText-2 test is ~0.3M LLaMA tokens;
# a zero-shot task scores ~3000 docs x ~400 tokens (all choices), 7 tasks.
PPL_TOKENS = 5e5
ZERO_SHOT_DOCS = 3000
ZERO_SHOT_TOKENS_PER_DOC = 400
ZERO_SHOT_TASKS = 7
LOCAL_TEXT = frozenset({"file", "wiki-offline"})  # calibration text read from disk
# Small files, measured on the tiny and SmolLM2 runs and rounded up.
H5_OVERHEAD = 16 * 1024  # superblock, object headers, attributes (provenance)
ORDER_PER_LINEAR = 16 * 1024  # five datasets and a group per Linear in order.h5
STATS_PER_LINEAR = 512  # stats.json, pruning.json: one JSON record per Linear
EVAL_JSON = 16 * 1024
REPORT = 1024 * 1024  # summary.csv/md and four plots
REPORT_PER_VARIANT = 64 * 1024
TOKENIZER_PER_TOKEN = 120  # tokenizer.json + vocab/merges per entry, when not measurable


def blocks(nbytes: float) -> float:
    """Bytes rounded up to whole filesystem blocks (at least one)."""
    return float(math.ceil(max(nbytes, 1) / BLOCK) * BLOCK)


# ---------------------------------------------------------------- shapes from the family table


@dataclass(frozen=True)
class LinearShape:
    """One pruned unit: weight [rows, cols]; units with the same `group` share a Hessian."""

    name: str
    rows: int
    cols: int
    group: str
    tokens_fraction: float = 1.0  # share of the tokens it sees (a routed expert: top_k / experts)
    part: str | None = None  # a routed expert's gate | up | down

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
    final_parameters: int  # final norm

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


def layer_shape(config: Any, index: int) -> LayerShape:
    """Decoder layer `index` as the stages prune it: the family table's units and input groups
    (every routed expert's gate/up and down, each with the token share top_k / experts), and
    every other weight of the layer as transformers builds it (norms, biases, routers)."""
    summary = family.layer_summary(config, index)
    units = summary.units
    share = 1.0
    if units.num_experts:
        share = min(1.0, int(getattr(config, "num_experts_per_tok", 1)) / units.num_experts)
    linears = tuple(
        LinearShape(
            name,
            *summary.shapes[name],
            group=units.group_of(name),
            tokens_fraction=share if units.units[name].expert is not None else 1.0,
            part=units.units[name].part,
        )
        for name in units.names()
    )
    return LayerShape(linears, summary.parameters - sum(lin.numel for lin in linears))


def detail_sizes(layer: LayerShape, all_tokens: bool) -> dict[str, float]:
    """`DETAIL_KEYS` of one layer. Hessian FLOPs per calibration token: X^T X of every input
    group, plus the routed experts' gate/up products that make their down projections' inputs;
    routed experts count with their token share unless they see every token (`all_tokens`)."""
    share = {lin.group: (1.0 if all_tokens else lin.tokens_fraction) for lin in layer.linears}
    gate_up = sum(
        2.0 * lin.numel * share[lin.group] for lin in layer.linears if lin.part in ("gate", "up")
    )
    return {
        "layer_parameters": layer.parameters,
        "active_layer_parameters": layer.active_parameters,
        "hessian_elements": layer.hessian_elements,
        "hessian_token_flops": sum(
            2.0 * cols * cols * share[group] for group, (cols, _) in layer.groups().items()
        )
        + gate_up,
        "sweep_flops": layer.sweep_flops,
    }


def model_shape(config: Any) -> ModelShape:
    """Every decoder layer's units, the embedding and head, from the config alone (no weights).

    Layers of the same kind (attention kind, routed experts or not) have the same shape, so
    each kind is built once on the meta device: an 80-layer model costs one or two layers.
    """
    fam = family.family_for(config)
    shapes: dict[tuple[str, bool], LayerShape] = {}
    layers = []
    for index in range(int(config.num_hidden_layers)):
        key = (fam.attention_kind(config, index), family.has_experts(config, index))
        if key not in shapes:
            shapes[key] = layer_shape(config, index)
        layers.append(shapes[key])
    return ModelShape(
        model_type=str(config.model_type),
        hidden_size=int(config.hidden_size),
        vocab_size=int(config.vocab_size),
        max_positions=getattr(config, "max_position_embeddings", None),
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        layers=tuple(layers),
        final_parameters=int(config.hidden_size),  # the final norm
    )


# ---------------------------------------------------------------- host memory and time


@dataclass(frozen=True)
class Source:
    """How the model reaches the run (`rose plan` knows it; the cluster estimate does not)."""

    kind: str  # prepared | directory | hub | gguf | pickle
    copy_bytes: float = 0.0  # a converted copy under run_dir/model
    model_bytes: float = 0.0  # the checkpoint's weights


@dataclass(frozen=True)
class StageFigures:
    """One job's sizes: `size` (model.json's shape) and the config's calibration and evaluation.

    Layer figures are the largest pruned layer's: `layer` its weights, `hess` its Hessians
    (float64 here, to err high), `sweep_flops` rows * cols^2 + cols^3 over its units."""

    kind: str  # gpu | cpu: where the stage's math runs
    params: float
    num_layers: int
    hidden: float
    dbytes: int  # bytes per weight of the checkpoint's dtype
    tokens: int  # calibration tokens
    layer: float
    active_layer: float  # weights one token goes through
    hess: float
    hessian_token_flops: float
    sweep_flops: float
    perplexity_tokens: float  # tokens one perplexity job scores
    zero_shot_tokens: float
    calibration_local: bool  # calibration text read from disk (no hub download)
    variants: int
    source: Source | None = None  # None: not known (cluster requests assume a download)
    solver_units: float = (
        0.0  # the ADMM solve's work per Linear, in sweeps (rose.admm.solver_units)
    )

    @property
    def acts(self) -> float:
        """One layer's calibration hidden states, float32."""
        return self.tokens * self.hidden * 4

    @property
    def weights32(self) -> float:
        return self.layer * 4

    @property
    def forward_flops(self) -> float:
        return 2 * self.tokens * self.active_layer

    @property
    def flops(self) -> float:
        return LAYER_FLOPS[self.kind]

    @property
    def eval_flops(self) -> float:
        return EVAL_FLOPS[self.kind]

    def io(self, nbytes: float) -> float:
        """Seconds to read or write `nbytes`."""
        return nbytes / IO_RATE


# Optional keys of a model size with exact per-layer figures (model.json has them for
# mixture-of-experts models; `rose plan` computes them for every model). Each one present
# replaces what `stage_figures` otherwise derives from the totals (a dense LLaMA's formulas).
DETAIL_KEYS = (
    "layer_parameters",  # weights of the largest decoder layer
    "active_layer_parameters",  # weights one token goes through (MoE: the routed experts only)
    "hessian_elements",  # sum of in_features^2 over a layer's input groups (experts included)
    "hessian_token_flops",  # Hessian accumulation FLOPs per calibration token
    "sweep_flops",  # sum of rows * cols^2 + cols^3 over a layer's Linears
)


def number(value: Any) -> float | None:
    """A finite number (JSON int/float, or a numeric string), else None; bools are not numbers."""
    if isinstance(value, bool):
        return None
    try:
        result = float(value)
    except (TypeError, ValueError):
        return None
    return result if math.isfinite(result) else None


def _layer_figures(size: Mapping[str, Any]) -> dict[str, float]:
    """Per-layer weights, Hessian elements and FLOPs: `size`'s detail keys, else derived.

    Derived: a decoder layer holds about parameters / num_layers weights
    (embeddings included, so it errs high), and its widest input is the MLP's
    intermediate width, solved from layer ~ 2 h^2 (attention, GQA) + 3 h I.
    """
    h = float(size["hidden_size"])
    layer = float(size["parameters"]) / size["num_layers"]
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
        value = number(size.get(key))
        if value is not None and value > 0:
            derived[key] = value
    return derived


def calibration_tokens(cfg: Mapping[str, Any]) -> int:
    calib = cfg.get("calibration") or {}
    nsamples = calib.get("nsamples") or FALLBACK_CALIBRATION["nsamples"]
    seqlen = calib.get("seqlen") or FALLBACK_CALIBRATION["seqlen"]
    return int(nsamples) * int(seqlen)


def _perplexity_tokens(cfg: Mapping[str, Any]) -> float:
    """Tokens one perplexity job scores: the windows' when every spec bounds them."""
    specs = (cfg.get("evaluation") or {}).get("perplexity") or []
    seqlen = (cfg.get("calibration") or {}).get("seqlen") or FALLBACK_CALIBRATION["seqlen"]
    bounded = [
        p["max_windows"] * (p.get("seqlen") or seqlen) for p in specs if p.get("max_windows")
    ]
    return float(max(bounded)) if bounded and len(bounded) == len(specs) else PPL_TOKENS


def _zero_shot_tokens(cfg: Mapping[str, Any]) -> float:
    zero_shot = (cfg.get("evaluation") or {}).get("zero_shot") or {}
    tasks = len(zero_shot.get("tasks") or range(ZERO_SHOT_TASKS))
    docs = zero_shot.get("limit") or ZERO_SHOT_DOCS
    return float(tasks * docs * ZERO_SHOT_TOKENS_PER_DOC)


def _variant_count(cfg: Mapping[str, Any]) -> int:
    """Variants of a raw config (methods x sparsities, dense excluded), for the report's time."""
    methods = [m for m in cfg.get("methods") or [] if m != "dense"]
    return max(1, len(methods) * len(cfg.get("sparsities") or [1]))


def stage_figures(
    kind: str,
    cfg: Mapping[str, Any],
    size: Mapping[str, Any],
    variants: int | None = None,
    source: Source | None = None,
) -> StageFigures:
    """The figures of one run: `cfg` is the raw config mapping, `size` model.json's shape."""
    fig = _layer_figures(size)
    calib_source = ((cfg.get("calibration") or {}).get("source")) or {}
    return StageFigures(
        kind=kind,
        params=float(size["parameters"]),
        num_layers=int(size["num_layers"]),
        hidden=float(size["hidden_size"]),
        dbytes=DTYPE_BYTES.get(str(size["dtype"]), 4),
        tokens=calibration_tokens(cfg),
        layer=fig["layer_parameters"],
        active_layer=fig["active_layer_parameters"],
        hess=8 * fig["hessian_elements"],
        hessian_token_flops=fig["hessian_token_flops"],
        sweep_flops=fig["sweep_flops"],
        perplexity_tokens=_perplexity_tokens(cfg),
        zero_shot_tokens=_zero_shot_tokens(cfg),
        calibration_local=calib_source.get("kind") in LOCAL_TEXT,
        variants=variants if variants is not None else _variant_count(cfg),
        source=source,
        solver_units=_solver_units(cfg),
    )


def _solver_units(cfg: Mapping[str, Any]) -> float:
    """The costliest ADMM solve any of the config's methods runs per Linear (0: none)."""
    settings = AdmmSettings(
        **{**asdict(AdmmSettings()), **((cfg.get("prune") or {}).get("admm") or {})}
    )
    units = [0.0]
    for method in cfg.get("methods") or []:
        name = MethodName.parse(method)
        if name.uses_admm:
            start = 1 if not name.refit and settings.start != "dense" else 0
            units.append(solver_units(settings, name.refit, start))
    return max(units)


# ---------------------------------------------------------------- GPU memory


@dataclass(frozen=True)
class GpuFigures:
    """One job's GPU figures: the model's shape, its largest pruned layer, the batch sizes."""

    cfg: RunConfig
    shape: ModelShape
    layer: LayerShape
    cbytes: int  # bytes per element of the compute dtype

    @property
    def batch_tokens(self) -> int:
        return self.cfg.calibration.batch_size * self.cfg.calibration.seqlen

    @property
    def widest(self) -> int:
        return max(lin.rows for lin in self.layer.linears)

    @property
    def widest_in(self) -> int:
        return max(lin.cols for lin in self.layer.linears)

    @property
    def acts(self) -> float:
        """A batch's hidden states, q/k/v and MLP intermediates in the compute dtype."""
        h = self.shape.hidden_size
        return self.batch_tokens * (6 * h + 3 * self.widest) * self.cbytes

    @property
    def hess(self) -> float:
        return 4.0 * self.layer.hessian_elements

    @property
    def solver(self) -> float:
        """An ADMM solve's own memory: a float32 factor of the widest H and six weight buffers."""
        if not any(v.uses_admm for v in self.cfg.variants):
            return 0.0
        big = max(self.layer.linears, key=lambda lin: lin.cols)
        return 4.0 * big.cols**2 + 6 * 4.0 * big.rows * big.cols

    @property
    def weights(self) -> float:
        return self.layer.parameters * self.cbytes

    @property
    def big(self) -> LinearShape:
        """The unit whose weight and Hessian take the most memory at once."""
        return max(self.layer.linears, key=lambda x: x.rows * x.cols + x.cols**2)

    def evaluation(self, zero_shot: bool) -> float:
        """A model in the compute dtype, a batch's logits (float32, twice) and activations."""
        ev, c = self.cfg.evaluation, self.cfg.calibration
        seqlen = max([p.seqlen for p in ev.perplexity] + [c.seqlen]) if ev else c.seqlen
        batch = ev.batch_size if ev else 1
        if zero_shot and ev and ev.zero_shot:
            batch = ev.zero_shot.batch_size
        h = self.shape.hidden_size
        logits = 2 * batch * seqlen * self.shape.vocab_size * 4
        return (
            self.shape.parameters * self.cbytes
            + logits
            + batch * seqlen * (6 * h + 3 * self.widest) * self.cbytes
        )


# ---------------------------------------------------------------- disk


@dataclass(frozen=True)
class DiskSizer:
    """Predicted bytes of the artifacts a run writes (whole blocks), per output."""

    cfg: RunConfig
    shape: ModelShape
    parameters: int  # the checkpoint's (model.json's when known, else the config's)
    dbytes: int  # bytes per weight of the prepared checkpoint
    storage_bytes: int  # bytes per element of stored layer inputs
    side: float  # config, tokenizer and other small files copied beside each model's weights
    copy: float  # a converted copy of the model under run_dir/model (0: used in place)

    block = float(BLOCK)

    @property
    def tokens(self) -> int:
        return self.cfg.calibration.nsamples * self.cfg.calibration.seqlen

    @property
    def depth(self) -> int:
        return min(self.cfg.layers or self.shape.num_layers, self.shape.num_layers)

    @property
    def inputs(self) -> float:
        """One layer's calibration hidden states as stored."""
        return blocks(self.tokens * self.shape.hidden_size * self.storage_bytes + H5_OVERHEAD)

    @property
    def linears(self) -> int:
        return sum(len(x.linears) for x in self.shape.layers[: self.depth])

    def layer(self, w: Mapping[str, str]) -> LayerShape:
        return self.shape.layers[int(w.get("layer", 0))]

    def pruned_layer(self, index: int) -> float:
        """One layer's pruned units in the checkpoint's dtype (a pruned-layer file)."""
        linears = self.shape.layers[index].linears
        return blocks(self.dbytes * sum(x.numel for x in linears) + 128 * len(linears) + 1024)

    @property
    def model(self) -> float:
        """A whole checkpoint's weights and side files."""
        return blocks(self.parameters * self.dbytes) + self.side

    @property
    def reassembled(self) -> float:
        """What reassembling a model writes beside its pruned layers, whose files become its
        shards of them (hard links): every other tensor, the side files, the index (a line
        per tensor) and pruning.json (a record per pruned unit)."""
        layers = self.shape.layers[: self.depth]
        pruned = sum(lin.numel for layer in layers for lin in layer.linears)
        tensors = self.linears + 4 * self.shape.num_layers + 3  # units, norms/biases, the rest
        return (
            blocks((self.parameters - pruned) * self.dbytes)
            + self.side
            + blocks(128 * tensors)
            + blocks(STATS_PER_LINEAR * self.linears + 4096)
        )
