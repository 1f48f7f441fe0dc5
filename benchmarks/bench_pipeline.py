"""Pipeline benchmarks: where a run's time goes, the workflow's overhead, memory against depth.

    python benchmarks/bench_pipeline.py stages   [--config config/config.yaml] [--set k=v ...]
    python benchmarks/bench_pipeline.py overhead [--config config/config.yaml] [--set k=v ...]
    python benchmarks/bench_pipeline.py memory   [--hidden 1024 --intermediate 2816 --depths 4 16]
    python benchmarks/bench_pipeline.py dag      [--layers 80]   # the paper sweep's DAG: dry run, resume
    python benchmarks/bench_pipeline.py handoff  [--synthetic small --layers 4] [--set k=v ...]
    python benchmarks/bench_pipeline.py stages --synthetic llama7b --layers 4 --set calibration.nsamples=128 ...

Each prints a markdown table under a header naming the machine, device and versions.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "tests"))

from common import header, table  # noqa: E402

from rose import checkpoint as ck  # noqa: E402
from rose import config as rose_config  # noqa: E402
from rose import plan as graph  # noqa: E402
from rose import runner  # noqa: E402
from rose.layout import RunLayout  # noqa: E402
from rose.model_info import ModelInfo  # noqa: E402

SHAPES = {
    "llama7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
    ),
    "small": dict(
        hidden_size=1024,
        intermediate_size=2816,
        num_attention_heads=16,
        num_key_value_heads=4,
        vocab_size=32000,
    ),
}


def synthetic_model(path: Path, layers: int, dtype: torch.dtype, seed: int = 0, **shape) -> Path:
    """A random LLaMA-shaped checkpoint written tensor by tensor (never the whole model in memory)."""
    from tiny import tiny_tokenizer  # word-level tokenizer over w0..wN, no download
    from transformers import LlamaConfig

    config = LlamaConfig(
        num_hidden_layers=layers, max_position_embeddings=4096, tie_word_embeddings=False, **shape
    )
    path.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(path)
    h, i = config.hidden_size, config.intermediate_size
    kv = h // config.num_attention_heads * config.num_key_value_heads
    specs = [ck.TensorSpec("model.embed_tokens.weight", dtype, (config.vocab_size, h))]
    for n in range(layers):
        p = f"model.layers.{n}."
        specs += [
            ck.TensorSpec(p + "input_layernorm.weight", dtype, (h,)),
            ck.TensorSpec(p + "post_attention_layernorm.weight", dtype, (h,)),
            ck.TensorSpec(p + "self_attn.q_proj.weight", dtype, (h, h)),
            ck.TensorSpec(p + "self_attn.k_proj.weight", dtype, (kv, h)),
            ck.TensorSpec(p + "self_attn.v_proj.weight", dtype, (kv, h)),
            ck.TensorSpec(p + "self_attn.o_proj.weight", dtype, (h, h)),
            ck.TensorSpec(p + "mlp.gate_proj.weight", dtype, (i, h)),
            ck.TensorSpec(p + "mlp.up_proj.weight", dtype, (i, h)),
            ck.TensorSpec(p + "mlp.down_proj.weight", dtype, (h, i)),
        ]
    specs += [
        ck.TensorSpec("model.norm.weight", dtype, (h,)),
        ck.TensorSpec("lm_head.weight", dtype, (config.vocab_size, h)),
    ]
    generator = torch.Generator().manual_seed(seed)

    def tensors():
        for spec in specs:
            if spec.name.endswith("norm.weight"):
                yield spec.name, torch.ones(spec.shape, dtype=dtype)
            else:
                fan_in = spec.shape[-1]
                yield (
                    spec.name,
                    (torch.randn(spec.shape, generator=generator) / fan_in**0.5).to(dtype),
                )

    ck.save_sharded(path, specs, tensors(), metadata={"format": "pt"}, shard_bytes=1 << 30)
    tiny_tokenizer(config.vocab_size).save_pretrained(path)
    return path


def load_config(args, results: Path, model: Path | None = None):
    overrides: dict = {"results_dir": str(results)}
    for item in args.set:
        overrides = rose_config.merge(overrides, rose_config.parse_override(item))
    if model is not None:
        text = results / "text.txt"
        text.parent.mkdir(parents=True, exist_ok=True)
        words = torch.randint(3, 30000, (400_000,), generator=torch.Generator().manual_seed(1))
        text.write_text(" ".join(f"w{int(w)}" for w in words))
        overrides = rose_config.merge(
            overrides,
            {
                "model": {"source": str(model)},
                "calibration": {"source": {"kind": "file", "path": str(text)}},
            },
        )
    return rose_config.load(args.config, overrides)


def cmd_stages(args) -> None:
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        model = None
        if args.synthetic:
            dtype = torch.float16 if torch.cuda.is_available() else torch.float32
            model = synthetic_model(tmp / "model", args.layers, dtype, **SHAPES[args.synthetic])
        cfg = load_config(args, tmp / "results", model)
        started = time.perf_counter()
        result = runner.run(cfg, evaluate=not args.no_eval, report=False)
        wall = time.perf_counter() - started
        layout = RunLayout(cfg.run_dir)
        sweep_seconds = defaultdict(float)
        for variant in cfg.variants:
            for stats in sorted((cfg.run_dir / variant.name).glob("layer_*/stats.json")):
                sweep_seconds[variant.name] += sum(
                    e["seconds"] for e in json.loads(stats.read_text())["linears"].values()
                )
        by_stage: dict[str, list[float]] = defaultdict(list)
        for t in result.timings:
            by_stage[t.stage].append(t.seconds)
        rows = []
        for stage, values in by_stage.items():
            rows.append(
                [
                    stage,
                    len(values),
                    f"{sum(values):.1f}",
                    f"{sum(values) / len(values):.2f}",
                    f"{100 * sum(values) / wall:.1f}%",
                ]
            )
        total_sweep = sum(sweep_seconds.values())
        prune_total = sum(by_stage.get("prune", [0.0]))
        rows.append(
            [
                "  of which sweep (inside prune)",
                "",
                f"{total_sweep:.1f}",
                "",
                f"{100 * total_sweep / wall:.1f}%",
            ]
        )
        rows.append(
            [
                "  of which I/O + other (prune)",
                "",
                f"{prune_total - total_sweep:.1f}",
                "",
                f"{100 * (prune_total - total_sweep) / wall:.1f}%",
            ]
        )
        rows.append(["total (wall)", "", f"{wall:.1f}", "", "100%"])
        print("\n".join(header()))
        info = ModelInfo.load(layout.model_json)
        print(
            f"\nmodel: {info.source} ({info.num_layers} layers, hidden {info.hidden_size}), "
            f"calibration {cfg.calibration.nsamples} x {cfg.calibration.seqlen}, variants {', '.join(v.name for v in cfg.variants)}\n"
        )
        print(table(rows, ["stage", "jobs", "seconds", "s/job", "share"]))
        layers = sorted({t.layer for t in result.timings if t.layer is not None})
        if layers:
            per_layer = defaultdict(float)
            for t in result.timings:
                if t.layer is not None:
                    per_layer[(t.stage, t.layer)] += t.seconds
            stage_names = [s for s in ("hessians", "order", "prune", "forward") if s in by_stage]
            rows = [
                [layer, *(f"{per_layer[(s, layer)]:.2f}" for s in stage_names)]
                for layer in layers[: args.show_layers]
            ]
            print("\nper layer (all variants summed):\n")
            print(table(rows, ["layer", *stage_names]))
        if torch.cuda.is_available():
            print(f"\npeak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
        print(f"peak host RSS: {peak_rss_mb() / 1024:.2f} GiB")


def cmd_overhead(args) -> None:
    """Snakemake (jobs as threads) against the in-process runner, same config, fresh directories."""
    times = {}
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        for name in ("runner", "snakemake"):
            results = tmp / name
            cfg = load_config(args, results)
            configfile = tmp / f"{name}.yaml"
            raw = dict(cfg.raw)
            configfile.write_text(json.dumps(raw, default=str))
            started = time.perf_counter()
            if name == "runner":
                subprocess.run(
                    [sys.executable, "-m", "rose", "run", "--config", str(configfile), "-q"],
                    check=True,
                    cwd=REPO,
                )
            else:
                subprocess.run(
                    [
                        str(Path(sys.executable).with_name("snakemake")),
                        "--profile",
                        str(REPO / "workflow/profiles/workstation"),
                        "--snakefile",
                        str(REPO / "Snakefile"),
                        "--directory",
                        str(tmp / "wd"),
                        "--configfile",
                        str(configfile),
                        "--cores",
                        str(args.cores),
                        "-q",
                    ],
                    check=True,
                    cwd=REPO,
                    stdout=subprocess.DEVNULL,
                )
            times[name] = time.perf_counter() - started
            shutil.rmtree(results, ignore_errors=True)
    print("\n".join(header()))
    print()
    print(
        table(
            [[k, f"{v:.1f}"] for k, v in times.items()]
            + [["ratio", f"{times['snakemake'] / times['runner']:.2f}x"]],
            ["how", "wall seconds"],
        )
    )


def peak_rss_mb() -> float:
    """This process image's peak RSS (VmHWM; ru_maxrss would carry the parent's peak over fork+exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


