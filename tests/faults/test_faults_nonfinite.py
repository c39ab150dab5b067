"""NaN and Inf storms on every path: the modules, the callback in a real fit, and gloo ranks.

Batches partly and wholly non-finite, in observations and rewards. The statistics must stay
finite and equal those of the finite rows alone, skipped rows must be counted
(``nonfinite_count``) and logged (``<name>/obs/nonfinite_rows``), and ``nonfinite="raise"`` must
raise before anything changes.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning.pytorch import LightningModule
from lightning.pytorch.loggers import Logger
from torch import Tensor, nn
from torch.utils.data import DataLoader

import rlnorm
from conftest import (
    assert_close,
    assert_state_equal,
    init_gloo,
    reference_moments,
    reference_returns,
    state_of,
)
from rlnorm import RewardNormalizer, RunningMeanStd
from rollout_agents import QUIET_LIGHTNING, make_trainer

pytestmark = pytest.mark.filterwarnings(*QUIET_LIGHTNING)

NAN, INF = math.nan, math.inf
F64 = torch.float64


def storm(rows: int, dim: int, seed: int, bad: str, dtype: torch.dtype = F64) -> Tensor:
    """A batch of mean 3, std 2 with a non-finite storm: ``bad`` says which rows are hit.

    ``"partial"``: every third row holds one NaN, +Inf or -Inf (cycling); ``"all-nan"`` /
    ``"all-inf"``: every row; ``"none"``: clean.
    """
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, dim, generator=gen, dtype=F64) * 2 + 3).to(dtype)
    if bad == "all-nan":
        x[:, 0] = NAN
    elif bad == "all-inf":
        x[::2, -1] = INF
        x[1::2, 0] = -INF
    elif bad == "partial":
        poison = [NAN, INF, -INF]
        for k, row in enumerate(range(0, rows, 3)):
            x[row, k % dim] = poison[k % len(poison)]
    return x


def finite_rows(x: Tensor) -> Tensor:
    """The rows rlnorm keeps: finite, with squares that fit float64."""
    wide = x.to(F64)
    return wide[torch.isfinite(wide * wide).all(dim=-1)]


# ---------------------------------------------------------------------------- RunningMeanStd


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("momentum", [None, 0.8], ids=["exact", "ema"])
def test_storms_leave_statistics_equal_to_the_finite_rows_alone_and_count_the_rest(
    dtype: torch.dtype, momentum: float | None
) -> None:
    plan = ["partial", "none", "all-nan", "partial", "all-inf", "partial"]
    rms = RunningMeanStd(3, momentum=momentum)
    ref = RunningMeanStd(3, momentum=momentum)
    kept: list[Tensor] = []
    skipped = 0
    for step, bad in enumerate(plan):
        x = storm(60, 3, step, bad, dtype)
        good = finite_rows(x)
        before = state_of(rms)
        rms.update(x)
        skipped += x.shape[0] - good.shape[0]
        assert int(rms.nonfinite_count) == skipped
        if good.shape[0] == 0:  # a wholly non-finite batch changes nothing but the count
            after = state_of(rms)
            after["nonfinite_count"] = before["nonfinite_count"]
            assert_state_equal(after, before)
            continue
        ref.update(good)
        kept.append(good)
        for key in ("mean", "var"):
            assert bool(torch.isfinite(getattr(rms, key)).all())
            assert_close(getattr(rms, key), getattr(ref, key), rtol=1e-12, atol=1e-12)
    assert int(rms.count) == int(ref.count) == sum(len(k) for k in kept)
    if momentum is None:
        mean, var, _, _ = reference_moments(torch.cat(kept))
        assert_close(rms.mean, mean, rtol=1e-12)
        assert_close(rms.var, var, rtol=1e-10)
    out = rms.normalize(storm(8, 3, 99, "partial", dtype))
    assert out.dtype == dtype
    finite_in = torch.isfinite(storm(8, 3, 99, "partial", dtype).to(F64))
    assert bool(torch.isfinite(out.to(F64))[finite_in].all())


@pytest.mark.parametrize("bad", ["partial", "all-nan", "all-inf"])
@pytest.mark.parametrize("momentum", [None, 0.8], ids=["exact", "ema"])
def test_nonfinite_raise_leaves_the_state_bitwise_unchanged(
    bad: str, momentum: float | None
) -> None:
    rms = RunningMeanStd(3, momentum=momentum, nonfinite="raise")
    rms.update(storm(40, 3, 0, "none"))
    before = state_of(rms)
    with pytest.raises(ValueError, match=r"`x` holds \d+ row\(s\) with NaN or Inf.*not changed"):
        rms.update(storm(40, 3, 1, bad))
    assert_state_equal(state_of(rms), before)


@pytest.mark.parametrize("momentum", [None, 0.8], ids=["exact", "ema"])
def test_a_finite_row_whose_square_overflows_is_skipped_alone(momentum: float | None) -> None:
    x = storm(40, 3, 7, "none")
    x[0, 1] = 1e300  # finite, but its square is not: rlnorm documents such rows as skipped
    rms = RunningMeanStd(3, momentum=momentum)
    rms.update(x)
    assert int(rms.nonfinite_count) == 1
    assert int(rms.count) == 39
    mean, var, _, _ = reference_moments(x[1:])
    assert_close(rms.mean, mean, rtol=1e-12)
    assert_close(rms.var, var, rtol=1e-10)


def test_masked_out_nonfinite_rows_are_neither_used_nor_counted() -> None:
    x = storm(30, 2, 5, "partial")
    mask = torch.isfinite(x).all(dim=1)
    rms = RunningMeanStd(2, nonfinite="raise")
    rms.update(x, mask=mask)  # the masked rows are not data, so they cannot raise
    assert int(rms.nonfinite_count) == 0
    assert int(rms.count) == int(mask.sum())


# ---------------------------------------------------------------------------- RewardNormalizer


def reward_storm(steps: int, envs: int, seed: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    rewards = torch.randn(steps, envs, generator=gen, dtype=F64) + 1
    rewards[1, 0] = NAN
    rewards[2, :] = INF  # a step wholly non-finite
    rewards[4, 2] = -INF
    dones = torch.rand(steps, envs, generator=gen) < 0.2
    return rewards, dones


def rollout_returns(
    rollouts: list[tuple[Tensor, Tensor]], envs: int, gamma: float
) -> tuple[list[float], list[float], int]:
    """Returns fed to the statistics (finite rewards only), the final returns, skipped count."""
    rewards = [row for r, _ in rollouts for row in r.tolist()]
    dones = [row for _, d in rollouts for row in d.tolist()]
    ret, fed, skipped = reference_returns(rewards, dones, gamma, [0.0] * envs)
    return fed, ret, skipped


@pytest.mark.parametrize("mode", ["return", "reward"])
def test_reward_storms_skip_the_bad_rewards_keep_their_returns_and_count_them(mode: str) -> None:
    envs, gamma = 3, 0.9
    norm = RewardNormalizer(envs, gamma=gamma, mode=mode)
    rollouts = [reward_storm(6, envs, seed) for seed in range(3)]
    for rewards, dones in rollouts:
        norm.update(rewards, dones)
    fed, returns, skipped = rollout_returns(rollouts, envs, gamma)
    if mode == "reward":
        fed = [r for rewards, _ in rollouts for r in rewards.reshape(-1).tolist()]
        fed = [r for r in fed if math.isfinite(r)]
    else:
        assert_close(norm.returns, returns, rtol=1e-14)
    assert int(norm.stats.nonfinite_count) == skipped == 3 * (1 + envs + 1)
    assert int(norm.count) == len(fed)
    mean, var, _, _ = reference_moments(torch.tensor(fed, dtype=F64).reshape(-1, 1))
    assert_close(norm.stats.mean, mean[0], rtol=1e-12)
    assert_close(norm.stats.var, var[0], rtol=1e-12)
    scaled = norm.normalize(torch.ones(envs))
    assert bool(torch.isfinite(scaled).all())


def test_reward_raise_leaves_statistics_and_returns_bitwise_unchanged() -> None:
    norm = RewardNormalizer(3, gamma=0.9, nonfinite="raise")
    clean = torch.ones(4, 3, dtype=F64)
    norm.update(clean, torch.zeros(4, 3, dtype=torch.bool))
    before = state_of(norm)
    rewards, dones = reward_storm(6, 3, 0)
    with pytest.raises(ValueError, match="NaN or Inf"):
        norm.update(rewards, dones)
    with pytest.raises(ValueError, match="NaN or Inf"):
        norm.update(torch.full((3,), NAN, dtype=F64), torch.zeros(3, dtype=torch.bool))
    assert_state_equal(state_of(norm), before)


# ---------------------------------------------------------------------------- callback in a fit


class MemoryLogger(Logger):
    """Keeps every logged metric in memory: ``metrics[tag][step] = value``."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: dict[str, dict[int, float]] = {}

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        for tag, value in metrics.items():
            self.metrics.setdefault(tag, {})[int(step or 0)] = float(value)


