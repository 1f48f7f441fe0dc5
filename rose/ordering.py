"""ROSE ordering: which columns SparseGPT should sweep first.

SparseGPT compensates each pruned weight with the columns still to come, so
errors that sit in late columns go uncompensated. ROSE pre-prunes with the
Wanda-like score |W_ij| * sqrt(H_jj), measures where the would-be-pruned score
mass sits (per column and per block), and, when blocks differ a lot (a
"columnar" layer), sweeps the lossiest blocks and columns first.
See shared/ROSE.md for the contract this implements.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch

from rose.sparsity import BLOCKSIZE, Sparsity, prune_count

REORDER_MODES = ("adaptive", "always", "never")  # the first is the default
# A layer is columnar when its block losses' relative range exceeds this (the paper's 0.5).
THRESHOLD = 0.5


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
    return weight.to(dtype).abs().mul_(hessian_diag.to(dtype).clamp_min(0).sqrt().unsqueeze(0))


def block_bounds(columns: int, width: int) -> list[tuple[int, int]]:
    """Consecutive [start, end) ranges of `width`; the last may be narrower."""
    return [(start, min(start + width, columns)) for start in range(0, columns, width)]


class NaNScoresError(ValueError):
    """The values to select from contain NaN: no mask is the right one. Callers that know
    which Linear it is re-raise with its name."""

    def __init__(self) -> None:
        super().__init__("the pruning scores contain NaN, so no weights can be chosen to prune")


def smallest_mask(values: torch.Tensor, count: int, dim: int | None = None) -> torch.Tensor:
    """Mask of the `count` smallest entries (of all, or of each slice along `dim`).

    Ties go to the lower index, exactly as a stable sort would order them, but
    in O(n): the count-th smallest value by selection (a radix select for long
    float32 slices on CPU, kthvalue otherwise), everything below it, then the
    first tied entries by a running count. Sorting whole blocks cost the ROSE
    ordering and the sweep's block masks more than the OBS updates.
    Raises NaNScoresError when `values` contain NaN (NaN has no place in the order).
    """
    if _flushing_denormals():
        return _keeping_denormals(smallest_mask, values, count, dim)
    flat = values.reshape(-1) if dim is None else values.movedim(dim, -1)
    length = flat.shape[-1]
    if count <= 0 or count >= length:
        _refuse_nan(flat)
        fill = torch.zeros_like if count <= 0 else torch.ones_like
        mask = fill(flat, dtype=torch.bool)
    else:
        mask = _radix_mask(flat, count) if _radix_applies(flat) else None
        if mask is None:
            mask = _kthvalue_mask(flat, count)
    return mask.reshape(values.shape) if dim is None else mask.movedim(-1, dim)


# torch.set_flush_denormal(True) sets the calling thread's flush-to-zero and
# denormals-are-zero bits, not the intra-op worker threads': under it, comparisons
# read denormals as zero in the slices this thread handles and by value in the
# others (a radix threshold that is denormal even becomes 0.0 on its way through a
# Python float), so a mask would depend on the thread count. The selections run
# with it off and put it back: the same masks as without it.
_DENORMAL, _ONE = 5e-324, 1.0  # module globals, so the product is not folded at compile time


def _flushing_denormals() -> bool:
    """Whether flush-denormal is on for this thread (torch has no getter): the smallest
    denormal does not survive a multiplication by one. CPython's float arithmetic runs
    under the same floating-point control bits as torch's CPU kernels on this thread."""
    return _DENORMAL * _ONE == 0.0


def _keeping_denormals(select, *args):
    torch.set_flush_denormal(False)
    try:
        return select(*args)
    finally:
        torch.set_flush_denormal(True)


def _refuse_nan(values: torch.Tensor) -> None:
    if bool(torch.isnan(values).any()):
        raise NaNScoresError()


def _kthvalue_mask(flat: torch.Tensor, count: int) -> torch.Tensor:
    threshold = torch.kthvalue(flat, count, dim=-1, keepdim=True).values
    below = flat < threshold
    ties = flat == threshold
    need = count - below.sum(dim=-1, keepdim=True)
    # one host sync for both questions: any NaN (compares false to everything), all ties needed
    has_nan, all_ties_needed = torch.stack(
        [torch.isnan(flat).any(), (ties.sum(dim=-1, keepdim=True) == need).all()]
    ).tolist()
    if has_nan:
        raise NaNScoresError()
    if all_ties_needed:
        return below | ties  # every tie is needed (the usual case): no running count
    return _first_ties(below, ties, need)


def _first_ties(below: torch.Tensor, ties: torch.Tensor, need: torch.Tensor | int) -> torch.Tensor:
    """Everything below the threshold and the first `need` entries equal to it, by index."""
    return below | (ties & (torch.cumsum(ties, dim=-1) <= need))


