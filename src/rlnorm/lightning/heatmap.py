"""The drift heatmap: per-dimension drift over the last logs, as an image read at a glance."""

from __future__ import annotations

from collections import deque

import torch
from torch import Tensor

__all__ = ["DriftHeatmap", "colorize"]

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


def colorize(values: Tensor) -> Tensor:
    """Map values in ``[0, 1]`` of shape ``(H, W)`` to a uint8 RGB image ``(3, H, W)``.

    Example:
        >>> colorize(torch.tensor([[0.0, 1.0]]))[:, 0, 1].tolist()  # the bright end of viridis
        [253, 231, 37]
    """
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

    Example:
        >>> heatmap = DriftHeatmap(history=8)
        >>> heatmap.add(torch.tensor([0.01, 2.0, 0.5]))  # |Δmean| / std of 3 dims
        >>> heatmap.image().shape  # one column so far, 48 px wide; rows 43 px tall
        torch.Size([3, 129, 48])
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
