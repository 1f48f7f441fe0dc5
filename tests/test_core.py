"""The ROSE core against the slow references in tests/reference.py."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import ref_magnitude, ref_rose_order, ref_sweep, ref_wanda

from rose.hessian import HessianAccumulator
from rose.methods import PruneSettings, prune_weight, reconstruction_error
from rose.ordering import rose_order, smallest_mask
from rose.sparsity import Sparsity

F64 = PruneSettings(compute_dtype=torch.float64)


def make_problem(
    rows: int, cols: int, seed: int, columnar_block: int | None = None, tokens: int = 0
):
    """Random W and a correlated, full-rank H (optionally one block with big activations)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    tokens = tokens or max(2 * cols, 64)
    mix = torch.eye(cols, dtype=torch.float64) + 0.3 * torch.randn(
        cols, cols, generator=g, dtype=torch.float64
    ) / math.sqrt(cols)
    X = torch.randn(4, tokens // 4, cols, generator=g, dtype=torch.float64) @ mix
    if columnar_block is not None:
        a = columnar_block * 128
        X[..., a : a + 128] *= 8.0
    acc = HessianAccumulator(cols, dtype=torch.float64)
    acc.add(X)
    return W, acc.finalize()


def parse(spec: str) -> tuple[Sparsity, dict]:
    s = Sparsity.parse(spec)
    return s, (dict(n=s.n, m=s.m) if s.is_nm else dict(fraction=s.fraction))


def fit_width(cols: int, sparsity) -> int:
    """N:M needs a width that M divides: round down."""
    return (cols // sparsity.m) * sparsity.m if sparsity.is_nm and cols % sparsity.m else cols


sparsity_specs = st.one_of(
    st.sampled_from([0.0, 0.1, 0.5, 0.7, 0.9]).map(str),
    st.floats(0.0, 0.95).map(lambda p: f"{p:.3f}"),
    st.sampled_from(["2:4", "4:8", "1:4", "3:8", "1:2"]),
)
widths = st.sampled_from([64, 100, 128, 200, 576])


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(2, 9),
    cols=widths,
    spec=sparsity_specs,
    seed=st.integers(0, 10_000),
    reorder=st.sampled_from(["adaptive", "always", "never"]),
    blocksize=st.sampled_from([128, 64, 48]),
)
def test_rose_matches_reference(rows, cols, spec, seed, reorder, blocksize):
    sparsity, kw = parse(spec)
    cols = fit_width(cols, sparsity)
    W, H = make_problem(
        rows, cols, seed, columnar_block=(seed % 2) if cols > 256 and seed % 3 == 0 else None
    )
    s = PruneSettings(blocksize=blocksize, reorder=reorder, compute_dtype=torch.float64)
    order = rose_order(W, H, sparsity, blocksize, s.threshold, reorder)
    perm, bw, block_loss, spread, reordered = ref_rose_order(
        W, H, blocksize=blocksize, reorder=reorder, **kw
    )
    assert order.permutation.tolist() == perm
    assert order.block_widths == bw
    assert order.reordered == reordered
    assert order.relative_range == pytest.approx(spread, rel=1e-9, abs=1e-12)
    torch.testing.assert_close(
        order.block_loss.double(),
        torch.tensor(block_loss, dtype=torch.float64),
        rtol=1e-5,
        atol=1e-9,
    )

    fast = prune_weight("rose", W, H, sparsity, s)
    ref_w, ref_mask = ref_sweep(W, H, perm, bw, **kw)
    assert torch.equal(fast.mask, ref_mask)
    torch.testing.assert_close(fast.weight, ref_w, rtol=1e-6, atol=1e-9)


@settings(max_examples=20, deadline=None)
@given(rows=st.integers(2, 9), cols=widths, spec=sparsity_specs, seed=st.integers(0, 10_000))
def test_sparsegpt_matches_reference(rows, cols, spec, seed):
    sparsity, kw = parse(spec)
    cols = fit_width(cols, sparsity)
    W, H = make_problem(rows, cols, seed)
    fast = prune_weight("sparsegpt", W, H, sparsity, F64)
    bw = [min(128, cols - a) for a in range(0, cols, sparsity.m if sparsity.is_nm else 128)]
    ref_w, ref_mask = ref_sweep(W, H, list(range(cols)), bw, **kw)
    assert torch.equal(fast.mask, ref_mask)
    torch.testing.assert_close(fast.weight, ref_w, rtol=1e-6, atol=1e-9)


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 12), cols=widths, spec=sparsity_specs, seed=st.integers(0, 10_000))
def test_wanda_and_magnitude_match_reference(rows, cols, spec, seed):
    sparsity, kw = parse(spec)
    cols = fit_width(cols, sparsity)
    W, H = make_problem(rows, cols, seed, tokens=64)
    assert torch.equal(prune_weight("wanda", W, H, sparsity).weight, ref_wanda(W, H, **kw))
    assert torch.equal(prune_weight("magnitude", W, None, sparsity).weight, ref_magnitude(W, **kw))


