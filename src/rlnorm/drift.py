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

import warnings

import torch
from torch import Tensor
from torchmetrics.aggregation import MaxMetric, MeanMetric

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
    - ``clip_fraction``: share of normalized values at ``±clip`` over all normalize calls.

    Args:
        device: where the metric states live (the normalizer's device).
    """

    def __init__(self, device: torch.device) -> None:
        self.batch_shift = MaxMetric(nan_strategy="ignore").to(device)
        self.clip_fraction = MeanMetric(nan_strategy="ignore").to(device)

    def update_shift(self, value: Tensor) -> None:
        """Record one update's batch shift."""
        self.batch_shift.update(value.to(torch.float32))

    def update_clipped(self, normalized: Tensor, clip: float) -> None:
        """Record which values of one ``normalize`` output sit at the clamp bound."""
        if normalized.numel() == 0:
            return
        clipped = (normalized.detach().abs() >= clip).to(torch.float32)
        self.clip_fraction.update(clipped.mean(), weight=clipped.numel())

    def compute_and_reset(self) -> dict[str, Tensor]:
        """Interval figures, reduced over ranks (a collective: call it on every rank).

        Figures without data in the interval on any rank come back as NaN; callers skip them.
        """
        with warnings.catch_warnings():
            # An interval without updates is normal (e.g. frozen statistics).
            warnings.filterwarnings("ignore", message=".*compute.*before.*update.*")
            warnings.filterwarnings("ignore", message=".*Encountered.*nan.*")
            out = {
                "batch_shift": self._compute(self.batch_shift),
                "clip_fraction": self._compute(self.clip_fraction),
            }
        self.batch_shift.reset()
        self.clip_fraction.reset()
        return out

    @staticmethod
    def _compute(metric: MaxMetric | MeanMetric) -> Tensor:
        value = metric.compute()
        if isinstance(metric, MaxMetric):
            return torch.where(torch.isinf(value), torch.nan, value)
        return value
