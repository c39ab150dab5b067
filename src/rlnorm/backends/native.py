"""Dispatch to rlnorm's optional native CPU kernels (``rlnorm/_kernels.c``).

On the CPU, torch runs an update as about fifty small operations and several passes over the
batch (a float64 reduction over rows alone costs about thirty plain sums), so per-call overhead
dominates small batches and memory traffic large ones. The kernels fuse each of ``update`` and
``normalize`` into one pass over the batch with float64 accumulation, applying exactly the
formulas of :mod:`rlnorm.algebra.moments`.

They are used only where they are drop-ins: eager mode (not traced by ``torch.compile``,
``torch.export`` or ``torch.jit``), CPU tensors of dtype float32 or float64, no autograd through
the input, and no distributed reduction. Everything else, including CUDA, runs the torch code,
which is also the fallback when the extension was not built (no C compiler at install time).
Set the environment variable ``RLNORM_NATIVE=0`` to turn them off. :func:`calls` tells which
path served (each kernel counts its calls) and :func:`scratch_peak` how much memory the kernels
held, which stays fixed by the number of features and threads, whatever the number of rows.

Example:
    >>> from rlnorm.backends import native as _native
    >>> with _native.native_kernels(False):  # force the torch code path
    ...     pass
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from rlnorm import _validation as check
from rlnorm.algebra.moments import Moments, ShiftedSums

if TYPE_CHECKING:
    from rlnorm.stats.running_mean_std import RunningMeanStd

_kernels: ModuleType | None
try:
    from rlnorm.backends import _kernels
except ImportError:  # built without a C compiler: the torch code path serves
    _kernels = None

__all__ = ["available", "calls", "enabled", "native_kernels", "scratch_peak"]

_FLOATS = (torch.float32, torch.float64)
_enabled = _kernels is not None and os.environ.get("RLNORM_NATIVE", "1") != "0"

#: Calls each kernel served in this process, counted after the kernel returned: which path ran
#: is observable (tests) without patching anything.
_calls = {"update": 0, "shifted_sums": 0, "normalize": 0, "discounted_returns": 0}


def available() -> bool:
    """Whether the native kernels were built and can be imported."""
    return _kernels is not None


def enabled() -> bool:
    """Whether eligible calls currently use the native kernels."""
    return _enabled


def calls() -> dict[str, int]:
    """How many calls each native kernel served in this process so far.

    Returns:
        A copy of the counts, keyed ``"update"``, ``"shifted_sums"``, ``"normalize"`` and
        ``"discounted_returns"``; all stay 0 while the torch code path serves.
    """
    return dict(_calls)


def scratch_peak() -> int | None:
    """The most bytes of scratch memory the kernels held at once since the previous call.

    Every allocation of the kernels is counted (their outputs are torch tensors, allocated by
    the caller). An update holds at most ``8 * ((9 * threads + 4) * features + 2 * threads)``
    bytes, ``threads`` being at most ``torch.get_num_threads()``, whatever the number of rows.

    Returns:
        The peak in bytes (reset to what is held now, 0 between calls), or ``None`` when the
        extension was not built.
    """
    return None if _kernels is None else int(_kernels.scratch_peak())


@contextlib.contextmanager
def native_kernels(on: bool) -> Iterator[None]:
    """Turn the native kernels on or off inside a ``with`` block (tests and benchmarks).

    Args:
        on: use the kernels where eligible; turning them on without the extension built is a
            no-op.
    """
    global _enabled
    previous = _enabled
    _enabled = bool(on) and _kernels is not None
    try:
        yield
    finally:
        _enabled = previous


def eligible(x: Tensor) -> bool:
    """Whether a batch can take the native path (static facts only, no data read)."""
    return (
        _enabled
        and type(x) is Tensor
        and x.is_cpu
        and x.dtype in _FLOATS
        and x.is_contiguous()
        and not (x.requires_grad and torch.is_grad_enabled())
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
        and not torch._C._functorch.is_functorch_wrapped_tensor(x)
    )


#: The buffers the update kernel writes, in the order of its arguments, and their dtypes.
_STATE = ("mean", "var", "mean_residual", "weight_sum", "count", "nonfinite_count")
_STATE_DTYPES = (torch.float64,) * 4 + (torch.int64,) * 2


def _state_pointers(rms: RunningMeanStd) -> tuple[int, ...] | None:
    """Addresses of ``rms``'s buffers if the kernels may write them, else ``None``.

    They must be contiguous CPU float64 (the counts int64), of the sizes the kernel writes
    (``numel`` features, or one value), and not inference tensors. The answer is cached on the
    module and reused while the buffers are the same objects at the same addresses and sizes:
    ``.to()`` replaces them, ``load_state_dict`` copies into them.
    """
    buffers = rms._buffers
    cached = rms._native_state
    if cached is not None:
        tensors, pointers, sizes = cached
        for name, t, p, n in zip(_STATE, tensors, pointers, sizes):  # noqa: B905 (hot path)
            b = buffers[name]
            if b is not t or b.data_ptr() != p or b.numel() != n:  # type: ignore[union-attr]
                break
        else:
            return pointers
    state = tuple(buffers[name] for name in _STATE)
    sizes = (rms.numel,) * 3 + (1, 1, 1)
    ok = all(
        t is not None
        and t.is_cpu
        and t.dtype == dtype
        and t.numel() == size
        and t.is_contiguous()
        and not t.is_inference()
        for t, dtype, size in zip(state, _STATE_DTYPES, sizes, strict=True)
    )
    if not ok:
        rms._native_state = None
        return None
    pointers = tuple(t.data_ptr() for t in state)  # type: ignore[union-attr]
    rms._native_state = (state, pointers, sizes)  # type: ignore[assignment]
    return pointers


def _increment_versions_each(tensors: tuple[Tensor, ...]) -> None:
    for t in tensors:
        torch._C._increment_version(t)


def _pick_increment_versions() -> Callable[[tuple[Tensor, ...]], None]:
    """Bump version counters of tensors written behind torch's back (one C call if possible).

    Version-keyed caches (``normalize``'s affine) and autograd's check that saved tensors were
    not modified in place rely on them, as for any in-place torch operation.
    """
    try:
        torch._C._increment_version((torch.empty(0),))  # torch >= 2.5 takes a sequence
    except TypeError:
        return _increment_versions_each
    return torch._C._increment_version


_increment_versions = _pick_increment_versions()


def try_update(
    rms: RunningMeanStd, flat: Tensor, weights: Tensor | None, input_shape: torch.Size
) -> Moments | None:
    """Fold a ``(rows, features)`` batch into ``rms`` with one native call.

    Returns:
        The batch's moments, as :meth:`RunningMeanStd.update` returns them, or ``None`` when
        the native path does not apply (the caller runs the torch code).

    Raises:
        ValueError: ``nonfinite="raise"`` and the batch holds NaN or Inf rows; the statistics
            are unchanged.
    """
    if not eligible(flat) or (weights is not None and not weights.is_contiguous()):
        return None
    pointers = _state_pointers(rms)
    if pointers is None:
        return None
    n, d = flat.shape
    shape = rms.shape
    mean, var, mean_residual = torch.empty((3, *shape), dtype=torch.float64).unbind()
    weight = torch.empty((), dtype=torch.float64)
    count = torch.empty((), dtype=torch.int64)
    nonfinite, applied = _kernels.update(  # type: ignore[union-attr]
        flat.data_ptr(),
        flat.dtype is torch.float64,
        n,
        d,
        0 if weights is None else weights.data_ptr(),
        *pointers,
        -1.0 if rms.momentum is None else rms.momentum,
        -1.0 if rms.var_floor is None else rms.var_floor,
        -1 if rms.until is None else rms.until,
        rms.nonfinite == "raise",
        mean.data_ptr(),
        var.data_ptr(),
        mean_residual.data_ptr(),
        weight.data_ptr(),
        count.data_ptr(),
        torch.get_num_threads(),
    )
    _calls["update"] += 1
    if not applied:
        raise check.nonfinite_error(nonfinite, input_shape)
    _increment_versions(rms._native_state[0])  # type: ignore[index]  # set by _state_pointers
    return Moments(weight, count, mean, var, mean_residual)


def _is_cpu_f64(t: Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype == torch.float64


def try_shifted_sums(x: Tensor, weights: Tensor | None, shift: Tensor) -> ShiftedSums | None:
    """Native :func:`~rlnorm.algebra.moments.shifted_sums` of a 2-D batch (``None``: ineligible)."""
    n, d = x.shape
    if (
        not eligible(x)
        or not _is_cpu_f64(shift)
        or tuple(shift.shape) != (d,)
        or (weights is not None and (not _is_cpu_f64(weights) or tuple(weights.shape) != (n,)))
    ):
        return None  # the torch code broadcasts or raises as it always did
    shift = shift.contiguous()
    weights = None if weights is None else weights.contiguous()
    sums = torch.empty((2, d), dtype=torch.float64)
    weight, count, nonfinite = _kernels.shifted_sums(  # type: ignore[union-attr]
        x.data_ptr(),
        x.dtype == torch.float64,
        n,
        d,
        0 if weights is None else weights.data_ptr(),
        shift.data_ptr(),
        sums[0].data_ptr(),
        sums[1].data_ptr(),
        torch.get_num_threads(),
    )
    _calls["shifted_sums"] += 1
    return ShiftedSums(
        torch.tensor(weight, dtype=torch.float64),
        torch.tensor(count, dtype=torch.int64),
        sums[0],
        sums[1],
        torch.tensor(nonfinite, dtype=torch.int64),
        shift,
    )


def try_normalize(rms: RunningMeanStd, x: Tensor) -> tuple[Tensor, int] | None:
    """``rms.normalize(x)`` in one pass, or ``None`` when the native path does not apply.

    ``x`` must already have passed the normalizer's input checks.

    Returns:
        The normalized tensor and how many of its values sit at the clamp bound.
    """
    if not eligible(x) or not rms._buffers["mean"].is_cpu:  # type: ignore[union-attr]
        return None
    _, (offset, offset_lo, scale, bound, d) = rms._cached_affine(x.dtype)
    out = torch.empty_like(x)
    at_bound = _kernels.normalize(  # type: ignore[union-attr]
        x.data_ptr(),
        out.data_ptr(),
        x.dtype is torch.float64,
        x.numel() // max(d, 1),
        d,
        offset,
        offset_lo,
        scale,
        bound,
        torch.get_num_threads(),
    )
    _calls["normalize"] += 1
    return out, at_bound


def try_discounted_returns(
    rewards: Tensor, dones: Tensor, returns: Tensor, gamma: float
) -> tuple[Tensor, Tensor] | None:
    """The return recursion of :meth:`RewardNormalizer.update` over a ``(T, envs)`` rollout.

    Returns:
        The trajectory of returns fed to the statistics (NaN at non-finite rewards) and the
        returns after the last step, both new float64 tensors, or ``None`` when ineligible
        (``returns`` itself is left untouched either way).
    """
    if not eligible(rewards) or returns.dtype != torch.float64 or not returns.is_cpu:
        return None
    steps, envs = rewards.shape
    rewards = rewards.to(torch.float64).contiguous()
    dones = dones.to(torch.bool).contiguous()
    new_returns = returns.clone()
    trajectory = torch.empty((steps, envs), dtype=torch.float64)
    _kernels.discounted_returns(  # type: ignore[union-attr]
        rewards.data_ptr(),
        dones.data_ptr(),
        new_returns.data_ptr(),
        trajectory.data_ptr(),
        steps,
        envs,
        float(gamma),
    )
    _calls["discounted_returns"] += 1
    return trajectory, new_returns
