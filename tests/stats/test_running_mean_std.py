"""``RunningMeanStd``: exact and EMA running statistics as an ``nn.Module``."""

from __future__ import annotations

import io
import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from conftest import (
    assert_close,
    assert_state_equal,
    reference_ema,
    reference_moments,
    state_of,
    to_numpy64,
)
from rlnorm import RunningMeanStd

# Every test runs on the native CPU kernels and on the torch code path.
pytestmark = pytest.mark.usefixtures("backend")

F64 = torch.float64
FLOAT_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def randn(seed: int, *shape: int, loc: float = 0.0, scale: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=F64) * scale + loc


def fitted(shape: tuple[int, ...] = (3,), seed: int = 0, **kwargs) -> RunningMeanStd:
    """A normalizer that has seen some data with distinct means and scales per feature."""
    rms = RunningMeanStd(shape, **kwargs)
    numel = math.prod(shape)
    loc = torch.linspace(-20.0, 40.0, numel, dtype=F64).reshape(shape)
    scale = torch.linspace(0.5, 8.0, numel, dtype=F64).reshape(shape)
    rms.update(randn(seed, 500, *shape) * scale + loc)
    return rms


def load_counts(rms: RunningMeanStd, count: int, mean: float, var: float) -> None:
    """Give ``rms`` a state of ``count`` unit-weight samples through ``load_state_dict``."""
    rms.load_state_dict(
        {
            "mean": torch.full(rms.shape, mean, dtype=F64),
            "var": torch.full(rms.shape, var, dtype=F64),
            "count": torch.tensor(count, dtype=torch.int64),
            "weight_sum": torch.tensor(float(count), dtype=F64),
            "nonfinite_count": torch.tensor(0, dtype=torch.int64),
        }
    )


def assert_stats_close(a: RunningMeanStd, b: RunningMeanStd, rtol: float = 1e-12) -> None:
    assert torch.equal(a.count, b.count)
    assert torch.equal(a.nonfinite_count, b.nonfinite_count)
    assert_close(a.weight_sum, b.weight_sum, rtol=rtol)
    scale = float(b.mean.abs().max()) if b.mean.numel() else 0.0
    assert_close(a.mean, b.mean, rtol=rtol, atol=rtol * scale)
    assert_close(a.var, b.var, rtol=rtol, atol=1e-300)


# --------------------------------------------------------------------- construction


def test_fresh_statistics_are_float64_mean_0_var_1_count_0_without_fake_prior_samples() -> None:
    rms = RunningMeanStd((2, 3))
    assert rms.mean.dtype == F64
    assert rms.var.dtype == F64
    assert rms.count.dtype == torch.int64
    assert rms.count.shape == ()
    assert torch.equal(rms.mean, torch.zeros(2, 3, dtype=F64))
    assert torch.equal(rms.var, torch.ones(2, 3, dtype=F64))
    assert int(rms.count) == 0
    assert torch.equal(rms.std, torch.ones(2, 3, dtype=F64))


def test_first_update_gives_exactly_the_batch_statistics_no_fake_prior_samples() -> None:
    rms = RunningMeanStd(4)
    x = randn(1, 64, 4, loc=1000.0, scale=0.01)
    rms.update(x)
    mean, var, _, _ = reference_moments(x)
    assert_close(rms.mean, mean, rtol=1e-15)
    assert_close(rms.var, var, rtol=1e-9)  # a count-1 prior would give ~1e3 x too much
    assert int(rms.count) == 64


@pytest.mark.parametrize("shape", [3, (3,), [3], torch.Size([3])])
def test_shape_accepts_int_tuple_list_and_torch_size(shape) -> None:
    assert RunningMeanStd(shape).shape == (3,)


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu")])
def test_device_accepts_str_and_torch_device(device) -> None:
    rms = RunningMeanStd(2, device=device)
    assert rms.mean.device == torch.device("cpu")


@pytest.mark.parametrize("momentum", [-0.1, 1.0, 1.5, math.nan, math.inf, "x", True])
def test_invalid_momentum_error_names_the_argument_and_the_value(momentum) -> None:
    with pytest.raises((ValueError, TypeError)) as err:
        RunningMeanStd(3, momentum=momentum)
    assert "`momentum`" in str(err.value)
    assert repr(momentum) in str(err.value)


@pytest.mark.parametrize("momentum", [-0.1, 1.0, 1.5])
def test_momentum_outside_unit_interval_is_a_value_error(momentum: float) -> None:
    with pytest.raises(ValueError, match="`momentum`"):
        RunningMeanStd(3, momentum=momentum)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"shape": -1}, "shape"),
        ({"shape": (2, -3)}, "shape"),
        ({"shape": 2.5}, "shape"),
        ({"clip": 0}, "clip"),
        ({"clip": -1.0}, "clip"),
        ({"epsilon": 0}, "epsilon"),
        ({"epsilon": math.nan}, "epsilon"),
        ({"until": 0}, "until"),
        ({"until": 1.5}, "until"),
        ({"nonfinite": "ignore"}, "nonfinite"),
        ({"device": "nonsense"}, "device"),
        ({"device": 3.0}, "device"),
        ({"var_floor": 0.1}, "var_floor"),
        ({"momentum": 0.9, "var_floor": 0.0}, "var_floor"),
        ({"momentum": 0.9, "var_floor": 1.5}, "var_floor"),
        ({"center": 1}, "center"),
        ({"sync": "yes"}, "sync"),
    ],
)
def test_bad_constructor_argument_error_names_the_argument(kwargs: dict, name: str) -> None:
    kwargs = {"shape": 3, **kwargs}
    with pytest.raises((ValueError, TypeError), match=f"`{name}`"):
        RunningMeanStd(**kwargs)


def test_wrong_trailing_shape_error_names_x_and_both_shapes() -> None:
    rms = RunningMeanStd((2, 3))
    for bad in (torch.zeros(4, 3, 2), torch.zeros(3), torch.zeros(5, 2, 4)):
        with pytest.raises(ValueError, match="`x`") as err:
            rms.update(bad)
        assert "(2, 3)" in str(err.value)
        assert str(tuple(bad.shape)) in str(err.value)
        with pytest.raises(ValueError, match="`x`"):
            rms.normalize(bad)
        with pytest.raises(ValueError, match="`y`"):
            rms.denormalize(bad)


def test_wrong_mask_shape_error_names_mask_and_both_shapes() -> None:
    rms = RunningMeanStd(2)
    with pytest.raises(ValueError, match="`mask`") as err:
        rms.update(torch.zeros(4, 5, 2), mask=torch.ones(5, 4, dtype=torch.bool))
    assert "(4, 5)" in str(err.value)
    assert "(5, 4)" in str(err.value)
    with pytest.raises(TypeError, match=r"`mask` must be a torch.Tensor, a NumPy array.*got str"):
        rms.update(torch.zeros(4, 2), mask="all")


def test_non_numeric_or_complex_input_error_names_the_argument_and_its_type() -> None:
    rms = RunningMeanStd(2)
    with pytest.raises(TypeError, match=r"`x` must be a torch.Tensor, a NumPy array.*got str"):
        rms.update("obs")
    with pytest.raises(TypeError, match=r"`x`.*got dict"):
        rms.update({"a": np.zeros((3, 2))})
    with pytest.raises(TypeError, match=r"`x`"):
        rms.normalize(torch.zeros(3, 2, dtype=torch.complex64))
    with pytest.raises(TypeError, match=r"`y`.*got object"):
        rms.denormalize(object())


