"""Layer-wise reconstruction by ADMM on the stored Hessians (ALPS; Boža 2024).

Both uses minimise tr((W - W0) H (W - W0)^T), the layer-output error of the dense
weight W0 on the calibration inputs (H = X^T X, damped as for the sweep), over
weights W that are zero where the mask prunes:

- `refit` keeps a method's mask bit for bit and re-solves the kept weights,
  starting from the method's own weights;
- `admm_prune` also chooses the mask, by the magnitude of W + U while the
  sparsity ramps up (Boža's cubic schedule), optionally from a SparseGPT/ROSE start.

The problem is solved column-normalised (H scaled to a unit diagonal, W by
sqrt(H_jj)), which both references do for conditioning and which makes the
magnitude rule Wanda's score. Each ADMM iteration is one W-step with a Cholesky
factor of H + rho*I (refactored only when the penalty grows), a projection onto
the mask and a dual update; a conjugate-gradient refit on the final support
(ALPS's last step; with the normalisation, CG is Jacobi-preconditioned) finishes.
Memory: H (normalised in place), one factor of its size, and six weight-sized
buffers. Float32, deterministic for the same device and thread count.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from rose.ordering import smallest_mask, smallest_per_row_groups
from rose.sparsity import Sparsity, prune_count
from rose.sweep import PERCDAMP

STARTS = ("dense", "sparsegpt", "rose")  # where the `admm` method's iterations begin


@dataclass(frozen=True)
class AdmmSettings:
    """The `prune.admm:` section; defaults chosen by benchmarks/bench_solver.py (docs/methods.md)."""

    iterations: int = 20  # `admm`: mask-choosing iterations
    ramp_iterations: int = (
        15  # `admm` from dense: iterations over which sparsity reaches the target
    )
    refit_iterations: int = 2  # refit: fixed-mask ADMM iterations before the CG refit
    cg_iterations: int = 10  # conjugate-gradient iterations on the final support (both uses)
    rho: float = 0.1  # first penalty, on the unit-diagonal H
    rho_growth: float = 1.3  # penalty x this every `rho_every` iterations (ALPS's schedule)
    rho_every: int = 1
    rho_max: float = 1e4
    start: str = "dense"  # `admm` only: dense | sparsegpt | rose

    def __post_init__(self) -> None:
        for key in ("iterations", "rho_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"prune.admm.{key} must be >= 1, got {getattr(self, key)}")
        for key in ("ramp_iterations", "refit_iterations", "cg_iterations"):
            if getattr(self, key) < 0:
                raise ValueError(f"prune.admm.{key} must be >= 0, got {getattr(self, key)}")
        if not self.rho > 0:
            raise ValueError(f"prune.admm.rho must be > 0, got {self.rho}")
        if not self.rho_growth >= 1:
            raise ValueError(f"prune.admm.rho_growth must be >= 1, got {self.rho_growth}")
        if not self.rho_max >= self.rho:
            raise ValueError(f"prune.admm.rho_max must be >= rho, got {self.rho_max}")
        if self.ramp_iterations > self.iterations:
            raise ValueError(
                f"prune.admm.ramp_iterations ({self.ramp_iterations}) must not exceed "
                f"prune.admm.iterations ({self.iterations})"
            )
        if self.start not in STARTS:
            raise ValueError(
                f"prune.admm.start must be one of {', '.join(STARTS)}, got {self.start!r}"
            )


@dataclass
class SolveStats:
    """What one solve did; recorded per Linear in stats.json (`solver`)."""

    kind: str  # refit | admm
    iterations: int = 0  # ADMM iterations run
    penalties: list[float] = field(default_factory=list)  # each factorised rho, in order
    cg_iterations: int = 0
    residual: float = 0.0  # CG's final relative residual on the support
    before: float = 0.0  # normalised objective / ||W0||_H^2 at the start (refit: the method's)
    after: float = 0.0  # ... at the end
    kept_start: bool = False  # the solve ended above its start, so the start was kept
    seconds: float = 0.0

    def record(self) -> dict:
        return asdict(self)


class _Problem:
    """The normalised problem of one Linear: Hn (in place of a float32 copy of H), d, W0, B = W0 Hn."""

    def __init__(self, weight: torch.Tensor, hessian: torch.Tensor, percdamp: float) -> None:
        H = hessian.to(device=weight.device, dtype=torch.float32, copy=True)
        diag = torch.diagonal(H)
        dead = diag == 0  # inputs that are always zero: as the sweep, a unit diagonal
        diag[dead] = 1
        diag.add_(percdamp * float(diag.mean()))
        d = diag.sqrt()
        H.div_(d.unsqueeze(1)).div_(d.unsqueeze(0))
        self.H, self.d = H, d
        self.W0 = weight.to(torch.float32) * d
        self.B = self.W0 @ H
        self.scale = max(float((self.B * self.W0).sum()), torch.finfo(torch.float32).tiny)

    def objective(self, X: torch.Tensor) -> float:
        """tr((X - W0) Hn (X - W0)^T) / tr(W0 Hn W0^T)."""
        D = X - self.W0
        return float(((D @ self.H) * D).sum()) / self.scale

    def factor(self, rho: float, buffer: torch.Tensor | None) -> torch.Tensor:
        """Cholesky factor of Hn + rho*I, written over `buffer` (the previous factor)."""
        F = torch.empty_like(self.H) if buffer is None else buffer
        F.copy_(self.H)
        torch.diagonal(F).add_(rho)
        info = torch.empty((), dtype=torch.int32, device=F.device)
        torch.linalg.cholesky_ex(F, out=(F, info))
        if int(info) != 0:
            raise ValueError(f"H + {rho:g} I is not positive definite (order {int(info)})")
        return F

    def to_weight(self, X: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return (X / self.d).to(dtype)


def _cg(problem: _Problem, X: torch.Tensor, keep: torch.Tensor, iterations: int) -> float:
    """Conjugate gradients on each row's support, all rows at once; X is updated in place.

    Returns the final relative residual ||r|| / ||r0|| over all rows."""
    H, B = problem.H, problem.B
    R = (B - X @ H).masked_fill_(~keep, 0)
    rr = (R * R).sum(1)
    first = float(rr.sum())
    if iterations == 0 or first == 0:
        return 1.0 if first else 0.0
    P = R.clone()
    for _ in range(iterations):
        AP = (P @ H).masked_fill_(~keep, 0)
        pap = (P * AP).sum(1)
        alpha = torch.where(pap > 0, rr / pap, torch.zeros_like(pap)).unsqueeze(1)
        X.addcmul_(alpha, P)
        R.addcmul_(alpha, AP, value=-1.0)
        rr_next = (R * R).sum(1)
        beta = torch.where(rr > 0, rr_next / rr, torch.zeros_like(rr)).unsqueeze(1)
        P.mul_(beta).add_(R)
        rr = rr_next
    return float(rr.sum() / first) ** 0.5


MaskRule = Callable[[torch.Tensor, int], torch.Tensor]  # (W + U, iteration from 1) -> pruned


def _admm(
    problem: _Problem, Z: torch.Tensor, choose: MaskRule, iterations: int, s: AdmmSettings
) -> tuple[torch.Tensor, torch.Tensor | None, list[float]]:
    """ADMM from the sparse (or dense) iterate Z; returns Z, the last mask and the penalties."""
    rho, penalties = s.rho, [s.rho]
    F = problem.factor(rho, None)
    U = torch.zeros_like(Z)
    mask = None
    for k in range(1, iterations + 1):
        rhs = torch.add(problem.B, Z - U, alpha=rho).T
        W = torch.cholesky_solve(rhs, F).T  # (Hn + rho I) W^T = B^T + rho (Z - U)^T
        del rhs
        V = W.add_(U)
        mask = choose(V, k)
        Z = V.masked_fill(mask, 0)
        U = V.sub_(Z)  # U + W - Z
        if k < iterations and k % s.rho_every == 0 and rho < s.rho_max:
            grown = min(rho * s.rho_growth, s.rho_max)
            if grown != rho:
                U.mul_(rho / grown)  # the scaled dual follows the penalty
                rho = grown
                penalties.append(rho)
                F = problem.factor(rho, F)
    return Z, mask, penalties


def refit(
    weight: torch.Tensor,
    start: torch.Tensor,
    hessian: torch.Tensor,
    mask: torch.Tensor,
    settings: AdmmSettings | None = None,
    percdamp: float = PERCDAMP,
) -> tuple[torch.Tensor, SolveStats]:
    """Re-solve the weights `mask` keeps (False) from `start`; pruned entries stay exactly zero.

    `weight` is the dense W0 that defines the objective. The result never ends above the
    start's objective: if rounding made it so, the start is returned (`kept_start`)."""
    s = settings or AdmmSettings()
    started = time.perf_counter()
    problem = _Problem(weight, hessian, percdamp)
    keep = ~mask
    X = (start.to(torch.float32) * problem.d).masked_fill_(mask, 0)
    stats = SolveStats(kind="refit", before=problem.objective(X))
    if s.refit_iterations:
        X, _, stats.penalties = _admm(problem, X, lambda V, k: mask, s.refit_iterations, s)
        stats.iterations = s.refit_iterations
    stats.residual = _cg(problem, X, keep, s.cg_iterations)
    stats.cg_iterations = s.cg_iterations
    stats.after = problem.objective(X)
    if not stats.after <= stats.before:
        stats.kept_start, stats.after = True, stats.before
        out = start.clone()
    else:
        out = problem.to_weight(X, weight.dtype).masked_fill_(mask, 0)
    stats.seconds = _seconds(started, weight)
    return out, stats


