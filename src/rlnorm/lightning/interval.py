"""Per-interval drift aggregates (batch shift, clip fraction), reduced over ranks."""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor
from torchmetrics.aggregation import MaxMetric, SumMetric

__all__ = ["IntervalMetrics"]


class IntervalMetrics:
    """Per-interval aggregates of one normalizer, reduced across ranks at ``compute``.

    - ``batch_shift``: the largest :func:`batch_shift` of any update in the interval;
    - ``clip_fraction``: share of normalized values at ``±clip`` over all normalize calls
      (clipped values summed over ranks, divided by all values summed over ranks).

    Each call only folds its figure into a running max or sum (one or two small tensor ops on
    the hot path); at the end of the interval the partial aggregates go through torchmetrics,
    whose ``compute`` reduces them over all ranks. The torchmetrics objects are built at the
    first ``compute``, not here: building them reads package metadata (tens of milliseconds),
    which would otherwise land on the first rollout step of every run, logged or not. The
    partial aggregates are the whole state: :meth:`partials` and :meth:`load_partials` carry an
    interval across a checkpoint.

    Args:
        device: where the metric states live (the normalizer's device).
        sync: reduce over ``torch.distributed`` at ``compute`` (``False``: this process's
            interval alone, e.g. a player process outside the trainers' group).
        process_group: the group to reduce over (``None``: the default group).

    Example:
        >>> metrics = IntervalMetrics(torch.device("cpu"))
        >>> metrics.update_shift(torch.tensor(0.5))
        >>> metrics.add_clipped(1, 4)  # 1 of 4 normalized values sat at +-clip
        >>> {k: float(v) for k, v in metrics.compute().items()}
        {'batch_shift': 0.5, 'clip_fraction': 0.25}
    """

    def __init__(
        self, device: torch.device, sync: bool = True, process_group: Any | None = None
    ) -> None:
        self.device = device
        self._options: dict[str, Any] = {
            "nan_strategy": "ignore",
            "sync_on_compute": sync,
            "process_group": process_group,
        }
        # (batch shift, clipped, values), built at the first `compute`.
        self._reducers: tuple[MaxMetric, SumMetric, SumMetric] | None = None
        self._reset_partials()

    def _metrics(self) -> tuple[MaxMetric, SumMetric, SumMetric]:
        """The torchmetrics objects that reduce the interval over ranks (built on first use)."""
        if self._reducers is None:
            options, device = self._options, self.device
            # Integer-valued float64 sums: exact, so the fraction does not depend on how the
            # values were split between ranks (or between a checkpoint and the resumed run).
            self._reducers = (
                MaxMetric(**options).to(device),
                SumMetric(**options).set_dtype(torch.float64).to(device),
                SumMetric(**options).set_dtype(torch.float64).to(device),
            )
        return self._reducers

    def _reset_partials(self) -> None:
        f64 = {"dtype": torch.float64, "device": self.device}
        self._shift_max = torch.full((), -math.inf, **f64)
        # Shifts arrive as host floats (native CPU path) or device tensors (elsewhere), too.
        self._shift_max_host = -math.inf
        # Clipped counts arrive as host ints (native CPU path) or device tensors (elsewhere).
        self._clipped = torch.zeros((), **f64)
        self._clipped_host = 0
        self._values = 0

    def update_shift(self, value: Tensor | float) -> None:
        """Record one update's batch shift (NaN is ignored)."""
        if isinstance(value, Tensor):
            self._shift_max = torch.fmax(self._shift_max, value.detach().to(torch.float64))
        elif value > self._shift_max_host:  # false for NaN
            self._shift_max_host = value

    def _shift(self) -> Tensor:
        """The interval's largest batch shift, host and device ones together (``-inf``: none)."""
        host = self._shift_max_host
        if host == -math.inf:
            return self._shift_max
        host_max = torch.tensor(host, dtype=torch.float64, device=self.device)
        return torch.fmax(self._shift_max, host_max)

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
                self._shift(),
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
        self._shift_max_host = -math.inf
        self._clipped = values[1].clone()
        self._clipped_host = 0
        self._values = int(values[2])

    @staticmethod
    def sum_over_ranks(gathered: Tensor) -> Tensor:
        """One interval from the :meth:`partials` of every rank, stacked along the first dim.

        The max of the batch shifts, the sums of the counts: what :meth:`compute` reduces to,
        as partials one rank can :meth:`load_partials` (e.g. when resuming from a checkpoint).

        Example:
            >>> both = torch.tensor([[0.5, 1.0, 4.0], [2.0, 3.0, 4.0]], dtype=torch.float64)
            >>> IntervalMetrics.sum_over_ranks(both).tolist()
            [2.0, 4.0, 8.0]
        """
        return torch.stack(
            [gathered[..., 0].amax(0), gathered[..., 1].sum(0), gathered[..., 2].sum(0)], dim=-1
        )

    def compute(self, reset: bool = True) -> dict[str, Tensor]:
        """Interval figures, reduced over ranks (a collective: call it on every rank).

        Figures without data in the interval on any rank come back as NaN; callers skip them.

        Args:
            reset: start a new interval afterwards; ``False`` only reads the figures so far.
        """
        shift_metric, clipped_metric, values_metric = metrics = self._metrics()
        nan = torch.full((), math.nan, dtype=torch.float64, device=self.device)
        shift = self._shift()
        shift_metric.update(torch.where(torch.isinf(shift), nan, shift))
        clipped_metric.update(self._clipped + self._clipped_host)
        values_metric.update(
            torch.tensor(float(self._values), dtype=torch.float64, device=self.device)
        )
        with warnings.catch_warnings():
            # A rank whose interval had no data contributes NaN, which the metrics ignore.
            warnings.filterwarnings("ignore", message=".*Encountered.*nan.*")
            shift = shift_metric.compute()
            clipped = clipped_metric.compute()
            values = values_metric.compute()
        for metric in metrics:
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
