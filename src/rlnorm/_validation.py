"""Eager argument checks whose messages name the argument and show the bad value."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

#: Longest ``repr`` of a bad value quoted in an error message.
_MAX_SHOWN = 120


def show(value: Any) -> str:
    """A bad value for an error message: its type and (shortened) ``repr``."""
    text = repr(value)
    if len(text) > _MAX_SHOWN:
        text = text[: _MAX_SHOWN - 3] + "..."
    return f"{type(value).__name__} {text}"


def _is_real_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_shape(name: str, value: Any) -> tuple[int, ...]:
    """Normalise an ``int`` or a sequence of non-negative ints into a shape tuple."""
    if isinstance(value, torch.Size):
        return tuple(value)
    if isinstance(value, int) and not isinstance(value, bool):
        dims: Iterable[Any] = (value,)
    elif isinstance(value, (tuple, list)):
        dims = value
    else:
        raise TypeError(f"`{name}` must be an int or a tuple of ints, got {value!r}.")
    out = []
    for dim in dims:
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 0:
            raise ValueError(f"`{name}` must hold non-negative ints, got {value!r}.")
        out.append(dim)
    return tuple(out)


def check_float(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """A finite real number inside the given bounds."""
    if not _is_real_number(value):
        raise TypeError(f"`{name}` must be a number, got {value!r}.")
    if not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number, got {value!r}.")
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if below or above:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        bounds = f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"
        raise ValueError(f"`{name}` must be in {bounds}, got {value!r}.")
    return float(value)


def check_positive_int(name: str, value: Any) -> int:
    """An ``int`` greater than zero."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"`{name}` must be an int, got {value!r}.")
    if value <= 0:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
    return value


def check_bool(name: str, value: Any) -> bool:
    """A ``bool`` (not an int or a truthy object)."""
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be a bool, got {value!r}.")
    return value


def check_instance(name: str, value: Any, cls: type, what: str | None = None) -> Any:
    """An instance of ``cls``."""
    if not isinstance(value, cls):
        raise TypeError(f"`{name}` must be a {what or cls.__name__}, got {show(value)}.")
    return value


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    """One of a fixed set of strings."""
    if value not in choices:
        options = ", ".join(repr(c) for c in choices)
        raise ValueError(f"`{name}` must be one of {options}, got {value!r}.")
    return value


def check_device(name: str, value: Any) -> torch.device | None:
    """``None``, a device string or a :class:`torch.device`."""
    if value is None or isinstance(value, torch.device):
        return value
    if isinstance(value, str):
        try:
            return torch.device(value)
        except RuntimeError as err:
            raise ValueError(f"`{name}` is not a valid device: {value!r} ({err}).") from None
    raise TypeError(f"`{name}` must be a str or torch.device, got {value!r}.")


def as_tensor(name: str, value: Any, device: torch.device | None = None) -> Tensor:
    """``value`` as a tensor: tensors pass through, NumPy arrays and Python numbers convert.

    Environments hand out NumPy arrays, NumPy scalars and Python numbers (gymnasium's
    ``reset``/``step``); they become tensors with ``torch.as_tensor``, which shares memory with
    a NumPy array on the CPU instead of copying it. Tensors are returned as they are (their
    device is checked where they are used).

    Args:
        name: the argument's name, for the error message.
        value: a tensor, a NumPy array or scalar, a Python number or bool, or a (nested)
            list or tuple of numbers.
        device: where a converted value goes (``None``: the CPU).

    Returns:
        A tensor.

    Raises:
        TypeError: ``value`` is none of those; the message names the argument and its type.
    """
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (str, bytes)) or value is None or isinstance(value, Mapping):
        raise TypeError(
            f"`{name}` must be a torch.Tensor, a NumPy array or a number, got {show(value)}."
        )
    try:
        return torch.as_tensor(value, device=device)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(
            f"`{name}` must be a torch.Tensor, a NumPy array or a number, got {show(value)} "
            f"({err})."
        ) from None


def check_tensor(name: str, value: Any, device: torch.device) -> Tensor:
    """A real-valued tensor on ``device``."""
    if not isinstance(value, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {show(value)}.")
    if value.is_complex():
        raise TypeError(f"`{name}` must be real-valued, got dtype {value.dtype}.")
    if value.device != device:
        raise ValueError(
            f"`{name}` is on {value.device} but the statistics are on {device}; move one of "
            "them with `.to(...)` (rlnorm does not copy between devices on the hot path)."
        )
    return value


def nonfinite_error(rows: int, shape: tuple[int, ...] | torch.Size) -> ValueError:
    """The error of an update that met NaN or Inf rows with ``nonfinite="raise"``."""
    return ValueError(
        f"`x` holds {rows} row(s) with NaN or Inf values (shape {tuple(shape)}) and "
        "nonfinite='raise'; the statistics were not changed."
    )
