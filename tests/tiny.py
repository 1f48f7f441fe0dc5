"""Tiny random decoder models built from a config, saved as HF safetensors dirs.

Widths are deliberately not multiples of 128 (ROSE's block size), attention uses
GQA, and embeddings are tied (unless asked otherwise), so the code paths that real
models hit are hit here. FAMILY_DEFAULTS holds what makes each family itself
(rope scaling, sliding windows, soft-capping, fused projections, experts).

Mixture-of-experts models have 4 experts with top-2 routing; `save_pretrained`
writes their experts one tensor per expert (the hub's names), and
`to_stacked_layout` rewrites a model directory with transformers' stacked expert
parameters instead, so both checkpoint layouts can be tested.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

FAMILY_DEFAULTS = {
    "llama": dict(model_type="llama", attention_bias=False, mlp_bias=False),
    "mistral": dict(model_type="mistral", sliding_window=None),
    "qwen2": dict(model_type="qwen2"),
    "qwen3": dict(model_type="qwen3", head_dim=16),
    # Llama 3.x: llama3 rope scaling (as in Llama-3.1's config.json) and a 128k context.
    "llama3": dict(
        model_type="llama",
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    ),
    # Gemma 2: alternating sliding (16 tokens) / full layers, attention-logit soft-capping
    # low enough (4.0) that tanh bends the tiny model's logits, head_dim != hidden/heads.
    "gemma2": dict(
        model_type="gemma2",
        head_dim=24,
        query_pre_attn_scalar=24,
        sliding_window=16,
        attn_logit_softcapping=4.0,
        final_logit_softcapping=30.0,
        pad_token_id=0,
    ),
    # Gemma 3 text: sliding/full every other layer (pattern 2), local and global RoPE, q/k norms.
    "gemma3": dict(
        model_type="gemma3_text",
        head_dim=24,
        query_pre_attn_scalar=24,
        sliding_window=16,
        sliding_window_pattern=2,
        pad_token_id=0,
    ),
    # Phi-3: fused qkv_proj and gate_up_proj.
    "phi3": dict(model_type="phi3", pad_token_id=0),
    # Mixture of experts: 4 experts, top-2; expert widths not multiples of 128 either.
    "mixtral": dict(
        model_type="mixtral", num_local_experts=4, num_experts_per_tok=2, sliding_window=None
    ),
    # Qwen2-MoE: a shared expert with its sigmoid gate beside the routed ones.
    "qwen2_moe": dict(
        model_type="qwen2_moe",
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=136,
        shared_expert_intermediate_size=168,
        norm_topk_prob=False,
    ),
    # Qwen3-MoE: q/k norms, renormalised top-k weights.
    "qwen3_moe": dict(
        model_type="qwen3_moe",
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=136,
        head_dim=16,
        norm_topk_prob=True,
    ),
}


def tiny_tokenizer(vocab_size: int = 256) -> PreTrainedTokenizerFast:
    """A byte-ish word-level tokenizer that needs no download."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for i in range(vocab_size - 3):
        vocab[f"w{i}"] = i + 3
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    return fast


def make_tiny_model(
    path: Path,
    family: str = "llama",
    hidden_size: int = 200,
    intermediate_size: int = 328,
    num_layers: int = 3,
    num_heads: int = 5,
    num_kv_heads: int = 1,
    vocab_size: int = 256,
    tie_word_embeddings: bool = True,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    **overrides,
) -> Path:
    """Save a random model of `family` with a tokenizer to `path` and return it.

    `overrides` are further config keys (e.g. sliding_window=8) over the family's defaults.
    """
    torch.manual_seed(seed)
    kwargs = dict(
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        vocab_size=vocab_size,
        max_position_embeddings=512,
        tie_word_embeddings=tie_word_embeddings,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
    )
    kwargs.update(FAMILY_DEFAULTS[family])
    kwargs.update(overrides)
    config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * 0.08)
    model = model.to(dtype)
    path = Path(path)
    model.save_pretrained(path)
    tiny_tokenizer(vocab_size).save_pretrained(path)
    return path


def to_stacked_layout(src: Path, dst: Path) -> Path:
    """Rewrite a mixture-of-experts model dir with transformers' stacked expert parameters
    (`mlp.experts.gate_up_proj` [experts, 2 x intermediate, hidden], `mlp.experts.down_proj`),
    the in-memory layout, instead of the per-expert tensors `save_pretrained` writes."""
    import shutil

    from safetensors.torch import save_file

    model = AutoModelForCausalLM.from_pretrained(src, dtype="auto")
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    dst = Path(dst)
    dst.mkdir(parents=True)
    for item in Path(src).iterdir():
        if (
            item.is_file()
            and not item.name.endswith(".safetensors")
            and item.name != "model.safetensors.index.json"
        ):
            shutil.copy2(item, dst / item.name)
    save_file(
        {k: v.contiguous() for k, v in state.items()},
        str(dst / "model.safetensors"),
        metadata={"format": "pt"},
    )
    return dst


def tiny_text(n_words: int = 20000, vocab_size: int = 256, seed: int = 0) -> str:
    """Random 'w<i>' words with a Zipf-like skew so that models see structure."""
    g = torch.Generator().manual_seed(seed)
    weights = 1.0 / torch.arange(1, vocab_size - 2, dtype=torch.float64)
    ids = torch.multinomial(weights, n_words, replacement=True, generator=g)
    return " ".join(f"w{i}" for i in ids.tolist())