class StormAgent(LightningModule):
    """Feeds the callback deterministic storm batches: observations and rewards per step."""

    PLAN = ("partial", "none", "all-nan", "partial", "all-inf", "partial")

    def __init__(self, envs: int = 4, clean_rewards: bool = False) -> None:
        super().__init__()
        self.envs = envs
        self.clean_rewards = clean_rewards
        self.layer = nn.Linear(3, 1)
        self.fed_obs: list[Tensor] = []
        self.fed_rewards: list[tuple[Tensor, Tensor]] = []
        self.states: list[dict[str, Tensor]] = []

    def train_dataloader(self) -> DataLoader:
        return DataLoader(range(len(self.PLAN)), batch_size=None)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        norm = rlnorm.get_normalizer(self)
        if norm._telemetry is not None and norm.normalizers.obs:
            self.states.append(state_of(norm.normalizers))
        x = storm(24, 3, batch_idx, self.PLAN[batch_idx], torch.float32)
        rewards, dones = reward_storm(5, self.envs, batch_idx)
        if self.clean_rewards:
            rewards = torch.nan_to_num(rewards, nan=0.0, posinf=1.0, neginf=-1.0)
        self.fed_obs.append(x)
        self.fed_rewards.append((rewards, dones))
        norm.update_obs(x)
        obs = norm.normalize_obs(torch.nan_to_num(x))
        norm.normalize_rewards(rewards, dones)
        return self.layer(obs).pow(2).mean()


