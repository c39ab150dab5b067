"""The reference PPO ``LightningModule`` (``rlnorm.agents.ppo.PPO``) trained by a real CPU Trainer.

Every run is tiny (a few rollouts of 2 environments x 32 steps, one update epoch): these tests
check the bookkeeping (environment steps, what the normalizer learned from, when training
stops, what a checkpoint restores), not that PPO learns.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch
from lightning.pytorch import seed_everything

import rlnorm
from conftest import assert_close, assert_state_equal, reference_moments, write_user_env_module
from rlnorm.agents.envs import SCALED_CARTPOLE, AffineObservation, make_vector_env
from rlnorm.agents.ppo import PPO, Rollout, solved_return
from rollout_agents import QUIET_LIGHTNING, make_trainer

pytestmark = [pytest.mark.filterwarnings(w) for w in QUIET_LIGHTNING]

NUM_ENVS, NUM_STEPS = 2, 32
PER_ROLLOUT = NUM_ENVS * NUM_STEPS


class RecordingPPO(PPO):
    """PPO that records every observation its environments returned and every rollout.

    ``env_obs[0]`` is the reset observation and ``env_obs[k]`` the observation returned by the
    ``k``-th vector step (raw, as the environments produced it), so rollout ``r`` acted on
    ``env_obs[r * num_steps : (r + 1) * num_steps]``; ``env_actions`` holds the actions
    passed to the environments' ``step``. ``rollouts`` holds what
    ``collect_rollout`` returned, i.e. the (normalized) observations the policy acted on.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.env_obs: list[torch.Tensor] = []
        self.env_actions: list[Any] = []
        self.rollouts: list[Rollout] = []
        self.train_start: dict[str, Any] | None = None
        self.epochs_started: list[int] = []

    def on_train_epoch_start(self) -> None:
        self.epochs_started.append(self.current_epoch)

    def setup(self, stage: str) -> None:
        fresh = self.envs is None
        super().setup(stage)
        if stage != "fit" or not fresh:
            return
        assert self.envs is not None
        self.env_obs.append(self._obs.clone())
        self.vector_action_space = self.envs.action_space
        step = self.envs.step

        def recording_step(action: np.ndarray) -> tuple:
            self.env_actions.append(action)
            out = step(action)
            self.env_obs.append(torch.as_tensor(out[0], dtype=torch.float32))
            return out

        self.envs.step = recording_step  # type: ignore[method-assign]

    def collect_rollout(self) -> Rollout:
        rollout = super().collect_rollout()
        self.rollouts.append(rollout)
        return rollout

    def on_train_start(self) -> None:
        state = None
        if self.normalizer is not None:
            state = {k: v.clone() for k, v in self.normalizer.normalizers.state_dict().items()}
        self.train_start = {"env_steps": self.env_steps, "normalizers": state}

    def acted_on(self, rollouts: int) -> torch.Tensor:
        """Raw observations the policy acted on in the first ``rollouts`` rollouts."""
        steps = rollouts * self.hparams.num_steps
        assert len(self.env_obs) >= steps
        return torch.stack(self.env_obs[:steps])


def ppo(env_id: str = "CartPole-v1", **kwargs: Any) -> RecordingPPO:
    options: dict[str, Any] = {
        "total_timesteps": 4 * PER_ROLLOUT,
        "num_envs": NUM_ENVS,
        "num_steps": NUM_STEPS,
        "update_epochs": 1,
        "num_minibatches": 1,
    }
    options.update(kwargs)
    return RecordingPPO(env_id, **options)


def fit(tmp_path: Any, model: PPO, callbacks: list, ckpt_path: Any = None, **trainer_kwargs: Any):
    options: dict[str, Any] = {"max_steps": -1, "max_epochs": -1}
    options.update(trainer_kwargs)
    trainer = make_trainer(tmp_path, callbacks, **options)
    trainer.fit(model, ckpt_path=ckpt_path)
    return trainer


def params_of(model: PPO) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------- training runs


