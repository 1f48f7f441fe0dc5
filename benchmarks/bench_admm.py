"""The ADMM layer-wise solver (issue 22): plain methods against their ADMM refits and `admm`, over seeds.

    .venv/bin/python benchmarks/bench_admm.py --sparsity 0.7 --seeds 0 1 2 3 4 [--owl]
    .venv/bin/python benchmarks/bench_admm.py --sparsity 0.6 0.8 2:4 --seeds 0 1 2 [--owl]
        [--methods sparsegpt rose wanda sparsegpt+admm rose+admm wanda+admm admm]
        [--owl-methods sparsegpt rose+admm] [--admm KEY=VALUE ...]
        [--layers all|N] [--nsamples N --seqlen N] [--max-windows N] [--owl-m 5 --owl-lambda 0.08]
        [--threads 1] [--device cpu|cuda] [--no-peer] [--reuse-peer bench_owl_*.json]
        [--peer-venv .venv-peer] [--no-install] [--workdir DIR] [--keep]
        [--out-dir benchmarks/results] [--force]
    .venv/bin/python benchmarks/bench_admm.py --from-json benchmarks/results/bench_admm_*.json

The work is cut into chunks, one per (sparsity, calibration seed), each with its
own JSON file `<out-dir>/bench_admm_<sparsity>_seed<seed>.json` (0.7 ->
`0.7`, 2:4 -> `2of4`). A chunk is:
1. the seed's calibration tokens (the pipeline's own `capture_calibration`);
2. ONE `python -m rose run` of every `--methods` variant at that sparsity,
   uniform (the plain and refit variants share the seed's calibration and the
   layer-0 Hessians), perplexity only (the config's `wiki-tail` windows);
3. with `--owl` (unstructured sparsities only): one more run of the
   `--owl-methods` (default sparsegpt and rose+admm: name the best ADMM variant
   of the uniform runs there) with `allocation: {kind: owl, m, lambda}`;
4. llm-compressor's SparseGPTModifier, uniform and (unstructured) OWL, on the
   same tokens, scored on the same windows (bench_owl.py's peer process), or
   taken from earlier bench_owl.py JSON files with `--reuse-peer` where their
   protocol is the same (model, pruned layers, dtype, device, calibration
   source/nsamples/seqlen and the seed's token hash, evaluation windows and
   their hash, batch size, OWL m/lambda, blocksize/percdamp; every difference
   is printed and recorded, and such a record is then not reused).
The chunk's JSON is rewritten atomically after each of steps 2-4, with the
steps done; a chunk whose file says `complete` and holds every method asked is
skipped on the next call (`--force` redoes it), an incomplete one continues
after its last finished step (the same `--workdir` also lets a killed `rose
run` resume its run directory), and a finished one that lacks methods now
asked for (`--methods`, or `--owl-methods` with `--owl`) gets one more `rose
run` of just those, on the same tokens (run `...-add-<methods>`; the variants'
numbers do not depend on which others share a run, and its shared steps are
timed again for them). So the benchmark can be run across sessions, a chunk at
a time, and `--from-json` prints every table from all the files given.

Per variant the JSON has the perplexity, the zero fraction check, each
Linear's reconstruction error (`reconstruction_error`; for refits also
`reconstruction_error_before`, the unrefitted mask's) and prune seconds
(`seconds`, solver included; the solver's own seconds when recorded), read from
the variant's `model/pruning.json`, and the seconds of each of the run's steps
attributed to the variant (the runner's own stage timings, captured in the
`rose run` process); steps of no variant (calibration, dense statistics,
allocation) are the run's shared seconds.

The report: seed means and sample standard deviations per variant and
sparsity; the paired difference against sparsegpt (same seed, sparsity and
allocation: mean, sd, in how many seeds lower); the mean per-Linear
reconstruction error (before and after for refits), refit violations (a Linear
whose error rose), prune seconds (sum over Linears) and the variant's run time
(its steps plus the run's shared steps, i.e. a run of that variant alone);
and the targets of issue 22, PASS/MISS with numbers:
(1) the best ADMM variant <= 0.80x sparsegpt's seed-mean perplexity at 70%, and
    lower in every seed;
(2) <= 0.90x at 60% and at 2:4;
(3) the best variant of ours at 70% (uniform or OWL) <= 0.75x llm-compressor's
    OWL SparseGPT (seed means over the seeds both have);
(4) a refit never raises a Linear's reconstruction error over its unrefitted
    mask (violations counted over every Linear, seed and sparsity);
(5) every ADMM variant's whole-run time (its steps and the run's shared steps, evaluation
    included) at most 2x sparsegpt's (seed means, same sparsity and allocation); the
    prune stage's ratio is printed beside it.
"The best ADMM variant" is the one with the lowest seed-mean perplexity among
the uniform `*admm*` variants at that sparsity.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
import statistics
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_owl as owl  # noqa: E402
from bench_owl import OURS, OWL, PEER, PEER_METHOD, UNIFORM  # noqa: E402

REPO = owl.REPO
BENCH = owl.BENCH
DEFAULT_OUT_DIR = BENCH / "results"
NAME = "bench_admm"
BASE = ("sparsegpt", "rose", "wanda")
REFERENCE = "sparsegpt"
DEFAULT_METHODS = (*BASE, *(f"{m}+admm" for m in BASE), "admm")
DEFAULT_OWL_METHODS = ("sparsegpt", "rose+admm")
STEPS = ("ours-uniform", "ours-owl", "peer-uniform", "peer-owl")


# ---------------------------------------------------------------- names


def is_admm(method: str) -> bool:
    return "admm" in method


def is_refit(method: str) -> bool:
    return method.endswith("+admm")


def parse_sparsity(text: str) -> str:
    """'0.70' -> '0.7', '2:4' -> '2:4' (as records and tables spell it)."""
    if ":" in text:
        n, m = (int(x) for x in text.split(":"))
        if not 0 < n < m:
            raise argparse.ArgumentTypeError(f"N:M sparsity needs 0 < N < M, got {text}")
        return f"{n}:{m}"
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"sparsity {text}: a fraction in (0, 1) or N:M")
    return f"{value:g}"


def is_nm(sparsity: str) -> bool:
    return ":" in sparsity


def config_sparsity(sparsity: str) -> float | str:
    """What the config's `sparsities:` takes."""
    return sparsity if is_nm(sparsity) else float(sparsity)


def target_label(sparsity: str) -> str:
    """As variant names and file names spell it: '0.7', '2of4'."""
    return sparsity.replace(":", "of")


def sparsity_key(sparsity: str) -> tuple[int, float]:
    if is_nm(sparsity):
        n, m = (int(x) for x in sparsity.split(":"))
        return (1, n / m)
    return (0, float(sparsity))


def variant_name(method: str, allocation: str, sparsity: str) -> str:
    mid = "" if allocation == UNIFORM else f"{OWL}-"
    return f"{method}-{mid}{target_label(sparsity)}"


def chunk_path(out_dir: Path, sparsity: str, seed: int) -> Path:
    return out_dir / f"{NAME}_{target_label(sparsity)}_seed{seed}.json"


