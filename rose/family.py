"""What differs between model families, in one table.

The pruning loop is the same for every LLaMA-like decoder; what changes is
where a layer's tensors live, which Linears read the same input (they share a
Hessian), how to build one decoder layer from its config, and how the
embedding output is scaled. New families are one more row here.
"""

from __future__ import annotations

import importlib
import threading
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


@dataclass(frozen=True)
class Family:
    """One row of the family table."""

    name: str
    module: str  # transformers.models.<module>.modeling_<module>
    class_prefix: str  # <prefix>DecoderLayer, <prefix>RotaryEmbedding
    input_groups: tuple[tuple[str, ...], ...] = LLAMA_GROUPS
    layer_prefix: str = "model.layers.{index}."
    embed_name: str = "model.embed_tokens.weight"
    norm_name: str = "model.norm.weight"
    lm_head_name: str = "lm_head.weight"
    embed_scale: float | None = None  # Gemma-style sqrt(hidden) scaling when set

    def linear_names(self) -> list[str]:
        return [name for group in self.input_groups for name in group]

    def classes(self) -> tuple[type, type]:
        with _IMPORT_LOCK:
            modeling = importlib.import_module(f"transformers.models.{self.module}.modeling_{self.module}")
            return getattr(modeling, f"{self.class_prefix}DecoderLayer"), getattr(
                modeling, f"{self.class_prefix}RotaryEmbedding"
            )


FAMILIES: dict[str, Family] = {
    "llama": Family("llama", "llama", "Llama"),
    "mistral": Family("mistral", "mistral", "Mistral"),
    "qwen2": Family("qwen2", "qwen2", "Qwen2"),
    "qwen3": Family("qwen3", "qwen3", "Qwen3"),
}


def family_for(config) -> Family:
    model_type = getattr(config, "model_type", None)
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise ValueError(
            f"unsupported architecture {model_type!r} (supported: {', '.join(sorted(FAMILIES))})"
        ) from None


def build_layer(
    config, index: int, tensors: dict[str, torch.Tensor], device: torch.device | str, dtype: torch.dtype
) -> torch.nn.Module:
    """One decoder layer with exactly the given weights (strict: nothing missing or extra)."""
    fam = family_for(config)
    layer_cls, _ = fam.classes()
    config._attn_implementation = "sdpa"  # causal without an explicit mask; eager would need one
    with torch.device("meta"):
        layer = layer_cls(config, layer_idx=index)
    expected = set(layer.state_dict())
    missing, extra = expected - set(tensors), set(tensors) - expected
    if missing or extra:
        raise ValueError(
            f"layer {index}: checkpoint does not match the {fam.name} config "
            f"(missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]})"
        )
    layer.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in tensors.items()}, assign=True)
    for name, buffer in layer.named_buffers():
        if buffer.is_meta:
            raise ValueError(f"layer {index}: buffer {name} was not initialised")
    return layer.eval()


def expected_shapes(config, index: int = 0) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of one decoder layer as the config defines them (built on the meta device)."""
    layer_cls, _ = family_for(config).classes()
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        layer = layer_cls(config, layer_idx=index)
    return {name: tuple(t.shape) for name, t in layer.state_dict().items()}


def check_sequence(config, seqlen: int) -> None:
    """Calibration and layer forwards use full causal attention; a sliding window would differ."""
    window = getattr(config, "sliding_window", None)
    if getattr(config, "use_sliding_window", True) and window and seqlen > window:
        raise ValueError(f"seqlen {seqlen} exceeds the model's sliding window ({window}); use seqlen <= {window}")


def layer_forward(layer: torch.nn.Module, config, hidden: torch.Tensor) -> torch.Tensor:
    """Run one decoder layer on [batch, seqlen, hidden] with causal attention at positions 0..seqlen-1."""
    _, rotary_cls = family_for(config).classes()
    batch, seqlen, _ = hidden.shape
    check_sequence(config, seqlen)
    rotary = rotary_cls(config).to(hidden.device)
    positions = torch.arange(seqlen, device=hidden.device).unsqueeze(0).expand(batch, -1)
    cos, sin = rotary(hidden, positions)
    out = layer(hidden, attention_mask=None, position_ids=positions, position_embeddings=(cos, sin))
    return out[0] if isinstance(out, tuple) else out


def embed(weight: torch.Tensor, tokens: torch.Tensor, fam: Family) -> torch.Tensor:
    """Layer 0's input: the token embeddings (scaled where the family scales them)."""
    hidden = F.embedding(tokens.to(weight.device), weight)
    return hidden * fam.embed_scale if fam.embed_scale else hidden
