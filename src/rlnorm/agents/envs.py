"""Environments of the reference trainer, including a badly scaled CartPole.

``rlnorm/ScaledCartPole-v1`` is ``CartPole-v1`` whose observations are multiplied by 100 and
offset by 1000, the kind of raw sensor scale where learning without normalization fails.

Example:
    >>> from rlnorm.agents.envs import make_vector_env
    >>> envs = make_vector_env("rlnorm/ScaledCartPole-v1", num_envs=2, seed=0)
    >>> obs, _ = envs.reset(seed=0)
    >>> bool(obs.mean() > 500)
    True
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode

__all__ = ["SCALED_CARTPOLE", "AffineObservation", "make_vector_env"]

SCALED_CARTPOLE = "rlnorm/ScaledCartPole-v1"


class AffineObservation(gym.ObservationWrapper):
    """Observations mapped to ``obs * scale + offset`` (float32), bounds included.

    Args:
        env: the environment to wrap.
        scale: multiplier of every observation entry.
        offset: added after scaling.
    """

    def __init__(self, env: gym.Env, scale: float = 100.0, offset: float = 1000.0) -> None:
        super().__init__(env)
        self.scale = float(scale)
        self.offset = float(offset)
        space = env.observation_space
        assert isinstance(space, gym.spaces.Box)
        self.observation_space = gym.spaces.Box(
            low=(space.low * self.scale + self.offset).astype(np.float32),
            high=(space.high * self.scale + self.offset).astype(np.float32),
            dtype=np.float32,
        )

    def observation(self, observation: np.ndarray) -> np.ndarray:
        """Apply the affine map."""
        return (observation * self.scale + self.offset).astype(np.float32)


def _scaled_cartpole(**kwargs: object) -> gym.Env:
    return AffineObservation(gym.make("CartPole-v1", **kwargs), scale=100.0, offset=1000.0)


if SCALED_CARTPOLE not in gym.registry:
    # CartPole-v1's own threshold: the scaling changes observations, not returns.
    gym.register(id=SCALED_CARTPOLE, entry_point=_scaled_cartpole, reward_threshold=475.0)


def make_vector_env(env_id: str, num_envs: int, seed: int) -> gym.vector.VectorEnv:
    """Synchronous vector environment with same-step autoreset and episode statistics.

    With same-step autoreset, a step that ends an episode returns the next episode's first
    observation and puts the last one in ``info["final_obs"]``, so that truncated episodes can
    be bootstrapped from it.

    Args:
        env_id: a registered gymnasium id, or ``"module:id"`` (imports ``module`` first).
        num_envs: number of copies stepped together.
        seed: seed of the action spaces (the caller seeds ``reset``).

    Returns:
        The vector environment, wrapped in ``RecordEpisodeStatistics``.
    """
    envs = gym.make_vec(
        env_id,
        num_envs=num_envs,
        vectorization_mode="sync",
        vector_kwargs={"autoreset_mode": AutoresetMode.SAME_STEP},
    )
    envs = gym.wrappers.vector.RecordEpisodeStatistics(envs)
    envs.action_space.seed(seed)
    return envs