# Exact selection at memory speed on CPU for long slices: two 16-bit histograms of
# the float32 bit patterns (non-negative floats order as their bits do) instead of
# kthvalue's quickselect, which made the ordering 10-18% of the sweep at 7B shapes.
RADIX_MIN_LENGTH = 1 << 16  # shorter slices: quickselect is as fast
_RADIX_MAX_SLICES = 1024  # one histogram pass per slice, from Python
_LITTLE_ENDIAN = sys.byteorder == "little"


def _radix_applies(flat: torch.Tensor) -> bool:
    return (
        flat.dtype == torch.float32
        and flat.device.type == "cpu"  # GPU kthvalue is already a radix select
        and flat.shape[-1] >= RADIX_MIN_LENGTH
        and flat.numel() // flat.shape[-1] <= _RADIX_MAX_SLICES
    )


def _radix_mask(flat: torch.Tensor, count: int) -> torch.Tensor | None:
    """smallest_mask for float32 slices on CPU; None when a value is negative (or a NaN
    carries the sign bit: kthvalue's path refuses it)."""
    rows = flat.reshape(-1, flat.shape[-1]).contiguous()
    selections = [_radix_select(row, count) for row in rows]
    if any(selection is None for selection in selections):
        return None
    thresholds = torch.tensor([s.value for s in selections], dtype=torch.float32)
    mask = rows <= thresholds.unsqueeze(1)
    for index, selection in enumerate(selections):
        need = count - selection.below
        if selection.equal != need:  # more ties than needed: the first `need` of them
            row, value = rows[index], thresholds[index]
            mask[index] = _first_ties(row < value, row == value, need)
    return mask.reshape(flat.shape)


@dataclass(frozen=True)
class _Selection:
    value: float  # the count-th smallest
    below: int  # entries smaller than it
    equal: int  # entries equal to it


def _radix_select(row: torch.Tensor, count: int) -> _Selection | None:
    """The count-th smallest of one contiguous float32 row from its bit patterns, or None
    when a sign bit is set. High 16 bits first, then the low 16 bits of the entries
    in the chosen high bin: two histogram passes and no data-dependent partitioning."""
    halves = row.view(torch.uint16)
    high_bits, low_bits = (
        (halves[1::2], halves[0::2]) if _LITTLE_ENDIAN else (halves[0::2], halves[1::2])
    )
    high = high_bits.to(torch.int32)
    histogram = torch.bincount(high, minlength=1 << 16)
    if bool(histogram[1 << 15 :].any()):
        return None
    # NaN bit patterns sit above +inf's 0x7f800000: look for them only when that range is used
    if bool(histogram[0x7F80:].any()) and bool(torch.isnan(row).any()):
        raise NaNScoresError()
    high_cumulative = histogram.cumsum(0)
    high_bin = int(torch.searchsorted(high_cumulative, count))
    below = int(high_cumulative[high_bin - 1]) if high_bin else 0
    low = low_bits[high == high_bin].to(torch.int32)
    low_cumulative = torch.bincount(low, minlength=1 << 16).cumsum(0)
    low_bin = int(torch.searchsorted(low_cumulative, count - below))
    before_low = int(low_cumulative[low_bin - 1]) if low_bin else 0
    pattern = torch.tensor([(high_bin << 16) | low_bin], dtype=torch.int32)
    return _Selection(
        value=float(pattern.view(torch.float32)),
        below=below + before_low,
        equal=int(low_cumulative[low_bin]) - before_low,
    )


