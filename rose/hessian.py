"""Hessian accumulation: H = (2/N) * sum_k X_k^T X_k over N calibration sequences.

We keep the raw sum and the sequence count and divide once at the end, so every
sequence weighs the same (the official ROSE code rescales a running statistic
and ends up weighting sample k by 1/k, see shared/ROSE.md).
"""

from __future__ import annotations

import torch


class HessianAccumulator:
    """Running X^T X for one input group (Linears that read the same tensor)."""

    def __init__(
        self, columns: int, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ):
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"Hessians accumulate in float32 or float64, not {dtype}")
        self.columns = columns
        self.dtype = dtype
        self._sum = torch.zeros(columns, columns, device=device, dtype=dtype)
        self.sequences = 0

    def add(self, inputs: torch.Tensor) -> None:
        """Add a batch. [..., seq, cols]: leading dims are sequences; [seq, cols] is one."""
        if inputs.shape[-1] != self.columns:
            raise ValueError(
                f"Hessian input has {inputs.shape[-1]} features, expected {self.columns}"
            )
        if inputs.ndim < 2:
            raise ValueError("Hessian inputs need at least [tokens, features]")
        sequences = 1 if inputs.ndim == 2 else int(torch.tensor(inputs.shape[:-2]).prod())
        x = inputs.reshape(-1, self.columns).to(device=self._sum.device, dtype=self.dtype)
        self._sum.addmm_(x.T, x)
        self.sequences += sequences

    def finalize(self) -> torch.Tensor:
        if self.sequences == 0:
            raise ValueError("no calibration inputs were added to the Hessian")
        return self._sum * (2.0 / self.sequences)
