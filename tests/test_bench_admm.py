"""bench_admm.py's arithmetic (pairing, targets, the timing check, merging chunks, reusing
llm-compressor's runs) on small hand-made records, and the README's ADMM table against the
recorded chunks it was printed from. No pipeline, no model."""

from __future__ import annotations

import copy
import json
import re
import statistics
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_admm as ba  # noqa: E402

RECORDED = sorted((REPO / "benchmarks/recorded").glob("bench_admm_*.json"))


def record(method: str, seed: int, ppl: float | None, sparsity: str = "0.7", **extra: Any) -> dict:
    return {
        "tool": ba.OURS,
        "method": method,
        "allocation": ba.UNIFORM,
        "sparsity": sparsity,
        "seed": seed,
        "variant": ba.variant_name(method, ba.UNIFORM, sparsity),
        "ppl": ppl,
        **extra,
    }


def test_paired_differences_are_per_seed_against_sparsegpt() -> None:
    runs = [
        record("sparsegpt", 0, 100.0),
        record("sparsegpt", 1, 120.0),
        record("admm", 0, 70.0),
        record("admm", 1, 90.0),
        record("admm", 2, 10.0),  # no sparsegpt at seed 2: not paired
    ]
    x, y, d = ba.paired(ba.by_seed(runs), (ba.OURS, "admm", ba.UNIFORM, "0.7"))
    assert (x, y, d) == ([70.0, 90.0], [100.0, 120.0], [-30.0, -30.0])
    assert "-30.00 ± 0.00 (2); 0.727x; lower in 2/2" in ba.paired_table(runs)


def test_target_one_needs_every_seed_lower_and_counts_a_diverged_seed_as_infinite() -> None:
    base = [record("sparsegpt", s, p) for s, p in ((0, 100.0), (1, 100.0), (2, 100.0))]
    good = base + [record("admm", s, 60.0) for s in (0, 1, 2)]
    assert ba.target_ratio(ba.by_seed(good), "0.7", 0.80, True, "(1)")[0].endswith("PASS")
    # the mean is far below 0.8x, but one seed is worse than sparsegpt's
    one_worse = base + [record("admm", 0, 10.0), record("admm", 1, 10.0), record("admm", 2, 101.0)]
    line = ba.target_ratio(ba.by_seed(one_worse), "0.7", 0.80, True, "(1)")[0]
    assert "lower in 2/3 seeds" in line and line.endswith("MISS")
    # at 60% and 2:4 the issue asks for the mean only
    assert ba.target_ratio(ba.by_seed(one_worse), "0.7", 0.90, False, "(2a)")[0].endswith("PASS")
    diverged = base + [record("admm", 0, 10.0), record("admm", 1, 10.0), record("admm", 2, None)]
    assert ba.target_ratio(ba.by_seed(diverged), "0.7", 0.80, True, "(1)")[0].endswith("MISS")


def test_the_summary_bolds_only_a_mean_over_every_seed_of_the_column() -> None:
    runs = [record("sparsegpt", s, 100.0 + s) for s in (0, 1)]
    runs += [record("admm", s, 60.0) for s in (0, 1)]
    runs += [{**record("admm", 0, 50.0), "allocation": ba.OWL}]  # lower, but seed 0 only
    table = ba.summary_table(runs)
    assert "| 70% (seeds 0/1: mean) |" in table
    assert "| admm | **60.00** (60.00 / 60.00) |" in table
    assert "| admm, OWL | 50.00 (seed 0) |" in table
    assert "| sparsegpt | 100.50 (100.00 / 101.00) |" in table


def test_target_three_compares_on_every_seed_llm_compressor_ran() -> None:
    peer = [{**record("x", s, 100.0), "tool": ba.PEER, "method": ba.PEER_METHOD} for s in (0, 1)]
    for r in peer:
        r["allocation"] = ba.OWL
    runs = peer + [record("admm", s, 70.0) for s in (0, 1)]
    runs += [{**record("admm", 0, 10.0), "allocation": ba.OWL}]  # seed 0 only: not comparable
    line = ba.target_peer(ba.by_seed(runs))[0]
    assert "(admm-0.7)" in line and "seeds 0/1: 70.00 vs 100.00 = 0.700x" in line
    assert line.endswith("PASS")


def test_the_best_admm_variant_is_chosen_by_its_seed_mean() -> None:
    runs = [record("admm", 0, 80.0), record("admm", 1, 80.0)]
    runs += [record("rose+admm", 0, 60.0), record("rose+admm", 1, 110.0)]
    runs += [record("sparsegpt", 0, 50.0)]  # not an ADMM variant
    assert ba.best_admm(ba.by_seed(runs), "0.7") == ("admm", 80.0)


