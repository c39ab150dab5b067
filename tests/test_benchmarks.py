"""The parts of ``benchmarks/`` that run without a GPU: targets, the rsl_rl stand-in, gpu_step."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rlnorm
from rollout_agents import QUIET_LIGHTNING

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bench_peers  # noqa: E402
import callback_cost  # noqa: E402
import gpu_step  # noqa: E402
from rsl_rl_equivalent import EmpiricalNormalization  # noqa: E402

pytestmark = [pytest.mark.filterwarnings(f"ignore:{w[len('ignore:') :]}") for w in QUIET_LIGHTNING]


def medians(update: float, normalize: float, peers: bool) -> dict[tuple[str, str], float]:
    med = {
        ("rlnorm eager", "update"): update,
        ("rlnorm eager", "normalize"): normalize,
        (bench_peers.READ_FLOOR, "update"): 10.0,
        (bench_peers.COPY_FLOOR, "normalize"): 10.0,
    }
    if peers:
        for name in (f"{bench_peers.RSL_RL} (equivalent)", bench_peers.TORCHRL):
            med[name, "update"] = 100.0
            med[name, "normalize"] = 14.0
    return med


def test_targets_pass_and_fail_at_their_bounds() -> None:
    checks = bench_peers.target_checks((4096, 48), medians(30.0, 15.0, True), {"eager": 29.0})
    assert [c.passed for c in checks] == [True, True, True, False, True, False, True]
    assert "rsl_rl EmpiricalNormalization (equivalent)" in checks[2].target
    checks = bench_peers.target_checks((16, 8), medians(30.1, 15.1, True), {"eager": 40.0})
    assert [c.passed for c in checks][:2] == [False, False]
    assert len(checks) == 6  # the whole-step target is set at (4096, 48) only
    assert checks[0].line().endswith("| FAIL |")


def test_missing_peers_are_not_applicable_rather_than_failed() -> None:
    checks = bench_peers.target_checks((16, 8), medians(1.0, 1.0, False), {"eager": 2.0})
    assert [c.passed for c in checks] == [True, True, None, None, None, None]
    assert checks[2].line().endswith("| n/a |")


def test_rsl_rl_stand_in_agrees_with_rlnorm() -> None:
    gen = torch.Generator().manual_seed(0)
    ours = rlnorm.RunningMeanStd(6)
    theirs = EmpiricalNormalization(6, eps=1e-8)
    for rows in (5, 64, 1):
        x = torch.randn(rows, 6, generator=gen) * 3 + 5
        ours.update(x)
        theirs.update(x)
    x = torch.randn(7, 6, generator=gen) * 3 + 5
    torch.testing.assert_close(theirs(x), ours.normalize(x), rtol=1e-4, atol=1e-4)
    assert int(theirs.count) == 70


def test_device_ppo_learns_each_rollout_observation_once() -> None:
    num_envs, num_steps = 4, 8
    model = gpu_step.DevicePPO(
        total_timesteps=3 * num_envs * num_steps,
        num_envs=num_envs,
        num_steps=num_steps,
        update_epochs=1,
        gamma=0.99,
    )
    callback = gpu_step.make_callback(num_envs)
    gpu_step.make_trainer(torch.device("cpu"), [callback]).fit(model)
    assert model.env_steps == 3 * num_envs * num_steps
    assert int(callback.normalizers.named_normalizers()["obs"].count) == 3 * num_envs * num_steps
    assert len(model.batch_starts) == 4  # three iterations, then the end of training
    # ScaledCartPole: the statistics see observations around 1000
    assert float(callback.normalizers.named_normalizers()["obs"].mean.mean()) > 500


@pytest.mark.slow
def test_gpu_step_runs_on_the_cpu_and_writes_its_tables(tmp_path: Path) -> None:
    out = tmp_path / "gpu_step.md"
    sizes = "--num-envs 8 --block-steps 2 --repeats 2 --warmup 1 --num-steps 4 --ppo-repeats 1"
    sizes += " --ppo-iterations 1 --ppo-warmup 1 --update-epochs 1 --num-minibatches 1"
    sizes += f" --device cpu --out {out}"
    subprocess.run(
        [sys.executable, str(BENCHMARKS / "gpu_step.py"), *sizes.split()],
        check=True,
        capture_output=True,
        timeout=300,
    )
    text = out.read_text()
    assert "| policy + env + rlnorm |" in text
    assert "| with NormalizerCallback |" in text


@pytest.mark.slow
def test_callback_cost_modes_take_turns_that_never_overlap_and_cover_the_whole_fit() -> None:
    config = str(callback_cost.ROOT / "configs" / "cartpole.yaml")
    pair = callback_cost.run_pair(config, 1, 768, "cpu", "policy", first="none")
    with_rlnorm, without = pair["rlnorm"], pair["none"]
    assert with_rlnorm["steps"] == without["steps"] == 768
    # One turn per iteration (3 rollouts of 8 x 32): the first from setup, the last to teardown.
    assert len(with_rlnorm["turns"]) == len(without["turns"]) == 3
    spans = sorted(
        [(*span, "rlnorm") for span in with_rlnorm["turns"]]
        + [(*span, "none") for span in without["turns"]]
    )
    assert [mode for *_, mode in spans] == ["none", "rlnorm"] * 3  # strictly alternating
    for (_, end, _), (start, _, _) in itertools.pairwise(spans):
        assert end <= start  # one turn ends before the next one starts
    for result in pair.values():
        assert result["wall_s"] == pytest.approx(sum(end - start for start, end in result["turns"]))
    assert with_rlnorm["rlnorm_s"] > 0.0
    assert without["rlnorm_s"] == 0.0
    # Where the time inside goes: per method, adding up to the total.
    calls = with_rlnorm["rlnorm_calls"]
    assert calls["normalize_obs"][0] == 3 * (
        1 + 32
    )  # per rollout: its first observation, each step
    assert calls["update_obs"][0] == 3  # once per rollout
    assert sum(s for _, s in calls.values()) == pytest.approx(with_rlnorm["rlnorm_s"])
    assert without["rlnorm_calls"] == {}
    line = callback_cost.by_method([with_rlnorm])
    assert line.split(";")[0].startswith("normalize_obs ")  # the largest share first