@pytest.mark.parametrize("method", ["rose", "sparsegpt", "wanda", "magnitude"])
@pytest.mark.parametrize("spec", ["0.5", "0.7", "0.33"])
def test_exact_unstructured_sparsity(method, spec):
    """Per block (sweep methods), per row (wanda) or per matrix (magnitude): floor(p * n)."""
    W, H = make_problem(16, 576, seed=3, columnar_block=4 if method == "rose" else None)
    p = float(spec)
    result = prune_weight(method, W, H, spec)
    zeros = result.weight == 0
    if method == "wanda":
        assert (zeros.sum(1) == math.floor(576 * p)).all()
    elif method == "magnitude":
        assert int(zeros.sum()) == math.floor(W.numel() * p)
    else:
        order = result.ordering
        start = 0
        for width in order.block_widths:
            cols = order.permutation[start : start + width]
            assert int(zeros[:, cols].sum()) == math.floor(16 * width * p)
            start += width


@pytest.mark.parametrize("method", ["rose", "sparsegpt", "wanda", "magnitude"])
@pytest.mark.parametrize("spec", ["2:4", "4:8", "1:4"])
def test_nm_pattern_valid_in_original_order(method, spec):
    s = Sparsity.parse(spec)
    W, H = make_problem(12, 576, seed=5, columnar_block=2)
    result = prune_weight(method, W, H, s, PruneSettings(reorder="always"))
    zeros = (result.weight == 0).reshape(12, 576 // s.m, s.m).sum(-1)
    assert (zeros == s.n).all()
    if method == "rose":
        assert result.ordering.reordered
        assert result.ordering.permutation.tolist() != list(range(576))


def test_rose_equals_sparsegpt_bitwise_when_not_columnar():
    W, H = make_problem(32, 576, seed=11)
    W32, H32 = W.float(), H.float()
    rose = prune_weight("rose", W32, H32, "0.6")
    assert not rose.ordering.columnar and not rose.ordering.reordered
    assert rose.ordering.permutation.tolist() == list(range(576))
    sgpt = prune_weight("sparsegpt", W32, H32, "0.6")
    assert torch.equal(rose.weight, sgpt.weight)


def test_narrow_last_block_keeps_its_width():
    W, H = make_problem(8, 576, seed=1, columnar_block=4)  # block 4 is the 64-wide one
    order = rose_order(W, H, Sparsity(0.5))
    assert order.columnar and order.reordered
    assert order.block_widths[0] == 64
    assert sorted(order.permutation[:64].tolist()) == list(range(512, 576))
    assert sorted(order.block_widths) == [64, 128, 128, 128, 128]


@pytest.mark.parametrize("spec", ["0.5", "0.6", "0.7", "0.8", "2:4"])
def test_rose_beats_sparsegpt_on_a_columnar_layer(spec):
    """Large errors in the last block: ROSE sweeps it first and compensates better."""
    W, H = make_problem(64, 512, seed=7, columnar_block=3, tokens=2048)
    rose = prune_weight("rose", W, H, spec, F64)
    sgpt = prune_weight("sparsegpt", W, H, spec, F64)
    assert rose.ordering.columnar
    err_rose = reconstruction_error(W, rose.weight, H)
    err_sgpt = reconstruction_error(W, sgpt.weight, H)
    assert err_rose < err_sgpt, (err_rose, err_sgpt)


def test_deterministic_and_dtype_preserved():
    W, H = make_problem(16, 200, seed=2)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        a = prune_weight("rose", W.to(dtype), H.float(), "0.5", PruneSettings(reorder="always"))
        b = prune_weight("rose", W.to(dtype), H.float(), "0.5", PruneSettings(reorder="always"))
        assert a.weight.dtype == dtype
        assert torch.equal(a.weight, b.weight)
        assert a.sparsity >= 0.5


def test_threads_do_not_change_the_mask():
    W, H = make_problem(24, 256, seed=4)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = prune_weight("rose", W.float(), H.float(), "0.5", PruneSettings(reorder="always"))
        torch.set_num_threads(2)
        two = prune_weight("rose", W.float(), H.float(), "0.5", PruneSettings(reorder="always"))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one.mask, two.mask)