def test_numpy_arrays_and_lists_give_the_statistics_and_outputs_of_tensors() -> None:
    data = np.random.default_rng(0).normal(3.0, 2.0, size=(64, 2))
    from_numpy, from_tensor = RunningMeanStd(2), RunningMeanStd(2)
    from_numpy.update(data, mask=np.arange(64) % 3 != 0)
    from_tensor.update(torch.as_tensor(data), mask=torch.arange(64) % 3 != 0)
    assert_state_equal(state_of(from_numpy), state_of(from_tensor))
    out = from_numpy.normalize(data[:4])
    assert isinstance(out, torch.Tensor)
    assert out.dtype == torch.float64  # NumPy's float64 stays float64
    assert torch.equal(out, from_tensor.normalize(torch.as_tensor(data[:4])))
    assert torch.equal(
        from_numpy.normalize([[3.0, 3.0]]), from_tensor.normalize(torch.tensor([[3.0, 3.0]]))
    )
    single = from_numpy.normalize(np.float32(3.0) * np.ones(2, dtype=np.float32))
    assert single.dtype == torch.float32
    assert single.shape == (2,)


def test_failed_update_changes_nothing() -> None:
    rms = fitted()
    before = state_of(rms)
    with pytest.raises(ValueError, match="`x`"):
        rms.update(torch.zeros(4, 2))
    with pytest.raises(ValueError, match="`mask`"):
        rms.update(torch.zeros(4, 3), mask=torch.ones(5))
    assert_state_equal(state_of(rms), before)


# --------------------------------------------------------------------- exact mode


FEATURE_SHAPES = [(), (1,), (5,), (2, 3), (3, 1, 2)]


@pytest.mark.parametrize("shape", FEATURE_SHAPES, ids=str)
@settings(max_examples=12, deadline=None)
@given(
    rows=st.integers(1, 120),
    cuts=st.lists(st.integers(0, 120), max_size=6),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    loc=st.floats(-1e3, 1e3),
    log_scale=st.floats(-2, 2),
    seed=st.integers(0, 2**31),
)
def test_chunked_updates_equal_one_batch_within_1e12(
    shape: tuple[int, ...],
    rows: int,
    cuts: list[int],
    dtype: torch.dtype,
    loc: float,
    log_scale: float,
    seed: int,
) -> None:
    x = randn(seed, rows, *shape, loc=loc, scale=10.0**log_scale).to(dtype)
    whole = RunningMeanStd(shape)
    whole.update(x)
    chunked = RunningMeanStd(shape)
    bounds = [0, *sorted(min(c, rows) for c in cuts), rows]
    for start, stop in itertools.pairwise(bounds):
        chunked.update(x[start:stop])  # includes empty chunks when cuts repeat
    assert_stats_close(chunked, whole)
    mean, var, total, count = reference_moments(x, feature_ndim=len(shape))
    assert_close(whole.mean, mean, rtol=1e-12, atol=1e-12 * abs(loc))
    assert_close(whole.var, var, rtol=1e-10)
    assert int(whole.count) == count == rows
    assert float(whole.weight_sum) == total


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 80),
    cuts=st.lists(st.integers(0, 80), max_size=4),
    seed=st.integers(0, 2**31),
)
def test_chunked_weighted_updates_equal_one_weighted_batch_within_1e12(
    rows: int, cuts: list[int], seed: int
) -> None:
    x = randn(seed, rows, 2, loc=-300.0, scale=4.0)
    gen = torch.Generator().manual_seed(seed + 1)
    weights = torch.rand(rows, generator=gen, dtype=F64) * 3
    weights[torch.rand(rows, generator=gen) < 0.3] = 0.0
    whole = RunningMeanStd(2)
    whole.update(x, mask=weights)
    chunked = RunningMeanStd(2)
    bounds = [0, *sorted(min(c, rows) for c in cuts), rows]
    for start, stop in itertools.pairwise(bounds):
        chunked.update(x[start:stop], mask=weights[start:stop])
    assert_stats_close(chunked, whole)


