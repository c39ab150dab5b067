"""NormalizerCallback in real ``Trainer(accelerator="cpu")`` runs of small CartPole agents."""

from __future__ import annotations

import csv
import io
import itertools
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import rlnorm
from conftest import assert_close, assert_state_equal, reference_moments, state_of
from rlnorm import NormalizerCallback, RewardNormalizer, RunningMeanStd
from rlnorm.algebra.drift import batch_shift, drift, summary
from rlnorm.algebra.moments import Moments
from rlnorm.lightning.telemetry import DriftHeatmap
from rollout_agents import (
    CRITIC_DIM,
    OBS_DIM,
    QUIET_LIGHTNING,
    BatchKeyAgent,
    DictObsAgent,
    PPORolloutDataset,
    RolloutAgent,
    SelfNormalizingAgent,
    StoredBatchAgent,
    StoredBatchDataset,
    ValidatingAgent,
    make_trainer,
)

pytestmark = pytest.mark.filterwarnings(*QUIET_LIGHTNING)

ROLLOUT_LEN, NUM_ENVS = 8, 4
ROWS = ROLLOUT_LEN * NUM_ENVS  # observations (and returns) per training step
SCALAR_KEYS = (
    "count",
    "mean_abs_mean",
    "std_min",
    "std_max",
    "drift/mean",
    "drift/log_std",
    "drift/kl",
    "batch_shift",
    "clip_fraction",
    "nonfinite_rows",
)


class Probe(Callback):
    """Snapshots a NormalizerCallback's state at fit start, train start and every batch end."""

    def __init__(self, target: NormalizerCallback) -> None:
        self.target = target
        self.fit_start_shapes: dict[str, tuple[int, ...]] | None = None
        self.train_start: dict[str, torch.Tensor] | None = None
        self.steps: list[dict[str, torch.Tensor]] = []
        self.enabled: list[bool] = []

    @property
    def state_key(self) -> str:
        return f"Probe[{self.target.name}]"

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self.fit_start_shapes = dict(self.target.normalizers.obs_shapes)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.train_start = state_of(self.target.normalizers)

    def on_train_batch_end(self, *args: Any) -> None:
        self.steps.append(state_of(self.target.normalizers))
        self.enabled.append(self.target.updates_enabled)


def obs_reference(updates: list[tuple[int, Any]], shape: Any = OBS_DIM, **kwargs: Any):
    ref = RunningMeanStd(shape, **kwargs)
    for _, x in updates:
        ref.update(x)
    return ref


def reward_reference(updates: list[tuple[int, torch.Tensor, torch.Tensor]], gamma: float = 0.99):
    ref = RewardNormalizer(NUM_ENVS, gamma=gamma)
    for _, rewards, dones in updates:
        ref.update(rewards, dones)
    return ref


def counts(states: list[dict[str, torch.Tensor]], key: str = "obs.obs.count") -> list[int]:
    return [int(state[key]) for state in states]


# ---------------------------------------------------------------------------- statistics


def test_fit_moves_statistics_to_exactly_those_of_the_raw_rollouts(tmp_path: Path) -> None:
    callback = NormalizerCallback(reward=True)  # shapes and num_envs inferred from the data
    probe = Probe(callback)
    agent = RolloutAgent()
    make_trainer(tmp_path, [callback, probe], max_steps=8).fit(agent)

    # Shapes were unknown at fit start and inferred from the first observation.
    assert probe.fit_start_shapes == {}
    assert callback.normalizers.obs_shapes == {"obs": (OBS_DIM,)}
    assert callback.normalizers.reward is not None
    assert callback.normalizers.reward.num_envs == NUM_ENVS
    # The statistics moved at every step, by exactly one rollout.
    assert counts(probe.steps) == [ROWS * (i + 1) for i in range(8)]
    assert counts(probe.steps, "reward.stats.count") == [ROWS * (i + 1) for i in range(8)]
    means = [s["obs.obs.mean"] for s in probe.steps]
    assert all(not torch.equal(a, b) for a, b in itertools.pairwise(means))
    # Bitwise what a RunningMeanStd / RewardNormalizer fed the same raw data holds.
    assert_state_equal(
        state_of(callback.normalizers.obs["obs"]), state_of(obs_reference(agent.obs_updates))
    )
    assert_state_equal(
        state_of(callback.normalizers.reward), state_of(reward_reference(agent.reward_updates))
    )
    # And the float64 two-pass moments of everything the rollouts saw.
    raw = torch.cat([x for _, x in agent.obs_updates])
    mean, var, _, count = reference_moments(raw)
    assert count == int(callback.normalizers.obs["obs"].count) == 8 * ROWS
    assert_close(callback.normalizers.obs["obs"].mean, mean, rtol=1e-10, atol=1e-14)
    assert_close(callback.normalizers.obs["obs"].var, var, rtol=1e-10)


