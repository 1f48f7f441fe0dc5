"""Ours against llm-compressor's SparseGPTModifier: same model, same calibration tokens, same windows.

    .venv/bin/python benchmarks/bench_peer.py [--layers 10|all] [--nsamples 32 --seqlen 512]
        [--sparsity 0.5 2:4] [--methods sparsegpt rose] [--threads 1] [--device cpu|cuda]
        [--peer-given layers model] [--peer-batch-size 1] [--peer-venv .venv-peer]
        [--workdir DIR] [--keep]

Issue 15. One run, side by side, per sparsity: `python -m rose run` once per
method (a fresh results directory each, evaluation off) and llm-compressor's
`oneshot` with `SparseGPTModifier` (sequential pipeline), each in its own
process, timed wall clock from process start to the pruned model on disk, peak
RSS from the process's own VmHWM. Then every pruned model and the dense one are
scored by OUR perplexity evaluator on one tensor of evaluation windows. Prints
a markdown table under `common.header()`.

Fairness, made checkable:
- Same dense start: the model source (default `pypi:smollm2`) is prepared once,
  untimed, into a safetensors directory; our timed runs use that directory as
  `model.source` (used in place, no conversion) and llm-compressor loads it.
- Same calibration tokens: the setup samples the windows with the config's
  protocol (`capture_calibration`); those exact token ids are handed to
  llm-compressor as a pre-tokenized `datasets.Dataset` (no shuffling), and every
  timed run of ours must reproduce them bit for bit in its `calib/tokens.h5`
  (checked; the benchmark stops if not). Their sha256 is printed.
- Same layers: llm-compressor's `targets` are the names of the first N decoder
  layers (`model.layers.0` ... ), which is what `prune.layers = N` prunes here.
  Each pruned model is checked: zeros in the pruned layers' Linears, every
  other tensor identical to the dense model.
- Same hyperparameters: block 128, damping 0.01 of the mean Hessian diagonal,
  unstructured or N:M, float32 on CPU (the checkpoint's dtype on GPU for both).
- Same threads: OMP/MKL_NUM_THREADS and torch.set_num_threads(--threads) in
  both processes.

llm-compressor is never a dependency of this project: it lives in its own venv
(`--peer-venv`, default `.venv-peer/`, gitignored), created on first use with
`pip install torch==<the main venv's torch> llmcompressor==0.14.*` (pinning torch
keeps pip from pulling another build). `pip install llmcompressor` into the main
venv would downgrade transformers and compressed-tensors.

What llm-compressor is given (`--peer-given`, default both, one row each):
`layers`, a config with num_hidden_layers = N, the other layers copied from the
dense checkpoint inside its timed process; `model`, the whole model, where its
sequential pipeline also calibrates and propagates through every layer after
the first N (pruning nothing there: about half its time at 10 of 30 layers).
Both give the same pruned weights bit for bit (checked; the second is then not
evaluated again). Ratios are against the faster of the two.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PEER_LLMCOMPRESSOR = "llmcompressor==0.14.*"


# ---------------------------------------------------------------- shared helpers (both venvs)


def _peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM): ru_maxrss of a child would carry its parent's peak over fork+exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _thread_env(threads: int, device: str) -> dict[str, str]:
    env = dict(os.environ)
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "RAYON_NUM_THREADS"):
        env[key] = str(threads)
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    env["HF_DATASETS_OFFLINE"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # both tools pick an accelerator when they see one
    return env


# Our side: rose.cli.main in a process with fixed threads, reporting its own peak RSS and, when
# the CLI ran the in-process runner, the runner's own per-step timings (stage, variant, seconds).
OURS_WRAPPER = """
import json, os, sys, time
from dataclasses import asdict
started = time.perf_counter()
import torch
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
import rose.runner
timings = []
_run, _step = rose.runner.run, rose.runner._timed
def run(*args, **kwargs):
    result = _run(*args, **kwargs)
    timings.extend(asdict(t) for t in result.timings)
    return result
def step(cfg, step, result, *args, **kwargs):
    # BENCH_STEP_LOG: each finished step's timing, appended at once, so a killed run keeps it
    _step(cfg, step, result, *args, **kwargs)
    if os.environ.get("BENCH_STEP_LOG"):
        with open(os.environ["BENCH_STEP_LOG"], "a") as f:
            f.write(json.dumps(asdict(result.timings[-1])) + "\\n")