@pytest.mark.parametrize(("loc", "scale"), [(1e6, 1e-3), (-1e7, 1e-2), (1e9, 1.0)])
def test_adversarial_offsets_variance_within_1e6_relative_over_many_updates(
    loc: float, scale: float
) -> None:
    rms = RunningMeanStd(2)
    batches = [randn(i, 1000, 2, loc=loc, scale=scale) for i in range(10)]
    for batch in batches:
        rms.update(batch)
    mean, var, _, _ = reference_moments(torch.cat(batches))
    assert_close(rms.var, var, rtol=1e-6)
    assert_close(rms.mean, mean, rtol=1e-14)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_low_precision_inputs_accumulate_exactly_in_float64(dtype: torch.dtype) -> None:
    x = randn(3, 400, 4, loc=12.0, scale=3.0).to(dtype)
    rms = RunningMeanStd(4)
    for chunk in x.split(37):
        rms.update(chunk)
    assert rms.mean.dtype == F64
    assert rms.var.dtype == F64
    mean, var, _, _ = reference_moments(x)
    assert_close(rms.mean, mean, rtol=1e-13)
    assert_close(rms.var, var, rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_integer_and_bool_inputs_accumulate_like_their_float64_values(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(4)
    high = 2 if dtype == torch.bool else 200
    x = torch.randint(0, high, (300, 3), generator=gen).to(dtype)
    rms = RunningMeanStd(3)
    rms.update(x)
    mean, var, _, _ = reference_moments(x.to(F64))
    assert_close(rms.mean, mean, rtol=1e-14)
    assert_close(rms.var, var, rtol=1e-13)


def test_leading_batch_dims_are_bitwise_the_same_as_flattened_rows() -> None:
    x = randn(5, 4, 6, 7, 3, loc=3.0)
    mask = torch.rand(4, 6, 7, generator=torch.Generator().manual_seed(6)) > 0.3
    nested = RunningMeanStd(3)
    nested.update(x, mask=mask)
    flat = RunningMeanStd(3)
    flat.update(x.reshape(-1, 3), mask=mask.reshape(-1))
    assert_state_equal(state_of(nested), state_of(flat))


@pytest.mark.parametrize("shape", [(2, 3), (3, 1, 2), (1, 4), (4, 1)], ids=str)
def test_multi_dim_feature_shape_statistics_match_reference_per_element(
    shape: tuple[int, ...],
) -> None:
    # e.g. image observations (C, H, W): one mean and variance per element
    x = randn(24, 7, 5, *shape, loc=3.0, scale=2.0)
    rms = RunningMeanStd(shape)
    rms.update(x, mask=torch.ones(7, 5, dtype=torch.bool))
    rms.update(x[0])
    mean, var, _, count = reference_moments(
        torch.cat([x.flatten(0, 1), x[0]]), feature_ndim=len(shape)
    )
    assert rms.mean.shape == shape
    assert rms.var.shape == shape
    assert_close(rms.mean, mean.reshape(shape), rtol=1e-13)
    assert_close(rms.var, var.reshape(shape), rtol=1e-12)
    assert int(rms.count) == count == 40
    y = rms.normalize(x[1])
    assert y.shape == x[1].shape


def test_scalar_shape_takes_any_leading_dims() -> None:
    x = randn(7, 5, 11, loc=2.0)
    rms = RunningMeanStd(())
    rms.update(x)
    assert rms.mean.shape == ()
    mean, var, _, _ = reference_moments(x.reshape(-1, 1))
    assert_close(rms.mean, mean[0], rtol=1e-14)
    assert_close(rms.var, var[0], rtol=1e-13)
    assert int(rms.count) == 55


def test_single_sample_without_batch_dim_counts_as_one_row() -> None:
    rms = RunningMeanStd(3)
    rms.update(torch.tensor([1.0, 2.0, 3.0]))
    assert int(rms.count) == 1
    assert torch.equal(rms.mean, torch.tensor([1.0, 2.0, 3.0], dtype=F64))
    assert torch.equal(rms.var, torch.zeros(3, dtype=F64))


def test_bool_mask_equals_updating_with_the_kept_rows_within_1e12() -> None:
    x = randn(8, 200, 3, loc=50.0, scale=2.0)
    mask = torch.rand(200, generator=torch.Generator().manual_seed(9)) > 0.4
    mask[:32] = False  # the masked head must not steer anything
    masked = RunningMeanStd(3)
    masked.update(x, mask=mask)
    kept = RunningMeanStd(3)
    kept.update(x[mask])
    assert_stats_close(masked, kept)
    assert int(masked.count) == int(mask.sum())


def test_float_mask_weights_equal_the_weighted_two_pass_reference() -> None:
    x = randn(10, 300, 2, loc=-7.0, scale=3.0)
    weights = torch.rand(300, generator=torch.Generator().manual_seed(11), dtype=F64) * 2
    weights[::5] = 0.0
    rms = RunningMeanStd(2)
    rms.update(x, mask=weights)
    mean, var, total, count = reference_moments(x, weights)
    assert_close(rms.mean, mean, rtol=1e-13)
    assert_close(rms.var, var, rtol=1e-12)
    assert_close(rms.weight_sum, total, rtol=1e-14)
    assert int(rms.count) == count == 240


def test_integer_weights_equal_repeating_rows() -> None:
    x = randn(12, 50, 2, loc=4.0)
    reps = torch.randint(0, 4, (50,), generator=torch.Generator().manual_seed(13))
    weighted = RunningMeanStd(2)
    weighted.update(x, mask=reps.to(F64))
    repeated = RunningMeanStd(2)
    repeated.update(x.repeat_interleave(reps, dim=0))
    assert_close(weighted.mean, repeated.mean, rtol=1e-13)
    assert_close(weighted.var, repeated.var, rtol=1e-12)
    assert float(weighted.weight_sum) == float(reps.sum())


@pytest.mark.parametrize("momentum", [None, 0.9], ids=["exact", "ema"])
@pytest.mark.parametrize(
    "batch",
    ["empty", "all_masked_bool", "all_zero_weight", "zero_leading_dim"],
)
def test_empty_and_all_masked_batches_change_nothing(momentum: float | None, batch: str) -> None:
    rms = fitted(momentum=momentum)
    before = state_of(rms)
    if batch == "empty":
        result = rms.update(torch.empty(0, 3))
    elif batch == "all_masked_bool":
        result = rms.update(randn(1, 10, 3), mask=torch.zeros(10, dtype=torch.bool))
    elif batch == "all_zero_weight":
        result = rms.update(randn(1, 10, 3), mask=torch.zeros(10, dtype=F64))
    else:
        result = rms.update(torch.empty(4, 0, 3), mask=torch.ones(4, 0, dtype=torch.bool))
    assert float(result.weight) == 0.0
    assert int(result.count) == 0
    assert_state_equal(state_of(rms), before)


def test_empty_batch_before_any_data_keeps_the_identity_normalization() -> None:
    rms = RunningMeanStd(3)
    rms.update(torch.empty(0, 3))
    x = randn(2, 5, 3, loc=100.0)
    assert torch.equal(rms.normalize(x), x)
    assert int(rms.count) == 0


def test_update_returns_the_batch_moments() -> None:
    rms = fitted()
    x = randn(21, 40, 3, loc=9.0)
    batch = rms.update(x)
    mean, var, total, count = reference_moments(x)
    assert batch.mean.shape == (3,)
    assert_close(batch.mean, mean, rtol=1e-14)
    assert_close(batch.var, var, rtol=1e-13)
    assert float(batch.weight) == total
    assert int(batch.count) == count


def test_count_past_2_pow_24_stays_exact() -> None:
    rms = RunningMeanStd(1)
    load_counts(rms, 2**24, mean=5.0, var=1.0)
    for _ in range(3):
        rms.update(torch.tensor([[5.0]], dtype=torch.float32))
    assert int(rms.count) == 2**24 + 3
    assert float(rms.weight_sum) == 2**24 + 3
    assert torch.equal(rms.mean, torch.tensor([5.0], dtype=F64))


def test_count_past_2_pow_31_stays_exact_and_mean_moves_correctly() -> None:
    rms = RunningMeanStd(2)
    n0 = 2**31
    load_counts(rms, n0, mean=1.0, var=4.0)
    x = torch.full((10, 2), 3.0, dtype=F64)
    rms.update(x)
    assert rms.count.dtype == torch.int64
    assert int(rms.count) == n0 + 10
    assert float(rms.weight_sum) == n0 + 10
    n = n0 + 10
    want_mean = Fraction(1) + Fraction(2) * Fraction(10, n)
    want_var = Fraction(4 * n0, n) + Fraction(n0 * 10, n * n) * 4
    assert_close(rms.mean, [float(want_mean)] * 2, rtol=1e-15)
    assert_close(rms.var, [float(want_var)] * 2, rtol=1e-15)


def test_merge_of_two_counts_past_2_pow_31_stays_exact() -> None:
    a, b = RunningMeanStd(1), RunningMeanStd(1)
    load_counts(a, 2**31 + 1, mean=0.0, var=1.0)
    load_counts(b, 2**31 + 3, mean=0.0, var=1.0)
    a.merge_(b)
    assert int(a.count) == 2**32 + 4
    assert float(a.weight_sum) == 2**32 + 4


def test_ten_billion_merged_samples_keep_mean_precision() -> None:
    parts = []
    for k in range(10):
        part = RunningMeanStd(1)
        load_counts(part, 10**9, mean=1000.0 + k * 1e-6, var=1e-4)
        parts.append(part)
    total = RunningMeanStd(1)
    for part in parts:
        total.merge_(part)
    assert int(total.count) == 10**10
    means = [Fraction(1000.0 + k * 1e-6) for k in range(10)]
    want_mean = sum(means) / 10
    want_var = Fraction(1e-4) + sum((m - want_mean) ** 2 for m in means) / 10
    assert_close(total.mean, [float(want_mean)], rtol=1e-15)
    assert_close(total.var, [float(want_var)], rtol=1e-10)
    # 1000 more samples at +0.5 move the mean by ~5e-8; a float32 mean would not move at all.
    total.update(torch.full((1000, 1), float(want_mean) + 0.5, dtype=F64))
    n = 10**10 + 1000
    moved = want_mean + Fraction(float(want_mean) + 0.5) * 1000 / n - want_mean * 1000 / n
    assert float(total.mean[0]) > float(want_mean)
    assert_close(total.mean, [float(moved)], rtol=0, atol=2e-12)
    assert int(total.count) == n


def test_until_stops_updating_once_count_reaches_it_and_the_crossing_batch_is_taken_whole() -> None:
    rms = RunningMeanStd(2, until=100)
    x = randn(14, 200, 2, loc=3.0)
    rms.update(x[:60])
    assert int(rms.count) == 60
    rms.update(x[60:120])  # crosses 100: taken whole
    assert int(rms.count) == 120
    frozen = state_of(rms)
    rms.update(x[120:170])
    rms.update(x[170:], mask=torch.ones(30, dtype=torch.bool))
    assert_state_equal(state_of(rms), frozen)
    mean, var, _, _ = reference_moments(x[:120])
    assert_close(rms.mean, mean, rtol=1e-13)
    assert_close(rms.var, var, rtol=1e-12)


def test_until_reached_exactly_stops_further_updates() -> None:
    rms = RunningMeanStd((), until=10)
    rms.update(torch.arange(10.0))
    frozen = state_of(rms)
    rms.update(torch.arange(5.0) + 100)
    assert_state_equal(state_of(rms), frozen)


# --------------------------------------------------------------------- non-finite input


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_nan_and_inf_rows_are_skipped_counted_and_stats_equal_finite_rows_alone(
    dtype: torch.dtype,
) -> None:
    x = randn(15, 100, 3, loc=20.0, scale=2.0).to(dtype)
    x[0, 1] = math.nan  # in the head the shift is taken from
    x[5, 0] = math.inf
    x[17, 2] = -math.inf
    x[60] = math.nan
    bad = torch.zeros(100, dtype=torch.bool)
    bad[[0, 5, 17, 60]] = True
    rms = RunningMeanStd(3)
    rms.update(x)
    assert int(rms.nonfinite_count) == 4
    assert int(rms.count) == 96
    assert torch.isfinite(rms.mean).all()
    assert torch.isfinite(rms.var).all()
    clean = RunningMeanStd(3)
    clean.update(x[~bad])
    assert_close(rms.mean, clean.mean, rtol=1e-12)
    assert_close(rms.var, clean.var, rtol=1e-12)
    assert torch.equal(rms.count, clean.count)


def test_masked_out_nan_rows_are_padding_and_not_counted_as_nonfinite() -> None:
    x = randn(16, 10, 2)
    x[3] = math.nan
    mask = torch.ones(10, dtype=torch.bool)
    mask[3] = False
    rms = RunningMeanStd(2, nonfinite="raise")
    rms.update(x, mask=mask)  # must not raise
    assert int(rms.nonfinite_count) == 0
    assert int(rms.count) == 9


def test_all_nonfinite_batch_only_increments_nonfinite_count() -> None:
    rms = fitted()
    before = state_of(rms)
    rms.update(torch.full((7, 3), math.nan))
    after = state_of(rms)
    assert int(after.pop("nonfinite_count")) == int(before.pop("nonfinite_count")) + 7
    assert_state_equal(after, before)


@pytest.mark.parametrize("momentum", [None, 0.5])
def test_statistics_never_become_nan_or_inf_over_a_stream_with_bad_rows(
    momentum: float | None,
) -> None:
    rms = RunningMeanStd(2, momentum=momentum)
    for i in range(20):
        x = randn(100 + i, 16, 2, loc=i)
        x[i % 16, i % 2] = [math.nan, math.inf, -math.inf][i % 3]
        rms.update(x)
        assert torch.isfinite(rms.mean).all()
        assert torch.isfinite(rms.var).all()
        assert torch.isfinite(rms.normalize(x[(i + 1) % 16])).all()
    assert int(rms.nonfinite_count) == 20


def test_finite_values_whose_square_overflows_float64_are_skipped_and_counted() -> None:
    x = torch.zeros(40, 1, dtype=F64)
    x[35] = 1e200
    rms = RunningMeanStd(1)
    rms.update(x)
    assert int(rms.nonfinite_count) == 1
    assert torch.equal(rms.mean, torch.zeros(1, dtype=F64))
    assert torch.equal(rms.var, torch.zeros(1, dtype=F64))


def test_huge_finite_values_whose_squares_sum_past_float64_max_never_make_statistics_inf() -> None:
    # Each row's square is finite (1e308), but their sum overflows: the issue promises the
    # statistics never become NaN or Inf, e.g. when a diverging simulator blows up.
    x = torch.zeros(36, 1, dtype=F64)
    x[32:] = 1e154
    rms = RunningMeanStd(1)
    rms.update(x)
    assert torch.isfinite(rms.mean).all(), rms.mean
    assert torch.isfinite(rms.var).all(), rms.var


def test_nonfinite_raise_raises_value_error_and_changes_nothing() -> None:
    rms = fitted(nonfinite="raise")
    before = state_of(rms)
    x = randn(17, 10, 3)
    x[4, 1] = math.nan
    x[8, 0] = math.inf
    with pytest.raises(ValueError, match="NaN or Inf") as err:
        rms.update(x)
    assert "2 row" in str(err.value)
    assert_state_equal(state_of(rms), before)
    rms.update(x[:4])  # clean rows still work afterwards
    assert int(rms.count) == int(before["count"]) + 4


# --------------------------------------------------------------------- normalize


def test_normalize_is_clamp_of_centered_over_sqrt_var_plus_epsilon() -> None:
    rms = fitted(clip=3.0, epsilon=1e-4)
    x = randn(18, 64, 3, loc=10.0, scale=30.0)
    got = rms.normalize(x)
    mean, var = to_numpy64(rms.mean), to_numpy64(rms.var)
    want = np.clip((to_numpy64(x) - mean) / np.sqrt(var + 1e-4), -3.0, 3.0)
    assert got.dtype == F64
    assert_close(got, want, rtol=1e-13, atol=1e-13)
    assert float(got.abs().max()) == 3.0  # some values were clipped


def test_float32_normalize_is_accurate_to_float32_precision_far_from_zero() -> None:
    rms = RunningMeanStd(3, clip=None)
    x = (torch.randn(1000, 3, dtype=F64) * 0.5 + torch.tensor([1e3, -3e4, 1e5])).float()
    rms.update(x)
    exact = (x.double() - rms.mean - rms.mean_residual) / (rms.var + rms.epsilon).sqrt()
    err = (rms.normalize(x).double() - exact).abs().max()
    # A float32 mean alone would be off by up to ulp(1e5) / 2 / std = 8e-3 here.
    assert float(err) < 2e-6


def test_normalize_clips_to_exactly_plus_minus_clip() -> None:
    rms = fitted(clip=5.0)
    x = torch.tensor([[1e9, -1e9, 1e9]], dtype=F64)
    assert torch.equal(rms.normalize(x), torch.tensor([[5.0, -5.0, 5.0]], dtype=F64))


def test_clip_none_leaves_normalized_values_unbounded() -> None:
    rms = fitted(clip=None)
    x = torch.tensor([[1e6, -1e6, 1e6]], dtype=F64)
    got = rms.normalize(x)
    want = (x - rms.mean) / torch.sqrt(rms.var + 1e-8)
    assert_close(got, want, rtol=1e-14)
    assert float(got.abs().min()) > 1e4


def test_center_false_only_divides_by_the_standard_deviation() -> None:
    rms = fitted(center=False, clip=None)
    x = randn(19, 10, 3, loc=5.0)
    want = x / torch.sqrt(rms.var + 1e-8)
    assert_close(rms.normalize(x), want, rtol=1e-14)
    assert_close(rms.denormalize(rms.normalize(x)), x, rtol=1e-13)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("momentum", [None, 0.9])
def test_normalize_before_first_update_is_bitwise_identity(
    dtype: torch.dtype, momentum: float | None
) -> None:
    rms = RunningMeanStd(4, clip=1.0, momentum=momentum)  # no clamp before any data either
    finfo = torch.finfo(dtype)
    x = torch.tensor(
        [[finfo.max, -finfo.max, finfo.tiny, -0.0], [0.0, 1e-3, 12345.0, -7.5]], dtype=F64
    ).to(dtype)
    got = rms.normalize(x)
    assert got.dtype == dtype
    assert torch.equal(got, x)
    assert torch.equal(got.view(torch.int8), x.view(torch.int8))  # -0.0 stays -0.0
    assert torch.equal(rms.denormalize(x), x)


def test_normalize_before_first_update_keeps_nan_and_inf_in_place() -> None:
    rms = RunningMeanStd(3)
    x = torch.tensor([[math.nan, math.inf, -math.inf]])
    got = rms.normalize(x)
    assert torch.isnan(got[0, 0])
    assert got[0, 1] == math.inf
    assert got[0, 2] == -math.inf


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_normalize_and_denormalize_preserve_the_input_dtype(dtype: torch.dtype) -> None:
    rms = fitted(clip=None)
    x = randn(20, 16, 3, loc=10.0, scale=5.0).to(dtype)
    y = rms.normalize(x)
    assert y.dtype == dtype
    assert rms.denormalize(y).dtype == dtype
    want = (to_numpy64(x) - to_numpy64(rms.mean)) / np.sqrt(to_numpy64(rms.var) + 1e-8)
    tol = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-6, torch.float64: 1e-14}
    assert_close(y, want, rtol=tol[dtype], atol=tol[dtype])


def test_normalize_of_integer_input_returns_default_float_dtype() -> None:
    rms = fitted()
    x = torch.arange(12).reshape(4, 3)
    got = rms.normalize(x)
    assert got.dtype == torch.get_default_dtype()
    want = (x.to(F64) - rms.mean) / torch.sqrt(rms.var + 1e-8)
    assert_close(got, want.clamp(-10, 10), rtol=1e-6, atol=1e-6)
    fresh = RunningMeanStd(3)
    assert torch.equal(fresh.normalize(x), x.to(torch.get_default_dtype()))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), loc=st.floats(-1e4, 1e4), log_scale=st.floats(-3, 3))
