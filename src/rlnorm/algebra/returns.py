"""The per-environment discounted return that reward normalization scales by.

Example:
    >>> import torch
    >>> from rlnorm.algebra.returns import discounted_returns
    >>> rewards = torch.tensor([[1.0, 0.0], [1.0, 2.0]], dtype=torch.float64)
    >>> dones = torch.tensor([[True, False], [False, False]])
    >>> start = torch.zeros(2, dtype=torch.float64)
    >>> trajectory, returns = discounted_returns(rewards, dones, start, 0.5)
    >>> trajectory.tolist(), returns.tolist()
    ([[1.0, 0.0], [1.0, 2.0]], [1.0, 2.0])
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["discounted_returns"]


def discounted_returns(
    rewards: Tensor, dones: Tensor, returns: Tensor, gamma: float
) -> tuple[Tensor, Tensor]:
    """Step ``ret = ret * gamma + r`` through a ``(T, envs)`` rollout, resetting after dones.

    A non-finite reward leaves its environment's return unchanged and enters the trajectory
    as NaN (the statistics skip and count it); after a step whose ``dones`` entry is true the
    return restarts at 0.

    Args:
        rewards: shape ``(T, envs)``.
        dones: bool, same shape.
        returns: float64 returns before the first step, shape ``(envs,)``; not modified.
        gamma: the discount.

    Returns:
        The float64 trajectory of returns ``(T, envs)`` and the returns after the last step.
    """
    trajectory = torch.empty(rewards.shape, dtype=torch.float64, device=rewards.device)
    for t in range(rewards.shape[0]):
        reward = rewards[t]
        finite = torch.isfinite(reward)
        returns = torch.where(finite, returns * gamma + reward, returns)
        # A non-finite reward goes to the statistics as NaN: skipped there and counted.
        trajectory[t] = torch.where(finite, returns, torch.nan)
        returns = torch.where(dones[t], 0.0, returns)
    return trajectory, returns
