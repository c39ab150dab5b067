"""Checkpoints: bitwise resume, the stored layout, mismatches, and ``rlnorm.load_normalizers``."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import rlnorm
from conftest import assert_state_equal, state_of
from rlnorm import NormalizerCallback, Normalizers
from rlnorm.stats.schema import SCHEMA_VERSION
from rollout_agents import OBS_DIM, QUIET_LIGHTNING, RolloutAgent, make_trainer

pytestmark = pytest.mark.filterwarnings(*QUIET_LIGHTNING)

NUM_ENVS, ROLLOUT_LEN = 4, 8
ROWS = NUM_ENVS * ROLLOUT_LEN
TOTAL_STEPS, SAVE_AT = 8, 4  # the interrupted run saves mid-epoch (6 batches per epoch)


def _callback(**kwargs: Any) -> NormalizerCallback:
    return NormalizerCallback(reward=True, gamma=0.97, **kwargs)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A run of SAVE_AT steps checkpointed by ModelCheckpoint, with the callback's state."""
    root = tmp_path_factory.mktemp("trained")
    callback = _callback()
    checkpoint = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=SAVE_AT)
    agent = RolloutAgent(gamma=0.97)
    make_trainer(root, [callback, checkpoint], max_steps=SAVE_AT, enable_checkpointing=True).fit(
        agent
    )
    (path,) = sorted((root / "ckpt").glob("*.ckpt"))
    return {"root": root, "path": path, "callback": callback, "agent": agent}


# ---------------------------------------------------------------------------- resume


@pytest.mark.parametrize("momentum", [None, 0.9], ids=["exact", "ema"])
def test_interrupted_and_resumed_run_ends_bitwise_equal_to_an_uninterrupted_one(
    tmp_path: Path, momentum: float | None
) -> None:
    # A: uninterrupted.
    callback_a = _callback(momentum=momentum)
    agent_a = RolloutAgent(gamma=0.97)
    make_trainer(tmp_path / "a", [callback_a], max_steps=TOTAL_STEPS).fit(agent_a)

    # B: stops after SAVE_AT steps (ModelCheckpoint wrote a file mid-epoch) ...
    callback_b = _callback(momentum=momentum)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=SAVE_AT)
    trainer_b = make_trainer(
        tmp_path / "b", [callback_b, checkpoint], max_steps=SAVE_AT, enable_checkpointing=True
    )
    trainer_b.fit(RolloutAgent(gamma=0.97))
    (path,) = sorted((tmp_path / "ckpt").glob("*.ckpt"))
    at_save = state_of(callback_b.normalizers)
    # ... and a new process-like setup (new Trainer, module and callback) resumes it.
    callback_c = _callback(momentum=momentum)
    agent_c = RolloutAgent(gamma=0.97)
    make_trainer(tmp_path / "c", [callback_c], max_steps=TOTAL_STEPS).fit(agent_c, ckpt_path=path)

    # The comparison is not vacuous: the state moved after the checkpoint, and the running
    # returns, which carry across rollouts, are non-zero at the save.
    assert not torch.equal(at_save["obs.obs.mean"], callback_a.normalizers.obs["obs"].mean)
    assert bool((at_save["reward.returns"] != 0).any())
    assert int(callback_c.normalizers.obs["obs"].count) == TOTAL_STEPS * ROWS
    # The resumed run replayed exactly the transitions of the uninterrupted one ...
    replayed = [(s, x) for s, x in agent_a.obs_updates if s >= SAVE_AT]
    assert len(replayed) == len(agent_c.obs_updates)
    for (step_a, x_a), (step_c, x_c) in zip(replayed, agent_c.obs_updates, strict=True):
        assert step_a == step_c
        assert torch.equal(x_a, x_c)
    # ... and ends with bitwise the same statistics, reward returns and policy.
    assert_state_equal(state_of(callback_a.normalizers), state_of(callback_c.normalizers))
    assert_state_equal(state_of(agent_a), state_of(agent_c))


# ---------------------------------------------------------------------------- stored layout


def test_checkpoint_state_is_plain_data_readable_with_weights_only(trained: dict) -> None:
    callback: NormalizerCallback = trained["callback"]
    checkpoint = torch.load(trained["path"], weights_only=True)
    state = checkpoint["callbacks"][callback.state_key]
    assert callback.state_key == "NormalizerCallback{'name': 'rlnorm'}"
    assert state["schema_version"] == SCHEMA_VERSION
    assert state["name"] == "rlnorm"
    assert state["config"]["reward"] is True
    assert state["config"]["gamma"] == 0.97
    assert state["config"]["obs_shape"] is None  # inferred ...
    assert state["obs_shapes"] == {"obs": [OBS_DIM]}  # ... and stored
    assert state["dict_obs"] is False
    assert state["num_envs"] == NUM_ENVS
    assert_state_equal(state["normalizers"], state_of(callback.normalizers))
    assert "reward.returns" in state["normalizers"]