def method_order(method: str) -> tuple[int, str]:
    order = {m: i for i, m in enumerate((*DEFAULT_METHODS, PEER_METHOD))}
    return (order.get(method, len(order)), method)


# ---------------------------------------------------------------- arguments


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(REPO / "config/config.yaml"))
    p.add_argument(
        "--sparsity", nargs="+", type=parse_sparsity, default=["0.7"], help="default 0.7; N:M too"
    )
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="default 0 1 2")
    p.add_argument(
        "--methods",
        nargs="+",
        default=list(DEFAULT_METHODS),
        help="uniform variants (default: sparsegpt rose wanda, their +admm refits, admm)",
    )
    p.add_argument("--owl", action="store_true", help="also OWL runs (unstructured sparsities)")
    p.add_argument(
        "--owl-methods",
        nargs="+",
        default=list(DEFAULT_OWL_METHODS),
        help="the OWL run's methods (default sparsegpt rose+admm: give the best ADMM variant)",
    )
    p.add_argument(
        "--admm",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="prune.admm settings (rose.admm.AdmmSettings; default: its defaults)",
    )
    owl.add_run_args(p)
    p.add_argument("--no-peer", action="store_true", help="skip llm-compressor (unless reused)")
    p.add_argument(
        "--reuse-peer",
        nargs="+",
        default=[],
        metavar="JSON",
        help="bench_owl.py result files whose llm-compressor records to reuse where comparable",
    )
    p.add_argument("--keep", action="store_true", help="keep every pruned model")
    p.add_argument(
        "--out-dir",
        default=str(DEFAULT_OUT_DIR),
        help="one JSON per sparsity and seed (default benchmarks/results, gitignored)",
    )
    p.add_argument("--force", action="store_true", help="redo chunks whose file is complete")
    p.add_argument(
        "--from-json",
        nargs="+",
        default=None,
        help="print the tables from these files; run nothing",
    )
    args = p.parse_args(argv)
    if len(set(args.sparsity)) != len(args.sparsity):
        p.error("--sparsity lists a value twice")
    for flag, listed in (("--methods", args.methods), ("--owl-methods", args.owl_methods)):
        if len(set(listed)) != len(listed):
            p.error(f"{flag} lists a method twice")
    if REFERENCE not in args.methods:
        p.error(f"--methods must include {REFERENCE} (the paired reference)")
    if args.owl and not any(not is_nm(s) for s in args.sparsity):
        p.error("--owl needs an unstructured sparsity")
    args.admm_overrides = {}
    for item in args.admm:
        key, sep, value = item.partition("=")
        if not sep:
            p.error(f"--admm {item}: KEY=VALUE")
        args.admm_overrides[key] = value if key == "start" else float(value)
        if key != "start" and float(value).is_integer() and "." not in value:
            args.admm_overrides[key] = int(value)
    return args


def admm_settings(overrides: dict[str, Any]) -> dict[str, Any] | None:
    """The effective prune.admm settings (None when rose.admm is not there)."""
    from dataclasses import asdict

    try:
        from rose.admm import AdmmSettings
    except ImportError:
        return None
    return asdict(AdmmSettings(**overrides))


# ---------------------------------------------------------------- reading a run


def linear_entries(layout: Any, variant: str, layers: int) -> dict[str, dict[str, Any]]:
    """Every pruned Linear's entry: `model/pruning.json`'s `linears`, else the layer stats."""
    from rose.artifacts import read_json

    manifest = layout.model_dir(variant) / "pruning.json"
    if manifest.exists():
        return dict(read_json(manifest)["linears"])
    out = {}
    for layer in range(layers):
        stats = read_json(layout.stats(variant, layer))
        out.update({f"{layer}.{name}": e for name, e in stats["linears"].items()})
    return out


