"""``Normalizers``: the device they live on, the inputs they take, how their statistics read."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import assert_state_equal, state_of
from rlnorm import NormalizerConfig, Normalizers

META = torch.device("meta")


def test_device_is_none_until_set_then_follows_the_first_observation() -> None:
    norms = Normalizers(NormalizerConfig())
    assert norms.device is None
    norms.update_obs(torch.zeros(2, 3))
    assert norms.device == torch.device("cpu")
    assert norms.obs.mean.device == torch.device("cpu")


def test_to_before_shapes_are_known_creates_the_statistics_there() -> None:
    norms = Normalizers(NormalizerConfig(reward=True)).to("meta")
    assert norms.device == META
    norms.ensure_obs_shapes({"obs": (3,)}, dict_obs=False)
    norms.ensure_reward(4)
    assert {buffer.device for buffer in norms.buffers()} == {META}
    # An observation on another device is refused, not followed.
    with pytest.raises(ValueError, match="statistics are on meta"):
        norms.update_obs(torch.zeros(2, 3))


def test_to_after_shapes_are_known_moves_them_and_the_device_follows() -> None:
    norms = Normalizers(NormalizerConfig(obs_shape=3))
    assert norms.device == torch.device("cpu")
    norms.to("meta")
    assert norms.device == META
    norms.ensure_reward(2)  # created later: where the others are
    assert norms.reward is not None
    assert norms.reward.returns.device == META


def test_dtype_casts_leave_the_device_unset() -> None:
    norms = Normalizers(NormalizerConfig()).double().half()
    assert norms.device is None


def test_numpy_observations_rewards_and_dones_give_tensor_outputs() -> None:
    config = NormalizerConfig(reward=True)
    from_numpy, from_tensor = Normalizers(config), Normalizers(config)
    obs = np.random.default_rng(0).normal(2.0, 3.0, size=(8, 4))  # what gymnasium returns
    from_numpy.update_obs(obs)
    from_tensor.update_obs(torch.as_tensor(obs))
    out = from_numpy.normalize_obs(obs[0])  # one observation, as from env.reset()
    assert isinstance(out, torch.Tensor)
    assert torch.equal(out, from_tensor.normalize_obs(torch.as_tensor(obs[0])))
    scaled = from_numpy.normalize_rewards(np.array([1.0]), np.array([False]))
    assert isinstance(scaled, torch.Tensor)
    from_tensor.normalize_rewards(torch.tensor([1.0], dtype=torch.float64), torch.tensor([False]))
    assert_state_equal(state_of(from_numpy), state_of(from_tensor))


def test_numpy_dict_observations_keep_entries_without_a_normalizer() -> None:
    norms = Normalizers(NormalizerConfig(obs_shape={"position": 2}))
    obs = {"position": np.ones((3, 2)), "label": "keep me"}
    norms.update_obs({"position": obs["position"]})
    out = norms.normalize_obs(obs)
    assert isinstance(out["position"], torch.Tensor)
    assert out["label"] == "keep me"


def test_a_string_observation_names_the_argument_and_its_type() -> None:
    with pytest.raises(TypeError, match=r"`obs` must be a torch.Tensor, a NumPy array.*got str"):
        Normalizers(NormalizerConfig()).update_obs("obs")


def test_statistics_of_tensor_observations_read_as_obs_mean_std_count() -> None:
    norms = Normalizers(NormalizerConfig())
    norms.update_obs(torch.tensor([[0.0, 10.0], [2.0, 30.0]]))
    assert norms.obs.mean.tolist() == [1.0, 20.0]
    assert norms.obs.std.tolist() == [1.0, 10.0]
    assert int(norms.obs.count) == 2
    assert norms.obs.shape == (2,)
    assert norms.obs["obs"] is norms.obs["obs"]  # the keyed form still works


def test_dict_observation_statistics_say_to_pick_a_key() -> None:
    norms = Normalizers(NormalizerConfig(obs_shape={"b": 1, "a": 2}))
    assert norms.obs["a"].mean.shape == (2,)
    with pytest.raises(AttributeError, match=r"obs\[key\]\.mean.*\['a', 'b'\]"):
        _ = norms.obs.mean


def test_statistics_before_any_observation_say_why_they_are_missing() -> None:
    with pytest.raises(AttributeError, match="first observation"):
        _ = Normalizers(NormalizerConfig()).obs.mean


def test_dict_normalizers_are_kept_in_sorted_key_order() -> None:
    inferred = Normalizers(NormalizerConfig())
    inferred.update_obs({"zeta": torch.zeros(2, 1), "alpha": torch.zeros(2, 3)})
    configured = Normalizers(NormalizerConfig(obs_shape={"zeta": 1, "alpha": 3}))
    for norms in (inferred, configured):
        assert list(norms.obs) == ["alpha", "zeta"]
        assert list(norms.named_normalizers()) == ["obs/alpha", "obs/zeta"]
