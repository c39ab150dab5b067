"""Fused CUDA kernels (Triton) for ``update``, ``normalize`` and the discounted returns.

On a GPU the torch code runs an update as about a hundred and fifty small kernels and a
normalize as about twenty; the reward returns step through a rollout one torch operation at a
time. These launchers do the same work in a few Triton kernels, with the formulas of
:mod:`rlnorm.algebra` and its guarantees (float64 accumulation, int64 counts, the exact Chan or
EMA merge, non-finite rows skipped and counted, masks, no host synchronisation):

- ``update``: three kernels. ``update_shift_kernel`` (one program) picks the shift from the
  batch head (and applies ``until``, read from the state's count on the device);
  ``update_sums_kernel`` sums the batch around it, each program over its own row blocks, into
  float64 partials; ``update_merge_kernel`` (one program) reduces the partials in a fixed
  order and merges them into the state buffers in place, writing the batch moments into one
  packed float64 output. No float atomics: the same input gives bitwise the same result.
- ``normalize``: one kernel computing the affine map from the state buffers in the computing
  dtype, applying it, clamping, and counting clipped values (an int64 atomic).
- discounted returns over ``(T, envs)``: one kernel, one program per block of environments.

They serve eligible calls (:func:`eligible`: CUDA tensors of a floating dtype, eager, no
autograd through the input, triton importable); :mod:`rlnorm.backends.dispatch` falls back to
the torch code otherwise, and runs the eager launches inside its automatic CUDA graphs, so a
replay pays no launch overhead. Set ``RLNORM_FUSED=0`` (or use :func:`use_fused`) to turn them
off. :func:`calls` counts the launches made from Python per kernel (graph replays make none).
A kernel that cannot compile or launch on a machine turns the fused path off for the rest of
the process, with one warning, and the torch code serves (:func:`fall_back`).

The kernels live in :mod:`rlnorm.backends._triton_kernels`, imported on first use, so that
importing rlnorm never imports triton. On machines without a GPU, tests run them through
Triton's interpreter (``TRITON_INTERPRET=1``) on CPU tensors: see :func:`interpret_on_cpu`.

Example:
    >>> from rlnorm.backends import fused
    >>> with fused.use_fused(False):  # time or test the unfused torch path
    ...     fused.enabled()
    False
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import threading
import warnings
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import NamedTuple

import torch
from torch import Tensor

from rlnorm.algebra.moments import SHIFT_ROWS, Moments, ShiftedSums
from rlnorm.algebra.state import State
from rlnorm.backends import native

__all__ = [
    "KernelError",
    "Workspace",
    "available",
    "batch_shift",
    "calls",
    "discounted_returns",
    "eligible",
    "enabled",
    "fall_back",
    "interpret_on_cpu",
    "interpreting",
    "merge_sums",
    "moments_of",
    "normalize",
    "shifted_sums",
    "state_eligible",
    "update",
    "use_fused",
]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
F64 = torch.float64

#: Elements of the batch one program of the sums kernel loads per row block.
SUMS_TILE = 2048
#: Up to this many (a power of two) features, a row block is one tile, loaded once.
ONE_BLOCK_FEATURES = 512
#: Feature block of the sums kernel beyond :data:`ONE_BLOCK_FEATURES`.
SUMS_BLOCK_D = 256
#: Most programs of the sums kernel (two per SM of an H100/H200); each writes partial sums.
MAX_PROGRAMS = 264
#: Most float64 values of partial sums a workspace holds (8 MB): fewer programs for huge rows.
MAX_PARTIAL_VALUES = 1 << 20
#: Partials the merge kernel loads per step, and its feature block.
MERGE_TILE = 2048
MERGE_BLOCK_D = 128
#: Elements per program of the normalize kernel, and its largest feature block.
NORMALIZE_TILE = 4096
NORMALIZE_BLOCK_D = 256
#: Environments per program of the returns kernel.
RETURNS_BLOCK_E = 128
#: Warps per program: the sums kernel holds a float64 tile and two accumulators per program.
NUM_WARPS = 4
SUMS_NUM_WARPS = 8

_enabled = os.environ.get("RLNORM_FUSED", "1") != "0"
#: Set by :func:`fall_back`: the kernels failed here, so nothing turns them on again.
_fell_back = False
_interpret_cpu = False
_kernels: ModuleType | None = None
_import_tried = False
_import_lock = threading.Lock()

#: Kernel launches made from Python in this process (graph replays launch nothing from Python).
_calls = {
    "update_shift": 0,
    "update_sums": 0,
    "update_merge": 0,
    "normalize": 0,
    "discounted_returns": 0,
}


def _load() -> ModuleType | None:
    """The kernels module, imported once; ``None`` when triton cannot be imported."""
    global _kernels, _import_tried
    if not _import_tried:
        with _import_lock:
            if not _import_tried:
                try:
                    from rlnorm.backends import _triton_kernels
                except ImportError:
                    _triton_kernels = None  # type: ignore[assignment]
                _kernels = _triton_kernels
                _import_tried = True
    return _kernels


class KernelError(RuntimeError):
    """A fused kernel could not be compiled or launched here; it wrote no statistic.

    Raised at a launch, before the kernel runs: the merge kernel is the only one that writes a
    normalizer's buffers, and it is launched last, so a failed update leaves them as they were.
    """


@contextlib.contextmanager
def _launching(kernel: str) -> Iterator[None]:
    """Count a launch of ``kernel`` (:func:`calls`), or turn its failure into a KernelError."""
    try:
        yield
    except Exception as error:
        raise KernelError(
            f"rlnorm's fused kernel `{kernel}` could not be compiled or launched: "
            f"{type(error).__name__}: {error}"
        ) from error
    _calls[kernel] += 1


def fall_back(error: KernelError) -> None:
    """Turn the fused kernels off for this process after ``error``, with one warning.

    Triton can be importable where its kernels cannot run (a GPU older than it supports, a
    broken toolchain): the statistics then go on with the torch code, which gives the same
    results, instead of failing every call. Under Triton's interpreter (tests) the error is
    raised instead: there a failing kernel is a bug.

    Raises:
        KernelError: ``error`` itself, when the kernels are interpreted.

    Example:
        >>> with use_fused(True):
        ...     fall_back(KernelError("example"))  # doctest: +SKIP
    """
    global _enabled, _fell_back
    if interpreting():  # kernels run on the CPU for tests: a failure is a bug, not the machine
        raise error
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        # Inside a caller's capture (a first call compiles, which a capture forbids): the
        # capture is lost either way, and the kernels may well run once warmed up eagerly.
        raise error
    _enabled = False
    _fell_back = True
    warnings.warn(
        f"{error} The fused CUDA kernels are off for the rest of this process; rlnorm uses its "
        "torch code instead (same statistics, slower on GPUs). Set RLNORM_FUSED=0 to skip "
        "them from the start and silence this warning.",
        RuntimeWarning,
        stacklevel=3,
    )


def available() -> bool:
    """Whether triton can be imported (the first call imports it), so the kernels can run."""
    return _load() is not None


def enabled() -> bool:
    """Whether eligible calls currently use the fused kernels (``RLNORM_FUSED``)."""
    return _enabled


def interpreting() -> bool:
    """Whether the kernels were defined under Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    kernels = _load()
    return kernels is not None and type(kernels.normalize_kernel).__name__ == "InterpretedFunction"


