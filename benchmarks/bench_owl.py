"""OWL against uniform allocation at 60-80% sparsity, over calibration seeds, and against llm-compressor's OWL.

    .venv/bin/python benchmarks/bench_owl.py [--sparsity 0.6 0.7 0.8] [--seeds 0 1 2]
        [--methods rose sparsegpt wanda] [--layers all|N] [--nsamples 32 --seqlen 512]
        [--max-windows 16] [--owl-m 5 --owl-lambda 0.08] [--threads 1] [--device cpu|cuda]
        [--no-peer] [--peer-venv .venv-peer] [--no-install] [--workdir DIR] [--keep]
        [--out benchmarks/results/bench_owl.json]
    .venv/bin/python benchmarks/bench_owl.py --from-json benchmarks/results/bench_owl.json
    .venv/bin/python benchmarks/bench_owl.py --from-json seed0.json seed1.json seed2.json

Per calibration seed: ONE `python -m rose run` of a generated config with
`methods` x `sparsities` x `allocation: [uniform, {kind: owl, m, lambda}]`
(variants `rose-0.7`, `rose-owl-0.7`, ...; every variant of the seed shares its
calibration tokens and its dense OWL statistics pass), evaluation perplexity
only (the config's `wiki-tail` windows, `--max-windows` of them), no exports.
Then llm-compressor's `SparseGPTModifier` per sparsity, uniform and with
`sparsity_profile="owl"` (`owl_m`, `owl_lmbda`), on that seed's tokens. Prints
the dense perplexity, a markdown table (rows: tool x method x allocation,
columns: sparsity, cells: seed-mean +- sample standard deviation over the
seeds, n seeds), the per-seed values, the layer-sparsity ranges, and the
target checks:
(a) at 70% and 80%, OWL lowers the seed-mean perplexity of every method;
(b) rose-owl at least 10% below uniform rose at 70%;
(c) rose-owl at or below llm-compressor's OWL SparseGPT at every sparsity.
The raw per-run results go to `--out` (JSON, rewritten after every seed) and
`--from-json` prints the tables again from it without running anything; given
several files (seeds run at different times, e.g. one per session), it checks
that they measured the same thing (model, layers, calibration and evaluation
settings, windows, OWL settings, methods, sparsities, threads, versions, dense
perplexity) and reports their seeds together.

Fairness, made checkable:
- Same dense start: the model source (default `pypi:smollm2`) is prepared once
  into a safetensors directory that every run of ours uses in place and that
  llm-compressor loads (as in bench_peer.py).
- Same calibration tokens per seed: `capture_calibration` with
  `calibration.seed = s` samples them; llm-compressor gets those ids as a
  pre-tokenized dataset (no shuffling), and our run for that seed must have
  reproduced them bit for bit in `calib/tokens.h5` (checked; the benchmark
  stops if not). Their sha256 per seed is printed.
- Same layers: `--layers N` sets `prune.layers = N`; llm-compressor is given a
  config with `num_hidden_layers = N` (the rest copied back from the dense
  checkpoint, bench_peer.py's `layers` mode) and targets `model.layers.0`...,
  so its OWL statistics, like ours, cover exactly the pruned layers. Every
  pruned model is checked: zeros only in the pruned layers' Linears, every
  other tensor equal to the dense one; its per-layer zero fractions are stored.
- Same windows: one evaluation spec (source, seqlen, max_windows) for our runs'
  evaluation stage and for the in-process scoring of the dense and
  llm-compressor models (`rose.evaluate.perplexity_report`); the first seed's
  first model of ours is scored again in process and must give the run's value.
- Same OWL settings: m and lambda are passed to both tools.
- Same threads: OMP/MKL_NUM_THREADS and torch threads = --threads everywhere.

llm-compressor 0.14's OWL does not run as shipped (checked on this machine):
its modifier measures activations by running the basic calibration pipeline
inside `on_initialize`, whose lifecycle events raise "Cannot invoke event
before initializing", and it then hands its dict of layer sparsities whole to
every Linear. The peer process therefore uses a subclass that (1) silences
those three lifecycle events during that activation pass only and (2) turns
the dict into the per-target-layer list the modifier's own hooks expect. Its
activation statistic, its OWL arithmetic and its SparseGPT are untouched. The
layer sparsities it chose are stored in the JSON. One difference stays, by
design of each tool: llm-compressor's input-column norm is the sum over
calibration batches (here: windows) of each batch's column norm, ours the
root-mean-square over all calibration tokens; both count outliers over all
seven Linears of a layer against m x the layer's mean |W| * norm, min-max
scale into [0, 2 lambda] and shift to the target mean. The per-layer zero
fractions of every model are in the JSON to compare the allocations.

Disk: a seed of ours holds every variant at once (about 0.9 GB per variant of
SmolLM2 with its per-layer artifacts: ~17 GB for 18 variants); a seed's models
are deleted once scored unless --keep. Time: hours at the defaults on the
2-core box (one seed is 18 full-depth variants plus 6 llm-compressor runs);
use --layers/--nsamples/--seqlen/--max-windows for a quick look.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shlex
import shutil
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
DEFAULT_OUT = BENCH / "results" / "bench_owl.json"
OURS = "rose-pipeline"
PEER = "llm-compressor"
PEER_METHOD = "SparseGPTModifier"
UNIFORM, OWL = "uniform", "owl"
METHODS = ("rose", "sparsegpt", "wanda")
TOOL_ORDER = {OURS: 0, PEER: 1}
# A re-score of one of our models in this process must match the run's value this closely.
RESCORE_RTOL = 1e-4


def label(sparsity: float | str) -> str:
    """The sparsity as variant names spell it (0.6 -> '0.6'); a string (N:M, '2:4') as it is."""
    return sparsity if isinstance(sparsity, str) else f"{sparsity:g}"


def variant_name(method: str, allocation: str, sparsity: float) -> str:
    return (
        f"{method}-{label(sparsity)}"
        if allocation == UNIFORM
        else f"{method}-owl-{label(sparsity)}"
    )


# ---------------------------------------------------------------- llm-compressor side (peer venv)


def peer_owl_main(argv: list[str]) -> None:
    """`bench_owl.py _peer [--owl-m M --owl-lambda L --owl-out F] <bench_peer.py _peer options>`."""
    p = argparse.ArgumentParser(prog="bench_owl.py _peer")
    p.add_argument("--owl-m", type=int, default=None)
    p.add_argument("--owl-lambda", type=float, default=None)
    p.add_argument("--owl-out", default=None, help="where the layer sparsities it chose go")
    own, rest = p.parse_known_args(argv)
    sys.path.insert(0, str(BENCH))
    import bench_peer

    if own.owl_m is None:
        bench_peer.peer_main(rest)
        return

    import contextlib
    import functools
    from unittest import mock

    import llmcompressor.modifiers.pruning as pruning
    from llmcompressor.pipelines.basic import pipeline as basic_pipeline

    chosen: list[float] = []

    def no_event(*_args: Any, **_kwargs: Any) -> None:
        return None

    class OwlSparseGPTModifier(pruning.SparseGPTModifier):
        """SparseGPTModifier with the two fixes its OWL needs in 0.14 (module docstring)."""

        def _get_activations(self, *args: Any, **kwargs: Any) -> Any:
            with contextlib.ExitStack() as stack:
                for event in ("calibration_start", "sequential_epoch_end", "calibration_end"):
                    stack.enter_context(
                        mock.patch.object(basic_pipeline.LifecycleCallbacks, event, no_event)
                    )
                return super()._get_activations(*args, **kwargs)

        def on_initialize(self, state: Any, **kwargs: Any) -> bool:
            done = super().on_initialize(state, **kwargs)
            if isinstance(self.sparsity, dict):
                self.sparsity = [float(self.sparsity[name]) for name in self._target_layers]
            if isinstance(self.sparsity, list):
                chosen[:] = [float(s) for s in self.sparsity]
            return done

    # bench_peer.peer_main builds `SparseGPTModifier(...)` from this module at call time
    pruning.SparseGPTModifier = functools.partial(
        OwlSparseGPTModifier,
        sparsity_profile="owl",
        owl_m=own.owl_m,
        owl_lmbda=own.owl_lambda,
    )
    bench_peer.peer_main(rest)
    if own.owl_out:
        Path(own.owl_out).write_text(json.dumps(chosen))


# ---------------------------------------------------------------- arguments


def layers_arg(text: str) -> str:
    if text != "all" and not text.isdigit():
        raise argparse.ArgumentTypeError("takes an integer or 'all'")
    return text


def add_run_args(p: argparse.ArgumentParser) -> None:
    """The protocol and process options bench_owl.py and bench_admm.py share."""
    p.add_argument(
        "--layers",
        default="all",
        type=layers_arg,
        help="prune the first N decoder layers, or 'all' (default)",
    )
    p.add_argument("--nsamples", type=int, default=None, help="default: the config's")
    p.add_argument("--seqlen", type=int, default=None, help="default: the config's")
    p.add_argument(
        "--max-windows",
        type=int,
        default=None,
        help="evaluation windows (default: the config's max_windows for the metric)",
    )
    p.add_argument("--metric", default="wiki-tail", help="the config's perplexity evaluation")
    p.add_argument("--owl-m", type=int, default=5, help="OWL outlier threshold m (default 5)")
    p.add_argument("--owl-lambda", type=float, default=0.08, help="OWL lambda (default 0.08)")
    p.add_argument("--threads", type=int, default=1, help="torch/OMP threads of every process")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="default cpu")
    p.add_argument(
        "--peer-venv",
        default=str(REPO / ".venv-peer"),
        help="llm-compressor's venv (default .venv-peer; see bench_peer.py)",
    )
    p.add_argument(
        "--no-install", action="store_true", help="fail instead of creating the peer venv"
    )
    p.add_argument(
        "--workdir", default=None, help="where runs go (default: a temporary dir under results/)"
    )


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--config",
        default=str(REPO / "config/config.yaml"),
        help="model, calibration, prune and evaluation settings (default config/config.yaml)",
    )
    p.add_argument(
        "--sparsity", nargs="+", type=float, default=[0.6, 0.7, 0.8], help="default 0.6 0.7 0.8"
    )
    p.add_argument(
        "--seeds", nargs="+", type=int, default=[0, 1, 2], help="calibration seeds (default 0 1 2)"
    )
    p.add_argument(
        "--methods", nargs="+", choices=METHODS, default=list(METHODS), help="default: all three"
    )
    add_run_args(p)
    p.add_argument("--no-peer", action="store_true", help="skip llm-compressor")
    p.add_argument(
        "--keep",
        action="store_true",
        help="keep every pruned model (about 0.9 GB per variant of ours, 0.5 GB per peer model)",
    )
    p.add_argument(
        "--out",
        default=str(DEFAULT_OUT),
        help="raw per-run results, rewritten after every seed "
        "(default benchmarks/results/bench_owl.json, gitignored)",
    )
    p.add_argument(
        "--from-json",
        nargs="+",
        default=None,
        help="print the tables from this JSON (several: their seeds together); run nothing",
    )
    args = p.parse_args(argv)
    if len(set(map(label, args.sparsity))) != len(args.sparsity):
        p.error("--sparsity lists a value twice")
    for s in args.sparsity:
        if not 0 < s < 1:
            p.error(f"--sparsity {s}: OWL needs an unstructured fraction in (0, 1)")
    return args


# ---------------------------------------------------------------- small helpers (main venv)


@dataclass(frozen=True)
class Setup:
    """What every run of one benchmark shares."""

    args: argparse.Namespace
    workdir: Path
    dense_dir: Path
    layers: int  # pruned decoder layers
    truncate: bool  # llm-compressor is given only those layers
    dtype: str  # llm-compressor's load dtype
    env: dict[str, str]
    peer_python: Path | None
    blocksize: int  # the config's prune settings, passed to llm-compressor
    percdamp: float


def sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().cpu().numpy().tobytes()).hexdigest()[:16]


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)


def layer_zeros(model_dir: Path, layers: int) -> list[float]:
    """Zero fraction of each pruned decoder layer's `*_proj` weights, layer by layer."""
    from safetensors import safe_open

    zeros, total = [0] * layers, [0] * layers
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            for name in fh.keys():
                if not (name.startswith("model.layers.") and name.endswith("_proj.weight")):
                    continue
                index = int(name.split(".")[2])
                if index < layers:
                    w = fh.get_tensor(name)
                    zeros[index] += int((w == 0).sum())
                    total[index] += w.numel()
    return [round(z / t, 6) if t else float("nan") for z, t in zip(zeros, total, strict=True)]


