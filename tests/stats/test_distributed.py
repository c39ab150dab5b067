"""Statistics reduced over real ``torch.distributed`` processes (gloo on the CPU).

Two processes are started once per module (``torch.multiprocessing``); each runs every
scenario and saves its results. The tests then compare ranks with each other and with one
process fed the union of the data.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import assert_close, init_gloo, reference_moments, state_of
from rlnorm import RewardNormalizer, RunningMeanStd
from rlnorm.algebra.moments import batch_shift, shifted_sums
from rlnorm.stats.distributed import agree_shift, all_reduce_sums, is_distributed

pytestmark = pytest.mark.distributed

WORLD = 2
F64 = torch.float64
#: rows per update on each rank: deliberately uneven, including a rank with no rows at all.
ROWS = {0: [7, 3, 0, 40, 1], 1: [300, 13, 25, 0, 250]}
NUM_ENVS = {0: 3, 1: 3}


def rms_batches(rank: int) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Each rank's (batch, mask) per update: mean 1e3, std 1, a NaN row, a masked row."""
    out = []
    for step, rows in enumerate(ROWS[rank]):
        gen = torch.Generator().manual_seed(1000 * rank + step)
        x = torch.randn(rows, 2, generator=gen, dtype=F64) * torch.tensor([1.0, 0.01]) + 1e3
        mask = None
        if rank == 1 and step == 0:
            x[5, 1] = math.nan
            x[17, 0] = math.inf
        if rank == 0 and step == 0:
            mask = torch.ones(rows, dtype=torch.bool)
            mask[2] = False
        out.append((x, mask))
    return out


def union_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """What one process sees when fed both ranks' batches of each update together."""
    merged = []
    for pair in zip(rms_batches(0), rms_batches(1), strict=True):
        xs = [x for x, _ in pair]
        masks = [torch.ones(x.shape[0], dtype=torch.bool) if m is None else m for x, m in pair]
        merged.append((torch.cat(xs), torch.cat(masks)))
    return merged


