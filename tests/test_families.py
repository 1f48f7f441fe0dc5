"""Model families (rose/family.py): every row runs its layers exactly as transformers runs the model.

Tiny random models are built from each family's transformers config (tests/tiny.py):
widths not multiples of 128, GQA (5 query heads, 1 kv head), tied and untied
embeddings, and what makes each family itself: Llama 3's rope scaling and 128k
context, Gemma 2/3's sliding windows (16 tokens, shorter than the 40-token
sequences here and the 32-token calibration windows), Gemma 2's attention-logit
soft-capping, Gemma 3's local/global RoPE, Phi-3's fused projections and longrope.

1. Oracle: the layer-by-layer forward (embed, then build_layer + layer_forward per
   layer) equals the full transformers model's hidden states, and each feature
   is one the oracle sees (turning it off changes the model's output).
2. The table guards: unsupported model types, unknown attention kinds and layer
   structures the row does not describe are refused, not pruned silently wrong.
3. End to end: one Snakemake run per new family (rose at 0.5 and 2:4); the
   reassembled model loads with transformers, every pruned Linear has exactly its
   sparsity, and the pruned model's hidden states are our layer chain's.
"""

from __future__ import annotations

import json

import pytest
import torch
from model_oracle import full_model_states as _full_model_states
from model_oracle import layer_chain as _layer_chain
from model_oracle import relative_change_when
from pipeline_utils import run_snakemake_api, write_config
from tiny import make_tiny_model
from transformers import AutoConfig, AutoModelForCausalLM

from rose import checkpoint as ck
from rose import family
from rose.artifacts import H5Artifact
from rose.layout import RunLayout
from rose.sparsity import prune_count

SEQLEN = 40  # longer than the tiny sliding windows (16, 8)

# case -> (tests/tiny.py family, config overrides)
CASES = {
    "llama": ("llama", {}),
    "mistral": ("mistral", {}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
    "llama3": ("llama3", dict(tie_word_embeddings=False)),
    "gemma2": ("gemma2", {}),
    "gemma3": ("gemma3", dict(tie_word_embeddings=False)),
    "phi3": ("phi3", dict(tie_word_embeddings=False)),
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
    ),
    "mistral-window": ("mistral", dict(sliding_window=8)),
    # transformers' Llama ignores a sliding_window key: every layer is causal
    "llama-window": ("llama", dict(sliding_window=8)),
    # layers >= max_window_layers slide: one full layer, then sliding ones
    "qwen2-window": ("qwen2", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1)),
}

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
}


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    cache = {}

    def get(case: str):
        if case not in cache:
            name, overrides = CASES[case]
            cache[case] = make_tiny_model(root / case, family=name, **overrides)
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


# ---------------------------------------------------------------- 1. oracle


@pytest.mark.parametrize("case", list(CASES))
def test_layer_by_layer_forward_equals_the_full_model(tiny_models, case):
    path = tiny_models(case)
    tokens = _tokens()
    ours = _layer_chain(path, tokens)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    fam = family.family_for(model.config)
    # the attention implementation we run the layers with is the one transformers picked
    assert model.config._attn_implementation == fam.attn_implementation
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
    assert change > 1e-3, f"{feature}: turning it off changes the output by only {change:.2e}"


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


# ---------------------------------------------------------------- 3. end to end per family

E2E = ["llama3", "gemma2", "gemma3", "phi3"]
VARIANTS = ("rose-0.5", "rose-2of4")


@pytest.fixture(scope="module", params=E2E)
def family_run(request, tmp_path_factory, tiny_text_file):
    """One Snakemake run (Python API) of a 2-layer model of the family: rose at 0.5 and 2:4."""
    name = request.param
    tmp = tmp_path_factory.mktemp(f"e2e-{name}")
    overrides = {"tie_word_embeddings": False} if name in ("gemma3", "phi3") else {}
    model_dir = make_tiny_model(tmp / "model", family=name, num_layers=2, **overrides)
    cfg = write_config(
        tmp / "config.yaml",
        model_dir,
        tiny_text_file,
        tmp / "results",
        methods=["rose"],
        sparsities=[0.5, "2:4"],
        keep_intermediates=True,
        calibration={"nsamples": 4, "seqlen": 32, "batch_size": 4},  # 32 > Gemma's 16-token window
    )
    run_dir = tmp / "results" / "tiny"
    run_snakemake_api(cfg, tmp, [str(run_dir / v / "model") for v in VARIANTS])
    return name, model_dir, RunLayout(run_dir)


def _pruned_linears(model) -> dict[str, torch.Tensor]:
    return {
        name: module.weight.detach()
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and ".layers." in name
    }


@pytest.mark.parametrize("variant", VARIANTS)
def test_family_end_to_end(family_run, variant):
    name, model_dir, layout = family_run
    model = AutoModelForCausalLM.from_pretrained(
        layout.model_dir(variant), dtype=torch.float32
    ).eval()
    dense = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    fam = family.family_for(model.config)
    linears = _pruned_linears(model)
    assert len(linears) == 2 * len(fam.linear_names())

    # every pruned Linear has exactly its sparsity
    manifest = json.loads((layout.model_dir(variant) / "pruning.json").read_text())
    assert set(manifest["linears"]) == set(linears)
    for full_name, weight in linears.items():
        zero = weight == 0
        if variant.endswith("2of4"):
            per_group = zero.reshape(weight.shape[0], -1, 4).sum(-1)
            assert bool((per_group == 2).all()), (
                f"{full_name}: a group of 4 without exactly 2 zeros"
            )
        else:
            # the sweep prunes floor(0.5 * rows * width) weights in each mask block (order.h5)
            layer = int(full_name.split(".layers.")[1].split(".")[0])
            linear = full_name.split(f".layers.{layer}.")[1]
            with H5Artifact(layout.order(variant, layer)) as art:
                widths = [int(w) for w in art.read(f"{linear}/block_widths")]
            assert sum(widths) == weight.shape[1]
            expected = sum(prune_count(weight.shape[0] * w, 0.5) for w in widths)
            assert int(zero.sum()) == expected, (full_name, int(zero.sum()), expected)
        assert manifest["linears"][full_name]["sparsity"] == pytest.approx(
            float(zero.float().mean())
        )

    # everything else is the dense model's, and tied heads stay tied
    dense_state = dense.state_dict()
    for tensor_name, tensor in model.state_dict().items():
        if tensor_name.removesuffix(".weight") not in linears:
            assert torch.equal(tensor, dense_state[tensor_name]), tensor_name
    tied = model.config.tie_word_embeddings
    assert (model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()) == tied

    # the pruned model's hidden states are our layer chain's: the stored calibration inputs
    # of every layer, and our layers run on the reassembled checkpoint
    with H5Artifact(layout.tokens) as art:
        tokens = torch.from_numpy(art.read("tokens")).long()
    states = _full_model_states(model, tokens)
    for layer in range(2):
        with H5Artifact(layout.inputs(variant, layer)) as art:
            stored = torch.from_numpy(art.read("hidden"))
        _assert_states_equal(
            stored, states[layer], f"{name} {variant}: stored inputs of layer {layer}"
        )
    ours = _layer_chain(layout.model_dir(variant), tokens)
    for k in range(2):
        _assert_states_equal(ours[k], states[k], f"{name} {variant}: input of layer {k}")
    with torch.no_grad():
        _assert_states_equal(
            model.model.norm(ours[-1]), states[-1], f"{name} {variant}: final hidden state"
        )
    # and it is not the dense model
    assert not torch.allclose(_full_model_states(dense, tokens)[-1], states[-1])
