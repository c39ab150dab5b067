"""Running moments as small pure functions over plain tensors.

Everything here is free of host synchronisation and Python branches on tensor values, so it
runs unchanged under ``torch.compile(fullgraph=True)`` and inside CUDA graphs. The stateful
:class:`~rlnorm.RunningMeanStd` module is a thin shell around these functions.

The state of a running estimate is a :class:`Moments`: a total weight, an integer sample count,
and the mean and population variance, all float64 (count int64). A batch enters as
:class:`ShiftedSums`: weighted sums of ``x - shift`` and ``(x - shift) ** 2`` around a shift
close to the data. Summing around a shift avoids the catastrophic cancellation of the textbook
``E[x**2] - E[x]**2`` (mean 1e6, std 1e-3 gives a variance of 0 or worse in it), and sums around
a common shift add exactly across chunks and across processes, which is what makes chunked
updates and the distributed all-reduce agree with one pass over the union of the data.

Example:
    >>> import torch
    >>> from rlnorm.algebra.moments import batch_moments, batch_shift, empty_moments, merge
    >>> from rlnorm.algebra.moments import shifted_sums
    >>> x = torch.tensor([[1.0, 10.0], [3.0, 30.0]])
    >>> shift = batch_shift(x, None)
    >>> state = merge(empty_moments((2,)), batch_moments(shifted_sums(x, None, shift)))
    >>> state.mean.tolist(), state.var.tolist(), int(state.count)
    ([2.0, 20.0], [1.0, 100.0], 2)
"""

from __future__ import annotations

import math
from typing import Annotated, NamedTuple

import torch
from torch import Tensor

from rlnorm.algebra.fields import Field

__all__ = [
    "Moments",
    "ShiftedSums",
    "batch_moments",
    "batch_shift",
    "empty_moments",
    "merge",
    "merge_ema",
    "residual",
    "shifted_sums",
    "two_sum",
    "usable_weights",
]

#: Elements per chunk of the batch converted to float64 at a time on the CPU. Small enough to
#: stay in cache and to bound the scratch memory of an update, large enough to amortise the
#: per-chunk overhead.
CPU_CHUNK_ELEMENTS = 1 << 18
#: On accelerators one chunk of this size is a single pass for all common batch sizes.
ACCELERATOR_CHUNK_ELEMENTS = 1 << 25
#: Rows of the batch head averaged to pick the shift the batch is summed around.
SHIFT_ROWS = 32


class Moments(NamedTuple):
    """Weighted first and second moments of a set of samples.

    Attributes:
        weight: total sample weight, a float64 0-d tensor (the number of samples when
            every weight is 1; in EMA mode the debiasing weight ``1 - momentum**updates``).
        count: number of samples with non-zero weight, an int64 0-d tensor.
        mean: float64 mean per feature.
        var: float64 population variance per feature.
    """

    weight: Tensor
    count: Tensor
    mean: Tensor
    var: Tensor
    #: Rounding error of ``mean`` (``None``: zero): the exact mean is ``mean + mean_residual``.
    #: Carrying it keeps the mean's low digits when the data sit far from zero relative to
    #: their spread, so merges stay exact to float64 precision relative to the std.
    mean_residual: Tensor | None = None


class ShiftedSums(NamedTuple):
    """Weighted sums of a batch around ``shift``; they add exactly across chunks and ranks.

    Each field declares how the distributed all-reduce combines it (see
    :mod:`rlnorm.algebra.fields`): everything is summed over ranks but the common ``shift``.

    Attributes:
        weight: total weight of the valid rows (float64, 0-d).
        count: number of valid rows with non-zero weight (int64, 0-d).
        sum: ``sum_i w_i (x_i - shift)`` per feature (float64).
        sum_sq: ``sum_i w_i (x_i - shift) ** 2`` per feature (float64).
        nonfinite: rows with non-zero weight left out for holding NaN or Inf (int64, 0-d).
        shift: the float64 shift the sums are taken around.
    """

    weight: Annotated[Tensor, Field(torch.float64)]
    count: Annotated[Tensor, Field(torch.int64)]
    sum: Annotated[Tensor, Field(torch.float64, per_feature=True)]
    sum_sq: Annotated[Tensor, Field(torch.float64, per_feature=True)]
    nonfinite: Annotated[Tensor, Field(torch.int64)]
    shift: Annotated[Tensor, Field(torch.float64, per_feature=True, reduce=None)]


