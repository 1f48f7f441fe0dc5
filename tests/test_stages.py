"""Stage functions on a tiny Llama, checked against the transformers model itself."""

from __future__ import annotations

import dataclasses

import h5py
import numpy as np
import pytest
import torch
from pipeline_utils import write_config
from transformers import AutoModelForCausalLM

from rose import config as rose_config
from rose.layout import RunLayout
from rose.model_info import ModelInfo

pytestmark = pytest.mark.e2e  # every test reads a run's stage outputs


@pytest.fixture(scope="module")
def wanda_zero(tmp_path_factory, tiny_llama_dir, tiny_text_file):
    """Wanda at sparsity 0 prunes nothing, so every stage must reproduce the dense model."""
    tmp = tmp_path_factory.mktemp("stages")
    cfg = rose_config.load(
        write_config(
            tmp / "c.yaml",
            tiny_llama_dir,
            tiny_text_file,
            tmp / "results",
            methods=["wanda", "rose"],
            sparsities=[0.0],
            keep_intermediates=True,
        )
    )
    from rose import runner

    runner.run(cfg, evaluate=False, report=False)
    return cfg, RunLayout(cfg.run_dir)


def _hidden_states(model_dir, tokens):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        return model(tokens.long(), output_hidden_states=True).hidden_states, model


def test_calibration_tokens_and_embeddings(wanda_zero, tiny_llama_dir):
    cfg, layout = wanda_zero
    with h5py.File(layout.tokens) as fh:
        tokens = torch.from_numpy(fh["tokens"][()])
        assert tokens.shape == (6, 32) and fh.attrs["seed"] == 0 and fh.attrs["model_fingerprint"]
    with h5py.File(layout.inputs("", 0)) as fh:
        embedded = torch.from_numpy(fh["hidden"][()])
    states, _ = _hidden_states(tiny_llama_dir, tokens)
    torch.testing.assert_close(embedded, states[0])


@pytest.mark.parametrize("layer", [1, 2])
def test_forward_of_an_unpruned_layer_is_the_models_hidden_state(wanda_zero, tiny_llama_dir, layer):
    cfg, layout = wanda_zero
    with h5py.File(layout.tokens) as fh:
        tokens = torch.from_numpy(fh["tokens"][()])
    with h5py.File(layout.inputs("wanda-0", layer)) as fh:
        inputs = torch.from_numpy(fh["hidden"][()])
    states, _ = _hidden_states(tiny_llama_dir, tokens)
    torch.testing.assert_close(inputs, states[layer], rtol=1e-5, atol=1e-5)


def test_hessians_are_two_over_n_sum_xtx_of_each_input_group(wanda_zero, tiny_llama_dir):
    cfg, layout = wanda_zero
    with h5py.File(layout.tokens) as fh:
        tokens = torch.from_numpy(fh["tokens"][()]).long()
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = [
        model.model.layers[1]
        .get_submodule(name)
        .register_forward_pre_hook(
            lambda _m, args, name=name: seen.setdefault(name, []).append(args[0].detach())
        )
        for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")
    ]
    with torch.no_grad():
        model(tokens)
    for hook in hooks:
        hook.remove()
    with h5py.File(layout.hessians("wanda-0", 1)) as fh:
        assert sorted(fh.keys()) == sorted(seen)
        for name, xs in seen.items():
            x = torch.cat(xs).double()
            expected = 2 / x.shape[0] * torch.einsum("nti,ntj->ij", x, x)
            np.testing.assert_allclose(fh[name][()], expected.float().numpy(), rtol=2e-4, atol=1e-5)
            assert fh[name].attrs["linears"].split(",")[0] == name


def test_sparsity_zero_changes_no_weight(wanda_zero, tiny_llama_dir):
    cfg, layout = wanda_zero
    dense = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).state_dict()
    for variant in ("wanda-0", "rose-0"):
        pruned = AutoModelForCausalLM.from_pretrained(layout.model_dir(variant)).state_dict()
        for name, tensor in dense.items():  # at p = 0 the OBS updates are all zero too
            assert torch.equal(pruned[name], tensor), (variant, name)


def test_order_records_diagnostics_per_linear(wanda_zero):
    cfg, layout = wanda_zero
    with h5py.File(layout.order("rose-0", 0)) as fh:
        for name in ("self_attn.q_proj", "mlp.down_proj"):
            group = fh[name]
            cols = 200 if name != "mlp.down_proj" else 328
            assert group["permutation"].shape == (cols,)
            assert sorted(group["permutation"][()].tolist()) == list(range(cols))
            assert group["column_loss"].shape == (cols,)
            assert group["block_loss"].shape == (-(-cols // 128),)
            assert {"relative_range", "columnar", "reordered", "threshold"} <= set(group.attrs)
            assert group["loss_map"].shape[1] == -(-cols // 128)
    info = ModelInfo.load(layout.model_json)
    assert info.num_layers == 3 and info.hidden_size == 200 and info.parameters > 0


def test_order_stage_names_the_linear_whose_scores_hold_nan(wanda_zero, tmp_path, monkeypatch):
    """The order stage reads weights it does not validate: a NaN score is refused with the
    layer and the Linear it came from, and no order.h5 is written."""
    from rose import ordering
    from rose.plan import Plan
    from rose.stages.layer import compute_order

    cfg, layout = wanda_zero
    monkeypatch.setattr(ordering, "scores", lambda w, h: torch.full(w.shape, float("nan")))
    out = tmp_path / "order.h5"
    ctx = Plan(cfg, ModelInfo.load(layout.model_json)).context("order", variant="rose-0", layer=1)
    with pytest.raises(
        ValueError, match=r"^layer 1 self_attn\.\w+: the pruning scores contain NaN"
    ):
        compute_order(dataclasses.replace(ctx, outputs={"order": out}))
    assert not out.exists()
