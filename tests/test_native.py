"""The native CPU kernels agree with the torch code path, and are used only where they may be."""

from __future__ import annotations

import copy
import io
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import assert_close, reference_moments, state_of
from rlnorm import RunningMeanStd, _native
from rlnorm.moments import shifted_sums

F64 = torch.float64


def both_paths(make: callable, batches: list[tuple[torch.Tensor, torch.Tensor | None]]):
    """Run the same updates natively and with torch; return both states and batch moments."""
    out = []
    for on in (True, False):
        rms = make()
        with _native.native_kernels(on):
            moments = [rms.update(x, mask) for x, mask in batches]
        out.append((state_of(rms), moments))
    return out


def assert_states_agree(native: dict, torch_state: dict, rtol: float = 1e-13) -> None:
    """Counts equal; weight, mean and variance within ``rtol``; the compensated means (mean
    plus residual) within ``rtol`` of the standard deviation."""
    for key in ("count", "nonfinite_count"):
        assert torch.equal(native[key], torch_state[key]), key
    for key in ("weight_sum", "mean", "var"):
        assert_close(native[key], torch_state[key], rtol=rtol, atol=1e-300)
    exact_gap = (native["mean"] - torch_state["mean"]) + (
        native["mean_residual"] - torch_state["mean_residual"]
    )
    assert bool((exact_gap.abs() <= rtol * torch_state["var"].sqrt() + 1e-300).all())


def test_the_kernels_are_built_so_the_default_cpu_path_is_fast() -> None:
    assert _native.available(), "rlnorm._kernels was not built: install with a C compiler"
    assert _native.enabled() == (os.environ.get("RLNORM_NATIVE", "1") != "0")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("momentum", [None, 0.0, 0.9])
@pytest.mark.parametrize("mask", ["none", "bool", "float"])
def test_native_update_matches_the_torch_path_within_1e13(dtype, momentum, mask) -> None:
    gen = torch.Generator().manual_seed(0)
    batches = []
    for rows in (7, 1, 300, 33):
        x = (torch.randn(rows, 2, 3, generator=gen, dtype=F64) * 5 + 1e4).to(dtype)
        m = None
        if mask == "bool":
            m = torch.rand(rows, generator=gen) > 0.3
        elif mask == "float":
            m = torch.rand(rows, generator=gen, dtype=F64) * (torch.rand(rows, generator=gen) > 0.3)
        batches.append((x, m))
    (native, native_moments), (ref, ref_moments) = both_paths(
        lambda: RunningMeanStd((2, 3), momentum=momentum), batches
    )
    assert_states_agree(native, ref)
    for a, b in zip(native_moments, ref_moments, strict=True):
        assert a.mean.shape == b.mean.shape == (2, 3)
        assert a.weight.dtype == F64
        assert a.count.dtype == torch.int64
        assert torch.equal(a.count, b.count)
        assert_close(a.weight, b.weight, rtol=1e-15)
        assert_close(a.mean, b.mean, rtol=1e-13)
        assert_close(a.var, b.var, rtol=1e-11, atol=1e-300)


def test_native_update_with_var_floor_and_until_matches_the_torch_path() -> None:
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(50, 4, generator=gen) * s + s, None) for s in (1.0, 30.0, 0.1, 5.0)]
    (native, _), (ref, _) = both_paths(
        lambda: RunningMeanStd(4, momentum=0.8, var_floor=0.5, until=120), batches
    )
    assert_states_agree(native, ref)
    assert int(native["count"]) == 150  # the third batch crossed `until` and was taken whole


def test_native_update_skips_and_counts_nonfinite_rows_like_the_torch_path() -> None:
    x = torch.randn(40, 3, dtype=F64)
    x[3, 1] = float("nan")
    x[7] = float("inf")
    x[9, 0] = -float("inf")
    x[11] = 1e200  # finite, but its square overflows float64
    mask = torch.ones(40)
    mask[5] = 0.0
    x[5, 2] = float("nan")  # masked out: padding, not counted
    (native, _moments), (ref, _) = both_paths(lambda: RunningMeanStd(3), [(x, mask)])
    assert_states_agree(native, ref)
    assert int(native["nonfinite_count"]) == 4
    keep = torch.ones(40, dtype=torch.bool)
    keep[[3, 5, 7, 9, 11]] = False
    mean, var, _, count = reference_moments(x[keep])
    assert int(native["count"]) == count == 35
    assert_close(native["mean"], mean, rtol=1e-14)
    assert_close(native["var"], var, rtol=1e-13)