def empty_moments(shape: tuple[int, ...], device: torch.device | str | None = None) -> Moments:
    """The state before any data: no weight, mean 0 and variance 1.

    Args:
        shape: feature shape of the statistics.
        device: where to allocate them.

    Returns:
        A :class:`Moments` with zero weight and count.
    """
    f64 = {"dtype": torch.float64, "device": device}
    return Moments(
        weight=torch.zeros((), **f64),
        count=torch.zeros((), dtype=torch.int64, device=device),
        mean=torch.zeros(shape, **f64),
        var=torch.ones(shape, **f64),
        mean_residual=torch.zeros(shape, **f64),
    )


def usable_weights(weights: Tensor) -> Tensor:
    """Row weights as the sums use them: negative, NaN and infinite weights count as 0.

    Checking them instead would need a host synchronisation; a weight that cannot be a weight
    leaves its row out, like a mask of ``False``, and can never poison the statistics.
    """
    return torch.where((weights > 0) & (weights < math.inf), weights, 0.0)


def batch_shift(x: Tensor, weights: Tensor | None, rows: int = SHIFT_ROWS) -> Tensor:
    """A float64 point close to the data of a 2-D batch: the weighted mean of its first rows.

    Any point inside the data's range keeps the shifted sums free of cancellation; the head
    of the batch is one that costs almost nothing. Zero-weight rows, and rows that
    :func:`shifted_sums` would leave out around 0 (NaN, Inf, or squares overflowing float64),
    are ignored; with none left the shift is 0, which only costs precision, never correctness.

    Args:
        x: batch of shape ``(N, D)``.
        weights: optional float64 row weights of shape ``(N,)``.
        rows: how many leading rows to average.

    Returns:
        A float64 tensor of shape ``(D,)``.
    """
    head = x[:rows].to(torch.float64)
    # The criterion of `shifted_sums` (around 0): a row of huge finite values whose squares
    # overflow would drag the shift so far that every other row overflowed around it.
    ok = torch.isfinite((head * head).sum(dim=1)).to(torch.float64)
    if weights is not None:
        ok = ok * usable_weights(weights[:rows])
    head = torch.nan_to_num(head, nan=0.0, posinf=0.0, neginf=0.0)
    return (ok @ head) / ok.sum().clamp_min(torch.finfo(torch.float64).tiny)


