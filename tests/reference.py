"""Slow, plainly written references for every fast kernel in rose/.

Float64, Python loops, no lazy blocks, ties broken by (value, flat index) with
`sorted`: the definitions of shared/ROSE.md written the obvious way.
"""

from __future__ import annotations

import math

import torch


def k_smallest(values: list[float], k: int) -> set[int]:
    return {i for _, i in sorted((v, i) for i, v in enumerate(values))[:k]}


def prune_count(numel: int, fraction: float) -> int:
    return min(int(math.floor(numel * fraction)), max(numel - 1, 0))


def blocks(cols: int, width: int) -> list[tuple[int, int]]:
    return [(s, min(s + width, cols)) for s in range(0, cols, width)]


def ref_scores(W: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    S = torch.zeros(W.shape, dtype=torch.float64)
    for i in range(W.shape[0]):
        for j in range(W.shape[1]):
            S[i, j] = abs(float(W[i, j])) * math.sqrt(max(float(H[j, j]), 0.0))
    return S


def ref_loss_matrix(
    S: torch.Tensor, fraction: float, n: int, m: int, blocksize: int
) -> torch.Tensor:
    rows, cols = S.shape
    L = torch.zeros_like(S)
    if m:
        for i in range(rows):
            for g in range(0, cols, m):
                for j in k_smallest([float(S[i, g + t]) for t in range(m)], n):
                    L[i, g + j] = S[i, g + j]
        return L
    for a, b in blocks(cols, blocksize):
        flat = [float(S[i, j]) for i in range(rows) for j in range(a, b)]
        for f in k_smallest(flat, prune_count(len(flat), fraction)):
            i, j = divmod(f, b - a)
            L[i, a + j] = S[i, a + j]
    return L


def ref_rose_order(W, H, fraction=0.0, n=0, m=0, blocksize=128, threshold=0.5, reorder="adaptive"):
    """Returns (permutation list, block widths in sweep order, block_loss, relative range, reordered)."""
    cols = W.shape[1]
    S = ref_scores(W, H)
    L = ref_loss_matrix(S, fraction, n, m, blocksize)
    bounds = blocks(cols, m if m else blocksize)
    col_loss = [float(L[:, j].sum()) for j in range(cols)]
    block_loss = [sum(col_loss[a:b]) / (b - a) for a, b in bounds]
    top = max(block_loss)
    spread = 0.0 if top <= 0 else (top - min(block_loss)) / top
    reordered = reorder == "always" or (reorder == "adaptive" and spread > threshold)
    if not reordered:
        return list(range(cols)), [b - a for a, b in bounds], block_loss, spread, False
    block_order = [k for _, k in sorted((-loss, k) for k, loss in enumerate(block_loss))]
    perm = []
    for k in block_order:
        a, b = bounds[k]
        perm += [j for _, j in sorted((-col_loss[j], j) for j in range(a, b))]
    return perm, [bounds[k][1] - bounds[k][0] for k in block_order], block_loss, spread, True


def ref_sweep(W, H, perm, block_widths, fraction=0.0, n=0, m=0, percdamp=0.01):
    """SparseGPT without lazy batching: every update applied to all later columns at once."""
    W = W.double()[:, perm].clone()
    H = H.double()[perm][:, perm].clone()
    rows, cols = W.shape
    for j in range(cols):
        if H[j, j] == 0:
            H[j, j] = 1
            W[:, j] = 0
    damp = percdamp * float(torch.diagonal(H).mean())
    for j in range(cols):
        H[j, j] += damp
    Hinv = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    starts = {}
    s = 0
    for w in block_widths:
        starts[s] = s + w
        s += w
    for j in range(cols):
        if not m and j in starts:
            a, b = j, starts[j]
            flat = [float(W[i, c] ** 2 / Hinv[c, c] ** 2) for i in range(rows) for c in range(a, b)]
            for f in k_smallest(flat, prune_count(len(flat), fraction)):
                i, c = divmod(f, b - a)
                mask[i, a + c] = True
        if m and j % m == 0:
            for i in range(rows):
                vals = [float(W[i, j + t] ** 2 / Hinv[j + t, j + t] ** 2) for t in range(m)]
                for t in k_smallest(vals, n):
                    mask[i, j + t] = True
        q = W[:, j].clone()
        q[mask[:, j]] = 0
        err = (W[:, j] - q) / Hinv[j, j]
        W[:, j:] -= torch.outer(err, Hinv[j, j:])
        W[:, j] = q
    inverse = torch.argsort(torch.tensor(perm))
    return W[:, inverse], mask[:, inverse]


def ref_wanda(W, H, fraction=0.0, n=0, m=0):
    S = ref_scores(W, H)
    out = W.double().clone()
    rows, cols = W.shape
    for i in range(rows):
        if m:
            for g in range(0, cols, m):
                for t in k_smallest([float(S[i, g + t]) for t in range(m)], n):
                    out[i, g + t] = 0
        else:
            for j in k_smallest([float(S[i, j]) for j in range(cols)], prune_count(cols, fraction)):
                out[i, j] = 0
    return out


def ref_magnitude(W, fraction=0.0, n=0, m=0):
    out = W.double().clone()
    rows, cols = W.shape
    if m:
        for i in range(rows):
            for g in range(0, cols, m):
                for t in k_smallest([abs(float(W[i, g + t])) for t in range(m)], n):
                    out[i, g + t] = 0
        return out
    flat = [abs(float(W[i, j])) for i in range(rows) for j in range(cols)]
    for f in k_smallest(flat, prune_count(len(flat), fraction)):
        out[divmod(f, cols)] = 0
    return out


def ref_damped(H: torch.Tensor, percdamp: float = 0.01) -> torch.Tensor:
    """H as the ADMM solver's objective uses it: a dead input's diagonal set to 1, then
    percdamp x mean(diag) added to every diagonal entry."""
    H = H.double().clone()
    for j in range(H.shape[0]):
        if H[j, j] == 0:
            H[j, j] = 1.0
    damp = percdamp * sum(float(H[j, j]) for j in range(H.shape[0])) / H.shape[0]
    for j in range(H.shape[0]):
        H[j, j] += damp
    return H


def ref_support_optimum(W: torch.Tensor, H: torch.Tensor, pruned: torch.Tensor, percdamp=0.01):
    """For a fixed mask, the optimum of tr((W - V) H (W - V)^T), row by row: on the row's kept
    columns S, V_S solves H_SS V_S = (H w)_S; zero elsewhere."""
    Hd = ref_damped(H, percdamp)
    out = torch.zeros(W.shape, dtype=torch.float64)
    for i in range(W.shape[0]):
        kept = [j for j in range(W.shape[1]) if not bool(pruned[i, j])]
        if not kept:
            continue
        rhs = (Hd @ W[i].double())[kept]
        out[i, kept] = torch.linalg.solve(Hd[kept][:, kept], rhs)
    return out


def ref_objective(W: torch.Tensor, V: torch.Tensor, H: torch.Tensor, percdamp=0.01) -> float:
    """tr((W - V) Hd (W - V)^T) with the damped H."""
    D = V.double() - W.double()
    return float((D @ ref_damped(H, percdamp) * D).sum())
