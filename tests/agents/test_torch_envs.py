"""``TorchCartPole`` against gymnasium's ``CartPole-v1``, step by step, on the CPU."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

from rlnorm.agents.torch_envs import TorchCartPole

F64 = torch.float64


def gym_envs(n: int, seed: int) -> list[gym.Env]:
    envs = [gym.make("CartPole-v1") for _ in range(n)]
    for i, env in enumerate(envs):
        env.reset(seed=seed + i)
        env.action_space.seed(seed + i)
    return envs


def states(envs: list[gym.Env]) -> torch.Tensor:
    return torch.tensor(np.stack([env.unwrapped.state for env in envs]), dtype=F64)


def test_float64_dynamics_match_gymnasium_through_many_episodes() -> None:
    n, steps = 8, 400
    envs = gym_envs(n, seed=3)
    torch_env = TorchCartPole(n, dtype=F64, seed=0)
    torch_env.reset()
    torch_env.state = states(envs)
    rng = np.random.default_rng(0)
    episodes = 0
    for _ in range(steps):
        actions = rng.integers(0, 2, size=n)
        step = torch_env.step(torch.as_tensor(actions))
        for i, env in enumerate(envs):
            obs, reward, terminated, truncated, _ = env.step(int(actions[i]))
            # gymnasium integrates in float64 and returns float32 observations
            np.testing.assert_allclose(
                step.final_obs[i].numpy().astype(np.float32), obs, rtol=1e-6, atol=1e-7
            )
            assert step.reward[i].item() == reward
            assert bool(step.terminated[i]) == terminated
            assert bool(step.truncated[i]) == truncated
            if terminated or truncated:
                episodes += 1
                env.reset()
            else:
                assert torch.equal(step.obs[i], step.final_obs[i])
        # continue from gymnasium's own state (its resets included), to compare from there
        internal = states(envs)
        torch.testing.assert_close(
            torch.where(step.terminated.unsqueeze(1), internal, torch_env.state),
            internal,
            rtol=1e-10,
            atol=1e-12,
        )
        torch_env.state = internal
    assert episodes > 10  # random actions: episodes of about 20 steps


def test_time_limit_truncates_and_reports_the_episode() -> None:
    env = TorchCartPole(2, dtype=F64, max_episode_steps=3, seed=1)
    env.reset()
    env.state = torch.zeros(2, 4, dtype=F64)  # upright and still: alternating pushes keep it up
    for t in range(3):
        step = env.step(torch.tensor([t % 2, (t + 1) % 2]))
    assert step.truncated.tolist() == [True, True]
    assert step.terminated.tolist() == [False, False]
    assert step.episode_return.tolist() == [3.0, 3.0]
    assert step.episode_length.tolist() == [3, 3]
    assert env.elapsed.tolist() == [0, 0]
    assert not torch.equal(step.obs, step.final_obs)  # reset in the same step
    assert bool((step.obs.abs() <= 0.05).all())


def test_termination_resets_only_the_finished_copy() -> None:
    env = TorchCartPole(2, dtype=F64, seed=2)
    env.reset()
    env.state = torch.tensor([[2.39, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]], dtype=F64)
    before = env.state.clone()
    step = env.step(torch.tensor([1, 1]))
    assert step.terminated.tolist() == [True, False]
    assert step.episode_return.tolist() == [1.0, 0.0]
    assert step.episode_length.tolist() == [1, 0]
    assert float(step.final_obs[0, 0]) > 2.4
    assert bool((step.obs[0].abs() <= 0.05).all())
    assert torch.equal(step.obs[1], step.final_obs[1])
    assert not torch.equal(env.state[1], before[1])


def test_scaled_observations_are_affine_in_the_state() -> None:
    plain = TorchCartPole(5, seed=4)
    scaled = TorchCartPole(5, seed=4, scale=100.0, offset=1000.0)
    torch.testing.assert_close(scaled.reset(), plain.reset() * 100 + 1000)
    actions = torch.tensor([0, 1, 1, 0, 1])
    torch.testing.assert_close(scaled.step(actions).obs, plain.step(actions).obs * 100 + 1000)


def test_reset_is_seeded_and_within_gymnasium_bounds() -> None:
    a = TorchCartPole(64, seed=5).reset()
    b = TorchCartPole(64, seed=6).reset(seed=5)
    assert torch.equal(a, b)
    assert a.dtype == torch.float32
    assert bool((a.abs() <= 0.05).all())
    assert a.std() > 0.02


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_envs": 0}, "num_envs"),
        ({"num_envs": 2, "max_episode_steps": 0}, "max_episode_steps"),
        ({"num_envs": 2, "dtype": torch.long}, "dtype"),
    ],
)
def test_bad_arguments_are_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TorchCartPole(**kwargs)


def test_action_of_the_wrong_shape_is_an_error() -> None:
    env = TorchCartPole(3)
    env.reset()
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        env.step(torch.zeros(2, dtype=torch.long))


@pytest.mark.cuda
def test_cuda_matches_cpu() -> None:
    cpu = TorchCartPole(16, dtype=F64, seed=7)
    gpu = TorchCartPole(16, dtype=F64, seed=7, device="cuda")
    cpu.reset()
    gpu.reset()
    gpu.state = cpu.state.cuda()
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        actions = torch.randint(0, 2, (16,), generator=gen)
        a, b = cpu.step(actions), gpu.step(actions.cuda())
        torch.testing.assert_close(b.final_obs.cpu(), a.final_obs, rtol=1e-12, atol=1e-12)
        assert torch.equal(b.terminated.cpu(), a.terminated)
        gpu.state = cpu.state.cuda()  # the resets draw from different generators
