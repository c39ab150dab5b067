"""The affine map of normalize: identity before weight, two-part offset, clipped count, inverse."""

from __future__ import annotations

import torch

from rlnorm.algebra.affine import affine, compute_dtype, denormalize, normalize, normalize_clipped
from rlnorm.algebra.moments import Moments

F64 = torch.float64


def moments(weight: float, mean: float, var: float, residual: float = 0.0) -> Moments:
    return Moments(
        torch.tensor(weight, dtype=F64),
        torch.tensor(2),
        torch.tensor([mean], dtype=F64),
        torch.tensor([var], dtype=F64),
        torch.tensor([residual], dtype=F64),
    )


def test_without_weight_the_map_is_the_identity_without_clamp():
    a = affine(moments(0.0, 5.0, 9.0), clip=1.0, epsilon=1e-8, center=True, dtype=torch.float32)
    x = torch.tensor([[100.0], [-3.0]])
    assert torch.equal(normalize(x, a, clamp=True), x)


def test_the_offset_keeps_what_float32_rounding_of_the_mean_lost():
    mean = 1e3 + 1e-5  # not representable in float32
    a = affine(moments(1.0, mean, 1.0, residual=1e-12), None, 1e-30, True, torch.float32)
    assert float(a.offset) != mean  # float32 alone loses about 1e-5 here
    assert abs(float(a.offset) + float(a.offset_lo) - mean) < 1e-9
    y = normalize(torch.tensor([[1000.0]]), a, clamp=False)
    assert abs(float(y) - (1000.0 - mean)) < 1e-9


def test_clipped_values_are_counted_and_the_inverse_restores_unclipped_values():
    a = affine(moments(1.0, 1.0, 4.0), clip=2.0, epsilon=0.0, center=True, dtype=F64)
    x = torch.tensor([[3.0], [100.0], [-1.0]], dtype=F64)
    y, clipped = normalize_clipped(x, a, clamp=True)
    assert y.flatten().tolist() == [1.0, 2.0, -1.0]
    assert int(clipped) == 1
    assert denormalize(y, a).flatten().tolist() == [3.0, 5.0, -1.0]


def test_the_computing_dtype_is_float32_for_halves_and_the_default_for_integers():
    assert compute_dtype(torch.zeros(1, dtype=torch.float16)) == torch.float32
    assert compute_dtype(torch.zeros(1, dtype=torch.int64)) == torch.get_default_dtype()
    assert compute_dtype(torch.zeros(1, dtype=F64)) == F64
