"""Drift figures (pure functions), their per-interval aggregation and the TensorBoard extras."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch.distributions import Normal, kl_divergence

from rlnorm.algebra.drift import batch_shift, drift, per_dim_drift, summary
from rlnorm.algebra.moments import Moments
from rlnorm.lightning.telemetry import DriftHeatmap, IntervalMetrics, colorize, tensorboard_writers

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


# ---------------------------------------------------------------------------- IntervalMetrics


def test_interval_metrics_aggregate_max_shift_and_weighted_clip_fraction() -> None:
    metrics = IntervalMetrics(torch.device("cpu"))
    for value in (0.5, 2.0, 1.0):
        metrics.update_shift(torch.tensor(value, dtype=F64))
    metrics.update_clipped(torch.tensor([[10.0, 0.0], [-10.0, 3.0]]), clip=10.0)  # 2 of 4
    metrics.update_clipped(torch.tensor([0.0, 9.99]), clip=10.0)  # 0 of 2
    metrics.update_clipped(torch.empty(0, 2), clip=10.0)  # nothing
    out = metrics.compute_and_reset()
    assert set(out) == {"batch_shift", "clip_fraction"}
    assert float(out["batch_shift"]) == 2.0
    assert float(out["clip_fraction"]) == pytest.approx(2.0 / 6.0)


def test_interval_metrics_are_nan_when_the_interval_is_empty_and_reset_after_compute() -> None:
    metrics = IntervalMetrics(torch.device("cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "compute before update" noise escapes
        out = metrics.compute_and_reset()
    assert math.isnan(float(out["batch_shift"]))
    assert math.isnan(float(out["clip_fraction"]))
    metrics.update_shift(torch.tensor(3.0))
    metrics.update_clipped(torch.tensor([5.0]), clip=1.0)
    first = metrics.compute_and_reset()
    assert (float(first["batch_shift"]), float(first["clip_fraction"])) == (3.0, 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = metrics.compute_and_reset()
    assert math.isnan(float(second["batch_shift"]))
    assert math.isnan(float(second["clip_fraction"]))


def test_interval_metrics_ignore_nan_shifts() -> None:
    metrics = IntervalMetrics(torch.device("cpu"))
    metrics.update_shift(torch.tensor(math.nan))
    metrics.update_shift(torch.tensor(0.25))
    assert float(metrics.compute_and_reset()["batch_shift"]) == 0.25


def test_interval_partials_carry_host_and_device_clipped_counts_into_a_new_instance() -> None:
    metrics = IntervalMetrics(torch.device("cpu"))
    metrics.update_shift(torch.tensor(0.75, dtype=F64))
    metrics.add_clipped(3, 10)  # a host int, as the native CPU path counts
    metrics.add_clipped(torch.tensor(2), 10)  # a tensor, as the torch path counts
    partials = metrics.partials()
    assert partials.tolist() == [0.75, 5.0, 20.0]
    resumed = IntervalMetrics(torch.device("cpu"))
    resumed.load_partials(partials)
    # Reading without a reset keeps the interval open.
    peek = metrics.compute(reset=False)
    assert torch.equal(metrics.partials(), partials)
    want, got = metrics.compute_and_reset(), resumed.compute_and_reset()
    for key in ("batch_shift", "clip_fraction"):
        assert float(peek[key]) == float(want[key]) == float(got[key])
    assert float(want["clip_fraction"]) == 0.25
    assert metrics.partials().tolist() == [-math.inf, 0.0, 0.0]
    with pytest.raises(ValueError, match="shape"):
        resumed.load_partials(torch.zeros(2))


# ---------------------------------------------------------------------------- heatmap


def test_colorize_maps_zero_and_one_to_the_viridis_ends() -> None:
    img = colorize(torch.tensor([[0.0, 1.0], [-5.0, 5.0]]))
    assert img.shape == (3, 2, 2)
    assert img.dtype == torch.uint8
    dark, bright = [68, 1, 84], [253, 231, 37]
    assert img[:, 0, 0].tolist() == dark
    assert img[:, 0, 1].tolist() == bright
    assert img[:, 1, 0].tolist() == dark  # clamped
    assert img[:, 1, 1].tolist() == bright


def test_drift_heatmap_image_shape_dtype_and_layout() -> None:
    heatmap = DriftHeatmap()
    assert heatmap.image() is None
    heatmap.add(torch.tensor([1e-4, 10.0, 100.0, 0.0], dtype=F64))
    heatmap.add(torch.tensor([10.0, 1e-4, 1e-3, 0.0], dtype=F64))
    img = heatmap.image()
    assert img is not None
    assert img.dtype == torch.uint8
    channels, height, width = img.shape
    assert channels == 3
    assert width == 2 * heatmap.cell_width  # the two columns logged, nothing else
    assert height >= heatmap.min_height
    assert height % 4 == 0
    cell_h, cell_w = height // 4, heatmap.cell_width
    newest, previous = width - cell_w, width - 2 * cell_w

    def cell(row: int, col: int) -> list[int]:
        block = img[:, row * cell_h : (row + 1) * cell_h, col : col + cell_w]
        assert (block == block[:, :1, :1]).all(), "a cell is one colour"
        return block[:, 0, 0].tolist()

    dark, bright = [68, 1, 84], [253, 231, 37]
    assert cell(0, previous) == dark  # 1e-4 is below the 1e-3 floor
    assert cell(1, previous) == bright  # 10 std is the top of the scale
    assert cell(2, previous) == bright  # and above it clamps
    assert cell(0, newest) == bright
    assert cell(2, newest) == dark  # exactly at the floor
    assert previous == 0


def test_drift_heatmap_draws_only_the_columns_logged_so_far_up_to_its_history() -> None:
    heatmap = DriftHeatmap(history=8, max_dims=5)
    for logged in range(1, 13):
        heatmap.add(torch.full((3,), 0.5))
        img = heatmap.image()
        assert img is not None
        assert img.shape[2] == min(logged, 8) * heatmap.cell_width
        assert not (img == 48).all(dim=0).any()  # no blank (grey) columns
    # A provisional column is drawn after the stored ones, scrolling, and not stored.
    with_extra = heatmap.image(extra=torch.full((3,), 10.0))
    assert with_extra is not None
    assert with_extra.shape[2] == 8 * heatmap.cell_width
    assert with_extra[:, 0, -1].tolist() == [253, 231, 37]
    assert len(heatmap.columns) == 8
    fresh = DriftHeatmap(history=8, max_dims=5)
    fresh_img = fresh.image(extra=torch.full((3,), 0.5))
    assert fresh_img is not None
    assert fresh_img.shape[2] == fresh.cell_width
    assert fresh.image() is None


def test_drift_heatmap_state_round_trips_the_columns() -> None:
    heatmap = DriftHeatmap(history=4, max_dims=3)
    for i in range(6):
        heatmap.add(torch.arange(5, dtype=F64) + i)
    restored = DriftHeatmap(history=4, max_dims=3)
    restored.load_state_dict(heatmap.state_dict())
    assert heatmap.state_dict().shape == (4, 3)
    image, again = heatmap.image(), restored.image()
    assert image is not None
    assert again is not None
    assert torch.equal(image, again)
    empty = DriftHeatmap()
    empty.load_state_dict(DriftHeatmap().state_dict())
    assert empty.image() is None


def test_drift_heatmap_keeps_the_last_history_columns_and_max_dims_rows() -> None:
    heatmap = DriftHeatmap(history=8, max_dims=5)
    for i in range(20):
        heatmap.add(torch.full((12,), float(i)))
    assert len(heatmap.columns) == 8
    assert heatmap.columns[-1][0] == 19.0
    img = heatmap.image()
    assert img is not None
    assert img.shape[1] % 5 == 0
    assert not (img == 48).all(dim=0).any()  # the history is full: nothing grey


def test_tensorboard_writers_are_the_tensorboard_loggers_experiments(tmp_path: Path) -> None:
    tensorboard = TensorBoardLogger(tmp_path, name="tb")
    writers = tensorboard_writers([CSVLogger(tmp_path, name="csv"), tensorboard])
    assert writers == [tensorboard.experiment]
    assert tensorboard_writers([]) == []
