"""Drift figures: pure functions of two sets of moments."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from rlnorm.algebra.drift import batch_shift, drift, per_dim_drift, summary
from rlnorm.algebra.moments import Moments

F64 = torch.float64


def moments(mean: list[float], var: list[float], count: int = 10) -> Moments:
    return Moments(
        torch.tensor(float(count), dtype=F64),
        torch.tensor(count),
        torch.tensor(mean, dtype=F64),
        torch.tensor(var, dtype=F64),
    )


# ---------------------------------------------------------------------------- summary


def test_summary_is_count_mean_abs_mean_and_std_extremes() -> None:
    out = summary(moments([1.0, -3.0, 0.5], [4.0, 0.25, 1.0], count=7))
    assert set(out) == {"count", "mean_abs_mean", "std_min", "std_max"}
    assert float(out["count"]) == 7.0
    assert float(out["mean_abs_mean"]) == pytest.approx((1.0 + 3.0 + 0.5) / 3)
    assert float(out["std_min"]) == 0.5
    assert float(out["std_max"]) == 2.0


def test_summary_of_scalar_and_empty_feature_shapes() -> None:
    scalar = Moments(
        torch.tensor(3.0, dtype=F64),
        torch.tensor(3),
        torch.tensor(-2.0, dtype=F64),
        torch.tensor(9.0, dtype=F64),
    )
    out = summary(scalar)
    assert (float(out["mean_abs_mean"]), float(out["std_min"]), float(out["std_max"])) == (
        2.0,
        3.0,
        3.0,
    )
    empty = summary(moments([], []))
    assert all(math.isfinite(float(v)) for v in empty.values())


# ---------------------------------------------------------------------------- drift


def test_drift_matches_hand_computed_values() -> None:
    old = moments([0.0, 1.0], [1.0, 4.0])
    new = moments([1.0, 1.0], [4.0, 1.0])
    out = drift(old, new)
    assert set(out) == {"drift/mean", "drift/log_std", "drift/kl"}
    # |Δmean| / std_old: dim 0 moves by 1 std, dim 1 does not move.
    assert float(out["drift/mean"]) == pytest.approx(1.0)
    # |log(std_new / std_old)| = |log 2| on both dims.
    assert float(out["drift/log_std"]) == pytest.approx(math.log(2.0))
    # KL(N(m0, v0) || N(m1, v1)) = 0.5 log(v1 / v0) + (v0 + (m0 - m1)^2) / (2 v1) - 0.5
    kl0 = 0.5 * math.log(4.0) + (1.0 + 1.0) / 8.0 - 0.5
    kl1 = 0.5 * math.log(1.0 / 4.0) + (4.0 + 0.0) / 2.0 - 0.5
    assert float(out["drift/kl"]) == pytest.approx(kl0 + kl1, rel=1e-12)


def test_drift_kl_agrees_with_torch_distributions() -> None:
    gen = torch.Generator().manual_seed(0)
    mean_old = torch.randn(6, generator=gen, dtype=F64)
    mean_new = torch.randn(6, generator=gen, dtype=F64)
    var_old = torch.rand(6, generator=gen, dtype=F64) + 0.1
    var_new = torch.rand(6, generator=gen, dtype=F64) + 0.1
    old = Moments(torch.tensor(5.0, dtype=F64), torch.tensor(5), mean_old, var_old)
    new = Moments(torch.tensor(9.0, dtype=F64), torch.tensor(9), mean_new, var_new)
    expected = kl_divergence(Normal(mean_old, var_old.sqrt()), Normal(mean_new, var_new.sqrt()))
    assert float(drift(old, new)["drift/kl"]) == pytest.approx(float(expected.sum()), rel=1e-12)
    log_ratio = (var_new.sqrt() / var_old.sqrt()).log().abs().max()
    assert float(drift(old, new)["drift/log_std"]) == pytest.approx(float(log_ratio), rel=1e-12)
    per_dim = (mean_new - mean_old).abs() / var_old.sqrt()
    assert torch.allclose(per_dim_drift(old, new), per_dim, rtol=1e-12, atol=0)


def test_drift_of_unchanged_statistics_is_zero() -> None:
    state = moments([3.0, -1.0, 0.0], [2.0, 0.5, 7.0])
    out = drift(state, state)
    assert all(float(v) == pytest.approx(0.0, abs=1e-15) for v in out.values())
    assert torch.equal(per_dim_drift(state, state), torch.zeros(3, dtype=F64))


def test_drift_stays_finite_with_zero_variances() -> None:
    old = moments([0.0, 1.0], [0.0, 1.0])
    new = moments([1.0, 1.0], [1.0, 0.0])
    out = drift(old, new)
    assert all(math.isfinite(float(v)) for v in out.values())
    assert math.isfinite(float(per_dim_drift(old, new).max()))


def test_per_dim_drift_flattens_feature_shapes() -> None:
    old = Moments(
        torch.tensor(1.0, dtype=F64),
        torch.tensor(1),
        torch.zeros(2, 3, dtype=F64),
        torch.full((2, 3), 4.0, dtype=F64),
    )
    new = old._replace(mean=torch.arange(6, dtype=F64).reshape(2, 3))
    assert torch.equal(per_dim_drift(old, new), torch.arange(6, dtype=F64) / 2.0)


# ---------------------------------------------------------------------------- batch shift


def test_batch_shift_is_max_mean_gap_in_running_stds() -> None:
    running = moments([0.0, 0.0, 5.0], [4.0, 1.0, 0.25])
    batch = moments([2.0, -0.5, 5.0], [1.0, 1.0, 1.0], count=3)
    # gaps in running stds: 2/2, 0.5/1, 0/0.5
    assert float(batch_shift(batch, running)) == pytest.approx(1.0)
    batch = moments([0.0, 0.0, 6.0], [1.0, 1.0, 1.0], count=3)
    assert float(batch_shift(batch, running)) == pytest.approx(2.0)


def test_batch_shift_of_an_empty_batch_is_zero() -> None:
    running = moments([0.0], [1.0])
    empty = Moments(
        torch.tensor(0.0, dtype=F64),
        torch.tensor(0),
        torch.tensor([100.0], dtype=F64),
        torch.tensor([1.0], dtype=F64),
    )
    assert float(batch_shift(empty, running)) == 0.0
