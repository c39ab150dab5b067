"""The native CPU kernels agree with the torch code path, and are used only where they may be.

Which path ran is read from :func:`rlnorm.backends.native.calls` (each kernel counts the calls it
served), so a test that compares the two paths fails if the native one silently did not run,
and one about the torch path fails if a kernel ran instead. Without the extension built the
comparisons skip; the fallback itself is tested in subprocesses.
"""

from __future__ import annotations

import copy
import io
import json
import math
import os
import subprocess
import sys
from collections.abc import Callable

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import assert_close, reference_moments, state_of
from rlnorm import RunningMeanStd
from rlnorm.algebra import moments
from rlnorm.algebra.affine import affine
from rlnorm.algebra.drift import batch_shift
from rlnorm.algebra.moments import Moments
from rlnorm.algebra.state import as_moments
from rlnorm.backends import native as _native
from rlnorm.backends.dispatch import shifted_sums

F64 = torch.float64
EPS = torch.finfo(F64).eps

needs_kernels = pytest.mark.skipif(
    not _native.available(),
    reason="rlnorm.backends._kernels was not built: no native path to compare",
)


def kernel_calls(kernel: str) -> int:
    """Calls the native kernel ``kernel`` has served in this process so far."""
    return _native.calls()[kernel]


def both_paths(
    make: Callable[[], RunningMeanStd], batches: list[tuple[torch.Tensor, torch.Tensor | None]]
) -> list[tuple[dict[str, torch.Tensor], list[Moments]]]:
    """Run the same updates natively and with torch; return both states and batch moments.

    Asserts that the first run took the native kernel for every batch and the second never.
    """
    if not _native.available():
        pytest.skip("rlnorm.backends._kernels was not built: no native path to compare")
    out = []
    for on in (True, False):
        rms = make()
        before = kernel_calls("update")
        with _native.native_kernels(on):
            moments = [rms.update(x, mask) for x, mask in batches]
        assert kernel_calls("update") - before == (len(batches) if on else 0)
        out.append((state_of(rms), moments))
    return out


def assert_states_agree(native: dict, torch_state: dict, rtol: float = 1e-13) -> None:
    """Counts equal; weight and variance within ``rtol``; the means within ``rtol`` of the
    mean's magnitude plus the standard deviation (the sums differ in order, so the error is
    relative to the spread, not to a mean that may be near 0); the compensated means (mean
    plus residual) within ``rtol`` of the standard deviation."""
    for key in ("count", "nonfinite_count"):
        assert torch.equal(native[key], torch_state[key]), key
    for key in ("weight_sum", "var"):
        assert_close(native[key], torch_state[key], rtol=rtol, atol=1e-300)
    std = torch_state["var"].sqrt()
    mean_gap = (native["mean"] - torch_state["mean"]).abs()
    assert bool((mean_gap <= rtol * (torch_state["mean"].abs() + std) + 1e-300).all())
    exact_gap = (native["mean"] - torch_state["mean"]) + (
        native["mean_residual"] - torch_state["mean_residual"]
    )
    assert bool((exact_gap.abs() <= rtol * std + 1e-300).all())


def test_the_kernels_are_built_so_the_default_cpu_path_is_fast() -> None:
    # The extension is optional (setup.py builds it with optional=True): an install without a
    # C compiler is a valid install, so its absence is a skip, not a failure. CI, which has a
    # compiler, sets RLNORM_REQUIRE_NATIVE=1 so that a broken build cannot pass unnoticed.
    if not _native.available():
        if os.environ.get("RLNORM_REQUIRE_NATIVE") == "1":
            pytest.fail(
                "rlnorm.backends._kernels was not built but RLNORM_REQUIRE_NATIVE=1 requires it"
            )
        pytest.skip(
            "rlnorm.backends._kernels was not built (no C compiler at install time); the torch "
            "fallback is tested by "
            "test_without_the_kernels_rlnorm_updates_and_normalizes_correctly. "
            "Set RLNORM_REQUIRE_NATIVE=1 to make this a failure."
        )
    assert _native.enabled() == (os.environ.get("RLNORM_NATIVE", "1") != "0")
    rms = RunningMeanStd(3)
    before = _native.calls()
    rms.update(torch.randn(10, 3))
    rms.normalize(torch.randn(4, 3))
    after = _native.calls()
    served = _native.enabled()
    assert after["update"] - before["update"] == after["normalize"] - before["normalize"] == served


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


