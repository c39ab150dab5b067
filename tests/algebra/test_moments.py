"""Pure moment functions: shifted sums, batch moments, exact and EMA merges."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import assert_close, reference_ema, reference_moments
from rlnorm.algebra.moments import (
    Moments,
    batch_moments,
    batch_shift,
    empty_moments,
    merge,
    merge_ema,
    shifted_sums,
)

F64 = torch.float64


def moments_of(x: torch.Tensor, weights: torch.Tensor | None = None, **kwargs) -> Moments:
    """Batch moments of a 2-D batch through the public pipeline."""
    shift = batch_shift(x, weights)
    return batch_moments(shifted_sums(x, weights, shift, **kwargs))


def random_batch(seed: int, rows: int, dim: int, loc: float, scale: float) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.normal(loc, scale, size=(rows, dim)))


def assert_moments_close(actual: Moments, expected: Moments, rtol: float = 1e-12) -> None:
    assert torch.equal(actual.count, expected.count)
    assert_close(actual.weight, expected.weight, rtol=rtol)
    scale = float(expected.mean.abs().max()) if expected.mean.numel() else 0.0
    assert_close(actual.mean, expected.mean, rtol=rtol, atol=rtol * scale)
    assert_close(actual.var, expected.var, rtol=rtol, atol=1e-300)


# --------------------------------------------------------------------- batch moments


@pytest.mark.parametrize(
    ("loc", "scale"),
    [
        (1e6, 1e-3),  # the case: textbook E[x^2] - E[x]^2 gives 0 or negative here
        (-1e6, 1e-3),
        (1e8, 1.0),
        (1e3, 1e-2),
        (0.0, 1e-9),
        (1e12, 1e3),
        (-5.0, 1e-6),
    ],
)
def test_batch_moments_variance_within_1e6_relative_of_two_pass_on_adversarial_offsets(
    loc: float, scale: float
) -> None:
    x = random_batch(0, 5000, 3, loc, scale)
    got = moments_of(x)
    mean, var, _, _ = reference_moments(x)
    assert_close(got.var, var, rtol=1e-6)
    assert_close(got.mean, mean, rtol=1e-14, atol=1e-14 * (abs(loc) + scale))
    assert int(got.count) == 5000
    assert float(got.weight) == 5000.0


def test_batch_moments_stay_precise_when_the_batch_head_is_unrepresentative() -> None:
    # The shift is taken from the first rows; make them far from the bulk of the data.
    x = random_batch(1, 20000, 2, 1e6, 1e-3)
    x[:32] = random_batch(2, 32, 2, 0.0, 1.0)
    got = moments_of(x)
    mean, var, _, _ = reference_moments(x)
    assert_close(got.var, var, rtol=1e-9)
    assert_close(got.mean, mean, rtol=1e-14)


def test_batch_moments_of_constant_data_have_exactly_zero_variance_never_negative() -> None:
    x = torch.full((1000, 4), 123456.789, dtype=F64)
    got = moments_of(x)
    assert torch.equal(got.mean, x[0])
    assert torch.equal(got.var, torch.zeros(4, dtype=F64))


@pytest.mark.parametrize(
    "dtype",
    [
        torch.float16,
        torch.bfloat16,
        torch.float32,
        torch.float64,
        torch.int32,
        torch.int64,
        torch.uint8,
        torch.int8,
    ],
)
def test_batch_moments_match_float64_reference_for_every_input_dtype(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(3)
    if dtype.is_floating_point:
        x = (torch.randn(777, 5, generator=gen, dtype=F64) * 3 + 40).to(dtype)
    else:
        x = torch.randint(0, 100, (777, 5), generator=gen).to(dtype)
    got = moments_of(x)
    assert got.mean.dtype == F64
    assert got.var.dtype == F64
    assert got.count.dtype == torch.int64
    mean, var, total, count = reference_moments(x)
    assert_close(got.mean, mean, rtol=1e-13)
    assert_close(got.var, var, rtol=1e-12)
    assert float(got.weight) == total
    assert int(got.count) == count


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    rows=st.integers(1, 300),
    dim=st.integers(1, 5),
    chunk_elements=st.integers(1, 64),
)
def test_shifted_sums_chunk_size_does_not_change_moments_beyond_1e12(
    seed: int, rows: int, dim: int, chunk_elements: int
) -> None:
    x = random_batch(seed, rows, dim, 50.0, 3.0)
    one_pass = moments_of(x)
    chunked = moments_of(x, chunk_elements=chunk_elements)
    assert_moments_close(chunked, one_pass)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    rows=st.integers(1, 200),
    dim=st.integers(1, 4),
    loc=st.floats(-1e4, 1e4),
    log_scale=st.floats(-3, 3),
    weighted=st.booleans(),
)
def test_batch_moments_agree_with_two_pass_reference_within_1e12(
    seed: int, rows: int, dim: int, loc: float, log_scale: float, weighted: bool
) -> None:
    x = random_batch(seed, rows, dim, loc, 10.0**log_scale)
    weights = None
    if weighted:
        rng = np.random.default_rng(seed + 1)
        w = rng.uniform(0.0, 2.0, size=rows) * (rng.uniform(size=rows) < 0.8)
        w[0] = 1.0  # at least one row with weight
        weights = torch.from_numpy(w)
    got = moments_of(x, weights)
    mean, var, total, count = reference_moments(x, weights)
    assert_close(got.mean, mean, rtol=1e-12, atol=1e-12 * abs(loc))
    # var rounding is relative to the spread around the shift, which stays within the data.
    assert_close(got.var, var, rtol=1e-10, atol=1e-12 * float(var.max()))
    assert_close(got.weight, total, rtol=1e-14)
    assert int(got.count) == count


def test_shifted_sums_skip_and_count_nonfinite_rows_but_not_zero_weight_ones() -> None:
    x = torch.arange(24, dtype=F64).reshape(8, 3)
    x[1, 0] = math.nan
    x[4, 2] = math.inf
    x[6, 1] = -math.inf
    x[7, 1] = math.nan
    weights = torch.ones(8, dtype=F64)
    weights[7] = 0.0  # a masked non-finite row is padding, not a bad sample
    sums = shifted_sums(x, weights, batch_shift(x, weights))
    assert int(sums.nonfinite) == 3
    assert int(sums.count) == 4
    assert float(sums.weight) == 4.0
    assert torch.isfinite(sums.sum).all()
    assert torch.isfinite(sums.sum_sq).all()
    got = batch_moments(sums)
    keep = [0, 2, 3, 5]
    mean, var, _, _ = reference_moments(x[keep])
    assert_close(got.mean, mean, rtol=1e-14)
    assert_close(got.var, var, rtol=1e-13)


def test_batch_shift_ignores_nonfinite_rows_and_falls_back_to_zero_without_data() -> None:
    x = torch.tensor([[math.nan, 1.0], [2.0, 4.0], [4.0, 6.0]], dtype=F64)
    assert torch.equal(batch_shift(x, None), torch.tensor([3.0, 5.0], dtype=F64))
    all_bad = torch.full((3, 2), math.nan, dtype=F64)
    assert torch.equal(batch_shift(all_bad, None), torch.zeros(2, dtype=F64))
    empty = torch.empty(0, 2, dtype=F64)
    assert torch.equal(batch_shift(empty, None), torch.zeros(2, dtype=F64))


def test_batch_moments_of_empty_batch_have_zero_weight_and_count() -> None:
    got = moments_of(torch.empty(0, 3, dtype=torch.float32))
    assert float(got.weight) == 0.0
    assert int(got.count) == 0
    assert torch.isfinite(got.mean).all()
    assert torch.isfinite(got.var).all()


# --------------------------------------------------------------------- exact merge


def random_moments(seed: int, rows: int, loc: float = 7.0, scale: float = 2.0) -> Moments:
    return moments_of(random_batch(seed, rows, 3, loc, scale))


@settings(max_examples=50, deadline=None)
@given(
    seeds=st.tuples(*[st.integers(0, 2**32 - 1)] * 3),
    rows=st.tuples(*[st.integers(1, 60)] * 3),
    locs=st.tuples(*[st.floats(-100, 100)] * 3),
)
def test_merge_is_associative_and_commutative_within_1e12(
    seeds: tuple[int, int, int], rows: tuple[int, int, int], locs: tuple[float, float, float]
) -> None:
    a, b, c = (random_moments(s, n, loc) for s, n, loc in zip(seeds, rows, locs, strict=True))
    assert_moments_close(merge(a, b), merge(b, a))
    assert_moments_close(merge(merge(a, b), c), merge(a, merge(b, c)))
    assert_moments_close(merge(merge(a, c), b), merge(merge(c, b), a))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), rows_a=st.integers(1, 100), rows_b=st.integers(1, 100))
def test_merge_equals_moments_of_concatenated_batches_within_1e12(
    seed: int, rows_a: int, rows_b: int
) -> None:
    xa = random_batch(seed, rows_a, 2, -30.0, 0.5)
    xb = random_batch(seed + 1, rows_b, 2, 12.0, 4.0)
    merged = merge(moments_of(xa), moments_of(xb))
    mean, var, total, count = reference_moments(torch.cat([xa, xb]))
    assert_close(merged.mean, mean, rtol=1e-12, atol=1e-12 * 30)
    assert_close(merged.var, var, rtol=1e-12)
    assert float(merged.weight) == total
    assert int(merged.count) == count


def test_merge_with_empty_moments_is_bitwise_identity_on_both_sides() -> None:
    a = random_moments(5, 17, loc=-3.25)
    empty = empty_moments((3,))
    for merged in (merge(a, empty), merge(empty, a)):
        for got, want in zip(merged, a, strict=True):
            assert torch.equal(got, want)
    empty_batch = moments_of(torch.empty(0, 3, dtype=F64))
    for got, want in zip(merge(a, empty_batch), a, strict=True):
        assert torch.equal(got, want)


def test_merge_of_two_empty_states_keeps_the_initial_mean_zero_variance_one() -> None:
    merged = merge(empty_moments((2,)), empty_moments((2,)))
    assert torch.equal(merged.mean, torch.zeros(2, dtype=F64))
    assert torch.equal(merged.var, torch.ones(2, dtype=F64))
    assert float(merged.weight) == 0.0
    assert int(merged.count) == 0


# --------------------------------------------------------------------- EMA merge


def run_ema(batches: list[torch.Tensor], momentum: float, var_floor: float | None = None):
    state = empty_moments((batches[0].shape[1],))
    for batch in batches:
        state = merge_ema(state, moments_of(batch), momentum, var_floor)
    return state


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    momentum=st.floats(0.0, 0.999),
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=8),
)
def test_merge_ema_matches_documented_recursion_within_1e12(
    seed: int, momentum: float, sizes: list[int]
) -> None:
    batches = [random_batch(seed + i, n, 3, 10.0 * i, 1.0 + i) for i, n in enumerate(sizes)]
    state = run_ema(batches, momentum)
    w, mean, var = reference_ema([b.numpy() for b in batches], momentum)
    assert_close(state.weight, w, rtol=1e-12)
    assert_close(state.mean, mean, rtol=1e-12, atol=1e-12 * 10 * len(sizes))
    assert_close(state.var, var, rtol=1e-11)
    assert int(state.count) == sum(sizes)


def test_merge_ema_first_update_returns_the_batch_itself_no_pull_toward_initial_values() -> None:
    x = random_batch(11, 50, 3, 100.0, 5.0)
    batch = moments_of(x)
    state = merge_ema(empty_moments((3,)), batch, momentum=0.99)
    assert_close(state.mean, batch.mean, rtol=1e-15)
    assert_close(state.var, batch.var, rtol=1e-15)


def test_merge_ema_with_momentum_zero_tracks_the_latest_batch() -> None:
    batches = [random_batch(20 + i, 30, 2, 50.0 * i, 1.0 + i) for i in range(4)]
    state = run_ema(batches, momentum=0.0)
    mean, var, _, _ = reference_moments(batches[-1])
    assert_close(state.mean, mean, rtol=1e-13)
    assert_close(state.var, var, rtol=1e-12)


def test_merge_ema_variance_includes_spread_between_batch_means() -> None:
    # Two constant batches: all the variance is the cross term (law of total variance).
    a = torch.zeros(10, 1, dtype=F64)
    b = torch.full((10, 1), 2.0, dtype=F64)
    state = run_ema([a, b], momentum=0.5)
    # W1 = 0.5, W2 = 0.75; mean = 0 + 0.5/0.75 * 2 = 4/3; var = 0.25*0.5*4/0.5625 = 8/9
    assert_close(state.mean, [4.0 / 3.0], rtol=1e-15)
    assert_close(state.var, [8.0 / 9.0], rtol=1e-15)


def test_merge_ema_with_empty_batch_changes_nothing_including_the_debias_weight() -> None:
    first = moments_of(random_batch(30, 20, 2, 3.0, 1.0))
    second = moments_of(random_batch(31, 20, 2, -8.0, 2.0))
    empty = moments_of(torch.empty(0, 2, dtype=F64))
    state = merge_ema(empty_moments((2,)), first, 0.9)
    after_empty = merge_ema(state, empty, 0.9)
    for got, want in zip(after_empty, state, strict=True):
        assert torch.equal(got, want)
    # ...so that the next real batch gets the same weight as without the empty one.
    with_gap = merge_ema(after_empty, second, 0.9)
    without_gap = merge_ema(state, second, 0.9)
    for got, want in zip(with_gap, without_gap, strict=True):
        assert torch.equal(got, want)


def test_merge_ema_var_floor_lifts_variance_to_fraction_of_batch_second_moment() -> None:
    calm = [random_batch(40 + i, 100, 2, 0.0, 0.01) for i in range(20)]
    shifted = random_batch(60, 100, 2, 100.0, 5.0)
    batches = [*calm, shifted]
    momentum, ratio = 0.99, 0.25
    floored = run_ema(batches, momentum, var_floor=ratio)
    plain = run_ema(batches, momentum)
    batch = moments_of(shifted)
    floor = ratio * (batch.var + (batch.mean - floored.mean) ** 2)
    assert torch.all(floored.var >= floor)
    assert torch.all(floored.var > plain.var)  # the floor is active after the shift
    assert torch.equal(floored.mean, plain.mean)  # and touches only the variance
    # normalized, the shifted batch has a root mean square of at most 1 / sqrt(ratio)
    x = shifted
    rms = torch.sqrt((((x - floored.mean) ** 2) / floored.var).mean(dim=0))
    assert torch.all(rms <= 1.0 / math.sqrt(ratio) + 1e-12)
    _, ref_mean, ref_var = reference_ema([b.numpy() for b in batches], momentum, ratio)
    assert_close(floored.var, ref_var, rtol=1e-10)
    assert_close(floored.mean, ref_mean, rtol=1e-10, atol=1e-10)


def test_merge_ema_var_floor_is_inactive_on_stationary_data() -> None:
    batches = [random_batch(70 + i, 200, 2, 5.0, 1.0) for i in range(10)]
    floored = run_ema(batches, 0.9, var_floor=0.1)
    plain = run_ema(batches, 0.9)
    assert torch.equal(floored.var, plain.var)
    assert torch.equal(floored.mean, plain.mean)


def test_merge_ema_var_floor_ignores_empty_batches() -> None:
    state = run_ema([random_batch(80, 50, 2, 1.0, 1.0)], 0.9, var_floor=0.5)
    empty = moments_of(torch.empty(0, 2, dtype=F64))
    after = merge_ema(state, empty, 0.9, var_floor=0.5)
    assert torch.equal(after.var, state.var)
    assert torch.equal(after.mean, state.mean)
