"""The state of a running normalizer, declared once: its buffers, their kinds, defaults, checks.

:class:`State` lists the buffers of :class:`~rlnorm.RunningMeanStd` in registration (and
``state_dict``) order; each field's :class:`~rlnorm.algebra.fields.Field` says its dtype, whether
it is per feature or a scalar, its value before any data, what a loaded value must satisfy and
how states written before it existed stand it in. The module registers, resets and checks its
buffers from here, and the native kernels take their arguments from here.

Example:
    >>> from rlnorm.algebra.state import as_moments, initial_state
    >>> state = initial_state((2,), prior_weight=0.0)
    >>> state.var.tolist(), int(as_moments(state).count)
    ([1.0, 1.0], 0)
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Annotated, Any, NamedTuple

import torch
from torch import Tensor

from rlnorm.algebra.fields import Field, fields
from rlnorm.algebra.moments import Moments, residual

__all__ = ["State", "as_moments", "check_loadable", "fill_legacy", "from_moments", "initial_state"]


class State(NamedTuple):
    """The statistics buffers of a :class:`~rlnorm.RunningMeanStd`, as plain tensors.

    Attributes:
        mean: float64 mean per feature.
        var: float64 population variance per feature (never negative).
        count: int64 number of samples with non-zero weight.
        weight_sum: float64 total weight (the EMA debiasing weight in EMA mode); it starts at
            the normalizer's ``prior_weight``. States older than it: the count.
        nonfinite_count: int64 rows left out for holding NaN or Inf.
        mean_residual: float64 rounding error of ``mean`` (the exact mean is
            ``mean + mean_residual``, see :attr:`Moments.mean_residual`).
    """

    mean: Annotated[Tensor, Field(torch.float64, per_feature=True)]
    var: Annotated[
        Tensor, Field(torch.float64, per_feature=True, initial=1.0, nonnegative="variances")
    ]
    count: Annotated[Tensor, Field(torch.int64)]
    weight_sum: Annotated[Tensor, Field(torch.float64, legacy_from="count", legacy_copy=True)]
    nonfinite_count: Annotated[Tensor, Field(torch.int64, legacy_from="count")]
    mean_residual: Annotated[Tensor, Field(torch.float64, per_feature=True, legacy_from="mean")]


def initial_state(
    shape: tuple[int, ...], prior_weight: float, device: torch.device | str | None = None
) -> State:
    """Fresh tensors holding the state before any data (the prior's weight, if any).

    Args:
        shape: feature shape.
        prior_weight: the initial ``weight_sum`` (a prior at mean 0, variance 1; 0 for none).
        device: where to allocate them.

    Returns:
        A :class:`State` of new tensors.

    Example:
        >>> float(initial_state((), prior_weight=1e-4).weight_sum)
        0.0001
    """
    state = State._make(
        torch.full(shape if f.per_feature else (), f.initial, dtype=f.dtype, device=device)
        for _, f in fields(State)
    )
    if prior_weight > 0:
        state.weight_sum.fill_(prior_weight)
    return state


def as_moments(state: State) -> Moments:
    """The running estimate a state holds, as :class:`~rlnorm.algebra.moments.Moments`."""
    return Moments(state.weight_sum, state.count, state.mean, state.var, state.mean_residual)


def from_moments(moments: Moments, nonfinite_count: Tensor) -> State:
    """The state holding ``moments`` (shapes as they come) and a non-finite row count."""
    return State(
        mean=moments.mean,
        var=moments.var,
        count=moments.count,
        weight_sum=moments.weight,
        nonfinite_count=nonfinite_count,
        mean_residual=residual(moments),
    )


def fill_legacy(state_dict: MutableMapping[str, Any], prefix: str) -> None:
    """Add, in place, the buffers a state written before they existed lacks.

    A buffer declared with ``legacy_from`` is derived from that buffer when the state holds it
    but not this one: its value cast (``legacy_copy``), or zeros of its shape.

    Args:
        state_dict: a module ``state_dict`` (being loaded).
        prefix: the normalizer's key prefix in it.
    """
    for name, field in fields(State):
        if field.legacy_from is None or prefix + name in state_dict:
            continue
        source = state_dict.get(prefix + field.legacy_from)
        if source is None:
            continue
        if field.legacy_copy:
            state_dict[prefix + name] = source.to(field.dtype)
        else:
            state_dict[prefix + name] = torch.zeros_like(source, dtype=field.dtype)


def check_loadable(
    state_dict: MutableMapping[str, Any], prefix: str, shape: tuple[int, ...]
) -> None:
    """Refuse a state that cannot be loaded into a normalizer of ``shape``.

    Per-feature buffers must have the feature shape, floating ones must be finite, and those
    declared ``nonnegative`` must hold no negative value. Absent keys are left to
    ``load_state_dict`` (missing keys).

    Args:
        state_dict: a module ``state_dict`` (after :func:`fill_legacy`).
        prefix: the normalizer's key prefix in it.
        shape: the normalizer's feature shape.

    Raises:
        ValueError: the message names the key and the problem.

    Example:
        >>> import torch
        >>> check_loadable({"var": torch.tensor([-1.0])}, "", (1,))
        Traceback (most recent call last):
        ...
        ValueError: Cannot load `var`: it holds negative variances.
    """
    named = [(name, field, state_dict.get(prefix + name)) for name, field in fields(State)]
    for name, field, value in named:
        if field.per_feature and isinstance(value, Tensor) and tuple(value.shape) != shape:
            raise ValueError(
                f"Cannot load `{prefix}{name}`: the state has shape {tuple(value.shape)}, "
                f"this normalizer expects {shape}."
            )
    for name, field, value in named:
        if not isinstance(value, Tensor):
            continue
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ValueError(f"Cannot load `{prefix}{name}`: it holds NaN or Inf values.")
        if field.nonnegative and bool((value < 0).any()):
            raise ValueError(
                f"Cannot load `{prefix}{name}`: it holds negative {field.nonnegative}."
            )
