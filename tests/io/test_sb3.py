"""Migration from Stable-Baselines3 ``VecNormalize``: its compatible mode, its files, and on."""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from gymnasium import spaces
from stable_baselines3.common.vec_env import VecEnv, VecNormalize

import rlnorm
from conftest import assert_close
from rlnorm import NormalizerConfig, Normalizers
from rlnorm.io.sb3 import load_sb3_vecnormalize, read_sb3_vecnormalize
from rlnorm.io.unpickler import PickleFileWarning, UnsafePickleError

ATOL = 1e-5
SRC = str(Path(__file__).resolve().parents[2] / "src")


# ---------------------------------------------------------------------------- streams


def make_stream(
    steps: int = 80, num_envs: int = 3, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Observations ``(steps + 1, n, 3)``, rewards and dones ``(steps, n)``.

    Observations sit at large offsets (1000, -50) next to a small-scale feature, with a few
    outliers that hit the clip; episodes end at different steps per environment; some reward
    spikes hit the reward clip.
    """
    gen = np.random.default_rng(seed)
    offset = np.array([1000.0, -50.0, 0.0])
    scale = np.array([3.0, 0.5, 1e-3])
    obs = (offset + scale * gen.standard_normal((steps + 1, num_envs, 3))).astype(np.float32)
    obs[steps // 2, 0, 0] += 1e5  # outlier: far beyond ±clip standard deviations
    obs[steps // 3, 1, 2] -= 5.0
    rewards = gen.normal(1.0, 0.5, size=(steps, num_envs)).astype(np.float32)
    rewards[steps // 2, 2] = 2e3  # spike: clipped
    rewards[steps // 4, 1] = -5e2
    dones = np.zeros((steps, num_envs), dtype=bool)
    for env, length in enumerate((7, 11, 13)[:num_envs]):
        dones[length - 1 :: length, env] = True  # episodes end at different steps per env
    dones[min(5, steps - 1), 2] = True
    return obs, rewards, dones


class ReplayVecEnv(VecEnv):
    """A Stable-Baselines3 ``VecEnv`` that replays a recorded stream, whatever the actions."""

    def __init__(self, obs: Any, rewards: np.ndarray, dones: np.ndarray) -> None:
        if isinstance(obs, dict):
            space = spaces.Dict(
                {
                    k: spaces.Box(-np.inf, np.inf, shape=v.shape[2:], dtype=np.float32)
                    for k, v in obs.items()
                }
            )
            num_envs = next(iter(obs.values())).shape[1]
        else:
            space = spaces.Box(-np.inf, np.inf, shape=obs.shape[2:], dtype=np.float32)
            num_envs = obs.shape[1]
        super().__init__(num_envs, space, spaces.Discrete(2))
        self.obs, self.rewards, self.dones = obs, rewards, dones
        self.t = 0

    def _obs(self, t: int) -> Any:
        if isinstance(self.obs, dict):
            return {k: v[t].copy() for k, v in self.obs.items()}
        return self.obs[t].copy()

    def reset(self) -> Any:
        self.t = 0
        return self._obs(0)

    def step_async(self, actions: np.ndarray) -> None:
        pass

    def step_wait(self) -> Any:
        t = self.t
        self.t += 1
        infos = [{} for _ in range(self.num_envs)]
        return self._obs(t + 1), self.rewards[t].copy(), self.dones[t].copy(), infos

    def close(self) -> None:
        pass

    def get_attr(self, attr_name: str, indices: Any = None) -> list[Any]:
        return [None] * self.num_envs

    def set_attr(self, attr_name: str, value: Any, indices: Any = None) -> None:
        pass

    def env_method(self, method_name: str, *args: Any, indices: Any = None, **kw: Any) -> list:
        return [None] * self.num_envs

    def env_is_wrapped(self, wrapper_class: Any, indices: Any = None) -> list[bool]:
        return [False] * self.num_envs


def obs_tensor(obs: Any, dtype: Any = np.float64) -> Any:
    """Observations as tensors of ``dtype`` (environments give float32)."""
    if isinstance(obs, dict):
        return {k: torch.from_numpy(np.asarray(v, dtype=dtype)) for k, v in obs.items()}
    return torch.from_numpy(np.asarray(obs, dtype=dtype))


def actions(num_envs: int) -> np.ndarray:
    return np.zeros(num_envs, dtype=np.int64)


def run_side_by_side(
    vec: VecNormalize,
    norms: Normalizers,
    obs: np.ndarray,
    rewards: np.ndarray,
    dones: np.ndarray,
    start: int,
    stop: int,
    dtype: Any = np.float64,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Step SB3 and rlnorm through steps ``start..stop``, asserting agreement each step."""
    sb3_obs_all, sb3_rew_all = [], []
    for t in range(start, stop):
        vec.step_async(actions(vec.num_envs))
        sb3_obs, sb3_rew, sb3_done, _ = vec.step_wait()
        assert np.array_equal(sb3_done, dones[t])
        raw = obs_tensor(obs[t + 1], dtype)
        norms.update_obs(raw)
        ours_obs = norms.normalize_obs(raw)
        ours_rew = norms.normalize_rewards(torch.from_numpy(rewards[t]), torch.from_numpy(dones[t]))
        np.testing.assert_allclose(ours_obs.numpy(), sb3_obs, rtol=0, atol=ATOL, err_msg=f"t={t}")
        np.testing.assert_allclose(ours_rew.numpy(), sb3_rew, rtol=0, atol=ATOL, err_msg=f"t={t}")
        sb3_obs_all.append(sb3_obs)
        sb3_rew_all.append(sb3_rew)
    return sb3_obs_all, sb3_rew_all


# ---------------------------------------------------------------------------- SB3 compat mode


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"clip_obs": 3.0, "clip_reward": 2.0, "gamma": 0.9, "epsilon": 1e-6},
    ],
)
def test_sb3_compatible_mode_matches_vecnormalize_at_every_step(settings: dict, dtype) -> None:
    obs, rewards, dones = make_stream()
    num_envs = obs.shape[1]
    vec = VecNormalize(ReplayVecEnv(obs, rewards, dones), **settings)
    config = NormalizerConfig.sb3_compatible(
        obs_shape=3,
        num_envs=num_envs,
        clip=settings.get("clip_obs", 10.0),
        reward_clip=settings.get("clip_reward", 10.0),
        gamma=settings.get("gamma", 0.99),
        epsilon=settings.get("epsilon", 1e-8),
    )
    norms = Normalizers(config)
    first = vec.reset()
    norms.update_obs(obs_tensor(obs[0], dtype))  # SB3 updates with reset observations too
    first_ours = norms.normalize_obs(obs_tensor(obs[0], dtype)).numpy()
    np.testing.assert_allclose(first_ours, first, atol=ATOL)
    sb3_obs, sb3_rew = run_side_by_side(vec, norms, obs, rewards, dones, 0, len(rewards), dtype)
    # The stream is meant to exercise the clip bounds on both sides.
    clip_obs, clip_reward = settings.get("clip_obs", 10.0), settings.get("clip_reward", 10.0)
    assert np.isclose(np.abs(np.stack(sb3_obs)), clip_obs).any()
    assert np.isclose(np.abs(np.stack(sb3_rew)), clip_reward).any()
    # And the statistics themselves agree: weight with SB3's count, count of real rows.
    # SB3 takes batch means of float32 observations in float32 (np.mean keeps the dtype),
    # rlnorm in float64: the statistics differ by float32 rounding, ~1e-8 relative.
    rms = norms.obs["obs"]
    assert_close(rms.mean, vec.obs_rms.mean, rtol=1e-6)
    assert_close(rms.var, vec.obs_rms.var, rtol=1e-5)
    assert float(rms.weight_sum) == pytest.approx(vec.obs_rms.count, rel=1e-15)
    assert int(rms.count) == (len(rewards) + 1) * num_envs
    assert norms.reward is not None
    assert_close(norms.reward.stats.var, vec.ret_rms.var, rtol=1e-9)
    assert_close(norms.reward.returns, vec.returns, rtol=1e-12)


