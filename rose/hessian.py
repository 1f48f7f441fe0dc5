"""Hessian accumulation: H = (2/N) * sum_k X_k^T X_k over N calibration sequences.

We keep the raw sum and the sequence count and divide once at the end, so every
sequence weighs the same (the official ROSE code rescales a running statistic
and ends up weighting sample k by 1/k, see shared/ROSE.md).

A routed expert's Hessian sums over the tokens routed to it (or over all tokens,
`moe.calibrate_all_experts`) and is divided by the same N, the number of
calibration sequences: H_e = (2/N) sum_{t routed to e} x_t^T x_t.

`HessianWriter` streams Hessians into one HDF5 artifact as they are finished,
so a stage never holds more of them than it computes at once (mixture-of-experts
layers: one group of experts at a time), with the conventions of
`rose.artifacts.write_h5` (atomic rename, provenance attributes, a `sha256`
attribute per dataset that `H5Artifact` verifies).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np
import torch

from rose.artifacts import (
    MemoryH5,
    _chunks,
    _to_numpy,
    atomic_path,
    ensure_space,
    tensor_checksum,
)

if TYPE_CHECKING:
    from rose.handoff import Handoff


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
        self._row_blocks = _triangle_row_blocks(columns)
        self.sequences = 0
        self.tokens = 0  # rows (token vectors) added

    def add(self, inputs: torch.Tensor) -> None:
        """Add a batch. [..., seq, cols]: leading dims are sequences; [seq, cols] is one."""
        if inputs.shape[-1] != self.columns:
            raise ValueError(
                f"Hessian input has {inputs.shape[-1]} features, expected {self.columns}"
            )
        if inputs.ndim < 2:
            raise ValueError("Hessian inputs need at least [tokens, features]")
        sequences = 1 if inputs.ndim == 2 else int(torch.tensor(inputs.shape[:-2]).prod())
        self.add_rows(inputs)
        self.sequences += sequences

    def add_rows(self, inputs: torch.Tensor) -> None:
        """Add token vectors [..., cols] without counting sequences (routed tokens of an expert,
        or a module fed [tokens, cols]); `finalize(sequences)` then divides by the caller's N."""
        if inputs.shape[-1] != self.columns:
            raise ValueError(
                f"Hessian input has {inputs.shape[-1]} features, expected {self.columns}"
            )
        x = inputs.reshape(-1, self.columns).to(device=self._sum.device, dtype=self.dtype)
        for start, end in self._row_blocks:  # the upper triangle only: X^T X is symmetric
            self._sum[start:end, start:].addmm_(x[:, start:end].T, x[:, start:])
        self.tokens += x.shape[0]

    def finalize(self, sequences: int | None = None) -> torch.Tensor:
        """(2/N) X^T X; N is the sequences counted by `add`, or `sequences` when given."""
        count = self.sequences if sequences is None else sequences
        if count == 0:
            raise ValueError("no calibration inputs were added to the Hessian")
        hessian = self._sum * (2.0 / count)
        for start, end in self._row_blocks:  # mirror the upper triangle, one block at a time
            hessian[start:end, :start] = hessian[:start, start:end].T
            diagonal = hessian[start:end, start:end]
            upper = diagonal.triu()
            diagonal.copy_(upper + upper.triu(1).T)
        return hessian


def _triangle_row_blocks(columns: int) -> list[tuple[int, int]]:
    """Row blocks of X^T X whose products cover its upper triangle. k blocks of at least 128
    rows (k <= 8) do (k + 1) / 2k of the full product's multiply-adds; for SmolLM2's 576-
    and 1536-wide inputs that took 40-50% less time on one CPU thread. Exactly symmetric."""
    count = min(8, max(1, columns // 128))
    edges = [round(i * columns / count) for i in range(count + 1)]
    return list(zip(edges[:-1], edges[1:], strict=True))


class ColumnNorms:
    """Running sum of squares per input column: what Wanda scores and OWL need of X, without
    the [cols, cols] product (the dense statistics pass)."""

    def __init__(self, columns: int, device: str | torch.device = "cpu"):
        self.columns = columns
        self._sum = torch.zeros(columns, device=device, dtype=torch.float64)
        self.tokens = 0

    def add_rows(self, inputs: torch.Tensor) -> None:
        if inputs.shape[-1] != self.columns:
            raise ValueError(f"input has {inputs.shape[-1]} features, expected {self.columns}")
        x = inputs.reshape(-1, self.columns).to(device=self._sum.device, dtype=torch.float64)
        self._sum += (x * x).sum(dim=0)
        self.tokens += x.shape[0]

    def norms(self) -> torch.Tensor:
        """sqrt(mean of x_j^2 over the tokens seen): ||X_j|| / sqrt(tokens), float64 [cols].
        Per-token, so routed experts that saw fewer tokens are on the same scale."""
        return torch.sqrt(self._sum / max(self.tokens, 1))


def expert_hessian_bytes(hidden: int, intermediate: int, dtype: torch.dtype = torch.float32) -> int:
    """One routed expert's Hessians: gate/up read [hidden], down reads [intermediate]."""
    return (hidden * hidden + intermediate * intermediate) * torch.empty(
        (), dtype=dtype
    ).element_size()


class HessianWriter:
    """Hessians written into one HDF5 artifact one by one as they are finished, atomically.

    `total_bytes` (all datasets) is checked against the free disk space up front,
    as `write_h5` does. Each dataset gets a `sha256` attribute (`tensor_checksum`).
    """

    def __init__(
        self,
        path: str | Path,
        attrs: Mapping[str, Any],
        total_bytes: int,
        chunk_bytes: int = 4 << 20,
        handoff: Handoff | None = None,
    ):
        self.path = Path(path)
        self.attrs = dict(attrs)
        self.total_bytes = total_bytes
        self.chunk_bytes = chunk_bytes
        # Kept for the next stages of this process when they fit (rose.handoff)
        self._handoff = handoff if handoff is not None and handoff.admits(total_bytes) else None
        self._arrays: dict[str, np.ndarray] = {}
        self._dataset_attrs: dict[str, dict[str, Any]] = {}

    def __enter__(self) -> HessianWriter:
        self._ctx = atomic_path(self.path)
        tmp = self._ctx.__enter__()
        try:
            ensure_space(tmp, self.total_bytes)
            self._fh = h5py.File(tmp, "w")
            for key, value in self.attrs.items():
                self._fh.attrs[key] = value
        except BaseException as error:
            self._ctx.__exit__(type(error), error, error.__traceback__)
            raise
        return self

    def write(
        self, name: str, value: torch.Tensor | np.ndarray, attrs: Mapping[str, Any] | None = None
    ) -> None:
        array = _to_numpy(value)
        dset = self._fh.create_dataset(name, data=array, chunks=_chunks(array, self.chunk_bytes))
        dset.attrs["sha256"] = tensor_checksum(array)
        for key, attr in (attrs or {}).items():
            dset.attrs[key] = attr
        if self._handoff is not None:
            self._arrays[name] = array
            self._dataset_attrs[name] = dict(dset.attrs)

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._fh.close()
        except BaseException as error:
            self._ctx.__exit__(type(error), error, error.__traceback__)
            raise
        self._ctx.__exit__(exc_type, exc, tb)
        if exc_type is None and self._handoff is not None:
            memory = MemoryH5(self.path, self.attrs, self._arrays, self._dataset_attrs)
            self._handoff.keep(self.path, memory, memory.nbytes)
        self._arrays = {}
