"""DriftTelemetry without a Trainer: what it logs, when, where, and what a checkpoint keeps."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.fabric.loggers import Logger
from lightning.fabric.loggers import TensorBoardLogger as FabricTensorBoardLogger
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from rlnorm import Moments, NormalizerConfig, Normalizers
from rlnorm.algebra.drift import drift, summary
from rlnorm.lightning.telemetry import DriftTelemetry, check_name, tensorboard_writers


class Recorder(Logger):
    """A Fabric logger that keeps what it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.logged: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recorder"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.logged.append((step, dict(metrics)))

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass


def telemetry_of(reward: bool = False, **config: Any) -> DriftTelemetry:
    norms = Normalizers(NormalizerConfig(obs_shape=3, reward=reward, num_envs=4, **config))
    return DriftTelemetry(norms, name="t")


def feed(telemetry: DriftTelemetry, seed: int, shift: float = 0.0) -> None:
    """One observation update, one counted normalize call, one reward step."""
    gen = torch.Generator().manual_seed(seed)
    norms = telemetry.normalizers
    telemetry.record_obs_update(norms.update_obs(torch.randn(16, 3, generator=gen) * 3 + shift))
    _, counts = norms.normalize_obs_counting_clipped(torch.randn(8, 3, generator=gen) * 40)
    telemetry.record_obs_clipped(counts)
    if norms.reward is not None:
        rewards, dones = torch.randn(4, generator=gen), torch.zeros(4, dtype=torch.bool)
        telemetry.record_reward_update(norms.update_rewards(rewards, dones))
        scaled, clipped = norms.scale_rewards(rewards, return_clipped=True)
        telemetry.record_reward_clipped(clipped, scaled.numel())


def test_log_writes_the_figures_of_the_algebra_at_the_given_step_to_fabric_loggers() -> None:
    telemetry, recorder = telemetry_of(), Recorder()
    feed(telemetry, 0)
    first = Moments(*(t.clone() for t in telemetry.normalizers.obs["obs"].moments))
    telemetry.log([recorder], step=3)
    feed(telemetry, 1, shift=2.0)
    out = telemetry.log([recorder], step=7)
    assert [step for step, _ in recorder.logged] == [3, 7]
    assert recorder.logged[1][1] == out
    expected = {
        **summary(telemetry.normalizers.obs["obs"].moments),
        **drift(first, telemetry.normalizers.obs["obs"].moments),
    }
    for key, value in expected.items():
        assert out[f"t/obs/{key}"] == pytest.approx(float(value), rel=1e-12)
    assert 0.0 < out["t/obs/clip_fraction"] <= 1.0
    assert out["t/obs/batch_shift"] > 0.0
    assert out["t/obs/nonfinite_rows"] == 0.0


def test_only_the_global_zero_process_writes_but_every_process_advances() -> None:
    telemetry, recorder = telemetry_of(), Recorder()
    feed(telemetry, 0)
    out = telemetry.log([recorder], step=0, is_global_zero=False)
    assert recorder.logged == []
    assert "t/obs/count" in out
    # The interval was read and reset, and the log counted: nothing changed since.
    assert not telemetry.log_if_changed([recorder], step=1)


def test_figures_without_data_in_the_interval_are_left_out() -> None:
    telemetry = telemetry_of(reward=True)
    feed(telemetry, 0)
    assert {"t/obs/batch_shift", "t/reward/clip_fraction"} <= set(telemetry.log([], step=0))
    out = telemetry.log([], step=1)
    assert "t/obs/batch_shift" not in out
    assert "t/reward/clip_fraction" not in out
    assert "t/obs/count" in out


def test_a_final_log_reads_the_interval_without_closing_it() -> None:
    telemetry = telemetry_of()
    feed(telemetry, 0)
    telemetry.log([], step=0)
    feed(telemetry, 1, shift=5.0)
    final = telemetry.log([], step=1, final=True)
    again = telemetry.log([], step=1)
    assert final == again  # same drift, same interval: nothing was consumed


def test_log_if_changed_logs_once_per_step_only_after_changes_and_only_with_loggers() -> None:
    telemetry, recorder = telemetry_of(), Recorder()
    assert not telemetry.log_if_changed([recorder], step=0)  # no data at all
    feed(telemetry, 0)
    assert not telemetry.log_if_changed([], step=0)  # nowhere to write
    assert not telemetry.log_if_changed([recorder], step=-1)  # no step taken yet
    assert telemetry.log_if_changed([recorder], step=0)
    feed(telemetry, 1)
    assert not telemetry.log_if_changed([recorder], step=0)  # logged at this step already
    assert telemetry.log_if_changed([recorder], step=1)
    assert not telemetry.log_if_changed([recorder], step=2)  # unchanged since
    # Another rank changed: the reduced decision logs here too (logging is a collective).
    assert telemetry.log_if_changed([recorder], step=2, any_rank=lambda changed: True)
    assert [step for step, _ in recorder.logged] == [0, 1, 2]