def test_dead_inputs_and_zero_sparsity():
    W, H = make_problem(8, 128, seed=9)
    H[5, :] = 0
    H[:, 5] = 0
    result = prune_weight("sparsegpt", W, H, "0.0", F64)
    assert (result.weight[:, 5] == 0).all()
    dense = prune_weight("magnitude", W, None, 0.0)
    assert torch.equal(dense.weight, W)


def test_hessian_accumulator_any_leading_shape():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(6, 10, 7, generator=g, dtype=torch.float64)
    expected = 2.0 / 6 * sum(X[k].T @ X[k] for k in range(6))
    acc = HessianAccumulator(7, dtype=torch.float64)
    acc.add(X[:2])
    acc.add(X[2:5])
    acc.add(X[5])  # [seq, cols] is one sequence
    torch.testing.assert_close(acc.finalize(), expected)
    acc4 = HessianAccumulator(7, dtype=torch.float64)
    acc4.add(X.reshape(2, 3, 10, 7))
    torch.testing.assert_close(acc4.finalize(), expected)


@pytest.mark.parametrize("columns", [255, 256, 600, 1100])
def test_hessian_from_the_upper_triangle_is_the_full_product(columns):
    """Wide inputs accumulate only the upper triangle's row blocks (2 to 8 of them);
    the result is X^T X, exactly symmetric, over several batches."""
    g = torch.Generator().manual_seed(columns)
    X = torch.randn(3, 40, columns, generator=g, dtype=torch.float64)
    acc = HessianAccumulator(columns, dtype=torch.float64)
    for k in range(3):
        acc.add(X[k])
    H = acc.finalize()
    flat = X.reshape(-1, columns)
    torch.testing.assert_close(H, 2.0 / 3 * flat.T @ flat)
    assert torch.equal(H, H.T)
    assert len(acc._row_blocks) == min(8, max(1, columns // 128))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda W, H: prune_weight("rose", W, H, 1.0), "sparsity must be a fraction"),
        (lambda W, H: prune_weight("rose", W, H, -0.1), "sparsity must be a fraction"),
        (lambda W, H: prune_weight("rose", W, H, "4:4"), "0 < N < M"),
        (lambda W, H: prune_weight("rose", W, H, "2:3"), "multiple of 3"),
        (lambda W, H: prune_weight("rose", W, H, "abc"), "N:M"),
        (lambda W, H: prune_weight("rose", W, H[:10, :10], 0.5), "Hessian shape"),
        (
            lambda W, H: prune_weight(
                "rose", W.index_fill(1, torch.tensor([3]), float("nan")), H, 0.5
            ),
            "NaN",
        ),
        (
            lambda W, H: prune_weight(
                "sparsegpt", W, H.index_fill(0, torch.tensor([3]), float("inf")), 0.5
            ),
            "NaN or Inf",
        ),
        (lambda W, H: prune_weight("nope", W, H, 0.5), "unknown method"),
        (lambda W, H: prune_weight("rose", W, None, 0.5), "needs a Hessian"),
    ],
)
def test_bad_input_raises_clear_value_error(call, message):
    W, H = make_problem(4, 64, seed=0)
    with pytest.raises(ValueError, match=message):
        call(W, H)


def test_not_positive_definite_hessian_gets_more_damping():
    W, _ = make_problem(4, 64, seed=0)
    v = torch.randn(64, 1, dtype=torch.float64)
    H = v @ v.T - 0.5 * torch.eye(64, dtype=torch.float64)  # indefinite
    H.diagonal().abs_()
    result = prune_weight("sparsegpt", W, H, 0.5, F64)
    assert result.damping_retries > 0 and result.damping > 0.01


