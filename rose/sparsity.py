"""Sparsity targets: an unstructured fraction or an N:M pattern, parsed once.

One record travels through ordering, sweep and methods so that no function has
to guess whether "0.5" or "2:4" was meant, and variant names stay stable.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

# ROSE's block width (its block losses and reordered blocks) and SparseGPT's lazy-update
# block: the one default of `prune.blocksize`.
BLOCKSIZE = 128

_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class Sparsity:
    """Either `fraction` (unstructured) or `n` of every `m` weights (N:M)."""

    fraction: float = 0.0
    n: int = 0
    m: int = 0

    def __post_init__(self) -> None:
        if self.m or self.n:
            if not (0 < self.n < self.m):
                raise ValueError(f"N:M sparsity needs 0 < N < M, got {self.n}:{self.m}")
        elif not (isinstance(self.fraction, float | int) and 0.0 <= self.fraction < 1.0):
            raise ValueError(f"sparsity must be a fraction in [0, 1), got {self.fraction!r}")
        if isinstance(self.fraction, float) and math.isnan(self.fraction):
            raise ValueError("sparsity must be a fraction in [0, 1), got nan")

    @property
    def is_nm(self) -> bool:
        return self.m > 0

    @classmethod
    def parse(cls, value: str | float | int) -> Sparsity:
        """Accept 0.5, "0.5", "2:4" or "2of4" (the form used in variant names)."""
        if isinstance(value, bool):
            raise ValueError(f"sparsity must be a fraction in [0, 1) or 'N:M', got {value!r}")
        if isinstance(value, int | float):
            return cls(fraction=float(value))
        text = str(value).strip().replace("of", ":")
        match = _NM.match(text)
        if match:
            return cls(n=int(match.group(1)), m=int(match.group(2)))
        try:
            fraction = float(text)
        except ValueError:
            raise ValueError(
                f"sparsity must be a fraction in [0, 1) or 'N:M' like '2:4', got {value!r}"
            ) from None
        return cls(fraction=fraction)

    @property
    def label(self) -> str:
        """Filesystem-safe label: '0.5', '2of4'."""
        if self.is_nm:
            return f"{self.n}of{self.m}"
        return f"{self.fraction:g}"

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else f"{self.fraction:g}"

    def check_width(self, cols: int, what: str = "weight") -> None:
        if self.is_nm and cols % self.m:
            raise ValueError(
                f"{what}: N:M sparsity {self} needs the input width to be a multiple of {self.m}, got {cols}"
            )


def prune_count(numel: int, fraction: float) -> int:
    """How many of `numel` weights a fraction prunes: floor(numel * p), never all."""
    return min(int(math.floor(numel * fraction)), max(numel - 1, 0))