def test_denormalize_inverts_normalize_where_not_clipped_within_1e12(
    seed: int, loc: float, log_scale: float
) -> None:
    scale = 10.0**log_scale
    rms = RunningMeanStd(3, clip=None)
    rms.update(randn(seed, 50, 3, loc=loc, scale=scale))
    x = randn(seed + 1, 20, 3, loc=loc, scale=scale)
    back = rms.denormalize(rms.normalize(x))
    assert_close(back, x, rtol=1e-12, atol=1e-12 * (abs(loc) + scale))


def test_changing_clip_epsilon_or_center_after_normalize_takes_effect_immediately() -> None:
    rms = fitted(clip=10.0)
    x = randn(25, 8, 3, loc=10.0, scale=100.0)
    rms.normalize(x)  # eager normalize may cache derived tensors; they must not go stale
    rms.clip = 0.5
    assert float(rms.normalize(x).abs().max()) == 0.5
    rms.clip, rms.epsilon = None, 1e4
    want = (x - rms.mean) / torch.sqrt(rms.var + 1e4)
    assert_close(rms.normalize(x), want, rtol=1e-13)
    rms.center = False
    assert_close(rms.normalize(x), x / torch.sqrt(rms.var + 1e4), rtol=1e-13)


def test_forward_is_normalize_so_the_module_sits_in_sequential() -> None:
    rms = fitted()
    model = nn.Sequential(rms, nn.Flatten())
    x = randn(22, 5, 3, loc=2.0)
    assert torch.equal(model(x), rms.normalize(x))


