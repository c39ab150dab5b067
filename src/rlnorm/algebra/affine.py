"""Normalization as an affine map computed from moments, and its application and inverse.

``normalize(x) = clamp(((x - offset) - offset_lo) * scale, low, high)``: the mean is split into
two parts of the computing dtype (``offset + offset_lo`` is the mean to twice its precision), so
float32 outputs stay accurate to float32 precision relative to the std however far the data
sit from zero. Before any weight the map is the identity (no clamp either).

Example:
    >>> import torch
    >>> from rlnorm.algebra.affine import affine, normalize
    >>> from rlnorm.algebra.moments import Moments
    >>> f64 = torch.float64
    >>> m = Moments(torch.tensor(2.0, dtype=f64), torch.tensor(2), torch.tensor([1.0], dtype=f64),
    ...             torch.tensor([4.0], dtype=f64))
    >>> a = affine(m, clip=10.0, epsilon=0.0, center=True, dtype=torch.float32)
    >>> normalize(torch.tensor([[5.0]]), a, clamp=True).tolist()
    [[2.0]]
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from rlnorm.algebra.moments import Moments, residual

__all__ = ["Affine", "affine", "compute_dtype", "denormalize", "normalize", "normalize_clipped"]


class Affine(NamedTuple):
    """``normalize(x) = clamp(((x - offset) - offset_lo) * scale, low, high)``, in one dtype.

    ``offset + offset_lo`` is the mean to twice the precision of the dtype.
    """

    offset: Tensor
    offset_lo: Tensor
    scale: Tensor
    low: Tensor
    high: Tensor


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype ``x`` is normalized in: its own, float32 for halves, the default for integers."""
    if not x.is_floating_point():
        return torch.get_default_dtype()
    if x.dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return x.dtype


def affine(
    m: Moments, clip: float | None, epsilon: float, center: bool, dtype: torch.dtype
) -> Affine:
    """The map that normalizes by ``m``, in ``dtype``.

    Args:
        m: running moments; without weight (no data, no prior) the map is the identity.
        clip: clamp bound; ``None`` for none.
        epsilon: added to the variance before the square root.
        center: subtract the mean (``False``: only divide by the standard deviation).
        dtype: the computing dtype (see :func:`compute_dtype`).

    Returns:
        The :class:`Affine`, its bounds of the feature shape.
    """
    # Statistics count as seen once they carry weight: data, or a `prior_weight`.
    seen = m.weight > 0
    scale = torch.where(seen, torch.rsqrt(m.var + epsilon), 1.0)
    if center:
        mean = torch.where(seen, m.mean, 0.0)
        offset = mean.to(dtype)
        # What rounding the mean to `dtype` lost, plus the mean's own residual: subtracting
        # both keeps float32 outputs accurate to float32 precision relative to the std
        # however far the data sit from zero (a float32 mean alone is off by up to
        # 6e-8 * |mean|, i.e. 6e-5 in normalized units at mean 1e3 and std 1).
        lost = torch.where(seen, residual(m), 0.0)
        offset_lo = ((mean - offset.to(torch.float64)) + lost).to(dtype)
    else:
        offset = offset_lo = torch.zeros_like(m.mean, dtype=dtype)
    # The bound as a float64 tensor: `torch.where` with two Python numbers would round it
    # through the default dtype (float32).
    bound = torch.full_like(m.weight, math.inf if clip is None else clip)
    high = torch.where(seen, bound, math.inf).to(dtype=dtype, device=m.mean.device)
    # Bounds of the feature shape: clamp with 0-d tensor bounds is ~10x slower on the CPU.
    high = high.expand(m.mean.shape).contiguous()
    return Affine(offset, offset_lo, scale.to(dtype), -high, high)


def _apply(x: Tensor, a: Affine, clamp: bool) -> Tensor:
    y = torch.sub(x.to(a.scale.dtype), a.offset).sub_(a.offset_lo)
    y = y.mul_(a.scale)
    return y.clamp_(a.low, a.high) if clamp else y


def _cast_back(y: Tensor, x: Tensor) -> Tensor:
    return y if y.dtype == x.dtype or not x.is_floating_point() else y.to(x.dtype)


def normalize(x: Tensor, a: Affine, clamp: bool) -> Tensor:
    """``x`` through the map ``a``, in ``x``'s dtype (the computing dtype for integers).

    Args:
        x: tensor of shape ``(*batch, *shape)``.
        a: the map, in :func:`compute_dtype` of ``x``.
        clamp: apply the bounds (``False`` when the normalizer has no ``clip``).

    Returns:
        The normalized tensor.
    """
    return _cast_back(_apply(x, a, clamp), x)


def normalize_clipped(x: Tensor, a: Affine, clamp: bool) -> tuple[Tensor, Tensor]:
    """:func:`normalize`, and how many values the clamp set to a finite bound (0-d int64).

    Example:
        >>> import torch
        >>> a = Affine(torch.zeros(1), torch.zeros(1), torch.ones(1), -torch.ones(1), torch.ones(1))
        >>> y, clipped = normalize_clipped(torch.tensor([[3.0], [0.5]]), a, clamp=True)
        >>> y.tolist(), int(clipped)
        ([[1.0], [0.5]], 1)
    """
    y = _apply(x, a, clamp)
    if not clamp:
        return _cast_back(y, x), torch.zeros((), dtype=torch.int64, device=y.device)
    # Values the clamp set to a finite bound (before any cast back to x's dtype).
    return _cast_back(y, x), ((y.abs() == a.high) & torch.isfinite(a.high)).sum()


def denormalize(y: Tensor, a: Affine) -> Tensor:
    """Inverse of :func:`normalize` where not clipped, in ``y``'s dtype.

    Example:
        >>> import torch
        >>> a = Affine(torch.ones(1), torch.zeros(1), torch.full((1,), 0.5), -torch.ones(1),
        ...            torch.ones(1))
        >>> denormalize(torch.tensor([[2.0]]), a).tolist()
        [[5.0]]
    """
    dtype = a.scale.dtype
    return (
        torch.div(y.to(dtype), a.scale)
        .add_(a.offset_lo)
        .add_(a.offset)
        .to(y.dtype if y.is_floating_point() else dtype)
    )
