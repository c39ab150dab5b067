"""Checks of the batches the statistics modules are given, with messages naming the argument.

Example:
    >>> import torch
    >>> from rlnorm.stats.inputs import flatten
    >>> flat, weights = flatten(torch.zeros(4, 5, 3), None, (3,), torch.device("cpu"))
    >>> tuple(flat.shape), weights
    ((20, 3), None)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from rlnorm import _validation as check
from rlnorm.backends.dispatch import Settings

__all__ = ["check_input", "checked_settings", "flatten"]


def check_input(name: str, x: Tensor, shape: tuple[int, ...], device: torch.device) -> None:
    """Check that ``x`` is a real tensor on ``device`` of shape ``(*batch, *shape)``.

    Args:
        name: the argument's name, for the message.
        x: the tensor.
        shape: the feature shape it must end in.
        device: the statistics' device.

    Raises:
        TypeError: ``x`` is not a real tensor.
        ValueError: ``x`` is on another device or its shape does not end in ``shape``.

    Example:
        >>> check_input("x", torch.zeros(4, 3), (3,), torch.device("cpu"))
    """
    # The common case in two cheap tests (this runs on every environment step).
    if not (type(x) is Tensor and x.is_cpu and device.type == "cpu" and not x.is_complex()):
        check.check_tensor(name, x, device)
    ndim = len(shape)
    if x.dim() < ndim or tuple(x.shape[x.dim() - ndim :]) != shape:
        raise ValueError(
            f"`{name}` must have shape (*batch, *{shape}) to match the normalizer's "
            f"`shape`, got {tuple(x.shape)}."
        )


def flatten(
    x: Tensor, mask: Tensor | None, shape: tuple[int, ...], device: torch.device
) -> tuple[Tensor, Tensor | None]:
    """A checked batch ``x`` as ``(rows, features)`` and its mask as float64 row weights.

    Args:
        x: tensor of shape ``(*batch, *shape)``; bool becomes uint8.
        mask: ``None``, or bool or float weights of shape ``batch``.
        shape: the feature shape.
        device: the statistics' device.

    Returns:
        The flat batch and the weights (``None`` without a mask).

    Raises:
        TypeError: ``x`` or ``mask`` is not a real tensor.
        ValueError: a shape or device does not match.
    """
    check_input("x", x, shape, device)
    batch_shape = tuple(x.shape[: x.dim() - len(shape)])
    if x.dtype == torch.bool:
        x = x.to(torch.uint8)
    flat = x.reshape(-1, math.prod(shape))
    if mask is None:
        return flat, None
    check.check_tensor("mask", mask, device)
    if tuple(mask.shape) != batch_shape:
        raise ValueError(
            f"`mask` must have the batch shape {batch_shape} of `x` (x has shape "
            f"{tuple(x.shape)}, the normalizer shape {shape}), got {tuple(mask.shape)}."
        )
    return flat, mask.reshape(-1).to(torch.float64)


def checked_settings(
    momentum: float | None,
    var_floor: float | None,
    until: int | None,
    nonfinite: str,
    clip: float | None,
    epsilon: float,
    center: bool,
) -> Settings:
    """A normalizer's settings, checked (see :class:`~rlnorm.RunningMeanStd` for each).

    Raises:
        TypeError: a setting of the wrong type.
        ValueError: a setting out of range, or ``var_floor`` without ``momentum``.

    Example:
        >>> checked_settings(0.9, None, None, "skip", 10, 1e-8, True).clip
        10.0
    """
    if momentum is not None:
        momentum = check.check_float("momentum", momentum, low=0.0, high=1.0, high_open=True)
    if clip is not None:
        clip = check.check_float("clip", clip, low=0.0, low_open=True)
    epsilon = check.check_float("epsilon", epsilon, low=0.0, low_open=True)
    until = None if until is None else check.check_positive_int("until", until)
    if not isinstance(center, bool):
        raise TypeError(f"`center` must be a bool, got {center!r}.")
    if var_floor is not None:
        if momentum is None:
            raise ValueError(
                f"`var_floor` applies to EMA statistics only; got var_floor={var_floor!r} "
                "with momentum=None. Set `momentum` or drop `var_floor`."
            )
        var_floor = check.check_float("var_floor", var_floor, low=0.0, high=1.0, low_open=True)
    nonfinite = check.check_choice("nonfinite", nonfinite, ("skip", "raise"))
    return Settings(momentum, var_floor, until, nonfinite, clip, epsilon, center)
