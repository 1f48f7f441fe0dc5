"""Model families (rose/family.py), dense and mixture-of-experts: every row runs its layers
exactly as transformers runs the model. One table of cases (CASES), one set of fixtures.

Tiny random models are built from each family's transformers config (tests/tiny.py):
widths not multiples of 128, GQA (5 query heads, 1 kv head), tied and untied
embeddings, and what makes each family itself: Llama 3's rope scaling and 128k
context, Gemma 2/3's sliding windows (16 tokens, shorter than the 40-token
sequences here and the 32-token calibration windows), Gemma 2's attention-logit
soft-capping, Gemma 3's local/global RoPE, Phi-3's fused projections and longrope.
Mixture-of-experts rows (Mixtral, Qwen2-MoE with its shared expert, Qwen3-MoE): expert
widths 328 (Mixtral) and 136 (Qwen), 4 experts with top-2 routing, Qwen2-MoE's shared
expert (168) and its sigmoid gate. transformers 5 holds the experts stacked
(`mlp.experts.gate_up_proj` [experts, 2 x intermediate, hidden]); `save_pretrained` and hub
checkpoints name them one by one; both layouts are tested.

1. Oracle: the layer-by-layer forward (embed, then build_layer + layer_forward per
   layer) equals the full transformers model's hidden states (MoE: both layouts, a
   Qwen2-MoE dense `mlp_only` layer), and each feature is one the oracle sees (turning it
   off, or changing the routing, changes the model's output).
2. The table guards: unsupported model types, unknown attention kinds and layer
   structures the row does not describe are refused, not pruned silently wrong.
3. MoE units and layouts: every expert's gate, up and down are units with their own
   mask; stacked and per-expert checkpoints give the same matrices; layouts the
   row does not describe are refused.
4. MoE Hessians: per expert, equal to a slow reference that routes the calibration
   tokens by hand (softmax, top-k, a loop over tokens), with and without
   `moe.calibrate_all_experts`; computed in several passes when they do not fit,
   identical to one pass, with one expert's Hessians in memory at a time.
5. End to end (e2e): one Snakemake run per family in E2E (rose at 0.5 and 2:4), shared by
   the assertions that read it: the reassembled model loads with transformers (MoE: in the
   source's layout), every pruned Linear (MoE: every expert slice) has exactly its sparsity,
   everything else (the router) is untouched, and the pruned model's hidden states are our
   layer chain's; an MoE kill and resume is bit-identical; experts that saw fewer tokens
   than their width are reported.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import weakref
from pathlib import Path

import pytest
import torch
from model_oracle import full_model_states as _full_model_states
from model_oracle import layer_chain as _layer_chain
from model_oracle import relative_change_when
from pipeline_utils import (
    REPO,
    kill_when,
    pruned_count,
    run_snakemake,
    run_snakemake_api,
    snakemake_cmd,
    weights_digest,
    write_config,
)
from tiny import make_tiny_model, to_stacked_layout
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.activations import ACT2FN

from rose import checkpoint as ck
from rose import config as rose_config
from rose import family, plan, runner
from rose.artifacts import H5Artifact
from rose.hessian import expert_hessian_bytes
from rose.layout import RunLayout
from rose.model_info import ModelInfo
from rose.provenance import variant_settings
from rose.sparsity import prune_count
from rose.stages import layer as layer_stages
from rose.stages import layer_pass

SEQLEN = 40  # longer than the tiny sliding windows (16, 8)

# case -> (tests/tiny.py family, config overrides, stacked expert layout)
CASES = {
    "llama": ("llama", {}, False),
    "mistral": ("mistral", {}, False),
    "qwen2": ("qwen2", {}, False),
    "qwen3": ("qwen3", {}, False),
    "llama3": ("llama3", dict(tie_word_embeddings=False), False),
    "gemma2": ("gemma2", {}, False),
    "gemma3": ("gemma3", dict(tie_word_embeddings=False), False),
    "phi3": ("phi3", dict(tie_word_embeddings=False), False),
    # Phi-3 128k / Phi-4-mini style: longrope switches to its long factors past 32 tokens
    "phi3-longrope": (
        "phi3",
        dict(
            original_max_position_embeddings=32,
            rope_scaling={
                "rope_type": "longrope",
                "short_factor": [1.0] * 20,
                "long_factor": [1.0 + i / 4 for i in range(20)],
            },
        ),
        False,
    ),
    "mistral-window": ("mistral", dict(sliding_window=8), False),
    # transformers' Llama ignores a sliding_window key: every layer is causal
    "llama-window": ("llama", dict(sliding_window=8), False),
    # layers >= max_window_layers slide: one full layer, then sliding ones
    "qwen2-window": (
        "qwen2",
        dict(use_sliding_window=True, sliding_window=8, max_window_layers=1),
        False,
    ),
    # mixture of experts, per-expert tensors (as saved) and stacked (transformers' layout)
    "mixtral": ("mixtral", {}, False),
    "mixtral-stacked": ("mixtral", {}, True),
    "qwen2_moe": ("qwen2_moe", {}, False),
    "qwen2_moe-stacked": ("qwen2_moe", {}, True),
    # layer 1 has a dense MLP (intermediate 328) instead of experts
    "qwen2_moe-dense-layer": ("qwen2_moe", dict(mlp_only_layers=[1]), False),
    "qwen3_moe": ("qwen3_moe", dict(tie_word_embeddings=False), False),
}
MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe")


def is_moe(case: str) -> bool:
    return CASES[case][0] in MOE_FAMILIES


# What each feature's oracle must be sensitive to: the full model with the feature
# turned off (a config override at load time) must differ from the model with it.
FEATURES = {
    "llama3-rope-scaling": (
        "llama3",
        dict(rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
    ),
    "gemma2-window": ("gemma2", dict(sliding_window=4096)),
    "gemma2-softcap": ("gemma2", dict(attn_logit_softcapping=None)),
    "gemma3-window": ("gemma3", dict(sliding_window=4096)),
    "phi3-longrope": (
        "phi3-longrope",
        dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    ),
    "mistral-window": ("mistral-window", dict(sliding_window=None)),
    "qwen2-window": ("qwen2-window", dict(sliding_window=4096)),
    # the routing: top-1 instead of top-2, unnormalised top-k weights
    "mixtral-routing": ("mixtral", dict(num_experts_per_tok=1)),
    "qwen3_moe-norm-topk": ("qwen3_moe", dict(norm_topk_prob=False)),
    "qwen2_moe-routing": ("qwen2_moe", dict(num_experts_per_tok=1)),
}


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """case -> a model directory, built on first use (a stacked case rewrites its base's)."""
    root = tmp_path_factory.mktemp("families")
    cache: dict[str, Path] = {}

    def get(case: str) -> Path:
        if case not in cache:
            name, overrides, stacked = CASES[case]
            base = case.removesuffix("-stacked")
            if base not in cache:
                cache[base] = make_tiny_model(root / base, family=name, **overrides)
            cache[case] = to_stacked_layout(cache[base], root / case) if stacked else cache[base]
        return cache[case]

    return get


def _tokens(batch: int = 2, seqlen: int = SEQLEN) -> torch.Tensor:
    return torch.randint(3, 256, (batch, seqlen), generator=torch.Generator().manual_seed(1))


# Both sides run the same transformers layer modules in float32 on the same inputs; they
# can differ only in kernel order. Measured here (torch 2.13 CPU): bit-identical for every
# case. 1e-5 of the largest |hidden| leaves room for other BLAS builds and thread counts.
REL_ATOL = 1e-5


def _assert_states_equal(ours, theirs, what: str) -> None:
    scale = float(theirs.abs().max())
    torch.testing.assert_close(
        ours, theirs, rtol=REL_ATOL, atol=REL_ATOL * scale, msg=lambda m: f"{what}: {m}"
    )


def _units(path: Path, index: int, prune_router: bool = False) -> family.LayerUnits:
    checkpoint = ck.Checkpoint.open(path)
    fam = family.family_for(checkpoint.config)
    names = checkpoint.layer_names(fam.layer_prefix.format(index=index))
    return family.layer_units(checkpoint.config, index, names, prune_router)


# ---------------------------------------------------------------- 1. oracle


@pytest.mark.parametrize("case", list(CASES))
def test_layer_by_layer_forward_equals_the_full_model(tiny_models, case):
    path = tiny_models(case)
    tokens = _tokens()
    ours = _layer_chain(path, tokens)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    fam = family.family_for(model.config)
    # the attention (and experts) implementations we run the layers with are the ones
    # transformers picked
    assert model.config._attn_implementation == fam.attn_implementation
    if is_moe(case):
        assert model.config._experts_implementation == fam.experts_implementation == "grouped_mm"
    states = _full_model_states(model, tokens)
    assert len(states) == len(ours)
    for k in range(len(ours) - 1):
        _assert_states_equal(ours[k], states[k], f"{case}: input of layer {k}")
    with torch.no_grad():
        _assert_states_equal(model.model.norm(ours[-1]), states[-1], f"{case}: final hidden state")


@pytest.mark.parametrize("feature", list(FEATURES))
def test_each_family_feature_changes_what_the_oracle_compares(tiny_models, feature):
    """Equality above proves something only if the feature matters at this size and length."""
    case, off = FEATURES[feature]
    path = tiny_models(case)
    change = relative_change_when(path, _tokens(), **off)
    assert change > 1e-3, f"{feature} {off}: turning it off changes the output by only {change:.2e}"


def test_gemma_embeddings_are_scaled_in_the_embedding_dtype():
    """sqrt(hidden) cast to the weight's dtype first: in bfloat16 sqrt(3072) is 55.5, not 55.4256."""
    fam = family.FAMILIES["gemma2"]
    weight = torch.ones(4, 3072, dtype=torch.bfloat16)
    out = family.embed(weight, torch.tensor([[1, 2]]), fam)
    assert out.dtype == torch.bfloat16 and float(out[0, 0, 0]) == 55.5
    assert float(family.embed(weight.float(), torch.tensor([[1]]), fam)[0, 0, 0]) == pytest.approx(
        3072**0.5
    )
    assert (
        float(family.embed(weight.float(), torch.tensor([[1]]), family.FAMILIES["llama"])[0, 0, 0])
        == 1.0
    )


@pytest.mark.parametrize("case", ["gemma2", "gemma3", "qwen2-window", "mistral-window"])
def test_sliding_layers_get_their_window_and_full_layers_a_causal_mask(tiny_models, case):
    """Decode each layer's mask: a sliding layer sees keys q-w < k <= q, a full layer every k <= q."""
    config = ck.Checkpoint.open(tiny_models(case)).config
    fam = family.family_for(config)
    hidden = torch.zeros(2, SEQLEN, config.hidden_size)
    q = torch.arange(SEQLEN).unsqueeze(1)
    k = torch.arange(SEQLEN).unsqueeze(0)
    kinds = []
    for index in range(config.num_hidden_layers):
        kind = fam.attention_kind(config, index)
        kinds.append(kind)
        mask, _, (cos, sin) = family.attention_inputs(config, index, hidden)
        window = config.sliding_window if kind == family.SLIDING else None
        expected = (k <= q) & (k > q - window) if window else (k <= q)
        if mask is None:  # sdpa's is_causal: only ever a plain causal mask
            assert window is None and fam.attn_implementation == "sdpa"
            continue
        allowed = (
            mask if mask.dtype == torch.bool else mask == 0
        )  # eager: additive, 0 where allowed
        assert allowed.shape == (2, 1, SEQLEN, SEQLEN)
        assert torch.equal(allowed[0, 0], expected) and torch.equal(allowed[1, 0], expected), (
            case,
            index,
            kind,
        )
    # Mistral windows every layer; the others alternate
    assert (
        kinds == [family.SLIDING] * 3
        if case == "mistral-window"
        else {family.SLIDING, family.FULL} == set(kinds)
    )
    if fam.rotary_per_kind:  # Gemma 3: local and global RoPE differ
        cos_sliding = family.attention_inputs(config, kinds.index(family.SLIDING), hidden)[2][0]
        cos_full = family.attention_inputs(config, kinds.index(family.FULL), hidden)[2][0]
        assert not torch.allclose(cos_sliding, cos_full)


def test_a_llama_config_with_a_sliding_window_is_causal_as_in_transformers(
    tiny_models, monkeypatch
):
    """LlamaAttention and LlamaModel ignore `sliding_window`: every layer is FULL, and the layer
    chain is bit-identical to transformers' model, where a window of 8 (shorter than the 40
    tokens) would change it, as the table gave such a layer before."""
    import dataclasses

    path = tiny_models("llama-window")
    config = ck.Checkpoint.open(path).config
    assert config.sliding_window == 8
    fam = family.family_for(config)
    assert [fam.attention_kind(config, i) for i in range(3)] == [family.FULL] * 3
    tokens = _tokens()
    ours = _layer_chain(path, tokens)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    states = _full_model_states(model, tokens)
    for k in range(1, len(ours) - 1):  # every layer's output, as the next layer's input
        assert torch.equal(ours[k], states[k]), f"output of layer {k - 1}"
    with torch.no_grad():
        assert torch.equal(model.model.norm(ours[-1]), states[-1])
    windowed = dataclasses.replace(fam, ignores_sliding_window=False)
    monkeypatch.setitem(family.FAMILIES, "llama", windowed)
    assert windowed.attention_kind(config, 0) == family.SLIDING
    assert not torch.allclose(_layer_chain(path, tokens)[-1], ours[-1])


def test_a_window_transformers_cannot_build_is_refused(tiny_models):
    """A layer_types entry without a usable window, or no entry for a layer: one line naming the
    family, the layer and the config key."""
    config = ck.Checkpoint.open(tiny_models("qwen2")).config
    config.layer_types = ["full_attention", "sliding_attention", "full_attention"]
    config.sliding_window = None  # Qwen2Config sets it so without use_sliding_window
    with pytest.raises(
        ValueError, match=r"^qwen2 layer 1: a sliding_attention layer needs config.sliding_window"
    ):
        family.check_model(config)
    config.sliding_window = 0  # Qwen2-MoE's value without use_sliding_window
    with pytest.raises(ValueError, match=r"needs config.sliding_window .*got 0"):
        family.attention_inputs(config, 1, torch.zeros(1, 4, config.hidden_size))
    config.sliding_window = 8
    assert family.check_model(config).name == "qwen2"
    config.layer_types = ["full_attention"]
    with pytest.raises(ValueError, match=r"^qwen2 layer 1: config.layer_types does not name"):
        family.check_model(config)


@pytest.mark.parametrize("case", ["llama3", "gemma2", "gemma3", "phi3"])
def test_each_input_group_is_one_input_and_every_linear_is_pruned(tiny_models, case):
    """Hook every Linear: the Linears of a group read the very same tensor (one Hessian is right
    for all of them), and the groups cover every Linear of the layer."""
    path = tiny_models(case)
    checkpoint = ck.Checkpoint.open(path)
    fam = family.family_for(checkpoint.config)
    layer = family.build_layer(
        checkpoint.config,
        0,
        checkpoint.read_prefix(fam.layer_prefix.format(index=0)),
        "cpu",
        torch.float32,
    )
    linears = {n for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    assert linears == set(fam.linear_names())
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        layer.get_submodule(name).register_forward_pre_hook(
            lambda _m, args, name=name: seen.__setitem__(name, args[0])
        )
        for name in linears
    ]
    with torch.no_grad():
        family.layer_forward(
            layer, checkpoint.config, torch.randn(2, SEQLEN, checkpoint.config.hidden_size)
        )
    for hook in hooks:
        hook.remove()
    for group in fam.input_groups:
        for name in group[1:]:
            assert torch.equal(seen[name], seen[group[0]]), (group, name)
    if case == "phi3":  # fused Linears: one matrix and one Hessian each
        assert fam.input_groups == (
            ("self_attn.qkv_proj",),
            ("self_attn.o_proj",),
            ("mlp.gate_up_proj",),
            ("mlp.down_proj",),
        )
        cfg = checkpoint.config
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        qkv = layer.self_attn.qkv_proj.weight
        assert qkv.shape == (
            (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * head_dim,
            cfg.hidden_size,
        )
        assert layer.mlp.gate_up_proj.weight.shape == (2 * cfg.intermediate_size, cfg.hidden_size)


def test_llama3_rope_scaling_and_long_context_are_built_from_the_config(tiny_models):
    config = ck.Checkpoint.open(tiny_models("llama3")).config
    assert (
        config.max_position_embeddings == 131072 and config.rope_parameters["rope_type"] == "llama3"
    )
    rotary = family.family_for(config).classes()[1](config)
    default = AutoConfig.for_model(
        "llama", hidden_size=200, num_attention_heads=5, rope_theta=500000.0
    )
    assert not torch.allclose(
        rotary.inv_freq, family.FAMILIES["llama"].classes()[1](default).inv_freq
    )


# ---------------------------------------------------------------- 2. the table's guards


def test_unsupported_model_type_is_one_line_listing_the_supported_ones():
    from transformers import GPT2Config, OlmoeConfig

    for config in (GPT2Config(), OlmoeConfig()):  # OLMoE: a mixture-of-experts family without a row
        with pytest.raises(ValueError) as info:
            family.family_for(config)
        message = str(info.value)
        assert "\n" not in message and f"unsupported architecture {config.model_type!r}" in message
        for name in (
            "gemma2",
            "gemma3_text",
            "llama",
            "mistral",
            "mixtral",
            "phi3",
            "qwen2",
            "qwen2_moe",
            "qwen3",
            "qwen3_moe",
        ):
            assert name in message


def test_an_attention_kind_we_do_not_handle_is_refused(tiny_models):
    config = ck.Checkpoint.open(tiny_models("gemma2")).config
    config.layer_types = ["sliding_attention", "chunked_attention", "full_attention"]
    with pytest.raises(ValueError, match="attention kind 'chunked_attention' is not handled"):
        family.check_model(config)
    with pytest.raises(ValueError, match="chunked_attention"):
        family.attention_inputs(config, 1, torch.zeros(1, 4, config.hidden_size))


def test_bidirectional_attention_is_refused(tiny_models):
    config = ck.Checkpoint.open(tiny_models("gemma3")).config
    config.use_bidirectional_attention = True
    with pytest.raises(ValueError, match="bidirectional"):
        family.check_model(config)


def test_a_layer_structure_the_row_does_not_describe_is_refused(tiny_models):
    config = ck.Checkpoint.open(tiny_models("llama")).config
    fam = family.family_for(config)
    family.check_model(config)  # as transformers builds it: fine
    _, layer = family._meta_layer(config, 0)
    with torch.device("meta"):
        layer.mlp.extra_proj = torch.nn.Linear(8, 8, bias=False)  # a new projection
    with pytest.raises(ValueError, match=r"unhandled weight matrices \['mlp.extra_proj'\]"):
        family.check_layer(fam, layer, 0)
    _, layer = family._meta_layer(config, 0)
    layer.mlp.register_parameter(
        "experts", torch.nn.Parameter(torch.empty(4, 8, 8, device="meta"))
    )  # stacked experts
    with pytest.raises(ValueError, match="mlp.experts"):
        family.check_layer(fam, layer, 0)
    # a row whose groups do not name the layer's Linears (Llama groups on a Phi-3 layer)
    phi3 = ck.Checkpoint.open(tiny_models("phi3")).config
    _, layer = family._meta_layer(phi3, 0)
    with pytest.raises(ValueError, match="missing Linears"):
        family.check_layer(family.FAMILIES["llama"], layer, 0)


def test_a_layer_whose_window_disagrees_with_its_mask_is_refused(tiny_models):
    path = tiny_models("gemma2")
    checkpoint = ck.Checkpoint.open(path)
    layer = family.build_layer(
        checkpoint.config, 0, checkpoint.read_prefix("model.layers.0."), "cpu", torch.float32
    )
    layer.self_attn.sliding_window = None  # e.g. transformers stopped windowing this layer
    with pytest.raises(ValueError, match="sliding_window=None"):
        family.layer_forward(
            layer, checkpoint.config, torch.zeros(1, 4, checkpoint.config.hidden_size)
        )


# ---------------------------------------------------------------- 3. MoE units and layouts


def test_units_are_each_experts_gate_up_and_down(tiny_models):
    mixtral = _units(tiny_models("mixtral"), 0)
    assert mixtral.layout == family.PER_EXPERT and mixtral.num_experts == 4
    assert mixtral.groups[:2] == (
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
    )
    assert mixtral.groups[2:4] == (
        ("block_sparse_moe.experts.0.w1", "block_sparse_moe.experts.0.w3"),
        ("block_sparse_moe.experts.0.w2",),
    )
    assert len(mixtral.groups) == 2 + 2 * 4 and "block_sparse_moe.gate" not in mixtral.units
    stacked = _units(tiny_models("mixtral-stacked"), 0)
    assert stacked.layout == family.STACKED
    gate, up, down = (stacked.units[f"mlp.experts.2.{p}_proj"] for p in ("gate", "up", "down"))
    assert (gate.tensor, gate.index, gate.rows) == ("mlp.experts.gate_up_proj", 2, (0, 328))
    assert (up.tensor, up.index, up.rows) == ("mlp.experts.gate_up_proj", 2, (328, 656))
    assert (down.tensor, down.index, down.rows) == ("mlp.experts.down_proj", 2, None)
    # the router is a unit only when it is pruned; Qwen2-MoE's shared expert is a dense MLP
    # whose gate/up read every token, as the router and the shared expert's gate do
    qwen2 = _units(tiny_models("qwen2_moe"), 0, prune_router=True)
    assert qwen2.groups[2:4] == (
        (
            "mlp.shared_expert.gate_proj",
            "mlp.shared_expert.up_proj",
            "mlp.gate",
            "mlp.shared_expert_gate",
        ),
        ("mlp.shared_expert.down_proj",),
    )
    assert ("mlp.gate",) in _units(tiny_models("mixtral-stacked"), 0, prune_router=True).groups
    # a dense `mlp_only` layer of an MoE model is pruned like Llama's
    dense = _units(tiny_models("qwen2_moe-dense-layer"), 1)
    assert dense.groups == family.LLAMA_GROUPS and dense.num_experts == 0


def test_both_layouts_hold_the_same_matrices(tiny_models):
    """Every unit of the per-expert checkpoint equals its slice of the stacked one."""
    for base in ("mixtral", "qwen2_moe"):
        per_expert, stacked = (
            ck.Checkpoint.open(tiny_models(base)),
            ck.Checkpoint.open(tiny_models(f"{base}-stacked")),
        )
        units_p, units_s = (
            _units(tiny_models(base), 1, True),
            _units(tiny_models(f"{base}-stacked"), 1, True),
        )
        assert len(units_p.names()) == len(units_s.names())
        for name_p, name_s in zip(units_p.names(), units_s.names(), strict=True):
            up, us = units_p.units[name_p], units_s.units[name_s]
            assert (up.expert, up.part, up.module) == (us.expert, us.part, us.module)
            a = layer_pass.read_unit(per_expert, "model.layers.1.", up)
            b = layer_pass.read_unit(stacked, "model.layers.1.", us)
            assert torch.equal(a, b), (name_p, name_s)


def test_experts_stored_another_way_are_refused(tiny_models):
    config = ck.Checkpoint.open(tiny_models("qwen3_moe")).config
    fam = family.family_for(config)
    _, layer = family._meta_layer(config, 0)
    layer.mlp.experts.is_transposed = True  # e.g. [experts, hidden, 2 x intermediate]
    with pytest.raises(ValueError, match="experts are not stored as rose reads them"):
        family.check_layer(fam, layer, 0)
    _, layer = family._meta_layer(config, 0)
    del layer.mlp.experts.gate_up_proj  # e.g. a ModuleList of Linears
    with pytest.raises(ValueError, match="experts are not stored as rose reads them"):
        family.check_layer(fam, layer, 0)
    with pytest.raises(ValueError, match="neither stacked .* nor one by one"):
        family.layer_units(config, 0, ["mlp.gate.weight", "mlp.experts.0.w1.weight"])


# ---------------------------------------------------------------- 4. MoE Hessians


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, tiny_models, tiny_text_file):
    """Per family: a prepared run (tokens, layer 0's inputs) to compute Hessians from."""
    cache = {}

    def get(case: str):
        if case not in cache:
            tmp = tmp_path_factory.mktemp(f"hess-{case}")
            path = write_config(
                tmp / "c.yaml",
                tiny_models(case),
                tiny_text_file,
                tmp / "results",
                methods=["rose"],
                calibration={"nsamples": 6, "seqlen": 32, "batch_size": 4},
            )
            cfg = rose_config.load(path)
            for stage in ("prepare_model", "capture_calibration", "embed_calibration"):
                plan.execute(cfg, stage)
            cache[case] = cfg
        return cache[case]

    return get


def _hessians(cfg, out: Path, calibrate_all: bool, memory_budget: int | None = None):
    cfg.raw["moe"] = {"calibrate_all_experts": calibrate_all}
    layout = RunLayout(cfg.run_dir)
    info = ModelInfo.load(layout.model_json)
    ctx = plan.Plan(cfg, info).context("hessians", variant="rose-0.5", layer=0)
    try:
        result = layer_stages.compute_hessians(
            dataclasses.replace(ctx, outputs={"hessians": out}), memory_budget=memory_budget
        )
    finally:
        cfg.raw.pop("moe")
    with H5Artifact(out) as art:
        data = {
            name: (torch.from_numpy(art.read(name)), art.dataset_attrs(name)) for name in art._fh
        }
    return result, data


def _reference(cfg, calibrate_all: bool):
    """The experts' Hessians of layer 0, routed by hand in float64 from the full model's MoE-block input."""
    layout = RunLayout(cfg.run_dir)
    model_dir = Path(ModelInfo.load(layout.model_json).path)
    with H5Artifact(layout.tokens) as art:
        tokens = torch.from_numpy(art.read("tokens")).long()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    config = model.config
    captured = []
    hook = model.model.layers[0].mlp.register_forward_pre_hook(
        lambda _m, args: captured.append(args[0])
    )
    with torch.no_grad():
        model(tokens)
    hook.remove()
    x = captured[0].reshape(-1, config.hidden_size).double()
    n_seq = tokens.shape[0]
    checkpoint = ck.Checkpoint.open(model_dir)  # per-expert names, read without rose's layout code
    block = "block_sparse_moe" if config.model_type == "mixtral" else "mlp"
    names = (
        ("w1", "w3", "w2")
        if config.model_type == "mixtral"
        else ("gate_proj", "up_proj", "down_proj")
    )
    router = checkpoint.read(f"model.layers.0.{block}.gate.weight").double()
    probs = torch.softmax(x @ router.T, dim=-1)
    k = config.num_experts_per_tok
    ranked = probs.sort(dim=-1, descending=True).values
    assert float((ranked[:, k - 1] - ranked[:, k]).min()) > 1e-6, (
        "a near-tie would make the routing fragile"
    )
    chosen = probs.topk(k, dim=-1).indices
    act = ACT2FN[config.hidden_act]
    out = {}
    for e in range(probs.shape[1]):
        tokens_e = [t for t in range(x.shape[0]) if e in chosen[t].tolist()]  # by hand
        xe = x if calibrate_all else x[tokens_e]
        gate, up, down = (
            checkpoint.read(f"model.layers.0.{block}.experts.{e}.{n}.weight").double()
            for n in names
        )
        mid = act(xe @ gate.T) * (xe @ up.T)
        assert down.shape[1] == mid.shape[1]
        out[e] = (2 / n_seq * xe.T @ xe, 2 / n_seq * mid.T @ mid, len(tokens_e))
    shared = None
    if getattr(config, "shared_expert_intermediate_size", None):
        shared = 2 / n_seq * x.T @ x
    return out, shared


@pytest.mark.parametrize("case", ["mixtral", "qwen2_moe", "qwen3_moe"])
@pytest.mark.parametrize("calibrate_all", [True, False], ids=["all-experts", "routed"])
def test_expert_hessians_equal_a_reference_that_routes_by_hand(
    calibrated, tmp_path, case, calibrate_all
):
    cfg = calibrated(case)
    _, data = _hessians(cfg, tmp_path / "h.h5", calibrate_all)
    reference, shared = _reference(cfg, calibrate_all)
    units = _units(Path(ModelInfo.load(RunLayout(cfg.run_dir).model_json).path), 0)
    routed_total = 0
    for e, (h_in, h_mid, routed) in reference.items():
        gate_group = next(
            g
            for g in units.groups
            if units.units[g[0]].expert == e and units.units[g[0]].part == "gate"
        )
        down_group = next(
            g
            for g in units.groups
            if units.units[g[0]].expert == e and units.units[g[0]].part == "down"
        )
        for group, want in ((gate_group, h_in), (down_group, h_mid)):
            got, attrs = data[group[0]]
            scale = float(want.abs().max())
            torch.testing.assert_close(
                got.double(), want, rtol=1e-4, atol=1e-4 * scale, msg=lambda m, g=group: f"{g}: {m}"
            )
            assert attrs["routed_tokens"] == routed and attrs["expert"] == e
            assert attrs["tokens"] == (6 * 32 if calibrate_all else routed)
            assert attrs["sequences"] == 6 and attrs["linears"] == ",".join(group)
        routed_total += routed
    assert routed_total == 6 * 32 * 2  # top-2
    if shared is not None:  # Qwen2-MoE's shared expert reads every token
        got, _ = data["mlp.shared_expert.gate_proj"]
        torch.testing.assert_close(
            got.double(), shared, rtol=1e-4, atol=1e-4 * float(shared.abs().max())
        )


def test_hessians_in_expert_passes_equal_one_pass(calibrated, tmp_path, monkeypatch):
    """Not enough memory for every expert's Hessians: one pass over the inputs per expert that
    fits (here one), each expert's Hessians written and freed before the next, same values."""
    cfg = calibrated("qwen2_moe")
    result, whole = _hessians(cfg, tmp_path / "one.h5", True)
    assert result == {"passes": 1, "experts_per_pass": 4}

    live: weakref.WeakSet = weakref.WeakSet()
    peak = {"n": 0}

    class Counted(layer_pass.HessianAccumulator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            live.add(self)

        def add_rows(self, inputs):
            peak["n"] = max(peak["n"], len(live))
            super().add_rows(inputs)

    monkeypatch.setattr(layer_pass, "HessianAccumulator", Counted)
    result, parts = _hessians(cfg, tmp_path / "parts.h5", True, memory_budget=1)
    assert result == {"passes": 4, "experts_per_pass": 1}
    # pass 1: attention (2), shared expert (2) and one expert (2); then one expert (2) per pass
    assert peak["n"] == 6
    assert whole.keys() == parts.keys()
    for name in whole:
        assert torch.equal(whole[name][0], parts[name][0]), name
        assert whole[name][1] == parts[name][1], name


def test_expert_passes_for_mixtral_8x7b_and_qwen3_30b_a3b():
    """The pass plan on real shapes (meta device): one pass when the Hessians fit, else groups."""
    gib = 1 << 30
    mixtral = AutoConfig.for_model("mixtral")  # Mixtral-8x7B's shapes are the config defaults
    qwen3 = AutoConfig.for_model(
        "qwen3_moe",
        hidden_size=2048,
        moe_intermediate_size=768,
        num_experts=128,
        num_experts_per_tok=8,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        num_hidden_layers=48,
    )
    for config, experts, per_expert in (
        (mixtral, 8, expert_hessian_bytes(4096, 14336)),
        (qwen3, 128, expert_hessian_bytes(2048, 768)),
    ):
        units = family.layer_units(config, 0)
        assert units.num_experts == experts
        _, layer = family._meta_layer(config, 0)
        widths = {n: layer_pass.unit_weight(layer, units.units[n]).shape[1] for n in units.names()}
        total = sum(4 * widths[g[0]] ** 2 for g in units.groups)
        other = total - experts * per_expert
        assert other == 4 * (
            config.hidden_size**2
            + (
                config.num_attention_heads
                * (
                    getattr(config, "head_dim", None)
                    or config.hidden_size // config.num_attention_heads
                )
            )
            ** 2
        )
        assert layer_stages._expert_passes(units, widths, total) == [list(range(experts))]
        budget = other + 3 * per_expert + 1
        passes = layer_stages._expert_passes(units, widths, budget)
        assert all(len(p) == 3 for p in passes[:-1]) and sum(passes, []) == list(range(experts))
        assert layer_stages._expert_passes(units, widths, 0) == [[e] for e in range(experts)]
    # the sizes docs/families.md quotes: float32 Hessians of one layer
    assert round(8 * expert_hessian_bytes(4096, 14336) / gib, 2) == 6.62
    assert round(128 * expert_hessian_bytes(2048, 768) / gib, 2) == 2.28


# ---------------------------------------------------------------- 5. end to end (e2e)

# case -> (tests/tiny.py family, config overrides, stacked, calibration): 2-layer models
DENSE_CALIBRATION = {"nsamples": 4, "seqlen": 32, "batch_size": 4}  # 32 > Gemma's 16-token window
CALIBRATION = {"nsamples": 8, "seqlen": 32, "batch_size": 4}  # MoE: more tokens per expert
E2E = {
    "llama3": ("llama3", {}, False, DENSE_CALIBRATION),
    "gemma2": ("gemma2", {}, False, DENSE_CALIBRATION),
    "gemma3": ("gemma3", {"tie_word_embeddings": False}, False, DENSE_CALIBRATION),
    "phi3": ("phi3", {"tie_word_embeddings": False}, False, DENSE_CALIBRATION),
    "mixtral-stacked": ("mixtral", {}, True, CALIBRATION),
    "qwen2_moe": ("qwen2_moe", {}, False, CALIBRATION),
    "qwen3_moe": ("qwen3_moe", {"tie_word_embeddings": False}, False, CALIBRATION),
}
VARIANTS = ("rose-0.5", "rose-2of4")


@pytest.fixture(scope="module")
def family_runs(tmp_path_factory, tiny_text_file):
    """case -> (case, model dir, layout) of one Snakemake run (Python API) of a 2-layer model of
    the family, rose at 0.5 and 2:4; run once, on first use, for every test that reads it."""
    cache: dict[str, tuple[str, Path, RunLayout]] = {}

    def get(case: str) -> tuple[str, Path, RunLayout]:
        if case not in cache:
            name, overrides, stacked, calibration = E2E[case]
            tmp = tmp_path_factory.mktemp(f"e2e-{case}")
            model_dir = make_tiny_model(tmp / "model", family=name, num_layers=2, **overrides)
            if stacked:
                model_dir = to_stacked_layout(model_dir, tmp / "stacked")
            cfg = write_config(
                tmp / "config.yaml",
                model_dir,
                tiny_text_file,
                tmp / "results",
                methods=["rose"],
                sparsities=[0.5, "2:4"],
                keep_intermediates=True,
                calibration=calibration,
            )
            run_dir = tmp / "results" / "tiny"
            run_snakemake_api(cfg, tmp, [str(run_dir / v / "model") for v in VARIANTS])
            cache[case] = case, model_dir, RunLayout(run_dir)
        return cache[case]

    return get


def _pruned_linears(model) -> dict[str, torch.Tensor]:
    return {
        name: module.weight.detach()
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and ".layers." in name
    }


def _assert_exact_sparsity(
    weight: torch.Tensor, variant: str, widths: list[int], what: str
) -> None:
    zero = weight == 0
    if variant.endswith("2of4"):
        per_group = zero.reshape(weight.shape[0], -1, 4).sum(-1)
        assert bool((per_group == 2).all()), f"{what}: a group of 4 without exactly 2 zeros"
    else:
        # the sweep prunes floor(0.5 * rows * width) weights in each mask block (order.h5)
        assert sum(widths) == weight.shape[1]
        expected = sum(prune_count(weight.shape[0] * w, 0.5) for w in widths)
        assert int(zero.sum()) == expected, (what, int(zero.sum()), expected)


def _assert_dense_family_pruned(model, dense, layout: RunLayout, variant: str) -> None:
    """Every pruned Linear has exactly its sparsity; everything else is the dense model's,
    and tied heads stay tied."""
    fam = family.family_for(model.config)
    linears = _pruned_linears(model)
    assert len(linears) == 2 * len(fam.linear_names())
    manifest = json.loads((layout.model_dir(variant) / "pruning.json").read_text())
    assert set(manifest["linears"]) == set(linears)
    for full_name, weight in linears.items():
        layer = int(full_name.split(".layers.")[1].split(".")[0])
        linear = full_name.split(f".layers.{layer}.")[1]
        with H5Artifact(layout.order(variant, layer)) as art:
            widths = [int(w) for w in art.read(f"{linear}/block_widths")]
        _assert_exact_sparsity(weight, variant, widths, full_name)
        assert manifest["linears"][full_name]["sparsity"] == pytest.approx(
            float((weight == 0).float().mean())
        )
    dense_state = dense.state_dict()
    for tensor_name, tensor in model.state_dict().items():
        if tensor_name.removesuffix(".weight") not in linears:
            assert torch.equal(tensor, dense_state[tensor_name]), tensor_name
    tied = model.config.tie_word_embeddings
    assert (model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()) == tied


def _assert_experts_pruned(case: str, model_dir: Path, layout: RunLayout, variant: str) -> None:
    """Written back in the source's layout; every unit (attention Linear, expert slice) has
    exactly its sparsity; the router, norms, embeddings (and Qwen2-MoE's shared expert gate)
    are the dense model's."""
    out_dir = layout.model_dir(variant)
    source, pruned = ck.Checkpoint.open(model_dir), ck.Checkpoint.open(out_dir)
    # written back in the source's layout: the same tensor names, shapes and dtypes
    assert source.specs() == pruned.specs()
    manifest = json.loads((out_dir / "pruning.json").read_text())
    fam = family.family_for(source.config)
    replaced: set[str] = set()
    expected_names = set()
    for index in range(2):
        prefix = fam.layer_prefix.format(index=index)
        units = family.layer_units(source.config, index, source.layer_names(prefix))
        assert units.layout == (family.STACKED if case.endswith("stacked") else family.PER_EXPERT)
        replaced |= {prefix + t for t in units.tensors()}
        for name, unit in units.units.items():
            expected_names.add(prefix + name)
            weight = layer_pass.read_unit(pruned, prefix, unit)
            with H5Artifact(layout.order(variant, index)) as art:
                widths = [int(w) for w in art.read(f"{name}/block_widths")]
            _assert_exact_sparsity(
                weight, variant, widths, f"{case} {variant} layer {index} {name}"
            )
            entry = manifest["linears"][prefix + name]
            assert entry["sparsity"] == pytest.approx(float((weight == 0).float().mean()))
            if unit.expert is not None:
                assert entry["expert"] == unit.expert and entry["hessian_tokens"] == 8 * 32
                assert (
                    entry["routed_tokens"]
                    == manifest["experts"]["routed_tokens"][str(index)][str(unit.expert)]
                )
    assert set(manifest["linears"]) == expected_names
    assert (
        manifest["experts"]["num_experts"] == 4
        and manifest["experts"]["calibrate_all_experts"] is True
    )
    untouched = [n for n in source.names() if n not in replaced]
    assert any(".gate.weight" in n for n in untouched)
    for name in untouched:
        assert torch.equal(source.read(name), pruned.read(name)), name
    for name in replaced:
        assert not torch.equal(source.read(name), pruned.read(name)), name


@pytest.mark.e2e
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", list(E2E))
def test_family_end_to_end(family_runs, case, variant):
    case, model_dir, layout = family_runs(case)
    out_dir = layout.model_dir(variant)
    model, loading = AutoModelForCausalLM.from_pretrained(
        out_dir, dtype=torch.float32, output_loading_info=True
    )
    model.eval()
    dense = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if is_moe(case):
        assert not any(loading.values()), loading
        _assert_experts_pruned(case, model_dir, layout, variant)
    else:
        _assert_dense_family_pruned(model, dense, layout, variant)

    # the pruned model's hidden states are our layer chain's: the stored calibration inputs of
    # every layer, and our layers run on the reassembled checkpoint
    with H5Artifact(layout.tokens) as art:
        tokens = torch.from_numpy(art.read("tokens")).long()
    states = _full_model_states(model, tokens)
    for index in range(2):
        with H5Artifact(layout.inputs(variant, index)) as art:
            stored = torch.from_numpy(art.read("hidden"))
        _assert_states_equal(
            stored, states[index], f"{case} {variant}: stored inputs of layer {index}"
        )
    ours = _layer_chain(out_dir, tokens)
    for k in range(2):
        _assert_states_equal(ours[k], states[k], f"{case} {variant}: input of layer {k}")
    with torch.no_grad():
        _assert_states_equal(
            model.model.norm(ours[-1]), states[-1], f"{case} {variant}: final hidden state"
        )
    # and it is not the dense model
    assert not torch.allclose(_full_model_states(dense, tokens)[-1], states[-1])


@pytest.mark.e2e
def test_moe_kill_and_resume_is_bit_identical(family_runs, tmp_path, tiny_text_file):
    """SIGKILL Snakemake mid-run on the stacked Mixtral, resume: the same bytes as the uninterrupted run."""
    case, model_dir, clean = family_runs("mixtral-stacked")
    config = write_config(
        tmp_path / "c.yaml",
        model_dir,
        tiny_text_file,
        tmp_path / "results",
        methods=["rose"],
        sparsities=[0.5],
        keep_intermediates=True,
        calibration=CALIBRATION,
    )
    run_dir = tmp_path / "results" / "tiny"
    target = str(run_dir / "rose-0.5" / "model")
    killed = kill_when(snakemake_cmd(config, tmp_path, target), lambda: pruned_count(run_dir) >= 1)
    assert killed, "snakemake finished before it could be killed"
    assert pruned_count(run_dir) >= 1 and not (run_dir / "rose-0.5" / "model").exists()
    # the killed controller's lock, as docs/cluster.md says
    run_snakemake(config, tmp_path, "--unlock")
    run_snakemake(config, tmp_path, target)
    assert weights_digest(run_dir, "rose-0.5") == weights_digest(clean.run_dir, "rose-0.5")


@pytest.mark.e2e
def test_experts_with_fewer_tokens_than_inputs_are_reported(tmp_path, tiny_text_file):
    """calibrate_all_experts off: each expert's Hessians from its routed tokens only; those that saw
    fewer tokens than their width (a singular H) are pruned with the damping retry (percdamp 0
    here, so the retry is what makes H invertible) and listed in stats.json and pruning.json
    with their token counts. Router pruning on: the routers have exact sparsity too.
    Per-expert Mixtral names (block_sparse_moe.experts.<e>.w1) are written back as they were."""
    model_dir = make_tiny_model(tmp_path / "model", family="mixtral", num_layers=2)
    path = write_config(
        tmp_path / "c.yaml",
        model_dir,
        tiny_text_file,
        tmp_path / "results",
        methods=["rose"],
        calibration={"nsamples": 4, "seqlen": 32, "batch_size": 4},
        prune={"percdamp": 0},
    )
    cfg = rose_config.load(path)
    cfg.raw["moe"] = {"calibrate_all_experts": False, "prune_router": True}
    runner.run(cfg, evaluate=False, report=False)
    run_dir = tmp_path / "results" / "tiny"
    out_dir = run_dir / "rose-0.5" / "model"
    manifest = json.loads((out_dir / "pruning.json").read_text())
    summary = manifest["experts"]
    assert summary["calibrate_all_experts"] is False and summary["prune_router"] is True
    source, pruned = ck.Checkpoint.open(model_dir), ck.Checkpoint.open(out_dir)
    assert source.specs() == pruned.specs()
    undersampled = []
    for index in range(2):
        stats = json.loads((run_dir / "rose-0.5" / f"layer_{index}" / "stats.json").read_text())[
            "linears"
        ]
        routed = {e: stats[f"block_sparse_moe.experts.{e}.w1"]["routed_tokens"] for e in range(4)}
        assert sum(routed.values()) == 4 * 32 * 2
        assert summary["routed_tokens"][str(index)] == {str(e): n for e, n in routed.items()}
        for name, entry in stats.items():
            if entry.get("expert") is None:
                continue
            assert entry["hessian_tokens"] == entry["routed_tokens"] == routed[entry["expert"]]
            assert entry["undersampled"] == (entry["hessian_tokens"] < entry["shape"][1])
            if entry["undersampled"]:
                undersampled.append(f"model.layers.{index}.{name}")
                assert entry["damping_retries"] >= 1 and entry["damping"] > 0, (name, entry)
            assert entry["sparsity"] == pytest.approx(0.5, abs=0.01)
        router = pruned.read(f"model.layers.{index}.block_sparse_moe.gate.weight")
        assert int((router == 0).sum()) == prune_count(
            router.numel(), 0.5
        )  # one mask block: [4, 200]
        assert stats["block_sparse_moe.gate"]["shape"] == [4, 200]
    # 128 tokens, top-2 of 4: no expert sees 200 (its gate/up width), let alone 328 (down)
    assert len(undersampled) == 2 * 4 * 3
    assert (
        summary["undersampled"]
        == sorted(undersampled)
        == sorted(n for n, e in manifest["linears"].items() if e.get("undersampled"))
    )
    model, loading = AutoModelForCausalLM.from_pretrained(out_dir, output_loading_info=True)
    assert not any(loading.values())


def test_moe_settings_default_and_schema(tmp_path, tiny_text_file):
    """Defaults without a `moe:` section; a config sets them, and then they are provenance."""
    path = write_config(tmp_path / "c.yaml", tmp_path, tiny_text_file, tmp_path / "results")
    assert rose_config.load(path).moe == rose_config.MoeSettings(True, False)
    # defaults leave every existing run's provenance (and hashes) as they were
    assert "moe" not in variant_settings(rose_config.load(path), rose_config.load(path).variants[0])
    path = write_config(
        tmp_path / "d.yaml",
        tmp_path,
        tiny_text_file,
        tmp_path / "results",
        moe={"calibrate_all_experts": False, "prune_router": True},
    )
    cfg = rose_config.load(path)
    assert cfg.moe == rose_config.MoeSettings(False, True)
    # the settings decide the Hessians and the pruned units: part of every layer artifact's provenance
    assert variant_settings(cfg, cfg.variants[0]).get("moe") == cfg.raw["moe"]


def test_readme_names_the_moe_families():
    """The manual's families page (docs/families.md, moved out of README.md) names them."""
    text = (REPO / "docs" / "families.md").read_text()
    for name in ("`mixtral`", "`qwen2_moe`", "`qwen3_moe`", "calibrate_all_experts"):
        assert name in text


def test_model_json_sizes_moe_layers_for_the_cluster_estimates(
    tiny_models, tiny_llama_dir, tiny_text_file, tmp_path
):
    """A dense layer's formula (rose.resources) would size an MoE layer's Hessians as one MLP of
    experts x intermediate width; model.json carries the exact sizes of MoE models instead."""
    from rose import resources
    from rose.stages.model import moe_sizes

    sizes = {}
    for name, model in (("mixtral", tiny_models("mixtral")), ("llama", tiny_llama_dir)):
        path = write_config(tmp_path / f"{name}.yaml", model, tiny_text_file, tmp_path / name)
        cfg = rose_config.load(path)
        plan.execute(cfg, "prepare_model")
        shutil.copy(RunLayout(cfg.run_dir).model_json, tmp_path / f"{name}.json")
        sizes[name] = resources.load_model_size(tmp_path / f"{name}.json")
    assert not set(resources.DETAIL_KEYS) & set(sizes["llama"])  # dense: unchanged
    mixtral = sizes["mixtral"]
    # attention (q/k/v, o) and per expert gate/up [200] and down [328] Hessians
    assert mixtral["hessian_elements"] == 2 * 200**2 + 4 * (200**2 + 328**2)
    assert mixtral["layer_parameters"] == sum(
        torch.Size(s).numel()
        for s in family.expected_shapes(
            ck.Checkpoint.open(tiny_models("mixtral")).config, 0
        ).values()
    )
    # Mixtral-8x7B: the estimate the SLURM jobs get, exact vs the dense formula
    config = AutoConfig.for_model("mixtral")
    shape = {
        "num_layers": 32,
        "hidden_size": 4096,
        "parameters": 46_702_792_704,
        "dtype": "bfloat16",
    }
    cfg = {"calibration": {"nsamples": 128, "seqlen": 2048}, "device": "cuda"}
    exact, _ = resources.stage_estimate("hessians", cfg, {**shape, **moe_sizes(config, 1)})
    dense, _ = resources.stage_estimate("hessians", cfg, shape)
    hessians = 8 * (2 * 4096**2 + 8 * (4096**2 + 14336**2))  # float64, as the estimator errs high
    assert hessians < exact < hessians + 2 * 4 * 1.46e9 + 128 * 2048 * 4096 * 4 + 1
    assert dense > 3 * exact


def test_readme_moe_slurm_requests_are_the_estimate():
    """docs/families.md's MoE request figures (128 x 2048 tokens, a GPU) are what rose.resources
    gives with the sizes prepare_model records: update docs/families.md with the estimator."""
    from rose import resources
    from rose.stages.model import moe_sizes

    qwen3 = AutoConfig.for_model(
        "qwen3_moe", hidden_size=2048, moe_intermediate_size=768, num_experts=128,
        num_experts_per_tok=8, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
        num_hidden_layers=48,
    )  # fmt: skip
    models = {
        "Mixtral-8x7B": (AutoConfig.for_model("mixtral"), 32, 4096, 46_702_792_704),
        "Qwen3-30B-A3B": (qwen3, 48, 2048, 30_532_122_624),
    }
    cfg = {"calibration": {"nsamples": 128, "seqlen": 2048}}
    got = {}
    for name, (config, layers, hidden, parameters) in models.items():
        shape = dict(num_layers=layers, hidden_size=hidden, parameters=parameters, dtype="bfloat16")
        for stage in ("hessians", "prune"):
            est = resources.estimate_resources(stage, cfg, {**shape, **moe_sizes(config, 1)})
            got[name, stage] = (round(est["mem_mb"] / 1024), est["runtime"])
        got[name, "dense formula"] = round(
            resources.estimate_resources("hessians", cfg, shape)["mem_mb"] / 1024
        )
    assert got == {
        ("Mixtral-8x7B", "hessians"): (43, 20),
        ("Mixtral-8x7B", "prune"): (62, 11),
        ("Mixtral-8x7B", "dense formula"): 156,
        ("Qwen3-30B-A3B", "hessians"): (21, 10),
        ("Qwen3-30B-A3B", "prune"): (28, 10),
        ("Qwen3-30B-A3B", "dense formula"): 116,
    }
