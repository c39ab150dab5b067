"""IntervalMetrics: a logging interval's largest batch shift and clip fraction, and its state."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from rlnorm.lightning.interval import IntervalMetrics

F64 = torch.float64


def test_interval_metrics_aggregate_max_shift_and_weighted_clip_fraction() -> None:
    metrics = IntervalMetrics(torch.device("cpu"))
    for value in (0.5, 2.0, 1.0):
        metrics.update_shift(torch.tensor(value, dtype=F64))
    metrics.add_clipped(torch.tensor(2), 4)  # a 0-d count (CUDA, torch code)
    metrics.add_clipped(0, 2)  # an int (the native CPU kernel)
    metrics.add_clipped(torch.tensor(0), 0)  # nothing
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
    metrics.add_clipped(1, 1)
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


def test_interval_metrics_build_no_torchmetrics_objects_until_the_first_compute(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Building torchmetrics objects reads package metadata (tens of milliseconds); recording
    # runs on the first rollout step of every run, logged or not, so it must not build them.
    import torchmetrics

    built: list[str] = []
    original = torchmetrics.Metric.__init__

    def counting_init(self: torchmetrics.Metric, *args: object, **kwargs: object) -> None:
        built.append(type(self).__name__)
        original(self, *args, **kwargs)

    monkeypatch.setattr(torchmetrics.Metric, "__init__", counting_init)
    metrics = IntervalMetrics(torch.device("cpu"))
    metrics.update_shift(torch.tensor(0.5, dtype=F64))
    metrics.add_clipped(1, 4)
    metrics.add_clipped(torch.tensor(1), 2)
    metrics.partials()
    assert built == []
    first = metrics.compute()
    assert sorted(built) == ["MaxMetric", "SumMetric", "SumMetric"]
    metrics.add_clipped(3, 4)
    second = metrics.compute()
    assert len(built) == 3  # built once, reused by every later interval
    assert float(first["batch_shift"]) == 0.5
    assert float(first["clip_fraction"]) == pytest.approx(2 / 6)
    assert float(second["clip_fraction"]) == 0.75


def test_host_shifts_of_the_native_path_and_tensor_shifts_share_one_max_ignoring_nan() -> None:
    metrics = IntervalMetrics(torch.device("cpu"))
    metrics.update_shift(0.75)  # a float: the native CPU kernel
    metrics.update_shift(math.nan)
    metrics.update_shift(torch.tensor(0.5, dtype=F64))
    assert metrics.partials().tolist() == [0.75, 0.0, 0.0]
    metrics.update_shift(torch.tensor(2.0, dtype=F64))
    assert float(metrics.compute(reset=False)["batch_shift"]) == 2.0
    resumed = IntervalMetrics(torch.device("cpu"))
    resumed.update_shift(9.0)  # replaced by what is loaded
    resumed.load_partials(metrics.partials())
    assert resumed.partials().tolist() == metrics.partials().tolist()
    assert float(metrics.compute_and_reset()["batch_shift"]) == 2.0
    assert math.isnan(float(metrics.compute()["batch_shift"]))  # the host max reset too