def read_tokens(run_dir: Path) -> torch.Tensor:
    import torch

    from rose.artifacts import H5Artifact
    from rose.layout import RunLayout

    tokens = H5Artifact(RunLayout(run_dir).tokens).read("tokens")
    return torch.from_numpy(tokens).to(torch.int64)


def versions(packages: Sequence[str]) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in packages:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


class Scorer:
    """Our perplexity evaluator on one fixed tensor of windows (the spec our runs evaluate with)."""

    def __init__(self, spec: Any, batch_size: int, dense_dir: Path, device: str) -> None:
        import torch

        from rose import data

        self.spec = spec
        self.batch_size = batch_size
        self.device = torch.device(device)
        tokenizer = data.tokenizer_for(dense_dir)
        self.windows = data.eval_windows(tokenizer, spec.source, spec.seqlen, spec.max_windows)

    def protocol(self) -> dict[str, Any]:
        from dataclasses import asdict

        return {
            "source": asdict(self.spec.source),
            "seqlen": self.spec.seqlen,
            "windows": int(self.windows.shape[0]),
            "max_windows": self.spec.max_windows,
        }

    def ppl(self, model_dir: Path) -> float | None:
        """Perplexity, None when the model diverged (NaN/Inf)."""
        from rose import evaluate

        report = evaluate.perplexity_report(
            model_dir, self.spec.name, self.windows, self.batch_size, self.device, self.protocol()
        )
        return report["value"]

    def check_run_report(self, report: dict[str, Any], where: Path) -> None:
        """A run's evaluation JSON must describe these windows."""
        mine, theirs = self.protocol(), report.get("protocol", {})
        same = all(theirs.get(k) == v for k, v in mine.items())
        if not same or report.get("seqlen") != int(self.windows.shape[1]):
            sys.exit(f"bench_owl: {where} was scored on other windows: {theirs} vs {mine}")