@needs_kernels
def test_native_raise_mode_raises_before_anything_changes() -> None:
    rms = RunningMeanStd(2, nonfinite="raise")
    rms.update(torch.randn(10, 2))
    before = state_of(rms)
    bad = torch.randn(5, 2)
    bad[2, 0] = float("nan")
    calls = kernel_calls("update")
    with (
        _native.native_kernels(True),
        pytest.raises(ValueError, match=r"1 row\(s\) with NaN or Inf.*\(5, 2\)"),
    ):
        rms.update(bad)
    assert kernel_calls("update") == calls + 1  # the kernel found the row and raised
    after = state_of(rms)
    for key in before:
        assert torch.equal(before[key], after[key]), key


@needs_kernels
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_native_sums_are_bitwise_independent_of_the_thread_count(threads: int) -> None:
    # 9 chunks of 2**18 elements: the work is split over threads, the result must not be.
    x = torch.randn(9 * 4096 + 17, 64, generator=torch.Generator().manual_seed(2)) * 3 + 100
    shift = torch.full((64,), 100.0, dtype=F64)
    previous = torch.get_num_threads()
    calls = kernel_calls("shifted_sums")
    try:
        torch.set_num_threads(1)
        one = shifted_sums(x, None, shift)
        torch.set_num_threads(threads)
        many = shifted_sums(x, None, shift)
    finally:
        torch.set_num_threads(previous)
    assert kernel_calls("shifted_sums") == calls + 2
    assert torch.equal(one.sum, many.sum)
    assert torch.equal(one.sum_sq, many.sum_sq)
    ref = moments.shifted_sums(x, None, shift)  # the torch code path
    assert_close(many.sum, ref.sum, rtol=1e-12, atol=1e-9)
    assert_close(many.sum_sq, ref.sum_sq, rtol=1e-13)


@needs_kernels
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
        calls = kernel_calls("shifted_sums")
        native = shifted_sums(x, w, shift)
        ref = moments.shifted_sums(x, w, shift)  # the algebra itself: torch
        assert kernel_calls("shifted_sums") == calls + 1
        assert torch.equal(native.count, ref.count)
        assert_close(native.weight, ref.weight, rtol=1e-14)
        assert_close(native.sum, ref.sum, rtol=1e-12, atol=1e-12 * scale * max(rows, 1))
        assert_close(native.sum_sq, ref.sum_sq, rtol=1e-12)


