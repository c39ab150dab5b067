"""Drift metrics: how running statistics move between logs, and how batches stray from them.

The summary and drift figures are pure functions of two :class:`~rlnorm.algebra.moments.Moments`.
The figures that accumulate over a logging interval (batch shift, clip fraction) live in
:class:`rlnorm.lightning.telemetry.IntervalMetrics`, which reduces them across ranks.

Example:
    >>> import torch
    >>> from rlnorm.algebra.moments import Moments
    >>> from rlnorm.algebra.drift import drift
    >>> one = torch.ones((), dtype=torch.float64)
    >>> old = Moments(one, one.long(), torch.zeros(2).double(), torch.ones(2).double())
    >>> new = old._replace(mean=torch.tensor([0.5, 0.0], dtype=torch.float64))
    >>> {k: round(float(v), 3) for k, v in drift(old, new).items()}
    {'drift/mean': 0.5, 'drift/log_std': 0.0, 'drift/kl': 0.125}
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlnorm.algebra.moments import Moments

__all__ = ["batch_shift", "drift", "per_dim_drift", "summary"]

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
