"""Shared helpers: float64 numpy two-pass references, the ``cuda`` skip marker, backends."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import torch

# Before anything imports triton (rlnorm loads its kernels on first use): without a GPU, the
# fused kernels run through Triton's CPU interpreter (tests/backends/test_fused.py); with one,
# they compile for real. `setdefault`: an explicit TRITON_INTERPRET wins.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest
from hypothesis import Phase, settings

# No "explain" phase: on a failure it re-runs the test hundreds of times (minutes here) only
# to annotate which arguments did not matter. Tests still set max_examples and deadline.
settings.register_profile(
    "rlnorm",
    deadline=None,
    phases=(Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink),
)
settings.load_profile("rlnorm")

#: This folder (``tests/``), beside ``src/``.
TESTS = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked ``@pytest.mark.cuda`` when no CUDA device is present."""
    if torch.cuda.is_available():
        return
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip_cuda)


@pytest.fixture(scope="module", params=["native", "torch"])
def backend(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run a test on the native CPU kernels and again on the torch code path."""
    from rlnorm.backends import native as _native

    with _native.native_kernels(request.param == "native"):
        yield request.param


def init_gloo(rank: int, init_file: str, world_size: int) -> None:
    """Join a CPU (gloo) process group through a shared file, one torch thread per process."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=60),
    )


def to_numpy64(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """Any real tensor or array as a float64 numpy array (exact for every supported dtype)."""
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def reference_moments(
    x: torch.Tensor | np.ndarray,
    weights: torch.Tensor | np.ndarray | None = None,
    feature_ndim: int | None = None,
) -> tuple[np.ndarray, np.ndarray, float, int]:
    """Float64 two-pass weighted mean and population variance over the leading batch dims.

    Rows holding NaN or Inf are left out, as rlnorm documents. ``feature_ndim`` is the number
    of trailing feature dims (default: all dims but the first).

    Returns:
        ``(mean, var, total_weight, count)`` where ``count`` counts rows of non-zero weight.
    """
    arr = to_numpy64(x)
    if feature_ndim is None:
        feature_ndim = arr.ndim - 1
    feature_shape = arr.shape[arr.ndim - feature_ndim :]
    rows = arr.reshape(-1, int(np.prod(feature_shape, dtype=np.int64)))
    w = np.ones(rows.shape[0]) if weights is None else to_numpy64(weights).reshape(-1)
    finite = np.isfinite(rows).all(axis=1)
    rows, w = rows[finite], w[finite]
    total = float(w.sum())
    count = int((w > 0).sum())
    if total == 0:
        return np.zeros(feature_shape), np.ones(feature_shape), 0.0, 0
    mean = (w @ rows) / total
    centered = rows - mean
    var = (w @ (centered * centered)) / total
    return mean.reshape(feature_shape), var.reshape(feature_shape), total, count


def reference_returns(
    rewards: list[list[float]], dones: list[list[bool]], gamma: float, start: list[float]
) -> tuple[list[float], list[float], int]:
    """The documented recursion in plain Python.

    ``ret = ret * gamma + r``, the new return is fed to the statistics, and after a step with
    ``done`` the environment's return restarts at 0. A non-finite reward leaves its
    environment's return unchanged and feeds nothing (it is counted instead).

    Returns:
        ``(final returns, values fed to the statistics in order, non-finite count)``.
    """
    ret = list(start)
    fed: list[float] = []
    bad = 0
    for step_rewards, step_dones in zip(rewards, dones, strict=True):
        for env, (r, done) in enumerate(zip(step_rewards, step_dones, strict=True)):
            if math.isfinite(r):
                ret[env] = ret[env] * gamma + r
                fed.append(ret[env])
            else:
                bad += 1
            if done:
                ret[env] = 0.0
    return ret, fed, bad


def reference_ema(
    batches: list[np.ndarray], momentum: float, var_floor: float | None = None
) -> tuple[float, np.ndarray, np.ndarray]:
    """The documented recursion of ``merge_ema``, written out in numpy float64.

    ``batches`` are 2-D ``(rows, features)`` arrays; rows holding NaN or Inf are dropped and
    a batch left without rows changes nothing.

    Returns:
        ``(W, mean, var)`` after the last batch.
    """
    w_prev, mean, var = 0.0, np.zeros(batches[0].shape[1]), np.ones(batches[0].shape[1])
    for batch in batches:
        batch = batch[np.isfinite(batch).all(axis=1)]
        if batch.shape[0] == 0:
            continue  # a batch without data changes nothing
        mean_b = batch.mean(axis=0)
        var_b = ((batch - mean_b) ** 2).mean(axis=0)
        m = momentum
        w = m * w_prev + (1 - m)
        delta = mean_b - mean
        new_mean = mean + (1 - m) / w * delta
        new_var = (m * w_prev * var + (1 - m) * var_b) / w + m * w_prev * (1 - m) / w**2 * delta**2
        if var_floor is not None:
            gap = mean_b - new_mean
            new_var = np.maximum(new_var, var_floor * (var_b + gap**2))
        w_prev, mean, var = w, new_mean, new_var
    return w_prev, mean, var


def assert_close(
    actual: torch.Tensor | np.ndarray | float,
    expected: torch.Tensor | np.ndarray | float,
    rtol: float,
    atol: float = 0.0,
) -> None:
    """Elementwise ``|actual - expected| <= atol + rtol * |expected|`` in float64."""
    a = to_numpy64(actual) if isinstance(actual, torch.Tensor) else np.asarray(actual, np.float64)
    e = to_numpy64(expected) if isinstance(expected, torch.Tensor) else np.asarray(expected)
    np.testing.assert_allclose(a, e.astype(np.float64), rtol=rtol, atol=atol)


def state_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of a module's state, for before/after comparisons."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_state_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Bitwise equality of two states (same keys, dtypes and values)."""
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), f"{key}: {a[key]} != {b[key]}"


#: A user's own environment module: importing it registers ENV_ID (every episode returns 4).
USER_ENV_MODULE = """
import gymnasium as gym
import numpy as np


class FourSteps(gym.Env):
    observation_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.zeros(2, np.float32), {}

    def step(self, action):
        self.t += 1
        return np.full(2, self.t / 4, np.float32), 1.0, self.t >= 4, False, {}


gym.register(id="ENV_ID", entry_point=FourSteps, reward_threshold=4.0)
"""


def write_user_env_module(directory: Path, module: str, env_id: str) -> str:
    """Write a module registering ``env_id`` into ``directory``; returns ``"module:env_id"``.

    Put ``directory`` on ``sys.path`` (``monkeypatch.syspath_prepend``) before using the id.
    """
    (directory / f"{module}.py").write_text(USER_ENV_MODULE.replace("ENV_ID", env_id))
    return f"{module}:{env_id}"


def run_ddp_script(script: Path, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run a script that launches its own DDP ranks (Lightning or Fabric), on this checkout.

    The environment points at this checkout's ``src`` and ``tests``, runs one torch thread per
    process and drops any rank/port variables, so the launcher picks a free port and starts
    every rank itself.
    """
    env = dict(os.environ)
    paths = (str(TESTS.parent / "src"), str(TESTS), env.get("PYTHONPATH"))
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env["OMP_NUM_THREADS"] = "1"
    for var in ("MASTER_PORT", "MASTER_ADDR", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK"):
        env.pop(var, None)
    return subprocess.run(
        [sys.executable, str(script), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