def test_callback_in_a_fit_skips_counts_and_logs_nonfinite_rows(tmp_path: Path) -> None:
    callback = rlnorm.NormalizerCallback(reward=True, gamma=0.9, log_every_n_steps=1)
    logger = MemoryLogger()
    agent = StormAgent()
    make_trainer(tmp_path, [callback], max_steps=len(StormAgent.PLAN), logger=logger).fit(agent)

    obs = callback.normalizers.obs["obs"]
    kept = [finite_rows(x) for x in agent.fed_obs]
    skipped = [x.shape[0] - k.shape[0] for x, k in zip(agent.fed_obs, kept, strict=True)]
    mean, var, _, count = reference_moments(torch.cat(kept))
    assert int(obs.count) == count
    assert int(obs.nonfinite_count) == sum(skipped)
    assert_close(obs.mean, mean, rtol=1e-12)
    assert_close(obs.var, var, rtol=1e-10)

    reward = callback.normalizers.reward
    assert reward is not None
    fed, returns, reward_skipped = rollout_returns(agent.fed_rewards, agent.envs, 0.9)
    assert_close(reward.returns, returns, rtol=1e-14)
    assert int(reward.stats.nonfinite_count) == reward_skipped
    ref_mean, ref_var, _, _ = reference_moments(torch.tensor(fed, dtype=F64).reshape(-1, 1))
    assert_close(reward.stats.mean, ref_mean[0], rtol=1e-12)
    assert_close(reward.stats.var, ref_var[0], rtol=1e-12)

    # The running totals of skipped rows are logged at every step.
    logged_obs = logger.metrics["rlnorm/obs/nonfinite_rows"]
    logged_reward = logger.metrics["rlnorm/reward/nonfinite_rows"]
    assert logged_obs == {s: float(sum(skipped[: s + 1])) for s in range(len(skipped))}
    assert logged_reward[len(skipped) - 1] == float(reward_skipped)
    for tag in ("count", "std_min", "std_max", "mean_abs_mean", "drift/kl", "batch_shift"):
        assert all(math.isfinite(v) for v in logger.metrics[f"rlnorm/obs/{tag}"].values()), tag


