"""``RewardNormalizer``: per-environment discounted returns and reward scaling."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import assert_close, assert_state_equal, reference_returns, state_of
from rlnorm import RewardNormalizer
from rlnorm.backends import native

# Every test runs on the native CPU kernels and on the torch code path.
pytestmark = pytest.mark.usefixtures("backend")

F64 = torch.float64


def rollout(seed: int, steps: int, envs: int, done_prob: float = 0.2):
    gen = torch.Generator().manual_seed(seed)
    rewards = torch.randn(steps, envs, generator=gen, dtype=F64) * 2 + 0.5
    dones = torch.rand(steps, envs, generator=gen) < done_prob
    return rewards, dones


def population_var(values: list[float]) -> float:
    arr = np.asarray(values, dtype=np.float64)
    return float(((arr - arr.mean()) ** 2).mean())


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    steps=st.integers(1, 30),
    envs=st.integers(1, 6),
    gamma=st.floats(0.0, 1.0),
    done_prob=st.floats(0.0, 1.0),
)
def test_rollout_matches_plain_python_return_recursion_with_dones(
    seed: int, steps: int, envs: int, gamma: float, done_prob: float
) -> None:
    rewards, dones = rollout(seed, steps, envs, done_prob)
    norm = RewardNormalizer(envs, gamma=gamma)
    norm.update(rewards, dones)
    ret, fed, _ = reference_returns(rewards.tolist(), dones.tolist(), gamma, [0.0] * envs)
    assert_close(norm.returns, ret, rtol=1e-12, atol=1e-12)
    assert int(norm.count) == len(fed) == steps * envs
    assert_close(norm.stats.mean, np.mean(fed), rtol=1e-12, atol=1e-12)
    assert_close(norm.stats.var, population_var(fed), rtol=1e-10, atol=1e-12)


def test_returns_reset_after_the_done_step_not_before() -> None:
    norm = RewardNormalizer(2, gamma=0.5)
    rewards = torch.tensor([[1.0, 1.0], [2.0, 2.0], [4.0, 4.0]])
    dones = torch.tensor([[False, False], [True, False], [False, False]])
    batch = norm.update(rewards, dones)
    # env 0: 1, 2.5 (fed, then reset), 4; env 1: 1, 2.5, 5.25
    assert norm.returns.tolist() == [4.0, 5.25]
    fed = [1.0, 1.0, 2.5, 2.5, 4.0, 5.25]
    assert_close(norm.stats.mean, np.mean(fed), rtol=1e-15)
    assert_close(norm.stats.var, population_var(fed), rtol=1e-14)
    assert int(batch.count) == 6


def test_multiple_rollouts_carry_returns_across_calls() -> None:
    norm = RewardNormalizer(3, gamma=0.9)
    ret = [0.0] * 3
    all_fed: list[float] = []
    for seed in range(4):
        rewards, dones = rollout(seed, 7, 3)
        norm.update(rewards, dones)
        ret, fed, _ = reference_returns(rewards.tolist(), dones.tolist(), 0.9, ret)
        all_fed += fed
    assert_close(norm.returns, ret, rtol=1e-13, atol=1e-13)
    assert_close(norm.stats.mean, np.mean(all_fed), rtol=1e-12)
    assert_close(norm.stats.var, population_var(all_fed), rtol=1e-12)


def test_step_by_step_calls_equal_one_rollout_call_in_exact_mode() -> None:
    rewards, dones = rollout(5, 50, 4)
    stepped = RewardNormalizer(4, gamma=0.97)
    for t in range(rewards.shape[0]):
        stepped.update(rewards[t], dones[t])
    whole = RewardNormalizer(4, gamma=0.97)
    whole.update(rewards, dones)
    assert torch.equal(stepped.returns, whole.returns)
    assert torch.equal(stepped.count, whole.count)
    assert_close(stepped.stats.mean, whole.stats.mean, rtol=1e-12)
    assert_close(stepped.stats.var, whole.stats.var, rtol=1e-12)


def test_dones_as_float_zero_one_equal_bool_dones() -> None:
    rewards, dones = rollout(6, 20, 3)
    as_bool, as_float = RewardNormalizer(3), RewardNormalizer(3)
    as_bool.update(rewards, dones)
    as_float.update(rewards, dones.to(torch.float32))
    assert_state_equal(state_of(as_float), state_of(as_bool))


def test_gamma_zero_feeds_the_rewards_themselves() -> None:
    rewards, dones = rollout(7, 25, 4)
    norm = RewardNormalizer(4, gamma=0.0)
    norm.update(rewards, dones)
    assert_close(norm.stats.mean, rewards.mean(), rtol=1e-13)
    assert_close(norm.stats.var, rewards.var(unbiased=False), rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_return_mode_normalize_divides_by_sqrt_var_plus_eps_without_centering(
    dtype: torch.dtype,
) -> None:
    norm = RewardNormalizer(3, gamma=0.99, epsilon=1e-6, clip=None)
    rewards = torch.full((40, 3), 1.0, dtype=F64)  # returns far from zero: centering would show
    norm.update(rewards, torch.zeros(40, 3, dtype=torch.bool))
    assert float(norm.stats.mean) > 10.0
    r = torch.tensor([[-1.0, 0.0, 2.5]], dtype=F64).to(dtype)
    got = norm.normalize(r)
    assert got.dtype == dtype
    want = r.to(F64) / math.sqrt(float(norm.stats.var) + 1e-6)
    tol = {torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float32: 1e-6, torch.float64: 1e-14}
    assert_close(got, want, rtol=tol[dtype], atol=tol[dtype])
    assert float(got[0, 1]) == 0.0  # a zero reward stays exactly zero
    assert torch.equal(norm.std, norm.stats.var.sqrt())


def test_return_mode_normalize_is_clipped() -> None:
    norm = RewardNormalizer(2, clip=2.0)
    norm.update(torch.tensor([[0.1, -0.1], [0.1, 0.1]]), torch.zeros(2, 2, dtype=torch.bool))
    got = norm.normalize(torch.tensor([1e6, -1e6]))
    assert got.tolist() == [2.0, -2.0]


def test_reward_mode_standardizes_by_statistics_of_the_rewards_themselves() -> None:
    rewards, dones = rollout(8, 30, 4)
    norm = RewardNormalizer(4, mode="reward", clip=None, epsilon=1e-8)
    norm.update(rewards, dones)
    assert_close(norm.stats.mean, rewards.mean(), rtol=1e-13)
    assert_close(norm.stats.var, rewards.var(unbiased=False), rtol=1e-12)
    got = norm.normalize(rewards)
    want = (rewards - rewards.mean()) / torch.sqrt(rewards.var(unbiased=False) + 1e-8)
    assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_normalize_before_any_update_is_the_identity() -> None:
    r = torch.tensor([3.0, -7.0, 100.0])
    assert torch.equal(RewardNormalizer(3).normalize(r), r)
    assert torch.equal(RewardNormalizer(3, mode="reward").normalize(r), r)


def test_denormalize_inverts_normalize_where_not_clipped() -> None:
    norm = RewardNormalizer(3, clip=None)
    rewards, dones = rollout(9, 20, 3)
    norm.update(rewards, dones)
    assert_close(norm.denormalize(norm.normalize(rewards)), rewards, rtol=1e-12, atol=1e-12)
    assert torch.equal(norm(rewards), norm.normalize(rewards))


def test_returns_are_part_of_state_dict_and_a_resumed_normalizer_continues_bitwise() -> None:
    first, second = rollout(10, 15, 3), rollout(11, 15, 3)
    original = RewardNormalizer(3, gamma=0.95)
    original.update(*first)
    state = original.state_dict()
    assert "returns" in state
    assert torch.equal(state["returns"], original.returns)
    assert {"stats.mean", "stats.var", "stats.count"} <= set(state)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    resumed = RewardNormalizer(3, gamma=0.95)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert_state_equal(state_of(resumed), state_of(original))
    original.update(*second)
    resumed.update(*second)
    assert_state_equal(state_of(resumed), state_of(original))
    assert torch.equal(resumed.normalize(second[0]), original.normalize(second[0]))


def test_loaded_returns_are_copied_not_aliased() -> None:
    src = RewardNormalizer(2)
    src.update(*rollout(12, 5, 2, done_prob=0.0))
    state = src.state_dict()
    dst = RewardNormalizer(2)
    dst.load_state_dict(state)
    kept = dst.returns.clone()
    state["returns"].fill_(123.0)
    assert torch.equal(dst.returns, kept)


def test_load_returns_for_another_num_envs_is_an_error_naming_both() -> None:
    src = RewardNormalizer(3)
    dst = RewardNormalizer(4)
    with pytest.raises(ValueError, match="returns") as err:
        dst.load_state_dict(src.state_dict())
    assert "(3,)" in str(err.value)
    assert "num_envs=4" in str(err.value)


def test_nonfinite_rewards_are_skipped_counted_and_leave_their_return_unchanged() -> None:
    rewards = torch.tensor(
        [[1.0, 1.0, 1.0], [math.nan, 2.0, math.inf], [3.0, -math.inf, 4.0], [1.0, 1.0, 1.0]],
        dtype=F64,
    )
    dones = torch.tensor(
        [[False, False, False], [True, False, False], [False, False, False], [False] * 3]
    )
    norm = RewardNormalizer(3, gamma=0.5)
    norm.update(rewards, dones)
    ret, fed, bad = reference_returns(rewards.tolist(), dones.tolist(), 0.5, [0.0] * 3)
    assert int(norm.stats.nonfinite_count) == bad == 3
    assert int(norm.count) == len(fed) == 9
    assert torch.isfinite(norm.returns).all()
    assert_close(norm.returns, ret, rtol=1e-15)
    assert_close(norm.stats.mean, np.mean(fed), rtol=1e-14)
    assert_close(norm.stats.var, population_var(fed), rtol=1e-13)
    assert torch.isfinite(norm.normalize(torch.ones(3))).all()


def test_nonfinite_raise_raises_before_returns_or_statistics_change() -> None:
    norm = RewardNormalizer(2, nonfinite="raise")
    norm.update(*rollout(13, 5, 2, done_prob=0.0))
    before = state_of(norm)
    rewards = torch.tensor([[1.0, 2.0], [math.nan, 1.0]])
    with pytest.raises(ValueError, match="NaN or Inf"):
        norm.update(rewards, torch.zeros(2, 2, dtype=torch.bool))
    assert_state_equal(state_of(norm), before)


def test_reward_mode_nonfinite_rewards_are_skipped_and_counted() -> None:
    norm = RewardNormalizer(2, mode="reward")
    norm.update(torch.tensor([[1.0, math.nan], [3.0, 5.0]]), torch.zeros(2, 2))
    assert int(norm.stats.nonfinite_count) == 1
    assert_close(norm.stats.mean, 3.0, rtol=1e-15)


@pytest.mark.parametrize(
    ("rewards", "dones", "name"),
    [
        (torch.zeros(4), torch.zeros(4, dtype=torch.bool), "rewards"),
        (torch.zeros(5, 4), torch.zeros(5, 4, dtype=torch.bool), "rewards"),
        (torch.zeros(2, 5, 3), torch.zeros(2, 5, 3, dtype=torch.bool), "rewards"),
        (torch.zeros(()), torch.zeros((), dtype=torch.bool), "rewards"),
        (torch.zeros(5, 3), torch.zeros(5, dtype=torch.bool), "dones"),
        (torch.zeros(3), torch.zeros(4, 3, dtype=torch.bool), "dones"),
        ("0.0", torch.zeros(3, dtype=torch.bool), "rewards"),
        (torch.zeros(3), None, "dones"),
        (np.zeros(4), np.zeros(4, dtype=bool), "rewards"),
    ],
)
def test_update_shape_and_type_errors_name_the_argument(rewards, dones, name: str) -> None:
    norm = RewardNormalizer(3)
    before = state_of(norm)
    with pytest.raises((ValueError, TypeError), match=f"`{name}`"):
        norm.update(rewards, dones)
    assert_state_equal(state_of(norm), before)


def test_normalize_shape_error_names_the_argument() -> None:
    with pytest.raises((ValueError, TypeError), match=r"`x`|`rewards`"):
        RewardNormalizer(3).normalize("1.0")


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"num_envs": 0}, "num_envs"),
        ({"num_envs": 2.0}, "num_envs"),
        ({"gamma": 1.5}, "gamma"),
        ({"gamma": -0.1}, "gamma"),
        ({"gamma": math.nan}, "gamma"),
        ({"mode": "advantage"}, "mode"),
        ({"clip": 0.0}, "clip"),
        ({"epsilon": -1.0}, "epsilon"),
        ({"momentum": 1.0}, "momentum"),
        ({"nonfinite": "zero"}, "nonfinite"),
        ({"device": "nonsense"}, "device"),
    ],
)
def test_bad_constructor_argument_error_names_the_argument(kwargs: dict, name: str) -> None:
    kwargs = {"num_envs": 2, **kwargs}
    with pytest.raises((ValueError, TypeError), match=f"`{name}`"):
        RewardNormalizer(**kwargs)


def test_reset_returns_zeroes_all_or_only_masked_environments() -> None:
    norm = RewardNormalizer(3)
    norm.update(torch.tensor([1.0, 2.0, 3.0]), torch.zeros(3, dtype=torch.bool))
    stats_before = state_of(norm.stats)
    norm.reset_returns(torch.tensor([False, True, False]))
    assert norm.returns.tolist() == [1.0, 0.0, 3.0]
    norm.reset_returns()
    assert norm.returns.tolist() == [0.0, 0.0, 0.0]
    assert_state_equal(state_of(norm.stats), stats_before)  # statistics untouched


def test_reset_returns_mask_errors_name_env_mask() -> None:
    norm = RewardNormalizer(3)
    with pytest.raises(ValueError, match="`env_mask`"):
        norm.reset_returns(torch.ones(4, dtype=torch.bool))
    with pytest.raises(TypeError, match="`env_mask`"):
        norm.reset_returns("all")


def test_reset_forgets_statistics_and_returns() -> None:
    norm = RewardNormalizer(2)
    norm.update(*rollout(14, 10, 2, done_prob=0.0))
    norm.reset()
    assert_state_equal(state_of(norm), state_of(RewardNormalizer(2)))


def test_ema_mode_feeds_each_rollout_as_one_batch() -> None:
    norm = RewardNormalizer(2, gamma=0.0, momentum=0.0)  # momentum 0: the latest rollout only
    norm.update(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.zeros(2, 2))
    norm.update(torch.tensor([[10.0, 20.0]]), torch.zeros(1, 2))
    assert_close(norm.stats.mean, 15.0, rtol=1e-15)
    assert_close(norm.stats.var, 25.0, rtol=1e-15)


def test_statistics_are_scalar_float64_and_returns_float64_whatever_the_reward_dtype() -> None:
    norm = RewardNormalizer(2)
    norm.update(torch.tensor([1.0, 2.0], dtype=torch.float16), torch.zeros(2, dtype=torch.bool))
    assert norm.returns.dtype == F64
    assert norm.stats.mean.shape == ()
    assert norm.stats.mean.dtype == F64
    assert norm.count.dtype == torch.int64


def test_prior_weight_reaches_the_return_statistics_and_scales_before_any_update() -> None:
    norm = RewardNormalizer(num_envs=2, prior_weight=1e-4, clip=2.0)
    assert norm.prior_weight == 1e-4
    assert float(norm.stats.weight_sum) == 1e-4
    # With the prior, rewards are divided by sqrt(1 + eps) and clipped, as in SB3.
    out = norm.normalize(torch.tensor([1.0, 5.0], dtype=torch.float64))
    assert out.tolist() == pytest.approx([1.0 / (1 + 1e-8) ** 0.5, 2.0], rel=1e-15)
    norm.reset()
    assert float(norm.stats.weight_sum) == 1e-4


def test_reward_updates_from_two_threads_lose_no_steps() -> None:
    import threading

    norm = RewardNormalizer(4, gamma=0.9)
    rewards, dones = torch.ones(64, 4, dtype=torch.float64), torch.zeros(64, 4, dtype=torch.bool)
    start = threading.Barrier(2)

    def feed() -> None:
        start.wait()
        for _ in range(100):
            norm.update(rewards, dones)

    threads = [threading.Thread(target=feed) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert int(norm.count) == 2 * 100 * 64 * 4
    # Each rollout advanced the returns whole: 12,800 steps of reward 1 at gamma 0.9.
    assert_close(norm.returns, torch.full((4,), 10.0, dtype=torch.float64), rtol=1e-12)


def test_numpy_rewards_and_dones_work_like_tensors() -> None:
    rewards = np.array([[1.0, 0.5], [2.0, -1.0]])
    dones = np.array([[False, True], [False, False]])
    from_numpy, from_tensor = RewardNormalizer(2), RewardNormalizer(2)
    from_numpy.update(rewards, dones)
    from_tensor.update(torch.as_tensor(rewards), torch.as_tensor(dones))
    assert_state_equal(state_of(from_numpy), state_of(from_tensor))
    scaled = from_numpy.normalize(np.array([1.0, 2.0]))
    assert isinstance(scaled, torch.Tensor)
    assert torch.equal(scaled, from_tensor.normalize(torch.tensor([1.0, 2.0], dtype=torch.float64)))
    from_numpy.reset_returns(np.array([True, False]))
    assert from_numpy.returns[0] == 0.0


@pytest.mark.parametrize("native_on", [True, False])
def test_normalize_counts_the_rewards_it_clipped_on_either_path(native_on: bool) -> None:
    norm = RewardNormalizer(num_envs=4, gamma=0.9, clip=1.0)
    rewards = torch.tensor([[1.0, 0.0, 5.0, -9.0], [0.5, 0.1, -0.2, 40.0]])
    norm.update(rewards, torch.zeros_like(rewards, dtype=torch.bool))
    with native.native_kernels(native_on):
        scaled, clipped = norm.normalize(rewards, return_clipped=True)
    assert torch.equal(scaled, norm.normalize(rewards))
    assert int(clipped) == int((scaled.abs() >= 1.0).sum()) > 0
    assert isinstance(clipped, int) == (native_on and native.available())
