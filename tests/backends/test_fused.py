"""The fused Triton kernels against the torch code, run through Triton's CPU interpreter.

Without a GPU, conftest sets ``TRITON_INTERPRET=1`` and :func:`fused.interpret_on_cpu` routes
CPU tensors through the kernels; the interpreter does the kernels' arithmetic in numpy, one
IEEE operation at a time, so where the torch code does the same operations in the same order
(the merge, the returns) the results must be bitwise equal. On a GPU machine these tests skip;
tests/backends/test_cuda.py checks the compiled kernels there.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings

import pytest
import torch

from conftest import TESTS, assert_close
from rlnorm import RewardNormalizer, RunningMeanStd
from rlnorm.algebra import moments as mom
from rlnorm.algebra.affine import affine, compute_dtype, normalize_clipped
from rlnorm.algebra.returns import discounted_returns as torch_returns
from rlnorm.algebra.state import State, as_moments, initial_state
from rlnorm.backends import dispatch, fused, native
from rlnorm.backends.dispatch import Dispatcher, Settings, _update_torch

pytestmark = [
    pytest.mark.skipif(
        not (fused.available() and fused.interpreting()),
        reason="needs triton running its interpreter (TRITON_INTERPRET=1, no GPU)",
    ),
    # numpy inside the interpreter warns where the kernels compute inf * 0 on rows they drop.
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
]

F64 = torch.float64
SKIP = Settings(None, None, None, "skip", 10.0, 1e-8, True)


@pytest.fixture(autouse=True)
def _interpreted():
    with fused.interpret_on_cpu():
        yield


def _batch(n: int, d: int, dtype: torch.dtype, seed: int, bad: bool = True) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=F64) * 3 + 1e3 * (seed % 3)
    if bad and n > 6:
        x[1, 0] = math.nan
        x[3, d - 1] = -math.inf
        if dtype == F64:
            x[5, 0] = 1e200  # finite, but its square overflows: left out like NaN
    return x.to(dtype)


def _weights(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed + 1)
    w = torch.rand(n, generator=gen, dtype=F64) * 2
    w[torch.rand(n, generator=gen) < 0.2] = 0.0
    if n > 4:
        w[0], w[2], w[4] = -1.0, math.nan, math.inf  # count as 0
    return w


def _assert_states_close(got: State, want: State, rtol: float = 1e-12) -> None:
    assert torch.equal(got.count, want.count)
    assert torch.equal(got.nonfinite_count, want.nonfinite_count)
    assert_close(got.weight_sum, want.weight_sum, rtol=1e-14)
    scale = float(want.mean.abs().max()) if want.mean.numel() else 0.0
    assert_close(got.mean, want.mean, rtol=rtol, atol=rtol * (scale + 1))
    assert_close(got.var, want.var, rtol=rtol, atol=1e-300)
    # The exact mean is mean + mean_residual on both paths.
    exact_got = got.mean + got.mean_residual
    exact_want = want.mean + want.mean_residual
    assert_close(exact_got, exact_want, rtol=rtol, atol=rtol * (scale + 1))


def _states_equal(a: State, b: State) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


# ------------------------------------------------------------------ update


SHAPES = [(0, 8), (1, 1), (31, 48), (33, 8), (1000, 1), (33, 257), (31, 1100)]


@pytest.mark.parametrize(("n", "d"), SHAPES, ids=[f"{n}x{d}" for n, d in SHAPES])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_update_kernels_match_the_torch_update(n: int, d: int, weighted: bool) -> None:
    x = _batch(n, d, torch.float32, seed=n + d)
    w = _weights(n, seed=d) if weighted else None
    got, want = initial_state((d,), 0.0), initial_state((d,), 0.0)
    packed = fused.update(fused.Workspace(), got, x, w, None, None, None)
    batch = _update_torch(want, x, w, SKIP, x.shape, None)
    _assert_states_close(got, want)
    moments = fused.moments_of(packed, (d,))
    assert torch.equal(moments.count, batch.count)
    assert_close(moments.weight, batch.weight, rtol=1e-14)
    assert_close(moments.var, batch.var, rtol=1e-12, atol=1e-300)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_update_accumulates_every_input_dtype_in_float64(dtype: torch.dtype) -> None:
    x = _batch(70, 5, dtype, seed=3)
    got, want = initial_state((5,), 0.0), initial_state((5,), 0.0)
    fused.update(fused.Workspace(), got, x, None, None, None, None)
    _update_torch(want, x, None, SKIP, x.shape, None)
    _assert_states_close(got, want)
    assert int(got.nonfinite_count) == (3 if dtype == F64 else 2)


def test_update_of_strided_batches_reads_them_in_place() -> None:
    base = _batch(80, 12, torch.float32, seed=5)
    x = base[::2, ::3]  # neither rows nor features contiguous
    got, want = initial_state((4,), 0.0), initial_state((4,), 0.0)
    fused.update(fused.Workspace(), got, x, None, None, None, None)
    _update_torch(want, x, None, SKIP, x.shape, None)
    _assert_states_close(got, want)


def test_rows_of_nan_inf_or_overflowing_squares_are_skipped_and_counted() -> None:
    x = torch.ones(40, 3, dtype=F64)
    x[0] = math.nan  # in the shift's head too
    x[7, 1] = math.inf
    x[9, 2] = 1e160  # its square overflows float64
    x[11, 0] = 1e100  # large but fine
    w = torch.ones(40, dtype=F64)
    w[9] = 0.0  # a dropped row of weight 0 is not counted as non-finite
    state = initial_state((3,), 0.0)
    fused.update(fused.Workspace(), state, x, w, None, None, None)
    assert int(state.nonfinite_count) == 2
    assert int(state.count) == 37
    want = initial_state((3,), 0.0)
    _update_torch(want, x, w, SKIP, x.shape, None)
    _assert_states_close(state, want)


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_until_stops_updating_from_the_state_count_on_the_device(weighted: bool) -> None:
    s = Settings(None, None, 50, "skip", None, 1e-8, True)
    got, want = initial_state((3,), 0.0), initial_state((3,), 0.0)
    ws = fused.Workspace()
    for i in range(4):
        x = _batch(30, 3, torch.float32, seed=i)
        w = _weights(30, seed=i) if weighted else None
        fused.update(ws, got, x, w, None, None, s.until)
        _update_torch(want, x, w, s, x.shape, None)
        _assert_states_close(got, want)
    assert 50 <= int(got.count) < 80


@pytest.mark.parametrize("var_floor", [None, 0.5])
def test_ema_updates_match_merge_ema(var_floor: float | None) -> None:
    s = Settings(0.9, var_floor, None, "skip", None, 1e-8, True)
    got, want = initial_state((4,), 0.0), initial_state((4,), 0.0)
    ws = fused.Workspace()
    for i in range(5):
        x = _batch(40, 4, torch.float32, seed=i) * (1 + 3 * i)
        empty = i == 2  # a batch without usable rows changes nothing
        w = torch.zeros(40, dtype=F64) if empty else None
        fused.update(ws, got, x, w, 0.9, var_floor, None)
        _update_torch(want, x, w, s, x.shape, None)
        _assert_states_close(got, want)


def test_prior_weight_is_merged_like_data() -> None:
    got, want = initial_state((6,), 1e-4), initial_state((6,), 1e-4)
    x = _batch(20, 6, torch.float64, seed=9)
    fused.update(fused.Workspace(), got, x, None, None, None, None)
    _update_torch(want, x, None, SKIP, x.shape, None)
    _assert_states_close(got, want)


def test_chunked_updates_equal_one_pass_to_rounding() -> None:
    x = _batch(300, 7, torch.float32, seed=11)
    w = _weights(300, seed=11)
    one, chunked = initial_state((7,), 0.0), initial_state((7,), 0.0)
    ws = fused.Workspace()
    fused.update(ws, one, x, w, None, None, None)
    for start in range(0, 300, 70):
        fused.update(ws, chunked, x[start : start + 70], w[start : start + 70], None, None, None)
    _assert_states_close(chunked, one, rtol=1e-11)


def test_same_input_gives_bitwise_the_same_statistics() -> None:
    x = _batch(900, 9, torch.float32, seed=2)
    outs = []
    for _ in range(2):
        state = initial_state((9,), 0.0)
        fused.update(fused.Workspace(), state, x, None, None, None, None)
        fused.update(fused.Workspace(), state, x * 2 + 1, None, 0.5, None, None)
        outs.append(state)
    assert _states_equal(*outs)


def test_shift_kernel_is_the_weighted_head_mean() -> None:
    x = _batch(50, 5, torch.float64, seed=4)
    w = _weights(50, seed=4)
    for weights in (None, w):
        shift = fused.batch_shift(
            fused.Workspace(), x, weights, torch.zeros((), dtype=torch.int64), None
        )
        assert_close(shift, mom.batch_shift(x, weights), rtol=1e-14)
    blocked = fused.batch_shift(fused.Workspace(), x, None, torch.tensor(5), 5)
    assert torch.equal(blocked, torch.zeros(5, dtype=F64))


@pytest.mark.parametrize("d", [3, 600])
def test_finalized_sums_are_the_shifted_sums(d: int) -> None:
    x = _batch(64, d, torch.float32, seed=d)
    w = _weights(64, seed=d)
    shift = mom.batch_shift(x, w)
    got = fused.shifted_sums(fused.Workspace(), x, w, shift)
    want = mom.shifted_sums(x, w, shift)
    assert torch.equal(got.count, want.count)
    assert torch.equal(got.nonfinite, want.nonfinite)
    assert_close(got.weight, want.weight, rtol=1e-14)
    assert_close(got.sum, want.sum, rtol=1e-11, atol=1e-10)
    assert_close(got.sum_sq, want.sum_sq, rtol=1e-12)


def _prior_state(d: int, seed: int, weight: float) -> State:
    gen = torch.Generator().manual_seed(seed)
    state = initial_state((d,), 0.0)
    state.mean.copy_(torch.randn(d, generator=gen, dtype=F64) * 10 + 1e4)
    state.var.copy_(torch.rand(d, generator=gen, dtype=F64) * 5)
    state.mean_residual.copy_(torch.randn(d, generator=gen, dtype=F64) * 1e-13)
    state.weight_sum.fill_(weight)
    state.count.fill_(int(weight))
    return state


@pytest.mark.parametrize(
    ("momentum", "var_floor"),
    [(None, None), (0.95, None), (0.9, 0.3)],
    ids=["chan", "ema", "floor"],
)
@pytest.mark.parametrize("prior", [0.0, 37.0])
def test_merge_kernel_given_the_same_sums_is_bitwise_the_torch_merge(
    momentum: float | None, var_floor: float | None, prior: float
) -> None:
    d = 9
    x = _batch(50, d, torch.float64, seed=1) * 0.01 + 1e4
    sums = mom.shifted_sums(x, None, mom.batch_shift(x, None))
    got, want = _prior_state(d, 3, prior), _prior_state(d, 3, prior)
    packed = fused.merge_sums(fused.Workspace(), got, sums, momentum, var_floor)
    batch = mom.batch_moments(sums)
    current = as_moments(want)
    if momentum is None:
        new = mom.merge(current, batch)
    else:
        new = mom.merge_ema(current, batch, momentum, var_floor)
    assert torch.equal(got.mean, new.mean)
    assert torch.equal(got.var, new.var)
    assert torch.equal(got.mean_residual, new.mean_residual)
    assert torch.equal(got.weight_sum, new.weight)
    assert torch.equal(got.count, new.count)
    assert int(got.nonfinite_count) == int(sums.nonfinite)
    moments = fused.moments_of(packed, (d,))
    assert torch.equal(moments.mean, batch.mean)
    assert torch.equal(moments.var, batch.var)
    assert torch.equal(moments.mean_residual, batch.mean_residual)


# ------------------------------------------------------------------ normalize


def _seen_state(d: int, seed: int, prior: float = 0.0) -> State:
    state = initial_state((d,), prior)
    x = _batch(60, d, F64, seed=seed, bad=False)
    _update_torch(state, x, None, SKIP, x.shape, None)
    return state


NORMALIZE_TOL = {torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float32: 1e-6, F64: 1e-14}


@pytest.mark.parametrize("dtype", list(NORMALIZE_TOL))
@pytest.mark.parametrize("clip", [None, 10.0, 0.5])
@pytest.mark.parametrize("center", [True, False], ids=["center", "scale-only"])
def test_normalize_kernel_matches_the_torch_map(
    dtype: torch.dtype, clip: float | None, center: bool
) -> None:
    state = _seen_state(5, seed=2)
    x = _batch(33, 5, F64, seed=2).to(dtype)
    y, clipped = fused.normalize(state, x, clip, 1e-8, center, True)
    a = affine(as_moments(state), clip, 1e-8, center, compute_dtype(x))
    want, want_clipped = normalize_clipped(x, a, clip is not None)
    assert y.dtype == dtype
    assert y.shape == x.shape
    tol = NORMALIZE_TOL[dtype]
    assert_close(y, want, rtol=tol, atol=tol)  # NaN stays NaN on both
    assert int(clipped) == int(want_clipped)
    if clip == 0.5:
        assert int(clipped) > 0


def test_normalize_is_the_identity_before_any_weight() -> None:
    state = initial_state((4,), 0.0)
    x = _batch(20, 4, torch.float32, seed=1) * 100
    y, clipped = fused.normalize(state, x, 1.0, 1e-8, True, True)
    assert torch.equal(y.nan_to_num(7.0), x.nan_to_num(7.0))
    assert int(clipped) == 0


def test_normalize_with_a_prior_weight_only_scales_by_the_prior() -> None:
    state = initial_state((3,), 1e-4)
    x = torch.tensor([[1.0, -2.0, 30.0]])
    y = fused.normalize(state, x, 10.0, 1e-8, True, False)
    a = affine(as_moments(state), 10.0, 1e-8, True, torch.float32)
    want, _ = normalize_clipped(x, a, True)
    assert torch.equal(y, want)


def test_normalize_of_strided_and_batched_inputs_keeps_their_shape() -> None:
    state = initial_state((2, 3), 0.0)
    x = torch.randn(4, 5, 2, 3) * 2 + 1
    _update_torch(state, x.reshape(-1, 6), None, SKIP, x.shape, None)
    strided = x.transpose(0, 1)
    y = fused.normalize(state, strided, None, 1e-8, True, False)
    a = affine(as_moments(state), None, 1e-8, True, torch.float32)
    want, _ = normalize_clipped(strided, a, False)
    assert y.shape == strided.shape
    assert_close(y, want, rtol=1e-6, atol=1e-6)
    empty = fused.normalize(state, x[:0], 1.0, 1e-8, True, True)
    assert empty[0].shape == (0, 5, 2, 3)
    assert int(empty[1]) == 0


def test_normalize_twice_is_bitwise_the_same() -> None:
    state = _seen_state(7, seed=4)
    x = _batch(300, 7, torch.float32, seed=4)
    a = fused.normalize(state, x, 2.0, 1e-8, True, True)
    b = fused.normalize(state, x, 2.0, 1e-8, True, True)
    assert torch.equal(a[0].nan_to_num(9.0), b[0].nan_to_num(9.0))
    assert torch.equal(a[1], b[1])


# ------------------------------------------------------------------ returns


@pytest.mark.parametrize(("steps", "envs"), [(0, 3), (1, 1), (9, 5), (4, 300)])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_returns_kernel_is_bitwise_the_torch_recursion(
    steps: int, envs: int, dtype: torch.dtype
) -> None:
    gen = torch.Generator().manual_seed(steps * 1000 + envs)
    rewards = torch.randn(steps, envs, generator=gen, dtype=F64).to(dtype)
    dones = torch.rand(steps, envs, generator=gen) < 0.3
    if steps > 2:
        rewards[1, 0] = math.nan
        rewards[2, envs - 1] = math.inf
    start = torch.randn(envs, generator=gen, dtype=F64)
    before = start.clone()
    trajectory, returns = fused.discounted_returns(rewards, dones, start, 0.97)
    want_trajectory, want_returns = torch_returns(rewards, dones, start, 0.97)
    assert torch.equal(start, before)  # not modified
    assert torch.equal(returns, want_returns)
    assert torch.equal(trajectory.nan_to_num(123.0), want_trajectory.nan_to_num(123.0))
    assert torch.equal(trajectory.isnan(), want_trajectory.isnan())


def test_returns_kernel_reads_strided_rewards_and_integer_dones() -> None:
    rewards = torch.randn(6, 8, dtype=F64)[:, ::2]
    dones = (torch.rand(6, 8) < 0.4).to(torch.int32)[:, ::2]
    start = torch.zeros(4, dtype=F64)
    got = fused.discounted_returns(rewards, dones, start, 0.5)
    want = torch_returns(rewards, dones.bool(), start, 0.5)
    assert torch.equal(got[0], want[0])
    assert torch.equal(got[1], want[1])


# ------------------------------------------------------------------ through the dispatcher


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"momentum": 0.9, "var_floor": 0.2}, {"until": 150}, {"prior_weight": 1e-4}],
    ids=["exact", "ema-floor", "until", "prior"],
)
def test_running_mean_std_through_the_fused_path_equals_the_torch_path(kwargs) -> None:
    got = RunningMeanStd((2, 3), clip=3.0, **kwargs)
    want = RunningMeanStd((2, 3), clip=3.0, **kwargs)
    before = fused.calls()
    for i in range(4):
        x = _batch(48, 6, torch.float32, seed=i).reshape(8, 6, 2, 3)
        mask = torch.rand(8, 6, generator=torch.Generator().manual_seed(i)) > 0.2
        m_got = got.update(x, mask)
        y_got, c_got = got.normalize(x, return_clipped=True)
        with fused.use_fused(False), native.native_kernels(False):
            m_want = want.update(x, mask)
            y_want, c_want = want.normalize(x, return_clipped=True)
        _assert_states_close(State(*got.state), State(*want.state))
        assert torch.equal(m_got.count, m_want.count)
        assert m_got.mean.shape == (2, 3)
        assert_close(m_got.mean, m_want.mean, rtol=1e-12, atol=1e-9)
        assert_close(y_got, y_want, rtol=1e-5, atol=1e-5)
        assert int(c_got) == int(c_want)
    after = fused.calls()
    assert after["update_sums"] - before["update_sums"] == 4
    assert after["update_merge"] - before["update_merge"] == 4
    assert after["normalize"] - before["normalize"] == 4


def test_denormalize_after_fused_updates_sees_the_new_statistics() -> None:
    rms = RunningMeanStd(3)
    probe = torch.randn(5, 3)
    rms.update(torch.randn(50, 3) * 4 + 2)
    first = rms.denormalize(probe)  # caches the CPU affine map
    rms.update(torch.randn(50, 3) * 9 - 5)  # kernels write the buffers and bump versions
    fresh = RunningMeanStd(3)
    fresh.load_state_dict(rms.state_dict())
    assert not torch.equal(first, rms.denormalize(probe))
    with fused.use_fused(False):
        assert torch.equal(rms.denormalize(probe), fresh.denormalize(probe))


def test_nonfinite_raise_on_the_fused_path_leaves_the_state_unchanged() -> None:
    rms = RunningMeanStd(3, nonfinite="raise")
    skip = RunningMeanStd(3)
    clean = torch.randn(20, 3)
    rms.update(clean)
    skip.update(clean)
    assert all(torch.equal(a, b) for a, b in zip(rms.state, skip.state, strict=True))
    before = [t.clone() for t in rms.state]
    bad = clean.clone()
    bad[4, 1] = math.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        rms.update(bad)
    assert all(torch.equal(a, b) for a, b in zip(rms.state, before, strict=True))


class _FixedReducer:
    """A stand-in for the distributed reduction: every rank would receive ``sums``."""

    def __init__(self, sums: mom.ShiftedSums) -> None:
        self.sums = sums

    def shift(self, flat, weights, state):
        return self.sums.shift

    def __call__(self, sums):
        return self.sums


def test_reduced_updates_merge_the_reduced_sums_bitwise_like_the_torch_path() -> None:
    x = _batch(40, 4, F64, seed=8)
    reduced = mom.shifted_sums(x, None, mom.batch_shift(x, None))
    got, want = _prior_state(4, 1, 12.0), _prior_state(4, 1, 12.0)
    door = Dispatcher("test")
    local = _batch(10, 4, torch.float32, seed=9)
    m_got = door.update(got, local, None, SKIP, local.shape, _FixedReducer(reduced))
    with fused.use_fused(False):
        m_want = door.update(want, local, None, SKIP, local.shape, _FixedReducer(reduced))
    assert _states_equal(got, want)
    for a, b in zip(m_got, m_want, strict=True):
        assert torch.equal(a, b)


def test_reward_normalizer_through_the_fused_path_equals_the_torch_path() -> None:
    got, want = RewardNormalizer(6, gamma=0.9), RewardNormalizer(6, gamma=0.9)
    before = fused.calls()["discounted_returns"]
    gen = torch.Generator().manual_seed(5)
    for _ in range(3):
        rewards = torch.randn(7, 6, generator=gen)
        rewards[2, 3] = math.nan
        dones = torch.rand(7, 6, generator=gen) < 0.2
        got.update(rewards, dones)
        with fused.use_fused(False), native.native_kernels(False):
            want.update(rewards, dones)
        assert torch.equal(got.returns, want.returns)
        assert torch.equal(got.stats.nonfinite_count, want.stats.nonfinite_count)
        assert_close(got.stats.var, want.stats.var, rtol=1e-12)
    assert fused.calls()["discounted_returns"] - before == 3
    assert torch.equal(
        dispatch.discounted_returns(rewards, dones, got.returns, 0.9)[1],
        torch_returns(rewards, dones, got.returns, 0.9)[1],
    )


def test_use_fused_false_takes_the_torch_path() -> None:
    rms = RunningMeanStd(3)
    before = fused.calls()
    with fused.use_fused(False):
        assert not fused.eligible(torch.zeros(2, 3))
        rms.update(torch.randn(10, 3))
        rms.normalize(torch.randn(10, 3))
    assert fused.calls() == before


def test_autograd_and_integer_inputs_take_the_torch_path() -> None:
    x = torch.randn(4, 3, requires_grad=True)
    assert not fused.eligible(x)
    with torch.no_grad():
        assert fused.eligible(x)
    assert not fused.eligible(torch.ones(4, 3, dtype=torch.int32))
    rms = RunningMeanStd(3)
    rms.update(torch.randn(10, 3))
    before = fused.calls()
    rms.normalize(x).sum().backward()
    assert x.grad is not None
    assert fused.calls() == before


def _run(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent / "src"), str(TESTS)])}
    full.update(env)
    return subprocess.run(
        [sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=120
    )


def test_environment_variable_turns_the_fused_kernels_off() -> None:
    code = "from rlnorm.backends import fused; print(fused.enabled())"
    out = _run(code, RLNORM_FUSED="0")
    assert out.stdout.strip() == "False", out.stderr


def test_without_triton_everything_takes_the_torch_path() -> None:
    code = """
