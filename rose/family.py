"""What differs between model families, in one table.

The pruning loop is the same for every decoder; what changes is where a
layer's tensors live, which Linears read the same input (they share a Hessian),
how to build one decoder layer from its config, which attention mask and rotary
embedding each layer gets, which attention implementation transformers runs the
full model with, and how the embedding output is scaled. New families are one
more row here.

The decoder layer itself is always transformers' own class, built from the
checkpoint's config; what the full model computes *around* its layers (masks,
rotary embeddings, embedding scale) is rebuilt here with the same transformers
functions, so running the layers one at a time equals the full model's forward
(tests/test_families.py checks that for every row, windows shorter than the
calibration length included).
"""

from __future__ import annotations

import importlib
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

# transformers resolves its modules lazily and not thread-safely; Snakemake runs
# local jobs as threads, so the first resolution of each family is serialised.
_IMPORT_LOCK = threading.Lock()

LLAMA_GROUPS: tuple[tuple[str, ...], ...] = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
# Phi-3: q, k, v in one fused Linear and gate, up in another; each fused Linear
# is pruned as one matrix and has its input group (and Hessian) to itself.
PHI3_GROUPS: tuple[tuple[str, ...], ...] = (
    ("self_attn.qkv_proj",),
    ("self_attn.o_proj",),
    ("mlp.gate_up_proj",),
    ("mlp.down_proj",),
)

FULL = "full_attention"
SLIDING = "sliding_attention"

# Mixture-of-experts layers, as transformers 5 builds them (Mixtral, Qwen2-MoE, Qwen3-MoE):
# the sparse block is `mlp`, its router `mlp.gate` (a [experts, hidden] parameter, not a
# Linear), its routed experts two stacked parameters of `mlp.experts`.
MOE_BLOCK = "mlp"
ROUTER = "mlp.gate"
EXPERTS = "mlp.experts"
# [experts, 2 x intermediate, hidden]: each expert's gate rows, then its up rows
STACKED_GATE_UP = "mlp.experts.gate_up_proj"
STACKED_DOWN = "mlp.experts.down_proj"  # [experts, hidden, intermediate]
# How a checkpoint holds a layer's experts: transformers' own stacked parameters, or one
# tensor per expert and projection (hub checkpoints, and what save_pretrained writes).
STACKED = "stacked"
PER_EXPERT = "per-expert"


@dataclass(frozen=True)
class Experts:
    """The sparse MLP block of a mixture-of-experts row.

    transformers holds a layer's routed experts as two stacked parameters
    (`STACKED_GATE_UP`, `STACKED_DOWN`) and runs them with the routing its router
    computes; hub checkpoints, and transformers' own `save_pretrained`, name
    every expert's matrices instead (`<hub_block>.experts.<e>.<gate|up|down>.weight`),
    which `from_pretrained` stacks on load. rose reads either layout, prunes each
    expert's gate, up and down matrices one by one, and writes the pruned layer
    back in the layout the checkpoint has.
    """

    # the block's name in per-expert checkpoints (Mixtral: block_sparse_moe)
    hub_block: str = MOE_BLOCK
    # gate, up, down in per-expert checkpoints (Mixtral: w1, w3, w2)
    hub_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    # Qwen2-MoE: shared_expert, a dense MLP every token goes through, and
    # shared_expert_gate, its sigmoid gate [1, hidden]
    shared: str | None = None
    shared_gate: str | None = None


@dataclass(frozen=True)
class Unit:
    """One matrix pruned on its own (its mask, its stats entry, its order.h5 group).

    A Linear's weight, the router, or one expert's gate, up or down matrix: a
    whole checkpoint tensor, or (stacked layout) `tensor[index, rows[0]:rows[1]]`.
    """

    # layer-relative, as stats.json and pruning.json name it (the checkpoint's name sans .weight)
    name: str
    tensor: str  # the checkpoint tensor holding it, layer-relative
    module: str  # the module of transformers' layer that reads its input
    index: int | None = None  # stacked layout: the expert's index along the tensor's first axis
    rows: tuple[int, int] | None = None  # stacked layout: gate or up rows of gate_up_proj
    expert: int | None = None  # the routed expert it belongs to
    part: str | None = None  # gate | up | down (routed experts)


