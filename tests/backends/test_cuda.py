"""CUDA: agreement with the CPU, device errors, CUDA graphs, fused kernels (skipped without a GPU).

Tests that take the ``fused_path`` fixture run twice: through the fused Triton kernels
(:mod:`rlnorm.backends.fused`, compiled for the GPU) and through the torch code.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import assert_close, assert_state_equal, state_of
from rlnorm import RewardNormalizer, RunningMeanStd
from rlnorm.algebra import moments as mom
from rlnorm.algebra.returns import discounted_returns as torch_returns
from rlnorm.algebra.state import as_moments, initial_state
from rlnorm.backends import cuda_graphs, fused

pytestmark = pytest.mark.cuda

F64 = torch.float64


@pytest.fixture(params=[True, False], ids=["fused", "torch"])
def fused_path(request: pytest.FixtureRequest):
    """Run a test through the fused kernels (where triton is installed) and the torch code."""
    if request.param and not fused.available():
        pytest.skip("triton is not installed")
    with fused.use_fused(request.param):
        yield request.param


def batches(n: int = 5, rows: int = 257, dim: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for i in range(n):
        gen = torch.Generator().manual_seed(i)
        x = torch.randn(rows + 31 * i, dim, generator=gen, dtype=F64) * (1 + i) + 1e3
        x[3 * i, i % dim] = math.nan
        mask = torch.rand(x.shape[0], generator=gen) > 0.1
        out.append((x, mask))
    return out


def cuda_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.cpu() for k, v in state_of(module).items()}


@pytest.mark.parametrize("device", ["cuda", torch.device("cuda"), "cuda:0"])
def test_device_argument_places_float64_statistics_on_the_gpu(device) -> None:
    rms = RunningMeanStd(3, device=device)
    for buffer in rms.buffers():
        assert buffer.is_cuda
    assert rms.mean.dtype == F64


@pytest.mark.parametrize("momentum", [None, 0.8])
def test_cuda_update_and_normalize_match_cpu_within_1e12(
    momentum: float | None, fused_path: bool
) -> None:
    cpu = RunningMeanStd(4, momentum=momentum)
    gpu = RunningMeanStd(4, momentum=momentum, device="cuda")
    for x, mask in batches():
        cpu.update(x, mask=mask)
        gpu.update(x.cuda(), mask=mask.cuda())
        got = cuda_state(gpu)
        want = state_of(cpu)
        assert torch.equal(got["count"], want["count"])
        assert torch.equal(got["nonfinite_count"], want["nonfinite_count"])
        assert_close(got["mean"], want["mean"], rtol=1e-12)
        assert_close(got["var"], want["var"], rtol=1e-12)
        y = x[:50]
        assert_close(gpu.normalize(y.cuda()), cpu.normalize(y), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_low_precision_inputs_accumulate_like_cpu(
    dtype: torch.dtype, fused_path: bool
) -> None:
    cpu, gpu = RunningMeanStd(4), RunningMeanStd(4, device="cuda")
    for x, _ in batches(3):
        cpu.update(x.to(dtype))
        gpu.update(x.to(dtype).cuda())
    assert_close(gpu.mean, cpu.mean, rtol=1e-12)
    assert_close(gpu.var, cpu.var, rtol=1e-12)
    y = batches(1)[0][0][:10].to(dtype)
    out = gpu.normalize(y.cuda())
    assert out.dtype == dtype
    tol = {torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float32: 1e-6}[dtype]
    assert_close(out, cpu.normalize(y), rtol=tol, atol=tol)  # NaN rows stay NaN on both


def test_input_on_another_device_is_an_error_naming_both_devices() -> None:
    gpu = RunningMeanStd(2, device="cuda")
    cpu = RunningMeanStd(2)
    x = torch.randn(5, 2)
    for call in (gpu.update, gpu.normalize, gpu.denormalize):
        with pytest.raises(ValueError, match="cpu") as err:
            call(x)
        assert "cuda:0" in str(err.value)
    with pytest.raises(ValueError, match="cuda:0") as err:
        cpu.update(x.cuda())
    assert "cpu" in str(err.value)
    with pytest.raises(ValueError, match="`mask`") as err:
        gpu.update(x.cuda(), mask=torch.ones(5, dtype=torch.bool))
    assert "cpu" in str(err.value)
    assert "cuda:0" in str(err.value)
    with pytest.raises(ValueError, match="`other`"):
        gpu.merge_(cpu)


def test_load_state_dict_from_cpu_moves_the_state_to_the_module_device() -> None:
    cpu = RunningMeanStd(4)
    for x, mask in batches(2):
        cpu.update(x, mask=mask)
    gpu = RunningMeanStd(4, device="cuda")
    gpu.load_state_dict(cpu.state_dict())
    for buffer in gpu.buffers():
        assert buffer.is_cuda
    assert_state_equal(cuda_state(gpu), state_of(cpu))


def test_module_to_cuda_and_back_keeps_float64_statistics_bitwise() -> None:
    rms = RunningMeanStd(4)
    rms.update(batches(1)[0][0])
    before = state_of(rms)
    rms.to("cuda").half()
    assert rms.mean.is_cuda
    assert rms.mean.dtype == F64
    rms.cpu()
    assert_state_equal(state_of(rms), before)


def test_reward_normalizer_on_cuda_matches_cpu(fused_path: bool) -> None:
    gen = torch.Generator().manual_seed(7)
    rewards = torch.randn(20, 6, generator=gen, dtype=F64)
    dones = torch.rand(20, 6, generator=gen) < 0.2
    cpu = RewardNormalizer(6, gamma=0.9)
    gpu = RewardNormalizer(6, gamma=0.9, device="cuda")
    cpu.update(rewards, dones)
    gpu.update(rewards.cuda(), dones.cuda())
    assert_close(gpu.returns, cpu.returns, rtol=1e-13, atol=1e-13)
    assert_close(gpu.stats.var, cpu.stats.var, rtol=1e-12)
    assert_close(gpu.normalize(rewards.cuda()), cpu.normalize(rewards), rtol=1e-12)


def _capture(step, static_x: torch.Tensor, warmup: int = 3):
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            step(static_x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step(static_x)
    return graph, out


@pytest.mark.parametrize("shape", [(4,), ()], ids=["vector", "scalar"])
def test_cuda_graph_of_update_and_normalize_replays_equal_to_eager(
    shape: tuple[int, ...], fused_path: bool
) -> None:
    graphed = RunningMeanStd(shape, device="cuda")
    eager = RunningMeanStd(shape, device="cuda")

    def step(x: torch.Tensor) -> torch.Tensor:
        graphed.update(x)
        return graphed.normalize(x)

    static_x = torch.zeros(64, *shape, device="cuda", dtype=F64)
    graph, static_out = _capture(step, static_x)
    graphed.reset()  # forget the warm-up updates; capture itself ran nothing
    for i in range(5):
        gen = torch.Generator().manual_seed(100 + i)
        x = (torch.randn(64, *shape, generator=gen, dtype=F64) * (1 + i) + 10 * i).cuda()
        x[i] = math.nan
        static_x.copy_(x)
        graph.replay()
        want = (eager.update(x), eager.normalize(x))[1]
        torch.cuda.synchronize()
        assert torch.equal(graphed.count, eager.count)
        assert torch.equal(graphed.nonfinite_count, eager.nonfinite_count)
        assert_close(graphed.mean, eager.mean, rtol=1e-12, atol=1e-12)
        assert_close(graphed.var, eager.var, rtol=1e-12)
        assert_close(static_out, want, rtol=1e-12, atol=1e-12)


def test_eager_normalize_after_a_replayed_graph_update_sees_the_new_statistics(
    fused_path: bool,
) -> None:
    # Graph replays write the buffers without touching Python-side version counters, so
    # anything cached from the statistics on the eager path must not go stale.
    rms = RunningMeanStd(4, device="cuda")
    static_x = torch.zeros(32, 4, device="cuda", dtype=F64)
    graph, _ = _capture(rms.update, static_x)
    rms.reset()
    probe = torch.randn(8, 4, device="cuda", dtype=F64)
    rms.normalize(probe)  # may populate an eager-side cache
    static_x.copy_(torch.randn(32, 4, dtype=F64) * 5 + 20)
    graph.replay()
    torch.cuda.synchronize()
    fresh = RunningMeanStd(4, device="cuda")
    fresh.load_state_dict(rms.state_dict())
    assert int(rms.count) == 32
    assert_close(rms.normalize(probe), fresh.normalize(probe), rtol=1e-12, atol=1e-12)


@pytest.mark.slow
def test_compiled_fullgraph_update_and_normalize_on_cuda_equal_eager() -> None:
    torch._dynamo.reset()
    compiled = RunningMeanStd((), device="cuda")
    eager = RunningMeanStd((), device="cuda")
    update = torch.compile(compiled.update, fullgraph=True)
    normalize = torch.compile(compiled.normalize, fullgraph=True)
    for i in range(3):
        x = torch.randn(32, dtype=F64, device="cuda") * 2 + i
        update(x)
        eager.update(x)
        assert torch.equal(compiled.count, eager.count)
        assert_close(compiled.weight_sum, eager.weight_sum, rtol=1e-12)
        assert_close(compiled.mean, eager.mean, rtol=1e-12)
        assert_close(compiled.var, eager.var, rtol=1e-12)
        assert_close(normalize(x), eager.normalize(x), rtol=1e-12, atol=1e-12)
    torch._dynamo.reset()


# ------------------------------------------------------------------ automatic CUDA graphs


class _EagerTwin(RunningMeanStd):
    """A normalizer whose CUDA calls never take the automatic graphs."""

    def update(self, *args, **kwargs):
        with cuda_graphs.use_graphs(False):
            return super().update(*args, **kwargs)

    def normalize(self, x):
        with cuda_graphs.use_graphs(False):
            return super().normalize(x)


def _eager_twin(shape, **kwargs) -> RunningMeanStd:
    return _EagerTwin(shape, device="cuda", **kwargs)


@pytest.mark.parametrize("masked", [False, True], ids=["plain", "masked"])
@pytest.mark.parametrize("momentum", [None, 0.9], ids=["exact", "ema"])
def test_eager_cuda_calls_replay_graphs_bitwise_equal_to_eager(
    masked, momentum, fused_path: bool
) -> None:
    graphed = RunningMeanStd((2, 3), momentum=momentum, device="cuda")
    eager = _eager_twin((2, 3), momentum=momentum)
    gen = torch.Generator().manual_seed(7)
    for i in range(6):
        x = (torch.randn(64, 2, 3, generator=gen) * (1 + i) + 100 * i).cuda()
        x[i, 0, 1] = math.nan
        mask = (torch.rand(64, generator=gen) > 0.2).cuda() if masked else None
        got, want = graphed.update(x, mask), eager.update(x, mask)
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a, b)
        assert_state_equal(cuda_state(graphed), cuda_state(eager))
        y = graphed.normalize(x)
        assert torch.equal(y.nan_to_num(7.0), eager.normalize(x).nan_to_num(7.0))
    # The first call of a signature runs eagerly (warm-up), the second is captured.
    assert len(graphed._dispatch.update_graphs._graphs) == 1
    assert len(graphed._dispatch.normalize_graphs._graphs) == 1


def test_graph_outputs_are_fresh_tensors_each_call(fused_path: bool) -> None:
    rms = RunningMeanStd(4, device="cuda")
    x = torch.randn(16, 4, device="cuda")
    outs = [rms.normalize(x) for _ in range(4)]
    moments = [rms.update(x) for _ in range(4)]
    assert len({o.data_ptr() for o in outs}) == 4
    assert len({m.mean.data_ptr() for m in moments}) == 4
    before = outs[-1].clone()
    rms.normalize(x * 3)
    assert torch.equal(outs[-1], before)


def test_changing_clip_after_capture_takes_effect(fused_path: bool) -> None:
    rms = RunningMeanStd(2, device="cuda")
    rms.update(torch.randn(100, 2, device="cuda"))
    x = torch.full((8, 2), 50.0, device="cuda")
    for _ in range(3):
        assert float(rms.normalize(x).max()) == 10.0
    rms.clip = 2.0
    assert float(rms.normalize(x).max()) == 2.0


def test_many_signatures_and_device_moves_stay_correct(fused_path: bool) -> None:
    graphed = RunningMeanStd(3, device="cuda")
    eager = _eager_twin(3)
    for rows in [5, 6, 7, 8, 9, 10, 5, 6, 7, 8, 9, 10]:
        x = torch.randn(rows, 3, device="cuda") + rows
        graphed.update(x)
        eager.update(x)
    assert_state_equal(cuda_state(graphed), cuda_state(eager))
    graphed.cpu()
    assert not graphed._dispatch.update_graphs._graphs
    graphed.cuda()
    x = torch.randn(5, 3, device="cuda")
    for _ in range(3):
        graphed.update(x)
        eager.update(x)
    assert_state_equal(cuda_state(graphed), cuda_state(eager))


def test_graphs_can_be_turned_off() -> None:
    rms = RunningMeanStd(3, device="cuda")
    x = torch.randn(8, 3, device="cuda")
    with cuda_graphs.use_graphs(False):
        for _ in range(3):
            rms.update(x)
            rms.normalize(x)
    assert not rms._dispatch.update_graphs._graphs
    assert not rms._dispatch.normalize_graphs._graphs


def test_environment_variable_turns_graphs_off() -> None:
    code = "from rlnorm.backends import cuda_graphs; print(cuda_graphs.graphs_enabled())"
    env = {**os.environ, "RLNORM_CUDA_GRAPHS": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr


def test_reward_normalizer_on_cuda_with_graphs_equals_the_cpu(fused_path: bool) -> None:
    gpu = RewardNormalizer(4, device="cuda")
    cpu = RewardNormalizer(4)
    gen = torch.Generator().manual_seed(3)
    for _ in range(8):
        rewards = torch.randn(4, generator=gen, dtype=F64)
        dones = torch.rand(4, generator=gen) > 0.7
        gpu.update(rewards.cuda(), dones.cuda())
        cpu.update(rewards, dones)
    assert_close(gpu.stats.var.cpu(), cpu.stats.var, rtol=1e-12)
    ones = torch.ones(4, dtype=F64)
    assert_close(gpu.normalize(ones.cuda()).cpu(), cpu.normalize(ones), rtol=1e-12)


def test_load_state_dict_with_assign_drops_graphs_of_the_old_buffers(fused_path: bool) -> None:
    graphed = RunningMeanStd(3, device="cuda")
    eager = _eager_twin(3)
    x = torch.randn(16, 3, device="cuda")
    for _ in range(3):  # warm-up, capture, replay
        graphed.update(x)
        eager.update(x)
    state = {k: v.clone() for k, v in eager.state_dict().items()}
    graphed.load_state_dict(state, assign=True)
    eager.load_state_dict(state)
    y = torch.randn(16, 3, device="cuda") * 4 + 2
    for _ in range(3):
        graphed.update(y)
        eager.update(y)
    assert_state_equal(cuda_state(graphed), cuda_state(eager))


def test_graphs_captured_in_inference_mode_do_not_serve_calls_outside_it() -> None:
    rms = RunningMeanStd(3, device="cuda")
    x = torch.randn(16, 3, device="cuda")
    with torch.inference_mode():
        for _ in range(3):
            rms.normalize(x)
    with torch.no_grad():
        for _ in range(3):
            out = rms.normalize(x)
    assert not out.is_inference()


# ------------------------------------------------------------------ fused kernels


needs_triton = pytest.mark.skipif(not fused.available(), reason="triton is not installed")


def _torch_twin(shape, **kwargs) -> RunningMeanStd:
    """A normalizer whose calls never take the fused kernels."""

    class Twin(RunningMeanStd):
        def update(self, *args, **kw):
            with fused.use_fused(False):
                return super().update(*args, **kw)

        def normalize(self, *args, **kw):
            with fused.use_fused(False):
                return super().normalize(*args, **kw)

    return Twin(shape, device="cuda", **kwargs)


@needs_triton
def test_eager_cuda_calls_take_the_fused_kernels_and_graph_replays_launch_none() -> None:
    rms = RunningMeanStd(8, device="cuda")
    x = torch.randn(16, 8, device="cuda")
    before = fused.calls()
    rms.update(x)  # warm-up, eager: three launches
    rms.normalize(x)
    after = fused.calls()
    assert after["update_sums"] - before["update_sums"] == 1
    assert after["update_merge"] - before["update_merge"] == 1
    assert after["normalize"] - before["normalize"] == 1
    for _ in range(2):  # capture, then a replay
        rms.update(x)
        rms.normalize(x)
    replayed = fused.calls()
    for _ in range(3):
        rms.update(x)
        rms.normalize(x)
    assert fused.calls() == replayed
    assert int(rms.count) == 16 * 6


SHAPES = [(16, 8), (4096, 48), (16384, 256), (33, 1100), (1, 1)]


@needs_triton
@pytest.mark.parametrize(("n", "d"), SHAPES, ids=[f"{n}x{d}" for n, d in SHAPES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, F64])
def test_fused_kernels_match_the_torch_path_at_benchmark_shapes(n, d, dtype) -> None:
    got = RunningMeanStd(d, device="cuda", clip=3.0)
    want = _torch_twin(d, clip=3.0)
    gen = torch.Generator().manual_seed(n + d)
    for i in range(4):  # eager, capture, replays
        x = (torch.randn(n, d, generator=gen, dtype=F64) * (1 + i) + 50 * i).to(dtype).cuda()
        if n > 8:
            x[3, 0] = math.nan
            x[5, d - 1] = math.inf
        mask = (torch.rand(n, generator=gen) > 0.1).cuda()
        m_got, m_want = got.update(x, mask), want.update(x, mask)
        assert torch.equal(m_got.count, m_want.count)
        got_state, want_state = cuda_state(got), cuda_state(want)
        assert torch.equal(got_state["count"], want_state["count"])
        assert torch.equal(got_state["nonfinite_count"], want_state["nonfinite_count"])
        assert_close(got_state["mean"], want_state["mean"], rtol=1e-12, atol=1e-9)
        assert_close(got_state["var"], want_state["var"], rtol=1e-11)
        y_got, c_got = got.normalize(x, return_clipped=True)
        y_want, c_want = want.normalize(x, return_clipped=True)
        tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
        assert_close(y_got, y_want, rtol=tol, atol=tol)
        assert abs(int(c_got) - int(c_want)) <= max(1, n * d // 100_000)


@needs_triton
def test_fused_update_and_normalize_are_bitwise_deterministic() -> None:
    x = torch.randn(16384, 256, device="cuda") * 3 + 7
    outs = []
    for _ in range(2):
        rms = RunningMeanStd(256, device="cuda", momentum=0.99)
        with cuda_graphs.use_graphs(False):
            for _ in range(3):
                rms.update(x)
            outs.append((cuda_state(rms), rms.normalize(x)))
    assert_state_equal(outs[0][0], outs[1][0])
    assert torch.equal(outs[0][1], outs[1][1])


@needs_triton
@pytest.mark.parametrize(
    ("momentum", "var_floor"), [(None, None), (0.9, 0.3)], ids=["chan", "ema-floor"]
)
def test_compiled_merge_kernel_is_bitwise_the_torch_merge_on_the_same_sums(
    momentum, var_floor
) -> None:
    # No multiply-add contraction and IEEE division: the kernel's arithmetic is torch's.
    x = torch.randn(300, 16, dtype=F64, device="cuda") * 0.01 + 1e4
    sums = mom.shifted_sums(x, None, mom.batch_shift(x, None))

    def prior():
        state = initial_state((16,), 5.0, "cuda")
        state.mean.fill_(1e4 + 0.5)
        return state

    state = prior()
    fused.merge_sums(fused.Workspace(), state, sums, momentum, var_floor)
    current = as_moments(prior())
    batch = mom.batch_moments(sums)
    if momentum is None:
        new = mom.merge(current, batch)
    else:
        new = mom.merge_ema(current, batch, momentum, var_floor)
    assert torch.equal(state.mean, new.mean)
    assert torch.equal(state.var, new.var)
    assert torch.equal(state.mean_residual, new.mean_residual)


@needs_triton
@pytest.mark.parametrize(("steps", "envs"), [(1, 4096), (128, 4096), (7, 3)])
def test_fused_returns_kernel_is_bitwise_the_torch_recursion(steps, envs) -> None:
    rewards = torch.randn(steps, envs, device="cuda")
    rewards[0, 0] = math.nan
    dones = torch.rand(steps, envs, device="cuda") < 0.05
    start = torch.randn(envs, dtype=F64, device="cuda")
    got = fused.discounted_returns(rewards, dones, start, 0.99)
    want = torch_returns(rewards, dones, start, 0.99)
    assert torch.equal(got[1], want[1])
    assert torch.equal(got[0].nan_to_num(5.0), want[0].nan_to_num(5.0))


@needs_triton
def test_fused_nonfinite_raise_leaves_the_cuda_state_unchanged() -> None:
    rms = RunningMeanStd(3, nonfinite="raise", device="cuda")
    rms.update(torch.randn(20, 3, device="cuda"))
    before = cuda_state(rms)
    bad = torch.randn(20, 3, device="cuda")
    bad[2, 2] = math.inf
    with pytest.raises(ValueError, match="NaN or Inf"):
        rms.update(bad)
    assert_state_equal(cuda_state(rms), before)


@needs_triton
def test_fused_kernels_run_inside_a_callers_own_capture() -> None:
    graphed = RunningMeanStd(48, device="cuda")
    eager = RunningMeanStd(48, device="cuda")

    def step(x: torch.Tensor) -> torch.Tensor:
        graphed.update(x)
        return graphed.normalize(x)

    static_x = torch.zeros(4096, 48, device="cuda")
    before = fused.calls()
    graph, static_out = _capture(step, static_x)
    assert fused.calls()["update_sums"] > before["update_sums"]  # fused, also in the capture
    graphed.reset()
    for i in range(3):
        x = torch.randn(4096, 48, device="cuda") * (i + 1)
        static_x.copy_(x)
        graph.replay()
        want = (eager.update(x), eager.normalize(x))[1]
        torch.cuda.synchronize()
        assert_state_equal(cuda_state(graphed), cuda_state(eager))
        assert torch.equal(static_out, want)


@needs_triton
@pytest.mark.slow
def test_fused_kernels_index_batches_past_two_to_the_31_elements() -> None:
    rows = 2**31 // 64 + 64
    x = torch.ones(rows, 64, dtype=torch.float16, device="cuda")
    x[-1] = 3.0
    rms = RunningMeanStd(64, device="cuda")
    with cuda_graphs.use_graphs(False):
        rms.update(x)
        y = rms.normalize(x[-2:])
    assert int(rms.count) == rows
    assert_close(rms.mean, torch.full((64,), 1 + 2 / rows, dtype=F64), rtol=1e-12)
    assert float(y[1, 0]) > 100
    del x
    torch.cuda.empty_cache()