import sys
sys.modules["triton"] = None  # import triton raises ImportError
import torch
from rlnorm import RunningMeanStd
from rlnorm.backends import fused
rms = RunningMeanStd(2)
rms.update(torch.randn(8, 2))
rms.normalize(torch.randn(8, 2))
assert not fused.available()
assert not fused.eligible(torch.zeros(1, 2))
assert set(fused.calls().values()) == {0}
try:
    with fused.interpret_on_cpu():
        pass
except RuntimeError:
    print("refused")
"""
    out = _run(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "refused"


def test_interpret_on_cpu_is_refused_when_the_kernels_compile() -> None:
    code = """
from rlnorm.backends import fused
assert fused.available() and not fused.interpreting()
try:
    with fused.interpret_on_cpu():
        pass
except RuntimeError:
    print("refused")
"""
    out = _run(code, TRITON_INTERPRET="0")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "refused"


def test_interpreting_on_cpu_leaves_what_fused_kernels_do_not_take_to_torch_as_on_a_gpu() -> None:
    # The autouse fixture is inside `interpret_on_cpu`: CPU tensors stand in for CUDA ones.
    assert not native.enabled()
    rms = RunningMeanStd(3)
    before = native.calls()
    with fused.use_fused(False):
        rms.update(torch.randn(10, 3))
        rms.normalize(torch.randn(4, 3))
    assert native.calls() == before


def test_workspace_rechecks_the_state_only_when_its_buffers_are_replaced() -> None:
    ws = fused.Workspace()
    state = initial_state((3,), 0.0)
    cpu = torch.device("cpu")
    assert ws.state_ok(state, cpu)
    assert ws.state_ok(state, cpu)  # remembered
    single = state._replace(var=state.var.float())  # a replaced buffer of the wrong dtype
    assert not ws.state_ok(single, cpu)
    assert not ws.state_ok(state._replace(mean=torch.zeros(6, dtype=F64)[::2]), cpu)
    assert ws.state_ok(state, cpu)


def test_moved_or_reloaded_modules_keep_taking_the_fused_path() -> None:
    rms = RunningMeanStd(3)
    rms.update(torch.randn(10, 3))
    rms.load_state_dict({k: v.clone() for k, v in rms.state_dict().items()}, assign=True)
    before = fused.calls()["update_merge"]
    rms.update(torch.randn(10, 3) + 4)
    assert fused.calls()["update_merge"] == before + 1
    assert int(rms.count) == 20


class _CallThrough:
    """Stands in for GraphedCalls on the CPU: runs the function, then copies out as a replay."""

    def __init__(self) -> None:
        self.keys: list = []

    def __call__(self, key, fn, inputs, copy_out, state=()):
        self.keys.append(key)
        return copy_out(fn(*inputs))


@pytest.mark.parametrize("use_fused", [True, False], ids=["fused", "torch"])
def test_graphed_update_packs_its_moments_into_one_output(use_fused: bool) -> None:
    door = Dispatcher("test")
    door.update_graphs = _CallThrough()  # type: ignore[assignment]
    got, want = initial_state((2, 2), 0.0), initial_state((2, 2), 0.0)
    x = _batch(30, 4, torch.float32, seed=6)
    w = _weights(30, seed=6)
    with fused.use_fused(use_fused):
        m = door._graphed_update(got, x, w, SKIP, use_fused)
    batch = _update_torch(want, x, w, SKIP, x.shape, None)
    assert door.update_graphs.keys[0][-1] is use_fused
    assert m.count.dtype == torch.int64
    assert m.count.shape == ()
    assert torch.equal(m.count, batch.count)
    assert m.mean.shape == (2, 2)
    assert_close(m.weight, batch.weight, rtol=1e-14)
    assert_close(m.mean, batch.mean.reshape(2, 2), rtol=1e-12)
    assert_close(m.var, batch.var.reshape(2, 2), rtol=1e-12)
    _assert_states_close(got, want)


COMPILE_FOR_SM90 = """
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from rlnorm.backends import _triton_kernels as k