def test_a_refit_that_raised_a_linears_error_fails_target_four() -> None:
    fine = record("rose+admm", 0, 90.0, refit_checked=210, violations=0, max_increase=0.0)
    raised = record("rose+admm", 1, 90.0, refit_checked=210, violations=2, max_increase=1e-3)
    assert ba.target_refit([fine])[0].endswith("PASS")
    lines = ba.target_refit([fine, raised])
    assert "2 of 420 Linears raised" in lines[0] and lines[0].endswith("MISS")
    assert "rose+admm-0.7 seed 1: 2 Linears" in lines[1]


def test_timing_check_leaves_out_a_seed_whose_sparsegpt_seconds_disagree() -> None:
    def seed(s: int, plain_prune: float) -> list[dict]:
        return [
            record("sparsegpt", s, 100.0, prune_s=plain_prune, run_s=100.0),
            record("sparsegpt+admm", s, 80.0, prune_s=40.0, solver_s=20.0, run_s=120.0),
            record(
                "admm", s, 60.0, prune_s=120.0, solver_s=100.0, run_s=500.0 if s == 1 else 150.0
            ),
        ]

    # seed 1: sparsegpt's prune stage took 25 s where the same sweep inside the refit took 20 s
    # (agrees); seed 2: 100 s (5x: the machine was busy), so its times are not trusted
    runs = seed(0, 20.0) + seed(1, 25.0) + seed(2, 100.0)
    b = ba.by_seed(runs)
    suspects = ba.timing_suspects(b)
    assert list(suspects) == [(ba.UNIFORM, "0.7")] and list(suspects[(ba.UNIFORM, "0.7")]) == [2]
    assert "prune seconds are 5.00x the SparseGPT sweep" in suspects[(ba.UNIFORM, "0.7")][2]
    lines = ba.target_time(b)
    assert any("left out: seed 2 at 0.7" in line for line in lines)
    # admm's run over the trusted seeds 0 and 1: (150 + 500) / 2 = 325 s against 100 s
    assert "  (5) admm-0.7 run 325.0 s vs sparsegpt 100.0 s = 3.25x: MISS" in lines
    assert lines[0].startswith("(5)") and "MISS (1 of 2)" in lines[0]


def test_a_seed_whose_run_resumed_a_killed_one_is_not_timed() -> None:
    """The runner times only the steps it ran: a variant finished before the kill shows a
    few seconds, which would make every ADMM variant look slow against it."""
    runs = [
        record("sparsegpt", 0, 100.0, prune_s=20.0, run_s=100.0, timed_layers=30),
        record("admm", 0, 60.0, prune_s=120.0, solver_s=100.0, run_s=150.0, timed_layers=30),
        record("sparsegpt", 1, 100.0, prune_s=20.0, run_s=5.0, timed_layers=2),
        record("admm", 1, 60.0, prune_s=120.0, solver_s=100.0, run_s=150.0, timed_layers=30),
    ]
    b = ba.by_seed(runs)
    suspects = ba.timing_suspects(b, layers=30)
    assert (
        "sparsegpt-0.7's run resumed a killed one and timed 2 of its 30"
        in suspects[(ba.UNIFORM, "0.7")][1]
    )
    assert "  (5) admm-0.7 run 150.0 s vs sparsegpt 100.0 s = 1.50x: PASS" in ba.target_time(b, 30)
    # two seeds, one timed: the seconds and ratios are seed 0's
    assert (
        "| 0.7 | admm | uniform | 2 | 1 | - | - | - | 120.0 | 100.0 | - | 150.0 | 6.00x | 1.50x |"
        in (ba.cost_table(runs, 30))
    )


def test_a_method_added_to_a_chunk_later_is_not_timed_against_sparsegpts_run() -> None:
    """Its run ran at another time, on another machine load: no ratio, no target (5) pair."""
    first, added = "admm-uniform-0.7-seed0", "admm-uniform-0.7-seed0-add-wanda_admm"
    runs = [
        record("sparsegpt", 0, 100.0, prune_s=40.0, run_s=200.0, run=first),
        record("admm", 0, 60.0, prune_s=120.0, solver_s=100.0, run_s=300.0, run=first),
        record("wanda+admm", 0, 90.0, prune_s=20.0, solver_s=18.0, run_s=100.0, run=added),
    ]
    lines = ba.target_time(ba.by_seed(runs), 30)
    assert "  (5) admm-0.7 run 300.0 s vs sparsegpt 200.0 s = 1.50x: PASS" in lines
    assert not any(line.startswith("  (5) wanda+admm-0.7 run") for line in lines)
    assert any("wanda+admm-0.7: seed(s) 0 timed in another rose run" in line for line in lines)
    table = ba.cost_table(runs, 30)
    assert (
        "| 0.7 | wanda+admm | uniform | 1 | 1 | - | - | - | 20.0 | 18.0 | - | 100.0 | - | - |"
        in (table)
    )
    assert "| 3.00x | 1.50x |" in table


