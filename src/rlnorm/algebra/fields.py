"""Declared tensor fields: each field of a state tuple says once what it holds and how.

A state tuple (:class:`~rlnorm.algebra.state.State`, the buffers of a normalizer;
:class:`~rlnorm.algebra.moments.ShiftedSums`, a batch's sums) is a ``NamedTuple`` whose fields
are annotated ``Annotated[Tensor, Field(...)]``. Registration, reset, load checks, the native
kernels' arguments and the all-reduce payload all read these declarations, so adding a
statistic is one line (the model is torchmetrics' ``add_state(name, default, dist_reduce_fx)``).

Example:
    >>> from rlnorm.algebra.fields import fields
    >>> from rlnorm.algebra.moments import ShiftedSums
    >>> [(name, f.reduce) for name, f in fields(ShiftedSums)][-1]
    ('shift', None)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, TypeVar, get_type_hints

import torch
from torch import Tensor

__all__ = ["Field", "fields", "pack", "unpack"]

T = TypeVar("T", bound=tuple)


@dataclass(frozen=True)
class Field:
    """What one tensor of a state tuple holds.

    Attributes:
        dtype: its dtype.
        per_feature: of the feature shape (``True``) or a 0-d scalar (``False``).
        initial: every element's value before any data.
        nonnegative: what the values are called (e.g. ``"variances"``) when negative ones
            must be refused on load; ``None`` for any sign. Floating fields must be finite.
        reduce: how the distributed all-reduce combines ranks' values (``"sum"``), or ``None``
            for a value all ranks already share, which is not sent.
        legacy_from: states written before this field existed stand it in from this field...
        legacy_copy: ...with its value cast to ``dtype`` (``True``) or zeros of its shape.

    Example:
        >>> import torch
        >>> Field(torch.float64, per_feature=True, initial=1.0).initial
        1.0
    """

    dtype: torch.dtype
    per_feature: bool = False
    initial: float = 0.0
    nonnegative: str | None = None
    reduce: Literal["sum"] | None = "sum"
    legacy_from: str | None = None
    legacy_copy: bool = False


@functools.cache
def fields(cls: type[NamedTuple]) -> tuple[tuple[str, Field], ...]:
    """The ``(name, Field)`` declarations of a state tuple class, in field order.

    Args:
        cls: a ``NamedTuple`` class whose fields are annotated ``Annotated[Tensor, Field]``.

    Returns:
        One pair per field.

    Example:
        >>> from rlnorm.algebra.state import State
        >>> [name for name, _ in fields(State)][:3]
        ['mean', 'var', 'count']
    """
    hints = get_type_hints(cls, include_extras=True)
    return tuple((name, hints[name].__metadata__[0]) for name in cls._fields)


def _wire_order(cls: type[NamedTuple]) -> list[tuple[int, Field]]:
    """Reduced fields as the payload lays them out: the scalars, then the per-feature ones."""
    reduced = [(i, f) for i, (_, f) in enumerate(fields(cls)) if f.reduce is not None]
    return sorted(reduced, key=lambda item: item[1].per_feature)


def pack(values: tuple) -> Tensor:
    """The reduced fields of a state tuple as one float64 tensor, for a single all-reduce.

    The scalars lead, then the per-feature fields, each group in declaration order (for
    :class:`~rlnorm.algebra.moments.ShiftedSums`: weight, count, nonfinite, sum, sum_sq).
    Integer fields travel as float64, exact up to ``2**53``.

    Args:
        values: an instance of a declared state tuple.

    Returns:
        A 1-D float64 tensor; :func:`unpack` turns it back.

    Example:
        >>> import torch
        >>> from rlnorm.algebra.moments import batch_shift, shifted_sums
        >>> x = torch.tensor([[1.0], [3.0]])
        >>> pack(shifted_sums(x, None, batch_shift(x, None))).tolist()
        [2.0, 2.0, 0.0, 0.0, 2.0]
    """
    return torch.cat(
        [values[i].to(torch.float64).reshape(-1) for i, _ in _wire_order(type(values))]
    )


def unpack(payload: Tensor, like: T) -> T:
    """Inverse of :func:`pack`: ``like`` with its reduced fields read from ``payload``.

    Args:
        payload: a (reduced) :func:`pack` of a tuple shaped like ``like``.
        like: the tuple packed; its unreduced fields are kept, its shapes and dtypes reused.

    Returns:
        A tuple of ``like``'s type; integer fields are rounded back to their dtype.

    Example:
        >>> import torch
        >>> from rlnorm.algebra.moments import batch_shift, shifted_sums
        >>> x = torch.tensor([[1.0], [3.0]])
        >>> sums = shifted_sums(x, None, batch_shift(x, None))
        >>> int(unpack(pack(sums) * 2, sums).count)
        4
    """
    out: list[Any] = list(like)
    start = 0
    for i, field in _wire_order(type(like)):
        n = like[i].numel()
        value = payload[start : start + n].reshape(like[i].shape)
        if not field.dtype.is_floating_point:
            value = value.round().to(field.dtype)
        out[i] = value
        start += n
    return type(like)(*out)