def test_std_is_sqrt_of_var() -> None:
    rms = fitted()
    assert torch.equal(rms.std, rms.var.sqrt())


def test_reset_returns_to_the_fresh_state() -> None:
    rms = fitted()
    rms.update(torch.full((2, 3), math.nan))
    rms.reset()
    assert_state_equal(state_of(rms), state_of(RunningMeanStd(3)))
    x = randn(23, 4, 3)
    assert torch.equal(rms.normalize(x), x)


def test_extra_repr_shows_shape_and_mode() -> None:
    text = repr(RunningMeanStd((2, 3), momentum=0.9, until=5))
    assert "shape=(2, 3)" in text
    assert "momentum=0.9" in text
    assert "until=5" in text
    assert "exact" in repr(RunningMeanStd(1))


# --------------------------------------------------------------------- EMA mode


def ema_reference_module(batches: list[torch.Tensor], momentum: float, **kwargs):
    rms = RunningMeanStd(batches[0].shape[1:], momentum=momentum, **kwargs)
    for batch in batches:
        rms.update(batch)
    flat = [to_numpy64(b).reshape(b.shape[0], -1) for b in batches]
    return rms, reference_ema(flat, momentum, kwargs.get("var_floor"))


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    momentum=st.floats(0.0, 0.999),
    sizes=st.lists(st.integers(1, 30), min_size=1, max_size=8),
)
def test_ema_mode_matches_hand_written_reference_within_1e12(
    seed: int, momentum: float, sizes: list[int]
) -> None:
    batches = [randn(seed + i, n, 2, loc=5.0 * i, scale=1.0 + i) for i, n in enumerate(sizes)]
    rms, (w, mean, var) = ema_reference_module(batches, momentum)
    assert_close(rms.weight_sum, w, rtol=1e-12)
    assert_close(rms.mean, mean, rtol=1e-12, atol=1e-12 * 5 * len(sizes))
    assert_close(rms.var, var, rtol=1e-11)
    assert int(rms.count) == sum(sizes)


def test_ema_mode_skips_nan_rows_like_the_reference_without_them() -> None:
    batches = [randn(30 + i, 20, 2, loc=float(i)) for i in range(5)]
    batches[2][3, 1] = math.nan
    rms, (_, mean, var) = ema_reference_module(batches, 0.8)
    assert_close(rms.mean, mean, rtol=1e-12)
    assert_close(rms.var, var, rtol=1e-12)
    assert int(rms.nonfinite_count) == 1


def test_ema_momentum_zero_tracks_the_latest_batch() -> None:
    rms = RunningMeanStd(3, momentum=0.0)
    for i in range(5):
        x = randn(40 + i, 30, 3, loc=100.0 * i, scale=1.0 + i)
        rms.update(x)
        mean, var, _, _ = reference_moments(x)
        assert_close(rms.mean, mean, rtol=1e-13)
        assert_close(rms.var, var, rtol=1e-12)


def test_ema_first_update_equals_the_batch_statistics() -> None:
    rms = RunningMeanStd(2, momentum=0.999)
    x = randn(50, 64, 2, loc=1000.0, scale=0.1)
    rms.update(x)
    mean, var, _, _ = reference_moments(x)
    assert_close(rms.mean, mean, rtol=1e-15)
    assert_close(rms.var, var, rtol=1e-9)


def test_ema_follows_a_distribution_shift_where_exact_mode_lags() -> None:
    ema, exact = RunningMeanStd(1, momentum=0.5), RunningMeanStd(1)
    for i in range(40):
        x = randn(60 + i, 100, 1, loc=0.0 if i < 20 else 50.0)
        ema.update(x)
        exact.update(x)
    assert abs(float(ema.mean[0]) - 50.0) < 0.5
    assert abs(float(exact.mean[0]) - 25.0) < 0.5


