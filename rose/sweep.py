"""The SparseGPT sweep (OBS with lazy block updates) over a column order.

Columns are visited in sweep order; each pruned weight's error is pushed onto
the columns still to come through the upper Cholesky factor of H^-1. Updates
inside a mask block are applied column by column, updates to later columns once
per block (the "lazy" batching of IST-DASLab's `fasterprune`). The order comes
from `rose.ordering`: identity for SparseGPT, reordered for columnar ROSE layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rose.ordering import Ordering, smallest_mask, smallest_per_row_groups
from rose.sparsity import BLOCKSIZE, Sparsity, prune_count

MAX_DAMPING_RETRIES = 6
# Dampening of H: percdamp x mean(diag H) on the diagonal (SparseGPT's default).
PERCDAMP = 0.01


@dataclass
class SweepResult:
    weight: torch.Tensor  # pruned weight, original column order, input dtype
    mask: torch.Tensor  # True where pruned
    damping: float  # the percdamp that made H positive definite
    damping_retries: int


def inverse_cholesky(hessian: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, float, int]:
    """Upper Cholesky factor of (H + damp*I)^-1, raising damping until H is positive definite.

    Returns the factor, the percdamp used and the number of retries (stats log them).
    """
    diag = torch.diagonal(hessian)
    mean_diag = diag.mean()
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    damping = percdamp
    for retry in range(MAX_DAMPING_RETRIES + 1):
        lower, info = torch.linalg.cholesky_ex(hessian + (damping * mean_diag) * eye)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0 and bool(torch.isfinite(upper).all()):
                return upper, damping, retry
        damping = damping * 10 if damping > 0 else 1e-6
    raise ValueError(
        f"Hessian is not positive definite even with percdamp {damping / 10:g} "
        f"(started at {percdamp:g}); check the calibration inputs for degenerate activations"
    )


def sweep(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: Sparsity,
    order: Ordering,
    percdamp: float = PERCDAMP,
    blocksize: int = BLOCKSIZE,
    compute_dtype: torch.dtype = torch.float32,
) -> SweepResult:
    """Prune `weight` [rows, cols] with SparseGPT's OBS updates in `order`.

    Unstructured: the mask of each block (order.block_widths) is chosen once at
    the block's start, the floor(p * numel) smallest w^2 / Hinv_ii^2. N:M: at each
    group of M the N smallest per row. Lazy update blocks are `blocksize` columns
    for N:M (rounded to a multiple of M) and the mask blocks otherwise.
    """
    out_dtype = weight.dtype
    perm = order.permutation.to(weight.device)
    W = weight.to(compute_dtype)[:, perm].clone()
    H = hessian.to(device=weight.device, dtype=compute_dtype)[perm][:, perm].clone()

    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    Hinv, damping, retries = inverse_cholesky(H, percdamp)
    del H

    rows, columns = W.shape
    mask = torch.zeros(rows, columns, dtype=torch.bool, device=W.device)
    for start, end in _lazy_blocks(columns, sparsity, order, blocksize):
        W1 = W[:, start:end].clone()
        Hinv1 = Hinv[start:end, start:end]
        d = torch.diagonal(Hinv1)
        Err1 = torch.zeros_like(W1)
        if not sparsity.is_nm:
            score = W1.square() / d.square().unsqueeze(0)
            mask[:, start:end] = smallest_mask(score, prune_count(score.numel(), sparsity.fraction))
        mask1 = mask[:, start:end]
        for i in range(end - start):
            if sparsity.is_nm and i % sparsity.m == 0:
                group = slice(i, i + sparsity.m)
                score = W1[:, group].square() / d[group].square().unsqueeze(0)
                mask1[:, group] = smallest_per_row_groups(score, sparsity.n, sparsity.m)
            w = W1[:, i]
            err = w.masked_fill(~mask1[:, i], 0.0) / d[i]
            W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1.0)
            Err1[:, i] = err
        W[:, start:end] = W1.masked_fill(mask1, 0.0)
        if end < columns:
            W[:, end:].addmm_(Err1, Hinv[start:end, end:], alpha=-1.0)

    inverse = order.inverse.to(weight.device)
    return SweepResult(
        weight=W[:, inverse].to(out_dtype),
        mask=mask[:, inverse],
        damping=damping,
        damping_retries=retries,
    )


def _lazy_blocks(columns: int, sparsity: Sparsity, order: Ordering, blocksize: int):
    if not sparsity.is_nm:
        start = 0
        for width in order.block_widths:
            yield start, start + width
            start += width
        return
    width = max(sparsity.m, (blocksize // sparsity.m) * sparsity.m)
    for start in range(0, columns, width):
        yield start, min(start + width, columns)