def test_policy_sees_observations_normalized_with_the_current_statistics(tmp_path: Path) -> None:
    callback = NormalizerCallback(OBS_DIM, clip=None)
    agent = RolloutAgent(rewards=False)
    make_trainer(tmp_path, [callback], max_steps=3).fit(agent)
    ref = RunningMeanStd(OBS_DIM, clip=None)
    for (_, raw), (_, normalized) in zip(agent.obs_updates, agent.obs_normalized, strict=True):
        ref.update(raw)
        assert torch.equal(normalized, ref.normalize(raw))
    final = torch.cat([x for _, x in agent.obs_updates])
    normalized = callback.normalizers.normalize_obs(final).double()
    assert_close(normalized.mean(0), np.zeros(OBS_DIM), rtol=0, atol=1e-5)
    assert_close(normalized.std(0, unbiased=False), np.ones(OBS_DIM), rtol=1e-5)


# ---------------------------------------------------------------------------- telemetry


def _expected_interval_figures(agent: RolloutAgent, every: int, clip: float) -> dict[int, dict]:
    """Replays the recorded raw data through a reference to get every logged figure."""
    ref_obs = RunningMeanStd(OBS_DIM)
    ref_rew = RewardNormalizer(NUM_ENVS)
    snapshots: dict[str, dict[int, Moments]] = {"obs": {}, "reward": {}}
    shifts: dict[str, dict[int, list[float]]] = {"obs": defaultdict(list), "reward": {}}
    shifts["reward"] = defaultdict(list)
    for step, x in agent.obs_updates:
        batch = ref_obs.update(x)
        shifts["obs"][step].append(float(batch_shift(batch, ref_obs.moments)))
        snapshots["obs"][step] = Moments(*(t.clone() for t in ref_obs.moments))
    for step, rewards, dones in agent.reward_updates:
        batch = ref_rew.update(rewards, dones)
        shifts["reward"][step].append(float(batch_shift(batch, ref_rew.stats.moments)))
        snapshots["reward"][step] = Moments(*(t.clone() for t in ref_rew.stats.moments))
    normalized: dict[int, list[torch.Tensor]] = defaultdict(list)
    for step, x in agent.obs_normalized:
        normalized[step].append(x)
    nan_rows: dict[int, int] = defaultdict(int)
    for step, x in agent.obs_updates:
        nan_rows[step] += int((~torch.isfinite(x).all(dim=1)).sum())

    expected: dict[int, dict] = {}
    last_step = max(step for step, _ in agent.obs_updates)
    for s in range(every - 1, last_step + 1, every):
        interval = range(s - every + 1, s + 1)
        out: dict[str, float] = {}
        for tag in ("obs", "reward"):
            state = snapshots[tag][s]
            for key, value in summary(state).items():
                out[f"rlnorm/{tag}/{key}"] = float(value)
            if s - every >= 0:
                for key, value in drift(snapshots[tag][s - every], state).items():
                    out[f"rlnorm/{tag}/{key}"] = float(value)
            out[f"rlnorm/{tag}/batch_shift"] = max(v for t in interval for v in shifts[tag][t])
        values = torch.cat([x.reshape(-1) for t in interval for x in normalized[t]])
        out["rlnorm/obs/clip_fraction"] = float((values.abs() >= clip).float().mean())
        out["rlnorm/obs/nonfinite_rows"] = float(sum(nan_rows[t] for t in range(s + 1)))
        out["rlnorm/reward/nonfinite_rows"] = 0.0
        expected[s] = out
    return expected


