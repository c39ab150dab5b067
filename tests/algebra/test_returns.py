"""``discounted_returns`` is the documented recursion."""

from __future__ import annotations

import math

import torch

from conftest import reference_returns
from rlnorm.algebra.returns import discounted_returns


def test_discounted_returns_follow_the_reference_recursion_and_leave_the_input_alone():
    rewards = [[1.0, -2.0, 0.5], [math.nan, 1.0, 2.0], [3.0, math.inf, -1.0], [0.5, 0.5, 0.5]]
    dones = [[False, True, False], [False, False, True], [True, False, False], [False] * 3]
    start = [0.5, 0.0, -1.0]
    returns = torch.tensor(start, dtype=torch.float64)
    trajectory, final = discounted_returns(
        torch.tensor(rewards, dtype=torch.float64), torch.tensor(dones), returns, 0.9
    )
    want_final, fed, bad = reference_returns(rewards, dones, 0.9, start)
    assert final.tolist() == want_final
    finite = torch.isfinite(trajectory)
    assert int((~finite).sum()) == bad == 2
    assert trajectory[finite].tolist() == fed
    assert returns.tolist() == start