def test_default_mode_differs_from_sb3_only_through_the_prior() -> None:
    # Without the prior the first steps differ (SB3's 1e-4 count pulls the mean toward 0).
    obs, rewards, dones = make_stream(steps=5)
    vec = VecNormalize(ReplayVecEnv(obs, rewards, dones))
    plain = Normalizers(NormalizerConfig(obs_shape=3, reward=True, num_envs=3))
    sb3_first = vec.reset()
    plain.update_obs(obs_tensor(obs[0]))
    assert not np.allclose(plain.normalize_obs(obs_tensor(obs[0])).numpy(), sb3_first, atol=ATOL)


# ---------------------------------------------------------------------------- SB3 files


def trained_vecnormalize(tmp_path: Path, steps: int = 40, **kwargs: Any) -> tuple[Path, Any]:
    obs, rewards, dones = make_stream()
    vec = VecNormalize(ReplayVecEnv(obs, rewards, dones), **kwargs)
    vec.reset()
    for _ in range(steps):
        vec.step_async(actions(vec.num_envs))
        vec.step_wait()
    path = tmp_path / "vec_normalize.pkl"
    vec.save(str(path))
    return path, (obs, rewards, dones)


def load_quietly(path: Path, **kwargs: Any) -> Normalizers:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PickleFileWarning)
        return load_sb3_vecnormalize(path, **kwargs)


