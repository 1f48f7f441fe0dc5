"""The report on a hand-built run directory: table contents, files, and plot series."""

from __future__ import annotations

import csv
import io
import json

import h5py
import matplotlib.image
import numpy as np
import pytest

from rose import report

LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj"]
LAYERS = 3


def linear_entries(method: str, seed: int, threshold: float = 0.5) -> dict:
    rng = np.random.default_rng(seed)
    has_range = method in ("rose", "sparsegpt")
    out = {}
    for layer in range(LAYERS):
        for name in LINEARS:
            r = float(rng.uniform(0.1, 0.9)) if has_range else None
            out[f"model.layers.{layer}.{name}"] = {
                "layer": layer,
                "name": name,
                "shape": [64, 96],
                "sparsity": 0.5,
                "relative_range": r,
                "columnar": (r > threshold) if has_range else None,
                "reordered": bool(method == "rose" and r > threshold),
                "reconstruction_error": float(rng.uniform(1, 10))
                if method != "magnitude"
                else None,
                "seconds": 0.5,
                "damping": 0.01,
                "damping_retries": 0,
            }
    return out


def write_json(path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def make_variant(run, name: str, method: str, sparsity: str, seed: int, ppl: dict, zs: dict | None):
    linears = linear_entries(method, seed)
    manifest = {
        "variant": name,
        "method": method,
        "sparsity": sparsity,
        "threshold": 0.5,
        "achieved_sparsity": 0.5 + seed / 1000,
        "reordered_linears": sum(e["reordered"] for e in linears.values()),
        "total_linears": len(linears),
        "prune_seconds": 10.0 + seed,
        "linears": linears,
    }
    if name != "dense":
        write_json(run / name / "model" / "pruning.json", manifest)
    for metric, value in ppl.items():
        record = {
            "metric": "perplexity",
            "name": metric,
            "value": value,
            "finite": value is not None,
            "raw": "inf" if value is None else repr(value),
        }
        write_json(run / name / "eval" / f"perplexity-{metric}.json", record)
    if zs is not None:
        tasks = {
            t: {"metric": m, "value": v, "stderr": 0.01, "docs": 100} for t, (m, v) in zs.items()
        }
        write_json(
            run / name / "eval" / "zero_shot.json",
            {
                "metric": "zero_shot",
                "tasks": tasks,
                "mean": sum(v for _, v in zs.values()) / len(zs),
                "limit": 100,
                "lm_eval_version": "0.4.13",
            },
        )
    if method in ("rose", "sparsegpt"):
        for layer in range(LAYERS):
            layer_dir = run / name / f"layer_{layer}"
            layer_dir.mkdir(parents=True)
            with h5py.File(layer_dir / "order.h5", "w") as fh:
                for linear in LINEARS:
                    fh[f"{linear}/block_loss"] = np.arange(4, dtype=np.float32) + layer
                    if (
                        seed != 2
                    ):  # one variant lacks loss_map: the heatmap falls back to block_loss
                        fh[f"{linear}/loss_map"] = np.ones((8, 4), dtype=np.float32) * layer
                    fh[linear].attrs["relative_range"] = 0.5
    return manifest


ZS = {"piqa": ("acc_norm", 0.6), "boolq": ("acc", 0.55), "arc_easy": ("acc_norm", 0.41)}


@pytest.fixture()
def run_dir(tmp_path):
    run = tmp_path / "demo"
    make_variant(run, "dense", "dense", "0", 0, {"wiki": 14.8, "c4": 20.0}, ZS)
    make_variant(run, "rose-0.5", "rose", "0.5", 1, {"wiki": 20.25, "c4": 30.5}, ZS)
    make_variant(run, "rose-0.6", "rose", "0.6", 2, {"wiki": 35.0}, None)  # no c4, no zero-shot
    make_variant(run, "sparsegpt-0.5", "sparsegpt", "0.5", 3, {"wiki": 22.0, "c4": 33.0}, None)
    make_variant(run, "sparsegpt-0.6", "sparsegpt", "0.6", 4, {"wiki": None}, None)  # diverged
    make_variant(run, "magnitude-2of4", "magnitude", "2:4", 5, {}, None)  # evaluation off
    return run


VARIANTS = ["rose-0.5", "rose-0.6", "sparsegpt-0.5", "sparsegpt-0.6", "magnitude-2of4"]


def test_summary_files_hold_every_variant_and_the_numbers(run_dir):
    out = report.build_report(run_dir, VARIANTS, run_dir / "report")
    table = list(csv.DictReader(io.StringIO((run_dir / "report" / "summary.csv").read_text())))
    assert [r["variant"] for r in table] == ["dense", *VARIANTS]
    by = {r["variant"]: r for r in table}
    assert by["dense"]["method"] == "dense" and by["dense"]["ppl_wiki"] == "14.8"
    assert float(by["rose-0.5"]["ppl_c4"]) == 30.5
    assert by["rose-0.6"]["ppl_c4"] == ""  # not evaluated: empty cell
    assert by["sparsegpt-0.6"]["ppl_wiki"] == "inf"  # diverged stays visible
    assert by["magnitude-2of4"]["sparsity"] == "2:4" and by["magnitude-2of4"]["ppl_wiki"] == ""
    assert (
        float(by["rose-0.5"]["piqa_acc_norm"]) == 0.6 and float(by["rose-0.5"]["boolq_acc"]) == 0.55
    )
    assert float(by["dense"]["zero_shot_mean"]) == pytest.approx((0.6 + 0.55 + 0.41) / 3)
    assert by["rose-0.6"]["zero_shot_mean"] == ""
    manifest = json.loads((run_dir / "rose-0.5" / "model" / "pruning.json").read_text())
    assert int(by["rose-0.5"]["reordered_linears"]) == manifest["reordered_linears"] > 0
    assert int(by["rose-0.5"]["total_linears"]) == LAYERS * len(LINEARS)
    assert float(by["sparsegpt-0.5"]["prune_seconds"]) == 13.0
    assert float(by["sparsegpt-0.5"]["achieved_sparsity"]) == pytest.approx(0.503)
    assert by["dense"]["achieved_sparsity"] == ""

    md = (run_dir / "report" / "summary.md").read_text()
    for name in ["dense", *VARIANTS]:
        assert f"| {name} |" in md
    assert "piqa (acc_norm)" in md and "boolq (acc)" in md and "ppl wiki" in md
    assert "20.25" in md and "diverged (inf)" in md
    assert f"{manifest['reordered_linears']} / 9" in md
    assert "lm-eval 0.4.13" in md
    assert md.endswith(report.summary_markdown([report.SummaryRow(**_row(r)) for r in out["rows"]]))
    assert len(out["rows"]) == 6


def _row(data: dict) -> dict:
    data = dict(data)
    data["zero_shot"] = {t: report.TaskScore(**s) for t, s in data["zero_shot"].items()}
    return data


def test_plots_are_valid_pngs(run_dir):
    out = report.build_report(run_dir, VARIANTS, run_dir / "report")
    assert out["plots"] == [
        "relative_range",
        "reconstruction_error",
        "perplexity_vs_sparsity",
        "block_loss_heatmap",
    ]
    for name in out["plots"]:
        path = run_dir / "report" / "plots" / f"{name}.png"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        image = matplotlib.image.imread(path)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert all(str(run_dir / "report") in f for f in out["files"])
    assert not list((run_dir / "report").glob("*.tmp-*"))


def test_stale_plots_disappear_when_they_no_longer_apply(run_dir):
    report.build_report(run_dir, VARIANTS, run_dir / "report")
    out = report.build_report(run_dir, ["magnitude-2of4"], run_dir / "report")
    assert out["plots"] == []  # magnitude records no relative range or error, one sparsity
    assert sorted(p.stem for p in (run_dir / "report" / "plots").iterdir()) == sorted(out["plots"])


def test_relative_range_figure_series(run_dir):
    manifests = {v: report.load_manifest(run_dir, v) for v in VARIANTS}
    fig = report.relative_range_figure(manifests)
    axes = fig.get_axes()
    assert len(axes) == 4  # rose-0.5, rose-0.6, sparsegpt-0.5, sparsegpt-0.6 (magnitude has none)
    for ax, variant in zip(axes, VARIANTS[:4], strict=True):
        assert variant in ax.get_title()
        assert len(ax.get_lines()) == len(LINEARS) + 1  # one per Linear name, plus the threshold
        threshold = ax.get_lines()[-1]
        assert list(threshold.get_ydata()) == [0.5, 0.5]
        reordered = manifests[variant]["reordered_linears"]
        assert len(ax.collections) == (1 if reordered else 0)
        if reordered:
            assert len(ax.collections[0].get_offsets()) == reordered
    q = axes[0].get_lines()[0]
    want = [
        e["relative_range"]
        for e in manifests["rose-0.5"]["linears"].values()
        if e["name"] == LINEARS[0]
    ]
    assert list(q.get_ydata()) == pytest.approx(want)


def test_reconstruction_error_figure_averages_per_layer(run_dir):
    manifests = {v: report.load_manifest(run_dir, v) for v in VARIANTS}
    (ax,) = report.reconstruction_error_figure(manifests).get_axes()
    lines = ax.get_lines()
    assert [line.get_label() for line in lines] == VARIANTS[:4]  # magnitude recorded no error
    entries = manifests["rose-0.5"]["linears"].values()
    want = [
        np.mean([e["reconstruction_error"] for e in entries if e["layer"] == i])
        for i in range(LAYERS)
    ]
    assert list(lines[0].get_ydata()) == pytest.approx(want)
    assert list(lines[0].get_xdata()) == list(range(LAYERS))


def test_perplexity_vs_sparsity_series(run_dir):
    rows = [report.load_row(run_dir, "dense")] + [
        report.load_row(run_dir, v, report.load_manifest(run_dir, v)) for v in VARIANTS
    ]
    fig = report.perplexity_sparsity_figure(rows)
    axes = fig.get_axes()
    assert [ax.get_title() for ax in axes] == [
        "perplexity (c4) vs sparsity",
        "perplexity (wiki) vs sparsity",
    ]
    wiki = {line.get_label(): line for line in axes[1].get_lines()}
    assert set(wiki) == {"rose", "sparsegpt", "dense"}
    assert list(wiki["rose"].get_xdata()) == [0.5, 0.6]
    assert list(wiki["rose"].get_ydata()) == [20.25, 35.0]
    assert list(wiki["sparsegpt"].get_ydata()) == [22.0]  # the diverged point is left out
    assert list(wiki["dense"].get_ydata()) == [14.8, 14.8]
    # one sparsity per method: no curve to draw
    single = [
        r for r in rows if r.variant in ("dense", "rose-0.5", "sparsegpt-0.5", "magnitude-2of4")
    ]
    assert report.perplexity_sparsity_figure(single) is None


def test_block_loss_heatmap_uses_the_max_range_linear(run_dir):
    manifests = {v: report.load_manifest(run_dir, v) for v in VARIANTS}
    fig = report.block_loss_figure(run_dir, manifests)
    heatmaps = [ax for ax in fig.get_axes() if ax.images]
    assert len(heatmaps) == 2  # rose-0.5, rose-0.6; sparsegpt is not ROSE
    for ax, variant in zip(heatmaps, ["rose-0.5", "rose-0.6"], strict=True):
        best = max(manifests[variant]["linears"].values(), key=lambda e: e["relative_range"])
        assert f"layer {best['layer']} {best['name']}" in ax.get_title()
        grid = ax.images[0].get_array()
        if variant == "rose-0.5":
            assert grid.shape == (8, 4) and float(grid.max()) == best["layer"]
        else:  # no loss_map in this file: one row of block losses
            assert grid.shape == (1, 4)
            assert list(np.asarray(grid[0])) == pytest.approx(list(np.arange(4) + best["layer"]))


def test_evaluation_off_gives_table_without_eval_columns(tmp_path):
    run = tmp_path / "r"
    make_variant(run, "magnitude-0.5", "magnitude", "0.5", 1, {}, None)
    out = report.build_report(run, ["magnitude-0.5"], run / "report")
    header = (run / "report" / "summary.csv").read_text().splitlines()[0].split(",")
    assert header == [
        "variant",
        "method",
        "sparsity",
        "achieved_sparsity",
        "reordered_linears",
        "total_linears",
        "prune_seconds",
    ]
    assert out["plots"] == []  # magnitude has no relative range, no error, one sparsity
    assert (run / "report" / "plots").is_dir()


def test_corrupt_eval_json_is_named(run_dir):
    (run_dir / "rose-0.5" / "eval" / "zero_shot.json").write_text("{not json")
    with pytest.raises(Exception, match="zero_shot.json: unreadable JSON"):
        report.build_report(run_dir, VARIANTS, run_dir / "report")
