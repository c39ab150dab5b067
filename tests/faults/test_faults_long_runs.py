"""Long runs: counts past 10**10 stay exact, means keep full precision, EMAs do not drift.

A million ``RunningMeanStd.update`` calls would take minutes here, so the long streams drive
the pure :func:`rlnorm.algebra.moments.merge_ema` on small tensors. Because it works
elementwise, one call advances many independent EMAs ("lanes"): the million-update tests give
each lane the exact state at a different point of a million-step stream (``W_t = 1 - m**t`` and
the closed form of the statistics) and run every lane on from there, so together they cover
every step of the stream; a shorter sequential run checks that errors do not accumulate.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from conftest import assert_close
from rlnorm import RunningMeanStd
from rlnorm.algebra.moments import Moments, merge, merge_ema

F64 = torch.float64
ULP = 2.0**-52


def moments(weight: float, count: int, mean: list[float], var: list[float]) -> Moments:
    return Moments(
        torch.tensor(weight, dtype=F64),
        torch.tensor(count, dtype=torch.int64),
        torch.tensor(mean, dtype=F64),
        torch.tensor(var, dtype=F64),
        torch.zeros(len(mean), dtype=F64),
    )


def chunks() -> list[tuple[int, list[float], list[float]]]:
    """Ten chunks of about 1e9 samples: means near 1e6 (and near 0), spread 1e-3."""
    out = []
    for k in range(10):
        count = 10**9 + 7 * k
        mean = [1e6 + 1e-3 * math.sin(k + 1), -2.5 + math.cos(k)]
        var = [1e-6 * (1 + k % 3), 0.25 + k]
        out.append((count, mean, var))
    return out


def exact_union(parts: list[tuple[int, list[float], list[float]]]) -> tuple[list, list]:
    """Mean and population variance of the union, in exact rational arithmetic."""
    total = sum(Fraction(c) for c, _, _ in parts)
    dims = len(parts[0][1])
    means = [sum(Fraction(c) * Fraction(m[d]) for c, m, _ in parts) / total for d in range(dims)]
    variances = [
        sum(Fraction(c) * (Fraction(v[d]) + (Fraction(m[d]) - means[d]) ** 2) for c, m, v in parts)
        / total
        for d in range(dims)
    ]
    return means, variances


def assert_exact_within(value: torch.Tensor, exact: list[Fraction], rel: float) -> None:
    for got, want in zip(value.tolist(), exact, strict=True):
        assert abs(Fraction(got) - want) <= Fraction(rel) * abs(want), (got, float(want))


def test_ten_merges_of_1e9_samples_keep_the_count_exact_and_the_mean_to_the_last_bit() -> None:
    parts = chunks()
    state = moments(0.0, 0, [0.0, 0.0], [1.0, 1.0])
    for count, mean, var in parts:
        state = merge(state, moments(float(count), count, mean, var))
    total = sum(c for c, _, _ in parts)
    assert total > 10**10
    assert state.count.dtype == torch.int64
    assert int(state.count) == total  # int64: exact (float32 would be off by ~1e3)
    assert float(state.weight) == float(total)
    means, variances = exact_union(parts)
    # The mean is within an ulp of the exact mean ...
    assert_exact_within(state.mean, means, rel=ULP)
    pair = [
        Fraction(h) + Fraction(lo)
        for h, lo in zip(state.mean.tolist(), state.mean_residual.tolist(), strict=True)
    ]
    # ... the pair to float64 precision relative to the spread, however far from zero.
    for got, want, spread in zip(pair, means, variances, strict=True):
        assert abs(got - want) <= Fraction(4 * ULP * math.sqrt(spread)), float(got - want)
    assert_exact_within(state.var, variances, rel=64 * ULP)


def test_merging_normalizers_of_1e9_samples_each_matches_exact_arithmetic() -> None:
    parts = chunks()
    total_rms = RunningMeanStd(2)
    for count, mean, var in parts:
        part = RunningMeanStd(2)
        part.load_state_dict(
            {
                "mean": torch.tensor(mean, dtype=F64),
                "var": torch.tensor(var, dtype=F64),
                "count": torch.tensor(count),
                "weight_sum": torch.tensor(float(count), dtype=F64),
                "nonfinite_count": torch.tensor(1),
                "mean_residual": torch.zeros(2, dtype=F64),
            }
        )
        total_rms.merge_(part)
    assert int(total_rms.count) == sum(c for c, _, _ in parts)
    assert int(total_rms.nonfinite_count) == len(parts)
    means, variances = exact_union(parts)
    assert_exact_within(total_rms.mean, means, rel=ULP)
    assert_exact_within(total_rms.var, variances, rel=64 * ULP)


def test_after_1e10_samples_single_new_samples_still_move_the_mean_exactly() -> None:
    # A float32 accumulator stalls here; the compensated float64 mean keeps every sample.
    rms = RunningMeanStd(())
    big = 10**10
    rms.load_state_dict(
        {
            "mean": torch.tensor(0.0, dtype=F64),
            "var": torch.tensor(1.0, dtype=F64),
            "count": torch.tensor(big),
            "weight_sum": torch.tensor(float(big), dtype=F64),
        }
    )
    added = 1000
    one = torch.ones(1, dtype=F64)
    for _ in range(added):
        rms.update(one)
    assert int(rms.count) == big + added
    exact = Fraction(added, big + added)
    got = Fraction(float(rms.mean)) + Fraction(float(rms.mean_residual))
    assert abs(got - exact) <= Fraction(1e-12) * exact
    exact_var = Fraction(big * 1, big + added) + Fraction(big * added, (big + added) ** 2)
    assert abs(Fraction(float(rms.var)) - exact_var) <= Fraction(1e-14) * exact_var


# ---------------------------------------------------------------------------- EMA

MOMENTUM = 0.999
LANES, STEPS_PER_LANE = 1000, 1000  # 10**6 updates in all


def lane_state(t: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> Moments:
    """The EMA state after ``t`` updates (one per lane) with the given statistics."""
    weight = -torch.expm1(t * math.log(MOMENTUM))  # 1 - m**t, accurately
    return Moments(weight, t.to(torch.int64), mean.clone(), var.clone(), torch.zeros_like(mean))


def constant_batch(mean: torch.Tensor, var: torch.Tensor) -> Moments:
    one = torch.ones((), dtype=F64)
    return Moments(one, one.to(torch.int64), mean, var, torch.zeros_like(mean))


def lanes_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    lane = torch.arange(LANES, dtype=F64)
    start = lane * STEPS_PER_LANE  # lane k covers steps [1000 k, 1000 (k + 1))
    mean = 1e6 + 0.37 * lane - 3e-4 * lane * lane
    var = 1e-2 * (lane + 1)
    return start, mean, var


def test_a_million_constant_updates_keep_the_ema_at_the_batch_statistics() -> None:
    start, mean, var = lanes_data()
    state = lane_state(start, mean, var)
    batch = constant_batch(mean, var)
    for _ in range(STEPS_PER_LANE):
        state = merge_ema(state, batch, MOMENTUM)
    assert torch.equal(state.mean, mean)  # bitwise: the mean never moves
    assert not state.mean_residual.any()
    assert torch.equal(state.var, var)  # bitwise too: the variance mix is exact when equal
    assert_close(state.weight, -torch.expm1((start + STEPS_PER_LANE) * math.log(MOMENTUM)), 1e-12)
    assert int(state.count.max()) == LANES * STEPS_PER_LANE


def test_constant_updates_keep_the_ema_variance_bitwise() -> None:
    start, mean, var = lanes_data()
    state = lane_state(start, mean, var)
    batch = constant_batch(mean, var)
    for _ in range(100):
        state = merge_ema(state, batch, MOMENTUM)
    assert torch.equal(state.var, var)


def alternating_closed_form(
    mean_a: torch.Tensor, var_a: torch.Tensor, mean_b: torch.Tensor, var_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The debiased EMA after any even number of updates A, B, A, B, ..., ending with B.

    B's batches carry ``(1 - m)(1 + m**2 + ...)`` of the weight and A's ``m`` times that, so
    normalised by ``1 - m**T`` B weighs ``1 / (1 + m)`` and A ``m / (1 + m)``, for every even
    ``T``: the mixture of the two, law of total variance included.
    """
    m = MOMENTUM
    w_b, w_a = 1 / (1 + m), m / (1 + m)
    mean = w_b * mean_b + w_a * mean_a
    var = w_b * var_b + w_a * var_a + w_a * w_b * (mean_b - mean_a) ** 2
    return mean, var