def test_vecnormalize_file_normalizes_like_vecnormalize_load(tmp_path: Path) -> None:
    path, (obs, rewards, dones) = trained_vecnormalize(
        tmp_path, clip_obs=4.0, clip_reward=3.0, gamma=0.95, epsilon=1e-7
    )
    loaded = VecNormalize.load(str(path), ReplayVecEnv(obs, rewards, dones))
    norms = load_quietly(path, frozen=True)
    assert norms.frozen
    assert not norms.training
    assert norms.config.clip == 4.0
    assert norms.config.reward_clip == 3.0
    assert norms.config.gamma == 0.95
    assert norms.config.epsilon == 1e-7
    assert norms.config.prior_weight == 1e-4
    for t in range(len(rewards)):
        np.testing.assert_allclose(
            norms.normalize_obs(obs_tensor(obs[t])).numpy(),
            loaded.normalize_obs(obs[t]),
            rtol=0,
            atol=ATOL,
        )
        np.testing.assert_allclose(
            norms.scale_rewards(torch.from_numpy(rewards[t])).numpy(),
            loaded.normalize_reward(rewards[t]),
            rtol=0,
            atol=ATOL,
        )
    rms = norms.obs["obs"]
    assert float(rms.weight_sum) == loaded.obs_rms.count
    assert int(rms.count) == 41 * 3


def test_training_continues_from_a_vecnormalize_file_like_sb3(tmp_path: Path) -> None:
    path, (obs, rewards, dones) = trained_vecnormalize(tmp_path, steps=30)
    loaded = VecNormalize.load(str(path), ReplayVecEnv(obs, rewards, dones))
    loaded.venv.t = 30  # the replay continues where training stopped
    norms = load_quietly(path)
    assert not norms.frozen
    # SB3 drops the per-environment returns on save: both sides restart them at 0.
    assert norms.reward is not None
    assert norms.reward.returns.tolist() == [0.0, 0.0, 0.0]
    run_side_by_side(loaded, norms, obs, rewards, dones, 30, len(rewards))


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_file_with_seeded_spaces_loads_under_every_pickle_protocol(
    tmp_path: Path, protocol: int
) -> None:
    obs, rewards, dones = make_stream()
    vec = VecNormalize(ReplayVecEnv(obs, rewards, dones))
    vec.action_space.seed(1)
    vec.action_space.sample()  # the space now pickles its numpy Generator too
    vec.reset()
    vec.step_async(actions(3))
    vec.step_wait()
    path = tmp_path / f"p{protocol}.pkl"
    path.write_bytes(pickle.dumps(vec, protocol=protocol))
    norms = load_quietly(path)
    assert_close(norms.obs["obs"].mean, vec.obs_rms.mean, rtol=0)
    assert float(norms.obs["obs"].weight_sum) == vec.obs_rms.count


def test_dict_observation_file_normalizes_only_norm_obs_keys(tmp_path: Path) -> None:
    obs, rewards, dones = make_stream()
    dict_obs = {"pos": obs, "raw": obs[..., :2] * 2.0}
    vec = VecNormalize(ReplayVecEnv(dict_obs, rewards, dones), norm_obs_keys=["pos"])
    vec.reset()
    for _ in range(20):
        vec.step_async(actions(3))
        vec.step_wait()
    path = tmp_path / "dict.pkl"
    vec.save(str(path))
    norms = load_quietly(path, frozen=True)
    assert norms.dict_obs
    assert norms.obs_shapes == {"pos": (3,)}
    sample = {k: v[25] for k, v in dict_obs.items()}
    ours = norms.normalize_obs(obs_tensor(sample))
    theirs = vec.normalize_obs(sample)
    np.testing.assert_allclose(ours["pos"].numpy(), theirs["pos"], rtol=0, atol=ATOL)
    np.testing.assert_array_equal(ours["raw"].numpy(), theirs["raw"])


