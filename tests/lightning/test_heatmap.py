"""DriftHeatmap: per-dimension drift over the last logs as an image, and its state."""

from __future__ import annotations

import torch

from rlnorm.lightning.heatmap import DriftHeatmap, colorize

F64 = torch.float64


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