def build(fn, types, consts, num_warps=4):
    signature = {n: types.get(n, "constexpr") for n in fn.arg_names}
    src = ASTSource(fn, signature=signature, constexprs=consts)
    options = {"num_warps": num_warps, "enable_fp_fusion": False}
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]

rows = {"n_rows": "i32", "n_feat": "i32", "stride_xn": "i32", "stride_xd": "i32"}
x = dict(rows, x_ptr="*bf16", w_ptr="*fp64", count_ptr="*i64", until="i64", shift_ptr="*fp64",
         stride_w="i32")
build(k.update_shift_kernel, x, {"HAS_WEIGHTS": True, "HAS_UNTIL": True, "HEAD": 32, "BLOCK_D": 64})
sums = dict(x, part_f_ptr="*fp64", part_i_ptr="*i64", part_stride="i32")
for one_block, block_n, block_d in ((True, 32, 64), (False, 8, 256)):
    consts = {"HAS_WEIGHTS": True, "HAS_UNTIL": True, "ONE_BLOCK": one_block,
              "BLOCK_N": block_n, "BLOCK_D": block_d}
    assert "ld.local" not in build(k.update_sums_kernel, sums, consts, num_warps=8)
f64 = ("shift_ptr", "mean_ptr", "var_ptr", "residual_ptr", "weight_sum_ptr", "params_ptr",
       "out_ptr", "part_f_ptr")