def calls() -> dict[str, int]:
    """How many times each fused kernel was launched from Python in this process.

    A CUDA graph replay runs its kernels without Python, so replays do not count; the eager
    warm-up and the capture of each graph do.

    Returns:
        A copy of the counts, keyed ``"update_shift"``, ``"update_sums"``, ``"update_merge"``,
        ``"normalize"`` and ``"discounted_returns"``.
    """
    return dict(_calls)


@contextlib.contextmanager
def use_fused(on: bool) -> Iterator[None]:
    """Turn the fused kernels on or off inside a ``with`` block (tests and benchmarks).

    Args:
        on: use the kernels where eligible (a no-op without triton).

    Example:
        >>> with use_fused(False):
        ...     enabled()
        False
    """
    global _enabled
    previous = _enabled
    _enabled = bool(on) and not _fell_back
    try:
        yield
    finally:
        _enabled = previous and not _fell_back  # a fall-back inside the block stands


@contextlib.contextmanager
def interpret_on_cpu() -> Iterator[None]:
    """Let CPU tensors take the fused path, run by Triton's interpreter (tests without a GPU).

    Only where the kernels really are interpreted: on a machine that compiles them for a GPU
    this refuses, since compiled kernels cannot read CPU memory. Inside the block the CPU
    stands in for a GPU, where the native CPU kernels never run: they stay off, so whatever the
    fused kernels do not take runs the torch code, as on CUDA.

    Raises:
        RuntimeError: triton is missing, or ``TRITON_INTERPRET=1`` was not set before the
            kernels were first loaded.

    Example:
        >>> import os
        >>> if interpreting():  # doctest: +SKIP
        ...     with interpret_on_cpu():
        ...         pass
    """
    global _interpret_cpu
    if not interpreting():
        raise RuntimeError(
            "interpret_on_cpu() needs triton with TRITON_INTERPRET=1 set before rlnorm loads "
            "its kernels; compiled kernels cannot run on CPU tensors."
        )
    previous = _interpret_cpu
    _interpret_cpu = True
    try:
        with native.native_kernels(False):
            yield
    finally:
        _interpret_cpu = previous