@dataclass(frozen=True)
class LayerUnits:
    """What one decoder layer prunes: its units and the groups of units that share an input.

    The first unit of a group names the group's Hessian. Dense layers: the row's
    `input_groups`. Layers with routed experts: the attention groups, the shared
    expert like a dense MLP (with the router and the shared expert's gate when
    those are pruned: they read the same tokens), and per expert (gate, up) and
    (down,), whose Hessians come from the tokens that expert computes.
    """

    groups: tuple[tuple[str, ...], ...]
    units: Mapping[str, Unit] = field(hash=False)
    layout: str | None = None  # STACKED or PER_EXPERT; None for a layer without routed experts
    num_experts: int = 0

    def names(self) -> list[str]:
        return [name for group in self.groups for name in group]

    def group_of(self, name: str) -> str:
        for group in self.groups:
            if name in group:
                return group[0]
        raise KeyError(name)

    def tensors(self) -> dict[str, list[Unit]]:
        """Checkpoint tensor -> the units it holds (one, or an expert's slices of a stacked tensor)."""
        out: dict[str, list[Unit]] = {}
        for name in self.names():
            out.setdefault(self.units[name].tensor, []).append(self.units[name])
        return out


@dataclass(frozen=True)
class Family:
    """One row of the family table.

    A mixture-of-experts row (`experts` set) reuses the same loop: its routed
    experts are more input groups (each expert reads only the tokens routed to it,
    so each gets its own Hessians), see `LayerUnits`; its `input_groups` still
    describe the layers without experts (Qwen2/3-MoE `mlp_only_layers`).
    """

    name: str
    module: str  # transformers.models.<module>.modeling_<module>
    class_prefix: str  # <prefix>DecoderLayer, <prefix>RotaryEmbedding
    input_groups: tuple[tuple[str, ...], ...] = LLAMA_GROUPS
    layer_prefix: str = "model.layers.{index}."
    embed_name: str = "model.embed_tokens.weight"
    norm_name: str = "model.norm.weight"
    lm_head_name: str = "lm_head.weight"
    # Gemma: embeddings * sqrt(hidden_size), the scale cast to the embedding dtype first.
    scale_embeddings: bool = False
    # How transformers' model and attention module of the family pick a layer's kind:
    # True: config.layer_types names each layer's kind (Qwen2/3, Gemma 2/3, Qwen2-MoE).
    # False: config.sliding_window, set or None, applies to every layer (Mistral, Phi-3,
    # Mixtral, Qwen3-MoE)...
    per_layer_types: bool = False
    # ...unless the family ignores it (Llama: LlamaAttention and LlamaModel mask causally,
    # whatever a config's sliding_window says).
    ignores_sliding_window: bool = False
    # Gemma 3: one rotary embedding per attention kind (local and global RoPE).
    rotary_per_kind: bool = False
    # What transformers runs the full model with by default (Gemma 2: eager, the only
    # CPU implementation with attention-logit soft-capping; sdpa refuses it).
    attn_implementation: str = "sdpa"
    # Linears of a layer deliberately left dense (none in dense families).
    unpruned: tuple[str, ...] = ()
    # Mixture-of-experts rows: the sparse block, and the experts implementation transformers
    # runs the full model with by default (`from_pretrained` picks grouped_mm for these classes).
    experts: Experts | None = None
    experts_implementation: str | None = None

    def linear_names(self) -> list[str]:
        return [name for group in self.input_groups for name in group]

    def classes(self) -> tuple[type, type]:
        with _IMPORT_LOCK:
            modeling = importlib.import_module(
                f"transformers.models.{self.module}.modeling_{self.module}"
            )
            return getattr(modeling, f"{self.class_prefix}DecoderLayer"), getattr(
                modeling, f"{self.class_prefix}RotaryEmbedding"
            )

    def attention_kind(self, config, index: int) -> str:
        """The attention kind of layer `index`, as the transformers model forward chooses its mask."""
        if getattr(config, "use_bidirectional_attention", False) or not getattr(
            config, "is_causal", True
        ):
            raise ValueError(
                f"{self.name}: bidirectional attention (an encoder/embedding model) is not supported"
            )
        window = getattr(config, "sliding_window", None)
        if self.per_layer_types:
            layer_types = getattr(config, "layer_types", None) or ()
            if index >= len(layer_types):
                raise ValueError(
                    f"{self.name} layer {index}: config.layer_types does not name this layer's "
                    f"attention kind (layer_types {layer_types!r})"
                )
            kind = layer_types[index]
        elif self.ignores_sliding_window:
            kind = FULL
        else:
            kind = SLIDING if window is not None else FULL
        if kind not in _mask_builders():
            raise ValueError(
                f"{self.name} layer {index}: attention kind {kind!r} is not handled by rose "
                f"(handled: {', '.join(sorted(_mask_builders()))})"
            )
        # transformers cannot build this layer's window either (None: its mask builder raises;
        # 0, Qwen2-MoE's value without use_sliding_window: a mask that allows no key)
        if kind == SLIDING and not (
            isinstance(window, int) and not isinstance(window, bool) and window > 0
        ):
            raise ValueError(
                f"{self.name} layer {index}: a sliding_attention layer needs config.sliding_window "
                f"to be a positive number of tokens, got {window!r}"
            )
        return kind