def linear_summary(entries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Means of the per-Linear errors (None where not recorded), sums of seconds, violations."""

    def number(value: Any) -> float | None:
        return float(value) if isinstance(value, int | float) and math.isfinite(value) else None

    compact, after, before, violations, increase = {}, [], [], 0, 0.0
    seconds = solver_seconds = 0.0
    solver_seen = False
    for name, e in entries.items():
        err, prior = (
            number(e.get("reconstruction_error")),
            number(e.get("reconstruction_error_before")),
        )
        solver = e.get("solver") or {}
        compact[name] = [err, prior, number(e.get("seconds"))]
        seconds += number(e.get("seconds")) or 0.0
        if number(solver.get("seconds")) is not None:
            solver_seen = True
            solver_seconds += float(solver["seconds"])
        if err is not None:
            after.append(err)
        if prior is not None:
            before.append(prior)
            if err is not None and err > prior:
                violations += 1
                increase = max(increase, (err - prior) / prior if prior > 0 else math.inf)
    return {
        "linears_n": len(entries),
        "error_mean": statistics.fmean(after) if after else None,
        "error_before_mean": statistics.fmean(before) if before else None,
        "refit_checked": len(before),
        "violations": violations,
        "max_increase": increase,
        "prune_s": round(seconds, 3),
        "solver_s": round(solver_seconds, 3) if solver_seen else None,
        "linears": compact,
    }


def step_seconds(timings: list[dict[str, Any]], variants: Iterable[str]) -> dict[str, Any]:
    """The runner's step seconds: per variant {stage: s} and the steps of no variant (shared)."""
    names = set(variants)
    per: dict[str, dict[str, float]] = {v: {} for v in names}
    shared: dict[str, float] = {}
    for t in timings:
        where = per.get(t.get("variant") or "")
        target = where if where is not None else shared
        target[t["stage"]] = target.get(t["stage"], 0.0) + float(t["seconds"])
    rounded = {v: {k: round(s, 2) for k, s in d.items()} for v, d in per.items()}
    return {"variants": rounded, "shared": {k: round(s, 2) for k, s in shared.items()}}


# ---------------------------------------------------------------- the benchmark


@dataclass
class Bench:
    args: argparse.Namespace
    given: dict[str, Any]
    setup: owl.Setup
    scorer: owl.Scorer
    base_meta: dict[str, Any]
    tokens: dict[int, Any] = field(default_factory=dict)
    rescored: bool = False


def recorded_methods(chunk: dict[str, Any], allocation: str) -> list[str]:
    """Our methods the chunk already has a record of under this allocation."""
    return [
        r["method"] for r in chunk["runs"] if r["tool"] == OURS and r["allocation"] == allocation
    ]


def missing_runs(
    chunk: dict[str, Any], sparsity: str, methods: Sequence[str], owl_methods: Sequence[str]
) -> list[tuple[str, list[str]]]:
    """The `rose run`s a chunk still lacks: per allocation, the wanted methods it has no record
    of, in the order asked. So a finished chunk can gain methods without redoing the others."""
    wanted = {UNIFORM: list(methods), OWL: [] if is_nm(sparsity) else list(owl_methods)}
    out = []
    for allocation, asked in wanted.items():
        have = set(recorded_methods(chunk, allocation))
        missing = [m for m in asked if m not in have]
        if missing:
            out.append((allocation, missing))
    return out


def run_name(
    chunk: dict[str, Any], allocation: str, sparsity: str, seed: int, methods: list[str]
) -> tuple[str, str]:
    """The first run of an allocation has the plain name; a later one, adding methods, names
    them, so each has its own run directory (a killed one resumes in it)."""
    name = f"admm-{allocation}-{target_label(sparsity)}-seed{seed}"
    if not recorded_methods(chunk, allocation):
        return name, f"ours-{allocation}"
    added = "-".join(m.replace("+", "_") for m in methods)
    return f"{name}-add-{added}", f"ours-{allocation} ({', '.join(methods)})"


def ours_step(
    bench: Bench,
    chunk: dict[str, Any],
    seed: int,
    sparsity: str,
    allocation: str,
    methods: list[str],
    run: str,
    step: str,
) -> list[dict[str, Any]]:
    """One `rose run` (named `run`, chunk step `step`: run_name) of these methods of the chunk
    at this allocation; its records."""
    import torch
    from bench_peer import check_pruned

    from rose.artifacts import read_json
    from rose.layout import RunLayout

    a, setup = bench.args, bench.setup
    alloc: Any = UNIFORM
    if allocation == OWL:
        alloc = {"kind": OWL, "m": a.owl_m, "lambda": a.owl_lambda}
    prune = {"admm": a.admm_overrides} if a.admm_overrides else None
    cfg_dict = owl.pipeline_config(
        bench.given,
        a,
        seed,
        setup.dense_dir,
        setup.workdir,
        run=run,
        methods=methods,
        sparsities=[config_sparsity(sparsity)],
        allocation=[alloc],
        prune=prune,
    )
    cfg, wall = owl.run_ours(setup, cfg_dict, run, NAME)
    # a resumed `rose run`: its timings include the steps the killed one had finished
    result = json.loads(owl.ours_result(setup, run).read_text())
    timings = result["timings"]
    if result["timings_earlier"]:
        chunk["meta"].setdefault("timings_from_earlier_run", []).append(step)
    layout = RunLayout(cfg.run_dir)
    if not torch.equal(owl.read_tokens(cfg.run_dir), bench.tokens[seed]):
        sys.exit(f"{NAME}: {cfg.run_dir} calibrated on other tokens than the seed's capture")
    names = [variant_name(m, allocation, sparsity) for m in methods]
    if sorted(names) != sorted(v.name for v in cfg.variants):
        sys.exit(f"{NAME}: expected variants {names}, the config has {cfg.variants}")
    steps = step_seconds(timings, names)
    shared_s = round(sum(steps["shared"].values()), 2)
    chunk["meta"]["wall_s"][step] = round(wall, 1)
    chunk["meta"]["shared_s"][step] = steps["shared"]
    records = []
    for method, name in zip(methods, names, strict=True):
        path = layout.perplexity(name, bench.scorer.spec.name)
        if not path.exists():
            sys.exit(f"{NAME}: the run wrote no {path}")
        report = read_json(path)
        bench.scorer.check_run_report(report, path)
        model = layout.model_dir(name)
        mine = steps["variants"][name]
        record = {
            "tool": OURS,
            "method": method,
            "allocation": allocation,
            "sparsity": sparsity,
            "seed": seed,
            "variant": name,
            "run": run,  # variants of one run share its calibration and timing conditions
            "ppl": report["value"],
            "zeros": check_pruned(model, setup.dense_dir, setup.layers, sparsity),
            "layer_sparsity": owl.layer_zeros(model, setup.layers),
            "steps_s": mine,
            # a `rose run` that resumed a killed one times only what it ran itself
            "timed_layers": sum(
                1 for t in timings if t.get("variant") == name and t["stage"] == "prune"
            ),
            "variant_s": round(sum(mine.values()), 2),
            "run_s": round(sum(mine.values()) + shared_s, 2),
            **linear_summary(linear_entries(layout, name, setup.layers)),
        }
        records.append(record)
    if not bench.rescored:  # the run's evaluation and this process must see the same windows
        first = records[0]
        here = bench.scorer.ppl(layout.model_dir(first["variant"]))
        chunk["meta"]["rescore"] = {
            "variant": first["variant"],
            "seed": seed,
            "run": first["ppl"],
            "here": here,
        }
        if here is None or not math.isclose(here, first["ppl"], rel_tol=owl.RESCORE_RTOL):
            sys.exit(f"{NAME}: {first['variant']} scored {first['ppl']} in its run, {here} here")
        bench.rescored = True
    if not a.keep:
        shutil.rmtree(cfg.run_dir, ignore_errors=True)
    return records


# What a bench_owl.py file's meta must share with ours for its llm-compressor records to be reused.
PEER_PROTOCOL = (
    "layers",
    "truncate",
    "dtype",
    "device",
    "owl_m",
    "owl_lambda",
    "blocksize",
    "percdamp",
)


def peer_reuse_problems(theirs: dict[str, Any], ours: dict[str, Any], seed: int) -> list[str]:
    problems = []
    checks = {key: (theirs.get(key), ours.get(key)) for key in PEER_PROTOCOL}
    checks["model.source"] = (theirs["model"]["source"], ours["model"]["source"])
    for key in ("source", "nsamples", "seqlen"):
        checks[f"calibration.{key}"] = (theirs["calibration"][key], ours["calibration"][key])
    checks[f"calibration.tokens_sha[{seed}]"] = (
        theirs["calibration"]["tokens_sha"].get(str(seed)),
        ours["calibration"]["tokens_sha"].get(str(seed)),
    )
    for key in ("name", "source", "windows", "seqlen", "sha", "batch_size"):
        checks[f"evaluation.{key}"] = (theirs["evaluation"][key], ours["evaluation"][key])
    for key, (a, b) in checks.items():
        if a != b:
            problems.append(f"{key} {a!r} there, {b!r} here")
    a, b = theirs.get("dense_ppl"), ours.get("dense_ppl")
    if not same_ppl(a, b):
        problems.append(f"dense_ppl {a!r} there, {b!r} here")
    return problems


def same_ppl(a: float | None, b: float | None) -> bool:
    """Dense perplexities agree (to the in-process re-score's tolerance: a library update may
    move the last bits; the windows and weights are compared by hash)."""
    return a is not None and b is not None and math.isclose(a, b, rel_tol=owl.RESCORE_RTOL)


def peer_step(
    bench: Bench, chunk: dict[str, Any], seed: int, sparsity: str, allocation: str
) -> list[dict[str, Any]] | None:
    """llm-compressor at the chunk's sparsity: reused from --reuse-peer where comparable, else
    run (unless --no-peer); None when neither."""
    import torch
    from bench_peer import check_pruned

    a, meta = bench.args, chunk["meta"]
    for name in a.reuse_peer:
        data = json.loads(Path(name).read_text())
        found = [
            r
            for r in data["runs"]
            if r["tool"] == PEER
            and r["allocation"] == allocation
            and r["sparsity"] == sparsity
            and r["seed"] == seed
        ]
        if not found:
            continue
        problems = peer_reuse_problems(data["meta"], meta, seed)
        if problems:
            meta["peer_refused"][f"{allocation}: {name}"] = problems
            print(
                f"{NAME}: not reusing {name} ({allocation}): {'; '.join(problems)}", file=sys.stderr
            )
            continue
        meta["peer_reused"][allocation] = name
        meta["versions_peer"] = data["meta"].get("versions_peer")
        if data["meta"].get("threads") != a.threads:
            meta["peer_reused"][allocation] += f" (threads {data['meta'].get('threads')})"
        return [dict(found[0], reused_from=Path(name).name)]
    if bench.setup.peer_python is None:
        return None
    tokens_file = bench.setup.workdir / f"tokens-seed{seed}.pt"
    torch.save(bench.tokens[seed], tokens_file)
    model, info = owl.run_peer(bench.setup, allocation, sparsity, seed, tokens_file)
    meta["versions_peer"] = info["versions"]
    record = {
        "tool": PEER,
        "method": PEER_METHOD,
        "allocation": allocation,
        "sparsity": sparsity,
        "seed": seed,
        "ppl": bench.scorer.ppl(model),
        "zeros": check_pruned(model, bench.setup.dense_dir, bench.setup.layers, sparsity),
        "layer_sparsity": owl.layer_zeros(model, bench.setup.layers),
        "chosen_layer_sparsity": info.get("chosen_layer_sparsity"),
        "wall_s": round(info["wall_s"], 1),
    }
    meta["wall_s"][f"peer-{allocation}"] = record["wall_s"]
    if not a.keep:
        shutil.rmtree(model.parent, ignore_errors=True)
    return [record]


def fresh_chunk(bench: Bench, seed: int, sparsity: str) -> dict[str, Any]:
    meta = json.loads(json.dumps(bench.base_meta))
    meta.update(
        seed=seed,
        sparsity=sparsity,
        steps_done=[],
        complete=False,
        wall_s={},
        shared_s={},
        rescore=None,
        peer_reused={},
        peer_refused={},
    )
    meta["calibration"]["tokens_sha"] = {str(seed): owl.sha(bench.tokens[seed])}
    return {"benchmark": NAME, "meta": meta, "runs": []}


def resumable(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Why a chunk file cannot be continued (empty: it can). The methods are not compared:
    a continued chunk runs only the methods it has no record of (missing_runs)."""
    keys = [k for k in COMPARABLE if k != "dense_ppl"]
    keys += ["seed", "sparsity"]
    out = [k for k in keys if old["meta"].get(k) != new["meta"].get(k)]
    if not same_ppl(old["meta"].get("dense_ppl"), new["meta"].get("dense_ppl")):
        out.append("dense_ppl")
    if old["meta"]["calibration"] != new["meta"]["calibration"]:
        out.append("calibration")
    if old["meta"]["evaluation"] != new["meta"]["evaluation"]:
        out.append("evaluation")
    return out


def is_complete(
    path: Path, methods: Sequence[str], owl_methods: Sequence[str] = (), peer: bool = False
) -> bool:
    """The chunk is finished and has a record of every method asked (OWL: unstructured only)
    and, when llm-compressor may be run (`peer`), its runs."""
    try:
        data = json.loads(path.read_text())
        meta = data["meta"]
        sparsity = meta["sparsity"]
        peers = ["peer-uniform"] + ([] if is_nm(sparsity) else ["peer-owl"])
        lacks_peer = peer and any(step not in meta["steps_done"] for step in peers)
        return (
            bool(meta.get("complete"))
            and not missing_runs(data, sparsity, methods, owl_methods)
            and not lacks_peer
        )
    except (OSError, ValueError, KeyError):
        return False


def union(first: Sequence[str], then: Sequence[str]) -> list[str]:
    return [*first, *(m for m in then if m not in first)]


def run_chunk(bench: Bench, seed: int, sparsity: str, path: Path) -> None:
    a = bench.args
    owl_methods = a.owl_methods if a.owl else []
    if is_complete(path, a.methods, owl_methods, peer=not a.no_peer) and not a.force:
        print(f"{NAME}: {path} is complete; skipped (--force redoes it)", file=sys.stderr)
        return
    if seed not in bench.tokens:
        cfg_dict = owl.pipeline_config(
            bench.given,
            a,
            seed,
            bench.setup.dense_dir,
            bench.setup.workdir,
            run=f"calib-seed{seed}",
            methods=[REFERENCE],
            sparsities=[0.5],
            allocation=[UNIFORM],
        )
        bench.tokens[seed] = owl.capture_tokens(cfg_dict, bench.setup.workdir, seed)
    chunk = fresh_chunk(bench, seed, sparsity)
    if path.exists():
        old = json.loads(path.read_text())
        why = resumable(old, chunk)
        if not why and not a.force:  # unfinished, or finished without methods now asked for
            chunk = old
            meta, command = chunk["meta"], bench.base_meta["command"]
            if command not in meta["command"].split(" ; "):
                meta["command"] += f" ; {command}"  # every invocation that added to the chunk
            meta.update(
                complete=False,
                methods=union(meta["methods"], a.methods),
                owl_methods=union(meta["owl_methods"], owl_methods),
            )
            print(f"{NAME}: {path}: continuing after {old['meta']['steps_done']}", file=sys.stderr)
        elif why:
            print(f"{NAME}: {path}: starting again ({', '.join(why)} changed)", file=sys.stderr)
    unstructured = not is_nm(sparsity)
    if a.owl and not unstructured:
        print(f"{NAME}: no OWL at {sparsity} (N:M)", file=sys.stderr)
    for allocation, methods in missing_runs(chunk, sparsity, a.methods, owl_methods):
        run, step = run_name(chunk, allocation, sparsity, seed, methods)
        chunk["runs"] += ours_step(bench, chunk, seed, sparsity, allocation, methods, run, step)
        chunk["meta"]["steps_done"].append(step)
        chunk["meta"]["header"] = _header()
        owl.write_json(path, chunk)
    peers = [("peer-uniform", UNIFORM)] + ([("peer-owl", OWL)] if unstructured else [])
    for step, allocation in peers:
        if step in chunk["meta"]["steps_done"]:
            continue
        records = peer_step(bench, chunk, seed, sparsity, allocation)
        if records is None:  # --no-peer and nothing to reuse: a later call may run it
            continue
        chunk["runs"] += records
        chunk["meta"]["steps_done"].append(step)
        chunk["meta"]["header"] = _header()
        owl.write_json(path, chunk)
    chunk["meta"]["complete"] = True
    owl.write_json(path, chunk)
    print(f"{NAME}: {path} complete", file=sys.stderr)


def _header() -> list[str]:
    from common import header

    return header()


def run_benchmark(args: argparse.Namespace, command: str) -> list[Path]:
    import torch
    import yaml
    from bench_peer import ensure_peer_venv
    from common import workdir as make_workdir

    from rose import config as rose_config

    out_dir = Path(args.out_dir).resolve()
    paths = [chunk_path(out_dir, s, seed) for s in args.sparsity for seed in args.seeds]
    owl_methods = args.owl_methods if args.owl else []
    done = [is_complete(p, args.methods, owl_methods, peer=not args.no_peer) for p in paths]
    if not args.force and all(done):
        print(f"{NAME}: every chunk is complete already (--force redoes them)", file=sys.stderr)
        return paths
    peer_python = None
    if not args.no_peer:
        peer_python = ensure_peer_venv(Path(args.peer_venv).resolve(), install=not args.no_install)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit(f"{NAME}: --device cuda but torch sees no CUDA device")
    torch.set_num_threads(args.threads)
    given = yaml.safe_load(Path(args.config).read_text()) or {}
    given = rose_config.merge(given, {"device": args.device})
    rose_config.from_dict(given)  # a bad config stops here, before the model is prepared
    workdir = make_workdir(args.workdir, NAME)
    try:
        info, setup = owl.make_setup(args, given, workdir, peer_python)
        dense_dir = setup.dense_dir
        probe = rose_config.from_dict(
            owl.pipeline_config(
                given,
                args,
                args.seeds[0],
                dense_dir,
                workdir,
                run="probe",
                methods=[REFERENCE],
                sparsities=[0.5],
                allocation=[UNIFORM],
            )
        )
        spec = probe.evaluation.perplexity[0]
        scorer = owl.Scorer(spec, probe.evaluation.batch_size, dense_dir, args.device)
        print(f"{NAME}: scoring the dense model ...", file=sys.stderr)
        base_meta = {
            **owl.run_meta(command, info, setup, probe, scorer),
            "methods": list(args.methods),
            "owl_methods": list(args.owl_methods) if args.owl else [],
            "admm": admm_settings(args.admm_overrides),
        }
        bench = Bench(args, given, setup, scorer, base_meta)
        for sparsity in args.sparsity:
            for seed in args.seeds:
                run_chunk(bench, seed, sparsity, chunk_path(out_dir, sparsity, seed))
        return paths
    finally:
        if args.keep:
            print(f"{NAME}: kept {workdir}", file=sys.stderr)
        elif not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


# ---------------------------------------------------------------- the report (from the JSON alone)


# Settings every chunk file must share to be reported together (threads and versions: a note).
COMPARABLE = (
    "model",
    "layers",
    "truncate",
    "dtype",
    "device",
    "owl_m",
    "owl_lambda",
    "admm",
    "blocksize",
    "percdamp",
    "dense_ppl",
)


def merge_chunks(datas: list[dict[str, Any]], names: list[str]) -> tuple[list[dict], list[str]]:
    """Every file's records together: the same protocol (else exit naming the key), each
    (sparsity, seed) in one file only; notes on what differs but is allowed to."""
    first, notes = datas[0]["meta"], []
    seen: dict[tuple[str, int, str], str] = {}
    runs: list[dict[str, Any]] = []
    for data, name in zip(datas, names, strict=True):
        if data.get("benchmark") != NAME:
            sys.exit(f"{NAME}: {name} is not a {NAME} result ({data.get('benchmark')!r})")
        meta = data["meta"]
        checks = {key: (first.get(key), meta.get(key)) for key in COMPARABLE}
        for key in ("source", "nsamples", "seqlen"):
            checks[f"calibration.{key}"] = (first["calibration"][key], meta["calibration"][key])
        for key in ("name", "source", "windows", "seqlen", "sha", "batch_size"):
            checks[f"evaluation.{key}"] = (first["evaluation"][key], meta["evaluation"][key])
        for key, (a, b) in checks.items():
            if a != b and not (key == "dense_ppl" and same_ppl(a, b)):
                sys.exit(f"{NAME}: {name} has {key} = {b!r}, {names[0]} has {a!r}")
            if key == "dense_ppl" and a != b:
                notes.append(f"{name}: dense perplexity {b!r} (first file: {a!r})")
        for key in ("threads", "versions_main"):
            if meta.get(key) != first.get(key):
                notes.append(f"{name}: {key} {meta.get(key)} (first file: {first.get(key)})")
        notes += [f"{name}: {n}" for n in meta.get("notes", [])]
        if not meta.get("complete"):
            notes.append(f"{name}: incomplete, steps done: {', '.join(meta['steps_done'])}")
        for r in data["runs"]:
            key = (r["sparsity"], r["seed"], f"{r['tool']} {r['allocation']}")
            if seen.setdefault(key, name) != name:
                sys.exit(f"{NAME}: {key} is in both {seen[key]} and {name}")
        runs += data["runs"]
    return runs, notes


RowKey = tuple[str, str, str]  # tool, method, allocation


def row_keys(runs: list[dict[str, Any]]) -> list[RowKey]:
    keys = {(r["tool"], r["method"], r["allocation"]) for r in runs}
    return sorted(keys, key=lambda k: (owl.TOOL_ORDER[k[0]], k[2] != UNIFORM, method_order(k[1])))


def labels_of(runs: list[dict[str, Any]]) -> list[str]:
    return sorted({r["sparsity"] for r in runs}, key=sparsity_key)


def by_seed(runs: list[dict[str, Any]]) -> dict[tuple[str, str, str, str], dict[int, dict]]:
    out: dict[tuple[str, str, str, str], dict[int, dict]] = {}
    for r in runs:
        out.setdefault((r["tool"], r["method"], r["allocation"], r["sparsity"]), {})[r["seed"]] = r
    return out


def ppl_of(r: dict[str, Any]) -> float:
    """A diverged model (None) counts as infinite perplexity."""
    return math.inf if r["ppl"] is None else float(r["ppl"])


def mean_sd(values: Sequence[float], digits: int = 2, signed: bool = False) -> str:
    if not values:
        return ""
    if not all(math.isfinite(v) for v in values):
        return f"inf ({len(values)})"
    sign = "+" if signed else ""
    text = f"{statistics.fmean(values):{sign}.{digits}f}"
    if len(values) > 1:
        text += f" ± {statistics.stdev(values):.{digits}f}"
    return text + f" ({len(values)})"


def ppl_table(runs: list[dict[str, Any]]) -> str:
    from common import table

    b, labels = by_seed(runs), labels_of(runs)
    rows = []
    for key in row_keys(runs):
        cells = []
        for s in labels:
            found = b.get((*key, s))
            cells.append(owl.cell([r["ppl"] for _, r in sorted(found.items())]) if found else "")
        rows.append([*key, *cells])
    return table(rows, ["tool", "method", "allocation", *(f"sparsity {s}" for s in labels)])


def seed_table(runs: list[dict[str, Any]]) -> str:
    from common import table

    b, labels = by_seed(runs), labels_of(runs)
    seeds = {s: sorted({r["seed"] for r in runs if r["sparsity"] == s}) for s in labels}

    def shown(r: dict[str, Any] | None) -> str:
        if r is None:
            return "-"
        return "diverged" if r["ppl"] is None else f"{r['ppl']:.2f}"

    rows = []
    for key in row_keys(runs):
        cells = [" / ".join(shown(b.get((*key, s), {}).get(x)) for x in seeds[s]) for s in labels]
        rows.append([*key, *cells])
    columns = [f"{s}, seeds {'/'.join(map(str, seeds[s]))}" for s in labels]
    return table(rows, ["tool", "method", "allocation", *columns])


def paired(
    b: dict[tuple[str, str, str, str], dict[int, dict]], key: tuple[str, str, str, str]
) -> tuple[list[float], list[float], list[float]] | None:
    """(variant, sparsegpt, variant - sparsegpt) perplexities over the seeds both have."""
    _, _, allocation, s = key
    ref = b.get((OURS, REFERENCE, allocation, s))
    mine = b.get(key)
    if not ref or not mine:
        return None
    seeds = sorted(set(ref) & set(mine))
    if not seeds:
        return None
    x = [ppl_of(mine[k]) for k in seeds]
    y = [ppl_of(ref[k]) for k in seeds]
    return x, y, [u - v for u, v in zip(x, y, strict=True)]


def paired_table(runs: list[dict[str, Any]]) -> str:
    from common import table

    b, labels = by_seed(runs), labels_of(runs)
    rows = []
    for key in row_keys(runs):
        if key[:2] == (OURS, REFERENCE):
            continue
        cells = []
        for s in labels:
            p = paired(b, (*key, s))
            if p is None:
                cells.append("")
                continue
            x, y, d = p
            better = sum(u < v for u, v in zip(x, y, strict=True))
            ratio = statistics.fmean(x) / statistics.fmean(y)
            cells.append(f"{mean_sd(d, signed=True)}; {ratio:.3f}x; lower in {better}/{len(d)}")
        rows.append([*key, *cells])
    return table(rows, ["tool", "method", "allocation", *(f"sparsity {s}" for s in labels)])


def fmt(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1e4 or (0 < abs(value) < 1e-2):
        return f"{value:.3g}"
    return f"{value:.{digits}f}"


def seed_mean_of(records: Iterable[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in records if r.get(key) is not None]
    return statistics.fmean(values) if values else None


def paired_timing_seeds(recs: dict[Any, dict], ref: dict[Any, dict], off: dict[Any, str]) -> list:
    """Seeds whose timings may be set against sparsegpt's: trusted, and from the same `rose
    run` (the same machine conditions; a method added to a chunk later ran on its own)."""
    return sorted(
        seed
        for seed in (set(recs) & set(ref)) - set(off)
        if recs[seed].get("run") == ref[seed].get("run")
    )


def cost_table(runs: list[dict[str, Any]], layers: int | None = None) -> str:
    """Reconstruction errors and seconds per variant and sparsity (seed means)."""
    from common import table

    b = by_seed(runs)
    suspects = timing_suspects(b, layers)
    rows = []
    for s in labels_of(runs):
        for tool, method, allocation in row_keys(runs):
            if tool != OURS or (tool, method, allocation, s) not in b:
                continue
            off = suspects.get((allocation, s), {})
            by = b[(tool, method, allocation, s)]
            recs = list(by.values())
            timed = [r for seed, r in by.items() if seed not in off]  # seconds: trusted seeds
            prune, run = seed_mean_of(timed, "prune_s"), seed_mean_of(timed, "run_s")
            ref_by = b.get((OURS, REFERENCE, allocation, s), {})
            pairs = paired_timing_seeds(by, ref_by, off)

            def ratio(key: str) -> str:
                mine = seed_mean_of((by[k] for k in pairs), key)
                theirs = seed_mean_of((ref_by[k] for k in pairs), key)
                return f"{mine / theirs:.2f}x" if mine and theirs else "-"

            checked = sum(r.get("refit_checked", 0) for r in recs)
            rows.append(
                [
                    s,
                    method,
                    allocation,
                    len(recs),
                    len(timed),
                    fmt(seed_mean_of(recs, "error_mean"), 4),
                    fmt(seed_mean_of(recs, "error_before_mean"), 4),
                    f"{sum(r.get('violations', 0) for r in recs)}/{checked}" if checked else "-",
                    fmt(prune, 1),
                    fmt(seed_mean_of(timed, "solver_s"), 1),
                    fmt(seed_mean_of(timed, "variant_s"), 1),
                    fmt(run, 1),
                    ratio("prune_s"),
                    ratio("run_s"),
                ]
            )
    columns = [
        "sparsity",
        "method",
        "allocation",
        "seeds",
        "timed seeds",
        "mean Linear error",
        "before refit",
        "refit raised",
        "prune s (Linears)",
        "solver s",
        "variant steps s",
        "run s",
        "prune / sparsegpt",
        "run / sparsegpt",
    ]
    return table(rows, columns)


def summary_label(key: RowKey) -> str:
    tool, method, allocation = key
    name = "llm-compressor SparseGPT" if tool == PEER else method
    return name + (", OWL" if allocation == OWL else "")


def summary_table(runs: list[dict[str, Any]]) -> str:
    """The README's table: per variant and sparsity the seed mean and each seed's value; the
    lowest of each column in bold; a row run on fewer seeds than the column names its own
    (and is not bold: its mean is over other seeds)."""
    from common import table

    b, labels = by_seed(runs), labels_of(runs)
    seeds = {s: sorted({r["seed"] for r in runs if r["sparsity"] == s}) for s in labels}
    means = {
        (key, s): statistics.fmean(ppl_of(r) for r in b[(*key, s)].values())
        for key in row_keys(runs)
        for s in labels
        if (*key, s) in b
    }
    # bold: the lowest mean among the rows run on every seed of the column (a comparable mean)
    full = {(key, s): v for (key, s), v in means.items() if sorted(b[(*key, s)]) == seeds[s]}
    best = {s: min((v for (_, t), v in full.items() if t == s), default=None) for s in labels}
    rows = []
    for key in row_keys(runs):
        cells = []
        for s in labels:
            found = b.get((*key, s))
            if not found:
                cells.append("")
                continue
            mean = f"{means[(key, s)]:.2f}"
            text = f"**{mean}**" if full.get((key, s)) == best[s] else mean
            if len(found) > 1:
                mine = sorted(found)
                own = "" if mine == seeds[s] else f"seeds {'/'.join(map(str, mine))}: "
                text += f" ({own}{' / '.join(f'{ppl_of(found[k]):.2f}' for k in mine)})"
            elif sorted(found) != seeds[s]:
                text += f" (seed {next(iter(found))})"
            cells.append(text)
        rows.append([summary_label(key), *cells])

    def column(s: str) -> str:
        name = s if is_nm(s) else f"{round(100 * float(s))}%"
        many = len(seeds[s]) > 1
        return f"{name} (seed{'s' if many else ''} {'/'.join(map(str, seeds[s]))}{': mean' if many else ''})"

    return table(rows, ["variant", *(column(s) for s in labels)])


# ---------------------------------------------------------------- targets


def best_admm(
    b: dict[tuple[str, str, str, str], dict[int, dict]], sparsity: str
) -> tuple[str, float] | None:
    """The uniform ADMM variant with the lowest seed-mean perplexity at this sparsity."""
    found = [
        (statistics.fmean(ppl_of(r) for r in recs.values()), method)
        for (tool, method, allocation, s), recs in b.items()
        if tool == OURS and allocation == UNIFORM and s == sparsity and is_admm(method)
    ]
    if not found:
        return None
    value, method = min(found)
    return method, value


def target_ratio(b: dict, sparsity: str, factor: float, every_seed: bool, tag: str) -> list[str]:
    best = best_admm(b, sparsity)
    if best is None:
        return [f"{tag} n/a (no ADMM variant at {sparsity})"]
    method = best[0]
    p = paired(b, (OURS, method, UNIFORM, sparsity))
    if p is None:
        return [f"{tag} n/a (no sparsegpt at {sparsity})"]
    x, y, _ = p
    mine, ref = statistics.fmean(x), statistics.fmean(y)
    lower = sum(u < v for u, v in zip(x, y, strict=True))
    ok = mine <= factor * ref and (lower == len(x) or not every_seed)
    text = (
        f"{tag} best ADMM variant at {sparsity} ({method}) <= {factor:.2f}x sparsegpt"
        + (" and lower in every seed" if every_seed else "")
        + f": {mine:.2f} vs {ref:.2f} = {mine / ref:.3f}x (needs <= {factor * ref:.2f}), "
        f"lower in {lower}/{len(x)} seeds: {owl.verdict(ok)}"
    )
    return [text]


def target_peer(b: dict, sparsity: str = "0.7", factor: float = 0.75) -> list[str]:
    tag = "(3)"
    peer = b.get((PEER, PEER_METHOD, OWL, sparsity))
    if not peer:
        return [f"{tag} n/a (no llm-compressor OWL run at {sparsity})"]
    best = None
    for (tool, method, allocation, s), recs in b.items():
        if tool != OURS or s != sparsity:
            continue
        # on every seed llm-compressor ran: a variant run on fewer seeds is not comparable
        seeds = sorted(peer)
        if not set(seeds) <= set(recs):
            continue
        value = statistics.fmean(ppl_of(recs[k]) for k in seeds)
        if best is None or value < best[0]:
            best = (value, variant_name(method, allocation, sparsity), seeds)
    if best is None:
        return [f"{tag} n/a (no variant run on every seed llm-compressor ran at {sparsity})"]
    value, name, seeds = best
    ref = statistics.fmean(ppl_of(peer[k]) for k in seeds)
    ok = value <= factor * ref
    return [
        f"{tag} best variant of ours at {sparsity} ({name}) <= {factor:.2f}x llm-compressor's OWL "
        f"SparseGPT, seeds {'/'.join(map(str, seeds))}: {value:.2f} vs {ref:.2f} = "
        f"{value / ref:.3f}x (needs <= {factor * ref:.2f}): {owl.verdict(ok)}"
    ]


def target_refit(runs: list[dict[str, Any]]) -> list[str]:
    refits = [r for r in runs if r["tool"] == OURS and is_refit(r["method"])]
    checked = sum(r.get("refit_checked", 0) for r in refits)
    if not checked:
        return ["(4) n/a (no refit variant with reconstruction_error_before)"]
    bad = [r for r in refits if r.get("violations")]
    violations = sum(r["violations"] for r in bad)
    worst = max((r["max_increase"] for r in bad), default=0.0)
    lines = [
        f"(4) a refit never raises a Linear's reconstruction error: {violations} of {checked} "
        f"Linears raised (largest relative increase {worst:.2e}): {owl.verdict(violations == 0)}"
    ]
    lines += [
        f"  (4) {r['variant']} seed {r['seed']}: {r['violations']} Linears, "
        f"largest +{r['max_increase']:.2e}"
        for r in bad
    ]
    return lines


# A seed's timings are trusted when every variant's prune steps were timed (a `rose run` that
# resumed a killed one times only the steps it ran itself) and sparsegpt's prune seconds agree
# with the SparseGPT sweep inside its sparsegpt+admm variant (prune minus solver seconds, same
# run) within this factor; otherwise the machine's load changed during the run. A seed left
# out is left out of (5) and of the seconds in the cost table.
TIMING_AGREEMENT = 1.5


def timing_suspects(b: dict, layers: int | None = None) -> dict[tuple[str, str], dict[Any, str]]:
    """(allocation, sparsity) -> {seed: why its seconds are not trusted}."""
    out: dict[tuple[str, str], dict[Any, str]] = {}
    for (tool, _, allocation, s), recs in b.items():
        for seed, r in recs.items():
            timed = r.get("timed_layers")
            if tool == OURS and layers is not None and timed is not None and timed < layers:
                out.setdefault((allocation, s), {}).setdefault(
                    seed,
                    f"{r['variant']}'s run resumed a killed one and timed {timed} of its "
                    f"{layers} prune steps",
                )
    for (tool, method, allocation, s), refits in b.items():
        if tool != OURS or method != f"{REFERENCE}+admm":
            continue
        ref = b.get((OURS, REFERENCE, allocation, s), {})
        for seed in set(refits) & set(ref):
            r, plain = refits[seed], ref[seed]
            sweep = (r.get("prune_s") or 0.0) - (r.get("solver_s") or 0.0)
            if sweep <= 0 or not plain.get("prune_s"):
                continue
            ratio = plain["prune_s"] / sweep
            if not 1 / TIMING_AGREEMENT <= ratio <= TIMING_AGREEMENT:
                out.setdefault((allocation, s), {}).setdefault(
                    seed,
                    f"sparsegpt's prune seconds are {ratio:.2f}x the SparseGPT sweep inside its "
                    f"sparsegpt+admm (machine load changed during the run)",
                )
    return out


def target_time(b: dict, layers: int | None = None, factor: float = 2.0) -> list[str]:
    results, detail = [], []
    suspects = timing_suspects(b, layers)
    for (allocation, s), seeds_off in sorted(suspects.items()):
        for seed, why in sorted(seeds_off.items()):
            detail.append(f"  (5) left out: seed {seed} at {s} {allocation}: {why}")
    for (tool, method, allocation, s), recs in sorted(b.items()):
        if tool != OURS or not is_admm(method):
            continue
        ref = b.get((OURS, REFERENCE, allocation, s))
        if not ref:
            continue
        off = suspects.get((allocation, s), {})
        seeds = paired_timing_seeds(recs, ref, off)
        elsewhere = sorted(k for k in (set(recs) & set(ref)) - set(off) if k not in seeds)
        if elsewhere:
            detail.append(
                f"  (5) {variant_name(method, allocation, s)}: seed(s) "
                f"{', '.join(map(str, elsewhere))} timed in another rose run than sparsegpt's "
                "(added to the chunk later): not set against it"
            )
        # the target is the whole run; the prune stage alone is shown beside it
        for what, key in (("run", "run_s"), ("prune stage (not a target)", "prune_s")):
            mine = seed_mean_of((recs[k] for k in seeds), key)
            theirs = seed_mean_of((ref[k] for k in seeds), key)
            if not mine or not theirs:
                continue
            verdict = ""
            if key == "run_s":
                ok = mine <= factor * theirs
                results.append(ok)
                verdict = f": {owl.verdict(ok)}"
            detail.append(
                f"  (5) {variant_name(method, allocation, s)} {what} {mine:.1f} s vs sparsegpt "
                f"{theirs:.1f} s = {mine / theirs:.2f}x{verdict}"
            )
    if not results:
        return ["(5) n/a (no ADMM variant with sparsegpt beside it and trusted timings)", *detail]
    head = (
        f"(5) every ADMM variant's whole-run time <= {factor:g}x sparsegpt's: "
        f"{owl.verdict(all(results))} ({sum(results)} of {len(results)})"
    )
    return [head, *detail]


def target_lines(runs: list[dict[str, Any]], layers: int | None = None) -> list[str]:
    b = by_seed(runs)
    labels = labels_of(runs)
    lines = target_ratio(b, "0.7", 0.80, True, "(1)")
    for s, tag in (("0.6", "(2a)"), ("2:4", "(2b)")):
        lines += (
            target_ratio(b, s, 0.90, False, tag) if s in labels else [f"{tag} n/a ({s} not run)"]
        )
    return [*lines, *target_peer(b), *target_refit(runs), *target_time(b, layers)]


# ---------------------------------------------------------------- printing


def meta_lines(metas: list[tuple[str, dict[str, Any]]], runs: list[dict[str, Any]]) -> list[str]:
    name0, m = metas[0]
    cal, ev, model = m["calibration"], m["evaluation"], m["model"]
    hashes: dict[str, str] = {}
    for _, meta in metas:
        hashes.update(meta["calibration"]["tokens_sha"])
    hash_text = ", ".join(
        f"seed {k} {v}" for k, v in sorted(hashes.items(), key=lambda kv: int(kv[0]))
    )
    admm = m.get("admm")
    lines = [
        f"model: {model['source']} ({model['num_layers']} layers, {model['parameters_m']:.0f}M "
        f"parameters), first {m['layers']} layers pruned, {m['dtype']} on {m['device']}; "
        f"{m['threads']} thread(s) per process",
        f"calibration: {cal['source']}, {cal['nsamples']} x {cal['seqlen']} tokens per seed "
        f"(sha256 {hash_text}); every run checked to have used them",
        f"perplexity: {ev['name']} ({ev['source']}), {ev['windows']} windows x {ev['seqlen']} "
        f"(sha256 {ev['sha']}), batch {ev['batch_size']}; dense {m['dense_ppl']:.2f}",
        f"OWL: m {m['owl_m']}, lambda {m['owl_lambda']}; prune.admm: "
        + (", ".join(f"{k} {v}" for k, v in admm.items()) if admm else "(rose.admm absent)"),
        "main venv: " + ", ".join(f"{k} {v}" for k, v in m["versions_main"].items()),
    ]
    peer = next((meta["versions_peer"] for _, meta in metas if meta.get("versions_peer")), None)
    if peer:
        lines.append("peer venv: " + ", ".join(f"{k} {v}" for k, v in peer.items()))
    for name, meta in metas:
        walls = ", ".join(f"{k} {v:.0f} s" for k, v in meta["wall_s"].items())
        reused = "; ".join(f"{k} reused from {v}" for k, v in meta.get("peer_reused", {}).items())
        refused = len(meta.get("peer_refused", {}))
        lines.append(
            f"{Path(name).name}: sparsity {meta['sparsity']} seed {meta['seed']}, "
            f"{meta['header'][0].removeprefix('date: ')}: {walls or 'nothing run'}"
            + (f"; llm-compressor {reused}" if reused else "")
            + (f"; {refused} peer file(s) not comparable" if refused else "")
        )
        if meta.get("rescore"):
            r = meta["rescore"]
            lines.append(
                f"  same windows: {r['variant']} scored {r['run']:.4f} in its run and "
                f"{r['here']:.4f} here"
            )
        for what, problems in meta.get("peer_refused", {}).items():
            lines.append(f"  not reused ({what}): {'; '.join(problems)}")
    return lines


def report(datas: list[dict[str, Any]], names: list[str]) -> None:
    runs, notes = merge_chunks(datas, names)
    layers = datas[0]["meta"]["layers"]  # the same in every chunk (merge_chunks checks)
    metas = list(zip(names, (d["meta"] for d in datas), strict=True))
    print("\n".join(metas[0][1]["header"]))
    if len(metas) > 1:
        print(f"(headers of the other {len(metas) - 1} file(s): in their meta)")
    commands = {c.strip() for _, meta in metas for c in meta["command"].split(" ; ")}
    print("commands: " + " ; ".join(sorted(commands)))
    print("\n".join(meta_lines(metas, runs)))
    if notes:
        print("\n".join(f"note: {n}" for n in notes))
    print(
        "\nPerplexity (lower is better): seed mean ± sample standard deviation (n seeds); "
        "a single seed shows its value alone\n"
    )
    print(ppl_table(runs))
    print("\nPer seed:\n")
    print(seed_table(runs))
    print(
        "\nPaired against sparsegpt (same seed, sparsity and allocation): perplexity difference "
        "mean ± sample sd (n seeds); ratio of the seed means; seeds where the variant is lower\n"
    )
    print(paired_table(runs))
    print(
        "\nReconstruction error and time (seed means): mean over the pruned Linears of "
        "reconstruction_error (and for refits of reconstruction_error_before, the unrefitted "
        "mask's); Linears whose refit raised it / Linears checked; prune s = sum of the "
        "Linears' prune seconds (solver included), solver s = the solver's part; variant "
        "steps s = the runner's seconds of the variant's own steps; run s = those plus the "
        "run's shared steps (calibration, dense statistics, allocation), a run of the variant "
        "alone; seconds are means over the timed seeds (those target (5) trusts); the ratios "
        "to sparsegpt are over the timed seeds where both ran in the same rose run (a method "
        "added to a chunk later has none: '-')\n"
    )
    print(cost_table(runs, layers))
    b = by_seed(runs)
    for s in labels_of(runs):
        best = best_admm(b, s)
        owl_run = sorted(
            {
                r["method"]
                for r in runs
                if r["sparsity"] == s and r["allocation"] == OWL and r["tool"] == OURS
            }
        )
        if best and owl_run and best[0] not in owl_run:
            print(
                f"\nnote: at {s} the best ADMM variant is {best[0]}, the OWL runs are of {owl_run}"
            )
    print("\nSummary (the README's table; seed mean, then each seed's value):\n")
    print(summary_table(runs))
    print("\nTargets (issue 22; seed means, a diverged seed counts as infinite perplexity):")
    print("\n".join(target_lines(runs, layers)))


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.from_json:
        names = args.from_json
        print(f"(printed from {', '.join(names)}; nothing was run)")
    else:
        command = shlex.join([".venv/bin/python", "benchmarks/bench_admm.py", *argv])
        names = [str(p) for p in run_benchmark(args, command)]
    datas = [json.loads(Path(name).read_text()) for name in names]
    report(datas, names)


if __name__ == "__main__":
    main()