# ---------------------------------------------------------------------------- mismatches


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"obs_shape": 5}, ["(4,)", "(5,)"]),
        ({"obs_shape": {"pos": 2, "vel": 2}}, ["(4,)", "'pos'"]),
        ({"num_envs": 3}, ["num_envs=4", "num_envs=3"]),
    ],
    ids=["shape", "dict-vs-tensor", "num_envs"],
)
def test_resume_with_mismatching_shapes_names_both(
    trained: dict, tmp_path: Path, kwargs: dict[str, Any], named: list[str]
) -> None:
    callback = _callback(**kwargs)
    trainer = make_trainer(tmp_path, [callback], max_steps=TOTAL_STEPS)
    with pytest.raises(ValueError, match="NormalizerCallback") as info:
        trainer.fit(RolloutAgent(gamma=0.97), ckpt_path=trained["path"])
    for text in named:
        assert text in str(info.value)


def test_resume_from_a_checkpoint_without_this_state_warns_and_starts_fresh(
    trained: dict, tmp_path: Path
) -> None:
    # A checkpoint written before the callback was added to the run.
    checkpoint = torch.load(trained["path"], weights_only=True)
    del checkpoint["callbacks"][trained["callback"].state_key]
    path = tmp_path / "without.ckpt"
    torch.save(checkpoint, path)

    callback = _callback()
    with pytest.warns(UserWarning, match="start fresh"):
        make_trainer(tmp_path, [callback], max_steps=SAVE_AT + 2).fit(
            RolloutAgent(gamma=0.97), ckpt_path=path
        )
    assert int(callback.normalizers.obs["obs"].count) == 2 * ROWS


def test_resume_after_renaming_the_callback_warns_with_the_stored_name(
    trained: dict, tmp_path: Path
) -> None:
    callback = _callback(name="renamed")
    with pytest.warns(UserWarning, match=r"start fresh.*was `name` changed") as record:
        make_trainer(tmp_path, [callback], max_steps=SAVE_AT + 1).fit(
            RolloutAgent(gamma=0.97, normalizer="renamed"), ckpt_path=trained["path"]
        )
    assert any(trained["callback"].state_key in str(w.message) for w in record)
    assert int(callback.normalizers.obs["obs"].count) == ROWS


# ---------------------------------------------------------------------------- load_normalizers


def test_load_normalizers_returns_the_trained_statistics_frozen(trained: dict) -> None:
    callback: NormalizerCallback = trained["callback"]
    norms = rlnorm.load_normalizers(trained["path"])
    assert isinstance(norms, Normalizers)
    assert norms.frozen
    assert not norms.training
    assert_state_equal(state_of(norms), state_of(callback.normalizers))
    assert norms.config == callback.config

    obs = torch.randn(16, OBS_DIM) * 0.1
    assert torch.equal(norms.normalize_obs(obs), callback.normalizers.normalize_obs(obs))
    rewards = torch.ones(NUM_ENVS)
    assert torch.equal(norms.scale_rewards(rewards), callback.normalizers.scale_rewards(rewards))
    round_trip = norms.denormalize_obs(norms.normalize_obs(obs))
    torch.testing.assert_close(round_trip, obs, rtol=1e-5, atol=1e-6)

    # Updates are ignored: evaluation data never leaks into the deployed statistics.
    before = state_of(norms)
    norms.update_obs(torch.randn(64, OBS_DIM) * 100 + 50)
    scaled = norms.normalize_rewards(
        torch.full((NUM_ENVS,), 5.0), torch.zeros(NUM_ENVS, dtype=bool)
    )
    assert_state_equal(before, state_of(norms))
    assert torch.equal(scaled, callback.normalizers.scale_rewards(torch.full((NUM_ENVS,), 5.0)))


def test_load_normalizers_inside_inference_mode_deploys_the_trained_statistics(
    trained: dict,
) -> None:
    callback: NormalizerCallback = trained["callback"]
    obs = torch.randn(16, OBS_DIM) * 0.1
    with torch.inference_mode():  # the usual deployment wrapper, around loading too
        norms = rlnorm.load_normalizers(trained["path"])
        deployed = norms.normalize_obs(obs)
        single = norms.normalize_obs(obs[0].numpy())  # one observation, as env.reset() gives
        assert norms.obs.mean.shape == (OBS_DIM,)
    assert torch.equal(deployed, callback.normalizers.normalize_obs(obs))
    assert torch.equal(single, deployed[0])
    # The same normalizers then feed a backward pass outside the mode.
    x = obs.clone().requires_grad_(True)
    norms.normalize_obs(x).sum().backward()
    assert x.grad is not None