def test_a_restored_telemetry_logs_exactly_what_the_original_logs() -> None:
    original = telemetry_of(reward=True)
    for seed in range(3):
        feed(original, seed, shift=seed)
        original.log([], step=seed)
    feed(original, 3, shift=4.0)  # an open interval
    saved = original.state_dict()
    resumed = telemetry_of(reward=True)
    resumed.normalizers.load_state_dict(original.normalizers.state_dict())
    resumed.load_state_dict(saved)
    for telemetry in (original, resumed):
        feed(telemetry, 4)
    assert resumed.log([], step=4) == original.log([], step=4)
    heatmap = saved["telemetry"]["heatmaps"]["obs"]
    assert heatmap.shape == (2, 3)  # one column per log after the first
    assert saved["telemetry"]["last_logged_step"] == 2


def test_the_interval_saved_with_all_gather_is_that_of_all_ranks_and_rank_zero_resumes_it() -> None:
    telemetry = telemetry_of()
    feed(telemetry, 0)
    local = telemetry.state_dict()["telemetry"]["interval"]["obs"]
    two_ranks = telemetry.state_dict(all_gather=lambda t: torch.stack([t, t]))
    summed = two_ranks["telemetry"]["interval"]["obs"]
    assert summed.tolist() == [local[0].item(), 2 * local[1].item(), 2 * local[2].item()]
    other_rank = telemetry_of()
    other_rank.load_state_dict(two_ranks, is_global_zero=False)
    assert other_rank.state_dict()["telemetry"]["interval"] == {}
    zero = telemetry_of()
    zero.load_state_dict(two_ranks)
    assert torch.equal(zero.state_dict()["telemetry"]["interval"]["obs"], summed)


def test_a_state_without_telemetry_resumes_from_what_its_last_logged_counts_imply() -> None:
    telemetry = telemetry_of()
    feed(telemetry, 0)
    telemetry.log([], step=0)
    older = {"last_logged": telemetry.state_dict()["last_logged"]}  # no "telemetry" entry
    resumed = telemetry_of()
    resumed.normalizers.load_state_dict(telemetry.normalizers.state_dict())
    resumed.load_state_dict(older)
    assert not resumed.log_if_changed([Recorder()], step=5)  # the log counted 16 samples


def test_normalizers_moved_carries_the_open_interval_over() -> None:
    telemetry = telemetry_of()
    feed(telemetry, 0)
    before = telemetry.state_dict()["telemetry"]["interval"]["obs"]
    telemetry.normalizers.to("cpu")
    telemetry.normalizers_moved()
    assert torch.equal(telemetry.state_dict()["telemetry"]["interval"]["obs"], before)
    assert not math.isnan(telemetry.log([], step=0)["t/obs/batch_shift"])


def test_bad_arguments_raise_naming_the_argument() -> None:
    norms = Normalizers(NormalizerConfig(obs_shape=3))
    with pytest.raises(TypeError, match="normalizers"):
        DriftTelemetry(object(), name="t")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="name"):
        DriftTelemetry(norms, name="a b")
    with pytest.raises(TypeError, match="histograms"):
        DriftTelemetry(norms, histograms="yes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="name"):
        check_name(3)


def test_tensorboard_writers_are_the_experiments_of_trainer_and_fabric_tensorboard_loggers(
    tmp_path: Path,
) -> None:
    tensorboard = TensorBoardLogger(tmp_path, name="tb")
    fabric = FabricTensorBoardLogger(tmp_path, name="fabric")
    writers = tensorboard_writers([CSVLogger(tmp_path, name="csv"), tensorboard, fabric])
    assert writers == [tensorboard.experiment, fabric.experiment]
    assert tensorboard_writers([]) == []


def test_histograms_and_heatmaps_go_to_tensorboard_unless_turned_off(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for histograms in (True, False):
        telemetry = telemetry_of()
        telemetry.histograms = histograms
        logger = FabricTensorBoardLogger(tmp_path, name=f"h{histograms}")
        for step in range(2):
            feed(telemetry, step, shift=step)
            telemetry.log([logger], step=step)
        logger.finalize("success")
        events = EventAccumulator(logger.log_dir)
        events.Reload()
        tags = events.Tags()
        assert ("t/obs/mean_hist" in tags["histograms"]) is histograms
        assert ("t/obs/drift_heatmap" in tags["images"]) is histograms
        assert "t/obs/count" in tags["scalars"]


def test_tensor_obs_counts_go_to_the_open_interval_after_moves_and_loads() -> None:
    telemetry = telemetry_of(clip=1.0)
    norms = telemetry.normalizers
    norms.update_obs(torch.randn(16, 3))
    x = torch.full((2, 3), 1e3)  # every value clipped

    def record_step() -> None:  # what the per-step rollout call records
        normalizer, interval = telemetry.tensor_obs()
        assert normalizer is norms.obs["obs"]
        out, clipped = normalizer.normalize(x, return_clipped=True)
        interval.add_clipped(clipped, out.numel())

    record_step()
    saved = telemetry.state_dict()
    telemetry.normalizers.to("cpu")
    telemetry.normalizers_moved()  # the interval's metrics are rebuilt
    record_step()
    assert telemetry.state_dict()["telemetry"]["interval"]["obs"][1:].tolist() == [12.0, 12.0]
    telemetry.load_state_dict(saved)  # and again
    record_step()
    assert telemetry.state_dict()["telemetry"]["interval"]["obs"][1:].tolist() == [12.0, 12.0]
    assert telemetry.log([], step=0)["t/obs/clip_fraction"] == 1.0