def native_and_torch_normalize(rms: RunningMeanStd, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``rms.normalize(x)`` on the native path, then on the torch path (each checked to run)."""
    calls = kernel_calls("normalize")
    with _native.native_kernels(True):
        native = rms.normalize(x)
    assert kernel_calls("normalize") == calls + 1
    with _native.native_kernels(False):
        ref = rms.normalize(x)
    assert kernel_calls("normalize") == calls + 1
    return native, ref


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("clip", [None, 10.0, 0.5])
@pytest.mark.parametrize("center", [True, False])
def test_native_normalize_is_bitwise_equal_to_the_torch_formula(dtype, clip, center) -> None:
    rms = RunningMeanStd(5, clip=clip, center=center)
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(600, 5, generator=gen, dtype=F64) * 3 + 2).to(dtype)
    x[4, 1] = float("nan")
    x[5, 2] = float("inf")
    for updated in (False, True):
        if updated:
            rms.update(torch.randn(64, 5, generator=gen, dtype=F64) * 2 + 1)
        native, ref = native_and_torch_normalize(rms, x)
        assert native.dtype == dtype
        assert native.shape == x.shape
        assert torch.equal(native.nan_to_num(nan=123.0), ref.nan_to_num(nan=123.0))
        assert bool(native[4, 1].isnan())
        # Before any update normalize is the identity (no clamp either); after one it is not.
        assert torch.equal(native.nan_to_num(nan=123.0), x.nan_to_num(nan=123.0)) == (not updated)


@needs_kernels
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("rows", [2047, 2048, 4096])  # 2048 rows: the fewest that are split
def test_large_native_normalize_split_over_threads_equals_the_torch_formula(
    rows: int, threads: int
) -> None:
    assert (rows * 256 >= _native._PARALLEL_ELEMENTS) == (rows >= 2048)
    rms = RunningMeanStd(256)
    x = torch.randn(rows, 256) * 4 - 3
    rms.update(x[:100])
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        native, ref = native_and_torch_normalize(rms, x)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(native, ref)


@pytest.mark.parametrize(
    "x",
    [
        torch.zeros(4, 3),
        torch.zeros(4, 3, dtype=F64),
        torch.zeros(4, 3, dtype=torch.float16),
        torch.zeros(4, 3, dtype=torch.int64),
        torch.zeros(3, 4).T,  # not contiguous
        torch.zeros(4, 3, requires_grad=True),
    ],
    ids=["f32", "f64", "f16", "int64", "transposed", "requires_grad"],
)
def test_eligible_as_with_the_dtype_already_read_answers_as_eligible(x: torch.Tensor) -> None:
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            assert _native.eligible_as(x, x.dtype) == _native.eligible(x)
    with _native.native_kernels(False):
        assert not _native.eligible_as(x, x.dtype)


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
    calls = kernel_calls("normalize")
    rms.normalize(x).sum().backward()
    assert kernel_calls("normalize") == calls
    expected = (1.0 / (rms.var + rms.epsilon).sqrt()).float().expand(4, 3)
    assert_close(x.grad, expected, rtol=1e-6)


def test_non_contiguous_input_takes_the_torch_path_with_the_same_result() -> None:
    rms = RunningMeanStd(4)
    base = torch.randn(4, 30)
    calls = kernel_calls("update")
    rms.update(base.T)  # a transposed view: not contiguous
    assert kernel_calls("update") == calls
    ref = RunningMeanStd(4)
    ref.update(base.T.contiguous())
    assert_close(rms.mean, ref.mean, rtol=1e-14)
    assert_close(rms.var, ref.var, rtol=1e-13)
    assert torch.equal(rms.normalize(base.T), ref.normalize(base.T.contiguous()))


def test_normalizer_built_in_inference_mode_keeps_normal_buffers_that_the_kernels_serve() -> None:
    gen = torch.Generator().manual_seed(4)
    first, second = torch.randn(2, 10, 2, generator=gen, dtype=F64) * 3 + 5
    calls = kernel_calls("update")
    with torch.inference_mode():  # a deployment wrapper around building and updating
        rms = RunningMeanStd(2)
        rms.update(first)
        rms.update(second)
    assert not rms.mean.is_inference()
    assert kernel_calls("update") == calls + 2
    mean, var, _, count = reference_moments(torch.cat([first, second]))
    assert int(rms.count) == count == 20
    assert_close(rms.mean, mean, rtol=1e-14)
    assert_close(rms.var, var, rtol=1e-13)


def test_inference_tensor_buffers_take_the_torch_path_and_normalize_uncached() -> None:
    gen = torch.Generator().manual_seed(4)
    first, second = torch.randn(2, 10, 2, generator=gen, dtype=F64) * 3 + 5
    calls = kernel_calls("update")
    with torch.inference_mode():
        rms = RunningMeanStd(2)
        for name, buffer in list(rms.named_buffers()):
            setattr(rms, name, buffer.clone())  # a user's own assignment: inference tensors
        rms.update(first)
        out_first = rms.normalize(first)
        rms.update(second)
        out_second = rms.normalize(first)  # no version counters: the affine is recomputed
    assert rms.mean.is_inference()
    # The kernel never ran (it may not write inference tensors behind torch's back), so the
    # torch code computed these statistics; they are those of the 20 rows.
    assert kernel_calls("update") == calls
    mean, var, _, count = reference_moments(torch.cat([first, second]))
    assert int(rms.count) == count == 20
    assert_close(rms.mean, mean, rtol=1e-14)
    assert_close(rms.var, var, rtol=1e-13)
    assert_close(out_second, (first.numpy() - mean) / np.sqrt(var + rms.epsilon), rtol=1e-12)
    assert not torch.equal(out_first, out_second)


FALLBACK_SCRIPT = """
import json, sys
if sys.argv[1] == "block":  # what an install without a C compiler looks like
    class NoKernels:
        def find_spec(self, name, path=None, target=None):
            if name == "rlnorm.backends._kernels":
                raise ModuleNotFoundError("no module named 'rlnorm.backends._kernels' (simulated)")
            return None
    sys.meta_path.insert(0, NoKernels())
import torch
from rlnorm import RunningMeanStd
from rlnorm.backends import native as _native
from rlnorm.backends.dispatch import shifted_sums
gen = torch.Generator().manual_seed(5)
x = torch.randn(300, 3, generator=gen, dtype=torch.float64) * 4 + 100
mask = (torch.rand(300, generator=gen) > 0.2).to(torch.float64)
rms = RunningMeanStd(3, clip=None)
rms.update(x[:150])
rms.update(x[150:], mask[150:])
out = rms.normalize(x[:5])
sums = shifted_sums(x, None, torch.full((3,), 100.0, dtype=torch.float64))
print(json.dumps({
    "available": _native.available(), "enabled": _native.enabled(),
    "kernel_loaded": "rlnorm.backends._kernels" in sys.modules, "calls": _native.calls(),
    "x": x.tolist(), "mask": mask.tolist(), "count": int(rms.count),
    "mean": rms.mean.tolist(), "var": rms.var.tolist(), "normalized": out.tolist(),
    "sum": sums.sum.tolist(), "sum_sq": sums.sum_sq.tolist(),
}))
"""


@pytest.mark.parametrize("how", ["block", "RLNORM_NATIVE=0"])
def test_without_the_kernels_rlnorm_updates_and_normalizes_correctly(how: str) -> None:
    # "block": the import of rlnorm.backends._kernels fails, as in an install without a C compiler;
    # "RLNORM_NATIVE=0": the extension is there but switched off. Either way the torch code
    # must serve, and serve right: no kernel call, statistics and outputs of the reference.
    env = {**os.environ, "RLNORM_NATIVE": "0" if how != "block" else "1"}
    run = subprocess.run(
        [sys.executable, "-c", FALLBACK_SCRIPT, how], env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout)
    if how == "block":
        assert not got["available"]
        assert not got["kernel_loaded"]
    else:
        assert got["available"] == _native.available()
    assert not got["enabled"]
    assert set(got["calls"].values()) == {0}
    x = np.array(got["x"])
    weights = np.concatenate([np.ones(150), np.array(got["mask"])[150:]])
    mean, var, _, count = reference_moments(x, weights)
    assert got["count"] == count
    assert_close(np.array(got["mean"]), mean, rtol=1e-14)
    assert_close(np.array(got["var"]), var, rtol=1e-12)
    scaled = (x[:5] - np.array(got["mean"])) / np.sqrt(np.array(got["var"]) + 1e-8)
    assert_close(np.array(got["normalized"]), scaled, rtol=1e-12, atol=1e-12)
    assert_close(np.array(got["sum"]), (x - 100).sum(0), rtol=1e-12, atol=1e-10)
    assert_close(np.array(got["sum_sq"]), ((x - 100) ** 2).sum(0), rtol=1e-12)


def test_compiled_update_and_normalize_trace_the_torch_path() -> None:
    rms = RunningMeanStd(3)
    ref = RunningMeanStd(3)
    x = torch.randn(16, 3) * 2 + 1
    calls = _native.calls()
    torch.compile(rms.update, fullgraph=True)(x)
    assert _native.calls() == calls
    ref.update(x)
    assert_close(rms.mean, ref.mean, rtol=1e-14)
    assert_close(rms.var, ref.var, rtol=1e-13)
    out = torch.compile(rms.normalize, fullgraph=True)(x)
    assert_close(out, ref.normalize(x), rtol=1e-6, atol=1e-6)
    assert np.isfinite(out.numpy()).all()


def _allocated_bytes(fn: Callable[[], object]) -> int:
    """Bytes torch's CPU allocator handed out during ``fn()`` (frees not subtracted)."""
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        fn()
    return sum(e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0)


def test_update_allocates_no_torch_memory_proportional_to_the_batch() -> None:
    # torch's allocator only; the kernel's own scratch and the process as a whole are measured
    # by the two tests after this one.
    rms = RunningMeanStd(256)
    x = torch.randn(16384, 256)  # 16 MiB
    rms.update(x)
    allocated = _allocated_bytes(lambda: rms.update(x))
    assert allocated < 64 * 1024  # the batch moments only (3 x 256 float64 and two scalars)


@needs_kernels
@pytest.mark.parametrize("threads", [1, 2])
def test_native_update_scratch_is_fixed_by_features_and_threads_not_rows(threads: int) -> None:
    # Every allocation of the kernels is counted by the C code itself (_native.scratch_peak).
    # 512 features: chunks of 512 rows, so both batches give every thread a chunk; the old
    # kernel held 3 partials per chunk (8 * 512 * (3 * 32 + 6) bytes at 16384 rows).
    d = 512
    rms = RunningMeanStd(d)
    previous = torch.get_num_threads()
    peaks = []
    try:
        torch.set_num_threads(threads)
        for rows in (2048, 16384):
            x = torch.randn(rows, d)
            _native.scratch_peak()  # resets the peak
            calls = kernel_calls("update")
            rms.update(x)
            assert kernel_calls("update") == calls + 1
            peaks.append(_native.scratch_peak())
            rms.normalize(x)
            assert _native.scratch_peak() == 0  # normalize holds no scratch at all
    finally:
        torch.set_num_threads(previous)
    assert peaks[0] == peaks[1] == 8 * ((9 * threads + 4) * d + 2 * threads)


RSS_SCRIPT = """
import json, os, sys, torch
# One CPU for every thread: the kernel's per-CPU RSS counters then lag by one CPU's batch only.
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
from rlnorm import RunningMeanStd
from rlnorm.backends import native as _native

def kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))

def peak_growth(fn):
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak resident set (VmHWM) to the current one
    before = kib("VmRSS:")
    fn()
    return (kib("VmHWM:") - before) * 1024

out = {}
for native, rows_list in ((True, (1024, 8192)), (False, (512, 2048))):
    if native and not _native.available():
        continue
    for rows in rows_list:
        x = torch.randn(rows, 2048)
        with _native.native_kernels(native):
            rms = RunningMeanStd(2048)
            rms.update(x)  # first calls: code pages, lazy initialisations
            rms.normalize(x)
            out[f"{native} {rows}"] = (
                peak_growth(lambda: rms.update(x)), peak_growth(lambda: rms.normalize(x))
            )
print(json.dumps(out))
"""


@pytest.mark.skipif(
    not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux's resettable peak RSS"
)
def test_update_peak_memory_does_not_grow_with_the_batch_on_either_path() -> None:
    # The whole process is measured, torch's allocator and the kernel's mallocs alike: the
    # growth of the peak resident set during one call, in a subprocess where glibc serves
    # every block of 64 KiB or more with a fresh mmap (so scratch cannot hide in memory that
    # was already resident). Batches of 8 and 64 MiB natively (the old kernel's scratch,
    # 3/128 float64 per batch element at 2048 features, grew by 2.6 MiB between them), of 4 and
    # 16 MiB on the slower torch path (a float64 copy would grow by 24 MiB). The measure is
    # approximate: Linux folds a CPU's RSS count into the total every max(32, 2 * CPUs) pages,
    # so each of the two reads may lag by that much (the subprocess runs on one CPU).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    run = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT], env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    growth = json.loads(run.stdout)
    lag = os.sysconf("SC_PAGE_SIZE") * max(32, 2 * (os.cpu_count() or 1))
    slack = max(1 << 20, 2 * lag)
    for native, (small, large) in ((True, (1024, 8192)), (False, (512, 2048))):
        if native and not _native.available():
            continue
        (update_small, normalize_small) = growth[f"{native} {small}"]
        (update_large, normalize_large) = growth[f"{native} {large}"]
        assert update_large - update_small < slack, growth
        # normalize: its output, 4 bytes per element, and nothing else
        for rows, grew in ((small, normalize_small), (large, normalize_large)):
            assert abs(grew - 4 * 2048 * rows) < slack, growth
    if _native.available():  # the native update: the kernel's scratch, about 0.4 MiB
        assert growth["True 8192"][0] < slack, growth


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
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(6), dtype=F64)
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
    # Tolerances from the error of recursive summation over n = 7 rows (u = eps / 2 the unit
    # roundoff). The reference mean sum(x) / n is off by at most (n + 1) u max|x|. rlnorm's is
    # shift + sum(x - shift) / n with the shift the mean of these same rows: the second term is
    # off by at most (n + 1) u sum|x - shift| / n <= 2 (n + 1) u max|x|, and rounding the
    # compensated mean to its stored high part adds u |mean| <= u max|x|. So the two differ by
    # at most (3 n + 4) u max|x|, an absolute bound: a relative one fails whenever the mean of
    # these standard normals falls near 0. The variances (here about 1, far from 0) are the
    # mean of squares around a shift equal to the mean up to rounding, each within (n + 3) u
    # relative, so within 2 (n + 3) u of each other; twice that leaves room for the shift's
    # rounding.
    n, u = 7, EPS / 2
    assert_close(
        states[0]["mean"], mean, rtol=0.0, atol=(3 * n + 4) * u * float(x[keep].abs().max())
    )
    assert_close(states[0]["var"], var, rtol=4 * (n + 3) * u)


