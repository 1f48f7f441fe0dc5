"""All pruning methods behind one signature.

`prune_weight(method, weight, hessian, sparsity, settings)` is the only entry
point the pipeline uses, so adding a method means adding one function here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from rose.ordering import (
    REORDER_MODES,
    THRESHOLD,
    NaNScoresError,
    Ordering,
    rose_order,
    scores,
    smallest_mask,
    smallest_per_row_groups,
)
from rose.sparsity import BLOCKSIZE, Sparsity, prune_count
from rose.sweep import PERCDAMP, sweep


@dataclass(frozen=True)
class PruneSettings:
    """The `prune:` settings every method reads; these defaults are the config's."""

    blocksize: int = BLOCKSIZE
    percdamp: float = PERCDAMP
    threshold: float = THRESHOLD
    reorder: str = REORDER_MODES[0]  # adaptive | always | never (ROSE only)
    compute_dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if self.blocksize < 1:
            raise ValueError(f"blocksize must be positive, got {self.blocksize}")
        if not (self.percdamp >= 0):
            raise ValueError(f"percdamp must be >= 0, got {self.percdamp}")


@dataclass
class PruneResult:
    weight: torch.Tensor  # pruned, same dtype and device as the input
    mask: torch.Tensor  # True where pruned by the method
    ordering: Ordering | None  # ROSE diagnostics (also computed for SparseGPT)
    damping: float | None = None
    damping_retries: int = 0
    seconds: float = 0.0

    @property
    def sparsity(self) -> float:
        return float((self.weight == 0).float().mean())


def reconstruction_error(
    original: torch.Tensor, pruned: torch.Tensor, hessian: torch.Tensor
) -> float:
    """Layer output error tr(D H D^T) / tr(W H W^T), D = pruned - original."""
    W = original.double()
    D = pruned.double() - W
    H = hessian.double().to(W.device)
    denominator = float(((W @ H) * W).sum())
    if denominator <= 0:
        return 0.0
    return float(((D @ H) * D).sum()) / denominator


def validate(
    weight: torch.Tensor, hessian: torch.Tensor | None, sparsity: Sparsity, what: str
) -> None:
    if weight.ndim != 2:
        raise ValueError(f"{what}: weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    sparsity.check_width(weight.shape[1], what)
    if not bool(torch.isfinite(weight).all()):
        raise ValueError(f"{what}: weight contains NaN or Inf")
    if hessian is not None:
        cols = weight.shape[1]
        if tuple(hessian.shape) != (cols, cols):
            raise ValueError(
                f"{what}: Hessian shape {tuple(hessian.shape)} does not match weight input width {cols}"
            )
        if not bool(torch.isfinite(hessian).all()):
            raise ValueError(f"{what}: Hessian contains NaN or Inf")


def _sparsegpt(weight, hessian, sparsity, settings, order: Ordering) -> PruneResult:
    result = sweep(
        weight,
        hessian,
        sparsity,
        order,
        percdamp=settings.percdamp,
        blocksize=settings.blocksize,
        compute_dtype=settings.compute_dtype,
    )
    return PruneResult(result.weight, result.mask, order, result.damping, result.damping_retries)


def prune_rose(weight, hessian, sparsity, settings, ordering=None) -> PruneResult:
    if ordering is None:
        ordering = rose_order(
            weight, hessian, sparsity, settings.blocksize, settings.threshold, settings.reorder
        )
    return _sparsegpt(weight, hessian, sparsity, settings, ordering)


def prune_sparsegpt(weight, hessian, sparsity, settings, ordering=None) -> PruneResult:
    # The diagnostics are computed anyway (cheap) so reports can show which
    # layers ROSE would have reordered; the sweep itself uses the identity.
    if ordering is None:
        ordering = rose_order(
            weight, hessian, sparsity, settings.blocksize, settings.threshold, "never"
        )
    if ordering.reordered:
        raise ValueError("sparsegpt sweeps in the original order; got a reordered Ordering")
    return _sparsegpt(weight, hessian, sparsity, settings, ordering)


def _mask_by(values: torch.Tensor, sparsity: Sparsity, per_row: bool) -> torch.Tensor:
    if sparsity.is_nm:
        return smallest_per_row_groups(values, sparsity.n, sparsity.m)
    if not per_row:
        return smallest_mask(values, prune_count(values.numel(), sparsity.fraction))
    return smallest_mask(values, prune_count(values.shape[1], sparsity.fraction), dim=1)


def prune_wanda(weight, hessian, sparsity, settings, ordering=None) -> PruneResult:
    """Zero, per output row, the smallest |W_ij| * sqrt(H_jj); no weight update."""
    mask = _mask_by(scores(weight, torch.diagonal(hessian)), sparsity, per_row=True)
    return PruneResult(weight.masked_fill(mask, 0), mask, None)


def prune_magnitude(weight, hessian, sparsity, settings, ordering=None) -> PruneResult:
    """Zero the smallest |W_ij| of the whole matrix (N:M: per group of M)."""
    mask = _mask_by(weight.double().abs(), sparsity, per_row=False)
    return PruneResult(weight.masked_fill(mask, 0), mask, None)


def prune_dense(weight, hessian, sparsity, settings, ordering=None) -> PruneResult:
    return PruneResult(weight.clone(), torch.zeros_like(weight, dtype=torch.bool), None)


PruneFn = Callable[..., PruneResult]


@dataclass(frozen=True)
class Method:
    """One pruning method and what its layer chain needs."""

    name: str
    prune: PruneFn
    needs_hessian: bool = False  # the chain computes Hessians (and so each layer's inputs)
    # the chain has an `order` stage (SparseGPT: the identity order, kept for the plots)
    needs_order: bool = False


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("rose", prune_rose, needs_hessian=True, needs_order=True),
        Method("sparsegpt", prune_sparsegpt, needs_hessian=True, needs_order=True),
        Method("wanda", prune_wanda, needs_hessian=True),
        Method("magnitude", prune_magnitude),
        Method("dense", prune_dense),
    )
}


def prune_weight(
    method: str,
    weight: torch.Tensor,
    hessian: torch.Tensor | None,
    sparsity: Sparsity | str | float,
    settings: PruneSettings | None = None,
    what: str = "weight",
    ordering: Ordering | None = None,
) -> PruneResult:
    """Prune one Linear's weight [out, in] with `method`; `what` names it in errors.

    `ordering` (rose, sparsegpt) reuses a sweep order computed earlier, e.g. the
    pipeline's order stage; otherwise it is computed here.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r} (choose from {', '.join(METHODS)})")
    if not isinstance(sparsity, Sparsity):
        sparsity = Sparsity.parse(sparsity)
    settings = settings or PruneSettings()
    spec = METHODS[method]
    if spec.needs_hessian and hessian is None:
        raise ValueError(f"{what}: method {method!r} needs a Hessian")
    validate(weight, hessian if spec.needs_hessian else None, sparsity, what)
    started = time.perf_counter()
    with torch.no_grad():
        try:
            result = spec.prune(weight, hessian, sparsity, settings, ordering)
        except NaNScoresError as exc:
            raise ValueError(f"{what}: {exc} (method {method}, sparsity {sparsity})") from None
    if weight.is_cuda:
        torch.cuda.synchronize(weight.device)
    result.seconds = time.perf_counter() - started
    if not bool(torch.isfinite(result.weight).all()):
        raise ValueError(
            f"{what}: pruning produced NaN or Inf (method {method}, sparsity {sparsity})"
        )
    return result
