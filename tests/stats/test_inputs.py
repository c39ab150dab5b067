"""Input and settings checks of the statistics modules name the argument and the problem."""

from __future__ import annotations

import pytest
import torch

from rlnorm.stats.inputs import check_input, checked_settings, flatten

CPU = torch.device("cpu")


def test_flatten_gives_rows_of_features_and_float64_weights():
    flat, weights = flatten(torch.ones(2, 5, 3, dtype=torch.bool), torch.ones(2, 5), (3,), CPU)
    assert flat.shape == (10, 3)
    assert flat.dtype == torch.uint8
    assert weights is not None
    assert weights.dtype == torch.float64


def test_shape_mismatches_name_the_argument():
    with pytest.raises(ValueError, match=r"`rewards` must have shape \(\*batch, \*\(3,\)\)"):
        check_input("rewards", torch.zeros(4, 2), (3,), CPU)
    with pytest.raises(ValueError, match="`mask` must have the batch shape"):
        flatten(torch.zeros(4, 3), torch.ones(5), (3,), CPU)


def test_settings_are_checked_and_returned_in_order():
    settings = checked_settings(0.5, 0.25, 10, "raise", 3, 1e-6, False)
    assert tuple(settings) == (0.5, 0.25, 10, "raise", 3.0, 1e-6, False)
    with pytest.raises(ValueError, match="`var_floor` applies to EMA statistics only"):
        checked_settings(None, 0.5, None, "skip", None, 1e-8, True)
    with pytest.raises(TypeError, match="`center` must be a bool"):
        checked_settings(None, None, None, "skip", None, 1e-8, 1)  # type: ignore[arg-type]