def test_copies_and_pickles_drop_caches_that_hold_buffer_addresses() -> None:
    rms = RunningMeanStd(3)
    rms.update(torch.randn(10, 3))
    x = torch.randn(4, 3)
    rms.normalize(x)
    buffer = io.BytesIO()
    torch.save(rms, buffer)
    buffer.seek(0)
    for copy_ in (copy.deepcopy(rms), torch.load(buffer, weights_only=False)):
        assert copy_._dispatch._affine_cache is None
        assert copy_._dispatch.pointers.tensors == ()
        assert torch.equal(copy_.normalize(x), rms.normalize(x))
        copy_.update(torch.randn(10, 3) + 5)  # writes the copy's buffers, not the original's
        assert not torch.equal(copy_.mean, rms.mean)


def _state_with(
    features: int, weight: float, gen: torch.Generator, scale: float = 1.0
) -> tuple[RunningMeanStd, Moments]:
    rms = RunningMeanStd(features)
    state = rms.state
    state.weight_sum.fill_(weight)
    state.mean.copy_(torch.randn(features, generator=gen, dtype=F64) * scale)
    state.var.copy_(torch.rand(features, generator=gen, dtype=F64) * scale)
    state.mean_residual.copy_(torch.randn(features, generator=gen, dtype=F64) * 1e-12)
    return rms, moments.Moments(*[getattr(rms, f) for f in ("weight_sum", "count", "mean", "var")])


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("clip", [None, 10.0, 0.1])
@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("weight", [0.0, 3.0])
def test_native_affine_map_is_bitwise_the_torch_map(dtype, clip, center, weight) -> None:
    gen = torch.Generator().manual_seed(4)
    for features, scale in ((1, 1.0), (7, 1e6), (64, 1e-9)):
        rms, _ = _state_with(features, weight, gen, scale)
        rms.var[0] = 0.0  # epsilon alone under the square root
        for epsilon in (0.0, 1e-8):
            before = kernel_calls("affine")
            made = _native.try_affine(rms.state, clip, epsilon, center, dtype)
            assert made is not None
            assert kernel_calls("affine") == before + 1
            native_map, args = made
            torch_map = affine(as_moments(rms.state), clip, epsilon, center, dtype)
            for name, got, want in zip(torch_map._fields, native_map, torch_map, strict=True):
                assert got.dtype == dtype, name
                assert got.shape == want.shape, name
                assert torch.equal(got, want), (name, features, epsilon)
            assert args == _native.affine_args(native_map)
            assert args.is_f64 == (dtype is F64)