@pytest.mark.parametrize("spec", ["0.5", "2:4"])
def test_the_order_and_the_heatmap_share_one_selection(spec):
    """rose_order(with_loss_map=True) gives exactly the heatmap loss_map computes on its own."""
    from rose.ordering import loss_map

    g = torch.Generator().manual_seed(3)
    w = torch.randn(96, 200, generator=g)
    x = torch.randn(400, 200, generator=g)
    h = x.T @ x / 400
    sparsity = Sparsity.parse(spec)
    order = rose_order(w, h, sparsity, 128, 0.5, "adaptive", with_loss_map=True)
    assert torch.equal(order.loss_map, loss_map(w, h, sparsity, 128))
    assert rose_order(w, h, sparsity, 128, 0.5, "adaptive").loss_map is None


@pytest.mark.parametrize("levels", [3, 1_000_000])
def test_smallest_mask_breaks_ties_to_the_lower_index(levels):
    """Few distinct values (many ties, the running-count path) and almost none (every tie
    needed, the fast path) both give a stable sort's first `count` entries."""
    generator = torch.Generator().manual_seed(levels)
    values = torch.randint(0, levels, (6, 257), generator=generator).float()
    for count in (0, 1, 100, 256, 257):
        mask = smallest_mask(values, count, dim=1)
        stable = torch.sort(values, dim=1, stable=True).indices[:, :count]
        expected = torch.zeros_like(mask).scatter_(1, stable, True)
        assert torch.equal(mask, expected), count
        whole = smallest_mask(values, count * 6)
        first = torch.sort(values.reshape(-1), stable=True).indices[: count * 6]
        assert torch.equal(
            whole.reshape(-1),
            torch.zeros(values.numel(), dtype=torch.bool).scatter_(0, first, True),
        )


def _stable_first(values: torch.Tensor, count: int) -> torch.Tensor:
    """The reference: a stable sort's first `count` entries of each row."""
    first = torch.sort(values, dim=1, stable=True).indices[:, :count]
    return torch.zeros(values.shape, dtype=torch.bool).scatter_(1, first, True)