FAMILIES: dict[str, Family] = {
    # Llama 1-3.x: Llama 3's rope scaling (rope_type llama3) is part of the rotary
    # embedding transformers builds from the config. Always causal: a config's
    # sliding_window is ignored, as transformers' Llama ignores it.
    "llama": Family("llama", "llama", "Llama", ignores_sliding_window=True),
    "mistral": Family("mistral", "mistral", "Mistral"),
    "qwen2": Family("qwen2", "qwen2", "Qwen2", per_layer_types=True),
    "qwen3": Family("qwen3", "qwen3", "Qwen3", per_layer_types=True),
    "gemma2": Family(
        "gemma2",
        "gemma2",
        "Gemma2",
        scale_embeddings=True,
        per_layer_types=True,
        attn_implementation="eager",
    ),
    "gemma3_text": Family(
        "gemma3_text",
        "gemma3",
        "Gemma3",
        scale_embeddings=True,
        per_layer_types=True,
        rotary_per_kind=True,
    ),
    "phi3": Family("phi3", "phi3", "Phi3", input_groups=PHI3_GROUPS),
    # Mixture of experts. Mixtral: sliding_window (when set) on every layer; hub checkpoints
    # name the block block_sparse_moe and the experts' gate, up, down w1, w3, w2.
    "mixtral": Family(
        "mixtral",
        "mixtral",
        "Mixtral",
        experts=Experts(hub_block="block_sparse_moe", hub_names=("w1", "w3", "w2")),
        experts_implementation="grouped_mm",
    ),
    # Qwen2-MoE: a shared expert with a sigmoid gate beside the routed ones; layer_types;
    # q/k/v biases; `mlp_only_layers` / `decoder_sparse_step` layers have a dense MLP.
    "qwen2_moe": Family(
        "qwen2_moe",
        "qwen2_moe",
        "Qwen2Moe",
        per_layer_types=True,
        experts=Experts(shared="shared_expert", shared_gate="shared_expert_gate"),
        experts_implementation="grouped_mm",
    ),
    # Qwen3-MoE: q/k norms, norm_topk_prob; sliding_window (when used) on every layer.
    "qwen3_moe": Family(
        "qwen3_moe", "qwen3_moe", "Qwen3Moe", experts=Experts(), experts_implementation="grouped_mm"
    ),
}


def family_for(config) -> Family:
    model_type = getattr(config, "model_type", None)
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise ValueError(
            f"unsupported architecture {model_type!r} (supported: {', '.join(sorted(FAMILIES))})"
        ) from None


def _mask_builders() -> dict[str, Callable]:
    """How the transformers model forwards build each attention kind's mask."""
    with _IMPORT_LOCK:
        from transformers import masking_utils

    return {
        FULL: masking_utils.create_causal_mask,
        SLIDING: masking_utils.create_sliding_window_causal_mask,
    }


def _meta_layer(config, index: int) -> tuple[Family, torch.nn.Module]:
    fam = family_for(config)
    layer_cls, _ = fam.classes()
    config._attn_implementation = fam.attn_implementation
    if fam.experts_implementation is not None:
        config._experts_implementation = fam.experts_implementation
    with torch.device("meta"):
        layer = layer_cls(config, layer_idx=index)
    return fam, layer


