"""Drift metrics: how running statistics move between logs, and how batches stray from them.

The summary and drift figures are pure functions of two :class:`~rlnorm.moments.Moments`.
The figures that accumulate over a logging interval (batch shift, clip fraction) live in
:class:`IntervalMetrics`, built on torchmetrics so that they reduce correctly across ranks.

Example:
    >>> import torch
    >>> from rlnorm.moments import Moments
    >>> from rlnorm.drift import drift
    >>> one = torch.ones((), dtype=torch.float64)
    >>> old = Moments(one, one.long(), torch.zeros(2).double(), torch.ones(2).double())
    >>> new = old._replace(mean=torch.tensor([0.5, 0.0], dtype=torch.float64))
    >>> {k: round(float(v), 3) for k, v in drift(old, new).items()}
    {'drift/mean': 0.5, 'drift/log_std': 0.0, 'drift/kl': 0.125}
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor
from torchmetrics.aggregation import MaxMetric, SumMetric

from rlnorm.moments import Moments

__all__ = ["IntervalMetrics", "batch_shift", "drift", "per_dim_drift", "summary"]

_TINY = 1e-12


def summary(state: Moments) -> dict[str, Tensor]:
    """Count and a three-number summary of the statistics.

    Returns:
        ``count``, ``mean_abs_mean`` (average of ``|mean|`` over dims), ``std_min``, ``std_max``.
    """
    std = state.var.sqrt().reshape(-1)
    return {
        "count": state.count.to(torch.float64),
        "mean_abs_mean": state.mean.abs().mean() if state.mean.numel() else state.mean.sum(),
        "std_min": std.min() if std.numel() else std.sum(),
        "std_max": std.max() if std.numel() else std.sum(),
    }


def per_dim_drift(old: Moments, new: Moments) -> Tensor:
    """``|mean_new - mean_old| / std_old`` per dimension (flattened)."""
    std_old = old.var.sqrt().clamp_min(_TINY)
    return ((new.mean - old.mean).abs() / std_old).reshape(-1)


def drift(old: Moments, new: Moments) -> dict[str, Tensor]:
    """How far the statistics moved from ``old`` to ``new``.

    Returns:
        ``drift/mean``: max over dims of ``|Δmean| / std_old``;
        ``drift/log_std``: max over dims of ``|log(std_new / std_old)|``;
        ``drift/kl``: Gaussian ``KL(old ‖ new)`` summed over dims.
    """
    var_old = old.var.clamp_min(_TINY * _TINY)
    var_new = new.var.clamp_min(_TINY * _TINY)
    delta = new.mean - old.mean
    log_ratio = 0.5 * torch.log(var_new / var_old)
    kl = log_ratio + (var_old + delta * delta) / (2.0 * var_new) - 0.5
    return {
        "drift/mean": per_dim_drift(old, new).max(),
        "drift/log_std": log_ratio.abs().max(),
        "drift/kl": kl.sum(),
    }


def batch_shift(batch: Moments, running: Moments) -> Tensor:
    """``max |batch mean - running mean| / running std`` over dims (0 for an empty batch)."""
    std = running.var.sqrt().clamp_min(_TINY)
    shift = ((batch.mean - running.mean).abs() / std).max()
    return torch.where(batch.weight > 0, shift, torch.zeros_like(shift))


class IntervalMetrics:
    """Per-interval aggregates of one normalizer, reduced across ranks at ``compute``.

    - ``batch_shift``: the largest :func:`batch_shift` of any update in the interval;
    - ``clip_fraction``: share of normalized values at ``±clip`` over all normalize calls
      (clipped values summed over ranks, divided by all values summed over ranks).

    Each call only folds its figure into a running max or sum (one or two small tensor ops on
    the hot path); at the end of the interval the partial aggregates go through torchmetrics,
    whose ``compute`` reduces them over all ranks. The partial aggregates are the whole state:
    :meth:`partials` and :meth:`load_partials` carry an interval across a checkpoint.

    Args:
        device: where the metric states live (the normalizer's device).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.batch_shift = MaxMetric(nan_strategy="ignore").to(device)
        # Integer-valued float64 sums: exact, so the fraction does not depend on how the
        # values were split between ranks (or between a checkpoint and the resumed run).
        self.clipped = SumMetric(nan_strategy="ignore").set_dtype(torch.float64).to(device)
        self.values = SumMetric(nan_strategy="ignore").set_dtype(torch.float64).to(device)
        self._reset_partials()

    def _reset_partials(self) -> None:
        f64 = {"dtype": torch.float64, "device": self.device}
        self._shift_max = torch.full((), -math.inf, **f64)
        # Clipped counts arrive as host ints (native CPU path) or device tensors (elsewhere).
        self._clipped = torch.zeros((), **f64)
        self._clipped_host = 0
        self._values = 0

    def update_shift(self, value: Tensor) -> None:
        """Record one update's batch shift."""
        self._shift_max = torch.fmax(
            self._shift_max, value.detach().to(torch.float64)
        )  # NaN-ignoring

    def update_clipped(self, normalized: Tensor, clip: float) -> None:
        """Record which values of one ``normalize`` output sit at the clamp bound."""
        self.add_clipped((normalized.detach().abs() >= clip).sum(), normalized.numel())

    def add_clipped(self, clipped: int | Tensor, values: int) -> None:
        """Record that ``clipped`` of ``values`` normalized values sat at the clamp bound."""
        if isinstance(clipped, Tensor):
            self._clipped += clipped
        else:
            self._clipped_host += clipped
        self._values += values

    def partials(self) -> Tensor:
        """This rank's interval so far: float64 ``[max batch shift, clipped, values]``.

        The max is ``-inf`` when no update was recorded. Counts are exact below 2**53.
        """
        return torch.stack(
            [
                self._shift_max,
                self._clipped + self._clipped_host,
                torch.tensor(float(self._values), dtype=torch.float64, device=self.device),
            ]
        )

    def load_partials(self, partials: Tensor) -> None:
        """Continue the interval :meth:`partials` returned (here or in an earlier run)."""
        if not isinstance(partials, Tensor) or partials.shape != (3,):
            raise ValueError(f"Interval partials must be a tensor of shape (3,), got {partials!r}.")
        values = partials.detach().to(self.device, torch.float64)
        self._shift_max = values[0].clone()
        self._clipped = values[1].clone()
        self._clipped_host = 0
        self._values = int(values[2])

    def compute(self, reset: bool = True) -> dict[str, Tensor]:
        """Interval figures, reduced over ranks (a collective: call it on every rank).

        Figures without data in the interval on any rank come back as NaN; callers skip them.

        Args:
            reset: start a new interval afterwards; ``False`` only reads the figures so far.
        """
        nan = torch.full((), math.nan, dtype=torch.float64, device=self.device)
        self.batch_shift.update(torch.where(torch.isinf(self._shift_max), nan, self._shift_max))
        self.clipped.update(self._clipped + self._clipped_host)
        self.values.update(
            torch.tensor(float(self._values), dtype=torch.float64, device=self.device)
        )
        with warnings.catch_warnings():
            # A rank whose interval had no data contributes NaN, which the metrics ignore.
            warnings.filterwarnings("ignore", message=".*Encountered.*nan.*")
            shift = self.batch_shift.compute()
            clipped = self.clipped.compute()
            values = self.values.compute()
        for metric in (self.batch_shift, self.clipped, self.values):
            metric.reset()
        if reset:
            self._reset_partials()
        fraction = clipped.to(torch.float64) / values.to(torch.float64).clamp_min(1.0)
        return {
            "batch_shift": torch.where(torch.isinf(shift), torch.nan, shift),
            "clip_fraction": torch.where(values > 0, fraction, torch.nan),
        }

    def compute_and_reset(self) -> dict[str, Tensor]:
        """:meth:`compute`, then start a new interval."""
        return self.compute(reset=True)
