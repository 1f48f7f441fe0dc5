"""Per-layer sparsity: uniform, OWL (outlier-weighed, Yin et al. 2024), or a given list.

At 60-80% sparsity a uniform fraction spends the budget where it hurts: layers
whose activations carry many outliers lose more. OWL measures, per decoder
layer, the share of weights whose Wanda score |W_ij| * ||X_j|| exceeds m times
the layer's mean score (X: the dense model's inputs), and gives such layers a
lower sparsity, keeping the model's mean at the target.

Only the arithmetic lives here (no I/O): `rose.stages.allocation` feeds it the
statistics the dense pass wrote and records the result in allocation.json.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

UNIFORM = "uniform"
OWL = "owl"
LAYERS = "layers"
# Tolerance of the parameter-weighted mean against the target (absolute, on fractions).
MEAN_TOLERANCE = 1e-3


class AllocationError(ValueError):
    """A per-layer allocation cannot be made; the message names the config key."""


@dataclass(frozen=True)
class Allocation:
    """One `allocation:` entry. `name` appears in variant names (`rose-owl-0.7`)."""

    kind: str = UNIFORM
    name: str = UNIFORM
    m: float = 5.0  # owl: outlier threshold, a multiple of the layer's mean score
    lam: float = 0.08  # owl: layer sparsities span at most 2 * lambda
    fractions: tuple[float, ...] = ()  # layers: one sparsity per pruned decoder layer
    sparsities: tuple[float, ...] = ()  # owl: its own targets (empty: the config's sparsities)
    key: str = "allocation"  # where it sits in the config, for error messages

    @property
    def is_uniform(self) -> bool:
        return self.kind == UNIFORM

    def settings(self) -> dict:
        """What decides the fractions (recorded in provenance, allocation.json, pruning.json)."""
        if self.kind == OWL:
            return {"kind": OWL, "name": self.name, "m": self.m, "lambda": self.lam}
        if self.kind == LAYERS:
            return {"kind": LAYERS, "name": self.name, "fractions": list(self.fractions)}
        return {"kind": UNIFORM}


def outlier_density(
    weights: Sequence[torch.Tensor], input_norms: Sequence[torch.Tensor], m: float
) -> float:
    """Share of a layer's weights whose score |W_ij| * ||X_j|| exceeds m x the layer's mean score.

    `weights[k]` is [out, in] and `input_norms[k]` its [in] input-column norms; the mean
    is over every weight of the layer, as OWL defines it. Two passes, one matrix at a time.
    """
    total, count = 0.0, 0
    for weight, norms in zip(weights, input_norms, strict=True):
        total += float((weight.double().abs() * norms.double()).sum())
        count += weight.numel()
    if count == 0:
        return 0.0
    threshold = m * total / count
    above = 0
    for weight, norms in zip(weights, input_norms, strict=True):
        above += int(((weight.double().abs() * norms.double()) > threshold).sum())
    return above / count


def owl_sparsities(
    densities: Sequence[float],
    parameters: Sequence[int],
    target: float,
    lam: float,
    key: str = "allocation",
) -> list[float]:
    """Layer sparsities from outlier densities: min-max scaled into [0, 2 lambda], shifted so
    the parameter-weighted mean kept fraction is 1 - target; sparsity = 1 - that.

    Weighting by parameters is OWL's plain mean when layers are the same size (every
    family here) and keeps the model's overall sparsity at the target when they are not.
    More outliers never means a higher sparsity: the map is affine and decreasing.
    """
    d = np.asarray(densities, dtype=np.float64)
    w = np.asarray(parameters, dtype=np.float64)
    if d.ndim != 1 or d.shape != w.shape or d.size == 0:
        raise AllocationError(f"{key}: need one outlier density and parameter count per layer")
    if not np.all(np.isfinite(d)) or np.any(w <= 0):
        raise AllocationError(f"{key}: outlier densities must be finite, parameter counts > 0")
    spread = d.max() - d.min()
    scaled = (d - d.min()) / spread * (2 * lam) if spread > 0 else np.zeros_like(d)
    kept = scaled - float(np.dot(w, scaled) / w.sum()) + (1.0 - target)
    sparsities = 1.0 - kept
    check_sparsities(sparsities.tolist(), parameters, target, key)
    return sparsities.tolist()


def check_sparsities(
    sparsities: Sequence[float], parameters: Sequence[int], target: float | None, key: str
) -> None:
    """Every layer in [0, 1); with a target, the parameter-weighted mean within MEAN_TOLERANCE."""
    for layer, value in enumerate(sparsities):
        if not (0.0 <= value < 1.0):
            raise AllocationError(
                f"{key}: layer {layer} would get sparsity {value:.4f}, outside [0, 1); "
                "lower the target or lambda"
            )
    if target is not None:
        mean = weighted_mean(sparsities, parameters)
        if abs(mean - target) > MEAN_TOLERANCE:
            raise AllocationError(
                f"{key}: the parameter-weighted mean sparsity is {mean:.4f}, not the target {target}"
            )


def weighted_mean(values: Sequence[float], parameters: Sequence[int]) -> float:
    w = np.asarray(parameters, dtype=np.float64)
    return float(np.dot(np.asarray(values, dtype=np.float64), w) / w.sum())


def allocation_label(settings: dict | None) -> str:
    """How a variant's per-layer sparsity was chosen, in one cell (older manifests: uniform)."""
    settings = settings or {"kind": "uniform"}
    kind = settings.get("kind", "uniform")
    name = settings.get("name", kind)
    if kind == "owl":
        label = f"owl m={settings['m']:g} lambda={settings['lambda']:g}"
        return label if name == "owl" else f"{name}: {label}"
    if kind == "layers":
        return "layers" if name == "layers" else f"{name}: layers"
    return "uniform"
