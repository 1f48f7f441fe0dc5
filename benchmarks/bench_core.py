"""Core benchmark: SparseGPT sweep and ROSE ordering on LLaMA-7B shapes, and the sweep vs a plain reference.

    python benchmarks/bench_core.py                      # 7B shapes on the default device
    python benchmarks/bench_core.py --shapes small       # quick look (CPU-friendly)
    python benchmarks/bench_core.py --device cuda --repeats 3

Target: ROSE's ordering (scores, losses, sorts, permutation) under 5% of the sweep.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "tests"))

from common import header, table  # noqa: E402

from rose.ordering import identity_order, rose_order  # noqa: E402
from rose.sparsity import Sparsity  # noqa: E402
from rose.sweep import sweep  # noqa: E402

SHAPES = {
    "7b": [(4096, 4096), (11008, 4096), (4096, 11008)],
    "small": [(1024, 1024), (2816, 1024), (1024, 2816)],
}


def problem(rows: int, cols: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """W ~ N(0, 1); H = X^T X / n from inputs with a few loud channels, like real activations."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(max(2 * cols, 4096), cols, generator=g)
    x[:, torch.randperm(cols, generator=g)[: cols // 50]] *= 20
    h = (x.T @ x) * (2 / x.shape[0])
    w = torch.randn(rows, cols, generator=g)
    return w.to(device), h.to(device)


def timed(fn, device: torch.device, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--shapes", default="7b", choices=sorted(SHAPES))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--reference", type=int, nargs="*", default=[256, 512], help="square sizes for the reference comparison")
    args = parser.parse_args()
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False

    rows = []
    for sparsity_text in ("0.5", "2:4"):
        sparsity = Sparsity.parse(sparsity_text)
        for r, c in SHAPES[args.shapes]:
            w, h = problem(r, c, device)
            order = rose_order(w, h, sparsity, 128, 0.5, "always")
            t_order = timed(lambda: rose_order(w, h, sparsity, 128, 0.5, "always"), device, args.repeats)
            t_adaptive = timed(lambda: rose_order(w, h, sparsity, 128, 0.5, "adaptive"), device, args.repeats)
            ident = identity_order(c, 128, sparsity)
            t_sgpt = timed(lambda: sweep(w, h, sparsity, ident, 0.01, 128), device, args.repeats)
            t_rose = timed(lambda: sweep(w, h, sparsity, order, 0.01, 128), device, args.repeats)
            rows.append([
                f"{r}x{c}", sparsity_text, f"{t_sgpt:.2f}", f"{t_rose:.2f}", f"{t_order * 1000:.1f}",
                f"{t_adaptive * 1000:.1f}", f"{100 * t_order / t_sgpt:.2f}%",
            ])
            print(f"done {r}x{c} {sparsity_text}", file=sys.stderr)

    from reference import ref_sweep  # slow float64 column-by-column reference (tests/)

    ref_rows = []
    for n in args.reference:
        w, h = problem(n, n, device)
        sparsity = Sparsity.parse("0.5")
        ident = identity_order(n, 128, sparsity)
        t_fast = timed(lambda: sweep(w, h, sparsity, ident, 0.01, 128), device, args.repeats)
        perm, widths = ident.permutation.tolist(), list(ident.block_widths)
        t_ref = timed(lambda: ref_sweep(w.double(), h.double(), perm, widths, fraction=0.5), device, 1)
        ref_rows.append([f"{n}x{n}", f"{t_ref:.2f}", f"{t_fast:.3f}", f"{t_ref / t_fast:.0f}x"])

    print("\n".join(header()))
    print()
    print(table(rows, ["shape (rows x cols)", "sparsity", "SparseGPT sweep s", "ROSE sweep s", "ordering ms (always)",
                       "ordering ms (adaptive)", "ordering / sweep"]))
    print()
    print(table(ref_rows, ["shape", "reference (column by column, float64) s", "sweep s", "speedup"]))


if __name__ == "__main__":
    main()