def test_tensorboard_event_files_hold_every_documented_tag_with_the_right_values(
    tmp_path: Path,
) -> None:
    clip, every = 1.5, 2
    callback = NormalizerCallback(reward=True, clip=clip, log_every_n_steps=every)
    logger = TensorBoardLogger(tmp_path, name="tb")
    agent = RolloutAgent(nan_row=True)
    make_trainer(tmp_path, [callback], max_steps=8, logger=logger).fit(agent)

    events = EventAccumulator(
        logger.log_dir, size_guidance={"scalars": 0, "histograms": 0, "images": 0}
    )
    events.Reload()
    tags = events.Tags()
    for tag in ("obs", "reward"):
        for key in SCALAR_KEYS:
            assert f"rlnorm/{tag}/{key}" in tags["scalars"], f"rlnorm/{tag}/{key} not logged"
        for hist in ("mean_hist", "std_hist"):
            assert f"rlnorm/{tag}/{hist}" in tags["histograms"]
    assert "rlnorm/obs/drift_heatmap" in tags["images"]
    assert "rlnorm/reward/drift_heatmap" in tags["images"]

    logged_steps = [1, 3, 5, 7]
    scalars = {
        tag: {e.step: e.value for e in events.Scalars(tag)}
        for tag in tags["scalars"]
        if tag.startswith("rlnorm/")
    }
    for tag in ("obs", "reward"):
        assert sorted(scalars[f"rlnorm/{tag}/count"]) == logged_steps
        # Drift needs a previous log: from the second log on.
        assert sorted(scalars[f"rlnorm/{tag}/drift/kl"]) == logged_steps[1:]
        for step in logged_steps:
            # count equals the samples seen up to and including that step
            assert scalars[f"rlnorm/{tag}/count"][step] == ROWS * (step + 1)
            assert scalars[f"rlnorm/{tag}/std_min"][step] <= scalars[f"rlnorm/{tag}/std_max"][step]
            assert 0.0 <= scalars[f"rlnorm/{tag}/clip_fraction"][step] <= 1.0
            assert scalars[f"rlnorm/{tag}/batch_shift"][step] >= 0.0
        for step in logged_steps[1:]:
            assert scalars[f"rlnorm/{tag}/drift/kl"][step] >= 0.0
            assert scalars[f"rlnorm/{tag}/drift/mean"][step] >= 0.0
    # The clip bound of 1.5 std is reached by some observations, not all.
    assert any(0.0 < v < 1.0 for v in scalars["rlnorm/obs/clip_fraction"].values())

    # Every figure equals a replay of the recorded raw data through reference normalizers.
    expected = _expected_interval_figures(agent, every, clip)
    assert sorted(expected) == logged_steps
    for step, figures in expected.items():
        for tag, value in figures.items():
            assert step in scalars[tag], f"{tag} missing at step {step}"
            assert math.isclose(scalars[tag][step], value, rel_tol=1e-5, abs_tol=1e-6), (
                f"{tag} at step {step}: logged {scalars[tag][step]}, expected {value}"
            )

    final = callback.normalizers.obs["obs"]
    for hist, values in (("mean_hist", final.mean), ("std_hist", final.std)):
        histograms = events.Histograms(f"rlnorm/obs/{hist}")
        assert [h.step for h in histograms] == logged_steps
        last = histograms[-1].histogram_value
        assert last.num == OBS_DIM
        assert math.isclose(last.min, float(values.min()), rel_tol=1e-6)
        assert math.isclose(last.max, float(values.max()), rel_tol=1e-6)
    images = events.Images("rlnorm/obs/drift_heatmap")
    assert [i.step for i in images] == logged_steps[1:]
    # Rows are dimensions, the newest columns on the right; one column per log with a previous
    # log to compare with, and nothing drawn for logs still to come.
    cell_w = DriftHeatmap().cell_width
    for columns, image in enumerate(images, start=1):
        pixels = np.asarray(Image.open(io.BytesIO(image.encoded_image_string)).convert("RGB"))
        assert pixels.shape == (image.height, image.width, 3)
        assert pixels.shape[1] == columns * cell_w
        assert pixels.shape[0] >= OBS_DIM
        assert pixels.shape[0] % OBS_DIM == 0
        assert not (pixels == 48).all(axis=-1).any()  # no blank grey cells
    cell_h = pixels.shape[0] // OBS_DIM
    first_row_cells = pixels[:cell_h]
    assert (first_row_cells == first_row_cells[:1, :1]).all(axis=-1).any()


def test_csv_logger_receives_the_same_tags_at_the_trainers_interval(tmp_path: Path) -> None:
    callback = NormalizerCallback(reward=True)  # log_every_n_steps=None: the trainer's
    logger = CSVLogger(tmp_path, name="csv")
    trainer = make_trainer(tmp_path, [callback], max_steps=6, logger=logger, log_every_n_steps=2)
    trainer.fit(RolloutAgent())
    with open(Path(logger.log_dir) / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    header = set(rows[0])
    for tag in ("obs", "reward"):
        for key in SCALAR_KEYS:
            assert f"rlnorm/{tag}/{key}" in header
    logged = {int(r["step"]): float(r["rlnorm/obs/count"]) for r in rows if r["rlnorm/obs/count"]}
    assert logged == {1: 2 * ROWS, 3: 4 * ROWS, 5: 6 * ROWS}


def test_gradient_accumulation_logs_once_per_optimizer_step(tmp_path: Path) -> None:
    callback = NormalizerCallback(reward=True, log_every_n_steps=2)
    logger = CSVLogger(tmp_path, name="csv")
    trainer = make_trainer(
        tmp_path, [callback], max_steps=4, logger=logger, accumulate_grad_batches=2
    )
    trainer.fit(RolloutAgent(steps_per_epoch=16))
    with open(Path(logger.log_dir) / "metrics.csv", newline="") as f:
        logged = [
            (int(r["step"]), float(r["rlnorm/obs/count"]))
            for r in csv.DictReader(f)
            if r["rlnorm/obs/count"]
        ]
    # Two batches per optimizer step: one log per logging step, after both of its batches,
    # as Lightning's own metrics are logged.
    assert logged == [(1, 4 * ROWS), (3, 8 * ROWS)]


def test_training_without_logger_runs_and_updates(tmp_path: Path) -> None:
    callback = NormalizerCallback(reward=True, log_every_n_steps=1)
    trainer = make_trainer(tmp_path, [callback], max_steps=4, logger=False)
    trainer.fit(RolloutAgent())
    assert trainer.loggers == []
    assert int(callback.normalizers.obs["obs"].count) == 4 * ROWS


def _scalars(log_dir: str) -> dict[str, list[tuple[int, float]]]:
    """Every ``rlnorm/*`` scalar event in a TensorBoard log directory, as ``(step, value)``."""
    events = EventAccumulator(log_dir, size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)]
        for tag in events.Tags()["scalars"]
        if tag.startswith("rlnorm/")
    }


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        # 50 steps between logs by default: the epoch end (step 2) and the end of fit (4).
        ({"max_steps": 5}, {2: 3, 4: 5}),
        # Step logs at the epoch ends' steps: each step is logged once.
        ({"max_steps": -1, "max_epochs": 2, "log_every_n_steps": 3}, {2: 3, 5: 6}),
        # Frozen through the second epoch: nothing changed, nothing more to log.
        ({"max_steps": -1, "max_epochs": 2, "freeze_steps": (3, 4, 5)}, {2: 3}),
    ],
    ids=["stopped-mid-epoch", "interval-at-epoch-ends", "frozen-second-epoch"],
)
def test_short_runs_log_at_each_epoch_end_and_at_the_end_of_fit_once_per_step(
    tmp_path: Path, options: dict[str, Any], expected: dict[int, int]
) -> None:
    options = dict(options)
    agent = RolloutAgent(steps_per_epoch=3, freeze_steps=options.pop("freeze_steps", ()))
    callback = NormalizerCallback(reward=True)
    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer = make_trainer(tmp_path, [callback], logger=logger, **options)
    trainer.fit(agent)
    # Read back after fit returned: the final point is in the event file.
    scalars = _scalars(logger.log_dir)
    for tag in ("obs", "reward"):
        assert scalars[f"rlnorm/{tag}/count"] == [(s, n * ROWS) for s, n in expected.items()]
        steps = [s for s, _ in scalars[f"rlnorm/{tag}/batch_shift"]]
        assert steps == sorted(expected)
    assert [s for s, _ in scalars.get("rlnorm/obs/drift/kl", [])] == sorted(expected)[1:]