STAGE_CALLS = ("embed_calibration", "hessians", "order", "prune", "forward", "assemble")


def _run_one_stage(cfg_path: str, stage: str, layer: int) -> None:
    """Child process: run one stage for `layer` of rose-0.5 and print its peak RSS / GPU memory."""
    cfg = rose_config.load(cfg_path)
    v = "rose-0.5"
    at = {"variant": v, "layer": layer}
    wildcards = {
        "embed_calibration": {},
        "forward": {"variant": v, "layer": layer + 1},
        "assemble": {"variant": v},
    }
    graph.execute(cfg, stage, wildcards.get(stage, at))
    gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0
    print(json.dumps({"rss_mb": peak_rss_mb(), "gpu_mb": gpu}))


def cmd_memory(args) -> None:
    rows = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        peaks: dict[int, dict[str, dict]] = {}
        for depth in args.depths:
            dtype = torch.float16 if torch.cuda.is_available() else torch.float32
            model = synthetic_model(
                tmp / f"model{depth}",
                depth,
                dtype,
                hidden_size=args.hidden,
                intermediate_size=args.intermediate,
                num_attention_heads=16,
                num_key_value_heads=4,
                vocab_size=32000,
            )
            args.set = [
                *args.set,
                "methods=[rose]",
                "sparsities=[0.5]",
                "keep_intermediates=true",
                "evaluation=null",
                f"run=depth{depth}",
            ]
            cfg = load_config(args, tmp / "results", model)
            runner.run(cfg, evaluate=False, report=False)
            cfg_path = tmp / f"depth{depth}.yaml"
            cfg_path.write_text(json.dumps(cfg.raw, default=str))
            L = RunLayout(cfg.run_dir)
            layer = depth // 2
            removals = {
                "embed_calibration": [L.inputs("rose-0.5", 0)],
                "hessians": [L.hessians("rose-0.5", layer)],
                "order": [L.order("rose-0.5", layer)],
                "prune": [L.pruned("rose-0.5", layer), L.stats("rose-0.5", layer)],
                "forward": [L.inputs("rose-0.5", layer + 1)],
                "assemble": [L.model_dir("rose-0.5")],
            }
            peaks[depth] = {}
            for stage in STAGE_CALLS:
                for path in removals[stage]:
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
                out = subprocess.run(
                    [sys.executable, __file__, "_stage", str(cfg_path), stage, str(layer)],
                    check=True,
                    capture_output=True,
                    text=True,
                    cwd=REPO,
                )
                peaks[depth][stage] = json.loads(out.stdout.strip().splitlines()[-1])
        for stage in STAGE_CALLS:
            values = [peaks[d][stage] for d in args.depths]
            rss = [v["rss_mb"] for v in values]
            gpu = [v["gpu_mb"] for v in values]
            ratio = max(rss) / min(rss)
            rows.append(
                [stage, *(f"{r:.0f}" for r in rss), *(f"{g:.0f}" for g in gpu), f"{ratio:.2f}"]
            )
    print("\n".join(header()))
    print(
        f"\nsynthetic LLaMA, hidden {args.hidden}, intermediate {args.intermediate}; one layer = "
        f"{(4 * args.hidden**2 + 3 * args.hidden * args.intermediate) * 4 / 2**20:.0f} MiB in fp32\n"
    )
    cols = [
        "stage",
        *(f"RSS MiB @{d}" for d in args.depths),
        *(f"GPU MiB @{d}" for d in args.depths),
        "max/min RSS",
    ]
    print(table(rows, cols))