@pytest.mark.parametrize("normalize", [True, False], ids=["with_normalizer", "raw"])
@pytest.mark.parametrize(
    ("env_id", "total_timesteps", "rollouts"),
    [
        # 4 rollouts of 64 steps: total_timesteps is an exact multiple.
        ("CartPole-v1", 256, 4),
        # 420 is not a multiple of 64: training stops after the 7th rollout (448 steps), and
        # 7 x 32 = 224 steps per env go past Pendulum's 200-step time limit (truncation).
        ("Pendulum-v1", 420, 7),
    ],
    ids=["cartpole_discrete", "pendulum_continuous"],
)
def test_ppo_counts_env_steps_exactly_stops_at_total_timesteps_and_learns_stats_once_per_obs(
    tmp_path, env_id, total_timesteps, rollouts, normalize
):
    model = ppo(env_id, total_timesteps=total_timesteps, num_minibatches=2)
    before = params_of(model)
    callback = rlnorm.NormalizerCallback(reward=True, gamma=0.98) if normalize else None
    trainer = fit(tmp_path, model, [callback] if callback else [])

    # Training stops with the first rollout that reaches total_timesteps, no later, and
    # under max_epochs=-1 no empty epoch starts after it.
    assert model.env_steps == rollouts * PER_ROLLOUT
    assert model.epochs_started == [0]
    assert model.env_steps >= total_timesteps > model.env_steps - PER_ROLLOUT
    assert len(model.rollouts) == rollouts
    assert len(model.env_obs) == 1 + rollouts * NUM_STEPS  # reset + one obs per vector step
    # Manual optimization: one optimizer step per minibatch per epoch per rollout.
    assert trainer.global_step == rollouts * 1 * 2
    assert model.continuous == (env_id == "Pendulum-v1")
    changed = [k for k, v in params_of(model).items() if not torch.equal(v, before[k])]
    assert "actor.0.weight" in changed
    assert "critic.0.weight" in changed
    if env_id == "Pendulum-v1":
        # Both environments hit the time limit once: the truncated episodes were recorded.
        assert len(model.episode_returns) == NUM_ENVS
        assert all(length == 200 for length in model.episode_lengths)

    if callback is None:
        assert model.normalizer is None
        # The policy acted on the raw observations.
        for r, rollout in enumerate(model.rollouts):
            raw = torch.stack(model.env_obs[r * NUM_STEPS : (r + 1) * NUM_STEPS])
            assert torch.equal(rollout.obs, raw)
        return

    assert model.normalizer is callback
    stats = callback.normalizers.named_normalizers()
    # The observation statistics hold each observation the policy acted on exactly once.
    acted = model.acted_on(rollouts)
    mean, var, _, count = reference_moments(acted, feature_ndim=1)
    assert count == model.env_steps
    assert int(stats["obs"].count) == count
    assert_close(stats["obs"].mean, mean, rtol=1e-9, atol=1e-12)
    assert_close(stats["obs"].var, var, rtol=1e-9, atol=1e-12)
    # One reward per environment step went into the reward statistics.
    assert int(stats["reward"].count) == model.env_steps


def test_continuous_actions_reach_the_environments_as_numpy_arrays_within_bounds(tmp_path):
    model = ppo("Pendulum-v1", total_timesteps=PER_ROLLOUT)
    fit(tmp_path, model, [])
    space = model.vector_action_space
    assert len(model.env_actions) == NUM_STEPS
    for action in model.env_actions:
        # gymnasium environments take numpy actions (a torch.Tensor here makes Pendulum return
        # tensor rewards and gymnasium's env checker warn).
        assert isinstance(action, np.ndarray), type(action)
        assert action.shape == space.shape
        assert space.contains(action.astype(space.dtype))


def test_same_seed_gives_bitwise_identical_ppo_runs(tmp_path):
    def run() -> tuple[dict, dict]:
        seed_everything(5, verbose=False)
        model = ppo(total_timesteps=2 * PER_ROLLOUT)
        callback = rlnorm.NormalizerCallback(reward=True, gamma=0.98)
        fit(tmp_path, model, [callback])
        state = {k: v.clone() for k, v in callback.normalizers.state_dict().items()}
        return params_of(model), state

    params_a, stats_a = run()
    params_b, stats_b = run()
    assert_state_equal(params_a, params_b)
    assert_state_equal(stats_a, stats_b)


# ---------------------------------------------------------------------------- scaled CartPole