def _has_experts(fam: Family, layer: torch.nn.Module) -> bool:
    """A layer of a mixture-of-experts row with routed experts (not a dense `mlp_only` layer)."""
    return fam.experts is not None and hasattr(getattr(layer, MOE_BLOCK, None), "experts")


def _expert_layout(fam: Family, index: int, names: Iterable[str] | None) -> str:
    """How the checkpoint holds layer `index`'s experts (its layer-relative tensor names); None: stacked."""
    if names is None:
        return STACKED
    names = set(names)
    if {STACKED_GATE_UP, STACKED_DOWN} <= names:
        return STACKED
    spec = fam.experts
    if f"{spec.hub_block}.experts.0.{spec.hub_names[0]}.weight" in names:
        return PER_EXPERT
    raise ValueError(
        f"{fam.name} layer {index}: the checkpoint holds its experts neither stacked ({STACKED_GATE_UP}) "
        f"nor one by one ({spec.hub_block}.experts.<e>.{spec.hub_names[0]}.weight)"
    )


def _layer_units(
    fam: Family, layer: torch.nn.Module, index: int, names: Iterable[str] | None, prune_router: bool
) -> LayerUnits:
    if not _has_experts(fam, layer):
        groups = fam.input_groups
        return LayerUnits(groups, {n: Unit(n, n + ".weight", n) for g in groups for n in g})
    spec = fam.experts
    layout = _expert_layout(fam, index, names)
    block = MOE_BLOCK if layout == STACKED else spec.hub_block

    def stored(module: str) -> str:  # module path -> the checkpoint's name for it
        return block + module[len(MOE_BLOCK) :] if module.startswith(MOE_BLOCK + ".") else module

    groups: list[tuple[str, ...]] = []
    units: dict[str, Unit] = {}

    def add_group(modules: list[str]) -> None:
        for module in modules:
            units[stored(module)] = Unit(stored(module), stored(module) + ".weight", module)
        groups.append(tuple(stored(m) for m in modules))

    for group in fam.input_groups:
        if not group[0].startswith(MOE_BLOCK + "."):
            add_group(list(group))
    # Every token's input to the block: the shared expert's gate/up, and the router gates when pruned.
    block_input = (
        [f"{MOE_BLOCK}.{spec.shared}.gate_proj", f"{MOE_BLOCK}.{spec.shared}.up_proj"]
        if spec.shared
        else []
    )
    if prune_router:
        block_input += [ROUTER] + ([f"{MOE_BLOCK}.{spec.shared_gate}"] if spec.shared_gate else [])
    if block_input:
        add_group(block_input)
    if spec.shared:
        add_group([f"{MOE_BLOCK}.{spec.shared}.down_proj"])
    experts = layer.get_submodule(EXPERTS)
    num_experts, rows, _ = experts.gate_up_proj.shape
    inter = rows // 2
    gate_name, up_name, down_name = spec.hub_names
    for e in range(num_experts):
        if layout == STACKED:
            parts = (
                Unit(
                    f"{EXPERTS}.{e}.gate_proj", STACKED_GATE_UP, EXPERTS, e, (0, inter), e, "gate"
                ),
                Unit(
                    f"{EXPERTS}.{e}.up_proj",
                    STACKED_GATE_UP,
                    EXPERTS,
                    e,
                    (inter, 2 * inter),
                    e,
                    "up",
                ),
                Unit(f"{EXPERTS}.{e}.down_proj", STACKED_DOWN, EXPERTS, e, None, e, "down"),
            )
        else:
            parts = tuple(
                Unit(
                    f"{block}.experts.{e}.{hub}",
                    f"{block}.experts.{e}.{hub}.weight",
                    EXPERTS,
                    expert=e,
                    part=part,
                )
                for hub, part in ((gate_name, "gate"), (up_name, "up"), (down_name, "down"))
            )
        units.update({u.name: u for u in parts})
        groups += [(parts[0].name, parts[1].name), (parts[2].name,)]
    return LayerUnits(tuple(groups), units, layout, num_experts)


