"""NormalizerCallback under a real two-process DDP ``Trainer`` on the CPU (gloo)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import rlnorm
from conftest import assert_close, run_ddp_script
from rlnorm import RunningMeanStd
from rollout_agents import QUIET_LIGHTNING

SCRIPT = Path(__file__).resolve().parents[1] / "ddp_fit.py"
OBS_DIM, BASE_ENVS, EXTRA_ENVS_PER_RANK, ROLLOUT_LEN, MAX_STEPS, GAMMA = 4, 5, 37, 2, 6, 0.95


def _returns(rewards: torch.Tensor, dones: torch.Tensor, carry: torch.Tensor) -> torch.Tensor:
    """Discounted running returns fed to the reward statistics, per step; updates ``carry``."""
    out = torch.empty(rewards.shape, dtype=torch.float64)
    for t in range(rewards.shape[0]):
        carry.mul_(GAMMA).add_(rewards[t].double())
        out[t] = carry
        carry.masked_fill_(dones[t], 0.0)
    return out


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    outdir = tmp_path_factory.mktemp("ddp")
    proc = run_ddp_script(SCRIPT, str(outdir), timeout=120)
    run = {"outdir": outdir, "proc": proc}
    run["ranks"] = [_load(run, f"rank{r}.pt") for r in range(2)]
    return run


def _load(run: dict, name: str) -> Any:
    path = run["outdir"] / name
    proc = run["proc"]
    assert path.is_file(), (
        f"ddp_fit.py wrote no {name} (exit code {proc.returncode}):\n"
        f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    )
    return torch.load(path, weights_only=True)


pytestmark = [
    pytest.mark.distributed,
    pytest.mark.slow,
    pytest.mark.filterwarnings(*QUIET_LIGHTNING),
]


def test_ranks_fed_uneven_data(ddp_run: dict) -> None:
    ranks = ddp_run["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["world_size"] == 2 for r in ranks)
    for r, rank in enumerate(ranks):
        rows = BASE_ENVS + EXTRA_ENVS_PER_RANK * r
        assert rank["num_envs"] == rows
        assert len(rank["obs_updates"]) == MAX_STEPS * ROLLOUT_LEN
        assert all(x.shape == (rows, OBS_DIM) for _, x in rank["obs_updates"])
    assert not torch.equal(ranks[0]["obs_updates"][0][1][:5], ranks[1]["obs_updates"][0][1][:5])


def test_ranks_hold_bitwise_identical_statistics(ddp_run: dict) -> None:
    first, second = (r["state"] for r in ddp_run["ranks"])
    shared = [k for k in first if k.startswith(("obs.", "reward.stats."))]
    assert len(shared) == 12  # 6 buffers of each RunningMeanStd
    for key in shared:
        assert first[key].dtype == second[key].dtype
        assert torch.equal(first[key], second[key]), f"{key}: {first[key]} != {second[key]}"
    # The per-environment returns are each rank's own (their environments differ).
    assert first["reward.returns"].shape == (BASE_ENVS,)
    assert second["reward.returns"].shape == (BASE_ENVS + EXTRA_ENVS_PER_RANK,)


def test_statistics_equal_one_process_fed_the_union(ddp_run: dict) -> None:
    ranks = ddp_run["ranks"]
    ref_obs = RunningMeanStd(OBS_DIM)
    for updates in zip(*(r["obs_updates"] for r in ranks), strict=True):
        assert len({step for step, _ in updates}) == 1
        ref_obs.update(torch.cat([x for _, x in updates]))
    state = ranks[0]["state"]
    total_rows = MAX_STEPS * ROLLOUT_LEN * (2 * BASE_ENVS + EXTRA_ENVS_PER_RANK)
    assert int(state["obs.obs.count"]) == int(ref_obs.count) == total_rows
    assert_close(state["obs.obs.mean"], ref_obs.mean, rtol=1e-12)
    assert_close(state["obs.obs.var"], ref_obs.var, rtol=1e-12)

    ref_reward = RunningMeanStd(())
    carries = [torch.zeros(r["num_envs"], dtype=torch.float64) for r in ranks]
    for updates in zip(*(r["reward_updates"] for r in ranks), strict=True):
        trajectories = [
            _returns(rewards, dones, carry)
            for (_, rewards, dones), carry in zip(updates, carries, strict=True)
        ]
        ref_reward.update(torch.cat([t.reshape(-1) for t in trajectories]))
    assert int(state["reward.stats.count"]) == total_rows
    assert_close(state["reward.stats.mean"], ref_reward.mean, rtol=1e-12)
    assert_close(state["reward.stats.var"], ref_reward.var, rtol=1e-12)
    for rank, carry in zip(ranks, carries, strict=True):
        assert_close(rank["state"]["reward.returns"], carry, rtol=1e-12)


def test_only_rank_zero_writes_tensorboard_events_with_the_reduced_figures(ddp_run: dict) -> None:
    outdir: Path = ddp_run["outdir"]
    files = sorted(outdir.rglob("events.out.tfevents.*"))
    assert len(files) == 1, files
    events = EventAccumulator(str(files[0]), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    counts = {e.step: e.value for e in events.Scalars("rlnorm/obs/count")}
    union_rows = ROLLOUT_LEN * (2 * BASE_ENVS + EXTRA_ENVS_PER_RANK)
    # Every 2 steps, and at the end of the first 3-step epoch (the second ends at a logged step).
    assert counts == {s: union_rows * (s + 1) for s in (1, 2, 3, 5)}
    for tag in ("batch_shift", "clip_fraction", "drift/kl"):
        assert f"rlnorm/obs/{tag}" in events.Tags()["scalars"]
    assert "rlnorm/obs/mean_hist" in events.Tags()["histograms"]


def test_checkpoint_written_under_ddp_loads_the_shared_statistics(ddp_run: dict) -> None:
    norms = rlnorm.load_normalizers(ddp_run["outdir"] / "final.ckpt")
    state = ddp_run["ranks"][0]["state"]
    for key, value in norms.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_ddp_resume_ends_bitwise_equal_to_an_uninterrupted_run_on_every_rank(
    ddp_run: dict,
) -> None:
    results = [_load(ddp_run, f"resume{r}.pt") for r in range(2)]
    assert ddp_run["proc"].returncode == 0, ddp_run["proc"].stderr[-4000:]
    # Not vacuous: at the checkpoint each rank's environments had their own running returns.
    assert not torch.equal(
        results[0]["half"]["reward.returns"], results[1]["half"]["reward.returns"]
    )
    for rank, result in enumerate(results):
        for key, value in result["uninterrupted"].items():
            assert torch.equal(value, result["resumed"][key]), (
                f"rank {rank}, {key}: uninterrupted {value} != resumed {result['resumed'][key]}"
            )


def test_state_dict_called_on_rank_zero_alone_returns_promptly_with_its_own_returns(
    ddp_run: dict,
) -> None:
    record = _load(ddp_run, "one_rank.pt")
    assert record["returned"], (
        f"rank 0's state_dict() did not return within {record['seconds']:.0f} s while rank 1 "
        "ran no collective: it waits for the other ranks"
    )
    assert record["error"] is None
    assert record["seconds"] < 5.0
    assert "reward_returns_by_rank" not in record["keys"]  # added only in checkpoints
    assert torch.equal(record["returns"], record["own_returns"])


def test_ddp_checkpoint_holds_every_ranks_own_reward_returns(ddp_run: dict) -> None:
    checkpoint = torch.load(ddp_run["outdir"] / "final.ckpt", weights_only=True)
    (state,) = [
        value for value in checkpoint["callbacks"].values() if "reward_returns_by_rank" in value
    ]
    by_rank = state["reward_returns_by_rank"]
    assert len(by_rank) == 2
    for rank, returns in zip(ddp_run["ranks"], by_rank, strict=True):
        assert returns.shape == (rank["num_envs"],)
        assert torch.equal(returns, rank["state"]["reward.returns"])
    # The reduced telemetry interval travels with it.
    assert set(state["telemetry"]["interval"]) == {"obs", "reward"}