def test_scaled_cartpole_observations_are_cartpole_times_100_plus_1000():
    scaled = make_vector_env(SCALED_CARTPOLE, num_envs=2, seed=0)
    plain = make_vector_env("CartPole-v1", num_envs=2, seed=0)
    try:
        obs_s, _ = scaled.reset(seed=3)
        obs_p, _ = plain.reset(seed=3)
        pairs = [(obs_s, obs_p)]
        for action in ([0, 1], [1, 1], [0, 0], [1, 0]):
            pairs.append((scaled.step(np.array(action))[0], plain.step(np.array(action))[0]))
        for s, p in pairs:
            assert s.dtype == np.float32
            np.testing.assert_allclose(s, p.astype(np.float64) * 100 + 1000, rtol=1e-6)
    finally:
        scaled.close()
        plain.close()

    env = gym.make(SCALED_CARTPOLE)
    try:
        wrappers = []
        inner: Any = env
        while inner is not inner.unwrapped:
            wrappers.append(type(inner))
            inner = inner.env
        assert AffineObservation in wrappers
        base = gym.make("CartPole-v1").observation_space
        space = env.observation_space
        finite = np.isfinite(base.high)
        np.testing.assert_allclose(space.high[finite], base.high[finite] * 100 + 1000, rtol=1e-6)
        np.testing.assert_allclose(space.low[finite], base.low[finite] * 100 + 1000, rtol=1e-6)
        assert space.contains(env.reset(seed=0)[0])
    finally:
        env.close()


def test_policy_sees_order_one_observations_on_scaled_cartpole_with_the_normalizer(tmp_path):
    model = ppo(SCALED_CARTPOLE, total_timesteps=4 * PER_ROLLOUT)
    callback = rlnorm.NormalizerCallback(reward=True, gamma=0.98)
    fit(tmp_path, model, [callback])

    stats = callback.normalizers.named_normalizers()["obs"]
    assert int(stats.count) == model.env_steps
    raw = model.acted_on(len(model.rollouts)).reshape(-1, 4)
    assert raw.min() > 500  # the environment really is badly scaled
    mean, std = stats.mean.float(), stats.std.float()
    assert torch.all((mean - 1000).abs() < 50), mean  # ~1000: the offset
    assert torch.all((std > 1) & (std < 200)), std  # tens: CartPole's spread x 100

    # Once statistics exist (from the second rollout on) the policy acts on O(1) values.
    normalized = torch.stack([r.obs for r in model.rollouts[1:]]).reshape(-1, 4)
    assert normalized.abs().max() <= callback.config.clip
    assert normalized.abs().mean() < 2.0, normalized.abs().mean()
    assert torch.all(normalized.std(0) < 3.0), normalized.std(0)
    assert torch.all(normalized.mean(0).abs() < 2.0), normalized.mean(0)


# ---------------------------------------------------------------------------- checkpoints


def test_resuming_from_a_checkpoint_restores_env_steps_and_the_normalizer(tmp_path):
    first = ppo(total_timesteps=4 * PER_ROLLOUT)
    callback = rlnorm.NormalizerCallback(reward=True, gamma=0.98)
    trainer = fit(tmp_path, first, [callback], max_steps=2)  # interrupted after 2 rollouts
    assert first.env_steps == 2 * PER_ROLLOUT
    saved = {k: v.clone() for k, v in callback.normalizers.state_dict().items()}
    ckpt = tmp_path / "half.ckpt"
    trainer.save_checkpoint(ckpt)

    checkpoint = torch.load(ckpt, weights_only=True)
    assert checkpoint["rlnorm_ppo"] == {"env_steps": 2 * PER_ROLLOUT}
    loaded = rlnorm.load_normalizers(ckpt)
    assert_state_equal({k: v.cpu() for k, v in loaded.state_dict().items()}, saved)

    resumed = ppo(total_timesteps=4 * PER_ROLLOUT)
    new_callback = rlnorm.NormalizerCallback(reward=True, gamma=0.98)
    trainer = fit(tmp_path, resumed, [new_callback], ckpt_path=ckpt)

    assert resumed.train_start is not None
    assert resumed.train_start["env_steps"] == 2 * PER_ROLLOUT
    assert_state_equal(resumed.train_start["normalizers"], saved)
    # It ran the two remaining rollouts and stopped at total_timesteps.
    assert len(resumed.rollouts) == 2
    assert resumed.env_steps == 4 * PER_ROLLOUT
    assert trainer.global_step == 4
    stats = new_callback.normalizers.named_normalizers()
    assert int(stats["obs"].count) == 4 * PER_ROLLOUT
    assert int(stats["reward"].count) == 4 * PER_ROLLOUT