def recorded(name: str) -> dict[str, Any]:
    return json.loads((REPO / "benchmarks/recorded" / name).read_text())


def test_merging_chunks_refuses_another_protocol_and_a_seed_twice() -> None:
    a, b = recorded("bench_admm_0.7_seed0.json"), recorded("bench_admm_0.7_seed1.json")
    runs, _ = ba.merge_chunks([a, b], ["a", "b"])
    assert {r["seed"] for r in runs} == {0, 1}
    other = copy.deepcopy(b)
    other["meta"]["percdamp"] = 0.1
    with pytest.raises(SystemExit, match="b has percdamp = 0.1, a has 0.01"):
        ba.merge_chunks([a, other], ["a", "b"])
    with pytest.raises(SystemExit, match="is in both a and b"):
        ba.merge_chunks([a, copy.deepcopy(a)], ["a", "b"])


def test_a_chunk_resumes_only_under_the_same_protocol() -> None:
    old = recorded("bench_admm_0.7_seed1.json")
    assert ba.resumable(old, copy.deepcopy(old)) == []
    new = copy.deepcopy(old)
    new["meta"]["admm"] = {**(new["meta"]["admm"] or {}), "iterations": 3}
    new["meta"]["calibration"]["tokens_sha"]["1"] = "0" * 64
    assert ba.resumable(old, new) == ["admm", "calibration"]


def test_a_finished_chunk_gains_only_the_methods_it_lacks(tmp_path: Path) -> None:
    old = recorded("bench_admm_0.7_seed2.json")  # the seven uniform methods
    old["runs"] = [r for r in old["runs"] if (r["tool"], r["allocation"]) != (ba.OURS, "owl")]
    uniform = old["meta"]["methods"]
    assert old["meta"]["complete"] and len(uniform) == 7
    path = tmp_path / "chunk.json"
    path.write_text(json.dumps(old))
    assert ba.is_complete(path, uniform) and ba.is_complete(path, ["sparsegpt", "admm"])
    assert not ba.is_complete(path, uniform, ["sparsegpt", "admm"])
    assert ba.missing_runs(old, "0.7", uniform, ["sparsegpt", "admm"]) == [
        ("owl", ["sparsegpt", "admm"])
    ]
    assert ba.run_name(old, "owl", "0.7", 2, ["sparsegpt", "admm"]) == (
        "admm-owl-0.7-seed2",
        "ours-owl",
    )
    # the first OWL run is recorded with sparsegpt only: a later call adds admm in its own run
    old["runs"].append({**old["runs"][0], "allocation": "owl", "method": "sparsegpt"})
    path.write_text(json.dumps(old))
    assert ba.missing_runs(old, "0.7", uniform, ["sparsegpt", "admm"]) == [("owl", ["admm"])]
    assert ba.run_name(old, "owl", "0.7", 2, ["admm"]) == (
        "admm-owl-0.7-seed2-add-admm",
        "ours-owl (admm)",
    )
    new = copy.deepcopy(old)
    new["meta"]["methods"] = ["sparsegpt", "admm"]
    assert ba.resumable(old, new) == []  # other methods: continued, not started again