def test_ema_var_floor_bounds_normalized_rms_right_after_a_shift() -> None:
    ratio = 0.25
    floored = RunningMeanStd(1, momentum=0.99, var_floor=ratio, clip=None)
    plain = RunningMeanStd(1, momentum=0.99, clip=None)
    for i in range(30):
        x = randn(100 + i, 100, 1, scale=0.01)
        floored.update(x)
        plain.update(x)
    shifted = randn(200, 100, 1, loc=10.0, scale=1.0)
    floored.update(shifted)
    plain.update(shifted)
    rms_floored = float(floored.normalize(shifted).pow(2).mean().sqrt())
    rms_plain = float(plain.normalize(shifted).pow(2).mean().sqrt())
    assert rms_floored <= 1.0 / math.sqrt(ratio) + 1e-9
    assert rms_plain > 2.0 / math.sqrt(ratio)  # without the floor the batch explodes


# --------------------------------------------------------------------- merge_


def test_merge_equals_updating_with_the_union_within_1e12() -> None:
    xa = randn(70, 123, 4, loc=-4.0, scale=2.0)
    xb = randn(71, 45, 4, loc=9.0, scale=0.5)
    xa[7, 0] = math.nan
    a, b, union = RunningMeanStd(4), RunningMeanStd(4), RunningMeanStd(4)
    a.update(xa)
    b.update(xb)
    union.update(torch.cat([xa, xb]))
    b_before = state_of(b)
    assert a.merge_(b) is a
    assert_stats_close(a, union)
    assert_state_equal(state_of(b), b_before)


def test_merge_with_a_fresh_normalizer_changes_nothing_but_nonfinite_count() -> None:
    a = fitted()
    before = state_of(a)
    a.merge_(RunningMeanStd(3))
    assert_state_equal(state_of(a), before)
    fresh = RunningMeanStd(3)
    fresh.merge_(a)
    assert_state_equal(state_of(fresh), before)


def test_merge_is_commutative_on_the_module_within_1e12() -> None:
    a1, b1 = fitted(seed=1), fitted(seed=2)
    b1.update(randn(3, 10, 3, loc=50.0))
    a2, b2 = fitted(seed=1), fitted(seed=2)
    b2.update(randn(3, 10, 3, loc=50.0))
    assert_stats_close(a1.merge_(b1), b2.merge_(a2))


def test_merge_errors_on_shape_mismatch_and_non_normalizer() -> None:
    a = RunningMeanStd(3)
    with pytest.raises(ValueError, match="`other`") as err:
        a.merge_(RunningMeanStd(4))
    assert "(4,)" in str(err.value)
    assert "(3,)" in str(err.value)
    with pytest.raises(TypeError, match="`other`"):
        a.merge_(torch.zeros(3))


# --------------------------------------------------------------------- state_dict


def test_state_dict_holds_exactly_the_statistics_with_their_dtypes() -> None:
    state = fitted().state_dict()
    assert set(state) == {"mean", "var", "count", "weight_sum", "nonfinite_count", "mean_residual"}
    assert state["mean"].dtype == F64
    assert state["mean_residual"].dtype == F64
    assert state["var"].dtype == F64
    assert state["weight_sum"].dtype == F64
    assert state["count"].dtype == torch.int64
    assert state["nonfinite_count"].dtype == torch.int64


def test_state_dict_round_trip_is_bitwise_and_continues_identically() -> None:
    src = fitted(seed=3)
    src.update(torch.full((1, 3), math.inf))
    dst = RunningMeanStd(3)
    dst.load_state_dict(src.state_dict())
    assert_state_equal(state_of(dst), state_of(src))
    x = randn(80, 33, 3, loc=1.0)
    src.update(x)
    dst.update(x)
    assert_state_equal(state_of(dst), state_of(src))
    assert torch.equal(dst.normalize(x), src.normalize(x))


def test_load_state_dict_copies_so_later_changes_to_the_source_do_not_leak() -> None:
    src = fitted(seed=4)
    state = src.state_dict()
    dst = RunningMeanStd(3)
    dst.load_state_dict(state)
    loaded = state_of(dst)
    src.update(randn(81, 10, 3, loc=100.0))  # mutates the tensors `state` refers to
    for tensor in state.values():
        tensor.zero_()
    assert_state_equal(state_of(dst), loaded)
    for key, tensor in dst.state_dict().items():
        assert tensor.data_ptr() != src.state_dict()[key].data_ptr()


def test_state_saved_with_torch_save_loads_with_weights_only(tmp_path) -> None:
    src = fitted(seed=5)
    path = tmp_path / "rms.pt"
    torch.save(src.state_dict(), path)
    dst = RunningMeanStd(3)
    dst.load_state_dict(torch.load(path, weights_only=True))
    assert_state_equal(state_of(dst), state_of(src))
    buffer = io.BytesIO()
    torch.save({"normalizer": src.state_dict()}, buffer)
    buffer.seek(0)
    nested = torch.load(buffer, weights_only=True)
    assert_state_equal(nested["normalizer"], state_of(src))


def test_normalizer_inside_a_model_round_trips_through_the_model_state_dict() -> None:
    model = nn.Sequential(fitted(seed=6), nn.Linear(3, 2))
    copy = nn.Sequential(RunningMeanStd(3), nn.Linear(3, 2))
    copy.load_state_dict(model.state_dict())
    x = randn(82, 4, 3, loc=5.0)
    assert torch.equal(copy(x.float()), model(x.float()))
    assert torch.equal(copy[0].count, model[0].count)


def test_load_shape_mismatch_error_names_expected_and_got() -> None:
    dst = RunningMeanStd(4)
    before = state_of(dst)
    with pytest.raises(ValueError, match="mean") as err:
        dst.load_state_dict(fitted((3,)).state_dict())
    assert "(3,)" in str(err.value)
    assert "(4,)" in str(err.value)
    assert_state_equal(state_of(dst), before)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("mean", [math.nan, 0.0, 0.0]),
        ("mean", [0.0, math.inf, 0.0]),
        ("var", [1.0, math.nan, 1.0]),
        ("var", [1.0, 1.0, -1.0]),
        ("weight_sum", math.nan),
    ],
)
def test_load_rejects_nan_inf_or_negative_variance_and_changes_nothing(key: str, value) -> None:
    dst = fitted(seed=7)
    before = state_of(dst)
    state = fitted(seed=8).state_dict()
    state[key] = torch.tensor(value, dtype=F64)
    with pytest.raises(ValueError, match=f"`{key}`"):
        dst.load_state_dict(state)
    assert_state_equal(state_of(dst), before)


def test_load_state_without_weight_sum_or_nonfinite_count_assumes_unit_weights() -> None:
    src = fitted(seed=9)
    state = src.state_dict()
    del state["weight_sum"], state["nonfinite_count"], state["mean_residual"]
    dst = RunningMeanStd(3)
    dst.load_state_dict(state)
    assert float(dst.weight_sum) == float(src.count)
    assert int(dst.nonfinite_count) == 0
    assert torch.equal(dst.mean_residual, torch.zeros(3, dtype=F64))