def test_resumed_runs_log_exactly_the_telemetry_of_the_uninterrupted_run(tmp_path: Path) -> None:
    def run(
        name: str, max_steps: int, ckpt_path: Path | None = None, every_n: int | None = None
    ) -> tuple[EventAccumulator, Any]:
        callback = NormalizerCallback(reward=True, clip=1.5, log_every_n_steps=3)
        callbacks: list[Callback] = [callback]
        if every_n is not None:
            callbacks.append(
                ModelCheckpoint(tmp_path / "ckpts", every_n_train_steps=every_n, save_top_k=-1)
            )
        logger = TensorBoardLogger(tmp_path, name=name)
        trainer = make_trainer(
            tmp_path,
            callbacks,
            max_steps=max_steps,
            logger=logger,
            enable_checkpointing=every_n is not None,
        )
        trainer.fit(RolloutAgent(steps_per_epoch=100), ckpt_path=ckpt_path)
        events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "images": 0})
        events.Reload()
        return events, trainer

    def after(events: EventAccumulator, first: int) -> dict[str, Any]:
        tags = events.Tags()
        out: dict[str, Any] = {
            tag: [(e.step, e.value) for e in events.Scalars(tag) if e.step >= first]
            for tag in tags["scalars"]
            if tag.startswith("rlnorm/")
        }
        for tag in tags["images"]:
            out[tag] = [(e.step, e.encoded_image_string) for e in events.Images(tag)]
            out[tag] = [(step, image) for step, image in out[tag] if step >= first]
        return out

    # Logs at steps 2, 5, 8 and the end of fit (9); checkpoints after 4 and 8 steps.
    uninterrupted, _ = run("full", 10, every_n=4)
    # Stopped after 7 steps (it logs its own final point at 6), checkpointed, resumed.
    _, stopped = run("stopped", 7)
    stopped.save_checkpoint(tmp_path / "stopped.ckpt")
    after_stop, _ = run("after_stop", 10, ckpt_path=tmp_path / "stopped.ckpt")
    # Resumed from the mid-interval checkpoint the uninterrupted run wrote after 4 steps.
    mid = tmp_path / "ckpts" / "epoch=0-step=4.ckpt"
    after_mid, _ = run("after_mid", 10, ckpt_path=mid)

    for resumed, first in ((after_stop, 7), (after_mid, 4)):
        want, got = after(uninterrupted, first), after(resumed, first)
        assert got.keys() == want.keys()
        logged = {step for step, _ in want["rlnorm/obs/batch_shift"]}
        assert logged == {step for step in (5, 8, 9) if step >= first}
        assert any(v > 0 for _, v in want["rlnorm/obs/clip_fraction"])
        for tag in want:
            assert got[tag] == want[tag], f"{tag} after resuming at step {first}"


# ---------------------------------------------------------------------------- freezing


def test_validation_test_predict_and_sanity_check_do_not_move_the_statistics(
    tmp_path: Path,
) -> None:
    callback = NormalizerCallback(OBS_DIM, reward=True, num_envs=NUM_ENVS)
    agent = ValidatingAgent(val_batches=2, steps_per_epoch=4)
    trainer = make_trainer(
        tmp_path, [callback], max_steps=8, num_sanity_val_steps=2, limit_val_batches=2
    )
    trainer.fit(agent)

    sanity = [r for r in agent.val_records if r["sanity"]]
    in_fit = [r for r in agent.val_records if not r["sanity"]]
    assert len(sanity) == 2
    assert len(in_fit) == 4  # after each of the two epochs
    assert all(int(r["before"]["obs.obs.count"]) == 0 for r in sanity)
    assert {int(r["before"]["obs.obs.count"]) for r in in_fit} == {4 * ROWS, 8 * ROWS}
    for record in agent.val_records:
        assert not record["updates_enabled"]
        assert_state_equal(record["before"], record["after"])  # returns included
    # Only the training rollouts reached the statistics.
    assert_state_equal(
        state_of(callback.normalizers.obs["obs"]), state_of(obs_reference(agent.obs_updates))
    )
    assert_state_equal(
        state_of(callback.normalizers.reward), state_of(reward_reference(agent.reward_updates))
    )
    # Standalone validation, test and predict runs do not move them either.
    before = state_of(callback.normalizers)
    agent.val_records.clear()
    trainer.validate(agent, verbose=False)
    trainer.test(agent, verbose=False)
    trainer.predict(agent)
    assert len(agent.val_records) == 6
    for record in agent.val_records:
        assert not record["updates_enabled"]
        assert_state_equal(record["before"], record["after"])
    assert_state_equal(before, state_of(callback.normalizers))