def reward_rollouts(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for step in range(3):
        gen = torch.Generator().manual_seed(5000 + 100 * rank + step)
        rewards = torch.randn(6, NUM_ENVS[rank], generator=gen, dtype=F64) + 3.0 * rank
        dones = torch.rand(6, NUM_ENVS[rank], generator=gen) < 0.25
        out.append((rewards, dones))
    return out


def local_returns(rank: int, gamma: float) -> tuple[torch.Tensor, list[float]]:
    ret = [0.0] * NUM_ENVS[rank]
    fed: list[float] = []
    for rewards, dones in reward_rollouts(rank):
        for r_t, d_t in zip(rewards.tolist(), dones.tolist(), strict=True):
            for env, (r, d) in enumerate(zip(r_t, d_t, strict=True)):
                ret[env] = ret[env] * gamma + r
                fed.append(ret[env])
                if d:
                    ret[env] = 0.0
    return torch.tensor(ret, dtype=F64), fed


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    init_gloo(rank, init_file, WORLD)
    try:
        results: dict[str, object] = {"is_distributed": is_distributed()}

        exact = RunningMeanStd(2)
        ema = RunningMeanStd(2, momentum=0.7)
        local = RunningMeanStd(2, sync=False)
        until = RunningMeanStd(2, until=100)
        for x, mask in rms_batches(rank):
            exact.update(x, mask=mask)
            ema.update(x, mask=mask)
            local.update(x, mask=mask)
            until.update(x, mask=mask)
        results["exact"] = exact.state_dict()
        results["ema"] = ema.state_dict()
        results["local"] = local.state_dict()
        results["until"] = until.state_dict()

        reward = RewardNormalizer(NUM_ENVS[rank], gamma=0.9)
        for rewards, dones in reward_rollouts(rank):
            reward.update(rewards, dones)
        results["reward"] = reward.state_dict()

        # nonfinite="raise": the rank without bad rows must raise too (same reduced sums).
        strict = RunningMeanStd(2, nonfinite="raise")
        x = torch.ones(4, 2, dtype=F64) * (rank + 1)
        if rank == 1:
            x[0, 0] = math.nan
        try:
            strict.update(x)
            results["strict_raised"] = False
        except ValueError:
            results["strict_raised"] = True
        results["strict"] = strict.state_dict()

        # Moves, loads and resets on one rank only: the collectives of later updates must still
        # pair up (before, such a rank alone agreed a shift again: a collective mismatch).
        results["one_rank_acts"] = {}
        for action in ("cpu", "to", "load", "reset"):
            norm = RunningMeanStd(2)
            x, mask = rms_batches(rank)[1]
            norm.update(x, mask=mask)
            if rank == 0:
                if action == "cpu":
                    norm.cpu()
                elif action == "to":
                    norm.to("cpu", dtype=torch.float16)
                elif action == "load":
                    norm.load_state_dict(norm.state_dict())
                else:
                    norm.reset()
            for x, mask in rms_batches(rank)[3:]:
                norm.update(x, mask=mask)
            results["one_rank_acts"][action] = norm.state_dict()

        # Dict observations whose ranks list the keys in different orders (and normalizers built
        # from configs listing them in different orders) reduce each key with its own key.
        from rlnorm import NormalizerConfig, Normalizers

        inferred = Normalizers(NormalizerConfig())
        shapes = {"zero": 2, "hundred": 2} if rank == 0 else {"hundred": 2, "zero": 2}
        configured = Normalizers(NormalizerConfig(obs_shape=shapes))
        gen = torch.Generator().manual_seed(rank)
        zero = torch.randn(8 + rank, 2, generator=gen, dtype=F64)
        hundred = 100.0 + torch.randn(8 + rank, 2, generator=gen, dtype=F64)
        obs = (
            {"zero": zero, "hundred": hundred} if rank == 0 else {"hundred": hundred, "zero": zero}
        )
        for norms in (inferred, configured):
            for _ in range(2):
                norms.update_obs(obs)
        results["dict_inferred"] = inferred.state_dict()
        results["dict_configured"] = configured.state_dict()

        # The primitives: an agreed shift is identical everywhere, sums add up over ranks.
        xs = torch.full((3, 2), float(rank + 1), dtype=F64)
        shift = agree_shift(batch_shift(xs, None), torch.tensor(3.0, dtype=F64))
        sums = all_reduce_sums(shifted_sums(xs, None, shift))
        results["shift"] = shift
        results["sums_weight"] = sums.weight
        results["sums_count"] = sums.count
        results["sums_sum"] = sums.sum
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("dist")
    init_file = str(tmp / "store")  # FileStore: no TCP port to race for
    # fork where available: spawned children would spend ~15 s each re-importing torch and
    # lightning (via `import rlnorm`) on a small machine; the workers are the same either way.
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(
        _worker, args=(init_file, str(tmp)), nprocs=WORLD, join=True, start_method=method
    )
    return [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def assert_bitwise_equal_states(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key}: {a[key]} != {b[key]}"


def single_process(module: RunningMeanStd) -> dict:
    for x, mask in union_batches():
        module.update(x, mask=mask)
    return state_of(module)


def assert_state_close(got: dict, want: dict, rtol: float = 1e-12) -> None:
    assert torch.equal(got["count"], want["count"])
    assert torch.equal(got["nonfinite_count"], want["nonfinite_count"])
    assert_close(got["weight_sum"], want["weight_sum"], rtol=rtol)
    assert_close(got["mean"], want["mean"], rtol=rtol)
    assert_close(got["var"], want["var"], rtol=rtol)


def test_spawned_ranks_see_an_initialized_multi_process_group(ranks: list[dict]) -> None:
    assert all(r["is_distributed"] for r in ranks)


@pytest.mark.parametrize("name", ["exact", "ema", "until", "reward", "strict"])
def test_synchronised_statistics_are_bitwise_identical_on_every_rank(
    ranks: list[dict], name: str
) -> None:
    states = [r[name] for r in ranks]
    if name == "reward":  # per-env returns are each rank's own; the statistics are shared
        states = [{k: v for k, v in s.items() if k != "returns"} for s in states]
    assert_bitwise_equal_states(states[0], states[1])


def test_uneven_ranks_equal_one_process_fed_the_union_within_1e12(ranks: list[dict]) -> None:
    want = single_process(RunningMeanStd(2))
    assert_state_close(ranks[0]["exact"], want)
    assert int(want["count"]) == sum(sum(r) for r in ROWS.values()) - 1 - 2  # masked, NaN, Inf
    assert int(want["nonfinite_count"]) == 2
    union = torch.cat([x[m] for x, m in union_batches()])
    mean, var, _, _ = reference_moments(union)
    assert_close(ranks[0]["exact"]["mean"], mean, rtol=1e-14)
    assert_close(ranks[1]["exact"]["var"], var, rtol=1e-9)


def test_uneven_ranks_in_ema_mode_equal_one_process_fed_the_union(ranks: list[dict]) -> None:
    want = single_process(RunningMeanStd(2, momentum=0.7))
    assert_state_close(ranks[1]["ema"], want)


def test_until_stops_all_ranks_together_after_the_crossing_update(ranks: list[dict]) -> None:
    want = single_process(RunningMeanStd(2, until=100))
    # the first union update has 7 + 300 rows, minus 3 left out: crosses 100 at once
    assert int(ranks[0]["until"]["count"]) == int(want["count"]) == 304
    assert_state_close(ranks[0]["until"], want)


def test_sync_false_keeps_per_rank_statistics(ranks: list[dict]) -> None:
    for rank, result in enumerate(ranks):
        want = RunningMeanStd(2)
        for x, mask in rms_batches(rank):
            want.update(x, mask=mask)
        assert_bitwise_equal_states(result["local"], state_of(want))
    assert not torch.equal(ranks[0]["local"]["mean"], ranks[1]["local"]["mean"])
    assert int(ranks[0]["local"]["count"]) != int(ranks[1]["local"]["count"])


def test_reward_normalizer_shares_statistics_but_keeps_per_rank_returns(
    ranks: list[dict],
) -> None:
    fed_all: list[float] = []
    for rank, result in enumerate(ranks):
        returns, fed = local_returns(rank, 0.9)
        assert_close(result["reward"]["returns"], returns, rtol=1e-14)
        fed_all += fed
    assert not torch.equal(ranks[0]["reward"]["returns"], ranks[1]["reward"]["returns"])
    stats = ranks[0]["reward"]
    assert int(stats["stats.count"]) == len(fed_all)
    mean, var, _, _ = reference_moments(torch.tensor(fed_all, dtype=F64).reshape(-1, 1))
    assert_close(stats["stats.mean"], mean[0], rtol=1e-12)
    assert_close(stats["stats.var"], var[0], rtol=1e-12)


def test_nonfinite_raise_raises_on_every_rank_and_changes_nothing(ranks: list[dict]) -> None:
    fresh = state_of(RunningMeanStd(2))
    for result in ranks:
        assert result["strict_raised"]
        assert_bitwise_equal_states(result["strict"], fresh)


def test_primitives_agree_on_shift_and_sum_over_ranks(ranks: list[dict]) -> None:
    for result in ranks:
        assert_close(result["shift"], [1.5, 1.5], rtol=1e-15)
        assert float(result["sums_weight"]) == 6.0
        assert int(result["sums_count"]) == 6
        # rank 0 sums (1 - 1.5) * 3, rank 1 sums (2 - 1.5) * 3: zero in total
        assert_close(result["sums_sum"], [0.0, 0.0], rtol=0, atol=1e-15)
    assert torch.equal(ranks[0]["shift"], ranks[1]["shift"])


def test_without_init_process_group_nothing_is_distributed_and_reduce_is_a_no_op() -> None:
    assert not dist.is_initialized()
    assert not is_distributed()
    x = torch.randn(5, 3, dtype=F64)
    shift = batch_shift(x, None)
    sums = shifted_sums(x, None, shift)
    assert all_reduce_sums(sums) is sums
    assert agree_shift(shift, torch.tensor(5.0, dtype=F64)) is shift


@pytest.mark.parametrize("action", ["cpu", "to", "load", "reset"])
def test_a_move_load_or_reset_on_one_rank_keeps_the_collectives_paired(
    ranks: list[dict], action: str
) -> None:
    # The worker ran updates on both ranks after the action; getting here means no collective
    # mismatch. A no-op on one rank leaves the ranks bitwise identical.
    states = [r["one_rank_acts"][action] for r in ranks]
    if action == "reset":  # one rank forgot its statistics: its user made the ranks differ
        assert int(states[0]["count"]) < int(states[1]["count"])
        return
    assert_bitwise_equal_states(states[0], states[1])


@pytest.mark.parametrize("built", ["dict_inferred", "dict_configured"])
def test_dict_keys_listed_in_different_orders_reduce_each_key_with_itself(
    ranks: list[dict], built: str
) -> None:
    assert_bitwise_equal_states(ranks[0][built], ranks[1][built])
    state = ranks[0][built]
    keys = list(dict.fromkeys(name.split(".")[1] for name in state))
    assert keys == ["hundred", "zero"]  # the normalizers are kept in sorted key order
    assert_close(state["obs.zero.mean"].abs().max(), 0.0, rtol=0, atol=0.6)
    assert_close(state["obs.hundred.mean"], [100.0, 100.0], rtol=0, atol=0.6)
    assert int(state["obs.zero.count"]) == int(state["obs.hundred.count"]) == 2 * (8 + 9)