@pytest.mark.parametrize(("loc", "scale"), [(1e6, 1e-3), (1e9, 1e-2), (-128.0, 0.01)])
def test_chunked_updates_agree_within_1e12_even_far_from_zero(loc: float, scale: float) -> None:
    # The mean is carried as a compensated pair, so merging batch means rounded at 1e6 loses
    # nothing relative to a spread of 1e-3.
    x = torch.randn(3000, 4, generator=torch.Generator().manual_seed(5), dtype=F64) * scale + loc
    whole, chunked = RunningMeanStd(4), RunningMeanStd(4)
    whole.update(x)
    for chunk in x.split(7):
        chunked.update(chunk)
    assert_close(chunked.var, whole.var, rtol=1e-12)
    exact_mean = whole.mean + whole.mean_residual
    assert torch.all((chunked.mean + chunked.mean_residual - exact_mean).abs() <= 1e-12 * scale)
    # Against the exact rational variance (a float64 two-pass reference is itself off by
    # ~1e-8 here: its mean sums 3000 values near 1e9).
    column = [Fraction(v) for v in x[:, 0].tolist()]
    mean = sum(column) / len(column)
    exact_var = float(sum((v - mean) ** 2 for v in column) / len(column))
    assert abs(float(whole.var[0]) - exact_var) <= 1e-12 * exact_var


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_module_cast_to_low_precision_keeps_float64_statistics_and_precision(
    dtype: torch.dtype,
) -> None:
    # `model.to(dtype)` / `model.half()` (e.g. Lightning's "16-true" precision) reaches every
    # buffer of every submodule; the statistics must stay float64 accumulators regardless.
    rms = RunningMeanStd(2).to(dtype)
    batches = [randn(90 + i, 1000, 2, loc=1000.0, scale=0.01) for i in range(10)]
    for batch in batches:
        rms.update(batch)
    mean, var, _, _ = reference_moments(torch.cat(batches))
    assert float(rms.weight_sum) == 10_000.0
    assert_close(rms.mean, mean, rtol=1e-14)
    assert_close(rms.var, var, rtol=1e-6)
    for name in ("mean", "var", "weight_sum"):
        assert getattr(rms, name).dtype == F64, name


def test_module_double_and_to_cpu_keep_the_statistics_unchanged() -> None:
    rms = fitted(seed=10)
    before = state_of(rms)
    rms.double()
    rms.to("cpu")
    rms.to(torch.device("cpu"), torch.float64)
    assert_state_equal(state_of(rms), before)


# --------------------------------------------------------------------- autograd


def test_statistics_never_require_grad_even_when_fed_tensors_that_do() -> None:
    rms = RunningMeanStd(3)
    x = randn(91, 8, 3).requires_grad_()
    rms.update(x)
    y = rms.normalize(x)
    for name in ("mean", "var", "count", "weight_sum", "nonfinite_count"):
        assert not getattr(rms, name).requires_grad
    assert list(rms.parameters()) == []
    y.sum().backward()  # the graph reaches x only, not the statistics
    assert x.grad is not None
    assert_close(x.grad[0], 1.0 / torch.sqrt(rms.var + 1e-8), rtol=1e-14)


def test_normalize_output_made_under_no_grad_feeds_a_later_forward_and_backward() -> None:
    rms = fitted()
    with torch.no_grad():
        obs = rms.normalize(randn(92, 32, 3, loc=5.0).float())
    assert not obs.requires_grad
    rms.update(randn(93, 32, 3))  # statistics change after the rollout, as in PPO
    layer = nn.Linear(3, 1)
    loss = layer(obs).pow(2).mean()
    loss.backward()
    assert layer.weight.grad is not None
    assert torch.isfinite(layer.weight.grad).all()


def test_normalize_under_inference_mode_cannot_feed_backward_the_documented_trap() -> None:
    rms = fitted()
    with torch.inference_mode():
        obs = rms.normalize(randn(94, 32, 3).float())
    layer = nn.Linear(3, 1)
    with pytest.raises(RuntimeError, match="Inference tensors cannot be saved for backward"):
        layer(obs).sum().backward()


# --------------------------------------------------------------------- torch.compile


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(3,), ()], ids=["vector", "scalar"])
def test_compiled_fullgraph_update_and_normalize_equal_eager(shape: tuple[int, ...]) -> None:
    torch._dynamo.reset()
    compiled, eager = RunningMeanStd(shape), RunningMeanStd(shape)
    update = torch.compile(compiled.update, fullgraph=True)
    normalize = torch.compile(compiled.normalize, fullgraph=True)
    x0 = randn(95, 16, *shape, loc=5.0)
    assert torch.equal(normalize(x0), x0)  # identity before the first update, compiled too
    for i in range(4):
        x = randn(96 + i, 16, *shape, loc=5.0 + i, scale=2.0)
        x[3] = math.nan
        update(x)
        eager.update(x)
        assert_stats_close(compiled, eager)
        assert_close(normalize(x), eager.normalize(x), rtol=1e-12, atol=1e-12)
        # eager normalize after a compiled update must not serve stale cached statistics
        assert_close(compiled.normalize(x), eager.normalize(x), rtol=1e-12, atol=1e-12)
    torch._dynamo.reset()


# ---------------------------------------------------------------- prior_weight (SB3 compat)


def _sb3_reference(batches: list[np.ndarray], prior: float) -> tuple[np.ndarray, np.ndarray, float]:
    """Stable-Baselines3's RunningMeanStd recursion, written out in numpy float64."""
    mean, var, count = np.zeros(batches[0].shape[1]), np.ones(batches[0].shape[1]), prior
    for batch in batches:
        b_mean, b_var, b_count = batch.mean(axis=0), batch.var(axis=0), batch.shape[0]
        delta = b_mean - mean
        total = count + b_count
        mean = mean + delta * b_count / total
        var = (var * count + b_var * b_count + delta**2 * count * b_count / total) / total
        count = total
    return mean, var, count


def test_prior_weight_starts_at_mean_0_var_1_with_that_weight_and_count_0() -> None:
    rms = RunningMeanStd(3, prior_weight=1e-4)
    assert float(rms.weight_sum) == 1e-4
    assert int(rms.count) == 0
    assert rms.mean.tolist() == [0.0, 0.0, 0.0]
    assert rms.var.tolist() == [1.0, 1.0, 1.0]
    assert "prior_weight=0.0001" in repr(rms)


def test_prior_weight_normalizes_and_clamps_before_any_data() -> None:
    rms = RunningMeanStd(2, prior_weight=1e-4, clip=1.5, epsilon=1e-8)
    out = rms.normalize(torch.tensor([[3.0, -0.5]], dtype=torch.float64))
    assert_close(out, [[1.5, -0.5 / math.sqrt(1 + 1e-8)]], rtol=1e-15)
    # Without a prior, the same call is the identity (no clamp either).
    plain = RunningMeanStd(2, clip=1.5).normalize(torch.tensor([[3.0, -0.5]]))
    assert plain.tolist() == [[3.0, -0.5]]


def test_prior_weight_updates_follow_the_sb3_recursion_within_1e12() -> None:
    gen = np.random.default_rng(3)
    batches = [gen.normal(1000.0, 2.0, size=(n, 2)) for n in (1, 4, 7, 2, 16)]
    rms = RunningMeanStd(2, prior_weight=1e-4)
    for batch in batches:
        rms.update(torch.from_numpy(batch))
    mean, var, count = _sb3_reference(batches, 1e-4)
    assert_close(rms.mean, mean, rtol=1e-12)
    assert_close(rms.var, var, rtol=1e-12)
    assert float(rms.weight_sum) == pytest.approx(count, rel=1e-15)
    assert int(rms.count) == sum(b.shape[0] for b in batches)


def test_reset_restores_the_prior_weight() -> None:
    rms = RunningMeanStd(2, prior_weight=0.5)
    rms.update(torch.randn(5, 2))
    rms.reset()
    assert float(rms.weight_sum) == 0.5
    assert int(rms.count) == 0
    assert rms.mean.tolist() == [0.0, 0.0]
    assert rms.var.tolist() == [1.0, 1.0]