def _touch_outputs(plan: graph.Plan, fraction: float) -> int:
    """Mark the first `fraction` of every variant's layer chain as done (empty files): a resume."""
    done = 0
    for variant in plan.variants:
        steps = [s for s in plan.variant_steps(variant) if s.stage != "assemble"]
        for step in steps[: int(len(steps) * fraction)]:
            for path in step.outputs.values():
                path.parent.mkdir(parents=True, exist_ok=True)
                path.touch()
            done += 1
    return done


def cmd_dag(args) -> None:
    """How long Snakemake takes before any work on the paper's sweep (20 variants) of a model
    with the real layer count and tiny widths: a fresh dry run, and a resume halfway."""
    from pipeline_utils import SNAKEMAKE, write_config
    from tiny import make_tiny_model, tiny_text

    rows = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        model = make_tiny_model(
            tmp / "model",
            hidden_size=64,
            intermediate_size=128,
            num_layers=args.layers,
            num_heads=4,
        )
        (tmp / "text.txt").write_text(tiny_text())
        cfg_path = write_config(
            tmp / "config.yaml",
            model,
            tmp / "text.txt",
            tmp / "results",
            methods=["rose", "sparsegpt", "wanda", "magnitude"],
            sparsities=[0.5, 0.6, 0.7, 0.8, "2:4"],
        )
        cfg = rose_config.load(cfg_path)
        base = [
            SNAKEMAKE,
            "--snakefile",
            str(REPO / "Snakefile"),
            "--directory",
            str(tmp),
            "--configfile",
            str(cfg_path),
            "--cores",
            "2",
            "--quiet",
            "rules",
        ]
        # prepare_model is a checkpoint: the DAG is known once model.json exists
        subprocess.run(
            [*base[:-2], str(RunLayout(cfg.run_dir).model_json)], check=True, capture_output=True
        )
        plan = graph.Plan(cfg, ModelInfo.load(RunLayout(cfg.run_dir).model_json))
        jobs = len(plan.steps())
        for label, fraction in (
            ("fresh dry run", 0.0),
            ("resume dry run, half the layers done", 0.5),
        ):
            done = _touch_outputs(plan, fraction) if fraction else 0
            started = time.perf_counter()
            out = subprocess.run([*base, "-n"], capture_output=True, text=True)
            seconds = time.perf_counter() - started
            if out.returncode != 0:
                raise SystemExit(out.stderr[-2000:])
            rows.append([label, str(args.layers), str(jobs), str(done), f"{seconds:.1f}"])
    print("\n".join(header()))
    print()
    print(
        table(
            rows,
            ["case", "layers", "jobs in the plan", "steps already done", "seconds to the job list"],
        )
    )