def layer_units(
    config, index: int, names: Iterable[str] | None = None, prune_router: bool = False
) -> LayerUnits:
    """The units and input groups of layer `index`, named as the checkpoint whose layer-relative
    tensor `names` are given names them (None: transformers' own, stacked, names)."""
    fam, layer = _meta_layer(config, index)
    return _layer_units(fam, layer, index, names, prune_router)


def unit_shapes(config, index: int) -> dict[str, tuple[int, int]]:
    """[rows, in] of every unit of layer `index` (transformers' names; router included)."""
    fam, layer = _meta_layer(config, index)
    return _unit_shapes(fam, layer, index)


def _unit_shapes(fam: Family, layer: torch.nn.Module, index: int) -> dict[str, tuple[int, int]]:
    units = _layer_units(fam, layer, index, None, prune_router=True)
    params = dict(layer.named_parameters())
    out = {}
    for name, unit in units.units.items():
        shape = tuple(params[unit.tensor].shape)
        if unit.index is not None:
            shape = shape[1:]
        if unit.rows is not None:
            shape = (unit.rows[1] - unit.rows[0], *shape[1:])
        out[name] = shape
    return out


@dataclass(frozen=True)
class LayerSummary:
    """What sizing needs of one decoder layer, from one meta-device build: the units it prunes
    (router left dense), every unit's [rows, in] and how many weights the whole layer has."""

    units: LayerUnits
    shapes: Mapping[str, tuple[int, int]] = field(hash=False)
    parameters: int


def layer_summary(config, index: int) -> LayerSummary:
    fam, layer = _meta_layer(config, index)
    return LayerSummary(
        _layer_units(fam, layer, index, None, prune_router=False),
        _unit_shapes(fam, layer, index),
        sum(p.numel() for p in layer.parameters()),
    )


def has_experts(config, index: int) -> bool:
    """Layer `index` has routed experts (a mixture-of-experts row's sparse layer)."""
    fam = family_for(config)
    return fam.experts is not None and _has_experts(fam, _meta_layer(config, index)[1])


