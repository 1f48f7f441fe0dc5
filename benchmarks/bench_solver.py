"""The ADMM solver's settings on real layer Hessians: layer-output error against seconds.

    .venv/bin/python -m rose run --config CONFIG --no-eval   # with keep_intermediates: true
    .venv/bin/python benchmarks/bench_solver.py --run-dir results/<run> --variant sparsegpt-0.7
        [--layers 1 4 8 11] [--sparsity 0.7 2:4] [--threads 2]

Reads the Hessians a run kept (`keep_intermediates: true`: <variant>/layer_<i>/hessians.h5,
the inputs the sequential pipeline really gave that layer) and the dense weights of the
run's prepared model, then prunes every Linear of the chosen layers with SparseGPT, ROSE
and Wanda, refits each (`<method>+admm`) under several solver settings, and runs the
`admm` method under several schedules and starts. Prints, per sparsity, a table with one
row per setting: the mean over Linears of the layer-output error tr(D H D^T)/tr(W H W^T),
its ratio to SparseGPT's on the same Linear (geometric mean), in how many Linears it is
below SparseGPT, and the seconds per Linear. This is how rose/admm.py's defaults were
chosen (docs/methods.md); perplexity is bench_admm.py's job.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

import h5py
import torch
from safetensors import safe_open

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from common import header, table  # noqa: E402

from rose.admm import AdmmSettings  # noqa: E402
from rose.methods import PruneSettings, prune_weight, reconstruction_error  # noqa: E402
from rose.sparsity import Sparsity  # noqa: E402

REFITS = {  # name -> AdmmSettings changes (refits read refit_iterations and cg_iterations)
    "cg 10 (default)": {},
    "cg 20": {"cg_iterations": 20},
    "admm 2 + cg 10": {"refit_iterations": 2},
    "admm 10 + cg 0": {"refit_iterations": 10, "cg_iterations": 0},
}
ADMMS = {  # the admm method
    "sparsegpt start, 20 it, rho 0.03 x1.3, cg 10 (default)": {},
    "sparsegpt start, 30 it, rho 0.03 x1.2, cg 10": {"iterations": 30, "rho_growth": 1.2},
    "sparsegpt start, 20 it, rho 0.1 x1.3, cg 10": {"rho": 0.1},
    "rose start, 20 it, rho 0.03 x1.3, cg 10": {"start": "rose"},
    "dense start, 20 it (ramp 15), rho 0.03 x1.3, cg 10": {"start": "dense"},
    "dense start, 20 it (ramp 15), rho 1 fixed, cg 10": {
        "start": "dense",
        "rho": 1.0,
        "rho_growth": 1.0,
    },
}


def load_layer(run_dir: Path, variant: str, layer: int):
    """{linear name: (dense weight, its Hessian)} of one layer."""
    hessians = {}
    with h5py.File(run_dir / variant / f"layer_{layer}" / "hessians.h5", "r") as fh:
        for group in fh:
            H = torch.from_numpy(fh[group][()]).to(torch.float32)
            for name in str(fh[group].attrs["linears"]).split(","):
                hessians[name] = H
    out = {}
    for path in sorted((run_dir / "model").glob("*.safetensors")):
        with safe_open(str(path), "pt") as st:
            for name, H in hessians.items():
                key = f"model.layers.{layer}.{name}.weight"
                if key in st.keys():
                    out[name] = (st.get_tensor(key).to(torch.float32), H)
    return out


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    run_dir = Path(args.run_dir)
    linears = [
        (f"{layer}.{name}", W, H)
        for layer in args.layers
        for name, (W, H) in load_layer(run_dir, args.variant, layer).items()
    ]
    print("\n".join(header()))
    print(f"run: {run_dir} ({args.variant}), layers {args.layers}, {len(linears)} Linears\n")
    for target in args.sparsity:
        sparsity = Sparsity.parse(target)
        rows: dict[str, list[tuple[float, float, float]]] = {}  # setting -> (error, base, s)

        def record(setting: str, W, H, pruned, base: float, seconds: float) -> None:
            rows.setdefault(setting, []).append((reconstruction_error(W, pruned, H), base, seconds))

        for _, W, H in linears:
            started = time.perf_counter()
            base = prune_weight("sparsegpt", W, H, sparsity)
            base_seconds = time.perf_counter() - started
            sgpt = reconstruction_error(W, base.weight, H)
            record("sparsegpt", W, H, base.weight, sgpt, base_seconds)
            for method in ("rose", "wanda"):
                started = time.perf_counter()
                result = prune_weight(method, W, H, sparsity)
                record(method, W, H, result.weight, sgpt, time.perf_counter() - started)
            for method in ("sparsegpt", "rose", "wanda"):
                for name, changes in REFITS.items():
                    settings = PruneSettings(admm=dataclasses.replace(AdmmSettings(), **changes))
                    started = time.perf_counter()
                    result = prune_weight(f"{method}+admm", W, H, sparsity, settings)
                    record(
                        f"{method}+admm: {name}",
                        W,
                        H,
                        result.weight,
                        sgpt,
                        time.perf_counter() - started,
                    )
            for name, changes in ADMMS.items():
                settings = PruneSettings(admm=dataclasses.replace(AdmmSettings(), **changes))
                started = time.perf_counter()
                result = prune_weight("admm", W, H, sparsity, settings)
                record(f"admm: {name}", W, H, result.weight, sgpt, time.perf_counter() - started)
        out = []
        for setting, values in rows.items():
            n = len(values)
            ratio = math.exp(sum(math.log(e / b) for e, b, _ in values if e > 0 and b > 0) / n)
            out.append(
                [
                    setting,
                    f"{sum(e for e, _, _ in values) / n:.4f}",
                    f"{ratio:.3f}",
                    f"{sum(e < b for e, b, _ in values)}/{n}",
                    f"{sum(s for _, _, s in values) / n:.3f}",
                ]
            )
        print(f"### sparsity {sparsity}\n")
        print(
            table(
                out,
                ["setting", "mean error", "x sparsegpt (geo)", "below sparsegpt", "s / Linear"],
            )
        )
        print()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", required=True, help="a run made with keep_intermediates: true")
    p.add_argument("--variant", required=True, help="whose kept Hessians to read")
    p.add_argument("--layers", type=int, nargs="+", default=[1, 5, 9])
    p.add_argument("--sparsity", nargs="+", default=["0.7"])
    p.add_argument("--threads", type=int, default=2)
    run(p.parse_args(argv))


if __name__ == "__main__":
    main()