def _pruned_digests(run_dir: Path) -> dict[str, str]:
    import hashlib

    return {
        str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run_dir.glob("*/layer_*/pruned.safetensors"))
    }


def cmd_handoff(args) -> None:
    """Artifact bytes per layer with the in-process handoff off and on: same config, fresh
    directories, no evaluation; the pruned layers must be byte-identical."""
    mib = 2**20
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        model = None
        if args.synthetic:
            model = synthetic_model(
                tmp / "model", args.layers, torch.float32, **SHAPES[args.synthetic]
            )
        runs = {}
        for setting in (0, "auto"):
            args_set = [*args.set, f"handoff_memory={setting}"]
            cfg = load_config(
                argparse.Namespace(config=args.config, set=args_set), tmp / f"r{setting}", model
            )
            started = time.perf_counter()
            result = runner.run(cfg, evaluate=False, report=False)
            runs[setting] = (result, time.perf_counter() - started, cfg)
        (off, off_wall, cfg), (on, on_wall, cfg_on) = runs[0], runs["auto"]
        identical = _pruned_digests(cfg.run_dir) == _pruned_digests(cfg_on.run_dir)
        info = ModelInfo.load(RunLayout(cfg.run_dir).model_json)
    chain = ("hessians", "order", "prune", "forward")

    def per_layer(result) -> dict[int, list[int]]:
        out: dict[int, list[int]] = defaultdict(lambda: [0, 0, 0])
        for t in result.timings:
            if t.stage in chain and t.layer is not None:
                layer = t.layer - 1 if t.stage == "forward" else t.layer  # forward L -> L+1
                out[layer][0] += t.bytes_written
                out[layer][1] += t.bytes_read
                out[layer][2] += t.bytes_from_memory
        return out

    before, after = per_layer(off), per_layer(on)
    rows = [
        [
            layer,
            f"{before[layer][0] / mib:.1f}",
            f"{before[layer][1] / mib:.1f}",
            f"{after[layer][1] / mib:.1f}",
            f"{after[layer][2] / mib:.1f}",
        ]
        for layer in sorted(before)[: args.show_layers]
    ]
    print("\n".join(header()))
    print(
        f"\nmodel: {info.source} ({info.num_layers} layers, hidden {info.hidden_size}), "
        f"calibration {cfg.calibration.nsamples} x {cfg.calibration.seqlen}, "
        f"variants {', '.join(v.name for v in cfg.variants)}, "
        f"handoff_memory auto = {on.handoff_budget / 2**30:.1f} GiB\n"
    )
    print("per layer, every variant summed (hessians + order + prune + forward), MiB:\n")
    print(
        table(
            rows,
            ["layer", "written", "read from disk, off", "read from disk, on", "from memory, on"],
        )
    )
    rows = []
    for stage in chain:
        steps_off = [t for t in off.timings if t.stage == stage]
        steps_on = [t for t in on.timings if t.stage == stage]
        if not steps_off:
            continue
        rows.append(
            [
                stage,
                len(steps_off),
                f"{sum(t.bytes_read for t in steps_off) / mib:.1f}",
                f"{sum(t.bytes_read for t in steps_on) / mib:.1f}",
                f"{sum(t.seconds for t in steps_off):.1f}",
                f"{sum(t.seconds for t in steps_on):.1f}",
            ]
        )
    print("\nper stage, the whole run:\n")
    print(
        table(
            rows,
            ["stage", "steps", "MiB read, off", "MiB read, on", "seconds, off", "seconds, on"],
        )
    )
    totals_off, totals_on = off.io_totals(), on.io_totals()
    print(
        f"\nwhole run: written {totals_off['bytes_written'] / mib:.0f} MiB either way; "
        f"read from disk {totals_off['bytes_read'] / mib:.0f} MiB off, "
        f"{totals_on['bytes_read'] / mib:.0f} MiB on; wall {off_wall:.1f} s off, {on_wall:.1f} s on"
    )
    print(f"pruned layers byte-identical: {'yes' if identical else 'NO'}")
    if not identical:
        sys.exit(1)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_stage":
        _run_one_stage(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["stages", "overhead", "memory", "dag", "handoff"])
    parser.add_argument("--config", default=str(REPO / "config/config.yaml"))
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--synthetic", choices=sorted(SHAPES))
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--no-eval", action="store_true")
    parser.add_argument("--show-layers", type=int, default=4)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 16])
    parser.add_argument(
        "--workdir", default=None, help="where temporary runs go (default: system temp)"
    )
    args = parser.parse_args()
    commands = {
        "stages": cmd_stages,
        "overhead": cmd_overhead,
        "memory": cmd_memory,
        "dag": cmd_dag,
        "handoff": cmd_handoff,
    }
    commands[args.what](args)


if __name__ == "__main__":
    main()