def test_methods_are_added_to_a_chunk_in_a_run_named_after_them(tmp_path: Path) -> None:
    nm = recorded("bench_admm_2of4_seed0.json")
    lacking = ["rose", "wanda+admm"]  # as if the chunk had been run without them
    nm["runs"] = [r for r in nm["runs"] if r["method"] not in lacking]
    nm["meta"]["methods"] = [m for m in nm["meta"]["methods"] if m not in lacking]
    asked = ["sparsegpt", *lacking]
    assert ba.missing_runs(nm, "2:4", asked, ["sparsegpt"]) == [("uniform", lacking)]  # no OWL
    run, step = ba.run_name(nm, "uniform", "2:4", 0, lacking)
    assert run == "admm-uniform-2of4-seed0-add-" + "-".join(lacking).replace("+", "_")
    assert step == f"ours-uniform ({', '.join(lacking)})"
    path = tmp_path / "chunk.json"
    path.write_text(json.dumps(nm))
    assert ba.is_complete(path, nm["meta"]["methods"], ["sparsegpt"])  # no OWL at N:M
    assert ba.is_complete(path, nm["meta"]["methods"], peer=True)  # llm-compressor ran at 2:4
    nm["meta"]["steps_done"].remove("peer-uniform")  # as if run with --no-peer
    path.write_text(json.dumps(nm))
    assert ba.is_complete(path, nm["meta"]["methods"])
    assert not ba.is_complete(path, nm["meta"]["methods"], peer=True)  # llm-compressor to run
    assert not ba.is_complete(path, asked)
    assert ba.union(nm["meta"]["methods"], asked) == nm["meta"]["methods"] + lacking


def test_llm_compressor_runs_are_reused_only_on_the_same_tokens_and_windows() -> None:
    ours = recorded("bench_admm_0.7_seed1.json")["meta"]
    theirs = copy.deepcopy(ours)
    assert ba.peer_reuse_problems(theirs, ours, 1) == []
    theirs["calibration"]["tokens_sha"]["1"] = "f" * 64
    theirs["evaluation"]["windows"] = 8
    problems = ba.peer_reuse_problems(theirs, ours, 1)
    assert [p.split(" ")[0] for p in problems] == [
        "calibration.tokens_sha[1]",
        "evaluation.windows",
    ]


# ---------------------------------------------------------------- the README's table

COLUMN = re.compile(r"^(\d+%|\d+:\d+) \(seeds? ([\d/]+)")


def readme_admm_table() -> tuple[list[tuple[str, list[int]]], dict[str, list[str]]]:
    text = (REPO / "README.md").read_text()
    section = text.split("## Lower perplexity: the ADMM solver", 1)[1].split("\n## ", 1)[0]
    lines = [ln for ln in section.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    columns = []
    for cell in header[1:]:
        m = COLUMN.match(cell)
        assert m, f"README ADMM table: cannot read the column {cell!r}"
        label = m.group(1)
        sparsity = label if ":" in label else str(int(label[:-1]) / 100)
        columns.append((sparsity, [int(s) for s in m.group(2).split("/")]))
    rows = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return columns, rows


def test_the_readme_admm_table_is_the_recorded_chunks() -> None:
    runs, _ = ba.merge_chunks([json.loads(p.read_text()) for p in RECORDED], RECORDED)
    b = ba.by_seed(runs)
    columns, rows = readme_admm_table()
    keys = {ba.summary_label(key): key for key in ba.row_keys(runs)}
    assert set(rows) == set(keys), "the README's ADMM table has other rows than the recorded runs"
    for sparsity, seeds in columns:
        ours = sorted(b[(ba.OURS, ba.REFERENCE, ba.UNIFORM, sparsity)])
        assert seeds == ours, f"README says seeds {seeds} at {sparsity}, recorded: {ours}"
    for name, key in keys.items():
        for (sparsity, _), cell in zip(columns, rows[name], strict=True):
            found = b.get((*key, sparsity), {})
            values = [float(v) for v in re.findall(r"\d+\.\d+", cell)]
            if not found:
                assert not values, f"README {name} at {sparsity}: {cell!r}, nothing recorded"
                continue
            per_seed = [found[s]["ppl"] for s in sorted(found)]
            expected = [statistics.fmean(per_seed)] + (per_seed if len(per_seed) > 1 else [])
            assert values == pytest.approx(expected, abs=0.006), f"README {name} at {sparsity}"


def test_plain_variants_equal_bench_owls_runs_of_the_same_seed_bit_for_bit() -> None:
    """Both benchmarks run the pipeline on the same tokens and windows; a variant's result does
    not depend on which variants share its run (a chunk's added methods run on their own)."""
    theirs = {}
    for path in sorted((REPO / "benchmarks/recorded").glob("bench_owl_*.json")):
        for r in json.loads(path.read_text())["runs"]:
            if r["tool"] == ba.OURS:
                theirs[(r["variant"], r["seed"])] = r["ppl"]
    compared = 0
    for path in RECORDED:
        for r in json.loads(path.read_text())["runs"]:
            key = (r.get("variant"), r["seed"])
            if r["tool"] == ba.OURS and key in theirs:
                assert r["ppl"] == theirs[key], f"{path.name}: {key}"
                compared += 1
    assert compared >= 19
