"""``FabricNormalizers`` in Lightning Fabric loops: rollout API, telemetry, checkpoints, DDP."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.fabric import Fabric
from lightning.fabric.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import rlnorm
from conftest import assert_close, assert_state_equal, run_ddp_script, state_of
from rlnorm.cli import describe_checkpoint, format_report

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "fabric_ddp.py"


def fabric_with_loggers(root: Path) -> Fabric:
    loggers = [TensorBoardLogger(str(root), name="tb"), CSVLogger(str(root), name="csv")]
    return Fabric(accelerator="cpu", devices=1, loggers=loggers)


def rollout(norm: rlnorm.FabricNormalizers, seed: int, steps: int = 4) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        obs = torch.randn(8, 3, generator=gen) * 4 + 2
        norm.update_obs(obs)
        norm.normalize_obs(obs)
        norm.normalize_rewards(torch.randn(8, generator=gen), torch.rand(8, generator=gen) < 0.2)


def test_rollout_api_matches_normalizers_fed_the_same_stream() -> None:
    fabric = Fabric(accelerator="cpu", devices=1)
    norm = rlnorm.FabricNormalizers(fabric, reward=True, gamma=0.9)
    rollout(norm, seed=0)
    plain = rlnorm.Normalizers(rlnorm.NormalizerConfig(reward=True, gamma=0.9))
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        obs = torch.randn(8, 3, generator=gen) * 4 + 2
        plain.update_obs(obs)
        plain.normalize_rewards(torch.randn(8, generator=gen), torch.rand(8, generator=gen) < 0.2)
    assert_state_equal(state_of(norm.normalizers), state_of(plain))


def test_normalize_obs_of_tensors_and_arrays_matches_normalizers_and_counts_clips() -> None:
    # Tensors take a shortcut past `Normalizers.normalize_obs_counting_clipped`; NumPy arrays go
    # the general way. Both must give what the normalizers give, and count the same clipping.
    fabric = Fabric(accelerator="cpu", devices=1)
    by_tensor = rlnorm.FabricNormalizers(fabric, clip=1.5)
    by_numpy = rlnorm.FabricNormalizers(fabric, clip=1.5)
    gen = torch.Generator().manual_seed(3)
    first = torch.randn(64, 3, generator=gen) * 4 + 2
    for norm in (by_tensor, by_numpy):
        norm.update_obs(first)
    plain = rlnorm.Normalizers(rlnorm.NormalizerConfig(clip=1.5))
    plain.update_obs(first)
    for _ in range(3):
        obs = torch.randn(16, 3, generator=gen) * 8 + 2
        expected, counts = plain.normalize_obs_counting_clipped(obs)
        assert torch.equal(by_tensor.normalize_obs(obs), expected)
        assert torch.equal(by_numpy.normalize_obs(obs.numpy()), expected)
    assert int(counts["obs"][0]) > 0  # the clamp did cut values
    fraction = [
        n.telemetry.log([], step=0)["rlnorm/obs/clip_fraction"] for n in (by_tensor, by_numpy)
    ]
    assert fraction[0] == fraction[1] > 0


def test_frozen_normalizers_ignore_updates_and_keep_normalizing() -> None:
    norm = rlnorm.FabricNormalizers(Fabric(accelerator="cpu", devices=1), obs_shape=3, reward=True)
    rollout(norm, seed=1, steps=1)
    before = state_of(norm.normalizers)
    norm.freeze()
    norm.update_obs(torch.randn(5, 3) * 100)
    assert_state_equal(state_of(norm.normalizers), before)
    norm.unfreeze()
    norm.update_obs(torch.randn(5, 3))
    assert int(norm.normalizers.obs.count) == 8 + 5


def test_log_writes_the_callbacks_tags_to_every_fabric_logger_at_the_given_step(
    tmp_path: Path,
) -> None:
    fabric = fabric_with_loggers(tmp_path)
    norm = rlnorm.FabricNormalizers(fabric, reward=True)
    rollout(norm, seed=2)
    norm.log(step=32)
    rollout(norm, seed=3)
    figures = norm.log(step=64)
    for logger in fabric.loggers:
        logger.finalize("success")
    assert figures["rlnorm/obs/count"] == 64.0
    events = EventAccumulator(str(tmp_path / "tb" / "version_0"), size_guidance={"images": 0})
    events.Reload()
    scalars = events.Tags()["scalars"]
    for tag in ("rlnorm/obs/count", "rlnorm/obs/drift/kl", "rlnorm/reward/std_max"):
        assert tag in scalars
    assert [e.step for e in events.Scalars("rlnorm/obs/count")] == [32, 64]
    assert [e.value for e in events.Scalars("rlnorm/obs/count")] == [32.0, 64.0]
    assert "rlnorm/obs/drift_heatmap" in events.Tags()["images"]
    assert "rlnorm/obs/mean_hist" in events.Tags()["histograms"]
    csv = next((tmp_path / "csv").rglob("metrics.csv")).read_text()
    assert "rlnorm/obs/count" in csv.splitlines()[0]


def test_fabric_save_and_load_resume_statistics_and_telemetry_bitwise(tmp_path: Path) -> None:
    fabric = Fabric(accelerator="cpu", devices=1)
    straight = rlnorm.FabricNormalizers(fabric, reward=True)
    rollout(straight, seed=4)
    straight.log(step=32)
    rollout(straight, seed=5, steps=2)  # an open interval at the save
    path = tmp_path / "fabric.ckpt"
    fabric.save(path, {"rlnorm": straight, "step": 48})
    resumed = rlnorm.FabricNormalizers(fabric, reward=True)
    remainder = fabric.load(path, {"rlnorm": resumed})
    assert remainder == {"step": 48}
    assert_state_equal(state_of(resumed.normalizers), state_of(straight.normalizers))
    rollout(straight, seed=6)
    rollout(resumed, seed=6)
    assert_state_equal(state_of(resumed.normalizers), state_of(straight.normalizers))
    assert resumed.log(step=96) == straight.log(step=96)


def test_load_normalizers_and_inspect_read_a_fabric_checkpoint(tmp_path: Path) -> None:
    fabric = Fabric(accelerator="cpu", devices=1)
    norm = rlnorm.FabricNormalizers(fabric, reward=True, name="agent")
    rollout(norm, seed=7)
    path = tmp_path / "fabric.ckpt"
    fabric.save(path, {"model": torch.nn.Linear(3, 2), "normalizers": norm})
    loaded = rlnorm.load_normalizers(path)
    assert loaded.frozen
    assert_state_equal(state_of(loaded), state_of(norm.normalizers))
    report = describe_checkpoint(str(path))
    assert list(report["normalizers"]) == ["agent"]
    assert format_report(report).splitlines()[0] == f"checkpoint {path}"


def test_load_normalizers_on_a_fabric_checkpoint_without_them_says_so(tmp_path: Path) -> None:
    fabric = Fabric(accelerator="cpu", devices=1)
    path = tmp_path / "plain.ckpt"
    fabric.save(path, {"model": torch.nn.Linear(3, 2), "step": 5})
    with pytest.raises(ValueError, match=r"no rlnorm normalizer state.*\['model', 'step'\]"):
        rlnorm.load_normalizers(path)


def test_from_normalizers_copies_migrated_statistics() -> None:
    source = rlnorm.Normalizers(rlnorm.NormalizerConfig(reward=True, gamma=0.95))
    source.update_obs(torch.randn(16, 3) + 5)
    source.normalize_rewards(torch.ones(4), torch.zeros(4, dtype=torch.bool))
    norm = rlnorm.FabricNormalizers.from_normalizers(Fabric(accelerator="cpu", devices=1), source)
    assert norm.config.gamma == 0.95
    assert_state_equal(state_of(norm.normalizers), state_of(source))
    norm.update_obs(torch.randn(4, 3))
    assert int(source.obs.count) == 16  # copied, not shared


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"fabric": "cpu"}, TypeError, "`fabric` must be a lightning.fabric.Fabric"),
        ({"gama": 0.9}, TypeError, r"unknown setting\(s\) \['gama'\]"),
        ({"name": "two words"}, ValueError, "`name`"),
        ({"gamma": 2.0}, ValueError, "`gamma`"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs: dict, error: type, match: str) -> None:
    fabric = kwargs.pop("fabric", None) or Fabric(accelerator="cpu", devices=1)
    with pytest.raises(error, match=match):
        rlnorm.FabricNormalizers(fabric, **kwargs)


@pytest.fixture(scope="module")
def ddp_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    outdir = tmp_path_factory.mktemp("fabric_ddp")
    proc = run_ddp_script(SCRIPT, str(outdir), timeout=180)
    ranks = []
    for rank in range(2):
        path = outdir / f"rank{rank}.pt"
        assert path.is_file(), f"exit {proc.returncode}:\n{proc.stderr[-4000:]}"
        ranks.append(torch.load(path, weights_only=True))
    ranks[0]["outdir"] = outdir
    return ranks


@pytest.mark.distributed
def test_fabric_ddp_ranks_with_uneven_batches_hold_bitwise_identical_statistics(
    ddp_ranks: list[dict[str, Any]],
) -> None:
    import fabric_ddp

    shared = [{k: v for k, v in r["state"].items() if k != "reward.returns"} for r in ddp_ranks]
    assert_state_equal(shared[0], shared[1])
    union = torch.cat(
        [fabric_ddp.rank_data(rank, step)[0] for step in range(5) for rank in range(2)]
    ).double()
    assert int(shared[0]["obs.obs.count"]) == union.shape[0] == 5 * 9
    assert_close(shared[0]["obs.obs.mean"], union.mean(0), rtol=1e-12)
    assert_close(shared[0]["obs.obs.var"], union.var(0, unbiased=False), rtol=1e-12)
    assert ddp_ranks[0]["figures"] == ddp_ranks[1]["figures"]  # reduced over the ranks


@pytest.mark.distributed
def test_fabric_ddp_save_and_load_give_each_rank_its_own_reward_returns(
    ddp_ranks: list[dict[str, Any]],
) -> None:
    for rank in ddp_ranks:
        assert_state_equal(rank["loaded"], rank["state"])
        assert rank["remainder"] == {"env_steps": 45}
    assert not torch.equal(
        ddp_ranks[0]["state"]["reward.returns"], ddp_ranks[1]["state"]["reward.returns"]
    )
    saved = torch.load(ddp_ranks[0]["outdir"] / "state.ckpt", weights_only=True)["rlnorm"]
    assert len(saved["reward_returns_by_rank"]) == 2
    events = EventAccumulator(str(ddp_ranks[0]["outdir"] / "logs" / "fabric" / "version_0"))
    events.Reload()
    assert [e.step for e in events.Scalars("rlnorm/obs/count")] == [18, 36, 45]


# ---------------------------------------------------------------------------- decoupled


def _decoupled_worker(rank: int, init_file: str, out_dir: str) -> None:
    """Rank 0 plays (updates alone), ranks 1 and 2 train: they get its statistics by broadcast."""
    import torch.distributed as dist

    from conftest import init_gloo

    init_gloo(rank, init_file, 3)
    try:
        # Each process has its own one-process Fabric (as in Lightning's decoupled example, the
        # player's is not part of the trainers' DDP): nothing here may be a collective over the
        # world group, or the player would wait for the trainers forever.
        fabric = Fabric(accelerator="cpu", devices=1)
        norm = rlnorm.FabricNormalizers(fabric, reward=True, gamma=0.9)
        probe = torch.linspace(-3, 3, 12).reshape(4, 3)
        outputs = []
        for round_ in range(2):
            if rank == 0:
                rollout(norm, seed=10 + round_)
                norm.log(step=32 * (round_ + 1))  # the player logs alone
            norm.broadcast(src=0)
            outputs.append(norm.normalize_obs(probe))
        # The trainers can also keep statistics of their own, reduced over their group only
        # (the player, outside it, runs no matching collective).
        trainers = dist.new_group([1, 2])  # every rank takes part in creating a group
        learned: dict[str, Any] = {}
        if rank > 0:
            own = rlnorm.FabricNormalizers(fabric, process_group=trainers, sync=True)
            own.update_obs(torch.full((rank, 3), float(rank)))  # 1 row of 1s, 2 rows of 2s
            learned = {"figures": own.log(step=3), "state": state_of(own.normalizers)}
        torch.save(
            {"state": state_of(norm.normalizers), "outputs": outputs, "learned": learned},
            Path(out_dir) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_decoupled_player_broadcasts_its_statistics_to_the_trainers(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(
        _decoupled_worker,
        args=(str(tmp_path / "store"), str(tmp_path)),
        nprocs=3,
        join=True,
        start_method=method,
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(3)]
    player = ranks[0]
    assert int(player["state"]["obs.obs.count"]) == 2 * 4 * 8  # two rounds of its own data only
    for trainer in ranks[1:]:
        assert_state_equal(trainer["state"], player["state"])
        for got, want in zip(trainer["outputs"], player["outputs"], strict=True):
            assert torch.equal(got, want)
    assert not torch.equal(player["outputs"][0], player["outputs"][1])  # the player moved on
    learned = [r["learned"] for r in ranks[1:]]
    assert_state_equal(learned[0]["state"], learned[1]["state"])
    assert int(learned[0]["state"]["obs.obs.count"]) == 3
    assert_close(learned[0]["state"]["obs.obs.mean"], [5 / 3] * 3, rtol=1e-15)
    assert learned[0]["figures"] == learned[1]["figures"]