def test_a_finished_run_resumed_with_a_larger_total_timesteps_trains_only_the_extra_rollouts(
    tmp_path,
):
    first = ppo(total_timesteps=2 * PER_ROLLOUT)
    trainer = fit(tmp_path, first, [rlnorm.NormalizerCallback()])
    ckpt = tmp_path / "finished.ckpt"
    trainer.save_checkpoint(ckpt)

    # The same budget again: nothing is left to do.
    same = ppo(total_timesteps=2 * PER_ROLLOUT)
    fit(tmp_path, same, [rlnorm.NormalizerCallback()], ckpt_path=ckpt)
    assert same.rollouts == []
    assert same.env_steps == 2 * PER_ROLLOUT

    longer = ppo(total_timesteps=5 * PER_ROLLOUT)
    callback = rlnorm.NormalizerCallback()
    trainer = fit(tmp_path, longer, [callback], ckpt_path=ckpt)
    assert len(longer.rollouts) == 3
    assert longer.env_steps == 5 * PER_ROLLOUT
    assert longer.epochs_started == [1]
    assert int(callback.normalizers.named_normalizers()["obs"].count) == 5 * PER_ROLLOUT


# ---------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"num_envs": 0}, "num_envs"),
        ({"num_steps": -1}, "num_steps"),
        ({"total_timesteps": 0}, "total_timesteps"),
        ({"update_epochs": 1.5}, "update_epochs"),
        ({"num_minibatches": True}, "num_minibatches"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"env_id": "NoSuchEnv-v0"}, "env_id"),
        ({"env_id": "FrozenLake-v1"}, "env_id"),  # Discrete observations, not a flat Box
        ({"env_id": "no_such_module_rlnorm:MyEnv-v0"}, "env_id"),  # module cannot be imported
        ({"env_id": "json:MyEnv-v0"}, "env_id"),  # module imports but registers nothing
    ],
    ids=lambda v: str(v) if isinstance(v, str) else "-".join(f"{k}={v[k]}" for k in v),
)
def test_bad_ppo_arguments_raise_value_error_naming_the_argument(kwargs, argument):
    options: dict[str, Any] = {"env_id": "CartPole-v1", **kwargs}
    with pytest.raises(ValueError, match=f"`{argument}`"):
        PPO(**options)


# ---------------------------------------------------------------------------- your own env


def test_ppo_trains_on_an_env_given_as_module_colon_id_and_reports_it_solved(tmp_path, monkeypatch):
    # Every episode returns 4, the registered reward_threshold: solved after 20 episodes.
    env_id = write_user_env_module(tmp_path, "rlnorm_ppo_user_envs", "rlnorm_test/FourSteps-v0")
    monkeypatch.syspath_prepend(str(tmp_path))
    model = PPO(
        env_id,
        total_timesteps=4 * PER_ROLLOUT,
        num_envs=NUM_ENVS,
        num_steps=NUM_STEPS,
        update_epochs=1,
    )
    assert model.solved_return == 4.0
    make_trainer(tmp_path, [rlnorm.NormalizerCallback()], max_steps=-1, max_epochs=-1).fit(model)
    assert model.env_steps == 4 * PER_ROLLOUT
    # 20 episodes of 4 steps in 2 envs take 40 steps: solved in the second rollout.
    assert model.solved_at == 2 * PER_ROLLOUT


@pytest.mark.parametrize(
    ("env_id", "threshold"),
    [
        ("CartPole-v1", 475.0),
        (SCALED_CARTPOLE, 475.0),
        ("Acrobot-v1", -100.0),
        ("MountainCar-v0", -110.0),
        ("Pendulum-v1", None),
    ],
)
def test_solved_return_comes_from_the_gymnasium_spec_reward_threshold(env_id, threshold):
    assert solved_return(env_id) == threshold