rose.runner.run, rose.runner._timed = run, step
from rose.cli import main
code = main(sys.argv[2:])
hwm = 0.0
for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):
        hwm = int(line.split()[1]) / 1024
with open(sys.argv[1], "w") as f:
    gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    json.dump({"rc": code, "rss_mb": hwm, "gpu_mb": gpu, "threads": torch.get_num_threads(),
               "inner_seconds": time.perf_counter() - started, "timings": timings}, f)
sys.exit(code)
"""


# ---------------------------------------------------------------- llm-compressor side (runs in the peer venv)


def peer_main(argv: list[str]) -> None:
    """`bench_peer.py _peer ...`: llm-compressor SparseGPT on pre-tokenized windows; writes a JSON result."""
    started = time.perf_counter()
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--tokens", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--result", required=True)
    p.add_argument("--sparsity", required=True)
    p.add_argument("--layers", type=int, required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--blocksize", type=int, default=128)
    p.add_argument("--percdamp", type=float, default=0.01)
    p.add_argument("--truncate", action="store_true", help="load only the first --layers layers")
    a = p.parse_args(argv)

    import torch

    torch.set_num_threads(a.threads)
    from importlib.metadata import version

    import datasets
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    tokens = torch.load(a.tokens, weights_only=True)
    n, seqlen = tokens.shape
    if ":" in a.sparsity:
        nn_, mm = (int(x) for x in a.sparsity.split(":"))
        sparsity, mask = nn_ / mm, a.sparsity
    else:
        sparsity, mask = float(a.sparsity), "0:0"
    dataset = datasets.Dataset.from_dict(
        {"input_ids": tokens.tolist(), "attention_mask": torch.ones_like(tokens).tolist()}
    )
    config = AutoConfig.from_pretrained(a.model)
    if a.truncate and a.layers < config.num_hidden_layers:
        # Its sequential pipeline calibrates and propagates through every layer, pruned or not;
        # the first N layers' results do not depend on the rest, so it is given only those.
        config.num_hidden_layers = a.layers
        if isinstance(getattr(config, "layer_types", None), list):
            config.layer_types = config.layer_types[: a.layers]
    model = AutoModelForCausalLM.from_pretrained(
        a.model, config=config, dtype=getattr(torch, a.dtype), use_safetensors=True
    )
    recipe = SparseGPTModifier(
        sparsity=sparsity,
        mask_structure=mask,
        targets=[f"model.layers.{i}" for i in range(a.layers)],  # the decoder layers, by exact name
        block_size=a.blocksize,
        dampening_frac=a.percdamp,
    )
    loaded = time.perf_counter()
    oneshot(
        model=model,
        tokenizer=a.model,
        dataset=dataset,
        recipe=recipe,
        pipeline="sequential",
        num_calibration_samples=n,
        max_seq_length=seqlen,
        shuffle_calibration_samples=False,
        batch_size=a.batch_size,
    )
    pruned = time.perf_counter()
    # Plain safetensors + the dense directory's config/tokenizer files: the pruned model loads in
    # the main venv's transformers with no compressed-tensors config in the way.
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.cpu().state_dict().items()}
    if a.truncate:  # the layers it was not given, from the dense checkpoint
        for f in sorted(Path(a.model).glob("*.safetensors")):
            with safe_open(str(f), "pt") as fh:
                for k in fh.keys():
                    if k not in state:
                        state[k] = fh.get_tensor(k)
    head, embed = state.get("lm_head.weight"), state.get("model.embed_tokens.weight")
    tied = model.config.tie_word_embeddings and head is not None and embed is not None
    if tied and torch.equal(head, embed):
        # as in the dense checkpoint; transformers re-ties it on load
        del state["lm_head.weight"]
    save_file(
        state,
        str(out / "model.safetensors"),
        metadata={"format": "pt"},
    )
    for f in Path(a.model).iterdir():
        if (
            f.is_file()
            and not f.name.endswith(".safetensors")
            and f.name != "model.safetensors.index.json"
        ):
            shutil.copy2(f, out / f.name)
    saved = time.perf_counter()
    result = {
        "rss_mb": _peak_rss_mb(),
        "gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        "inner_seconds": saved - started,
        "load_seconds": loaded - started,
        "oneshot_seconds": pruned - loaded,
        "save_seconds": saved - pruned,
        "threads": torch.get_num_threads(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "versions": {
            k: version(k)
            for k in ("llmcompressor", "compressed-tensors", "transformers", "torch", "datasets")
        },
    }
    Path(a.result).write_text(json.dumps(result))


# ---------------------------------------------------------------- orchestration (main venv)


def ensure_peer_venv(venv: Path, install: bool) -> Path:
    """The peer venv's python with llmcompressor importable; created and installed when missing."""
    import torch

    python = venv / "bin" / "python"
    check = [str(python), "-c", "import llmcompressor"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    if not install:
        sys.exit(
            f"bench_peer: {venv} has no llmcompressor; rerun without --no-install or install it"
        )
    base = getattr(sys, "_base_executable", None) or shutil.which("python3") or "python3"
    print(
        f"bench_peer: creating {venv} (torch=={torch.__version__}, {PEER_LLMCOMPRESSOR}); this takes minutes",
        file=sys.stderr,
    )
    subprocess.run([base, "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "-q",
            f"torch=={torch.__version__}",
            PEER_LLMCOMPRESSOR,
        ],
        check=True,
    )
    subprocess.run(check, check=True)
    return python


def _sha(t) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()[:16]


def _load_str() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.2f}/{five:.2f}"


