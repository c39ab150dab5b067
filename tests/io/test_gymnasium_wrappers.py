"""``from_gymnasium``: statistics of Gymnasium's normalization wrappers as rlnorm normalizers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces

import rlnorm
from conftest import assert_close
from rlnorm.io.gymnasium_wrappers import from_gymnasium

ATOL = 1e-5
SRC = str(Path(__file__).resolve().parents[2] / "src")


class ScriptedEnv(gym.Env):
    """A single Gymnasium env replaying observations, rewards and terminations."""

    def __init__(self, obs: np.ndarray, rewards: np.ndarray, terminated: np.ndarray) -> None:
        self.observation_space = spaces.Box(-np.inf, np.inf, shape=obs.shape[1:], dtype=np.float32)
        self.action_space = spaces.Discrete(2)
        self._obs, self._rewards, self._terminated = obs, rewards, terminated
        self.t = 0

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple:
        super().reset(seed=seed)
        return self._obs[self.t].copy(), {}

    def step(self, action: Any) -> tuple:
        t = self.t
        self.t += 1
        return (
            self._obs[t + 1].copy(),
            float(self._rewards[t]),
            bool(self._terminated[t]),
            False,
            {},
        )


def gymnasium_stream(steps: int = 60) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    gen = np.random.default_rng(5)
    obs = np.array([5.0, -2.0, 0.1]) + gen.normal(size=(steps + 1, 3)) * [2.0, 0.5, 0.05]
    rewards = gen.normal(0.5, 1.0, size=steps)
    terminated = np.zeros(steps, dtype=bool)
    terminated[[9, 23, 40]] = True
    return obs.astype(np.float32), rewards, terminated


def test_gymnasium_wrappers_migrate_and_normalize_like_the_wrappers() -> None:
    obs, rewards, terminated = gymnasium_stream()
    env = gym.wrappers.NormalizeReward(
        gym.wrappers.NormalizeObservation(ScriptedEnv(obs, rewards, terminated), epsilon=1e-6),
        gamma=0.9,
        epsilon=1e-6,
    )
    env.reset()
    for _ in range(30):
        env.step(0)
    norms = from_gymnasium(env, env, frozen=True)  # the .env chain is searched
    assert norms.frozen
    assert norms.config.clip is None
    assert norms.config.reward_clip is None
    assert norms.config.gamma == 0.9
    assert norms.config.epsilon == 1e-6
    obs_wrapper = env.env
    rms = norms.obs["obs"]
    assert float(rms.weight_sum) == pytest.approx(obs_wrapper.obs_rms.count, rel=1e-12)
    assert int(rms.count) == 31  # the reset observation and 30 steps; Gymnasium starts at 1e-4
    assert norms.reward is not None
    assert norms.reward.returns.tolist() == pytest.approx(env.discounted_reward.tolist())
    obs_wrapper.update_running_mean = False
    env.update_running_mean = False
    for t in range(30, 50):
        out_obs, out_rew, *_ = env.step(0)
        raw = torch.from_numpy(obs[t + 1])
        np.testing.assert_allclose(norms.normalize_obs(raw).numpy(), out_obs, rtol=0, atol=ATOL)
        ours = norms.scale_rewards(torch.tensor([rewards[t]], dtype=torch.float64))
        np.testing.assert_allclose(ours.numpy(), [out_rew], rtol=0, atol=ATOL)


def test_observation_updates_continue_like_gymnasium_normalize_observation() -> None:
    obs, rewards, terminated = gymnasium_stream()
    env = gym.wrappers.NormalizeObservation(ScriptedEnv(obs, rewards, terminated))
    env.reset()
    for _ in range(10):
        env.step(0)
    norms = from_gymnasium(env)
    assert norms.reward is None
    for t in range(10, 60):
        out, *_ = env.step(0)
        raw = torch.from_numpy(obs[t + 1].astype(np.float64))
        norms.update_obs(raw[None])  # Gymnasium updates with one observation per step
        np.testing.assert_allclose(norms.normalize_obs(raw).numpy(), out, rtol=0, atol=ATOL)


def test_vector_normalize_reward_carries_every_environments_return() -> None:
    def make(i: int) -> Any:
        obs, rewards, terminated = gymnasium_stream()
        return lambda: ScriptedEnv(obs, rewards * (i + 1), terminated)

    venv = gym.wrappers.vector.NormalizeReward(
        gym.vector.SyncVectorEnv([make(0), make(1)]), gamma=0.95
    )
    venv.reset()
    for _ in range(12):
        venv.step(np.zeros(2, dtype=np.int64))
    norms = from_gymnasium(reward_wrapper=venv)
    assert norms.reward is not None
    assert norms.reward.num_envs == 2
    assert_close(norms.reward.returns, venv.accumulated_reward, rtol=1e-15)
    assert_close(norms.reward.stats.var, venv.return_rms.var, rtol=1e-15)
    assert float(norms.reward.stats.weight_sum) == venv.return_rms.count


def test_from_gymnasium_argument_errors_name_the_argument() -> None:
    with pytest.raises(ValueError, match=r"`obs_wrapper`.*`reward_wrapper`.*got neither"):
        from_gymnasium()
    plain = ScriptedEnv(*gymnasium_stream())
    with pytest.raises(TypeError, match=r"`obs_wrapper` must be a Gymnasium NormalizeObservation"):
        from_gymnasium(plain)
    with pytest.raises(TypeError, match=r"`reward_wrapper` must be a Gymnasium NormalizeReward"):
        from_gymnasium(reward_wrapper=plain)
    with pytest.raises(TypeError, match=r"`frozen` must be a bool, got 1"):
        from_gymnasium(gym.wrappers.NormalizeObservation(plain), frozen=1)  # type: ignore[arg-type]


def test_from_gymnasium_different_epsilons_error_shows_both() -> None:
    plain = ScriptedEnv(*gymnasium_stream())
    env = gym.wrappers.NormalizeReward(
        gym.wrappers.NormalizeObservation(plain, epsilon=1e-8), epsilon=1e-6
    )
    with pytest.raises(
        ValueError, match=r"obs_wrapper.epsilon=1e-08, reward_wrapper.epsilon=1e-06"
    ):
        from_gymnasium(env, env)


def test_from_gymnasium_is_exported_lazily_and_its_module_imports_no_gymnasium() -> None:
    assert rlnorm.from_gymnasium is from_gymnasium
    script = (
        "import sys, rlnorm.io.gymnasium_wrappers\n"
        "print([m for m in ('gymnasium', 'lightning', 'torchmetrics') if m in sys.modules])"
    )
    env = {**os.environ, "PYTHONPATH": SRC}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert out.stdout.strip() == "[]", out.stderr