@pytest.mark.parametrize("kind", ["continuous", "few levels", "zeros and inf", "negative"])
def test_radix_selection_gives_the_stable_sort_mask(kind):
    """Long float32 rows on CPU take the two-histogram radix select: the same mask as a
    stable sort, also with ties inside and across 16-bit bins, zeros, infinities, and
    negative values (which fall back to kthvalue)."""
    from rose import ordering

    g = torch.Generator().manual_seed(7)
    length = ordering.RADIX_MIN_LENGTH + 1000
    values = torch.rand(3, length, generator=g)
    if kind == "few levels":
        values = torch.randint(0, 5, (3, length), generator=g).float() * 0.37
    elif kind == "zeros and inf":
        values[values < 0.3] = 0.0
        values[values > 0.9] = float("inf")
    elif kind == "negative":
        values -= 0.5
    radix_taken = ordering._radix_mask(values, 10) is not None
    assert radix_taken == (kind != "negative")
    for count in (1, length // 3, length // 2, length - 1):
        mask = smallest_mask(values, count, dim=1)
        assert mask.dtype == torch.bool
        assert torch.equal(mask, _stable_first(values, count)), count
        assert torch.equal(mask, ordering._kthvalue_mask(values, count)), count


def test_pairwise_nm_masks_match_the_stable_sort():
    """Millions of N:M groups go through pairwise ranks: the same masks as a stable sort,
    ties to the lower index, for 2:4, 1:4 and 4:8."""
    from rose.ordering import smallest_per_row_groups

    g = torch.Generator().manual_seed(11)
    values = torch.randint(0, 4, (512, 1024), generator=g).float()  # many ties
    for n, m in [(2, 4), (1, 4), (4, 8)]:
        mask = smallest_per_row_groups(values, n, m)
        assert mask.dtype == torch.bool
        groups = values.reshape(-1, m)
        assert torch.equal(mask.reshape(-1, m), _stable_first(groups, n)), (n, m)


@pytest.mark.parametrize("spec", ["0.5", "0.7", "2:4"])
def test_column_losses_at_radix_sizes(spec):
    """At rows x 128 blocks long enough for the radix path (and a narrow last block that is
    not), the column losses are the would-be-pruned scores a stable sort picks, and the
    heatmap's row sums add up to them."""
    from rose.ordering import loss_map, pruned_losses, scores
    from rose.sparsity import prune_count

    g = torch.Generator().manual_seed(5)
    w = torch.randn(1024, 300, generator=g)
    x = torch.randn(600, 300, generator=g)
    h = x.T @ x / 600
    sparsity = Sparsity.parse(spec)
    score = scores(w, torch.diagonal(h))
    expected = torch.zeros_like(score)
    if sparsity.is_nm:
        groups = score.reshape(-1, sparsity.m)
        keep = _stable_first(groups, sparsity.n).reshape(score.shape)
        expected = score * keep
    else:
        for start in range(0, 300, 128):
            block = score[:, start : start + 128]
            chosen = _stable_first(
                block.reshape(1, -1), prune_count(block.numel(), sparsity.fraction)
            )
            expected[:, start : start + 128] = block * chosen.reshape(block.shape)
    losses = pruned_losses(score, sparsity, 128, per_row=True)
    torch.testing.assert_close(losses.column, expected.sum(dim=0, dtype=torch.float64))
    torch.testing.assert_close(
        losses.row_block.sum(dim=0).double(),
        torch.stack([losses.column[a : a + 128].sum() for a in range(0, 300, 128)]),
        rtol=1e-5,
        atol=0,
    )
    heatmap = loss_map(w, h, sparsity, 128)
    assert heatmap.shape == (64, 3)
    torch.testing.assert_close(heatmap.sum(dim=0).double(), losses.row_block.sum(dim=0).double())


@pytest.mark.parametrize("rows", [40, 64, 1000])
def test_column_sums_from_64_row_partials(rows):
    """The float64 column sums built from 64-row float32 partial sums (with a remainder,
    without one, and only a remainder) agree with a float64 reduction within the error
    bound of float32 summation over 64 terms, along either dim."""
    from rose.ordering import _sum_rows

    g = torch.Generator().manual_seed(rows)
    values = torch.rand(3, rows, 130, generator=g) * 10
    exact = values.double().sum(dim=1)
    summed = _sum_rows(values, dim=1)
    assert summed.dtype == torch.float64 and summed.shape == (3, 130)
    bound = 64 * torch.finfo(torch.float32).eps / 2  # float32 summation of 64 non-negative terms
    torch.testing.assert_close(summed, exact, rtol=bound, atol=0)
    torch.testing.assert_close(_sum_rows(values[0], dim=0), exact[0], rtol=bound, atol=0)


def _nan_cases():
    """A NaN in each selection path: radix-eligible long float32 rows, kthvalue (short rows,
    float64, a NaN with the sign bit that sends the radix path to kthvalue), and N:M groups
    through kthvalue and through pairwise ranks."""
    from rose import ordering

    long = torch.rand(2, ordering.RADIX_MIN_LENGTH + 10)
    long[1, 7] = float("nan")
    negative_nan = long.clone()
    negative_nan[1, 7] = -float("nan")
    short = torch.rand(3, 100, dtype=torch.float64)
    short[0, 99] = float("nan")
    groups = torch.rand(8, 16)
    groups[3, 5] = float("nan")
    many_groups = torch.rand(512, 1024)
    many_groups[100, 3] = float("nan")
    return {
        "radix": (lambda c: smallest_mask(long, c, dim=1), long.shape[1]),
        "radix, whole tensor": (lambda c: smallest_mask(long, c), long.numel()),
        "negative NaN": (lambda c: smallest_mask(negative_nan, c, dim=1), long.shape[1]),
        "kthvalue": (lambda c: smallest_mask(short, c, dim=1), 100),
        "N:M kthvalue": (lambda c: ordering.smallest_per_row_groups(groups, 2, 4), 4),
        "N:M pairwise": (lambda c: ordering.smallest_per_row_groups(many_groups, 2, 4), 4),
        "N:M 4:8 pairwise": (lambda c: ordering.smallest_per_row_groups(many_groups, 4, 8), 8),
    }


@pytest.mark.parametrize("path", list(_nan_cases()))
def test_nan_among_scores_is_refused_by_every_selection(path):
    """A NaN compares false to everything: before, a NaN count-th value gave an empty mask and
    pairwise ranks an uneven one. Every path refuses it instead, whatever the count."""
    from rose.ordering import NaNScoresError

    select, length = _nan_cases()[path]
    for count in (0, 1, length // 2, length - 1, length):
        with pytest.raises(ValueError, match="scores contain NaN") as caught:
            select(count)
        assert caught.type is NaNScoresError, count


def test_nan_scores_name_the_linear(monkeypatch):
    """prune_weight says which Linear's scores held the NaN (its inputs were finite)."""
    from rose import methods, ordering

    W, H = make_problem(4, 64, seed=0)
    for module in (methods, ordering):  # wanda's scores, and the ROSE pre-pruning's
        monkeypatch.setattr(module, "scores", lambda w, h: torch.full(w.shape, float("nan")))
    for method in ("wanda", "rose", "sparsegpt"):
        with pytest.raises(
            ValueError, match=r"^layer 2 mlp.up_proj: the pruning scores contain NaN"
        ):
            prune_weight(method, W, H, 0.5, F64, what="layer 2 mlp.up_proj")


def test_infinities_are_not_nan():
    """+inf bit patterns share the radix select's NaN bin range: they still select."""
    from rose import ordering

    values = torch.rand(2, ordering.RADIX_MIN_LENGTH + 10)
    values[:, ::5] = float("inf")
    assert ordering._radix_mask(values, 10) is not None
    count = values.shape[1] - 3
    assert torch.equal(smallest_mask(values, count, dim=1), _stable_first(values, count))


def _flushing() -> bool:
    """Whether torch flushes denormals on this thread: a denormal made from its bits is lost."""
    denormal = torch.tensor([1], dtype=torch.int32).view(torch.float32)
    return int((denormal * 1.0).view(torch.int32)) == 0


@pytest.mark.parametrize("kind", ["ordinary", "denormals", "all denormal"])
def test_masks_under_flush_denormal_are_the_stable_sort(kind):
    """torch.set_flush_denormal(True) flushes on the calling thread only, so comparisons
    (torch's own sort and kthvalue too) read denormals as zero in some slices and by value in
    others, and the radix select's denormal threshold became 0.0: wrong masks, about half
    the count. The selections run with it off and put it back, so every path (radix,
    kthvalue, N:M kthvalue and pairwise) gives the stable sort's masks, as without the flag."""
    from rose import ordering

    g = torch.Generator().manual_seed(13)
    length = ordering.RADIX_MIN_LENGTH + 1000
    values = torch.rand(3, length, generator=g)
    tiny = values * 1e-39  # made before the flag is set: real denormal bit patterns
    if kind == "denormals":
        values = torch.where(torch.rand(3, length, generator=g) < 0.6, tiny, values)
    elif kind == "all denormal":
        values = tiny
    assert bool((values.view(torch.int32) < (1 << 23)).any()) == (kind != "ordinary")
    short = values[:, :1000].double()  # the kthvalue path
    groups = values[:, : 1 << 16].reshape(-1, 1024)  # 2**16 entries: the pairwise N:M path
    counts = (1, length // 3, length // 2, length - 1)
    expected = {  # a stable sort with the flag off: the values' own order
        "radix": [_stable_first(values, c) for c in counts],
        "kthvalue": [_stable_first(short, c) for c in counts if c < 1000],
        "whole": _stable_first(values.reshape(1, -1), length).reshape(values.shape),
        "N:M": {
            (n, m, size): _stable_first(groups[:, :size].reshape(-1, m), n)
            for n, m in [(2, 4), (1, 4), (4, 8)]
            for size in (16, 1024)  # kthvalue (few groups) and pairwise ranks (many)
        },
    }
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    try:
        assert _flushing()
        masks = {
            "radix": [smallest_mask(values, c, dim=1) for c in counts],
            "kthvalue": [smallest_mask(short, c, dim=1) for c in counts if c < 1000],
            "whole": smallest_mask(values, length),
            "N:M": {
                (n, m, size): ordering.smallest_per_row_groups(groups[:, :size], n, m).reshape(
                    -1, m
                )
                for n, m, size in expected["N:M"]
            },
        }
        assert _flushing()  # put back after every selection
    finally:
        torch.set_flush_denormal(False)
    assert not _flushing()
    for mask, want, count in zip(masks["radix"], expected["radix"], counts, strict=True):
        assert torch.equal(mask, want) and int(mask.sum()) == 3 * count, count
    for mask, want in zip(masks["kthvalue"], expected["kthvalue"], strict=True):
        assert torch.equal(mask, want)
    assert torch.equal(masks["whole"], expected["whole"])
    for key, want in expected["N:M"].items():
        assert torch.equal(masks["N:M"][key], want), key
