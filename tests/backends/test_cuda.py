"""CUDA: agreement with the CPU, device errors, CUDA-graph capture (skipped without a GPU)."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import assert_close, assert_state_equal, state_of
from rlnorm import RewardNormalizer, RunningMeanStd
from rlnorm.backends import cuda_graphs

pytestmark = pytest.mark.cuda

F64 = torch.float64


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
def test_cuda_update_and_normalize_match_cpu_within_1e12(momentum: float | None) -> None:
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
def test_cuda_low_precision_inputs_accumulate_like_cpu(dtype: torch.dtype) -> None:
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


def test_reward_normalizer_on_cuda_matches_cpu() -> None:
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
    shape: tuple[int, ...],
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


def test_eager_normalize_after_a_replayed_graph_update_sees_the_new_statistics() -> None:
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
def test_eager_cuda_calls_replay_graphs_bitwise_equal_to_eager(masked, momentum) -> None:
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


def test_graph_outputs_are_fresh_tensors_each_call() -> None:
    rms = RunningMeanStd(4, device="cuda")
    x = torch.randn(16, 4, device="cuda")
    outs = [rms.normalize(x) for _ in range(4)]
    moments = [rms.update(x) for _ in range(4)]
    assert len({o.data_ptr() for o in outs}) == 4
    assert len({m.mean.data_ptr() for m in moments}) == 4
    before = outs[-1].clone()
    rms.normalize(x * 3)
    assert torch.equal(outs[-1], before)


def test_changing_clip_after_capture_takes_effect() -> None:
    rms = RunningMeanStd(2, device="cuda")
    rms.update(torch.randn(100, 2, device="cuda"))
    x = torch.full((8, 2), 50.0, device="cuda")
    for _ in range(3):
        assert float(rms.normalize(x).max()) == 10.0
    rms.clip = 2.0
    assert float(rms.normalize(x).max()) == 2.0


def test_many_signatures_and_device_moves_stay_correct() -> None:
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


def test_reward_normalizer_on_cuda_with_graphs_equals_the_cpu() -> None:
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


def test_load_state_dict_with_assign_drops_graphs_of_the_old_buffers() -> None:
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