def test_callback_with_nonfinite_raise_stops_the_fit_before_changing_anything(
    tmp_path: Path,
) -> None:
    callback = rlnorm.NormalizerCallback(reward=True, gamma=0.9, nonfinite="raise")
    agent = StormAgent(clean_rewards=True)
    agent.PLAN = ("none", "none", "all-nan")  # type: ignore[misc]
    with pytest.raises(ValueError, match="NaN or Inf"):
        make_trainer(tmp_path, [callback], max_steps=3).fit(agent)
    # Step 2's observations raised: the state is the one step 2 started from.
    assert len(agent.states) == 2
    assert_state_equal(state_of(callback.normalizers), agent.states[-1])


# ---------------------------------------------------------------------------- gloo ranks

WORLD = 2
#: Per update, each rank's storm kind: ranks disagree, and one update is bad everywhere.
DIST_PLAN = {
    0: ["partial", "all-nan", "all-inf", "none"],
    1: ["none", "partial", "all-nan", "partial"],
}


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    init_gloo(rank, init_file, WORLD)
    try:
        results: dict[str, Any] = {}
        for name, momentum in (("exact", None), ("ema", 0.7)):
            rms = RunningMeanStd(3, momentum=momentum)
            for step, bad in enumerate(DIST_PLAN[rank]):
                rms.update(storm(20 + 30 * rank, 3, 100 * rank + step, bad))
            results[name] = state_of(rms)
        reward = RewardNormalizer(3, gamma=0.9)
        for seed in range(2):
            reward.update(*reward_storm(6, 3, 10 * rank + seed))
        results["reward"] = state_of(reward)
        strict = RewardNormalizer(3, gamma=0.9, nonfinite="raise")
        strict.update(torch.ones(3, dtype=F64), torch.zeros(3, dtype=torch.bool))
        before = state_of(strict)
        bad = torch.full((3,), NAN if rank == 0 else 1.0, dtype=F64)  # NaN on rank 0 only
        try:
            strict.update(bad, torch.zeros(3, dtype=torch.bool))
            results["strict_raised"] = False
        except ValueError:
            results["strict_raised"] = True
        results["strict_unchanged"] = all(
            torch.equal(v, state_of(strict)[k]) for k, v in before.items()
        )
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("dist-storm")
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(
        _worker, args=(str(tmp / "store"), str(tmp)), nprocs=WORLD, join=True, start_method=method
    )
    return [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["exact", "ema"])
def test_storms_on_gloo_ranks_keep_them_identical_and_equal_to_the_finite_union(
    ranks: list[dict], name: str
) -> None:
    first, second = ranks[0][name], ranks[1][name]
    assert_state_equal(first, second)
    ref = RunningMeanStd(3, momentum=None if name == "exact" else 0.7)
    skipped = 0
    for step in range(len(DIST_PLAN[0])):
        xs = [storm(20 + 30 * r, 3, 100 * r + step, DIST_PLAN[r][step]) for r in range(WORLD)]
        union = torch.cat(xs)
        good = finite_rows(union)
        skipped += union.shape[0] - good.shape[0]
        if good.shape[0]:
            ref.update(good)
    assert int(first["nonfinite_count"]) == skipped
    assert int(first["count"]) == int(ref.count)
    for key in ("mean", "var", "weight_sum"):
        assert_close(first[key], getattr(ref, key), rtol=1e-12)
        assert bool(torch.isfinite(first[key]).all())


@pytest.mark.distributed
def test_reward_storms_on_gloo_ranks_share_statistics_and_raise_together(
    ranks: list[dict],
) -> None:
    shared = [{k: v for k, v in r["reward"].items() if k != "returns"} for r in ranks]
    assert_state_equal(shared[0], shared[1])
    fed: list[float] = []
    skipped = 0
    for rank, result in enumerate(ranks):
        rollouts = [reward_storm(6, 3, 10 * rank + seed) for seed in range(2)]
        rank_fed, returns, rank_skipped = rollout_returns(rollouts, 3, 0.9)
        assert_close(result["reward"]["returns"], returns, rtol=1e-14)
        fed += rank_fed
        skipped += rank_skipped
    assert int(shared[0]["stats.nonfinite_count"]) == skipped
    mean, var, _, _ = reference_moments(np.array(fed).reshape(-1, 1))
    assert_close(shared[0]["stats.mean"], mean[0], rtol=1e-12)
    assert_close(shared[0]["stats.var"], var[0], rtol=1e-12)
    # A NaN on rank 0 only: both ranks raise (they share the reduced sums), nothing changes.
    assert all(r["strict_raised"] for r in ranks)
    assert all(r["strict_unchanged"] for r in ranks)
