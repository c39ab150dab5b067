"""TensorBoard extras: histograms of the per-dimension statistics and a drift heatmap image.

Scalars go to every logger through ``log_metrics``; histograms and images need a
``SummaryWriter`` and are written only to :class:`~lightning.pytorch.loggers.TensorBoardLogger`
instances, from rank zero.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

import torch
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from torch import Tensor

__all__ = ["DriftHeatmap", "tensorboard_writers"]

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

    Rows are feature dimensions, columns are logging steps (newest on the right, columns not
    yet logged in grey); brightness is ``|Δmean| / std`` since the previous log on a log scale
    from 1e-3 (dark) to 10 (bright), so a dimension that keeps moving shows as a bright row and
    a statistic that has settled fades to dark.

    Args:
        history: number of logging steps shown.
        max_dims: dimensions shown (the first ones), to keep the image readable.
        width: image width in pixels (rounded to whole columns).
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

    def add(self, per_dim: Tensor) -> None:
        """Append one column of per-dimension drift."""
        self.columns.append(per_dim.detach().reshape(-1)[: self.max_dims].float().cpu())

    def image(self) -> Tensor | None:
        """The heatmap as a uint8 ``(3, H, W)`` tensor, or ``None`` before any column."""
        if not self.columns:
            return None
        grid = torch.stack(list(self.columns), dim=1)  # (dims, steps)
        img = colorize((grid.clamp_min(1e-3).log10() + 3.0) / 4.0)
        blank = self.history - grid.shape[1]
        if blank:
            grey = torch.full((3, grid.shape[0], blank), 48, dtype=torch.uint8)
            img = torch.cat([grey, img], dim=2)
        cell_height = max(1, -(-self.min_height // grid.shape[0]))
        return img.repeat_interleave(cell_height, dim=1).repeat_interleave(self.cell_width, dim=2)
