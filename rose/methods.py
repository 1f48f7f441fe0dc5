"""All pruning methods behind one signature.

`prune_weight(method, weight, hessian, sparsity, settings)` is the only entry
point the pipeline uses, so adding a method means adding one function here.
A method name `<method>+admm` is that method's mask with its kept weights
re-solved by rose.admm.refit; `admm` chooses the mask by ADMM as well.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from rose.admm import AdmmSettings, SolveStats, admm_prune, refit
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
    admm: AdmmSettings = AdmmSettings()  # `prune.admm:` (refits and the admm method only)

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
    solver: SolveStats | None = None  # ADMM variants: what the solve did
    unrefitted: torch.Tensor | None = None  # refits: the method's own weights, before the refit

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


def prune_admm(weight, hessian, sparsity, settings, ordering=None) -> PruneResult:
    """Mask and weights by ADMM (rose.admm.admm_prune), from dense or a SparseGPT/ROSE start."""
    start, order, base = None, None, None
    if settings.admm.start != "dense":
        base = METHODS[settings.admm.start].prune(weight, hessian, sparsity, settings, None)
        start, order = (base.weight, base.mask), base.ordering
    pruned, mask, stats = admm_prune(
        weight, hessian, sparsity, settings.admm, settings.percdamp, start
    )
    result = PruneResult(pruned, mask, order, solver=stats)
    if base is not None:
        result.damping, result.damping_retries = base.damping, base.damping_retries
    return result


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
        Method("admm", prune_admm, needs_hessian=True),
    )
}
REFIT = "+admm"  # `<method>+admm`: the method's mask, its kept weights re-solved by ADMM
REFITTABLE = ("rose", "sparsegpt", "wanda", "magnitude")  # dense has no mask, admm solves already


@dataclass(frozen=True)
class MethodName:
    """A config's method name: the method that chooses the mask, and whether it is refitted."""

    base: str
    refit: bool = False

    @classmethod
    def parse(cls, name: str) -> MethodName:
        base, suffix, rest = name.partition(REFIT)
        if suffix and not rest and base in REFITTABLE:
            return cls(base, refit=True)
        if name in METHODS:
            return cls(name)
        if suffix and not rest and base in METHODS:
            why = "it prunes nothing" if base == "dense" else "it solves its weights already"
            raise ValueError(f"{name!r}: {base} has no refit ({why})")
        raise ValueError(f"unknown method {name!r} (choose from {', '.join(method_names())})")

    @property
    def method(self) -> Method:
        return METHODS[self.base]

    @property
    def needs_hessian(self) -> bool:
        return self.refit or self.method.needs_hessian

    @property
    def needs_order(self) -> bool:
        return self.method.needs_order

    @property
    def uses_admm(self) -> bool:
        """Whether `prune.admm` decides its weights."""
        return self.refit or self.base == "admm"

    def __str__(self) -> str:
        return self.base + (REFIT if self.refit else "")


def method_names() -> list[str]:
    """Every name `methods:` accepts (the schema's enum lists the same; a test checks)."""
    return [*METHODS, *(m + REFIT for m in REFITTABLE)]


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
    name = MethodName.parse(method)
    if not isinstance(sparsity, Sparsity):
        sparsity = Sparsity.parse(sparsity)
    settings = settings or PruneSettings()
    if name.needs_hessian and hessian is None:
        raise ValueError(f"{what}: method {method!r} needs a Hessian")
    validate(weight, hessian if name.needs_hessian else None, sparsity, what)
    started = time.perf_counter()
    with torch.no_grad():
        try:
            result = name.method.prune(weight, hessian, sparsity, settings, ordering)
            if name.refit:
                refitted, result.solver = refit(
                    weight, result.weight, hessian, result.mask, settings.admm, settings.percdamp
                )
                result.unrefitted, result.weight = result.weight, refitted
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
