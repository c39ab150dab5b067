"""Adversarial data: constant dims, huge offsets, mixed magnitudes, half precision, empties."""

from __future__ import annotations

import pytest
import torch

from conftest import assert_close, assert_state_equal, reference_moments, state_of
from rlnorm import RewardNormalizer, RunningMeanStd

F64 = torch.float64


def data(rows: int, seed: int, mean: list[float], std: list[float]) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, len(mean), generator=gen, dtype=F64)
    return x * torch.tensor(std, dtype=F64) + torch.tensor(mean, dtype=F64)


@pytest.mark.parametrize("momentum", [None, 0.9], ids=["exact", "ema"])
def test_constant_dimension_normalizes_to_finite_zeros(momentum: float | None) -> None:
    rms = RunningMeanStd(3, momentum=momentum)
    for seed in range(3):
        x = data(50, seed, [1.0, 0.0, -2.0], [1.0, 0.0, 3.0])
        x[:, 1] = 7.25  # a constant dimension
        rms.update(x.float())
    assert float(rms.var[1]) == 0.0
    assert float(rms.mean[1]) == 7.25
    out = rms.normalize(x.float())
    assert bool(torch.isfinite(out).all())
    assert bool((out[:, 1] == 0).all())
    # Off the constant value the epsilon bounds the scale, and the clip bounds the output.
    off = rms.normalize(torch.tensor([[1.0, 7.5, -2.0]]))
    assert float(off[0, 1]) == rms.clip


def test_huge_offset_with_tiny_spread_keeps_the_variance() -> None:
    rms = RunningMeanStd(2)
    chunks = [data(n, seed, [1e9, -1e9], [1e-2, 1e-2]) for seed, n in enumerate([1, 7, 500, 64])]
    for x in chunks:
        rms.update(x)
    mean, var, _, _ = reference_moments(torch.cat(chunks))
    assert_close(rms.mean, mean, rtol=1e-15)
    assert_close(rms.var, var, rtol=1e-8)
    z = rms.normalize(torch.cat(chunks))
    # float64 inputs near 1e9 are spaced 1.2e-7 apart, 1.2e-5 of this std: that is the floor.
    assert_close(z.mean(dim=0), [0.0, 0.0], rtol=0, atol=2e-5)
    want_std = torch.sqrt(rms.var / (rms.var + rms.epsilon))  # epsilon matters at var 1e-4
    assert_close(z.std(dim=0, unbiased=False), want_std, rtol=1e-4)


def test_mixed_magnitudes_in_one_batch_are_each_normalized_to_unit_scale() -> None:
    rms = RunningMeanStd(3)
    x = data(4096, 3, [1e-6, 1e6, 0.0], [1e-7, 1e5, 1.0])
    rms.update(x)
    mean, var, _, _ = reference_moments(x)
    assert_close(rms.mean, mean, rtol=1e-12)
    assert_close(rms.var, var, rtol=1e-12)
    z = rms.normalize(x)
    std = z.std(dim=0, unbiased=False)
    # The tiny dimension's variance (1e-14) is below epsilon: it is scaled by 1/sqrt(eps).
    assert_close(std[1:], [1.0, 1.0], rtol=1e-6)
    assert bool(torch.isfinite(z).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("momentum", [None, 0.9], ids=["exact", "ema"])
def test_half_precision_inputs_keep_their_dtype_with_float64_statistics(
    dtype: torch.dtype, momentum: float | None
) -> None:
    rms = RunningMeanStd(4, momentum=momentum)
    x = data(256, 4, [100.0, -3.0, 0.5, 1e3], [10.0, 1.0, 0.01, 50.0]).to(dtype)
    rms.update(x)
    for name in ("mean", "var", "weight_sum", "mean_residual"):
        assert getattr(rms, name).dtype == F64, name
    assert rms.count.dtype == torch.int64
    mean, var, _, _ = reference_moments(x)  # of the half-precision values, exactly widened
    assert_close(rms.mean, mean, rtol=1e-12)
    assert_close(rms.var, var, rtol=1e-10)
    out = rms.normalize(x)
    back = rms.denormalize(out)
    assert out.dtype == dtype
    assert back.dtype == dtype
    want = ((x.double() - rms.mean) / torch.sqrt(rms.var + rms.epsilon)).clamp(-10, 10)
    assert_close(out.double(), want.to(dtype).double(), rtol=0, atol=0.05)
    assert bool(torch.isfinite(out).all())


def test_half_precision_rewards_keep_their_dtype() -> None:
    norm = RewardNormalizer(3, gamma=0.9)
    rewards = torch.tensor([[1.0, -2.0, 0.5], [3.0, 0.0, 1.5]], dtype=torch.bfloat16)
    norm.update(rewards, torch.zeros(2, 3, dtype=torch.bool))
    assert norm.stats.var.dtype == F64
    assert norm.returns.dtype == F64
    assert norm.normalize(rewards).dtype == torch.bfloat16


@pytest.mark.parametrize("momentum", [None, 0.9], ids=["exact", "ema"])
@pytest.mark.parametrize("shape", [(0, 3), (0, 5, 3), (2, 0, 3)])
def test_empty_batches_change_nothing(momentum: float | None, shape: tuple[int, ...]) -> None:
    rms = RunningMeanStd(3, momentum=momentum)
    rms.update(data(10, 0, [1.0, 2.0, 3.0], [1.0, 1.0, 1.0]))
    before = state_of(rms)
    batch = rms.update(torch.empty(shape))
    assert float(batch.weight) == 0.0
    assert int(batch.count) == 0
    assert_state_equal(state_of(rms), before)
    assert rms.normalize(torch.empty(shape)).shape == shape


def test_empty_batch_before_any_data_keeps_the_identity() -> None:
    rms = RunningMeanStd(2)
    rms.update(torch.empty(0, 2))
    assert int(rms.count) == 0
    x = torch.tensor([[3.0, -4.0]])
    assert torch.equal(rms.normalize(x), x)


@pytest.mark.parametrize("momentum", [None, 0.9], ids=["exact", "ema"])
@pytest.mark.parametrize(
    "mask", [torch.zeros(16, dtype=torch.bool), torch.zeros(16, dtype=F64)], ids=["bool", "float"]
)
def test_a_mask_that_masks_everything_changes_nothing(
    momentum: float | None, mask: torch.Tensor
) -> None:
    rms = RunningMeanStd(2, momentum=momentum)
    rms.update(data(10, 0, [1.0, 2.0], [1.0, 1.0]))
    before = state_of(rms)
    x = data(16, 1, [50.0, -50.0], [5.0, 5.0])
    x[3, 0] = float("nan")  # masked out: neither used nor counted as non-finite
    rms.update(x, mask=mask)
    assert_state_equal(state_of(rms), before)


def test_reward_normalizer_with_zero_variance_returns_scales_finitely() -> None:
    norm = RewardNormalizer(2, gamma=0.0, mode="reward")
    for _ in range(5):
        norm.update(torch.full((2,), 3.0), torch.zeros(2, dtype=torch.bool))
    assert float(norm.stats.var) == 0.0
    scaled = norm.normalize(torch.full((2,), 3.0))
    assert bool(torch.isfinite(scaled).all())
    assert bool((scaled == 0).all())