# ---------------------------------------------------------------- our side


def metric_spec(given: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The config's perplexity evaluation named --metric, with --max-windows applied."""
    specs = (given.get("evaluation") or {}).get("perplexity") or []
    spec = next((dict(s) for s in specs if s.get("name") == args.metric), None)
    if spec is None:
        sys.exit(f"bench_owl: {args.config} has no perplexity evaluation named {args.metric!r}")
    if args.max_windows:
        spec["max_windows"] = args.max_windows
    return spec


def run_config(
    given: dict[str, Any], args: argparse.Namespace, seed: int, dense_dir: Path, workdir: Path
) -> dict[str, Any]:
    """One seed's config: every method x sparsity x {uniform, owl}, perplexity only, no export."""
    return pipeline_config(
        given,
        args,
        seed,
        dense_dir,
        workdir,
        run=f"owl-seed{seed}",
        methods=list(args.methods),
        sparsities=list(args.sparsity),
        allocation=[UNIFORM, {"kind": OWL, "m": args.owl_m, "lambda": args.owl_lambda}],
    )


def pipeline_config(
    given: dict[str, Any],
    args: argparse.Namespace,
    seed: int,
    dense_dir: Path,
    workdir: Path,
    *,
    run: str,
    methods: list[str],
    sparsities: list[Any],
    allocation: list[Any],
    prune: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A run of `methods` x `sparsities` x `allocation` on the prepared dense model, calibration
    seed `seed` (and --nsamples/--seqlen/--layers/--device), perplexity only (the --metric
    evaluation, --max-windows), no export; `prune` is merged into the prune section."""
    from rose import config as rose_config

    calibration: dict[str, Any] = {"seed": seed}
    if args.nsamples:
        calibration["nsamples"] = args.nsamples
    if args.seqlen:
        calibration["seqlen"] = args.seqlen
    batch_size = (given.get("evaluation") or {}).get("batch_size")
    merged = rose_config.merge(
        given,
        {
            "run": run,
            "results_dir": str(workdir / "ours"),
            "model": {"source": str(dense_dir)},
            "calibration": calibration,
            "methods": methods,
            "sparsities": sparsities,
            "allocation": allocation,
            "device": args.device,
            "export": {"formats": []},
            "prune": {
                "layers": None if args.layers == "all" else int(args.layers),
                **(prune or {}),
            },
        },
    )
    merged["evaluation"] = {  # replaced, not merged: perplexity only
        "batch_size": batch_size or rose_config.EVAL_DEFAULTS["batch_size"],
        "perplexity": [metric_spec(given, args)],
        "zero_shot": None,
    }
    return merged


def capture_tokens(cfg_dict: dict[str, Any], workdir: Path, seed: int) -> torch.Tensor:
    """The seed's calibration tokens, sampled by the pipeline's own stage (a run of its own)."""
    from rose import config as rose_config
    from rose import plan as graph

    overrides = {"run": f"seed{seed}", "results_dir": str(workdir / "calib"), "evaluation": None}
    cfg = rose_config.from_dict(rose_config.merge(cfg_dict, overrides))
    graph.execute(cfg, "prepare_model")  # the dense directory, used in place
    graph.execute(cfg, "capture_calibration")
    return read_tokens(cfg.run_dir)


def ours_result(setup: Setup, run: str) -> Path:
    """The wrapper's result file of run_ours: its rc and the runner's step timings."""
    return setup.workdir / f"{run}.json"


def ours_step_log(setup: Setup, run: str) -> Path:
    """Each finished step's timing, appended by the wrapper as it ends: across invocations of
    one run directory, so a resumed run's timings include what a killed one had finished."""
    return setup.workdir / f"{run}.steps.jsonl"


def ours_command(
    setup: Setup, cfg_dict: dict[str, Any], run: str
) -> tuple[Any, list[str], dict[str, str]]:
    """The parsed config, the wrapped `python -m rose run` command and its environment, the
    config saved as <run>.yaml in the workdir."""
    import yaml
    from bench_peer import OURS_WRAPPER

    from rose import config as rose_config

    cfg = rose_config.from_dict(cfg_dict)  # a bad config stops here, before any process
    config_file = setup.workdir / f"{run}.yaml"
    config_file.write_text(yaml.safe_dump(cfg_dict, sort_keys=False))
    cmd = [
        sys.executable,
        "-c",
        OURS_WRAPPER,
        str(ours_result(setup, run)),
        "run",
        "-q",
        "--config",
        str(config_file),
    ]
    return cfg, cmd, {**setup.env, "BENCH_STEP_LOG": str(ours_step_log(setup, run))}


def run_ours(setup: Setup, cfg_dict: dict[str, Any], run: str, tool: str) -> tuple[Any, float]:
    """Run ours_command; the parsed config and the wall time. The result file's `timings` are
    every step of the run directory, those of killed earlier invocations included
    (`timings_earlier`: how many of them were). bench_owl and bench_admm both launch here."""
    from bench_peer import _timed

    cfg, cmd, env = ours_command(setup, cfg_dict, run)
    step_log = ours_step_log(setup, run)
    if not cfg.run_dir.exists():  # a fresh run: any log is of a finished, removed one
        step_log.unlink(missing_ok=True)
    earlier = read_step_log(step_log)
    print(f"{tool}: {run}: rose run, {len(cfg.variants)} variants ...", file=sys.stderr)
    wall = _timed(cmd, env, setup.workdir / f"{run}.log")
    result_file = ours_result(setup, run)
    result = json.loads(result_file.read_text())
    every = read_step_log(step_log)
    if every[len(earlier) :] != result["timings"]:
        sys.exit(f"{tool}: {step_log} does not end with the run's own step timings")
    result.update(timings=every, timings_earlier=len(earlier))
    write_json(result_file, result)
    return cfg, wall


def read_step_log(path: Path) -> list[dict[str, Any]]:
    """The wrapper's step log; a line cut short by a kill is dropped (its step was not done)."""
    out = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def our_records(setup: Setup, run_dir: Path, seed: int, scorer: Scorer) -> list[dict[str, Any]]:
    """Every variant's perplexity from the run's evaluation JSON, with the pruned-model checks."""
    from bench_peer import check_pruned

    from rose.artifacts import read_json
    from rose.layout import RunLayout

    layout = RunLayout(run_dir)
    out = []
    for method in setup.args.methods:
        for allocation in (UNIFORM, OWL):
            for s in setup.args.sparsity:
                name = variant_name(method, allocation, s)
                path = layout.perplexity(name, scorer.spec.name)
                if not path.exists():
                    sys.exit(f"bench_owl: the run wrote no {path}")
                report = read_json(path)
                scorer.check_run_report(report, path)
                model = layout.model_dir(name)
                out.append(
                    {
                        "tool": OURS,
                        "method": method,
                        "allocation": allocation,
                        "sparsity": label(s),
                        "seed": seed,
                        "variant": name,
                        "ppl": report["value"],
                        "zeros": check_pruned(model, setup.dense_dir, setup.layers, label(s)),
                        "layer_sparsity": layer_zeros(model, setup.layers),
                    }
                )
    return out


# ---------------------------------------------------------------- llm-compressor (orchestration)


def run_peer(
    setup: Setup, allocation: str, sparsity: float, seed: int, tokens_file: Path
) -> tuple[Path, dict[str, Any]]:
    """SparseGPTModifier on the seed's tokens in the peer venv; the pruned model dir and its result."""
    from bench_peer import _timed

    a, w = setup.args, setup.workdir
    name = f"peer-seed{seed}-{allocation}-{label(sparsity)}"
    out, result, chosen = w / name / "model", w / f"{name}.json", w / f"{name}-layers.json"
    cmd = [str(setup.peer_python), str(Path(__file__).resolve()), "_peer"]
    if allocation == OWL:
        cmd += [
            "--owl-m",
            str(a.owl_m),
            "--owl-lambda",
            str(a.owl_lambda),
            "--owl-out",
            str(chosen),
        ]
    cmd += ["--model", str(setup.dense_dir), "--tokens", str(tokens_file), "--out", str(out)]
    cmd += ["--result", str(result), "--sparsity", label(sparsity), "--layers", str(setup.layers)]
    cmd += ["--threads", str(a.threads), "--dtype", setup.dtype, "--batch-size", "1"]
    cmd += ["--blocksize", str(setup.blocksize), "--percdamp", str(setup.percdamp)]
    cmd += ["--truncate"] if setup.truncate else []
    print(
        f"bench_owl: seed {seed}: llm-compressor {allocation} {label(sparsity)} ...",
        file=sys.stderr,
    )
    wall = _timed(cmd, setup.env, w / f"{name}.log")
    info = json.loads(result.read_text())
    info["wall_s"] = wall
    if allocation == OWL:
        info["chosen_layer_sparsity"] = json.loads(chosen.read_text())
    return out, info


def peer_records(
    setup: Setup, seed: int, tokens: torch.Tensor, scorer: Scorer
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """llm-compressor uniform and OWL at every sparsity, scored by our evaluator."""
    import torch
    from bench_peer import check_pruned

    tokens_file = setup.workdir / f"tokens-seed{seed}.pt"
    torch.save(tokens, tokens_file)
    out, peer_versions = [], {}
    for s in setup.args.sparsity:
        for allocation in (UNIFORM, OWL):
            model, info = run_peer(setup, allocation, s, seed, tokens_file)
            peer_versions = info["versions"]
            out.append(
                {
                    "tool": PEER,
                    "method": PEER_METHOD,
                    "allocation": allocation,
                    "sparsity": label(s),
                    "seed": seed,
                    "ppl": scorer.ppl(model),
                    "zeros": check_pruned(model, setup.dense_dir, setup.layers, label(s)),
                    "layer_sparsity": layer_zeros(model, setup.layers),
                    "chosen_layer_sparsity": info.get("chosen_layer_sparsity"),
                    "wall_s": round(info["wall_s"], 1),
                }
            )
            if not setup.args.keep:
                shutil.rmtree(model.parent, ignore_errors=True)
    return out, peer_versions


# ---------------------------------------------------------------- the report (from the JSON alone)


def groups(runs: list[dict[str, Any]]) -> dict[tuple[str, str, str, str], list[float | None]]:
    """(tool, method, allocation, sparsity label) -> perplexities over seeds (None: diverged)."""
    out: dict[tuple[str, str, str, str], list[float | None]] = {}
    for r in sorted(runs, key=lambda r: r["seed"]):
        key = (r["tool"], r["method"], r["allocation"], r["sparsity"])
        out.setdefault(key, []).append(r["ppl"])
    return out


def finite(values: Sequence[float | None]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def seed_mean(values: Sequence[float | None]) -> float:
    """The mean over seeds; inf when any seed diverged (never better than a finite mean)."""
    good = finite(values)
    return statistics.fmean(good) if good and len(good) == len(values) else math.inf


def cell(values: Sequence[float | None]) -> str:
    """'mean ± sample sd (n)'; one seed: 'value (1)'."""
    good = finite(values)
    diverged = len(values) - len(good)
    if not good:
        return f"diverged ({len(values)})"
    text = f"{statistics.fmean(good):.2f}"
    if len(good) > 1:
        text += f" ± {statistics.stdev(good):.2f}"
    text += f" ({len(good)})"
    return text + (f", {diverged} diverged" if diverged else "")


def row_keys(runs: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    order = {m: i for i, m in enumerate((*METHODS, PEER_METHOD))}
    keys = {(r["tool"], r["method"], r["allocation"]) for r in runs}
    return sorted(keys, key=lambda k: (TOOL_ORDER[k[0]], order.get(k[1], 99), k[2] != UNIFORM))


def sparsity_labels(runs: list[dict[str, Any]]) -> list[str]:
    return sorted({r["sparsity"] for r in runs}, key=float)


def main_table(runs: list[dict[str, Any]], owl_text: str) -> str:
    from common import table

    g, labels = groups(runs), sparsity_labels(runs)
    rows = []
    for tool, method, allocation in row_keys(runs):
        cells = [
            cell(g[(tool, method, allocation, s)]) if (tool, method, allocation, s) in g else ""
            for s in labels
        ]
        rows.append([tool, method, owl_text if allocation == OWL else UNIFORM, *cells])
    return table(rows, ["tool", "method", "allocation", *(f"sparsity {s}" for s in labels)])


def seed_table(runs: list[dict[str, Any]]) -> str:
    from common import table

    labels, seeds = sparsity_labels(runs), sorted({r["seed"] for r in runs})
    by = {(r["tool"], r["method"], r["allocation"], r["sparsity"], r["seed"]): r for r in runs}

    def shown(r: dict[str, Any] | None) -> str:
        if r is None:
            return "-"
        return "diverged" if r["ppl"] is None else f"{r['ppl']:.2f}"

    rows = []
    for key in row_keys(runs):
        cells = [" / ".join(shown(by.get((*key, s, seed))) for seed in seeds) for s in labels]
        rows.append([*key, *cells])
    seed_text = "/".join(str(s) for s in seeds)
    columns = ["tool", "method", "allocation", *(f"{s}, seeds {seed_text}" for s in labels)]
    return table(rows, columns)


def layer_ranges(runs: list[dict[str, Any]]) -> list[str]:
    """Min-max of the OWL models' per-layer zero fractions, per tool, method and sparsity."""
    spans: dict[tuple[str, str, str], list[float]] = {}
    for r in runs:
        if r["allocation"] == OWL and r.get("layer_sparsity"):
            key = (r["tool"], r["method"], r["sparsity"])
            spans.setdefault(key, []).extend(r["layer_sparsity"])
    ordered = sorted(
        spans.items(), key=lambda kv: (TOOL_ORDER[kv[0][0]], kv[0][1], float(kv[0][2]))
    )
    return [f"{t} {m} owl {s}: {min(v):.3f}-{max(v):.3f}" for (t, m, s), v in ordered]


def allocation_gaps(runs: list[dict[str, Any]]) -> list[str]:
    """Largest per-layer difference between rose-owl's and llm-compressor's OWL zero fractions."""
    by = {
        (r["tool"], r["sparsity"], r["seed"]): r["layer_sparsity"]
        for r in runs
        if r["allocation"] == OWL and r["method"] in ("rose", PEER_METHOD)
    }
    gaps: dict[str, float] = {}
    for (tool, s, seed), ours in by.items():
        theirs = by.get((PEER, s, seed)) if tool == OURS else None
        if theirs and len(theirs) == len(ours):
            gap = max(abs(x - y) for x, y in zip(ours, theirs, strict=True))
            gaps[s] = max(gap, gaps.get(s, 0.0))
    return [
        f"rose-owl vs llm-compressor owl at {s}: layers differ by at most {g:.3f}"
        for s, g in sorted(gaps.items(), key=lambda kv: float(kv[0]))
    ]


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def change(new: float, old: float) -> str:
    return f"{100 * (new / old - 1):+.1f}%" if math.isfinite(new) and math.isfinite(old) else "n/a"


def target_a(means: dict[tuple[str, str, str, str], float], methods: Sequence[str]) -> list[str]:
    """(a) at 70% and 80% OWL lowers every method's seed-mean perplexity."""
    results, detail, checked = [], [], []
    for s in ("0.7", "0.8"):
        for method in methods:
            uni, owl = means.get((OURS, method, UNIFORM, s)), means.get((OURS, method, OWL, s))
            if uni is None or owl is None:
                continue
            checked.append(s)
            results.append(owl < uni)
            detail.append(
                f"  (a) {method} at {s}: owl {owl:.2f} vs uniform {uni:.2f} "
                f"({change(owl, uni)}) {verdict(owl < uni)}"
            )
    if not results:
        return ["(a) n/a (needs sparsity 0.7 or 0.8)"]
    missing = [s for s in ("0.7", "0.8") if s not in checked]
    head = (
        "(a) at 70% and 80% OWL lowers the seed-mean perplexity of every method: "
        f"{verdict(all(results))} ({sum(results)} of {len(results)}"
        + (f"; {' and '.join(missing)} not run" if missing else "")
        + ")"
    )
    return [head, *detail]


def target_b(means: dict[tuple[str, str, str, str], float]) -> list[str]:
    """(b) rose-owl at least 10% below uniform rose at 70%."""
    uni, owl = means.get((OURS, "rose", UNIFORM, "0.7")), means.get((OURS, "rose", OWL, "0.7"))
    if uni is None or owl is None:
        return ["(b) n/a (needs rose at sparsity 0.7)"]
    ok = owl <= 0.9 * uni
    return [
        f"(b) rose-owl at least 10% below uniform rose at 70%: owl {owl:.2f} vs uniform "
        f"{uni:.2f} ({change(owl, uni)}; needs <= {0.9 * uni:.2f}): {verdict(ok)}"
    ]


def target_c(means: dict[tuple[str, str, str, str], float], labels: Sequence[str]) -> list[str]:
    """(c) rose-owl at or below llm-compressor's OWL SparseGPT at every sparsity."""
    results, detail = [], []
    for s in labels:
        ours, peer = means.get((OURS, "rose", OWL, s)), means.get((PEER, PEER_METHOD, OWL, s))
        if ours is None or peer is None:
            continue
        results.append(ours <= peer)
        detail.append(
            f"  (c) at {s}: rose-owl {ours:.2f} vs llm-compressor owl {peer:.2f} "
            f"({change(ours, peer)}) {verdict(ours <= peer)}"
        )
    if not results:
        return ["(c) n/a (needs rose and the llm-compressor runs)"]
    head = (
        "(c) rose-owl at or below llm-compressor's OWL SparseGPT at every sparsity: "
        f"{verdict(all(results))} ({sum(results)} of {len(results)})"
    )
    return [head, *detail]


def target_lines(runs: list[dict[str, Any]], methods: Sequence[str]) -> list[str]:
    means = {k: seed_mean(v) for k, v in groups(runs).items()}
    return [*target_a(means, methods), *target_b(means), *target_c(means, sparsity_labels(runs))]


def meta_lines(meta: dict[str, Any]) -> list[str]:
    cal, ev, model = meta["calibration"], meta["evaluation"], meta["model"]
    hashes = ", ".join(f"seed {k} {v}" for k, v in cal["tokens_sha"].items())
    lines = [
        f"command: {meta['command']}",
        f"model: {model['source']} ({model['num_layers']} layers, {model['parameters_m']:.0f}M "
        f"parameters), first {meta['layers']} layers pruned, {meta['dtype']} on {meta['device']}; "
        f"{meta['threads']} thread(s) per process",
        f"calibration: {cal['source']}, {cal['nsamples']} x {cal['seqlen']} tokens per seed "
        f"(sha256 {hashes}); our runs checked to have used them"
        + ("; llm-compressor given the same ids" if meta.get("versions_peer") else ""),
        f"perplexity: {ev['name']} ({ev['source']}), {ev['windows']} windows x {ev['seqlen']} "
        f"(sha256 {ev['sha']}), rose.evaluate for every model, batch {ev['batch_size']}; "
        f"dense {meta['dense_ppl']:.2f}",
        f"OWL: m {meta['owl_m']}, lambda {meta['owl_lambda']}"
        + (" for both tools" if meta.get("versions_peer") else "")
        + "; OWL statistics over the pruned layers only",
        "main venv: " + ", ".join(f"{k} {v}" for k, v in meta["versions_main"].items()),
    ]
    if meta.get("versions_peer"):
        lines.append(
            "peer venv: "
            + ", ".join(f"{k} {v}" for k, v in meta["versions_peer"].items())
            + f"; SparseGPTModifier(block_size {meta['blocksize']}, dampening_frac "
            f"{meta['percdamp']}), pipeline sequential, batch_size 1"
            + (f", given the first {meta['layers']} layers" if meta["truncate"] else "")
            + "; OWL: sparsity_profile='owl', owl_m, owl_lmbda, with bench_owl.py's two fixes "
            "for 0.14 (its module docstring)"
        )
    if meta.get("rescore"):
        r = meta["rescore"]
        lines.append(
            f"same windows: {r['variant']} (seed {r['seed']}) scored {r['run']:.4f} in its run "
            f"and {r['here']:.4f} here"
        )
    for seed, wall in meta["wall_s"].items():
        peer = wall.get("peer")
        lines.append(
            f"seed {seed}: our run {wall['ours']:.0f} s (all variants, evaluation included)"
            + (f"; llm-compressor {peer:.0f} s in all (pruning only)" if peer else "")
        )
    return lines


def report(data: dict[str, Any]) -> None:
    meta, runs = data["meta"], data["runs"]
    owl_text = f"owl (m {meta['owl_m']}, λ {meta['owl_lambda']})"
    print("\n".join(meta["header"]))
    print("\n".join(meta_lines(meta)))
    print(
        "\nPerplexity (lower is better): seed mean ± sample standard deviation over the seeds "
        "(n seeds); a single seed shows its value alone\n"
    )
    print(main_table(runs, owl_text))
    print("\nPer seed:\n")
    print(seed_table(runs))
    ranges = layer_ranges(runs)
    if ranges:
        print("\nPer-layer zero fraction of the OWL models (min-max over pruned layers and seeds):")
        print("\n".join(f"- {line}" for line in [*ranges, *allocation_gaps(runs)]))
    print("\nTargets (on seed means; a diverged seed counts as infinite perplexity):")
    print("\n".join(target_lines(runs, meta["methods"])))


# Settings two result files must share for their seeds to be reported together.
COMPARABLE = (
    "model",
    "layers",
    "truncate",
    "dtype",
    "device",
    "threads",
    "methods",
    "sparsities",
    "owl_m",
    "owl_lambda",
    "blocksize",
    "percdamp",
    "dense_ppl",
    "versions_main",
    "versions_peer",
)


def merge_results(datas: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """Several runs' JSON as one: the same settings (else exit naming the differing key), each
    seed once; the meta records which file gave which seeds."""
    first = datas[0]["meta"]
    meta = json.loads(json.dumps(first))
    runs: list[dict[str, Any]] = []
    seen: dict[int, str] = {}
    for data, name in zip(datas, names, strict=True):
        other = data["meta"]
        checks = {key: (first.get(key), other.get(key)) for key in COMPARABLE}
        for key in ("source", "nsamples", "seqlen"):
            checks[f"calibration.{key}"] = (first["calibration"][key], other["calibration"][key])
        for key in ("name", "source", "windows", "seqlen", "sha", "batch_size"):
            checks[f"evaluation.{key}"] = (first["evaluation"][key], other["evaluation"][key])
        for key, (a, b) in checks.items():
            if a != b:
                sys.exit(f"bench_owl: {name} has {key} = {b!r}, {names[0]} has {a!r}")
        for run in data["runs"]:
            if seen.setdefault(run["seed"], name) != name:
                sys.exit(f"bench_owl: seed {run['seed']} is in both {seen[run['seed']]} and {name}")
        runs += data["runs"]
        if other is not first:
            meta["calibration"]["tokens_sha"].update(other["calibration"]["tokens_sha"])
            meta["wall_s"].update(other["wall_s"])
            meta["header"] += [f"({name}:)", *other["header"]]
    meta["seeds"] = sorted(seen)
    meta["command"] = "; ".join(
        f"{d['meta']['command']}  [{n}]" for d, n in zip(datas, names, strict=True)
    )
    return {"benchmark": "bench_owl", "meta": meta, "runs": runs}


# ---------------------------------------------------------------- the benchmark


def make_setup(
    args: argparse.Namespace, given: dict[str, Any], workdir: Path, peer_python: Path | None
) -> tuple[Any, Setup]:
    """Prepare the dense model once and fix what every run shares (bench_owl and bench_admm)."""
    from bench_peer import _thread_env

    from rose import config as rose_config

    prune = rose_config.from_dict(given).raw["prune"]
    info, dense_dir = prepare(args, given, workdir)
    layers = info.num_layers if args.layers == "all" else min(int(args.layers), info.num_layers)
    dtype = "float32"
    if args.device == "cuda" and info.dtype in ("float16", "bfloat16"):
        dtype = info.dtype  # what `dtype: auto` computes in on GPU
    setup = Setup(
        args=args,
        workdir=workdir,
        dense_dir=dense_dir,
        layers=layers,
        truncate=layers < info.num_layers,
        dtype=dtype,
        env=_thread_env(args.threads, args.device),
        peer_python=peer_python,
        blocksize=prune["blocksize"],
        percdamp=prune["percdamp"],
    )
    return info, setup


def run_meta(command: str, info: Any, setup: Setup, cfg: Any, scorer: Scorer) -> dict[str, Any]:
    """What a benchmark of ours and llm-compressor on one dense model records of its protocol
    (shared by bench_owl.py and bench_admm.py; their files are compared on these keys)."""
    from common import header

    a, spec = setup.args, scorer.spec
    return {
        "command": command,
        "header": header(),
        "model": {
            "source": info.source,
            "num_layers": info.num_layers,
            "parameters_m": info.parameters / 1e6,
        },
        "layers": setup.layers,
        "truncate": setup.truncate,
        "dtype": setup.dtype,
        "device": a.device,
        "threads": a.threads,
        "owl_m": a.owl_m,
        "owl_lambda": a.owl_lambda,
        "blocksize": setup.blocksize,
        "percdamp": setup.percdamp,
        "calibration": {
            "source": cfg.calibration.source.describe(),
            "nsamples": cfg.calibration.nsamples,
            "seqlen": cfg.calibration.seqlen,
            "tokens_sha": {},
        },
        "evaluation": {
            "name": spec.name,
            "source": spec.source.describe(),
            "windows": int(scorer.windows.shape[0]),
            "seqlen": int(scorer.windows.shape[1]),
            "sha": sha(scorer.windows),
            "batch_size": scorer.batch_size,
        },
        "dense_ppl": scorer.ppl(setup.dense_dir),
        "versions_main": versions(("torch", "transformers", "compressed-tensors")),
        "versions_peer": None,
    }


def prepare(args: argparse.Namespace, given: dict[str, Any], workdir: Path) -> tuple[Any, Path]:
    """The dense safetensors checkpoint, prepared once (reused from an earlier --workdir run)."""
    from rose import config as rose_config
    from rose import plan as graph
    from rose.artifacts import ArtifactError
    from rose.layout import RunLayout
    from rose.model_info import load_checked

    overrides = {"results_dir": str(workdir / "setup"), "evaluation": None}
    cfg = rose_config.from_dict(rose_config.merge(given, overrides))
    model_json = RunLayout(cfg.run_dir).model_json
    try:  # the same source, its weights unchanged since
        info = load_checked(model_json, cfg.model.source)
    except (ArtifactError, OSError):
        print(f"bench_owl: preparing {cfg.model.source} ...", file=sys.stderr)
        graph.execute(cfg, "prepare_model")
        info = load_checked(model_json, cfg.model.source)
    return info, Path(info.path)


def run_benchmark(args: argparse.Namespace, command: str) -> dict[str, Any]:
    import torch
    import yaml
    from bench_peer import ensure_peer_venv
    from common import header

    from rose import config as rose_config

    peer_python = None
    if not args.no_peer:
        peer_python = ensure_peer_venv(Path(args.peer_venv).resolve(), install=not args.no_install)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_owl: --device cuda but torch sees no CUDA device")
    torch.set_num_threads(args.threads)
    given = yaml.safe_load(Path(args.config).read_text()) or {}
    given = rose_config.merge(given, {"device": args.device})
    rose_config.from_dict(given)  # a bad config stops here, before the model is prepared

    from common import workdir as make_workdir

    workdir = make_workdir(args.workdir, "bench_owl")
    out_json = Path(args.out).resolve()
    try:
        info, setup = make_setup(args, given, workdir, peer_python)
        dense_dir = setup.dense_dir
        first = rose_config.from_dict(run_config(given, args, args.seeds[0], dense_dir, workdir))
        spec = first.evaluation.perplexity[0]
        scorer = Scorer(spec, first.evaluation.batch_size, dense_dir, args.device)
        print("bench_owl: scoring the dense model ...", file=sys.stderr)
        meta: dict[str, Any] = {
            **run_meta(command, info, setup, first, scorer),
            "methods": list(args.methods),
            "sparsities": [label(s) for s in args.sparsity],
            "seeds": list(args.seeds),
            "rescore": None,
            "wall_s": {},
        }
        data: dict[str, Any] = {"benchmark": "bench_owl", "meta": meta, "runs": []}
        for seed in args.seeds:
            data["runs"] += run_seed(setup, given, seed, scorer, meta)
            meta["header"] = header()
            write_json(out_json, data)
            print(f"bench_owl: seed {seed} done; results so far in {out_json}", file=sys.stderr)
        return data
    finally:
        if args.keep:
            print(f"bench_owl: kept {workdir}", file=sys.stderr)
        elif not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


def run_seed(
    setup: Setup, given: dict[str, Any], seed: int, scorer: Scorer, meta: dict[str, Any]
) -> list[dict[str, Any]]:
    """One seed: its tokens, our run, the checks, llm-compressor; the per-run records."""
    import torch

    cfg_dict = run_config(given, setup.args, seed, setup.dense_dir, setup.workdir)
    tokens = capture_tokens(cfg_dict, setup.workdir, seed)
    meta["calibration"]["tokens_sha"][str(seed)] = sha(tokens)
    cfg, wall = run_ours(setup, cfg_dict, f"ours-seed{seed}", "bench_owl")
    run_dir = cfg.run_dir
    if not torch.equal(read_tokens(run_dir), tokens):
        sys.exit(f"bench_owl: {run_dir} calibrated on other tokens than the seed's capture")
    records = our_records(setup, run_dir, seed, scorer)
    if meta["rescore"] is None:  # the run's evaluation and ours must see the same windows
        first = records[0]
        here = scorer.ppl(run_dir / first["variant"] / "model")
        meta["rescore"] = {
            "variant": first["variant"],
            "seed": seed,
            "run": first["ppl"],
            "here": here,
        }
        if here is None or not math.isclose(here, first["ppl"], rel_tol=RESCORE_RTOL):
            sys.exit(f"bench_owl: {first['variant']} scored {first['ppl']} in its run, {here} here")
    meta["wall_s"][str(seed)] = {"ours": round(wall, 1)}
    if setup.peer_python is not None:
        peer, meta["versions_peer"] = peer_records(setup, seed, tokens, scorer)
        meta["wall_s"][str(seed)]["peer"] = round(sum(r["wall_s"] for r in peer), 1)
        records += peer
    if not setup.args.keep:
        shutil.rmtree(run_dir, ignore_errors=True)
    return records


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_peer"]:
        peer_owl_main(argv[1:])
        return
    sys.path.insert(0, str(BENCH))
    args = parse_args(argv)
    if args.from_json:
        datas = [json.loads(Path(name).read_text()) for name in args.from_json]
        data = merge_results(datas, args.from_json) if len(datas) > 1 else datas[0]
        print(f"(printed from {', '.join(args.from_json)}; nothing was run)")
    else:
        command = shlex.join([".venv/bin/python", "benchmarks/bench_owl.py", *argv])
        data = run_benchmark(args, command)
    report(data)


if __name__ == "__main__":
    main()