def test_native_raise_mode_raises_before_anything_changes() -> None:
    rms = RunningMeanStd(2, nonfinite="raise")
    rms.update(torch.randn(10, 2))
    before = state_of(rms)
    bad = torch.randn(5, 2)
    bad[2, 0] = float("nan")
    with pytest.raises(ValueError, match=r"1 row\(s\) with NaN or Inf.*\(5, 2\)"):
        rms.update(bad)
    after = state_of(rms)
    for key in before:
        assert torch.equal(before[key], after[key]), key


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_native_sums_are_bitwise_independent_of_the_thread_count(threads: int) -> None:
    # 9 chunks of 2**18 elements: the work is split over threads, the result must not be.
    x = torch.randn(9 * 4096 + 17, 64, generator=torch.Generator().manual_seed(2)) * 3 + 100
    shift = torch.full((64,), 100.0, dtype=F64)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = shifted_sums(x, None, shift)
        torch.set_num_threads(threads)
        many = shifted_sums(x, None, shift)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(one.sum, many.sum)
    assert torch.equal(one.sum_sq, many.sum_sq)
    ref = shifted_sums(x, None, shift, chunk_elements=1 << 18)  # the torch code path
    assert_close(many.sum, ref.sum, rtol=1e-12, atol=1e-9)
    assert_close(many.sum_sq, ref.sum_sq, rtol=1e-13)


@settings(max_examples=60)
@given(
    rows=st.integers(0, 70),
    features=st.integers(1, 9),
    loc=st.sampled_from([0.0, 1e3, -1e6]),
    scale=st.sampled_from([1e-3, 1.0, 1e4]),
    seed=st.integers(0, 2**31 - 1),
)
def test_native_shifted_sums_match_the_torch_path(rows, features, loc, scale, seed) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, features, generator=gen, dtype=F64) * scale + loc
    weights = torch.rand(rows, generator=gen, dtype=F64)
    shift = torch.full((features,), loc, dtype=F64)
    for w in (None, weights):
        native = shifted_sums(x, w, shift)
        ref = shifted_sums(x, w, shift, chunk_elements=1 << 18)
        assert torch.equal(native.count, ref.count)
        assert_close(native.weight, ref.weight, rtol=1e-14)
        assert_close(native.sum, ref.sum, rtol=1e-12, atol=1e-12 * scale * max(rows, 1))
        assert_close(native.sum_sq, ref.sum_sq, rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("clip", [None, 10.0, 0.5])
@pytest.mark.parametrize("center", [True, False])
def test_native_normalize_is_bitwise_equal_to_the_torch_formula(dtype, clip, center) -> None:
    rms = RunningMeanStd(5, clip=clip, center=center)
    x = torch.randn(600, 5, dtype=dtype) * 3 + 2
    x[4, 1] = float("nan")
    x[5, 2] = float("inf")
    for updated in (False, True):  # before the first update normalize is the identity
        with _native.native_kernels(True):
            native = rms.normalize(x)
        with _native.native_kernels(False):
            ref = rms.normalize(x)
        assert native.dtype == dtype
        assert native.shape == x.shape
        assert torch.equal(native.nan_to_num(nan=123.0), ref.nan_to_num(nan=123.0))
        assert bool(native[4, 1].isnan())
        rms.update(torch.randn(64, 5, dtype=F64) * 2 + 1)
        assert updated or not torch.equal(rms.normalize(x[:3]), x[:3])


def test_large_native_normalize_split_over_threads_equals_the_torch_formula() -> None:
    rms = RunningMeanStd(256)
    x = torch.randn(4096, 256) * 4 - 3
    rms.update(x[:100])
    with _native.native_kernels(True):
        native = rms.normalize(x)
    with _native.native_kernels(False):
        ref = rms.normalize(x)
    assert torch.equal(native, ref)


def test_native_update_invalidates_the_normalize_cache() -> None:
    rms = RunningMeanStd(3)
    rms.update(torch.randn(20, 3))
    x = torch.randn(4, 3)
    first = rms.normalize(x)
    rms.update(torch.randn(20, 3) * 10 + 5)
    expected = ((x.double() - rms.mean) / (rms.var + rms.epsilon).sqrt()).float()
    second = rms.normalize(x)
    assert not torch.equal(first, second)
    assert_close(second, expected, rtol=1e-5)


def test_native_update_bumps_versions_so_autograd_sees_the_in_place_change() -> None:
    rms = RunningMeanStd(3)
    rms.update(torch.randn(20, 3))
    p = torch.ones(3, requires_grad=True)
    loss = (p * rms.var).sum()  # autograd saves rms.var for the backward pass
    rms.update(torch.randn(20, 3))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_normalize_keeps_gradients_to_the_input_through_the_torch_path() -> None:
    rms = RunningMeanStd(3, clip=None)
    rms.update(torch.randn(20, 3) * 2)
    x = torch.randn(4, 3, requires_grad=True)
    rms.normalize(x).sum().backward()
    expected = (1.0 / (rms.var + rms.epsilon).sqrt()).float().expand(4, 3)
    assert_close(x.grad, expected, rtol=1e-6)


def test_non_contiguous_input_takes_the_torch_path_with_the_same_result() -> None:
    rms = RunningMeanStd(4)
    base = torch.randn(4, 30)
    rms.update(base.T)  # a transposed view: not contiguous
    ref = RunningMeanStd(4)
    ref.update(base.T.contiguous())
    assert_close(rms.mean, ref.mean, rtol=1e-14)
    assert_close(rms.var, ref.var, rtol=1e-13)
    assert torch.equal(rms.normalize(base.T), ref.normalize(base.T.contiguous()))


def test_inference_mode_buffers_take_the_torch_path() -> None:
    with torch.inference_mode():
        rms = RunningMeanStd(2)
        rms.update(torch.randn(10, 2))
    assert int(rms.count) == 10


def test_environment_variable_turns_the_kernels_off() -> None:
    code = "from rlnorm import _native; print(_native.enabled())"
    env = {**os.environ, "RLNORM_NATIVE": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr


def test_compiled_update_and_normalize_trace_the_torch_path() -> None:
    rms = RunningMeanStd(3)
    ref = RunningMeanStd(3)
    x = torch.randn(16, 3) * 2 + 1
    torch.compile(rms.update, fullgraph=True)(x)
    ref.update(x)
    assert_close(rms.mean, ref.mean, rtol=1e-14)
    assert_close(rms.var, ref.var, rtol=1e-13)
    out = torch.compile(rms.normalize, fullgraph=True)(x)
    assert_close(out, ref.normalize(x), rtol=1e-6, atol=1e-6)
    assert np.isfinite(out.numpy()).all()


def _allocated_bytes(fn: callable) -> int:
    """Bytes torch's CPU allocator handed out during ``fn()`` (frees not subtracted)."""
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        fn()
    return sum(e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0)


def test_update_allocates_nothing_proportional_to_the_batch() -> None:
    rms = RunningMeanStd(256)
    x = torch.randn(16384, 256)  # 16 MiB
    rms.update(x)
    allocated = _allocated_bytes(lambda: rms.update(x))
    assert allocated < 64 * 1024  # the batch moments only (3 x 256 float64 and two scalars)


def test_normalize_allocates_only_its_output() -> None:
    rms = RunningMeanStd(256)
    x = torch.randn(16384, 256)
    rms.update(x)
    rms.normalize(x)  # fills the affine cache
    allocated = _allocated_bytes(lambda: rms.normalize(x))
    assert x.numel() * 4 <= allocated < x.numel() * 4 + 64 * 1024


def test_buffers_of_the_wrong_size_take_the_torch_path_instead_of_being_overrun() -> None:
    rms = RunningMeanStd(4)
    backing = torch.arange(4, dtype=F64)
    rms.var = backing[:2]  # a buffer replaced by one too small for the kernel's writes
    with pytest.raises(RuntimeError):
        rms.update(torch.randn(8, 4))  # the torch code refuses the shapes
    assert torch.equal(backing, torch.arange(4, dtype=F64))  # nothing written past the end


def test_shifted_sums_with_mis_shaped_weights_or_shift_behave_like_the_torch_code() -> None:
    x = torch.randn(6, 3, dtype=F64)
    shift = torch.zeros(3, dtype=F64)
    one = torch.ones(1, dtype=F64)
    for native in (True, False):
        with _native.native_kernels(native):
            assert float(shifted_sums(x, one, shift).weight) == 6.0  # broadcast, as torch does
            with pytest.raises(RuntimeError):
                shifted_sums(x, torch.ones(2, dtype=F64), shift)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -1.0])