def test_until_stops_observation_updates_after_that_many_samples(tmp_path: Path) -> None:
    callback = NormalizerCallback(OBS_DIM, until=100)
    probe = Probe(callback)
    agent = RolloutAgent(rewards=False, rollout_len=1, num_envs=NUM_ENVS * 8)
    make_trainer(tmp_path, [callback, probe], max_steps=6).fit(agent)
    # 32 rows per step: the update that crosses 100 is taken whole, then nothing moves.
    assert counts(probe.steps) == [32, 64, 96, 128, 128, 128]
    assert_state_equal(probe.steps[3], probe.steps[-1])
    assert_state_equal(
        state_of(callback.normalizers.obs["obs"]),
        state_of(obs_reference(agent.obs_updates, until=100)),
    )


def test_freeze_and_unfreeze_pause_and_resume_updates(tmp_path: Path) -> None:
    callback = NormalizerCallback(OBS_DIM, reward=True)
    probe = Probe(callback)
    agent = RolloutAgent(freeze_steps=(2, 3, 4))
    make_trainer(tmp_path, [callback, probe], max_steps=8).fit(agent)
    expected = [1, 2, 2, 2, 2, 3, 4, 5]
    assert counts(probe.steps) == [ROWS * n for n in expected]
    assert counts(probe.steps, "reward.stats.count") == [ROWS * n for n in expected]
    assert probe.enabled == [True, True, False, False, False, True, True, True]
    # The frozen steps' rollouts were normalized but left no trace in the statistics.
    kept = [(s, x) for s, x in agent.obs_updates if s not in (2, 3, 4)]
    assert_state_equal(state_of(callback.normalizers.obs["obs"]), state_of(obs_reference(kept)))


# ---------------------------------------------------------------------------- batch keys


@pytest.mark.parametrize(
    ("dataset_options", "batch_keys", "mask_key", "checked"),
    [
        ({}, "obs", "fresh", ("obs",)),
        ({}, ["obs", "next_obs"], "fresh", ("obs", "next_obs")),
        ({"shuffle": False}, "obs", "fresh", ("obs",)),
        ({"shuffle": False, "as_list": True}, 0, 1, ("obs",)),
    ],
    ids=["dict-shuffled", "dict-obs+next_obs", "dict-slices", "list-slices"],
)
def test_batch_key_mode_counts_each_transition_once_under_ppo_replay(
    tmp_path: Path,
    dataset_options: dict[str, Any],
    batch_keys: Any,
    mask_key: Any,
    checked: tuple[str, ...],
) -> None:
    dataset = PPORolloutDataset(
        num_rollouts=2, rollout_len=8, num_envs=4, ppo_epochs=3, **dataset_options
    )
    callback = NormalizerCallback(batch_keys=batch_keys, update_mask_key=mask_key)
    agent = BatchKeyAgent(dataset, normalized_keys=checked)
    make_trainer(tmp_path, [callback], max_steps=-1, max_epochs=1).fit(agent)

    # training_step asserted, for every batch and every PPO epoch, that the keys arrived
    # normalized exactly once with the statistics of that moment.
    assert agent.checked_batches == dataset.batches == 24
    served = torch.cat(agent.served_ids)
    assert served.numel() == dataset.ppo_epochs * dataset.transitions
    unique = torch.unique(served).numel()
    assert unique == dataset.transitions == 64
    assert int(callback.normalizers.obs["obs"].count) == unique
    fresh_ids = torch.cat(agent.fresh_ids)
    assert torch.equal(torch.sort(fresh_ids).values, torch.arange(unique))
    # Equal to a reference fed each transition once, in the order first served.
    ref = RunningMeanStd(OBS_DIM)
    for rows in agent.fresh_obs:
        ref.update(rows)
    assert_state_equal(state_of(callback.normalizers.obs["obs"]), state_of(ref))


class _PlainTuples:
    """An iterable passed straight to ``fit(train_dataloaders=...)``: yields plain tuples."""

    def __init__(self, stored: list[torch.Tensor]) -> None:
        self.stored = stored

    def __iter__(self) -> Any:
        return iter([(obs,) for obs in self.stored])

    def __len__(self) -> int:
        return len(self.stored)