def smallest_per_row_groups(values: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Mask of the n smallest entries per row in every group of m columns; NaNScoresError
    when `values` contain NaN."""
    if _flushing_denormals():
        return _keeping_denormals(smallest_per_row_groups, values, n, m)
    rows, cols = values.shape
    groups = values.reshape(rows, cols // m, m)
    if m <= _PAIRWISE_MAX_GROUP and groups.numel() >= _PAIRWISE_MIN_ENTRIES:
        _refuse_nan(groups)  # NaN compares false both ways: the ranks would not be a permutation
        return (_pairwise_rank(groups) < n).reshape(rows, cols)
    return smallest_mask(groups, n, dim=-1).reshape(rows, cols)


_PAIRWISE_MAX_GROUP = 8  # m(m-1)/2 comparisons per group
_PAIRWISE_MIN_ENTRIES = 1 << 16  # below: fewer kernel launches with kthvalue


def _pairwise_rank(groups: torch.Tensor) -> torch.Tensor:
    """Each entry's position in a stable sort of its group, from one comparison per pair:
    of entries i < j, j goes first only if strictly smaller. 2.5x faster than kthvalue
    over millions of groups of four."""
    m = groups.shape[-1]
    rank = torch.zeros(groups.shape, dtype=torch.uint8, device=groups.device)
    for i in range(m):
        for j in range(i + 1, m):
            j_first = groups[..., j] < groups[..., i]
            rank[..., i] += j_first
            rank[..., j] += ~j_first
    return rank


@dataclass
class PrunedLosses:
    """What ROSE's pre-pruning would cut, summed: the ordering's input and the heatmap's."""

    column: torch.Tensor  # float64 [cols]: each column's would-be-pruned score
    row_block: torch.Tensor | None  # float32 [rows, blocks of `blocksize`], for the heatmap


def pruned_losses(
    score: torch.Tensor, sparsity: Sparsity, blocksize: int, per_row: bool = False
) -> PrunedLosses:
    """Sums of the would-be-pruned scores per column (and per row and block when asked),
    without materialising the masked score matrix: the masked blocks are summed in
    the batched layout the selection used."""
    rows, cols = score.shape
    if sparsity.is_nm:
        chosen = score * smallest_per_row_groups(score, sparsity.n, sparsity.m)
        return PrunedLosses(
            column=_sum_rows(chosen, dim=0),
            row_block=_block_sums(chosen, blocksize) if per_row else None,
        )
    full = cols // blocksize
    column_parts, row_parts = [], []
    if full:  # all full-width blocks in one batched selection, each block flattened row-major
        blocks = (
            score[:, : full * blocksize]
            .reshape(rows, full, blocksize)
            .transpose(0, 1)
            .reshape(full, -1)
        )
        mask = smallest_mask(blocks, prune_count(rows * blocksize, sparsity.fraction), dim=1)
        shares_storage = blocks.untyped_storage().data_ptr() == score.untyped_storage().data_ptr()
        chosen = blocks * mask if shares_storage else blocks.mul_(mask)  # in place on our copy
        chosen = chosen.reshape(full, rows, blocksize)
        column_parts.append(_sum_rows(chosen, dim=1).reshape(-1))
        if per_row:
            row_parts.append(chosen.sum(dim=2).T)
    if cols % blocksize:
        block = score[:, full * blocksize :]
        chosen = block * smallest_mask(block, prune_count(block.numel(), sparsity.fraction))
        column_parts.append(_sum_rows(chosen, dim=0))
        if per_row:
            row_parts.append(chosen.sum(dim=1, keepdim=True))
    return PrunedLosses(
        column=torch.cat(column_parts),
        row_block=torch.cat(row_parts, dim=1) if per_row else None,
    )


_PARTIAL_ROWS = 64


def _sum_rows(values: torch.Tensor, dim: int) -> torch.Tensor:
    """Float64 sums over `dim` from partial sums of 64 rows in the input dtype: an order of
    magnitude faster than a float64 reduction of float32 input (which converts every
    element); a 64-term float32 sum of non-negative terms is within 32 float32 epsilons
    relative (the recursive-summation bound), and typically within a few."""
    rows = values.shape[dim]
    body = rows - rows % _PARTIAL_ROWS
    total = torch.zeros(1, dtype=torch.float64, device=values.device)
    if body:
        partial = values.narrow(dim, 0, body).unflatten(dim, (body // _PARTIAL_ROWS, _PARTIAL_ROWS))
        total = total + partial.sum(dim=dim + 1).sum(dim=dim, dtype=torch.float64)
    if rows % _PARTIAL_ROWS:
        total = total + values.narrow(dim, body, rows - body).sum(dim=dim, dtype=torch.float64)
    return total


def relative_range(block_loss: torch.Tensor) -> float:
    """(max - min) / max of the block losses; 0 when nothing would be pruned."""
    top = float(block_loss.max())
    if top <= 0.0:
        return 0.0
    return (top - float(block_loss.min())) / top


def _block_sums(values: torch.Tensor, width: int) -> torch.Tensor:
    """Sums over consecutive blocks of `width` along the last dim (the last may be narrower),
    without a Python loop per block."""
    full = values.shape[-1] // width
    sums = values[..., : full * width].unflatten(-1, (full, width)).sum(dim=-1)
    if values.shape[-1] % width:
        sums = torch.cat([sums, values[..., full * width :].sum(dim=-1, keepdim=True)], dim=-1)
    return sums


def rose_order(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: Sparsity,
    blocksize: int = BLOCKSIZE,
    threshold: float = THRESHOLD,
    reorder: str = REORDER_MODES[0],
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

    losses = pruned_losses(
        scores(weight, torch.diagonal(hessian)), sparsity, blocksize, per_row=with_loss_map
    )
    column_loss = losses.column
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
        loss_map=_row_groups(losses.row_block) if with_loss_map else None,
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
    blocksize: int = BLOCKSIZE,
    row_groups: int = 64,
) -> torch.Tensor:
    """Would-be-pruned score summed over (row group, block) cells: the paper's motivation heatmap."""
    losses = pruned_losses(
        scores(weight, torch.diagonal(hessian)), sparsity, blocksize, per_row=True
    )
    return _row_groups(losses.row_block, row_groups)


def _row_groups(row_block: torch.Tensor, row_groups: int = 64) -> torch.Tensor:
    row_block = row_block.float().cpu()
    rows = torch.tensor_split(torch.arange(row_block.shape[0]), min(row_groups, row_block.shape[0]))
    return torch.stack([row_block[r].sum(dim=0) for r in rows])
