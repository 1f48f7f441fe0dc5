"""Results table (CSV / Markdown) and plots (PNG) for one run directory.

Everything is read back from the artifacts the stages wrote (eval JSONs,
pruning.json, order.h5), so the report can be rebuilt at any time and a
missing evaluation simply leaves empty cells. Figures are built on
`matplotlib.figure.Figure` objects (no pyplot state) by functions that return
them, so tests can count their series.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, ScalarFormatter

from rose.allocation import allocation_label
from rose.artifacts import atomic_path, atomic_write_text, read_json
from rose.layout import DENSE

log = logging.getLogger("rose")

PLOTS_DIR = "plots"


@dataclass
class TaskScore:
    metric: str
    value: float | None


@dataclass
class SummaryRow:
    """One line of the results table: the dense model or one variant."""

    variant: str
    method: str
    sparsity: str
    perplexity: dict[str, float | str | None] = field(
        default_factory=dict
    )  # "inf"/"nan" if diverged
    zero_shot: dict[str, TaskScore] = field(default_factory=dict)
    zero_shot_mean: float | None = None
    zero_shot_limit: int | None = None
    lm_eval_version: str | None = None
    achieved_sparsity: float | None = None
    reordered_linears: int | None = None
    total_linears: int | None = None
    prune_seconds: float | None = None
    exports: dict[str, dict[str, Any]] = field(default_factory=dict)  # format -> export.json sizes
    allocation: str | None = None  # 'uniform', 'owl m=5 lambda=0.08', 'layers' (None: dense)


# ---------------------------------------------------------------- reading


def _read_optional(path: Path) -> dict[str, Any] | None:
    return read_json(path) if path.is_file() else None


def load_manifest(run_dir: Path, variant: str) -> dict[str, Any] | None:
    """`<variant>/model/pruning.json`, or None when the variant has not been assembled."""
    return _read_optional(run_dir / variant / "model" / "pruning.json")


def load_row(run_dir: Path, variant: str, manifest: dict[str, Any] | None = None) -> SummaryRow:
    eval_dir = run_dir / variant / "eval"
    if variant == DENSE:
        method, sparsity = DENSE, "0"
    elif manifest:
        method, sparsity = manifest["method"], str(manifest["sparsity"])
    else:
        method, _, label = variant.partition("-")
        sparsity = label.replace("of", ":")
    row = SummaryRow(variant=variant, method=method, sparsity=sparsity)
    for path in sorted(eval_dir.glob("perplexity-*.json")):
        record = read_json(path)
        name = record.get("name") or path.stem.removeprefix("perplexity-")
        value = record.get("value")
        row.perplexity[name] = value if value is not None else record.get("raw", "nan")
    zero_shot = _read_optional(eval_dir / "zero_shot.json")
    if zero_shot:
        for task, score in zero_shot["tasks"].items():
            row.zero_shot[task] = TaskScore(score["metric"], score["value"])
        row.zero_shot_mean = zero_shot.get("mean")
        row.zero_shot_limit = zero_shot.get("limit")
        row.lm_eval_version = zero_shot.get("lm_eval_version")
    for record_path in sorted((run_dir / variant / "export").glob("*/export.json")):
        record = read_json(record_path)
        row.exports[record.get("format", record_path.parent.name)] = record.get("sizes", {})
    if manifest:
        row.allocation = allocation_label(manifest.get("allocation"))
        row.achieved_sparsity = manifest.get("achieved_sparsity")
        row.reordered_linears = manifest.get("reordered_linears")
        row.total_linears = manifest.get("total_linears")
        row.prune_seconds = manifest.get("prune_seconds")
    return row


# ---------------------------------------------------------------- tables


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def summary_table(rows: list[SummaryRow]) -> tuple[list[str], list[list[Any]]]:
    """Column names and raw cell values (None = missing); columns only for what some row has."""
    ppl_names = sorted({name for r in rows for name in r.perplexity})
    tasks = _unique([f"{task}_{s.metric}" for r in rows for task, s in r.zero_shot.items()])
    has_mean = any(r.zero_shot for r in rows)
    # the allocation column once some variant is not uniform (as columns appear for evaluations)
    has_allocation = any(r.allocation not in (None, "uniform") for r in rows)
    header = ["variant", "method", "sparsity"] + (["allocation"] if has_allocation else [])
    header += [f"ppl_{n}" for n in ppl_names] + tasks + (["zero_shot_mean"] if has_mean else [])
    header += ["achieved_sparsity", "reordered_linears", "total_linears", "prune_seconds"]
    formats = sorted({f for r in rows for f in r.exports})
    for fmt in formats:  # weights on disk, and (but for dense itself) their ratio to dense's
        header += [f"export_{fmt}_mib"] + ([f"export_{fmt}_ratio"] if fmt != "dense" else [])
    cells = []
    for r in rows:
        scores = {f"{task}_{s.metric}": s.value for task, s in r.zero_shot.items()}
        line: list[Any] = [r.variant, r.method, r.sparsity]
        line += [r.allocation] if has_allocation else []
        line += [r.perplexity.get(n) for n in ppl_names] + [scores.get(t) for t in tasks]
        line += [r.zero_shot_mean] if has_mean else []
        line += [r.achieved_sparsity, r.reordered_linears, r.total_linears, r.prune_seconds]
        for fmt in formats:
            sizes = r.exports.get(fmt, {})
            size = sizes.get("weights_bytes")
            line += [None if size is None else size / 2**20]
            line += [sizes.get("ratio")] if fmt != "dense" else []
        cells.append(line)
    return header, cells


def summary_csv(rows: list[SummaryRow]) -> str:
    header, cells = summary_table(rows)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    for line in cells:
        writer.writerow(["" if v is None else v for v in line])
    return out.getvalue()


def _fmt(column: str, value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return f"diverged ({value})" if column.startswith("ppl_") else value
    if isinstance(value, int):
        return str(value)
    if column.startswith("ppl_"):
        return f"{value:.2f}" if value < 1e5 else f"{value:.3g}"
    if column == "prune_seconds" or column.endswith("_mib"):
        return f"{value:.1f}"
    if column.endswith("_ratio"):
        return f"{value:.3f}"
    return f"{value:.4f}"


_MD_NAMES = {
    "zero_shot_mean": "zero-shot mean",
    "achieved_sparsity": "achieved sparsity",
    "prune_seconds": "prune s",
    "reordered": "reordered / Linears",
}


def summary_markdown(rows: list[SummaryRow]) -> str:
    """The results table as Markdown, with the protocol notes the numbers depend on."""
    header, cells = summary_table(rows)
    # Reordered and total Linears read best as one "k / N" cell.
    i = header.index("reordered_linears")
    md_header = header[:i] + ["reordered"] + header[i + 2 :]
    lines = []
    for line in cells:
        pair = (
            ""
            if line[i + 1] is None
            else f"{line[i] if line[i] is not None else 0} / {line[i + 1]}"
        )
        values = [_fmt(c, v) for c, v in zip(header, line, strict=True)]
        lines.append(values[:i] + [pair] + values[i + 2 :])
    display = {f"{t}_{s.metric}": f"{t} ({s.metric})" for r in rows for t, s in r.zero_shot.items()}
    display |= {c: f"ppl {c.removeprefix('ppl_')}" for c in md_header if c.startswith("ppl_")}
    for c in md_header:
        if c.startswith("export_"):
            fmt, unit = c.removeprefix("export_").rsplit("_", 1)
            display[c] = f"{fmt} export MiB" if unit == "mib" else f"{fmt} / dense"
    names = [display.get(c) or _MD_NAMES.get(c, c) for c in md_header]
    text = "| " + " | ".join(names) + " |\n"
    text += "|" + "|".join("---" for _ in names) + "|\n"
    text += "".join("| " + " | ".join(v) + " |\n" for v in lines)
    notes = []
    if any(r.perplexity for r in rows):
        notes.append(
            "Perplexity: exp(mean token NLL) over non-overlapping windows (see each eval JSON's protocol)."
        )
    versions = _unique([r.lm_eval_version for r in rows if r.lm_eval_version])
    if versions:
        limits = _unique([str(r.zero_shot_limit) for r in rows if r.zero_shot])
        notes.append(
            f"Zero-shot: lm-eval {', '.join(versions)}, 0-shot, metric named in each column "
            f"(acc_norm where the task has it, else acc), documents per task limit: {', '.join(limits)}."
        )
    if notes:
        text += "\n" + "\n".join(notes) + "\n"
    return text


# ---------------------------------------------------------------- plots


def _linears(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    return list(manifest.get("linears", {}).values())


def relative_range_figure(manifests: dict[str, dict[str, Any]]) -> Figure | None:
    """Relative range of every Linear by layer, one panel per variant that computed it.

    One line per Linear name, the threshold as a dashed line, and the reordered
    Linears ringed (one scatter collection per panel, present only if any was).
    """
    panels = {
        v: m
        for v, m in manifests.items()
        if any(e.get("relative_range") is not None for e in _linears(m))
    }
    if not panels:
        return None
    fig = Figure(figsize=(9, 3.2 * len(panels)), layout="constrained")
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    for ax, (variant, manifest) in zip(axes, panels.items(), strict=True):
        entries = [e for e in _linears(manifest) if e.get("relative_range") is not None]
        for name in _unique([e["name"] for e in entries]):
            points = sorted((e["layer"], e["relative_range"]) for e in entries if e["name"] == name)
            ax.plot(*zip(*points, strict=True), marker="o", markersize=3, linewidth=1, label=name)
        reordered = [(e["layer"], e["relative_range"]) for e in entries if e.get("reordered")]
        if reordered:
            ax.scatter(
                *zip(*reordered, strict=True),
                s=70,
                facecolors="none",
                edgecolors="red",
                linewidths=1.5,
                label=f"reordered ({len(reordered)})",
                zorder=3,
            )
        threshold = manifest.get("threshold")
        if threshold is not None:
            ax.axhline(
                threshold,
                color="black",
                linestyle="--",
                linewidth=1,
                label=f"threshold {threshold:g}",
            )
        ax.set_title(f"{variant}: relative range of block losses per Linear")
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("relative range")
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize="small", ncols=2, loc="lower right")
    return fig


def reconstruction_error_figure(manifests: dict[str, dict[str, Any]]) -> Figure | None:
    """Per-layer reconstruction error, one line per variant that records it.

    Each Linear's error is relative (tr(D H D^T) / tr(W H W^T)), so a layer's
    value is the mean over its Linears, not the sum.
    """
    series = {}
    for variant, manifest in manifests.items():
        per_layer: dict[int, list[float]] = {}
        for e in _linears(manifest):
            if e.get("reconstruction_error") is not None:
                per_layer.setdefault(e["layer"], []).append(float(e["reconstruction_error"]))
        if per_layer:
            series[variant] = sorted((layer, sum(v) / len(v)) for layer, v in per_layer.items())
    if not series:
        return None
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.subplots()
    for variant, points in series.items():
        ax.plot(*zip(*points, strict=True), marker="o", markersize=3, label=variant)
    values = [v for points in series.values() for _, v in points]
    if all(v > 0 for v in values):
        ax.set_yscale("log")
    ax.set_title("layer reconstruction error (mean relative error of its Linears)")
    ax.set_xlabel("layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("relative reconstruction error")
    ax.legend(fontsize="small")
    return fig


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def perplexity_sparsity_figure(rows: list[SummaryRow]) -> Figure | None:
    """Perplexity against unstructured sparsity, one line per method, dense as a dotted line.

    Drawn only when some method ran at two or more unstructured sparsities;
    N:M variants have no place on a fraction axis and stay in the table.
    """
    names = sorted({n for r in rows for n in r.perplexity})
    curves: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for name in names:
        for r in rows:
            if r.method == DENSE or ":" in r.sparsity or not _finite(r.perplexity.get(name)):
                continue
            curve = r.method if r.allocation in (None, "uniform") else f"{r.method}, {r.allocation}"
            curves.setdefault(name, {}).setdefault(curve, []).append(
                (float(r.sparsity), r.perplexity[name])
            )
    if not any(
        len(points) >= 2 for per_method in curves.values() for points in per_method.values()
    ):
        return None
    names = [n for n in names if n in curves]
    fig = Figure(figsize=(6 * len(names), 4.5), layout="constrained")
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    dense = next((r for r in rows if r.method == DENSE), None)
    for ax, name in zip(axes, names, strict=True):
        for method, points in curves[name].items():
            ax.plot(*zip(*sorted(points), strict=True), marker="o", label=method)
        if dense is not None and _finite(dense.perplexity.get(name)):
            ax.axhline(dense.perplexity[name], color="gray", linestyle=":", label="dense")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(ScalarFormatter())
        ax.set_title(f"perplexity ({name}) vs sparsity")
        ax.set_xlabel("sparsity")
        ax.set_ylabel("perplexity")
        ax.legend(fontsize="small")
    return fig


def layer_sparsity_figure(manifests: dict[str, dict[str, Any]]) -> Figure | None:
    """Sparsity per decoder layer: one line per variant, achieved solid, target dashed.

    Unstructured variants only (an N:M layer's sparsity is fixed by its pattern).
    Drawn when some variant's allocation is not uniform, where it shows what OWL or a
    given list did; uniform runs have a flat line per target and no plot.
    """
    panels = {
        v: m
        for v, m in manifests.items()
        if m.get("layers") and all(isinstance(e.get("target"), float | int) for e in m["layers"])
    }
    if not any(
        (m.get("allocation") or {}).get("kind", "uniform") != "uniform" for m in panels.values()
    ):
        return None
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.subplots()
    targets: set[str] = set()  # a target is shared by every method: one legend entry each
    for variant, manifest in panels.items():
        layers = [e["layer"] for e in manifest["layers"]]
        (line,) = ax.plot(
            layers, [e["achieved"] for e in manifest["layers"]], marker="o", ms=3, label=variant
        )
        target = variant.split("-", 1)[-1]
        ax.plot(
            layers,
            [e["target"] for e in manifest["layers"]],
            linestyle="--",
            color=line.get_color(),
            label="_nolegend_" if target in targets else f"target {target}",
        )
        targets.add(target)
    ax.set_title("sparsity per decoder layer (solid: achieved, dashed: target)")
    ax.set_xlabel("decoder layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("sparsity of the layer's pruned Linears")
    ax.legend(fontsize="x-small", ncol=2)
    return fig


def _max_range_linear(manifest: dict[str, Any]) -> dict[str, Any] | None:
    entries = [e for e in _linears(manifest) if e.get("relative_range") is not None]
    return max(entries, key=lambda e: (e["relative_range"], -e["layer"])) if entries else None


def read_loss_map(order_h5: Path, linear: str) -> np.ndarray:
    """[row groups, blocks] would-be-pruned score; a one-row map of block_loss for older files."""
    with h5py.File(order_h5, "r") as fh:
        if f"{linear}/loss_map" in fh:
            return np.asarray(fh[f"{linear}/loss_map"][()], dtype=np.float64)
        return np.asarray(fh[f"{linear}/block_loss"][()], dtype=np.float64)[None, :]


def block_loss_figure(run_dir: Path, manifests: dict[str, dict[str, Any]]) -> Figure | None:
    """Heatmap of the would-be-pruned loss of the most 'columnar' Linear, one panel per rose variant."""
    panels = []
    for variant, manifest in manifests.items():
        if str(manifest.get("method")).partition("+")[0] != "rose":
            continue
        entry = _max_range_linear(manifest)
        if entry is None:
            continue
        path = run_dir / variant / f"layer_{entry['layer']}" / "order.h5"
        if not path.is_file():
            log.warning("report: %s is missing; no block-loss heatmap for %s", path, variant)
            continue
        panels.append((variant, entry, read_loss_map(path, entry["name"])))
    if not panels:
        return None
    fig = Figure(figsize=(9, 3.5 * len(panels)), layout="constrained")
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    for ax, (variant, entry, grid) in zip(axes, panels, strict=True):
        image = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis")
        fig.colorbar(image, ax=ax, label="would-be-pruned score")
        state = "reordered" if entry.get("reordered") else "not reordered"
        ax.set_title(
            f"{variant}: layer {entry['layer']} {entry['name']}, "
            f"relative range {entry['relative_range']:.3f} ({state})"
        )
        ax.set_xlabel("column block")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("row group" if grid.shape[0] > 1 else "")
        if grid.shape[0] == 1:
            ax.set_yticks([])
    return fig


# ---------------------------------------------------------------- entry point


def build_report(run_dir: Path, variants: list[str], out_dir: Path) -> dict[str, Any]:
    """Write summary.csv, summary.md and plots/*.png under `out_dir`; return files and rows.

    The plots directory is replaced as a whole, so a plot that no longer
    applies (e.g. after a sweep shrank to one sparsity) does not linger.
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    manifests = {v: m for v in variants if (m := load_manifest(run_dir, v)) is not None}
    rows = [load_row(run_dir, DENSE)] + [load_row(run_dir, v, manifests.get(v)) for v in variants]
    files = [out_dir / "summary.csv", out_dir / "summary.md"]
    atomic_write_text(files[0], summary_csv(rows))
    atomic_write_text(files[1], f"# Results: {run_dir.name}\n\n" + summary_markdown(rows))
    figures = {
        "relative_range": relative_range_figure(manifests),
        "reconstruction_error": reconstruction_error_figure(manifests),
        "perplexity_vs_sparsity": perplexity_sparsity_figure(rows),
        "layer_sparsity": layer_sparsity_figure(manifests),
        "block_loss_heatmap": block_loss_figure(run_dir, manifests),
    }
    plots = []
    with atomic_path(out_dir / PLOTS_DIR) as tmp:
        tmp.mkdir(parents=True)
        for name, fig in figures.items():
            if fig is not None:
                fig.savefig(tmp / f"{name}.png", format="png", dpi=110)
                plots.append(out_dir / PLOTS_DIR / f"{name}.png")
    log.info("report: %d rows, plots: %s", len(rows), ", ".join(p.stem for p in plots) or "none")
    return {
        "files": [str(p) for p in files + plots],
        "plots": [p.stem for p in plots],
        "rows": [asdict(r) for r in rows],
    }
