"""The production float32 path against the float64 column-by-column reference.

tests/test_core.py proves that the fast sweep *is* the reference algorithm by
running it in float64. The pipeline runs it in float32 (ROSE.md: float32 whatever
the model dtype, TF32 off), so this file bounds what float32 costs, on the same
problem shapes: `prune_weight` with the default settings (float32 ordering and
sweep) on float32 W and H, against `tests/reference.py` in float64 on the same
float32 values (so only the arithmetic differs, not the inputs).

Tolerances, and why:
- MASK_AGREEMENT = 0.99: the masks may differ only where two candidates' scores
  w^2 / Hinv_ii^2 tie to within float32 rounding (relative ~1e-6); such a near-tie
  flips one pair. At the smallest shape (2 x 64 = 128 entries) one flipped pair
  costs 1.6%, so 0.99 allows none there and a few at 9 x 576. Measured on 150
  random draws of these shapes: the masks were identical every time.
- ERROR_RTOL = 1e-4: the reconstruction error tr(D H D^T) / tr(W H W^T) is a sum
  of OBS losses; float32 rounding moves it by a few float32 ulps (measured: 6e-8
  relative at worst over the same 150 draws), and a near-tie flip swaps two
  nearly equal losses. A sweep that loses precision somewhere (e.g. Hinv rounded
  to bfloat16) moves it by ~1e-3 and fails.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import ref_rose_order, ref_sweep
from test_core import fit_width, make_problem, parse

from rose.methods import PruneSettings, prune_weight, reconstruction_error

MASK_AGREEMENT = 0.99
ERROR_RTOL = 1e-4


@pytest.mark.parametrize("spec", ["0.5", "2:4"])
@pytest.mark.parametrize(
    "method, reorder", [("rose", "always"), ("rose", "adaptive"), ("sparsegpt", "never")]
)
@settings(max_examples=4, deadline=None)
@given(
    rows=st.integers(2, 9),
    cols=st.sampled_from([64, 100, 128, 200, 576]),
    seed=st.integers(0, 10_000),
)
def test_float32_sweep_matches_the_float64_reference(method, reorder, spec, rows, cols, seed):
    sparsity, kw = parse(spec)
    cols = fit_width(cols, sparsity)
    W, H = make_problem(
        rows, cols, seed, columnar_block=(seed % 2) if cols > 256 and seed % 3 == 0 else None
    )
    W32, H32 = W.float(), H.float()
    W, H = W32.double(), H32.double()  # the reference sees exactly the float32 inputs

    fast = prune_weight(method, W32, H32, sparsity, PruneSettings(reorder=reorder))
    assert fast.weight.dtype == torch.float32
    perm, widths, _, _, reordered = ref_rose_order(W, H, reorder=reorder, **kw)
    ref_weight, ref_mask = ref_sweep(W, H, perm, widths, **kw)
    if reorder == "always":
        assert reordered and fast.ordering.reordered

    agreement = float((fast.mask == ref_mask).double().mean())
    assert agreement >= MASK_AGREEMENT, (agreement, rows, cols, spec, seed)
    # What the mask prunes is what the weights show (no OBS update refills a pruned weight).
    assert torch.equal(fast.weight == 0, fast.mask)

    err_fast = reconstruction_error(W, fast.weight, H)
    err_ref = reconstruction_error(W, ref_weight, H)
    assert err_ref > 0
    assert err_fast == pytest.approx(err_ref, rel=ERROR_RTOL), (
        err_fast,
        err_ref,
        rows,
        cols,
        spec,
        seed,
    )