def test_norm_reward_false_file_gives_normalizers_without_reward(tmp_path: Path) -> None:
    path, _ = trained_vecnormalize(tmp_path, steps=5, norm_reward=False)
    norms = load_quietly(path)
    assert norms.reward is None
    assert norms.config.reward is False


def test_num_envs_argument_overrides_the_files(tmp_path: Path) -> None:
    path, _ = trained_vecnormalize(tmp_path, steps=5)
    norms = load_quietly(path, num_envs=8)
    assert norms.reward is not None
    assert norms.reward.num_envs == 8
    assert float(norms.reward.stats.weight_sum) == pytest.approx(5 * 3 + 1e-4)


def test_loading_warns_that_the_file_is_a_pickle_and_how_to_silence_it(tmp_path: Path) -> None:
    path, _ = trained_vecnormalize(tmp_path, steps=2)
    with pytest.warns(PickleFileWarning, match="is a pickle") as record:
        load_sb3_vecnormalize(path)
    message = str(record[0].message)
    assert "restricted unpickler" in message
    assert "filterwarnings" in message
    assert str(path) in message
    assert record[0].filename == __file__  # points at the caller
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", category=PickleFileWarning)
        load_sb3_vecnormalize(path)


def test_read_sb3_vecnormalize_returns_plain_statistics_and_settings(tmp_path: Path) -> None:
    path, _ = trained_vecnormalize(tmp_path, steps=3, gamma=0.9)
    with pytest.warns(PickleFileWarning):
        stats = read_sb3_vecnormalize(path)
    assert stats["gamma"] == 0.9
    assert stats["num_envs"] == 3
    assert stats["training"] is True
    assert stats["returns"] is None  # VecNormalize.__getstate__ drops them
    assert stats["obs_rms"]["mean"].dtype == np.float64
    assert stats["obs_rms"]["count"] == pytest.approx(4 * 3 + 1e-4)


def test_vecnormalize_file_loads_without_sb3_or_gymnasium_installed(tmp_path: Path) -> None:
    path, (obs, _, _) = trained_vecnormalize(tmp_path, steps=10)
    expected = load_quietly(path).normalize_obs(obs_tensor(obs[3]))
    script = (
        "import sys, warnings\n"
        "sys.modules['stable_baselines3'] = None\n"  # any import of them now fails
        "sys.modules['gymnasium'] = None\n"
        "warnings.simplefilter('ignore')\n"
        "import numpy as np, torch\n"
        "from rlnorm.io.sb3 import load_sb3_vecnormalize\n"
        f"norms = load_sb3_vecnormalize({str(path)!r})\n"
        f"x = torch.from_numpy(np.load({str(tmp_path / 'x.npy')!r}))\n"
        "print(repr(norms.normalize_obs(x).tolist()))\n"
    )
    np.save(tmp_path / "x.npy", obs[3].astype(np.float64))
    env = {**os.environ, "PYTHONPATH": SRC}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert eval(result.stdout) == expected.tolist()


# ---------------------------------------------------------------------------- unsafe and bad files


class _RunsCommand:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple:
        return (os.system, (self.command,))


class _CallsEval:
    def __reduce__(self) -> tuple:
        return (eval, ("__import__('os').getcwd()",))


@pytest.mark.parametrize("kind", ["os.system", "eval", "nested os.system"])
def test_malicious_pickle_is_refused_and_its_command_never_runs(tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "pwned"
    payload: Any = _RunsCommand(f"touch {marker}")
    if kind == "eval":
        payload = _CallsEval()
    elif kind == "nested os.system":
        payload = {"obs_rms": {"mean": np.zeros(2), "var": [payload]}}
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(payload))
    forbidden = {"os.system": "posix.system", "eval": "builtins.eval"}.get(kind, "posix.system")
    with pytest.raises(UnsafePickleError, match=rf"references the global `{forbidden}`") as info:
        load_sb3_vecnormalize(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, pickle.UnpicklingError)
    assert not marker.exists()