@pytest.mark.parametrize("container", ["namedtuple", "plain-tuple"])
def test_batch_keys_on_an_immutable_batch_raise_and_leave_the_stored_data_raw(
    tmp_path: Path, container: str
) -> None:
    dataset = StoredBatchDataset("namedtuple", items=2)
    raw = [t.clone() for t in dataset.stored]
    callback = NormalizerCallback(OBS_DIM, batch_keys=0)
    agent = StoredBatchAgent(dataset)
    trainer = make_trainer(tmp_path, [callback], max_steps=-1, max_epochs=2)
    loaders = None if container == "namedtuple" else _PlainTuples(dataset.stored)
    name = "StoredObs" if container == "namedtuple" else "tuple"
    with pytest.raises(TypeError, match=rf"entry 0 .* of a {name} batch.*dicts or lists"):
        trainer.fit(agent, train_dataloaders=loaders)
    # Nothing was learned from the batch it refused, and the dataset's tensors are untouched.
    assert int(callback.normalizers.obs["obs"].count) == 0
    for stored, original in zip(dataset.stored, raw, strict=True):
        assert torch.equal(stored, original)


@pytest.mark.parametrize("container", ["dict", "list"])
def test_batch_keys_on_the_datasets_own_tensors_keep_them_raw_across_epochs(
    tmp_path: Path, container: str
) -> None:
    dataset = StoredBatchDataset(container, items=1)
    raw = dataset.stored[0].clone()
    key = "obs" if container == "dict" else 0
    # One batch per epoch; statistics learned in the first epoch only (`until`).
    callback = NormalizerCallback(OBS_DIM, batch_keys=key, until=raw.shape[0])
    agent = StoredBatchAgent(dataset)
    make_trainer(tmp_path, [callback], max_steps=-1, max_epochs=3).fit(agent)
    assert torch.equal(dataset.stored[0], raw)  # the stored data stayed raw
    assert len(agent.seen) == 3
    expected = callback.normalizers.normalize_obs(raw)
    assert not torch.equal(expected, raw)
    for seen in agent.seen:  # each epoch normalized the raw data once, the same way
        assert torch.equal(seen, expected)


# ---------------------------------------------------------------------------- several instances


def test_two_named_instances_are_checkpointed_and_restored_side_by_side(tmp_path: Path) -> None:
    policy = NormalizerCallback(name="policy", reward=True, log_every_n_steps=2)
    critic = NormalizerCallback(name="critic", clip=5.0, log_every_n_steps=2)
    assert policy.state_key != critic.state_key
    agent = RolloutAgent(normalizer="policy", critic_normalizer="critic")
    logger = CSVLogger(tmp_path, name="csv")
    trainer = make_trainer(tmp_path, [policy, critic], max_steps=4, logger=logger)
    trainer.fit(agent)
    assert rlnorm.get_normalizer(trainer, "critic") is critic
    assert rlnorm.get_normalizer(agent, "policy") is policy
    assert critic.normalizers.obs_shapes == {"obs": (CRITIC_DIM,)}
    assert_state_equal(
        state_of(critic.normalizers.obs["obs"]),
        state_of(obs_reference(agent.critic_updates, CRITIC_DIM)),
    )
    with open(Path(logger.log_dir) / "metrics.csv", newline="") as f:
        header = set(next(csv.reader(f)))
    assert {"policy/obs/count", "policy/reward/count", "critic/obs/count"} <= header
    assert not any(tag.startswith("rlnorm/") for tag in header)

    path = tmp_path / "two.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)["callbacks"]
    assert {policy.state_key, critic.state_key} <= set(saved)
    for callback in (policy, critic):
        stored = saved[callback.state_key]
        assert stored["name"] == callback.name
        assert_state_equal(stored["normalizers"], state_of(callback.normalizers))

    # Fresh instances with inferred shapes pick up their own state by name.
    policy2 = NormalizerCallback(name="policy", reward=True)
    critic2 = NormalizerCallback(name="critic", clip=5.0)
    probes = [Probe(policy2), Probe(critic2)]
    resumed = RolloutAgent(normalizer="policy", critic_normalizer="critic")
    trainer2 = make_trainer(tmp_path, [policy2, critic2, *probes], max_steps=6)
    trainer2.fit(resumed, ckpt_path=path)
    assert_state_equal(probes[0].train_start, state_of(policy.normalizers))
    assert_state_equal(probes[1].train_start, state_of(critic.normalizers))
    assert int(policy2.normalizers.obs["obs"].count) == 6 * ROWS
    assert int(critic2.normalizers.obs["obs"].count) == 6 * ROWS


def test_two_instances_with_the_same_name_are_rejected() -> None:
    with pytest.raises(RuntimeError, match="state_key"):
        make_trainer(".", [NormalizerCallback(4), NormalizerCallback(4)])


# ---------------------------------------------------------------------------- dict observations