def ramp(target: float, iteration: int, ramp_iterations: int) -> float:
    """Boža's cubic schedule: target * (1 - (1 - k/ramp)^3), the target from k = ramp on."""
    if ramp_iterations == 0 or iteration >= ramp_iterations:
        return target
    return target * (1.0 - (1.0 - iteration / ramp_iterations) ** 3)


def admm_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: Sparsity,
    settings: AdmmSettings | None = None,
    percdamp: float = PERCDAMP,
    start: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, SolveStats]:
    """Choose the mask and the weights together; returns (weight, mask, stats).

    Counts are exact: floor(p * numel) per matrix (unstructured), N of every M per row group.
    Ties go to the lower flat index. From a sparse `start` (the weight and mask of SparseGPT
    or ROSE) the target is held from the first iteration and the result is never worse than it."""
    s = settings or AdmmSettings()
    started = time.perf_counter()
    problem = _Problem(weight, hessian, percdamp)
    ramped = start is None and not sparsity.is_nm

    def choose(V: torch.Tensor, k: int) -> torch.Tensor:
        if sparsity.is_nm:
            return smallest_per_row_groups(V.abs(), sparsity.n, sparsity.m)
        fraction = ramp(sparsity.fraction, k, s.ramp_iterations) if ramped else sparsity.fraction
        return smallest_mask(V.abs(), prune_count(V.numel(), fraction))

    Z = problem.W0.clone() if start is None else start[0].to(torch.float32) * problem.d
    before = problem.objective(Z)
    Z, mask, penalties = _admm(problem, Z, choose, s.iterations, s)  # the last mask: full target
    stats = SolveStats(kind="admm", iterations=s.iterations, penalties=penalties, before=before)
    stats.residual = _cg(problem, Z, ~mask, s.cg_iterations)
    stats.cg_iterations = s.cg_iterations
    stats.after = problem.objective(Z)
    out = problem.to_weight(Z, weight.dtype).masked_fill_(mask, 0)
    if start is not None and not stats.after <= before:
        stats.kept_start, stats.after = True, before
        out, mask = start[0].clone(), start[1].clone()
    stats.seconds = _seconds(started, weight)
    return out, mask, stats


def _seconds(started: float, weight: torch.Tensor) -> float:
    if weight.is_cuda:
        torch.cuda.synchronize(weight.device)
    return time.perf_counter() - started


def solver_units(settings: AdmmSettings, refit: bool, start_sweeps: int = 0) -> float:
    """The solve's work per Linear in units of the sweep's rows*cols^2 + cols^3 (`rose plan`,
    the SLURM requests): each pass of a row block through Hn (W-step solve, CG step, the
    objectives) is 2*rows*cols^2 FLOPs, each penalty's factorisation cols^3 / 3."""
    iterations = settings.refit_iterations if refit else settings.iterations
    passes = 1 + 2 + iterations + 1 + settings.cg_iterations  # B, objectives, W-steps, CG
    factors = 0 if iterations == 0 else 1 + (iterations - 1) // settings.rho_every
    return 2 * passes + factors / 3 + start_sweeps