merge = {**{n: "*fp64" for n in f64}, "part_i_ptr": "*i64", "count_ptr": "*i64",
         "nonfinite_ptr": "*i64", "n_parts": "i32", "part_stride": "i32", "n_feat": "i32"}
ptx = build(k.update_merge_kernel, merge,
            {"FINALIZE": False, "EMA": True, "VAR_FLOOR": True, "BLOCK_P": 32, "BLOCK_D": 64})
assert "fma.rn" not in ptx  # no contraction: the compensated sums stay exact
norm = {**{n: "*fp64" for n in f64}, **rows, "x_ptr": "*fp16", "y_ptr": "*fp16",
        "clipped_ptr": "*i64"}
build(k.normalize_kernel, norm, {"COMPUTE": tl.float32, "CENTER": True, "CLAMP": True,
                                 "COUNT": True, "BLOCK_N": 64, "BLOCK_D": 64})
ret = {"rewards_ptr": "*fp32", "dones_ptr": "*u8", "returns_ptr": "*fp64",
       "trajectory_ptr": "*fp64", "new_returns_ptr": "*fp64", "params_ptr": "*fp64",
       "n_steps": "i32", "n_envs": "i32", "stride_rt": "i32", "stride_re": "i32",
       "stride_dt": "i32", "stride_de": "i32"}
