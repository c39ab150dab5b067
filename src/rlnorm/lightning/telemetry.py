"""Drift telemetry: interval aggregates reduced over ranks, histograms and a heatmap image.

The figures themselves are the pure functions of :mod:`rlnorm.algebra.drift`; here are the
parts with state: :class:`IntervalMetrics` (batch shift and clip fraction over a logging
interval, reduced with torchmetrics) and :class:`DriftHeatmap`. Scalars go to every logger
through ``log_metrics``; histograms and images need a ``SummaryWriter`` and are written only to
:class:`~lightning.pytorch.loggers.TensorBoardLogger` instances, from rank zero.
"""

from __future__ import annotations

import math
import warnings
from collections import deque
from collections.abc import Iterable

import torch
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from torch import Tensor
from torchmetrics.aggregation import MaxMetric, SumMetric

__all__ = ["DriftHeatmap", "IntervalMetrics", "tensorboard_writers"]

# Anchor colours of the viridis colour map, dark (0) to bright (1).
_VIRIDIS = torch.tensor(
    [
        [68, 1, 84],
        [72, 40, 120],
        [62, 74, 137],
        [49, 104, 142],
        [38, 130, 142],
        [31, 158, 137],
        [53, 183, 121],
        [109, 205, 89],
        [180, 222, 44],
        [253, 231, 37],
    ],
    dtype=torch.float32,
)


def tensorboard_writers(loggers: Iterable[Logger]) -> list:
    """The ``SummaryWriter`` of each TensorBoard logger (rank zero only; elsewhere none)."""
    from lightning.pytorch.utilities import rank_zero_only

    if rank_zero_only.rank != 0:
        return []
    return [logger.experiment for logger in loggers if isinstance(logger, TensorBoardLogger)]


def colorize(values: Tensor) -> Tensor:
    """Map values in ``[0, 1]`` of shape ``(H, W)`` to a uint8 RGB image ``(3, H, W)``."""
    scaled = values.clamp(0, 1) * (len(_VIRIDIS) - 1)
    low = scaled.floor().long().clamp(max=len(_VIRIDIS) - 2)
    frac = (scaled - low).unsqueeze(-1)
    rgb = _VIRIDIS[low] * (1 - frac) + _VIRIDIS[low + 1] * frac
    return rgb.round().to(torch.uint8).permute(2, 0, 1)


class DriftHeatmap:
    """Per-dimension drift over the last ``history`` logs, as an image a person reads at a glance.

    Rows are feature dimensions, columns are logging steps (newest on the right). Only the
    columns logged so far are drawn, so the image grows one column per log up to ``history``
    columns and then scrolls. Brightness is ``|Δmean| / std`` since the previous log on a log
    scale from 1e-3 (dark) to 10 (bright), so a dimension that keeps moving shows as a bright
    row and a statistic that has settled fades to dark.

    Args:
        history: number of logging steps shown at most.
        max_dims: dimensions shown (the first ones), to keep the image readable.
        width: image width in pixels once ``history`` columns are logged (rounded to whole
            columns); each column is ``width // history`` pixels wide.
        min_height: rows are made tall enough for the image to reach this height.
    """

    def __init__(
        self, history: int = 64, max_dims: int = 64, width: int = 384, min_height: int = 128
    ) -> None:
        self.columns: deque[Tensor] = deque(maxlen=history)
        self.history = history
        self.max_dims = max_dims
        self.cell_width = max(1, width // history)
        self.min_height = min_height

    def column(self, per_dim: Tensor) -> Tensor:
        """One column as stored: the first ``max_dims`` values, float32, on the CPU."""
        return per_dim.detach().reshape(-1)[: self.max_dims].float().cpu()

    def add(self, per_dim: Tensor) -> None:
        """Append one column of per-dimension drift."""
        self.columns.append(self.column(per_dim))

    def image(self, extra: Tensor | None = None) -> Tensor | None:
        """The heatmap as a uint8 ``(3, H, W)`` tensor, or ``None`` before any column.

        ``W`` is ``cell_width`` times the number of columns drawn.

        Args:
            extra: a provisional newest column drawn after the stored ones (the oldest one
                scrolls out if the history is full) without being stored.
        """
        columns = list(self.columns)
        if extra is not None:
            columns = [*columns, self.column(extra)][-self.history :]
        if not columns:
            return None
        grid = torch.stack(columns, dim=1)  # (dims, steps)
        img = colorize((grid.clamp_min(1e-3).log10() + 3.0) / 4.0)
        cell_height = max(1, -(-self.min_height // grid.shape[0]))
        return img.repeat_interleave(cell_height, dim=1).repeat_interleave(self.cell_width, dim=2)

    def state_dict(self) -> Tensor:
        """The stored columns, oldest first, as a float32 ``(columns, dims)`` tensor."""
        if not self.columns:
            return torch.zeros(0, 0)
        return torch.stack(list(self.columns))

    def load_state_dict(self, columns: Tensor) -> None:
        """Replace the stored columns with those :meth:`state_dict` returned."""
        if not isinstance(columns, Tensor) or columns.dim() != 2:
            raise ValueError(f"Heatmap columns must be a 2-D tensor, got {columns!r}.")
        self.columns.clear()
        for column in columns:
            self.add(column)


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
