"""``pack``/``unpack``: the all-reduce payload follows the declarations of ``ShiftedSums``."""

from __future__ import annotations

import torch

from rlnorm.algebra.fields import fields, pack, unpack
from rlnorm.algebra.moments import ShiftedSums, batch_shift, shifted_sums


def sums_of(rows: int = 9, features: int = 4) -> ShiftedSums:
    x = torch.randn(rows, features, generator=torch.Generator().manual_seed(1)) * 3 + 7
    x[2, 1] = torch.nan
    return shifted_sums(x, None, batch_shift(x, None))


def test_every_field_is_declared_and_only_the_shift_is_not_reduced():
    declared = fields(ShiftedSums)
    assert [name for name, _ in declared] == list(ShiftedSums._fields)
    assert [name for name, f in declared if f.reduce is None] == ["shift"]
    sums = sums_of()
    for (name, field), value in zip(declared, sums, strict=True):
        assert value.dtype == field.dtype, name
        assert (value.dim() == 1) == field.per_feature, name


def test_payload_is_the_scalars_then_the_per_feature_sums_in_float64():
    sums = sums_of(features=4)
    payload = pack(sums)
    assert payload.dtype == torch.float64
    assert payload.shape == (2 * 4 + 3,)
    want = torch.cat(
        [
            torch.stack([sums.weight, sums.count.double(), sums.nonfinite.double()]),
            sums.sum,
            sums.sum_sq,
        ]
    )
    assert torch.equal(payload, want)


def test_unpack_of_pack_is_bitwise_the_sums_and_keeps_the_shift():
    sums = sums_of()
    again = unpack(pack(sums), sums)
    assert type(again) is ShiftedSums
    for name, a, b in zip(ShiftedSums._fields, sums, again, strict=True):
        assert a.dtype == b.dtype, name
        assert a.shape == b.shape, name
        assert torch.equal(a, b), name
    assert again.shift is sums.shift


def test_unpack_rounds_integer_fields_of_a_reduced_payload():
    sums = sums_of()
    doubled = unpack(pack(sums) * 2 + 1e-9, sums)
    assert doubled.count.dtype == torch.int64
    assert int(doubled.count) == 2 * int(sums.count)
    assert int(doubled.nonfinite) == 2
