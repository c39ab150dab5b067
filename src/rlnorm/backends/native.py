"""rlnorm's optional native CPU kernels (``rlnorm/backends/_kernels.c``), where they apply.

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
import math
import os
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import NamedTuple

import torch
from torch import Tensor

from rlnorm import _validation as check
from rlnorm.algebra.affine import Affine
from rlnorm.algebra.fields import fields
from rlnorm.algebra.moments import Moments, ShiftedSums
from rlnorm.algebra.state import State

_kernels: ModuleType | None
try:
    from rlnorm.backends import _kernels
except ImportError:  # built without a C compiler: the torch code path serves
    _kernels = None

__all__ = [
    "KernelMap",
    "StatePointers",
    "affine_args",
    "available",
    "calls",
    "eligible",
    "eligible_as",
    "enabled",
    "native_kernels",
    "normalize",
    "scratch_peak",
    "try_affine",
    "try_batch_shift",
    "try_discounted_returns",
    "try_shifted_sums",
    "try_update",
]

_FLOATS = (torch.float32, torch.float64)
#: The fewest values the normalize kernel splits between threads.
_PARALLEL_ELEMENTS = 0 if _kernels is None else int(_kernels.PARALLEL_ELEMENTS)
_enabled = _kernels is not None and os.environ.get("RLNORM_NATIVE", "1") != "0"

#: Calls each kernel served in this process, counted after the kernel returned: which path ran
#: is observable (tests) without patching anything.
_calls = {
    "update": 0,
    "shifted_sums": 0,
    "normalize": 0,
    "discounted_returns": 0,
    "affine": 0,
    "batch_shift": 0,
}


def available() -> bool:
    """Whether the native kernels were built and can be imported."""
    return _kernels is not None


def enabled() -> bool:
    """Whether eligible calls currently use the native kernels."""
    return _enabled


def calls() -> dict[str, int]:
    """How many calls each native kernel served in this process so far.

    Returns:
        A copy of the counts, keyed ``"update"``, ``"shifted_sums"``, ``"normalize"``,
        ``"discounted_returns"``, ``"affine"`` and ``"batch_shift"``; all stay 0 while the torch
        code path serves.
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


# Bound once: `eligible` runs before every per-step normalize, where each Python call and
# attribute lookup costs about a microsecond (the caches are cold after an environment step).
# `torch.jit.is_tracing` is `_is_tracing` behind a Python frame; `is_compiling` stays a call,
# which torch.compile folds to True while tracing.
_is_compiling = torch.compiler.is_compiling
_is_tracing = torch._C._is_tracing
_is_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
_grad_enabled = torch.is_grad_enabled


def eligible(x: Tensor) -> bool:
    """Whether a batch can take the native path (static facts only, no data read)."""
    return type(x) is Tensor and x.dtype in _FLOATS and _runs_native(x)


def eligible_as(x: Tensor, dtype: torch.dtype) -> bool:
    """:func:`eligible` for a tensor whose dtype the caller has read already: ``dtype``.

    On the per-step path each attribute read of a tensor costs about half a microsecond (the
    caches are cold after an environment step), so the dtype is not read twice.
    """
    return dtype in _FLOATS and _runs_native(x)


def _runs_native(x: Tensor) -> bool:
    return (
        _enabled
        and x.is_cpu
        and x.is_contiguous()
        and not (x.requires_grad and _grad_enabled())
        and not _is_compiling()
        and not _is_tracing()
        and not _is_functorch_wrapped(x)
    )


#: The state arguments of the update kernel (``k_update`` in ``_kernels.c``): the per-feature
#: buffers, then the floating and the integer scalars, each group in declaration order.
_KERNEL_STATE = tuple(
    sorted(
        ((i, field) for i, (_, field) in enumerate(fields(State))),
        key=lambda item: (not item[1].per_feature, not item[1].dtype.is_floating_point),
    )
)