def shifted_sums(
    x: Tensor,
    weights: Tensor | None,
    shift: Tensor,
    chunk_elements: int | None = None,
) -> ShiftedSums:
    """Weighted shifted sums of a 2-D batch, streamed in float64 chunks.

    A row is left out (and counted in ``nonfinite`` when its weight is non-zero) if any of
    its values is NaN or Inf, or so large that its square overflows float64. (A row whose sum of
    squares lands within rounding of float64's largest value, near 1e154 per value, may be
    judged either way depending on the summation order, which differs between the native CPU
    kernel and torch; the statistics stay finite either way.) The batch is
    converted to float64 one chunk at a time, so the scratch memory does not grow with the
    batch.

    Args:
        x: batch of shape ``(N, D)``, any real dtype.
        weights: optional float64 row weights of shape ``(N,)``; ``None`` means 1. Negative,
            NaN and infinite weights count as 0 (see :func:`usable_weights`).
        shift: float64 tensor of shape ``(D,)`` to sum around.
        chunk_elements: elements converted at a time; defaults by device. (The fused native
            CPU kernel is chosen a layer up, in :func:`rlnorm.backends.dispatch.shifted_sums`.)

    Returns:
        The :class:`ShiftedSums` of the batch.
    """
    n, d = x.shape
    device = x.device
    if chunk_elements is None:
        chunk_elements = CPU_CHUNK_ELEMENTS if device.type == "cpu" else ACCELERATOR_CHUNK_ELEMENTS
    chunk_rows = max(1, chunk_elements // max(d, 1))
    f64 = {"dtype": torch.float64, "device": device}
    total_sum = torch.zeros(d, **f64)
    total_sq = torch.zeros(d, **f64)
    weight = torch.zeros((), **f64)
    count = torch.zeros((), dtype=torch.int64, device=device)
    nonfinite = torch.zeros((), dtype=torch.int64, device=device)
    for start in range(0, n, chunk_rows):
        chunk = x[start : start + chunk_rows]
        if not chunk.is_floating_point():
            chunk = chunk.to(torch.float64)
        # float32 - float64 promotes inside the kernel: one pass, no float64 copy of the input.
        centered = torch.sub(chunk, shift)
        squared = centered * centered
        finite = torch.isfinite(squared.sum(dim=1))
        w = finite.to(torch.float64)
        if weights is not None:
            chunk_weights = usable_weights(weights[start : start + chunk_rows])
            w = w * chunk_weights
            present = chunk_weights > 0
        else:
            present = torch.ones_like(finite)
        # 0 * NaN is NaN, so non-finite entries must be zeroed before the weighted sums.
        centered = torch.nan_to_num_(centered, nan=0.0, posinf=0.0, neginf=0.0)
        squared = torch.nan_to_num_(squared, nan=0.0, posinf=0.0, neginf=0.0)
        total_sum += w @ centered
        total_sq += w @ squared
        weight += w.sum()
        count += (w > 0).sum()
        nonfinite += (present & ~finite).sum()
    return ShiftedSums(weight, count, total_sum, total_sq, nonfinite, shift)


def batch_moments(sums: ShiftedSums) -> Moments:
    """Turn shifted sums into the batch's mean and population variance.

    An empty batch (zero weight) yields weight 0, mean ``shift`` and variance 0, which
    :func:`merge` and :func:`merge_ema` treat as no data.

    Args:
        sums: shifted sums of a batch, possibly reduced over processes.

    Returns:
        The batch :class:`Moments`.
    """
    w = sums.weight.clamp_min(torch.finfo(torch.float64).tiny)
    offset = sums.sum / w
    # Finite values whose squares sum past float64's range still give a finite (huge) variance.
    var = (sums.sum_sq / w - offset * offset).clamp(0.0, torch.finfo(torch.float64).max)
    mean, residual = two_sum(sums.shift, offset)
    return Moments(sums.weight, sums.count, mean, var, residual)


def two_sum(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """``a + b`` as ``(s, e)`` with ``s = fl(a + b)`` and ``s + e == a + b`` exactly (Knuth)."""
    s = a + b
    b_virtual = s - a
    return s, (a - (s - b_virtual)) + (b - b_virtual)


def residual(m: Moments) -> Tensor:
    """``m.mean_residual``, zeros when absent."""
    return torch.zeros_like(m.mean) if m.mean_residual is None else m.mean_residual


def _mix(a: Moments, b: Moments, weight_a: Tensor, weight_b: Tensor, count: Tensor) -> Moments:
    """Mixture of two distributions with the given weights (law of total variance)."""
    total = weight_a + weight_b
    has_weight = total > 0
    safe_total = torch.where(has_weight, total, torch.ones_like(total))
    frac_a = weight_a / safe_total
    frac_b = weight_b / safe_total
    res_a, res_b = residual(a), residual(b)
    # Means as compensated pairs: the difference and the new mean keep float64 precision
    # relative to the spread of the data, however far the data sit from zero.
    delta_hi, delta_lo = two_sum(b.mean, -a.mean)
    delta_lo = delta_lo + (res_b - res_a)
    delta = delta_hi + delta_lo
    hi, lo = two_sum(a.mean, frac_b * delta_hi)
    mean, mean_residual = two_sum(hi, lo + frac_b * delta_lo + res_a)
    # The variance of the larger share plus the other's pull, rather than
    # `frac_a * a.var + frac_b * b.var`: the fractions need not sum to exactly 1 in floating
    # point, and this form is exact when the variances are equal (an EMA of a constant stream
    # does not wobble) or one share is 0 (merging into a fresh state), and cannot cancel.
    within = torch.where(
        frac_b <= frac_a, a.var + frac_b * (b.var - a.var), b.var + frac_a * (a.var - b.var)
    )
    var = within + (frac_a * frac_b) * (delta * delta)
    var = var.clamp_max(torch.finfo(torch.float64).max)
    return Moments(
        weight=total,
        count=count,
        mean=torch.where(has_weight, mean, a.mean),
        var=torch.where(has_weight, var, a.var),
        mean_residual=torch.where(has_weight, mean_residual, res_a),
    )


def merge(a: Moments, b: Moments) -> Moments:
    """Exact parallel merge (Chan et al.) of two sets of moments.

    The result is the mean and population variance of the union of both sample sets:
    ``mean = mean_a + delta * w_b / w`` (carried as a compensated pair, see
    :attr:`Moments.mean_residual`) and
    ``var = (w_a var_a + w_b var_b) / w + w_a w_b delta**2 / w**2`` with
    ``delta = mean_b - mean_a``. Merging with an empty set returns the other unchanged.

    Args:
        a: running moments.
        b: moments to fold in.

    Returns:
        The merged :class:`Moments`.
    """
    return _mix(a, b, a.weight, b.weight, a.count + b.count)


def merge_ema(
    a: Moments,
    b: Moments,
    momentum: float,
    var_floor: float | None = None,
) -> Moments:
    """Exponential moving average of moments, debiased and with the cross term.

    The running estimate is the mixture in which the batch of update ``s`` (out of ``t``) has
    weight ``(1 - m) * m**(t - s)``, normalised by ``1 - m**t``::

        W_t    = m W_{t-1} + (1 - m)
        mean_t = mean_{t-1} + (1 - m) / W_t * (mean_b - mean_{t-1})
        var_t  = (m W_{t-1} var_{t-1} + (1 - m) var_b) / W_t
                 + m W_{t-1} (1 - m) / W_t**2 * (mean_b - mean_{t-1})**2

    Starting from ``W_0 = 0`` the first update returns the batch itself, so early estimates are
    not dragged toward the initial values (the same debiasing as Adam's), and the variance
    includes the spread between batch means (law of total variance). A batch with no valid
    data changes nothing. ``momentum=0`` tracks the latest batch.

    Args:
        a: running moments; ``a.weight`` holds ``W_{t-1}``.
        b: batch moments.
        momentum: weight ``m`` of the past, in ``[0, 1)``.
        var_floor: optional ratio ``r``: after the update the variance is at least
            ``r * (var_b + (mean_b - mean_t)**2)``, the batch's second moment around the new
            mean, so that after a distribution shift normalised batches have a root mean
            square of at most ``1 / sqrt(r)``.

    Returns:
        The updated :class:`Moments`; ``count`` keeps counting samples.
    """
    if not 0.0 <= momentum < 1.0:  # also refuses NaN
        raise ValueError(f"`momentum` must be in [0, 1), got {momentum!r}.")
    if var_floor is not None and not 0.0 < var_floor <= 1.0:
        raise ValueError(f"`var_floor` must be in (0, 1], got {var_floor!r}.")
    has_data = b.weight > 0
    # Without data the past keeps its full weight: an empty batch changes nothing.
    weight_a = torch.where(has_data, momentum * a.weight, a.weight)
    out = _mix(a, b, weight_a, (1.0 - momentum) * has_data.to(torch.float64), a.count + b.count)
    if var_floor is not None:
        gap = b.mean - out.mean
        floor = var_floor * (b.var + gap * gap)
        var = torch.where(b.weight > 0, torch.maximum(out.var, floor), out.var)
        out = Moments(out.weight, out.count, out.mean, var, out.mean_residual)
    return out