def alternating_batches() -> tuple[Moments, Moments]:
    lane = torch.arange(LANES, dtype=F64)
    mean_a, var_a = 1e3 + lane, torch.full((LANES,), 4.0, dtype=F64)
    mean_b, var_b = 1e3 + lane + 2.0, 0.25 + 1e-3 * lane
    return constant_batch(mean_a, var_a), constant_batch(mean_b, var_b)


def test_a_million_alternating_updates_stay_at_the_closed_form_mixture() -> None:
    a, b = alternating_batches()
    mean, var = alternating_closed_form(a.mean, a.var, b.mean, b.var)
    start = torch.arange(LANES, dtype=F64) * STEPS_PER_LANE  # even: each lane starts after a B
    state = lane_state(start, mean, var)
    state = state._replace(
        mean=torch.where(start > 0, mean, 0.0), var=torch.where(start > 0, var, 1.0)
    )
    for _ in range(STEPS_PER_LANE // 2):
        state = merge_ema(state, a, MOMENTUM)
        state = merge_ema(state, b, MOMENTUM)
    assert_close(state.mean, mean, rtol=1e-14)
    assert_close(state.var, var, rtol=1e-11)


@pytest.mark.slow
def test_a_long_sequential_alternating_ema_does_not_accumulate_error() -> None:
    a, b = alternating_batches()
    lanes = slice(0, 8)
    a = Moments(a.weight, a.count, a.mean[lanes], a.var[lanes], a.mean_residual[lanes])
    b = Moments(b.weight, b.count, b.mean[lanes], b.var[lanes], b.mean_residual[lanes])
    mean, var = alternating_closed_form(a.mean, a.var, b.mean, b.var)
    state = lane_state(
        torch.zeros(8, dtype=F64), torch.zeros(8, dtype=F64), torch.ones(8, dtype=F64)
    )
    worst_mean = worst_var = 0.0
    for step in range(1, 10_001):  # 20,000 updates: 20 time constants of m = 0.999
        state = merge_ema(merge_ema(state, a, MOMENTUM), b, MOMENTUM)
        if step % 500 == 0:
            worst_mean = max(worst_mean, float(((state.mean - mean) / mean).abs().max()))
            worst_var = max(worst_var, float(((state.var - var) / var).abs().max()))
    assert worst_mean <= 1e-14
    assert worst_var <= 1e-11