@pytest.mark.parametrize(
    "obs_shape", [{"pos": 2, "vel": 3}, None], ids=["given-shapes", "inferred-shapes"]
)
def test_dict_observations_get_one_normalizer_per_key(
    tmp_path: Path, obs_shape: dict[str, int] | None
) -> None:
    callback = NormalizerCallback(obs_shape, reward=True, log_every_n_steps=2)
    logger = CSVLogger(tmp_path, name="csv")
    agent = DictObsAgent()
    make_trainer(tmp_path, [callback], max_steps=4, logger=logger).fit(agent)
    norms = callback.normalizers
    assert norms.dict_obs is True
    assert norms.obs_shapes == {"pos": (2,), "vel": (3,)}
    assert set(norms.named_normalizers()) == {"obs/pos", "obs/vel", "reward"}
    for key, dim in (("pos", 2), ("vel", 3)):
        ref = obs_reference([(s, x[key]) for s, x in agent.obs_updates], dim)
        assert_state_equal(state_of(norms.obs[key]), state_of(ref))
    normalized = norms.normalize_obs(agent.obs_updates[-1][1])
    assert set(normalized) == {"pos", "vel"}
    with open(Path(logger.log_dir) / "metrics.csv", newline="") as f:
        header = set(next(csv.reader(f)))
    for key in ("pos", "vel"):
        assert f"rlnorm/obs/{key}/count" in header
        assert f"rlnorm/obs/{key}/clip_fraction" in header


# ---------------------------------------------------------------------------- inferred shapes


def test_inferred_shapes_are_restored_from_a_checkpoint_before_any_data(tmp_path: Path) -> None:
    callback = NormalizerCallback(reward=True)
    trainer = make_trainer(tmp_path, [callback], max_steps=4)
    trainer.fit(RolloutAgent())
    path = tmp_path / "inferred.ckpt"
    trainer.save_checkpoint(path)

    fresh = NormalizerCallback(reward=True)
    probe = Probe(fresh)
    resumed = RolloutAgent()
    make_trainer(tmp_path, [fresh, probe], max_steps=6).fit(resumed, ckpt_path=path)
    # At train start no data has been seen in this run, yet the shapes and state are back.
    assert resumed.train_start_shapes == {"obs": (OBS_DIM,)}
    assert probe.train_start is not None
    assert_state_equal(probe.train_start, state_of(callback.normalizers))
    assert int(fresh.normalizers.obs["obs"].count) == 6 * ROWS

    # Also without a Trainer: load_state_dict on a callback that never saw data or setup.
    bare = NormalizerCallback(reward=True)
    bare.load_state_dict(torch.load(path, weights_only=True)["callbacks"][bare.state_key])
    assert bare.normalizers.obs_shapes == {"obs": (OBS_DIM,)}
    assert bare.normalizers.reward is not None
    assert bare.normalizers.reward.num_envs == NUM_ENVS
    assert_state_equal(state_of(bare.normalizers), state_of(callback.normalizers))


def test_states_written_before_telemetry_was_checkpointed_still_load_and_resume(
    tmp_path: Path,
) -> None:
    callback = NormalizerCallback(reward=True, log_every_n_steps=2)
    trainer = make_trainer(tmp_path, [callback], max_steps=4, logger=CSVLogger(tmp_path, "a"))
    trainer.fit(RolloutAgent())
    checkpoint = torch.load(_save(trainer, tmp_path / "new.ckpt"), weights_only=True)
    state = checkpoint["callbacks"][callback.state_key]
    assert set(state["telemetry"]) == {
        "last_logged_step",
        "logged_counts",
        "interval",
        "heatmaps",
    }
    del state["telemetry"]  # as schema-1 states of earlier rlnorm releases are
    older = tmp_path / "older.ckpt"
    torch.save(checkpoint, older)

    bare = NormalizerCallback(reward=True)
    bare.load_state_dict(state)
    assert_state_equal(state_of(bare.normalizers), state_of(callback.normalizers))
    resumed = NormalizerCallback(reward=True, log_every_n_steps=2)
    logger = CSVLogger(tmp_path, name="b")
    make_trainer(tmp_path, [resumed], max_steps=6, logger=logger).fit(
        RolloutAgent(), ckpt_path=older
    )
    with open(Path(logger.log_dir) / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["rlnorm/obs/count"]]
    assert [(int(r["step"]), float(r["rlnorm/obs/count"])) for r in rows] == [(5, 6 * ROWS)]
    assert rows[0]["rlnorm/obs/drift/kl"]  # drift from the restored last log


def _save(trainer: Any, path: Path) -> Path:
    trainer.save_checkpoint(path)
    return path


# ---------------------------------------------------------------------------- configure_callbacks


def test_module_can_ship_the_callback_via_configure_callbacks(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, [], max_steps=4)
    agent = SelfNormalizingAgent()
    trainer.fit(agent)
    callback = rlnorm.get_normalizer(trainer)
    assert callback.name == "shipped"
    assert rlnorm.get_normalizer(agent) is callback
    assert int(callback.normalizers.obs["obs"].count) == 4 * ROWS
    assert int(callback.normalizers.reward.count) == 4 * ROWS


# ---------------------------------------------------------------------------- argument errors