def eligible(x: Tensor) -> bool:
    """Whether a call on ``x`` may take the fused kernels (static facts only, no data read).

    CUDA tensors (CPU ones inside :func:`interpret_on_cpu`) of dtype float16, bfloat16,
    float32 or float64, not traced (``torch.compile``, ``torch.jit``), no autograd through
    ``x``, the kernels enabled and triton importable.
    """
    return (
        _enabled
        and type(x) is Tensor
        and (x.is_cuda or (_interpret_cpu and x.is_cpu))
        and x.dtype in _FLOATS
        and not (x.requires_grad and torch.is_grad_enabled())
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
        and not torch._C._functorch.is_functorch_wrapped_tensor(x)
        and available()
    )


def state_eligible(state: State, device: torch.device) -> bool:
    """Whether the kernels can write ``state``: contiguous, on ``device``, declared dtypes."""
    mean = state.mean
    return (
        mean.device == device
        and mean.dtype == F64
        and state.var.dtype == F64
        and state.mean_residual.dtype == F64
        and state.weight_sum.dtype == F64
        and state.count.dtype == torch.int64
        and state.nonfinite_count.dtype == torch.int64
        and all(t.is_contiguous() and t.device == device for t in state)
    )


def _increment_versions_each(tensors: tuple[Tensor, ...]) -> None:
    for t in tensors:
        torch._C._increment_version(t)


def _pick_increment_versions() -> Callable[[tuple[Tensor, ...]], None]:
    """Bump the version counters of tensors the kernels wrote (one C call where possible)."""
    try:
        torch._C._increment_version((torch.empty(0),))  # torch >= 2.5 takes a sequence
    except TypeError:
        return _increment_versions_each
    return torch._C._increment_version


_increment_versions = _pick_increment_versions()


def _written(state: State) -> None:
    """Tell torch the state was written in place (version-keyed caches, autograd checks)."""
    if not state.mean.is_inference():
        _increment_versions(tuple(state))


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


class _SumsConfig(NamedTuple):
    one_block: bool
    block_n: int
    block_d: int
    max_programs: int
    shift_block_d: int
    merge_block_p: int
    merge_block_d: int