def _timed(cmd: list[str], env: dict[str, str], log: Path) -> float:
    started = time.perf_counter()
    with open(log, "w") as fh:
        rc = subprocess.run(cmd, env=env, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - started
    if rc != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        sys.exit(
            f"bench_peer: command failed (exit {rc}): {shlex.join(cmd)}\n--- {log} (tail) ---\n{tail}"
        )
    return wall


def check_pruned(model_dir: Path, dense_dir: Path, layers: int, sparsity: str) -> str:
    """Zeros in the pruned layers' Linears (and N:M validity); everything else must equal the dense model."""
    import torch
    from safetensors import safe_open

    def tensors(d: Path) -> dict[str, tuple[Path, str]]:
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            with safe_open(str(f), "pt") as fh:
                for k in fh.keys():
                    out[k] = (f, k)
        return out

    def read(where: tuple[Path, str]):
        with safe_open(str(where[0]), "pt") as fh:
            return fh.get_tensor(where[1])

    ours, dense = tensors(model_dir), tensors(dense_dir)
    pruned_prefixes = tuple(f"model.layers.{i}." for i in range(layers))
    zeros = total = 0
    nm_ok = True
    for name, where in dense.items():
        if name not in ours:
            if name == "lm_head.weight":
                continue
            raise SystemExit(f"bench_peer: {model_dir} lacks {name}")
        w = read(ours[name])
        is_target = name.startswith(pruned_prefixes) and name.endswith("_proj.weight")
        if is_target:
            zeros += int((w == 0).sum())
            total += w.numel()
            if ":" in sparsity:
                n, m = (int(x) for x in sparsity.split(":"))
                groups = (w.reshape(w.shape[0], -1, m) == 0).sum(-1)
                nm_ok &= bool((groups >= m - n).all())
        elif not torch.equal(w.to(read(where).dtype), read(where)):
            raise SystemExit(
                f"bench_peer: {model_dir}: {name} differs from the dense model but is not pruned"
            )
    text = f"{100 * zeros / max(total, 1):.1f}%"
    return text + ("" if ":" not in sparsity else (" (N:M ok)" if nm_ok else " (N:M VIOLATED)"))


def same_tensors(a: Path, b: Path) -> bool:
    """Whether two safetensors model directories hold the same tensors, bit for bit."""
    import torch
    from safetensors import safe_open

    def index(d: Path) -> dict[str, Path]:
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            with safe_open(str(f), "pt") as fh:
                out.update(dict.fromkeys(fh.keys(), f))
        return out

    ia, ib = index(a), index(b)
    if ia.keys() != ib.keys():
        return False
    for name in ia:
        with safe_open(str(ia[name]), "pt") as fa, safe_open(str(ib[name]), "pt") as fb:
            if not torch.equal(fa.get_tensor(name), fb.get_tensor(name)):
                return False
    return True


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_peer":
        peer_main(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "config/config.yaml"))
    parser.add_argument(
        "--layers", default="10", help="prune the first N decoder layers, or 'all' (default 10)"
    )
    parser.add_argument(
        "--nsamples", type=int, default=None, help="calibration windows (default: the config's)"
    )
    parser.add_argument(
        "--seqlen", type=int, default=None, help="calibration window length (default: the config's)"
    )
    parser.add_argument("--sparsity", nargs="+", default=["0.5", "2:4"])
    parser.add_argument(
        "--methods", nargs="+", default=["sparsegpt", "rose"], choices=["sparsegpt", "rose"]
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch/OMP threads of each pruning process"
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--peer-batch-size",
        type=int,
        default=1,
        help="llm-compressor's calibration batch (its default 1)",
    )
    parser.add_argument(
        "--peer-given",
        nargs="+",
        choices=["layers", "model"],
        default=["layers", "model"],
        help="what llm-compressor is given: 'layers' = only the first --layers decoder layers (the "
        "rest spliced back from the dense checkpoint inside its timed process; same pruned weights, "
        "bit for bit), 'model' = the whole model (its pipeline then also runs the layers it does not "
        "prune). Ratios are against the faster. Default: both",
    )
    parser.add_argument("--peer-venv", default=str(REPO / ".venv-peer"))
    parser.add_argument(
        "--no-install", action="store_true", help="fail instead of creating the peer venv"
    )
    parser.add_argument(
        "--workdir", default=None, help="where runs go (default: a temporary dir under results/)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the pruned models and logs")
    args = parser.parse_args()
    command = shlex.join([".venv/bin/python", "benchmarks/bench_peer.py", *sys.argv[1:]])

    peer_python = ensure_peer_venv(Path(args.peer_venv).resolve(), install=not args.no_install)

    import torch

    sys.path.insert(0, str(REPO / "benchmarks"))
    from common import header, table

    from rose import config as rose_config
    from rose import data, evaluate
    from rose import plan as graph
    from rose.artifacts import H5Artifact
    from rose.model_info import ModelInfo

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_peer: --device cuda but torch sees no CUDA device")
    base = {"evaluation": None, "device": args.device}
    if args.layers != "all":
        base = rose_config.merge(base, {"prune": {"layers": int(args.layers)}})
    if args.nsamples:
        base = rose_config.merge(base, {"calibration": {"nsamples": args.nsamples}})
    if args.seqlen:
        base = rose_config.merge(base, {"calibration": {"seqlen": args.seqlen}})
    default_cfg = rose_config.load(args.config)  # its evaluation section names the windows
    if default_cfg.evaluation is None or not default_cfg.evaluation.perplexity:
        sys.exit(f"bench_peer: {args.config} has no perplexity evaluation to score with")

    from common import workdir as make_workdir

    workdir = make_workdir(args.workdir, "bench_peer")
    try:
        # ---- setup (untimed): the dense safetensors checkpoint and the calibration tokens
        setup = rose_config.load(
            args.config, rose_config.merge(base, {"results_dir": str(workdir / "setup")})
        )
        graph.execute(setup, "prepare_model")
        graph.execute(setup, "capture_calibration")
        info = ModelInfo.load(workdir / "setup" / setup.run / "model.json")
        dense_dir = Path(info.path)
        layers = int(args.layers) if args.layers != "all" else info.num_layers
        peer_modes = (
            ["model"] if layers == info.num_layers else list(dict.fromkeys(args.peer_given))
        )
        tokens = torch.from_numpy(
            H5Artifact(workdir / "setup" / setup.run / "calib" / "tokens.h5").read("tokens")
        ).to(torch.int64)
        tokens_file = workdir / "tokens.pt"
        torch.save(tokens, tokens_file)
        token_hash = _sha(tokens)
        dtype = "float32"
        if args.device == "cuda" and info.dtype in ("float16", "bfloat16"):
            dtype = info.dtype  # what `dtype: auto` computes in on GPU

        rows = []  # dicts
        for sparsity in args.sparsity:
            # ---- theirs
            for mode in peer_modes:
                out = workdir / f"llmcompressor-{mode}-{sparsity.replace(':', 'of')}"
                result = workdir / f"{out.name}.json"
                cmd = [
                    str(peer_python),
                    str(Path(__file__).resolve()),
                    "_peer",
                    "--model",
                    str(dense_dir),
                    "--tokens",
                    str(tokens_file),
                    "--out",
                    str(out / "model"),
                    "--result",
                    str(result),
                    "--sparsity",
                    sparsity,
                    "--layers",
                    str(layers),
                    "--threads",
                    str(args.threads),
                    "--dtype",
                    dtype,
                    "--batch-size",
                    str(args.peer_batch_size),
                    "--blocksize",
                    str(setup.raw["prune"]["blocksize"]),
                    "--percdamp",
                    str(setup.raw["prune"]["percdamp"]),
                    *(["--truncate"] if mode == "layers" else []),
                ]
                load = _load_str()
                print(
                    f"bench_peer: llm-compressor SparseGPT {sparsity} ({mode}) ...", file=sys.stderr
                )
                wall = _timed(
                    cmd, _thread_env(args.threads, args.device), workdir / f"{out.name}.log"
                )
                peer = json.loads(result.read_text())
                given = (
                    f"given {layers} layers"
                    if mode == "layers"
                    else ("given the whole model" if layers < info.num_layers else "")
                )
                rows.append(
                    dict(
                        tool="llm-compressor",
                        method=f"SparseGPTModifier{', ' + given if given else ''}",
                        sparsity=sparsity,
                        wall=wall,
                        rss=peer["rss_mb"],
                        gpu=peer.get("gpu_mb"),
                        model=out / "model",
                        load=load,
                        peer=peer,
                    )
                )
            peer_wall = min(
                r["wall"]
                for r in rows
                if r["tool"] == "llm-compressor" and r["sparsity"] == sparsity
            )
            # ---- ours, one run per method
            for method in args.methods:
                name = f"{method}-{sparsity.replace(':', 'of')}"
                overrides = rose_config.merge(
                    base,
                    {
                        "results_dir": str(workdir / "ours" / name),
                        "model": {"source": str(dense_dir)},
                        "methods": [method],
                        "sparsities": [sparsity if ":" in sparsity else float(sparsity)],
                    },
                )
                sets = [f"{k}={json.dumps(v)}" for k, v in overrides.items()]
                rjson = workdir / f"ours-{name}.json"
                cmd = [
                    sys.executable,
                    "-c",
                    OURS_WRAPPER,
                    str(rjson),
                    "run",
                    "--config",
                    args.config,
                    "--no-eval",
                    "-q",
                    *(x for s in sets for x in ("--set", s)),
                ]
                load = _load_str()
                print(f"bench_peer: rose run {name} ...", file=sys.stderr)
                wall = _timed(
                    cmd, _thread_env(args.threads, args.device), workdir / f"ours-{name}.log"
                )
                ours = json.loads(rjson.read_text())
                run_dir = workdir / "ours" / name / setup.run
                run_tokens = torch.from_numpy(
                    H5Artifact(run_dir / "calib" / "tokens.h5").read("tokens")
                ).to(torch.int64)
                if not torch.equal(run_tokens, tokens):
                    sys.exit(
                        f"bench_peer: {run_dir} calibrated on other tokens than llm-compressor was given"
                    )
                variant = rose_config.load(args.config, overrides).variants[0].name
                rows.append(
                    dict(
                        tool="rose-pipeline",
                        method=method,
                        sparsity=sparsity,
                        wall=wall,
                        rss=ours["rss_mb"],
                        gpu=ours.get("gpu_mb"),
                        model=run_dir / variant / "model",
                        load=load,
                        ratio=wall / peer_wall,
                    )
                )

        # ---- perplexity: our evaluator, one windows tensor for every model (untimed, all threads)
        torch.set_num_threads(os.cpu_count() or 1)
        spec = default_cfg.evaluation.perplexity[0]
        tokenizer = data.tokenizer_for(dense_dir)
        windows = data.eval_windows(tokenizer, spec.source, spec.seqlen, spec.max_windows)
        device = torch.device(args.device)
        protocol = {
            "source": spec.source.describe(),
            "seqlen": spec.seqlen,
            "max_windows": spec.max_windows,
        }

        def ppl(model_dir: Path) -> float:
            report = evaluate.perplexity_report(
                model_dir, spec.name, windows, default_cfg.evaluation.batch_size, device, protocol
            )
            return report["value"] if report["value"] is not None else float("nan")

        dense_ppl = ppl(dense_dir)
        first_peer: dict[str, dict] = {}
        for row in rows:
            row["zeros"] = check_pruned(row["model"], dense_dir, layers, row["sparsity"])
            twin = first_peer.get(row["sparsity"]) if row["tool"] == "llm-compressor" else None
            if twin is not None and same_tensors(row["model"], twin["model"]):
                row["ppl"] = twin["ppl"]  # bit-identical weights: the same perplexity
                row["same"] = f"weights bit-identical to {twin['method']}"
                continue
            row["ppl"] = ppl(row["model"])
            if row["tool"] == "llm-compressor":
                first_peer.setdefault(row["sparsity"], row)
        peer_ppl = {}  # the best llm-compressor perplexity per sparsity (its modes give the same weights)
        for r in rows:
            if r["tool"] == "llm-compressor":
                peer_ppl[r["sparsity"]] = min(r["ppl"], peer_ppl.get(r["sparsity"], float("inf")))

        # ---- the table
        versions_main = {}
        from importlib.metadata import PackageNotFoundError, version

        for pkg in ("torch", "transformers", "compressed-tensors"):
            try:
                versions_main[pkg] = version(pkg)
            except PackageNotFoundError:
                versions_main[pkg] = "not installed"
        peer_versions = next(r["peer"]["versions"] for r in rows if r["tool"] == "llm-compressor")
        print("\n".join(header()))
        print(f"command: {command}")
        print(
            f"model: {info.source} ({info.num_layers} layers, {info.parameters / 1e6:.0f}M parameters), "
            f"first {layers} layers pruned; calibration {tokens.shape[0]} x {tokens.shape[1]} tokens "
            f"(sha256 {token_hash}, identical for every run); {args.threads} thread(s) per pruning process, "
            f"device {args.device}, {dtype}"
        )
        print(
            f"perplexity: {spec.name} ({spec.source.describe()}), {windows.shape[0]} windows x {windows.shape[1]} "
            f"(sha256 {_sha(windows)}), rose.evaluate.perplexity for every model; dense {dense_ppl:.2f}"
        )
        print("main venv: " + ", ".join(f"{k} {v}" for k, v in versions_main.items()))
        print(
            "peer venv: "
            + ", ".join(f"{k} {v}" for k, v in peer_versions.items())
            + f"; SparseGPTModifier(block_size {setup.raw['prune']['blocksize']}, dampening_frac "
            f"{setup.raw['prune']['percdamp']}), pipeline sequential, batch_size {args.peer_batch_size}"
        )
        if "layers" in peer_modes:
            print(
                f"'given {layers} layers': llm-compressor loads a config with num_hidden_layers = "
                f"{layers} and the other layers are copied from the dense checkpoint inside its timed "
                "process (same pruned weights as given the whole model, bit for bit); 'given the whole "
                "model': its sequential pipeline also calibrates and propagates through the layers "
                "it does not prune"
            )
        print()
        cols = [
            "tool",
            "method",
            "sparsity",
            "layers",
            "wall s",
            "peak RSS MiB",
            *(["peak GPU MiB"] if args.device == "cuda" else []),
            "perplexity",
            "zeros in pruned Linears",
            "wall ours/peer",
            "target met",
            "load at start",
        ]
        out_rows = []
        for r in rows:
            if r["tool"] == "llm-compressor":
                ratio = met = ""
            else:
                ratio = f"{r['ratio']:.2f}x"
                ok = r["ratio"] <= 0.5 and r["ppl"] <= peer_ppl[r["sparsity"]]
                met = "yes" if ok else "no"
            out_rows.append(
                [
                    r["tool"],
                    r["method"],
                    r["sparsity"],
                    layers,
                    f"{r['wall']:.1f}",
                    f"{r['rss']:.0f}",
                    *([f"{r['gpu'] or 0:.0f}"] if args.device == "cuda" else []),
                    f"{r['ppl']:.2f}",
                    r["zeros"],
                    ratio,
                    met,
                    r["load"],
                ]
            )
        print(table(out_rows, cols))
        for r in rows:
            if r["tool"] == "llm-compressor":
                p = r["peer"]
                print(
                    f"\n{r['method']} {r['sparsity']}: load {p['load_seconds']:.1f} s, oneshot "
                    f"{p['oneshot_seconds']:.1f} s, save {p['save_seconds']:.1f} s (inside the process)"
                    + (f"; {r['same']}" if r.get("same") else ""),
                    end="",
                )
        print(
            "\n\ntarget: ours at most 0.5x llm-compressor's wall time at equal or better perplexity "
            "(same sparsity; against its faster run and its best perplexity); 'load at start' is "
            "the 1/5-minute load average when the run began"
        )
    finally:
        if args.keep:
            print(f"bench_peer: kept {workdir}", file=sys.stderr)
        elif not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