BAD_ARGUMENTS = [
    ({"name": ""}, ValueError, "name"),
    ({"name": "has space"}, ValueError, "name"),
    ({"name": 3}, (ValueError, TypeError), "name"),
    ({"momentum": 1.0}, ValueError, "momentum"),
    ({"momentum": -0.1}, ValueError, "momentum"),
    ({"momentum": "fast"}, TypeError, "momentum"),
    ({"clip": 0.0}, ValueError, "clip"),
    ({"clip": -1.0}, ValueError, "clip"),
    ({"batch_keys": 1.5}, TypeError, "batch_keys"),
    ({"batch_keys": [["obs"]]}, TypeError, "batch_keys"),
    ({"update_mask_key": "fresh"}, ValueError, "update_mask_key"),
    ({"batch_keys": "obs", "update_mask_key": 1.5}, TypeError, "update_mask_key"),
    ({"log_every_n_steps": 0}, ValueError, "log_every_n_steps"),
    ({"log_every_n_steps": -3}, ValueError, "log_every_n_steps"),
    ({"obs_shape": -1}, ValueError, "obs_shape"),
    ({"obs_shape": {}}, ValueError, "obs_shape"),
    ({"reward_mode": "advantage"}, ValueError, "reward_mode"),
    ({"reward_clip": 0.0}, ValueError, "reward_clip"),
    ({"gamma": 1.5}, ValueError, "gamma"),
]


@pytest.mark.parametrize(
    ("kwargs", "error", "argument"),
    BAD_ARGUMENTS,
    ids=[", ".join(f"{k}={v!r}" for k, v in case[0].items()) for case in BAD_ARGUMENTS],
)
def test_bad_constructor_arguments_raise_naming_the_argument(
    kwargs: dict[str, Any], error: Any, argument: str
) -> None:
    with pytest.raises(error, match=rf"`{argument}\b"):
        NormalizerCallback(**kwargs)


# ---------------------------------------------------------------------------- get_normalizer


def test_get_normalizer_without_an_attached_callback_says_how_to_attach_one() -> None:
    with pytest.raises(LookupError, match=r"No NormalizerCallback.*callbacks="):
        rlnorm.get_normalizer(make_trainer("."))


def test_get_normalizer_with_several_attached_needs_a_name() -> None:
    trainer = make_trainer(".", [NormalizerCallback(name="a"), NormalizerCallback(name="b")])
    with pytest.raises(LookupError, match=r"Several.*\['a', 'b'\].*name="):
        rlnorm.get_normalizer(trainer)
    assert rlnorm.get_normalizer(trainer, "b").name == "b"
    with pytest.raises(LookupError, match="name='c'"):
        rlnorm.get_normalizer(trainer, "c")


def test_get_normalizer_on_a_module_outside_a_trainer_raises() -> None:
    with pytest.raises(LookupError, match="not attached to a Trainer"):
        rlnorm.get_normalizer(RolloutAgent())
    with pytest.raises(TypeError, match="owner"):
        rlnorm.get_normalizer(object())  # type: ignore[arg-type]


def test_normalize_obs_outside_training_neither_counts_clips_nor_differs_from_normalizers(
    tmp_path: Path,
) -> None:
    callback = NormalizerCallback(OBS_DIM, clip=0.5)
    trainer = make_trainer(tmp_path, [callback], max_steps=2)
    trainer.fit(RolloutAgent(rewards=False))
    assert not callback.updates_enabled  # the fit is over
    interval = callback.telemetry.state_dict()["telemetry"]["interval"]["obs"]
    x = torch.randn(5, OBS_DIM) * 100
    for obs in (x, x.numpy(), x.double()):  # tensors take the per-step route, arrays do not
        out = callback.normalize_obs(obs)
        assert torch.equal(out, callback.normalizers.normalize_obs(obs))
        assert out.abs().max() == 0.5
    assert torch.equal(callback.telemetry.state_dict()["telemetry"]["interval"]["obs"], interval)
    # Stages Lightning sets are enum members; a stage given as a string is compared as one.
    trainer.state.stage = "train"  # type: ignore[assignment]
    assert callback.updates_enabled
    trainer.state.stage = "validate"  # type: ignore[assignment]
    assert not callback.updates_enabled


def test_normalizers_before_setup_raise_a_helpful_error() -> None:
    callback = NormalizerCallback(OBS_DIM)
    assert not callback.updates_enabled
    with pytest.raises(RuntimeError, match="setup"):
        callback.normalize_obs(torch.zeros(2, OBS_DIM))


def test_per_step_hooks_it_has_no_use_for_are_not_dispatched_unless_a_subclass_adds_them(
    tmp_path: Path,
) -> None:
    class CountingBackward(NormalizerCallback):
        def on_before_backward(self, trainer: Any, pl_module: Any, loss: torch.Tensor) -> None:
            self.backward_calls = getattr(self, "backward_calls", 0) + 1

    for cls in (NormalizerCallback, CountingBackward):
        callback = cls(reward=True)
        trainer = make_trainer(tmp_path, [callback], max_steps=4, profiler="simple")
        trainer.fit(RolloutAgent())
        dispatched = {
            name.rsplit(".", 1)[-1]
            for name in trainer.profiler.recorded_durations
            if name.startswith(f"[Callback]{callback.state_key}.")
        }
        assert "on_train_batch_end" in dispatched  # hooks it uses still run
        assert int(callback.normalizers.obs["obs"].count) == 4 * ROWS
        skipped = {"on_after_backward", "on_before_optimizer_step", "on_before_zero_grad"}
        assert not dispatched & skipped
        if cls is CountingBackward:
            assert "on_before_backward" in dispatched
            assert callback.backward_calls == 4
        else:
            assert "on_before_backward" not in dispatched
