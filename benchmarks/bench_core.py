"""Core benchmark: SparseGPT sweep and ROSE ordering on LLaMA-7B shapes, and the sweep vs a plain reference.

    python benchmarks/bench_core.py                      # 7B shapes on the default device
    python benchmarks/bench_core.py --shapes small       # quick look (a couple of minutes on 2 CPU cores)
    python benchmarks/bench_core.py --device cuda --repeats 3
    python benchmarks/bench_core.py --sparsity 0.5 --reference      # one sparsity, no reference comparison

Target: ROSE's ordering (scores, pre-pruning selection, losses, sorts) under 5%
of the sweep it saves from running in the wrong order. Interrupting the run
(Ctrl-C, or SIGTERM from `timeout`) still prints the rows that finished.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "tests"))

from common import header, table  # noqa: E402

from rose.ordering import identity_order, rose_order  # noqa: E402
from rose.sparsity import Sparsity  # noqa: E402
from rose.sweep import sweep  # noqa: E402

# (rows, cols) of LLaMA-7B's Linears: q/k/v/o and gate/up's transpose pairs.
SHAPES = {
    "7b": [(4096, 4096), (11008, 4096), (4096, 11008)],
    "small": [(1024, 1024), (2816, 1024), (1024, 2816)],
}
BLOCKSIZE = 128
PERCDAMP = 0.01
THRESHOLD = 0.5


class Interrupted(Exception):
    """Raised from SIGTERM so that `timeout 600 python bench_core.py` still prints what finished."""


def problem(
    rows: int, cols: int, device: torch.device, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """W ~ N(0, 1); H = 2 X^T X / n from 2*cols tokens with 2% loud channels (x20), like real activations."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(max(2 * cols, 4096), cols, generator=g, device=device)
    x[:, torch.randperm(cols, generator=g, device=device)[: cols // 50]] *= 20
    h = (x.T @ x) * (2 / x.shape[0])
    del x
    w = torch.randn(rows, cols, generator=g, device=device)
    return w, h


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Best of `repeats` wall-clock seconds, synchronising the GPU around each call."""
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


def warm_up(device: torch.device) -> None:
    """One small ordering and sweep first, so library start-up (MKL, cuBLAS, cuSOLVER) is not timed."""
    w, h = problem(256, 256, device, seed=1)
    for spec in ("0.5", "2:4"):
        sparsity = Sparsity.parse(spec)
        order = rose_order(w, h, sparsity, BLOCKSIZE, THRESHOLD, "always")
        sweep(w, h, sparsity, order, PERCDAMP, BLOCKSIZE)
    if device.type == "cuda":
        torch.cuda.synchronize()


def shape_rows(
    w: torch.Tensor,
    h: torch.Tensor,
    sparsities: list[Sparsity],
    device: torch.device,
    repeats: int,
    out: list,
) -> None:
    """Appends one row per sparsity for one (W, H), each as soon as it is measured."""
    r, c = w.shape
    for sparsity in sparsities:
        sparsity.check_width(c)
        t_always = timed(
            lambda: rose_order(w, h, sparsity, BLOCKSIZE, THRESHOLD, "always"), device, repeats
        )
        t_adaptive = timed(
            lambda: rose_order(w, h, sparsity, BLOCKSIZE, THRESHOLD, "adaptive"), device, repeats
        )
        order = rose_order(w, h, sparsity, BLOCKSIZE, THRESHOLD, "always")
        ident = identity_order(c, BLOCKSIZE, sparsity)
        t_sgpt = timed(lambda: sweep(w, h, sparsity, ident, PERCDAMP, BLOCKSIZE), device, repeats)
        t_rose = timed(lambda: sweep(w, h, sparsity, order, PERCDAMP, BLOCKSIZE), device, repeats)
        out.append(
            [
                f"{r}x{c}",
                str(sparsity),
                f"{t_sgpt:.2f}",
                f"{t_rose:.2f}",
                f"{t_always * 1000:.0f}",
                f"{t_adaptive * 1000:.0f}",
                "yes" if order.columnar else "no",
                f"{100 * t_always / t_sgpt:.1f}%",
                f"{100 * t_adaptive / t_sgpt:.1f}%",
            ]
        )
        print(
            f"done {r}x{c} {sparsity}: sweep {t_sgpt:.2f} s, ordering {t_always * 1000:.0f} ms",
            file=sys.stderr,
            flush=True,
        )


def core_rows(
    shapes: list[tuple[int, int]],
    sparsities: list[Sparsity],
    device: torch.device,
    repeats: int,
    rows: list,
) -> None:
    """Appends rows as they finish (on interruption the caller prints whatever is there)."""
    for r, c in shapes:
        started = time.perf_counter()
        w, h = problem(r, c, device)
        print(
            f"problem {r}x{c}: {time.perf_counter() - started:.1f} s to build",
            file=sys.stderr,
            flush=True,
        )
        shape_rows(w, h, sparsities, device, repeats, rows)


def reference_rows(sizes: list[int], device: torch.device, repeats: int, rows: list) -> None:
    """The float32 lazy-block sweep against tests/reference.py's float64 column-by-column one, same device."""
    from reference import ref_sweep

    sparsity = Sparsity.parse("0.5")
    for n in sizes:
        w, h = problem(n, n, device)
        ident = identity_order(n, BLOCKSIZE, sparsity)
        t_fast = timed(lambda: sweep(w, h, sparsity, ident, PERCDAMP, BLOCKSIZE), device, repeats)
        fast = sweep(w, h, sparsity, ident, PERCDAMP, BLOCKSIZE)
        perm, widths = ident.permutation.tolist(), list(ident.block_widths)
        started = time.perf_counter()
        ref_w, ref_mask = ref_sweep(
            w.double(), h.double(), perm, widths, fraction=sparsity.fraction, percdamp=PERCDAMP
        )
        if device.type == "cuda":
            torch.cuda.synchronize()
        t_ref = time.perf_counter() - started
        agree = (fast.mask.cpu() == ref_mask.cpu()).double().mean().item()
        error = (fast.weight.double().cpu() - ref_w.cpu()).abs().max().item()
        rows.append(
            [
                f"{n}x{n}",
                f"{t_ref:.2f}",
                f"{t_fast:.3f}",
                f"{t_ref / t_fast:.0f}x",
                f"{100 * agree:.3f}%",
                f"{error:.1e}",
            ]
        )
        print(f"done reference {n}x{n}: {t_ref:.1f} s", file=sys.stderr, flush=True)


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_core: --device cuda was asked for but torch sees no CUDA device")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--shapes", default="7b", choices=sorted(SHAPES))
    parser.add_argument("--repeats", type=int, default=1, help="best of N timed calls (default 1)")
    parser.add_argument(
        "--sparsity",
        nargs="+",
        default=["0.5", "2:4"],
        help="unstructured fractions and/or N:M (default 0.5 2:4)",
    )
    parser.add_argument(
        "--reference",
        type=int,
        nargs="*",
        default=[512, 1024],
        help="square sizes for the sweep vs column-by-column reference comparison; none to skip",
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)"
    )
    args = parser.parse_args()
    if args.repeats < 1:
        raise SystemExit(f"bench_core: --repeats must be at least 1, got {args.repeats}")
    try:
        sparsities = [Sparsity.parse(s) for s in args.sparsity]
    except ValueError as error:
        raise SystemExit(f"bench_core: {error}") from None
    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = False  # the pipeline's setting: fp32 matmuls stay fp32

    def stop(signum, frame):
        raise Interrupted

    signal.signal(signal.SIGTERM, stop)
    rows: list = []
    ref_rows: list = []
    stopped = ""
    try:
        warm_up(device)
        core_rows(SHAPES[args.shapes], sparsities, device, args.repeats, rows)
        reference_rows(args.reference, device, args.repeats, ref_rows)
    except (Interrupted, KeyboardInterrupt):
        stopped = "**interrupted: the tables hold only the rows that finished.**"
        print(
            "interrupted (a signal takes effect when the running torch call returns)",
            file=sys.stderr,
        )

    print("\n".join(header()))
    print(
        f"settings: blocksize {BLOCKSIZE}, percdamp {PERCDAMP}, threshold {THRESHOLD}, float32 sweep, TF32 off, best of {args.repeats}"
    )
    if stopped:
        print(stopped)
    print()
    print(
        table(
            rows,
            [
                "shape (rows x cols)",
                "sparsity",
                "SparseGPT sweep s",
                "ROSE sweep s",
                "ordering ms (always)",
                "ordering ms (adaptive)",
                "columnar",
                "ordering / sweep (always)",
                "ordering / sweep (adaptive)",
            ],
        )
    )
    if ref_rows or args.reference:
        print()
        print(
            table(
                ref_rows,
                [
                    "shape",
                    "reference s (column by column, float64)",
                    "sweep s (float32, lazy blocks)",
                    "speedup",
                    "mask agreement",
                    "max |dW|",
                ],
            )
        )
    if stopped:
        sys.exit(1)


if __name__ == "__main__":
    main()