def test_pickle_of_an_arbitrary_class_is_refused_without_importing_it(tmp_path: Path) -> None:
    path = tmp_path / "other.pkl"
    path.write_bytes(pickle.dumps(io.BytesIO(b"x")))
    with pytest.raises(UnsafePickleError, match=r"`_io.BytesIO`"):
        load_sb3_vecnormalize(path)


def test_missing_file_error_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nope.pkl"
    with pytest.raises(
        FileNotFoundError, match=r"No Stable-Baselines3 VecNormalize file at .*nope"
    ):
        load_sb3_vecnormalize(path)


def test_truncated_file_error_names_the_file_and_says_truncated(tmp_path: Path) -> None:
    path, _ = trained_vecnormalize(tmp_path, steps=2)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"vec_normalize\.pkl.*truncated"):
        load_sb3_vecnormalize(path)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"hello, this is not a pickle\n", r"not a pickle written by `VecNormalize.save\(\)`"),
        (b"", r"the file is empty"),
        (b"PK\x03\x04rest-of-a-zip", r"zip archive .*model.save"),
    ],
)
def test_non_pickle_file_error_names_the_file_and_the_problem(
    tmp_path: Path, content: bytes, match: str
) -> None:
    path = tmp_path / "bad.pkl"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=match) as info:
        load_sb3_vecnormalize(path)
    assert "bad.pkl" in str(info.value)


def test_pickle_of_something_else_error_says_what_it_holds(tmp_path: Path) -> None:
    path = tmp_path / "dict.pkl"
    path.write_bytes(pickle.dumps({"mean": np.zeros(3)}))
    with pytest.raises(ValueError, match=r"dict\.pkl.*holds a dict, not a Stable-Baselines3"):
        load_sb3_vecnormalize(path)


def test_vecnormalize_pickle_without_obs_rms_error_names_the_file_and_field(
    tmp_path: Path,
) -> None:
    path, (obs, rewards, dones) = trained_vecnormalize(tmp_path, steps=2)
    vec = VecNormalize.load(str(path), ReplayVecEnv(obs, rewards, dones))
    del vec.obs_rms
    vec.save(str(path))
    with pytest.raises(ValueError, match=r"vec_normalize\.pkl.*holds no `obs_rms`.*damaged"):
        load_quietly(path)


def test_norm_obs_false_file_error_explains_rewards_only(tmp_path: Path) -> None:
    path, _ = trained_vecnormalize(tmp_path, steps=2, norm_obs=False)
    with pytest.raises(ValueError, match=r"holds no `obs_rms`.*norm_obs=False"):
        load_quietly(path)


def test_statistics_with_nan_are_refused_with_the_field_named(tmp_path: Path) -> None:
    path, (obs, rewards, dones) = trained_vecnormalize(tmp_path, steps=2)
    vec = VecNormalize.load(str(path), ReplayVecEnv(obs, rewards, dones))
    vec.obs_rms.var[1] = np.nan
    vec.save(str(path))
    with pytest.raises(ValueError, match=r"`obs_rms` holds NaN or Inf"):
        load_quietly(path)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_envs": 0}, ValueError, r"`num_envs` must be a positive int, got 0"),
        ({"frozen": "yes"}, TypeError, r"`frozen` must be a bool, got 'yes'"),
        ({"device": 3}, TypeError, r"`device` must be a str or torch.device, got 3"),
    ],
)
def test_bad_arguments_name_the_argument_and_value(
    tmp_path: Path, kwargs: dict, error: type, match: str
) -> None:
    path, _ = trained_vecnormalize(tmp_path, steps=1)
    with pytest.raises(error, match=match):
        load_sb3_vecnormalize(path, **kwargs)


def test_path_of_wrong_type_is_a_type_error() -> None:
    with pytest.raises(TypeError, match=r"`path` must be a str or os.PathLike, got int"):
        load_sb3_vecnormalize(3)  # type: ignore[arg-type]