build(k.discounted_returns_kernel, ret, {"BLOCK_E": 128})
print("compiled")
"""


@pytest.mark.slow
def test_kernels_compile_to_sm90_machine_code_without_a_gpu() -> None:
    # The interpreter is lenient; this runs Triton's real compiler (to PTX and, with the
    # ptxas that ships with triton, to a cubin) for an H100/H200, no device needed.
    out = _run(COMPILE_FOR_SM90, TRITON_INTERPRET="0")
    if "ModuleNotFoundError" in out.stderr or "ImportError" in out.stderr:
        pytest.skip(f"this triton cannot compile ahead of time here: {out.stderr[-300:]}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "compiled"


class _Uncompilable:
    """A kernel that fails at launch, as Triton's do on a GPU older than it supports."""

    def __getitem__(self, grid: object):
        def launch(*args: object, **kwargs: object) -> None:
            raise RuntimeError("Triton only supports devices of CUDA compute capability >= 7.5")

        return launch


def test_kernels_that_cannot_compile_turn_the_fused_path_off_with_one_warning(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    kernels = fused._load()
    for name in ("update_sums_kernel", "normalize_kernel", "discounted_returns_kernel"):
        monkeypatch.setattr(kernels, name, _Uncompilable())
    monkeypatch.setattr(fused, "interpreting", lambda: False)  # as on a real GPU
    monkeypatch.setattr(fused, "_enabled", True)
    monkeypatch.setattr(fused, "_fell_back", False)
    got, want = RunningMeanStd(3, clip=2.0), RunningMeanStd(3, clip=2.0)
    x = _batch(40, 3, torch.float32, seed=1, bad=False)
    with pytest.warns(RuntimeWarning, match=r"update_sums.*compute capability.*RLNORM_FUSED=0"):
        got.update(x)
    assert not fused.enabled()
    want.update(x)
    # The failed launch wrote nothing: the torch code's update was applied exactly once.
    assert _states_equal(State(*got.state), State(*want.state))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning: the kernels stay off
        assert torch.equal(got.normalize(x), want.normalize(x))
        got.update(x)
    monkeypatch.setattr(fused, "_enabled", True)
    monkeypatch.setattr(fused, "_fell_back", False)
    with pytest.warns(RuntimeWarning, match=r"`normalize`"):
        assert torch.equal(got.normalize(x), want.normalize(x))
    monkeypatch.setattr(fused, "_enabled", True)
    monkeypatch.setattr(fused, "_fell_back", False)
    rewards = torch.ones(3, 2)
    dones = torch.zeros(3, 2, dtype=torch.bool)
    start = torch.zeros(2, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match=r"`discounted_returns`"):
        trajectory, _ = dispatch.discounted_returns(rewards, dones, start, 0.5)
    assert torch.equal(trajectory, torch_returns(rewards, dones, start, 0.5)[0])


def test_under_the_interpreter_a_failing_kernel_is_raised_not_hidden(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(fused._load(), "update_sums_kernel", _Uncompilable())
    rms = RunningMeanStd(3)
    with pytest.raises(fused.KernelError, match="update_sums"):
        rms.update(_batch(8, 3, torch.float32, seed=2))
    assert fused.enabled()
    assert int(rms.count) == 0


class _CountingReducer(_FixedReducer):
    """A :class:`_FixedReducer` that counts its all-reduces."""

    def __init__(self, sums: mom.ShiftedSums) -> None:
        super().__init__(sums)
        self.reductions = 0

    def __call__(self, sums):
        self.reductions += 1
        return super().__call__(sums)


def test_a_merge_kernel_failing_after_the_all_reduce_does_not_reduce_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    x = _batch(40, 4, F64, seed=8)
    reduced = mom.shifted_sums(x, None, mom.batch_shift(x, None))
    local = _batch(10, 4, torch.float32, seed=9)
    want = _prior_state(4, 1, 12.0)
    with fused.use_fused(False):
        m_want = Dispatcher("t").update(
            want, local, None, SKIP, local.shape, _FixedReducer(reduced)
        )
    monkeypatch.setattr(fused._load(), "update_merge_kernel", _Uncompilable())
    monkeypatch.setattr(fused, "interpreting", lambda: False)
    monkeypatch.setattr(fused, "_enabled", True)
    monkeypatch.setattr(fused, "_fell_back", False)
    got, reducer = _prior_state(4, 1, 12.0), _CountingReducer(reduced)
    with pytest.warns(RuntimeWarning, match="update_merge"):
        m_got = Dispatcher("t").update(got, local, None, SKIP, local.shape, reducer)
    assert reducer.reductions == 1  # a second all-reduce would hang ranks that did not fail
    assert _states_equal(got, want)
    for a, b in zip(m_got, m_want, strict=True):
        assert torch.equal(a, b)


def test_use_fused_does_not_turn_kernels_back_on_after_they_failed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(fused, "interpreting", lambda: False)
    monkeypatch.setattr(fused, "_enabled", True)
    monkeypatch.setattr(fused, "_fell_back", False)
    with fused.use_fused(True), pytest.warns(RuntimeWarning, match="example"):
        fused.fall_back(fused.KernelError("rlnorm's fused kernel `example` failed."))
    assert not fused.enabled()
    with fused.use_fused(True):
        assert not fused.enabled()


def test_clearing_a_dispatcher_keeps_the_scratch_a_captured_graph_may_still_use() -> None:
    door = Dispatcher("t")
    state = initial_state((3,), prior_weight=0.0)
    door.update(state, _batch(8, 3, torch.float32, seed=3, bad=False), None, SKIP, (8, 3))
    scratch = [t.data_ptr() for t in door.workspace._buffers[state.mean.device, 3]]
    door.clear()
    assert [t.data_ptr() for t in door.workspace._buffers[state.mean.device, 3]] == scratch