def test_float64_clip_bound_is_the_clip_exactly_not_its_float32_rounding() -> None:
    rms = RunningMeanStd(2, clip=0.1)
    rms.update(torch.tensor([[0.0, 0.0], [100.0, -100.0]], dtype=F64))
    for on in (True, False):
        with _native.native_kernels(on):
            rms._dispatch.clear()
            y = rms.normalize(torch.tensor([[1e6, -1e6]], dtype=F64))
        assert y.tolist() == [[0.1, -0.1]], on


@needs_kernels
def test_native_batch_shift_follows_the_drift_formula_with_nan_and_empty_batches() -> None:
    gen = torch.Generator().manual_seed(5)
    cases = []
    for features in (1, 5, 40):
        _, running = _state_with(features, 2.0, gen)
        batch = running._replace(mean=torch.randn(features, generator=gen, dtype=F64))
        cases.append((batch, running))
    running_zero_var = running._replace(var=torch.zeros_like(running.var))  # std clamped at 1e-12
    cases.append((batch, running_zero_var))
    nan_batch = batch._replace(mean=batch.mean.clone().index_fill_(0, torch.tensor([3]), math.nan))
    cases.append((nan_batch, running))
    empty = batch._replace(weight=torch.zeros((), dtype=F64))
    cases.append((empty, running))
    for b, r in cases:
        got, want = _native.try_batch_shift(b, r), float(batch_shift(b, r))
        assert isinstance(got, float)
        if math.isnan(want):
            assert math.isnan(got)
        else:  # sqrt rounded exactly here, by torch to within half an ulp
            assert got == pytest.approx(want, rel=4 * EPS, abs=0.0)
    assert _native.try_batch_shift(empty, running) == 0.0
    assert _native.try_batch_shift(b, r._replace(mean=r.mean.float())) is None  # not float64