def test_migrated_normalizers_save_and_load_with_weights_only(tmp_path: Path) -> None:
    path, (obs, _, _) = trained_vecnormalize(tmp_path, steps=5)
    norms = load_quietly(path)
    buffer = io.BytesIO()
    torch.save({"config": norms.config.to_dict(), "state": norms.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    again = Normalizers(NormalizerConfig.from_dict(saved["config"]))
    again.load_state_dict(saved["state"])
    x = obs_tensor(obs[7])
    assert torch.equal(again.normalize_obs(x), norms.normalize_obs(x))


# ---------------------------------------------------------------------------- config


def test_sb3_compatible_config_has_sb3_defaults_and_takes_overrides() -> None:
    config = NormalizerConfig.sb3_compatible(obs_shape=4, gamma=0.9, reward_clip=5.0)
    assert config.prior_weight == 1e-4
    assert config.momentum is None
    assert config.center
    assert config.clip == 10.0
    assert config.reward_clip == 5.0
    assert config.epsilon == 1e-8
    assert config.reward
    assert config.reward_mode == "return"
    assert config.gamma == 0.9


def test_sb3_compatible_unknown_setting_is_a_type_error_naming_it() -> None:
    with pytest.raises(TypeError, match=r"unknown setting\(s\) \['clip_obs'\]"):
        NormalizerConfig.sb3_compatible(clip_obs=5.0)


def test_config_without_prior_weight_from_an_old_checkpoint_loads_with_no_prior() -> None:
    old = NormalizerConfig(obs_shape=3).to_dict()
    del old["prior_weight"]
    assert NormalizerConfig.from_dict(old).prior_weight == 0.0


def test_bad_prior_weight_in_config_names_it() -> None:
    with pytest.raises(ValueError, match=r"`prior_weight` must be in \[0.0, inf\], got -0.5"):
        NormalizerConfig(prior_weight=-0.5)


def test_load_sb3_vecnormalize_is_exported_lazily_without_the_training_stack() -> None:
    assert rlnorm.load_sb3_vecnormalize is load_sb3_vecnormalize
    script = (
        "import sys, rlnorm.io.sb3\n"
        "print([m for m in ('gymnasium', 'lightning', 'torchmetrics') if m in sys.modules])"
    )
    env = {**os.environ, "PYTHONPATH": SRC}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert out.stdout.strip() == "[]", out.stderr


# ---------------------------------------------------------------------------- into Lightning


def test_callback_from_migrated_normalizers_continues_their_statistics(tmp_path: Path) -> None:
    from rollout_agents import RolloutAgent, make_trainer

    config = NormalizerConfig.sb3_compatible(obs_shape=4, num_envs=4)
    migrated = Normalizers(config)
    gen = torch.Generator().manual_seed(0)
    migrated.update_obs(torch.randn(500, 4, generator=gen, dtype=torch.float64) * 2 + 1)
    migrated.normalize_rewards(torch.rand(3, 4, generator=gen), torch.zeros(3, 4, dtype=torch.bool))
    before = {k: v.clone() for k, v in migrated.state_dict().items()}

    callback = rlnorm.NormalizerCallback.from_normalizers(migrated, name="sb3")
    agent = RolloutAgent(normalizer="sb3")
    make_trainer(tmp_path, [callback], max_steps=3).fit(agent)

    # The caller's normalizers are untouched: the callback trained a copy.
    for key, value in migrated.state_dict().items():
        assert torch.equal(value, before[key]), key
    # The callback went on from the migrated statistics with the agent's observations.
    expected = Normalizers(config)
    expected.load_state_dict(before)
    for _, obs in agent.obs_updates:
        expected.update_obs(obs)
    ours, ref = callback.normalizers.obs["obs"], expected.obs["obs"]
    assert int(ours.count) == 500 + sum(
        int(torch.isfinite(o).all(-1).sum()) for _, o in agent.obs_updates
    )
    assert_close(ours.mean, ref.mean, rtol=1e-12)
    assert_close(ours.var, ref.var, rtol=1e-12)
    assert callback.config.prior_weight == pytest.approx(1e-4)


def test_from_normalizers_refuses_settings_that_come_from_the_config() -> None:
    norms = Normalizers(NormalizerConfig.sb3_compatible(obs_shape=4))
    with pytest.raises(TypeError, match=r"`clip` comes from `normalizers\.config`"):
        rlnorm.NormalizerCallback.from_normalizers(norms, clip=5.0)
    with pytest.raises(TypeError, match="`normalizers`"):
        rlnorm.NormalizerCallback.from_normalizers({"obs": 1})