def test_prior_weight_state_round_trips_through_state_dict() -> None:
    rms = RunningMeanStd(2, prior_weight=1e-4)
    rms.update(torch.randn(5, 2, dtype=torch.float64))
    other = RunningMeanStd(2, prior_weight=1e-4)
    buffer = io.BytesIO()
    torch.save(rms.state_dict(), buffer)
    buffer.seek(0)
    other.load_state_dict(torch.load(buffer, weights_only=True))
    assert_state_equal(state_of(rms), state_of(other))
    x = torch.randn(4, 2, dtype=torch.float64)
    assert torch.equal(rms.normalize(x), other.normalize(x))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"prior_weight": -1.0}, r"`prior_weight` must be in \[0.0, inf\], got -1.0"),
        ({"prior_weight": math.nan}, r"`prior_weight` must be a finite number, got nan"),
        ({"prior_weight": 1e-4, "momentum": 0.9}, r"prior_weight=0.0001 with momentum=0.9"),
    ],
)
def test_bad_prior_weight_error_names_the_argument_and_value(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RunningMeanStd(2, **kwargs)


def test_prior_weight_must_be_a_number() -> None:
    with pytest.raises(TypeError, match=r"`prior_weight` must be a number, got '1e-4'"):
        RunningMeanStd(2, prior_weight="1e-4")  # type: ignore[arg-type]


# --------------------------------------------------------------------- threads


# 16 x 8 values keep the GIL on the native path; 16384 x 8 release it (see `_native`).
@pytest.mark.parametrize("rows", [16, 16384], ids=["small", "threaded-kernel"])
def test_updates_from_two_threads_lose_no_rows(rows: int) -> None:
    import threading

    rms = RunningMeanStd(8)
    batches = [randn(seed, rows, 8, loc=float(seed % 3)) for seed in range(2)]
    calls = 150 if rows == 16 else 20
    start = threading.Barrier(2)

    def feed(batch: torch.Tensor) -> None:
        start.wait()
        for _ in range(calls):
            rms.update(batch)

    threads = [threading.Thread(target=feed, args=(batch,)) for batch in batches]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert int(rms.count) == 2 * calls * rows
    assert float(rms.weight_sum) == 2 * calls * rows
    both = torch.cat(batches).to(torch.float64)
    mean, var, _, _ = reference_moments(both)
    assert_close(rms.mean, mean, rtol=1e-10, atol=1e-12)
    assert_close(rms.var, var, rtol=1e-9)


def test_normalizer_with_its_lock_survives_pickling_and_deep_copies() -> None:
    import copy
    import pickle

    rms = fitted()
    x = randn(9, 5, 3)
    for clone in (copy.deepcopy(rms), pickle.loads(pickle.dumps(rms))):
        assert torch.equal(clone.normalize(x), rms.normalize(x))
        clone.update(x)  # takes its own, new lock
        assert int(clone.count) == int(rms.count) + 5


# --------------------------------------------------------------------- inference mode


def test_built_and_loaded_under_inference_mode_normalizes_and_updates_as_outside() -> None:
    trained = fitted()
    x = randn(3, 32, 3, loc=2.0).float()
    with torch.inference_mode():  # the usual deployment wrapper
        deployed = RunningMeanStd(3)
        deployed.load_state_dict(trained.state_dict())
        out = deployed.normalize(x)
        deployed.normalize(x)  # the cached affine serves a second call
    assert torch.equal(out, trained.normalize(x))
    deployed.update(x)  # still an ordinary, updatable module outside the mode
    trained.update(x)
    assert_state_equal(state_of(deployed), state_of(trained))
    assert torch.equal(deployed.normalize(x), trained.normalize(x))


def test_loaded_with_assign_under_inference_mode_keeps_updatable_buffers() -> None:
    trained = fitted()
    with torch.inference_mode():
        state = {k: v.clone() for k, v in trained.state_dict().items()}  # inference tensors
        deployed = RunningMeanStd(3)
        deployed.load_state_dict(state, assign=True)
        out = deployed.normalize(randn(4, 6, 3))
    assert not any(b.is_inference() for b in deployed.buffers())
    assert torch.equal(out, trained.normalize(randn(4, 6, 3)))
    deployed.update(randn(5, 6, 3))
    assert int(deployed.count) == int(trained.count) + 6


@pytest.mark.parametrize("first", ["inference", "train"])
def test_train_and_inference_mode_calls_alternate_in_either_order(first: str) -> None:
    rms = fitted()
    layer = nn.Linear(3, 1)
    x = randn(6, 16, 3).float()
    want = fitted().normalize(x)  # the first call on `rms` is made in the mode under test
    order = ["inference", "train", "inference", "train"]
    if first == "train":
        order = order[1:] + order[:1]
    for mode in order:
        if mode == "inference":
            with torch.inference_mode():
                assert torch.equal(rms.normalize(x), want)
        else:
            layer.zero_grad()
            layer(rms.normalize(x.requires_grad_(False))).sum().backward()
            x_grad = x.clone().requires_grad_(True)
            rms.normalize(x_grad).sum().backward()  # the torch path, through autograd
            assert x_grad.grad is not None
            assert layer.weight.grad is not None


def test_moved_inside_inference_mode_stays_updatable_outside() -> None:
    rms = fitted()
    with torch.inference_mode():
        rms.to("cpu", dtype=torch.float16)
        rms.cpu()
    rms.update(randn(2, 4, 3))
    assert not any(b.is_inference() for b in rms.buffers())


def test_assigned_settings_are_checked_like_constructor_arguments() -> None:
    rms = fitted()
    with pytest.raises(ValueError, match=r"`clip` must be in \(0.0, inf\], got -1.0"):
        rms.clip = -1.0
    with pytest.raises(ValueError, match="`var_floor` applies to EMA statistics only"):
        rms.var_floor = 0.5
    assert rms.clip == 10.0
    assert rms.var_floor is None
    rms.clip = 0.5  # and a valid one takes effect at once
    assert float(rms.normalize(torch.full((1, 3), 1e6)).max()) == 0.5


def test_replacing_a_buffer_is_seen_by_the_next_call() -> None:
    rms = fitted()
    rms.mean = torch.full((3,), 7.0, dtype=torch.float64)  # as load_state_dict(assign=True)
    rms.mean_residual = torch.zeros(3, dtype=torch.float64)
    assert rms.state.mean is rms.mean
    assert torch.equal(rms.normalize(torch.full((1, 3), 7.0)), torch.zeros(1, 3))


def test_repeated_normalize_calls_keep_checking_their_input_and_following_the_statistics() -> None:
    rms = RunningMeanStd(3)
    rms.update(randn(0, 100, 3) * 4 + 2)
    x = randn(1, 8, 3).float()
    first = rms.normalize(x)
    assert torch.equal(rms.normalize(x), first)  # the per-step call, served from the cache
    with pytest.raises(ValueError, match=r"`x` must have shape \(\*batch, \*\(3,\)\)"):
        rms.normalize(randn(1, 8, 2).float())
    with pytest.raises(TypeError, match="`x`"):
        rms.normalize("not numbers")  # type: ignore[call-overload]
    assert torch.equal(rms.normalize(x.numpy()), first)  # NumPy arrays still convert
    rms.clip = 0.5
    assert float(rms.normalize(x).abs().max()) == 0.5  # a setting change applies at once
    rms.load_state_dict(RunningMeanStd(3).state_dict())  # back to no data: the identity
    assert torch.equal(rms.normalize(x), x)