def test_unusable_mask_weights_count_as_zero_on_both_paths(bad: float) -> None:
    x = torch.randn(8, 3, dtype=F64)
    mask = torch.ones(8, dtype=F64)
    mask[5] = bad
    states = []
    for native in (True, False):
        rms = RunningMeanStd(3)
        with _native.native_kernels(native):
            rms.update(x, mask)
        states.append(state_of(rms))
    assert_states_agree(*states)
    keep = torch.ones(8, dtype=torch.bool)
    keep[5] = False
    mean, var, _, count = reference_moments(x[keep])
    assert int(states[0]["count"]) == count == 7
    assert int(states[0]["nonfinite_count"]) == 0
    assert_close(states[0]["mean"], mean, rtol=1e-14)
    assert_close(states[0]["var"], var, rtol=1e-13)


def test_copies_and_pickles_drop_caches_that_hold_buffer_addresses() -> None:
    rms = RunningMeanStd(3)
    rms.update(torch.randn(10, 3))
    x = torch.randn(4, 3)
    rms.normalize(x)
    buffer = io.BytesIO()
    torch.save(rms, buffer)
    buffer.seek(0)
    for copy_ in (copy.deepcopy(rms), torch.load(buffer, weights_only=False)):
        assert copy_._affine_cache is None
        assert copy_._native_state is None
        assert torch.equal(copy_.normalize(x), rms.normalize(x))
        copy_.update(torch.randn(10, 3) + 5)  # writes the copy's buffers, not the original's
        assert not torch.equal(copy_.mean, rms.mean)