@functools.lru_cache(maxsize=64)
def _sums_config(n_feat: int) -> _SumsConfig:
    """Block sizes of the update kernels for ``n_feat`` features (fixed per feature count)."""
    width = _next_pow2(max(n_feat, 1))
    one_block = width <= ONE_BLOCK_FEATURES
    block_d = width if one_block else SUMS_BLOCK_D
    block_n = max(1, SUMS_TILE // block_d)
    max_programs = max(1, min(MAX_PROGRAMS, MAX_PARTIAL_VALUES // (2 * n_feat + 1)))
    merge_block_d = min(width, MERGE_BLOCK_D)
    merge_block_p = max(1, min(_next_pow2(max_programs), MERGE_TILE // merge_block_d))
    shift_block_d = min(width, SUMS_BLOCK_D)
    return _SumsConfig(
        one_block,
        block_n,
        block_d,
        max_programs,
        shift_block_d,
        merge_block_p,
        merge_block_d,
    )


#: Float64 parameter vectors on each device, by value; kept for the life of the process since
#: captured CUDA graphs hold their addresses (a few per normalizer setting).
_params_cache: dict[tuple[torch.device, tuple[float, ...]], Tensor] = {}
#: Parameter vectors made while a CUDA graph was being captured, kept alive for that graph.
_captured_params: list[Tensor] = []


def _params(device: torch.device, values: tuple[float, ...]) -> Tensor:
    """A float64 tensor of ``values`` on ``device`` (Triton types Python floats as float32)."""
    key = (device, values)
    cached = _params_cache.get(key)
    if cached is not None:
        return cached
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        # No host-to-device copy inside a capture: fills, which the graph replays before use.
        t = torch.empty(len(values), dtype=F64, device=device)
        for i, v in enumerate(values):
            t[i].fill_(v)
        _captured_params.append(t)
        return t
    t = torch.tensor(values, dtype=F64).to(device)
    _params_cache[key] = t
    return t


class Workspace:
    """Scratch buffers one normalizer's fused updates reuse: partial sums and the shift.

    Kept by its :class:`~rlnorm.backends.dispatch.Dispatcher` (one per feature count and
    device), so an eager update allocates only its output, and CUDA graphs captured with them
    keep valid addresses while the dispatcher keeps its graphs.

    Example:
        >>> ws = Workspace()
        >>> ws.clear()
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[torch.device, int], tuple[Tensor, Tensor, Tensor]] = {}
        # The state last found eligible (the tensors themselves) and its device.
        self._state: tuple[tuple[Tensor, ...], torch.device] | None = None

    def clear(self) -> None:
        """Forget the eligible state (buffers replaced or reloaded).

        The scratch buffers stay: they do not depend on the state, and CUDA graphs a caller
        captured around an update keep their addresses, so freeing them would let a replay
        write memory reused since.
        """
        self._state = None

    def state_ok(self, state: State, device: torch.device) -> bool:
        """:func:`state_eligible`, remembered while the buffers are the same tensor objects.

        Buffers are replaced, not changed in place, when a module moves or loads with
        ``assign=True``, so the check runs once per set of buffers rather than every call.
        """
        known = self._state
        if known is not None:
            tensors, known_device = known
            if all(a is b for a, b in zip(state, tensors)) and device == known_device:  # noqa: B905 (hot path)
                return True
        if not state_eligible(state, device):
            return False
        self._state = (tuple(state), device)
        return True

    def buffers(self, device: torch.device, n_feat: int) -> tuple[Tensor, Tensor, Tensor]:
        """``(partial float64 sums, partial int64 counts, shift)`` for ``n_feat`` features."""
        key = (device, n_feat)
        found = self._buffers.get(key)
        if found is None:
            programs = _sums_config(n_feat).max_programs
            part_f = torch.empty((programs, 1 + 2 * n_feat), dtype=F64, device=device)
            part_i = torch.empty((programs, 2), dtype=torch.int64, device=device)
            shift = torch.empty(n_feat, dtype=F64, device=device)
            found = self._buffers[key] = (part_f, part_i, shift)
        return found


def _launch_shift(
    k: ModuleType,
    flat: Tensor,
    weights: Tensor | None,
    count: Tensor,
    until: int | None,
    shift: Tensor,
    cfg: _SumsConfig,
) -> None:
    n, d = flat.shape
    with _launching("update_shift"):
        k.update_shift_kernel[(1,)](
            flat,
            flat if weights is None else weights,
            count,
            0 if until is None else until,
            shift,
            n,
            d,
            flat.stride(0),
            flat.stride(1),
            0 if weights is None else weights.stride(0),
            HAS_WEIGHTS=weights is not None,
            HAS_UNTIL=until is not None,
            HEAD=SHIFT_ROWS,
            BLOCK_D=cfg.shift_block_d,
            num_warps=NUM_WARPS,
            enable_fp_fusion=False,
        )


def _launch_sums(
    k: ModuleType,
    flat: Tensor,
    weights: Tensor | None,
    count: Tensor,
    until: int | None,
    shift: Tensor,
    part_f: Tensor,
    part_i: Tensor,
    cfg: _SumsConfig,
) -> int:
    n, d = flat.shape
    programs = max(1, min(-(-n // cfg.block_n), cfg.max_programs))
    with _launching("update_sums"):
        k.update_sums_kernel[(programs,)](
            flat,
            flat if weights is None else weights,
            count,
            0 if until is None else until,
            shift,
            part_f,
            part_i,
            n,
            d,
            flat.stride(0),
            flat.stride(1),
            0 if weights is None else weights.stride(0),
            part_f.stride(0),
            HAS_WEIGHTS=weights is not None,
            HAS_UNTIL=until is not None,
            ONE_BLOCK=cfg.one_block,
            BLOCK_N=cfg.block_n,
            BLOCK_D=cfg.block_d,
            num_warps=SUMS_NUM_WARPS,
            enable_fp_fusion=False,
        )
    return programs


def _launch_merge(
    k: ModuleType,
    part_f: Tensor,
    part_i: Tensor,
    n_parts: int,
    shift: Tensor,
    state: State,
    momentum: float | None,
    var_floor: float | None,
    out: Tensor,
    n_feat: int,
    cfg: _SumsConfig,
    finalize: bool,
) -> None:
    if momentum is None:
        params = shift  # unread
    else:
        params = _params(out.device, (momentum, 1.0 - momentum, var_floor or 0.0))
    with _launching("update_merge"):
        k.update_merge_kernel[(1,)](
            part_f,
            part_i,
            n_parts,
            part_f.stride(0),
            shift,
            state.mean,
            state.var,
            state.mean_residual,
            state.weight_sum,
            state.count,
            state.nonfinite_count,
            params,
            out,
            n_feat,
            FINALIZE=finalize,
            EMA=momentum is not None,
            VAR_FLOOR=var_floor is not None,
            BLOCK_P=cfg.merge_block_p,
            BLOCK_D=cfg.merge_block_d,
            num_warps=NUM_WARPS,
            enable_fp_fusion=False,
        )


def update(
    ws: Workspace,
    state: State,
    flat: Tensor,
    weights: Tensor | None,
    momentum: float | None,
    var_floor: float | None,
    until: int | None,
) -> Tensor:
    """Fold a ``(rows, features)`` batch into ``state`` in place: three kernel launches.

    The same as the torch update (:func:`~rlnorm.algebra.moments.batch_shift`,
    :func:`~rlnorm.algebra.moments.shifted_sums`, ``batch_moments`` and ``merge`` or
    ``merge_ema``), the sums to rounding (another summation order), the merge bitwise given the
    same sums. Nothing reads the data on the host: non-finite rows are skipped and counted.

    Args:
        ws: the normalizer's scratch buffers.
        state: its buffers (:func:`state_eligible`), written in place.
        flat: the :func:`eligible` batch, ``(rows, features)``, any strides.
        weights: optional float64 row weights ``(rows,)`` on the same device.
        momentum: ``None`` for the exact merge, else the EMA momentum.
        var_floor: the EMA variance floor, if any.
        until: stop updating once the state counts this many samples, if any.

    Returns:
        The batch moments packed as float64 ``[weight, count (int64 bits), mean, var,
        mean_residual]`` (see :func:`moments_of`).

    Example:
        >>> import torch  # doctest: +SKIP
        >>> from rlnorm.algebra.state import initial_state  # doctest: +SKIP
        >>> state = initial_state((2,), 0.0, "cuda")  # doctest: +SKIP
        >>> packed = update(Workspace(), state, torch.ones(4, 2, device="cuda"), None,
        ...                 None, None, None)  # doctest: +SKIP
        >>> moments_of(packed, (2,)).mean.tolist()  # doctest: +SKIP
        [1.0, 1.0]
    """
    k = _load()
    assert k is not None
    d = flat.shape[1]
    cfg = _sums_config(d)
    part_f, part_i, shift = ws.buffers(flat.device, d)
    _launch_shift(k, flat, weights, state.count, until, shift, cfg)
    programs = _launch_sums(k, flat, weights, state.count, until, shift, part_f, part_i, cfg)
    out = torch.empty(2 + 3 * d, dtype=F64, device=flat.device)
    _launch_merge(
        k, part_f, part_i, programs, shift, state, momentum, var_floor, out, d, cfg, False
    )
    _written(state)
    return out


def batch_shift(
    ws: Workspace, flat: Tensor, weights: Tensor | None, count: Tensor, until: int | None
) -> Tensor:
    """:func:`~rlnorm.algebra.moments.batch_shift` by the shift kernel (one launch).

    ``until`` (with the state's ``count``) zeroes the weights as the update does. The result
    is the workspace's shift buffer: valid until its next update.
    """
    k = _load()
    assert k is not None
    cfg = _sums_config(flat.shape[1])
    shift = ws.buffers(flat.device, flat.shape[1])[2]
    _launch_shift(k, flat, weights, count, until, shift, cfg)
    return shift


def shifted_sums(
    ws: Workspace,
    flat: Tensor,
    weights: Tensor | None,
    shift: Tensor,
    count: Tensor | None = None,
    until: int | None = None,
) -> ShiftedSums:
    """:func:`~rlnorm.algebra.moments.shifted_sums` by the sums kernel and a finalize (2 launches).

    Args:
        ws: scratch buffers.
        flat: the batch ``(rows, features)``.
        weights: optional float64 row weights.
        shift: float64 shift ``(features,)`` on the batch's device.
        count: the state's count, read when ``until`` is given.
        until: zero every weight when ``count >= until``.

    Returns:
        New :class:`~rlnorm.algebra.moments.ShiftedSums` (views of one float64 buffer).
    """
    k = _load()
    assert k is not None
    d = flat.shape[1]
    cfg = _sums_config(d)
    part_f, part_i, _ = ws.buffers(flat.device, d)
    shift = shift.to(F64).contiguous()
    count = part_i if count is None else count  # unread without `until`
    programs = _launch_sums(k, flat, weights, count, until, shift, part_f, part_i, cfg)
    out = torch.empty(3 + 2 * d, dtype=F64, device=flat.device)
    # The finalize writes through the state arguments nothing; they only need to be pointers.
    unused = State(shift, shift, part_i, shift, part_i, shift)
    _launch_merge(k, part_f, part_i, programs, shift, unused, None, None, out, d, cfg, True)
    ints = out[1 + 2 * d :].view(torch.int64)
    return ShiftedSums(out[0], ints[0], out[1 : 1 + d], out[1 + d : 1 + 2 * d], ints[1], shift)


def merge_sums(
    ws: Workspace,
    state: State,
    sums: ShiftedSums,
    momentum: float | None,
    var_floor: float | None,
) -> Tensor:
    """Merge given shifted sums (e.g. reduced over ranks) into ``state`` with the merge kernel.

    Every rank that passes the same sums and state gets bitwise the same result.

    Returns:
        The batch moments, packed as by :func:`update`.
    """
    k = _load()
    assert k is not None
    d = state.mean.numel()
    cfg = _sums_config(d)
    device = state.mean.device
    part_f = torch.cat((sums.weight.reshape(1), sums.sum.reshape(-1), sums.sum_sq.reshape(-1))).to(
        device=device, dtype=F64
    )
    part_i = torch.stack((sums.count.reshape(()), sums.nonfinite.reshape(())))
    part_i = part_i.to(device=device, dtype=torch.int64).reshape(1, 2)
    shift = sums.shift.reshape(-1).to(device=device, dtype=F64).contiguous()
    out = torch.empty(2 + 3 * d, dtype=F64, device=device)
    _launch_merge(
        k, part_f.reshape(1, -1), part_i, 1, shift, state, momentum, var_floor, out, d, cfg, False
    )
    _written(state)
    return out


def moments_of(packed: Tensor, shape: tuple[int, ...] | torch.Size) -> Moments:
    """The batch :class:`~rlnorm.algebra.moments.Moments` in a packed update output (views).

    Example:
        >>> import torch
        >>> packed = torch.tensor([2.0, 0.0, 1.0, 4.0, 0.0], dtype=torch.float64)
        >>> packed[1:2].view(torch.int64).fill_(2)
        tensor([2])
        >>> m = moments_of(packed, (1,))
        >>> float(m.weight), int(m.count), m.mean.tolist()
        (2.0, 2, [1.0])
    """
    d = (packed.numel() - 2) // 3
    return Moments(
        packed[0],
        packed[1:2].view(torch.int64).view(()),
        packed[2 : 2 + d].view(shape),
        packed[2 + d : 2 + 2 * d].view(shape),
        packed[2 + 2 * d :].view(shape),
    )


def normalize(
    state: State,
    x: Tensor,
    clip: float | None,
    epsilon: float,
    center: bool,
    return_clipped: bool,
) -> Tensor | tuple[Tensor, Tensor]:
    """``normalize`` in one kernel launch, its affine map computed from the state buffers.

    The map is :func:`~rlnorm.algebra.affine.affine` in the computing dtype of ``x`` (float32
    for halves), applied as :func:`~rlnorm.algebra.affine.normalize` does, the result cast back
    to ``x``'s dtype. The clipped count (values the clamp set to a finite bound) is a 0-d
    int64 tensor, summed with integer atomics.

    Args:
        state: the normalizer's buffers.
        x: an :func:`eligible` tensor ``(*batch, *shape)``.
        clip: clamp bound, or ``None``.
        epsilon: added to the variance before the square root.
        center: subtract the mean.
        return_clipped: also return the clipped count.

    Returns:
        A new tensor of ``x``'s shape and dtype (and the count if asked).
    """
    k = _load()
    assert k is not None
    d = max(state.mean.numel(), 1)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    clipped = torch.zeros((), dtype=torch.int64, device=x.device) if return_clipped else None
    n = x.numel() // d
    if n:
        flat = x.reshape(n, d)
        width = _next_pow2(d)
        block_d = min(width, NORMALIZE_BLOCK_D)
        block_n = max(1, NORMALIZE_TILE // block_d)
        params = _params(x.device, (epsilon, math.inf if clip is None else clip))
        grid = (-(-n // block_n), -(-d // block_d))
        with _launching("normalize"):
            k.normalize_kernel[grid](
                flat,
                y,
                state.mean,
                state.var,
                state.mean_residual,
                state.weight_sum,
                params,
                y if clipped is None else clipped,
                n,
                d,
                flat.stride(0),
                flat.stride(1),
                COMPUTE=k.tl.float64 if x.dtype == F64 else k.tl.float32,
                CENTER=center,
                CLAMP=clip is not None,
                COUNT=clipped is not None and clip is not None,
                BLOCK_N=block_n,
                BLOCK_D=block_d,
                num_warps=NUM_WARPS,
                enable_fp_fusion=False,
            )
    return y if clipped is None else (y, clipped)


def discounted_returns(
    rewards: Tensor, dones: Tensor, returns: Tensor, gamma: float
) -> tuple[Tensor, Tensor]:
    """:func:`~rlnorm.algebra.returns.discounted_returns` in one kernel launch.

    Args:
        rewards: an :func:`eligible` ``(T, envs)`` tensor.
        dones: bool (or 0/1) of the same shape, same device.
        returns: float64 returns ``(envs,)`` before the first step; not modified.
        gamma: the discount.

    Returns:
        The float64 trajectory ``(T, envs)`` (NaN at non-finite rewards) and the new returns.
    """
    k = _load()
    assert k is not None
    steps, envs = rewards.shape
    device = rewards.device
    trajectory = torch.empty((steps, envs), dtype=F64, device=device)
    new_returns = torch.empty(envs, dtype=F64, device=device)
    if envs:
        flags = dones.view(torch.uint8) if dones.dtype == torch.bool else (dones != 0).byte()
        start = returns.to(F64).contiguous()
        with _launching("discounted_returns"):
            k.discounted_returns_kernel[(-(-envs // RETURNS_BLOCK_E),)](
                rewards,
                flags,
                start,
                trajectory,
                new_returns,
                _params(device, (float(gamma),)),
                steps,
                envs,
                rewards.stride(0),
                rewards.stride(1),
                flags.stride(0),
                flags.stride(1),
                BLOCK_E=RETURNS_BLOCK_E,
                num_warps=NUM_WARPS,
                enable_fp_fusion=False,
            )
    return trajectory, new_returns
