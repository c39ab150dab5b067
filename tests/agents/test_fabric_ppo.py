"""PPO on Lightning Fabric (``rlnorm.agents.fabric_ppo``) trained by real processes.

Each run is ``python -m rlnorm.agents.fabric_ppo`` as a subprocess: two CPU processes under
Fabric's DDP strategy (gloo), 4 environments x 64 steps per rank and update, so 512
environment steps per update over both ranks. These tests check what rlnorm sees and writes
(counts against environment steps, TensorBoard tags, checkpoints, resuming after a SIGKILL),
not that PPO learns.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import rlnorm
from rlnorm.agents.fabric_ppo import Args, parse_args

SRC = Path(__file__).resolve().parents[2] / "src"
PER_UPDATE = 4 * 64 * 2  # num_envs x num_steps x ranks
SMALL_RUN = ["--num-envs", "4", "--num-steps", "64", "--update-epochs", "2", "--devices", "2"]


def fabric_ppo(root_dir: Path, *flags: str, **popen: Any) -> subprocess.Popen[str]:
    """Start ``python -m rlnorm.agents.fabric_ppo`` (two processes) writing under ``root_dir``."""
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "rlnorm.agents.fabric_ppo", "--root-dir", str(root_dir)]
    return subprocess.Popen(
        [*command, *SMALL_RUN, *flags],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )


def finish(process: subprocess.Popen[str]) -> str:
    """Wait for a run to end; its output, after checking that it succeeded."""
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-4000:]
    return output


def checkpoints(root_dir: Path) -> dict[int, Path]:
    """The complete checkpoints of a run by update number."""
    return {int(p.stem.split("-")[1]): p for p in (root_dir / "checkpoints").glob("update-*.ckpt")}


def scalars(root_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar the run wrote to TensorBoard: ``tag -> [(step, value), ...]``."""
    (log_dir,) = (root_dir / "logs").iterdir()
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


def test_two_process_fabric_ppo_logs_rlnorm_at_env_steps_and_checkpoints_counts_of_both_ranks(
    tmp_path: Path,
) -> None:
    updates = 8
    finish(
        fabric_ppo(
            tmp_path,
            "--total-timesteps",
            str(updates * PER_UPDATE),
            "--log-every",
            "2",
            "--checkpoint-every",
            "4",
        )
    )

    logged = scalars(tmp_path)
    # Telemetry every 2 updates, at the environment step count over both ranks, which is
    # what the statistics have counted: one observation and one reward per env step.
    steps = [2 * PER_UPDATE, 4 * PER_UPDATE, 6 * PER_UPDATE, 8 * PER_UPDATE]
    assert logged["rlnorm/obs/count"] == [(s, float(s)) for s in steps]
    assert logged["rlnorm/reward/count"] == [(s, float(s)) for s in steps]
    for tag in ("rlnorm/obs/std_max", "rlnorm/reward/std_max", "rlnorm/reward/drift/kl"):
        assert {step for step, _ in logged[tag]} <= set(steps), tag
    assert [s for s, _ in logged["rlnorm/reward/std_max"]] == steps
    returns = logged["charts/episodic_return"]
    assert returns
    assert all(step % PER_UPDATE == 0 and value > 0 for step, value in returns)

    saved = checkpoints(tmp_path)
    assert sorted(saved) == [4, 8]
    norms = rlnorm.load_normalizers(saved[8])
    counts = {tag: int(stats.moments.count) for tag, stats in norms.named_normalizers().items()}
    assert counts == {"obs": updates * PER_UPDATE, "reward": updates * PER_UPDATE}
    checkpoint = torch.load(saved[8], weights_only=True)
    assert checkpoint["global_step"] == updates * PER_UPDATE
    assert len(checkpoint["players"]) == 2  # each rank's environments and RNG


def assert_same(a: Any, b: Any, where: str = "checkpoint") -> None:
    """Bitwise equality of nested checkpoint contents (tensors with equal dtype and values)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict), where
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b), where
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def env_state(pickled: bytes) -> list[Any]:
    """The physics state, step count and RNG state of each environment of a pickled vector env."""
    envs = pickle.loads(pickled)
    return [
        (
            torch.as_tensor(env.unwrapped.state),
            env.get_wrapper_attr("_elapsed_steps"),
            env.unwrapped.np_random.bit_generator.state,
        )
        for env in envs.unwrapped.envs
    ]


@pytest.mark.slow
def test_two_process_run_sigkilled_after_a_checkpoint_resumes_bitwise_like_an_uninterrupted_run(
    tmp_path: Path,
) -> None:
    updates = 8
    # No learning-rate annealing: the killed run is given far more steps (so that it is
    # surely still training when killed), and the schedule would depend on that length.
    common = ["--no-anneal-lr", "--log-every", "2", "--checkpoint-every", "3"]
    length = ["--total-timesteps", str(updates * PER_UPDATE)]

    uninterrupted = tmp_path / "uninterrupted"
    finish(fabric_ppo(uninterrupted, *common, *length))

    killed = tmp_path / "killed"
    process = fabric_ppo(
        killed,
        *common,
        "--total-timesteps",
        str(100 * updates * PER_UPDATE),
        start_new_session=True,
    )
    deadline = time.monotonic() + 240
    while 3 not in checkpoints(killed):
        assert process.poll() is None, process.communicate()[0][-4000:]
        assert time.monotonic() < deadline, "no checkpoint within 240 s"
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)  # the launcher and the second rank it started
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL
    resume_from = max(u for u in checkpoints(killed) if u < updates)

    resumed = tmp_path / "resumed"
    output = finish(
        fabric_ppo(
            resumed, *common, *length, "--resume-from", str(checkpoints(killed)[resume_from])
        )
    )
    assert f"global_step={updates * PER_UPDATE}" in output

    expected = torch.load(checkpoints(uninterrupted)[updates], weights_only=True)
    actual = torch.load(checkpoints(resumed)[updates], weights_only=True)
    assert actual["global_step"] == expected["global_step"] == updates * PER_UPDATE
    for key in ("agent", "optimizer", "rlnorm"):
        assert_same(actual[key], expected[key], key)
    for rank, (mine, theirs) in enumerate(zip(actual["players"], expected["players"], strict=True)):
        assert_same(mine["torch_rng"], theirs["torch_rng"], f"rank {rank} torch RNG")
        assert_same(mine["next_obs"], theirs["next_obs"], f"rank {rank} next observation")
        # The pickled environments differ in their episode start times (wall clock) only.
        assert_same(env_state(mine["envs"]), env_state(theirs["envs"]), f"rank {rank} envs")
    stats = [rlnorm.load_normalizers(checkpoints(run)[updates]) for run in (uninterrupted, resumed)]
    for tag, expected_stats in stats[0].named_normalizers().items():
        actual_stats = stats[1].named_normalizers()[tag]
        assert_same(actual_stats.state_dict(), expected_stats.state_dict(), tag)


def test_command_line_flags_fill_args_and_bad_values_raise_value_error() -> None:
    args = parse_args(["--env-id", "Pendulum-v1", "--no-normalize", "--devices", "2"])
    assert args == Args(env_id="Pendulum-v1", normalize=False, devices=2)
    assert parse_args(["--resume-from", "x.ckpt"]).resume_from == "x.ckpt"
    with pytest.raises(ValueError, match="num_minibatches"):
        Args(num_minibatches=0)
