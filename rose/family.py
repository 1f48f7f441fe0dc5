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
import threading
from collections.abc import Callable
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Family:
    """One row of the family table.

    A mixture-of-experts row will reuse the same loop: its routed experts are
    more input groups (each expert reads only the tokens routed to it, so each
    gets its own Hessian), and its router, which is not pruned, is named in
    `unpruned` so that the layer check below accepts it.
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
    # True: config.layer_types names each layer's attention kind (Qwen2/3, Gemma 2/3).
    # False: config.sliding_window, set or None, applies to every layer (Llama, Mistral, Phi-3).
    per_layer_types: bool = False
    # Gemma 3: one rotary embedding per attention kind (local and global RoPE).
    rotary_per_kind: bool = False
    # What transformers runs the full model with by default (Gemma 2: eager, the only
    # CPU implementation with attention-logit soft-capping; sdpa refuses it).
    attn_implementation: str = "sdpa"
    # Linears of a layer deliberately left dense (none in dense families).
    unpruned: tuple[str, ...] = ()

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
        if self.per_layer_types:
            kind = config.layer_types[index]
        else:
            kind = SLIDING if getattr(config, "sliding_window", None) is not None else FULL
        if kind not in _mask_builders():
            raise ValueError(
                f"{self.name} layer {index}: attention kind {kind!r} is not handled by rose "
                f"(handled: {', '.join(sorted(_mask_builders()))})"
            )
        return kind


FAMILIES: dict[str, Family] = {
    # Llama 1-3.x: Llama 3's rope scaling (rope_type llama3) is part of the rotary
    # embedding transformers builds from the config.
    "llama": Family("llama", "llama", "Llama"),
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
    with torch.device("meta"):
        layer = layer_cls(config, layer_idx=index)
    return fam, layer


def check_layer(fam: Family, layer: torch.nn.Module, index: int) -> None:
    """The layer transformers builds must be the one the family row describes.

    Every weight matrix of the layer is a Linear the row prunes (or lists as
    unpruned), each Linear of a group has the same input width, and nothing the
    row names is missing: a layer that transformers changed (a new projection,
    experts stored as stacked tensors, a renamed Linear) is refused here instead
    of being pruned partly or wrongly.
    """
    linears = {name: m for name, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    missing = [name for name in fam.linear_names() if name not in linears]
    known = set(fam.linear_names()) | set(fam.unpruned)
    unknown = sorted(
        name.removesuffix(".weight")
        for name, p in layer.named_parameters()
        if p.dim() >= 2 and name.removesuffix(".weight") not in known
    )
    if missing or unknown:
        raise ValueError(
            f"{fam.name} layer {index}: transformers' {type(layer).__name__} does not match the family table "
            f"(missing Linears {missing}, unhandled weight matrices {unknown})"
        )
    for group in fam.input_groups:
        widths = {linears[name].in_features for name in group}
        if len(widths) != 1:
            raise ValueError(
                f"{fam.name} layer {index}: Linears {group} share a Hessian but read widths {widths}"
            )


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


def expected_shapes(config, index: int = 0) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of one decoder layer as the config defines them (built on the meta device)."""
    _, layer = _meta_layer(config, index)
    return {name: tuple(t.shape) for name, t in layer.state_dict().items()}


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