class StatePointers:
    """Addresses of one normalizer's state buffers that the update kernel may write, cached.

    The buffers must be contiguous CPU tensors of their declared dtype and size (``numel``
    features, or one value), and not inference tensors. The answer is reused while the
    buffers are the same objects at the same addresses and sizes: ``.to()`` replaces them,
    ``load_state_dict`` copies into them.

    Example:
        >>> from rlnorm.algebra.state import initial_state
        >>> pointers = StatePointers()
        >>> len(pointers.get(initial_state((3,), prior_weight=0.0), 3))
        6
    """

    def __init__(self) -> None:
        # (buffers, their addresses, their sizes), in the kernel's argument order.
        self._cached: tuple[tuple[Tensor, ...], tuple[int, ...], tuple[int, ...]] | None = None

    def clear(self) -> None:
        """Forget the cached addresses (the buffers were replaced or moved)."""
        self._cached = None

    def get(self, state: State, numel: int) -> tuple[int, ...] | None:
        """The kernel's state addresses, in its argument order, or ``None`` when ineligible.

        Args:
            state: the normalizer's buffers.
            numel: its number of features.

        Returns:
            The addresses; the buffers they belong to are then :attr:`tensors`.
        """
        cached = self._cached
        if cached is not None:
            tensors, pointers, sizes = cached
            for (i, _), t, p, n in zip(_KERNEL_STATE, tensors, pointers, sizes):  # noqa: B905 (hot path)
                b = state[i]
                if b is not t or b.data_ptr() != p or b.numel() != n:
                    break
            else:
                return pointers
        tensors = tuple(state[i] for i, _ in _KERNEL_STATE)
        sizes = tuple(numel if field.per_feature else 1 for _, field in _KERNEL_STATE)
        ok = all(
            t.is_cpu
            and t.dtype == field.dtype
            and t.numel() == size
            and t.is_contiguous()
            and not t.is_inference()
            for t, (_, field), size in zip(tensors, _KERNEL_STATE, sizes, strict=True)
        )
        if not ok:
            self._cached = None
            return None
        pointers = tuple(t.data_ptr() for t in tensors)
        self._cached = (tensors, pointers, sizes)
        return pointers

    @property
    def tensors(self) -> tuple[Tensor, ...]:
        """The buffers of the addresses :meth:`get` last returned (none before)."""
        return () if self._cached is None else self._cached[0]


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
    pointers: StatePointers,
    state: State,
    flat: Tensor,
    weights: Tensor | None,
    momentum: float | None,
    var_floor: float | None,
    until: int | None,
    raise_nonfinite: bool,
    input_shape: torch.Size,
) -> Moments | None:
    """Fold a ``(rows, features)`` batch into ``state`` with one native call.

    Args:
        pointers: the normalizer's cache of its buffers' addresses.
        state: its buffers, written in place.
        flat: the batch.
        weights: optional float64 row weights.
        momentum: ``None`` for the exact merge, else the EMA momentum.
        var_floor: the EMA variance floor, if any.
        until: stop counting at this many samples, if any.
        raise_nonfinite: refuse batches with NaN or Inf rows instead of skipping them.
        input_shape: the batch's shape as given, for the error message.

    Returns:
        The batch's moments, in the state's feature shape, or ``None`` when the native path
        does not apply (the caller runs the torch code).

    Raises:
        ValueError: ``raise_nonfinite`` and the batch holds NaN or Inf rows; the state is
            unchanged.
    """
    if not eligible(flat) or (weights is not None and not weights.is_contiguous()):
        return None
    n, d = flat.shape
    addresses = pointers.get(state, d)
    if addresses is None:
        return None
    shape = state.mean.shape
    mean, var, mean_residual = torch.empty((3, *shape), dtype=torch.float64).unbind()
    weight = torch.empty((), dtype=torch.float64)
    count = torch.empty((), dtype=torch.int64)
    nonfinite, applied = _kernels.update(  # type: ignore[union-attr]
        flat.data_ptr(),
        flat.dtype is torch.float64,
        n,
        d,
        0 if weights is None else weights.data_ptr(),
        *addresses,
        -1.0 if momentum is None else momentum,
        -1.0 if var_floor is None else var_floor,
        -1 if until is None else until,
        raise_nonfinite,
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
    _increment_versions(pointers.tensors)
    return Moments(weight, count, mean, var, mean_residual)


def _is_cpu_f64(t: Tensor) -> bool:
    return t.is_cpu and t.dtype is torch.float64


def _is_plain_f64(t: Tensor) -> bool:
    """A contiguous float64 CPU tensor: what the kernels read through a bare address."""
    return _is_cpu_f64(t) and t.is_contiguous()


def try_shifted_sums(x: Tensor, weights: Tensor | None, shift: Tensor) -> ShiftedSums | None:
    """Native :func:`~rlnorm.algebra.moments.shifted_sums` of a 2-D batch (``None``: ineligible).

    Eligible are :func:`eligible` batches with float64 CPU ``shift`` and ``weights`` of the
    batch's sizes; anything else is left to the torch code, which broadcasts or raises.
    """
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


def try_affine(
    state: State, clip: float | None, epsilon: float, center: bool, dtype: torch.dtype
) -> tuple[Affine, KernelMap] | None:
    """:func:`~rlnorm.algebra.affine.affine` of CPU statistics in one call, or ``None``.

    The map is recomputed after every update (a dozen small torch operations); here it is one
    kernel writing one tensor. Eligible are float32 and float64 maps of contiguous float64 CPU
    buffers, outside ``torch.compile``. The inverse square root is ``1 / sqrt(var + epsilon)``,
    each step rounded: what ``torch.rsqrt`` computes on short vectors (on long ones it can
    differ from it by an ulp).

    Returns:
        The :class:`~rlnorm.algebra.affine.Affine` in ``dtype`` (its tensors of the feature
        shape, rows of one new tensor) and the normalize kernel's arguments for it (as
        :func:`affine_args`), or ``None`` when ineligible.
    """
    mean, var, residual, weight = state.mean, state.var, state.mean_residual, state.weight_sum
    if not (
        _enabled
        and dtype in _FLOATS
        and not _is_compiling()
        and all(map(_is_plain_f64, (mean, var, residual, weight)))
        and mean.shape == var.shape == residual.shape
    ):
        return None
    d = mean.numel()
    out = torch.empty((5, d), dtype=dtype)
    bound = _kernels.affine(  # type: ignore[union-attr]
        mean.data_ptr(),
        var.data_ptr(),
        residual.data_ptr(),
        weight.data_ptr(),
        d,
        math.inf if clip is None else clip,
        epsilon,
        center,
        dtype is torch.float64,
        out.data_ptr(),
    )
    _calls["affine"] += 1
    offset, offset_lo, scale, low, high = out.view(5, *mean.shape).unbind()
    args = KernelMap(
        offset.data_ptr(), offset_lo.data_ptr(), scale.data_ptr(), bound, d, dtype is torch.float64
    )
    return Affine(offset, offset_lo, scale, low, high), args


def try_batch_shift(batch: Moments, running: Moments) -> float | None:
    """:func:`~rlnorm.algebra.drift.batch_shift` of CPU moments as a number, or ``None``.

    One call where torch takes eight operations; for the telemetry of every update. Eligible
    are contiguous float64 CPU moments of one shape, outside ``torch.compile``.
    """
    bm, mean, var, weight = batch.mean, running.mean, running.var, batch.weight
    if not (
        _enabled
        and not _is_compiling()
        and all(map(_is_plain_f64, (bm, mean, var, weight)))
        and bm.shape == mean.shape == var.shape
        and weight.numel() == 1
    ):
        return None
    shift = _kernels.batch_shift(  # type: ignore[union-attr]
        bm.data_ptr(), mean.data_ptr(), var.data_ptr(), mean.numel(), weight.data_ptr()
    )
    _calls["batch_shift"] += 1
    return shift


class KernelMap(NamedTuple):
    """The normalize kernel's arguments for one CPU map (see :func:`affine_args`)."""

    offset: int
    offset_lo: int
    scale: int
    bound: float
    features: int
    is_f64: bool


def affine_args(a: Affine) -> KernelMap:
    """The normalize kernel's arguments for the float32 or float64 CPU map ``a``.

    The addresses of its contiguous tensors, the clamp bound, the number of features and the
    dtype. The bound is passed as a number: one host read, so callers cache the result with
    ``a`` (which keeps the addresses valid).
    """
    high = a.high.reshape(-1)
    bound = float(high[0]) if high.numel() else math.inf
    return KernelMap(
        a.offset.data_ptr(),
        a.offset_lo.data_ptr(),
        a.scale.data_ptr(),
        bound,
        a.offset.numel(),
        a.offset.dtype is torch.float64,
    )


def normalize(x: Tensor, args: KernelMap) -> tuple[Tensor, int]:
    """Normalize an :func:`eligible` ``x`` in one pass with the map of :func:`affine_args`.

    ``x`` must have the map's dtype, the caller checks (``args`` holds it, so that the per-step
    call does not read it from ``x`` a second time).

    Returns:
        The normalized tensor and how many of its values sit at the clamp bound.
    """
    out = torch.empty_like(x)
    numel = x.numel()
    at_bound = _kernels.normalize(  # type: ignore[union-attr]
        x.data_ptr(),
        out.data_ptr(),
        numel,
        args,
        # Asking torch costs a call per step; only batches this large are split.
        torch.get_num_threads() if numel >= _PARALLEL_ELEMENTS else 1,
    )
    _calls["normalize"] += 1
    return out, at_bound


def try_discounted_returns(
    rewards: Tensor, dones: Tensor, returns: Tensor, gamma: float
) -> tuple[Tensor, Tensor] | None:
    """:func:`~rlnorm.algebra.returns.discounted_returns` over a ``(T, envs)`` rollout.

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