def _check_experts(fam: Family, layer: torch.nn.Module, index: int) -> None:
    """Routed experts as rose reads them: stacked [E, 2I, H] gate/up (gate rows first, not
    transposed, no biases) and [E, H, I] down, run with the gate, and a [E, H] router."""
    expected = {
        "is_transposed": False,
        "is_concatenated": True,
        "has_gate": True,
        "has_bias": False,
        "has_post_expert_norm": False,
    }
    try:
        experts = layer.get_submodule(EXPERTS)
        gate_up, down = experts.gate_up_proj, experts.down_proj
        router = layer.get_submodule(ROUTER).weight
        flags = {key: getattr(experts, key, want) for key, want in expected.items()}
    except AttributeError as exc:
        raise ValueError(
            f"{fam.name} layer {index}: transformers' experts are not stored as rose reads them ({exc})"
        ) from None
    num, rows, hidden = gate_up.shape if gate_up.dim() == 3 else (0, 0, 0)
    shapes_ok = (
        num > 0
        and rows % 2 == 0
        and tuple(down.shape) == (num, hidden, rows // 2)
        and tuple(router.shape) == (num, hidden)
    )
    if flags != expected or not shapes_ok:
        raise ValueError(
            f"{fam.name} layer {index}: transformers' experts are not stored as rose reads them "
            f"(gate_up_proj {tuple(gate_up.shape)}, down_proj {tuple(down.shape)}, router {tuple(router.shape)}, "
            f"{ {k: v for k, v in flags.items() if v != expected[k]} })"
        )


def check_layer(fam: Family, layer: torch.nn.Module, index: int) -> None:
    """The layer transformers builds must be the one the family row describes.

    Every weight matrix of the layer is a Linear the row prunes (or lists as
    unpruned; or, in a mixture-of-experts row, the router or the stacked expert
    parameters), each unit of a group has the same input width, and nothing the
    row names is missing: a layer that transformers changed (a new projection,
    experts stored another way, a renamed Linear) is refused here instead of
    being pruned partly or wrongly.
    """
    experts = _has_experts(fam, layer)
    if experts:
        _check_experts(fam, layer, index)
    units = _layer_units(fam, layer, index, None, prune_router=True)
    params = dict(layer.named_parameters())
    linears = {name for name, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    missing = [
        u.module
        for u in units.units.values()
        if u.index is None
        and not (u.tensor in params and (u.module in linears or u.module == ROUTER))
    ]
    known = {u.tensor for u in units.units.values()} | {f"{name}.weight" for name in fam.unpruned}
    unknown = sorted(
        name.removesuffix(".weight")
        for name, p in params.items()
        if p.dim() >= 2 and name not in known
    )
    if missing or unknown:
        raise ValueError(
            f"{fam.name} layer {index}: transformers' {type(layer).__name__} does not match the family table "
            f"(missing Linears {missing}, unhandled weight matrices {unknown})"
        )
    for group in units.groups:
        widths = {params[units.units[name].tensor].shape[-1] for name in group}
        if len(widths) != 1:
            raise ValueError(
                f"{fam.name} layer {index}: Linears {group} share a Hessian but read widths {widths}"
            )


_PER_EXPERT_NAME = r"experts\.(\d+)\.([^.]+)\.weight"


def _to_module_layout(
    fam: Family, layer: torch.nn.Module, index: int, tensors: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """A layer's checkpoint tensors under transformers' names: per-expert tensors stacked as
    `from_pretrained` stacks them (gate_up = [gate; up] per expert), the hub block renamed."""
    if not _has_experts(fam, layer) or _expert_layout(fam, index, tensors) == STACKED:
        return tensors
    spec = fam.experts
    pattern = re.compile(re.escape(spec.hub_block) + r"\." + _PER_EXPERT_NAME + "$")
    num_experts = layer.get_submodule(EXPERTS).gate_up_proj.shape[0]
    out: dict[str, torch.Tensor] = {}
    per: dict[tuple[int, str], torch.Tensor] = {}
    for name, tensor in tensors.items():
        match = pattern.match(name)
        if match and match.group(2) in spec.hub_names and int(match.group(1)) < num_experts:
            per[int(match.group(1)), match.group(2)] = tensor
        elif name.startswith(spec.hub_block + ".") and not match:
            out[MOE_BLOCK + name[len(spec.hub_block) :]] = tensor
        else:
            out[name] = tensor  # refused by build_layer's strict check
    missing = [
        f"{spec.hub_block}.experts.{e}.{p}.weight"
        for e in range(num_experts)
        for p in spec.hub_names
        if (e, p) not in per
    ]
    if missing:
        raise ValueError(
            f"layer {index}: checkpoint does not match the {fam.name} config (missing {missing[:3]})"
        )
    gate, up, down = spec.hub_names
    out[STACKED_GATE_UP] = torch.stack(
        [torch.cat([per[e, gate], per[e, up]]) for e in range(num_experts)]
    )
    out[STACKED_DOWN] = torch.stack([per[e, down] for e in range(num_experts)])
    return out


def check_model(config) -> Family:
    """The config's family, every layer's attention kind and layer structure are handled (meta device)."""
    fam = family_for(config)
    for index in range(int(config.num_hidden_layers)):
        fam.attention_kind(config, index)
        check_layer(fam, _meta_layer(config, index)[1], index)
    return fam


def build_layer(
    config,
    index: int,
    tensors: dict[str, torch.Tensor],
    device: torch.device | str,
    dtype: torch.dtype,
) -> torch.nn.Module:
    """One decoder layer with exactly the given weights (strict: nothing missing or extra)."""
    fam, layer = _meta_layer(config, index)
    fam.attention_kind(config, index)
    check_layer(fam, layer, index)
    tensors = _to_module_layout(fam, layer, index, tensors)
    expected = set(layer.state_dict())
    missing, extra = expected - set(tensors), set(tensors) - expected
    if missing or extra:
        raise ValueError(
            f"layer {index}: checkpoint does not match the {fam.name} config "
            f"(missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]})"
        )
    layer.load_state_dict(
        {k: v.to(device=device, dtype=dtype) for k, v in tensors.items()}, assign=True
    )
    for name, buffer in layer.named_buffers():
        if buffer.is_meta:
            raise ValueError(f"layer {index}: buffer {name} was not initialised")
    layer.rose_layer_index = index
    return layer.eval()


def expected_shapes(
    config, index: int = 0, names: Iterable[str] | None = None
) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of one decoder layer as the config defines them (built on the meta device),
    named as transformers names them or, given a checkpoint's layer-relative tensor `names`,
    in that checkpoint's layout (per-expert tensors under the hub's names)."""
    fam, layer = _meta_layer(config, index)
    shapes = {name: tuple(t.shape) for name, t in layer.state_dict().items()}
    if not _has_experts(fam, layer) or _expert_layout(fam, index, names) == STACKED:
        return shapes
    spec = fam.experts
    num, rows, hidden = shapes.pop(STACKED_GATE_UP)
    shapes.pop(STACKED_DOWN)
    out = {
        (
            spec.hub_block + name[len(MOE_BLOCK) :] if name.startswith(MOE_BLOCK + ".") else name
        ): shape
        for name, shape in shapes.items()
    }
    gate, up, down = spec.hub_names
    for e in range(num):
        prefix = f"{spec.hub_block}.experts.{e}."
        out[f"{prefix}{gate}.weight"] = out[f"{prefix}{up}.weight"] = (rows // 2, hidden)
        out[f"{prefix}{down}.weight"] = (hidden, rows // 2)
    return out


def attention_inputs(config, index: int, hidden: torch.Tensor):
    """Mask and (cos, sin) of layer `index` for [batch, seqlen, hidden] at positions 0..seqlen-1.

    Built with transformers' own functions and arguments, as the model's forward
    does for a batch without padding: `create_causal_mask` or
    `create_sliding_window_causal_mask` by the layer's attention kind (a window
    shorter than seqlen is applied, exactly as in the full model), in the format of
    the attention implementation in use (None = sdpa's is_causal; a boolean mask;
    eager's additive float mask).
    """
    fam = family_for(config)
    config._attn_implementation = fam.attn_implementation
    kind = fam.attention_kind(config, index)
    _, rotary_cls = fam.classes()
    seqlen = hidden.shape[1]
    positions = torch.arange(seqlen, device=hidden.device).unsqueeze(0)
    mask = _mask_builders()[kind](
        config=config, inputs_embeds=hidden, attention_mask=None, cache=None, position_ids=positions
    )
    rotary = rotary_cls(config).to(hidden.device)
    positions = positions.expand(hidden.shape[0], -1)
    cos, sin = rotary(hidden, positions, kind) if fam.rotary_per_kind else rotary(hidden, positions)
    return mask, positions, (cos, sin)


def layer_forward(layer: torch.nn.Module, config, hidden: torch.Tensor) -> torch.Tensor:
    """Run one decoder layer (from `build_layer`) on [batch, seqlen, hidden], as the full model runs it."""
    index = getattr(layer, "rose_layer_index", None)
    if index is None:
        raise ValueError(
            "layer_forward needs a layer from family.build_layer (its index decides its mask)"
        )
    fam = family_for(config)
    attn = getattr(layer, "self_attn", None)
    if attn is not None and hasattr(attn, "sliding_window"):
        # the layer's own idea of its window must be the mask we build for it
        kind = fam.attention_kind(config, index)
        window = config.sliding_window if kind == SLIDING else None
        if attn.sliding_window != window:
            raise ValueError(
                f"{fam.name} layer {index}: the attention module has sliding_window={attn.sliding_window}, "
                f"the mask would be {kind} (window {window})"
            )
    mask, positions, position_embeddings = attention_inputs(config, index, hidden)
    out = layer(
        hidden, attention_mask=mask, position_ids=positions, position_embeddings=position_embeddings
    )
    return out[0] if isinstance(out, tuple) else out


def embed(weight: torch.Tensor, tokens: torch.Tensor, fam: Family) -> torch.Tensor:
    """Layer 0's input: the token embeddings (scaled where the family scales them).

    Gemma's scaled embedding multiplies by torch.tensor(hidden_size ** 0.5) cast
    to the embedding weight's dtype (in bfloat16 sqrt(3072) = 55.4256 becomes
    55.5); the same is done here, in the dtype the stages compute in.
    """
    hidden = F.embedding(tokens.to(weight.device), weight)
    if fam.scale_embeddings:
        hidden = hidden * torch.tensor(weight.shape[-1] ** 0.5).to(
            device=weight.device, dtype=weight.dtype
        )
    return hidden
