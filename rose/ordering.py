"""ROSE ordering: which columns SparseGPT should sweep first.

SparseGPT compensates each pruned weight with the columns still to come, so
errors that sit in late columns go uncompensated. ROSE pre-prunes with the
Wanda-like score |W_ij| * sqrt(H_jj), measures where the would-be-pruned score
mass sits (per column and per block), and, when blocks differ a lot (a
"columnar" layer), sweeps the lossiest blocks and columns first.
See shared/ROSE.md for the contract this implements.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rose.sparsity import Sparsity, prune_count

REORDER_MODES = ("adaptive", "always", "never")


@dataclass
class Ordering:
    """The sweep order of one Linear's columns plus the diagnostics users plot.

    `permutation[k]` is the original index of the column swept k-th;
    `block_widths` are the mask blocks in sweep order (they coincide with the
    original ROSE blocks, so a narrow last block keeps its width wherever it
    lands). For N:M the blocks are the groups of M.
    """

    permutation: torch.Tensor
    block_widths: list[int]
    block_loss: torch.Tensor
    column_loss: torch.Tensor
    relative_range: float
    columnar: bool
    reordered: bool
    threshold: float
    loss_map: torch.Tensor | None = None  # (row group, block) sums; only when asked for
    inverse: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.inverse = torch.argsort(self.permutation)


def scores(weight: torch.Tensor, hessian_diag: torch.Tensor) -> torch.Tensor:
    """S_ij = |W_ij| * sqrt(H_jj): float32 (float64 for float64 weights); losses are summed in float64."""
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    return weight.to(dtype).abs() * hessian_diag.to(dtype).clamp_min(0).sqrt().unsqueeze(0)


def block_bounds(columns: int, width: int) -> list[tuple[int, int]]:
    """Consecutive [start, end) ranges of `width`; the last may be narrower."""
    return [(start, min(start + width, columns)) for start in range(0, columns, width)]


def smallest_mask(values: torch.Tensor, count: int, dim: int | None = None) -> torch.Tensor:
    """Mask of the `count` smallest entries (of all, or of each slice along `dim`).

    Ties go to the lower index, exactly as a stable sort would order them, but
    in O(n): the count-th smallest value by selection, everything below it, then
    the first tied entries by a running count. Sorting whole blocks cost the
    ROSE ordering and the sweep's block masks more than the OBS updates.
    """
    flat = values.reshape(-1) if dim is None else values.movedim(dim, -1)
    length = flat.shape[-1]
    if count <= 0:
        mask = torch.zeros_like(flat, dtype=torch.bool)
    elif count >= length:
        mask = torch.ones_like(flat, dtype=torch.bool)
    else:
        threshold = torch.kthvalue(flat, count, dim=-1, keepdim=True).values
        below = flat < threshold
        ties = flat == threshold
        need = count - below.sum(dim=-1, keepdim=True)
        if bool((ties.sum(dim=-1, keepdim=True) == need).all()):
            mask = below | ties  # every tie is needed (the usual case): no running count
        else:
            mask = below | (ties & (torch.cumsum(ties, dim=-1) <= need))
    return mask.reshape(values.shape) if dim is None else mask.movedim(-1, dim)


def smallest_per_row_groups(values: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Mask of the n smallest entries per row in every group of m columns."""
    rows, cols = values.shape
    return smallest_mask(values.reshape(rows, cols // m, m), n, dim=-1).reshape(rows, cols)


def loss_matrix(score: torch.Tensor, sparsity: Sparsity, blocksize: int) -> torch.Tensor:
    """Scores of the would-be-pruned weights (zero elsewhere), block by block."""
    if sparsity.is_nm:
        return score * smallest_per_row_groups(score, sparsity.n, sparsity.m)
    rows, cols = score.shape
    full = cols // blocksize
    loss = torch.zeros_like(score)
    if full:  # all full-width blocks in one batched selection, each block flattened row-major
        blocks = (
            score[:, : full * blocksize]
            .reshape(rows, full, blocksize)
            .transpose(0, 1)
            .reshape(full, -1)
        )
        mask = smallest_mask(blocks, prune_count(rows * blocksize, sparsity.fraction), dim=1)
        chosen = (blocks * mask).reshape(full, rows, blocksize).transpose(0, 1)
        loss[:, : full * blocksize] = chosen.reshape(rows, full * blocksize)
    if cols % blocksize:
        block = score[:, full * blocksize :]
        loss[:, full * blocksize :] = block * smallest_mask(
            block, prune_count(block.numel(), sparsity.fraction)
        )
    return loss


def relative_range(block_loss: torch.Tensor) -> float:
    """(max - min) / max of the block losses; 0 when nothing would be pruned."""
    top = float(block_loss.max())
    if top <= 0.0:
        return 0.0
    return (top - float(block_loss.min())) / top


def _block_sums(values: torch.Tensor, width: int) -> torch.Tensor:
    """Sums over consecutive blocks of `width` (the last may be narrower), without a Python loop per block."""
    full = values.numel() // width
    sums = values[: full * width].reshape(full, width).sum(dim=1)
    if values.numel() % width:
        sums = torch.cat([sums, values[full * width :].sum().reshape(1)])
    return sums


def rose_order(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: Sparsity,
    blocksize: int = 128,
    threshold: float = 0.5,
    reorder: str = "adaptive",
    with_loss_map: bool = False,
) -> Ordering:
    """Decide the sweep order of one Linear (blocks of `blocksize`, or N:M groups).

    `with_loss_map` also returns the (row group, block) heatmap from the same
    would-be-pruned selection, which is the expensive part of the ordering."""
    if reorder not in REORDER_MODES:
        raise ValueError(f"reorder must be one of {REORDER_MODES}, got {reorder!r}")
    columns = weight.shape[1]
    width = sparsity.m if sparsity.is_nm else blocksize
    bounds = block_bounds(columns, width)
    widths = torch.tensor([end - start for start, end in bounds], dtype=torch.float64)

    loss = loss_matrix(scores(weight, torch.diagonal(hessian)), sparsity, blocksize)
    column_loss = loss.sum(dim=0, dtype=torch.float64)
    block_loss = _block_sums(column_loss, width).cpu() / widths
    spread = relative_range(block_loss)
    columnar = spread > threshold
    reordered = reorder == "always" or (reorder == "adaptive" and columnar)

    if not reordered:
        permutation = torch.arange(columns)
        block_order = list(range(len(bounds)))
    else:
        block_order = torch.sort(-block_loss, stable=True).indices.tolist()
        column_loss_cpu = column_loss.cpu()
        pieces = []
        for b in block_order:
            start, end = bounds[b]
            inside = torch.sort(-column_loss_cpu[start:end], stable=True).indices
            pieces.append(inside + start)
        permutation = torch.cat(pieces)
    return Ordering(
        permutation=permutation.to(torch.int64),
        block_widths=[bounds[b][1] - bounds[b][0] for b in block_order],
        block_loss=block_loss.float(),
        column_loss=column_loss.float().cpu(),
        relative_range=spread,
        columnar=columnar,
        reordered=reordered,
        threshold=threshold,
        loss_map=_grouped(loss, blocksize) if with_loss_map else None,
    )


def identity_order(columns: int, blocksize: int, sparsity: Sparsity) -> Ordering:
    """SparseGPT's left-to-right order, with empty diagnostics."""
    width = sparsity.m if sparsity.is_nm else blocksize
    bounds = block_bounds(columns, width)
    return Ordering(
        permutation=torch.arange(columns, dtype=torch.int64),
        block_widths=[end - start for start, end in bounds],
        block_loss=torch.zeros(len(bounds)),
        column_loss=torch.zeros(columns),
        relative_range=0.0,
        columnar=False,
        reordered=False,
        threshold=float("nan"),
    )


def loss_map(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: Sparsity,
    blocksize: int = 128,
    row_groups: int = 64,
) -> torch.Tensor:
    """Would-be-pruned score summed over (row group, block) cells: the paper's motivation heatmap."""
    return _grouped(
        loss_matrix(scores(weight, torch.diagonal(hessian)), sparsity, blocksize),
        blocksize,
        row_groups,
    )


def _grouped(loss: torch.Tensor, blocksize: int, row_groups: int = 64) -> torch.Tensor:
    loss = loss.float().cpu()
    rows = torch.tensor_split(torch.arange(loss.shape[0]), min(row_groups, loss.shape[0]))
    per_block = torch.stack(
        [loss[:, a:b].sum(dim=1) for a, b in block_bounds(loss.shape[1], blocksize)], dim=1
    )
    return torch.stack([per_block[r].sum(dim=0) for r in rows])