def test_load_normalizers_accepts_a_loaded_checkpoint_dict(trained: dict) -> None:
    checkpoint = torch.load(trained["path"], weights_only=True)
    norms = rlnorm.load_normalizers(checkpoint)
    assert_state_equal(state_of(norms), state_of(trained["callback"].normalizers))


def test_load_normalizers_missing_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "last.ckpt"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        rlnorm.load_normalizers(path)


def test_load_normalizers_on_a_run_directory_says_so_and_names_the_last_ckpt_in_it(
    tmp_path: Path,
) -> None:
    checkpoints = tmp_path / "lightning_logs" / "version_3" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (tmp_path / "lightning_logs" / "version_10" / "checkpoints").mkdir(parents=True)
    (tmp_path / "lightning_logs" / "version_10" / "checkpoints" / "last.ckpt").touch()
    (checkpoints / "last.ckpt").touch()
    newest = tmp_path / "lightning_logs" / "version_10" / "checkpoints" / "last.ckpt"
    for directory, inside in (
        (tmp_path, newest),  # the newest version by number, not by name
        (checkpoints.parent, checkpoints / "last.ckpt"),
        (checkpoints, checkpoints / "last.ckpt"),
    ):
        with pytest.raises(FileNotFoundError) as info:
            rlnorm.load_normalizers(directory)
        message = str(info.value)
        assert f"'{directory}' is a directory, not a checkpoint file" in message
        assert f"'{inside}'" in message


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "zeroed-middle"])
def test_load_normalizers_damaged_file_is_a_value_error_naming_it(
    trained: dict, tmp_path: Path, damage: str
) -> None:
    data = trained["path"].read_bytes()
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "garbage":
        data = bytes(range(256)) * 64
    elif damage == "empty":
        data = b""
    else:
        middle = len(data) // 2
        data = data[: middle - 512] + bytes(1024) + data[middle + 512 :]
    path = tmp_path / f"{damage}.ckpt"
    path.write_bytes(data)
    with pytest.raises(ValueError, match=f"{damage}.ckpt"):
        rlnorm.load_normalizers(path)


def test_save_weights_only_warns_at_setup_and_its_files_are_refused(tmp_path: Path) -> None:
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_weights_only=True)
    trainer = make_trainer(
        tmp_path, [_callback(), checkpoint], max_steps=2, enable_checkpointing=True
    )
    with pytest.warns(UserWarning, match="save_weights_only"):
        trainer.fit(RolloutAgent(gamma=0.97))
    (path,) = sorted((tmp_path / "ckpt").glob("*.ckpt"))
    with pytest.raises(ValueError, match="save_weights_only"):
        rlnorm.load_normalizers(path)


def test_full_checkpoints_do_not_warn_about_weights_only(tmp_path: Path) -> None:
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt")
    trainer = make_trainer(
        tmp_path, [_callback(), checkpoint], max_steps=1, enable_checkpointing=True
    )
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(RolloutAgent(gamma=0.97))
    assert not [w for w in record if "save_weights_only" in str(w.message)]


def test_load_normalizers_with_several_instances_needs_a_name(tmp_path: Path) -> None:
    policy = NormalizerCallback(name="policy", reward=True)
    critic = NormalizerCallback(name="critic")
    trainer = make_trainer(tmp_path, [policy, critic], max_steps=2)
    trainer.fit(RolloutAgent(normalizer="policy", critic_normalizer="critic"))
    path = tmp_path / "two.ckpt"
    trainer.save_checkpoint(path)
    with pytest.raises(ValueError, match=r"several.*\['critic', 'policy'\].*name="):
        rlnorm.load_normalizers(path)
    with pytest.raises(ValueError, match=r"'value'.*'critic', 'policy'"):
        rlnorm.load_normalizers(path, name="value")
    for callback in (policy, critic):
        norms = rlnorm.load_normalizers(path, name=callback.name)
        assert_state_equal(state_of(norms), state_of(callback.normalizers))


def test_load_normalizers_on_a_checkpoint_without_the_callback_says_so(
    trained: dict, tmp_path: Path
) -> None:
    checkpoint = torch.load(trained["path"], weights_only=True)
    checkpoint["callbacks"] = {}
    path = tmp_path / "no-callback.ckpt"
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match="NormalizerCallback attached"):
        rlnorm.load_normalizers(path)


def test_checkpoint_from_a_newer_schema_is_refused(trained: dict, tmp_path: Path) -> None:
    checkpoint = torch.load(trained["path"], weights_only=True)
    checkpoint["callbacks"][trained["callback"].state_key]["schema_version"] = SCHEMA_VERSION + 1
    path = tmp_path / "future.ckpt"
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match="schema version"):
        rlnorm.load_normalizers(path)
