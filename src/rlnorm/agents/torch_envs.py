"""Environments that live on a torch device: every copy stepped at once, no host round trip.

:class:`TorchCartPole` is gymnasium's ``CartPole-v1`` (same constants, Euler integration,
termination bounds, reward of 1 per step and 500-step time limit) written as batched tensor
code, so that thousands of copies step in a handful of kernels on a GPU and a rollout never
copies observations to the host. It resets finished copies in the same step, as
:func:`rlnorm.agents.envs.make_vector_env` does (gymnasium's ``AutoresetMode.SAME_STEP``):
a step that ends an episode returns the next episode's first observation, and the last one in
``final_obs``. With ``scale=100, offset=1000`` it is ``rlnorm/ScaledCartPole-v1``.

Nothing in :meth:`TorchCartPole.step` reads a value back to the host, so a loop of steps
queues its kernels without waiting for the device (and can be captured in a CUDA graph).

Example:
    >>> import torch
    >>> from rlnorm.agents.torch_envs import TorchCartPole
    >>> env = TorchCartPole(num_envs=3, seed=0)
    >>> obs = env.reset()
    >>> step = env.step(torch.ones(3, dtype=torch.long))
    >>> step.obs.shape, step.reward.tolist()
    (torch.Size([3, 4]), [1.0, 1.0, 1.0])
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["TorchCartPole", "TorchStep"]


class TorchStep(NamedTuple):
    """What :meth:`TorchCartPole.step` returns, every field with leading dim ``num_envs``."""

    obs: Tensor  # the observation to act on next (a new episode's first where one ended)
    reward: Tensor
    terminated: Tensor  # bool: the pole fell or the cart left the track
    truncated: Tensor  # bool: the time limit ended the episode (and it did not terminate)
    final_obs: Tensor  # the step's own observation, before any reset (for bootstrapping)
    episode_return: Tensor  # the finished episode's return where one ended, else 0
    episode_length: Tensor  # the finished episode's length where one ended, else 0


class TorchCartPole:
    """``CartPole-v1`` for ``num_envs`` copies at once, as tensors on one device.

    Args:
        num_envs: copies stepped together.
        device: where the state lives (``None``: torch's default device).
        dtype: dtype of the state and observations; ``torch.float64`` reproduces gymnasium's
            own arithmetic (it integrates in float64 and returns float32 observations).
        max_episode_steps: time limit (``CartPole-v1``'s is 500); ``None`` for none.
        scale: observations are ``state * scale + offset`` (``100`` and ``1000`` give
            ``rlnorm/ScaledCartPole-v1``); the dynamics use the unscaled state.
        offset: see ``scale``.
        seed: seed of the device generator that draws the reset states.

    Attributes:
        observation_dim: 4 (cart position and velocity, pole angle and angular velocity).
        action_count: 2 (push left, push right).
    """

    observation_dim = 4
    action_count = 2

    gravity = 9.8
    masscart = 1.0
    masspole = 0.1
    total_mass = masscart + masspole
    length = 0.5  # half the pole's length
    polemass_length = masspole * length
    force_mag = 10.0
    tau = 0.02  # seconds between state updates
    theta_threshold_radians = 12 * 2 * math.pi / 360
    x_threshold = 2.4

    def __init__(
        self,
        num_envs: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        max_episode_steps: int | None = 500,
        scale: float = 1.0,
        offset: float = 0.0,
        seed: int | None = None,
    ) -> None:
        if not isinstance(num_envs, int) or isinstance(num_envs, bool) or num_envs <= 0:
            raise ValueError(f"`num_envs` must be a positive int, got {num_envs!r}.")
        if max_episode_steps is not None and (
            not isinstance(max_episode_steps, int) or max_episode_steps <= 0
        ):
            raise ValueError(
                f"`max_episode_steps` must be a positive int or None, got {max_episode_steps!r}."
            )
        if not dtype.is_floating_point:
            raise ValueError(f"`dtype` must be a floating-point dtype, got {dtype}.")
        self.num_envs = num_envs
        self.device = torch.device(device) if device is not None else torch.empty(0).device
        self.dtype = dtype
        self.max_episode_steps = max_episode_steps
        self.scale = float(scale)
        self.offset = float(offset)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(0 if seed is None else seed)
        self.state = torch.zeros(num_envs, 4, device=self.device, dtype=dtype)
        self.elapsed = torch.zeros(num_envs, device=self.device, dtype=torch.long)
        self.returns = torch.zeros(num_envs, device=self.device, dtype=dtype)

    def observe(self, state: Tensor) -> Tensor:
        """The observation of a state: ``state * scale + offset``."""
        if self.scale == 1.0 and self.offset == 0.0:
            return state.clone()
        return state * self.scale + self.offset

    def reset(self, seed: int | None = None) -> Tensor:
        """Start every copy anew (states uniform in ``[-0.05, 0.05)``, as gymnasium's).

        Args:
            seed: reseed the generator first.

        Returns:
            The first observations, ``(num_envs, 4)``.
        """
        if seed is not None:
            self.generator.manual_seed(seed)
        self.state = self._initial_states()
        self.elapsed.zero_()
        self.returns.zero_()
        return self.observe(self.state)

    def step(self, action: Tensor) -> TorchStep:
        """Advance every copy by one step; copies whose episode ended start a new one.

        Args:
            action: ``(num_envs,)`` integers, 1 pushes right and 0 left (any other value
                pushes left, unchecked: checking would read the actions back to the host).

        Returns:
            A :class:`TorchStep`.
        """
        if action.shape != (self.num_envs,):
            raise ValueError(
                f"`action` must have shape ({self.num_envs},), got {tuple(action.shape)}."
            )
        x, x_dot, theta, theta_dot = self.state.unbind(1)
        force = torch.where(action.to(self.device) == 1, self.force_mag, -self.force_mag)
        force = force.to(self.dtype)
        costheta = torch.cos(theta)
        sintheta = torch.sin(theta)
        temp = (force + self.polemass_length * theta_dot.square() * sintheta) / self.total_mass
        thetaacc = (self.gravity * sintheta - costheta * temp) / (
            self.length * (4.0 / 3.0 - self.masspole * costheta.square() / self.total_mass)
        )
        xacc = temp - self.polemass_length * thetaacc * costheta / self.total_mass
        x = x + self.tau * x_dot
        x_dot = x_dot + self.tau * xacc
        theta = theta + self.tau * theta_dot
        theta_dot = theta_dot + self.tau * thetaacc
        state = torch.stack((x, x_dot, theta, theta_dot), dim=1)

        terminated = (x.abs() > self.x_threshold) | (theta.abs() > self.theta_threshold_radians)
        reward = torch.ones(self.num_envs, device=self.device, dtype=self.dtype)
        self.elapsed += 1
        self.returns += reward
        if self.max_episode_steps is None:
            truncated = torch.zeros_like(terminated)
        else:
            truncated = (self.elapsed >= self.max_episode_steps) & ~terminated
        done = terminated | truncated
        zero = torch.zeros((), device=self.device, dtype=self.dtype)
        episode_return = torch.where(done, self.returns, zero)
        episode_length = torch.where(done, self.elapsed, 0)

        # Same-step autoreset, with no host sync: fresh states are drawn for every copy and
        # kept where an episode ended.
        self.state = torch.where(done.unsqueeze(1), self._initial_states(), state)
        self.elapsed.masked_fill_(done, 0)
        self.returns.masked_fill_(done, 0.0)
        return TorchStep(
            obs=self.observe(self.state),
            reward=reward,
            terminated=terminated,
            truncated=truncated,
            final_obs=self.observe(state),
            episode_return=episode_return,
            episode_length=episode_length,
        )

    def _initial_states(self) -> Tensor:
        noise = torch.rand(
            self.num_envs, 4, device=self.device, dtype=self.dtype, generator=self.generator
        )
        return noise * 0.1 - 0.05
