"""``RunningMeanStd``: exact (or EMA) running statistics of observations, as a ``nn.Module``."""

from __future__ import annotations

import math
import threading
from typing import Any, Literal, NamedTuple, overload

import torch
import torch.distributed as dist
from torch import Tensor, nn

from rlnorm import _validation as check
from rlnorm.algebra.moments import (
    SHIFT_ROWS,
    Moments,
    batch_moments,
    batch_shift,
    empty_moments,
    merge,
    merge_ema,
    residual,
    shifted_sums,
)
from rlnorm.backends import cuda_graphs
from rlnorm.backends import native as _native
from rlnorm.stats.distributed import agree_shift, all_reduce_sums, is_distributed

__all__ = ["RunningMeanStd"]


class Affine(NamedTuple):
    """``normalize(x) = clamp(((x - offset) - offset_lo) * scale, low, high)``, in one dtype.

    ``offset + offset_lo`` is the mean to twice the precision of the dtype.
    """

    offset: Tensor
    offset_lo: Tensor
    scale: Tensor
    low: Tensor
    high: Tensor


_STATE_KEYS = ("mean", "var", "count", "weight_sum", "nonfinite_count", "mean_residual")


class RunningMeanStd(nn.Module):
    """Running mean and variance of a stream of tensors, and normalization by them.

    Statistics are float64 buffers (the count int64) whatever the input dtype, so ``.to()``,
    ``state_dict()`` and ``load_state_dict()`` behave as for any module, and precision does not
    run out: counts stay exact past ``2**24`` and ``2**31``, and a mean of 1e6 with a standard
    deviation of 1e-3 keeps its variance to 1e-14 relative however the data are chunked
    (measured at most 5.3e-15 against the exact rational variance; see
    ``tests/stats/test_precision_claims.py``).

    Exact mode (``momentum=None``) merges each batch's moments with Chan's parallel formula;
    the result equals the moments of all data seen so far, with no fake prior samples. EMA mode
    (``momentum`` in ``[0, 1)``) keeps an exponential moving average that follows
    non-stationary data; see :func:`rlnorm.algebra.moments.merge_ema` for the exact formula. Its
    trade-off: a momentum close to 1 gives stable statistics that lag a distribution shift,
    a small one follows shifts quickly but lets the normalization jitter with every batch.
    ``var_floor`` bounds the lag's worst effect: after a shift, normalized batches keep a root
    mean square of at most ``1 / sqrt(var_floor)`` instead of exploding while the variance
    catches up, at the cost of statistics that briefly track the latest batch.

    ``update`` and ``normalize`` launch no host synchronisation (except ``nonfinite="raise"``,
    which must look at the data), so both are safe inside CUDA graphs and compile with
    ``torch.compile(fullgraph=True)``.

    When ``torch.distributed`` is initialised with several processes, each ``update`` reduces
    the batch moments over ``process_group`` with one small all-reduce, so every rank applies
    the same update and holds bitwise identical statistics. Every rank must then call
    ``update`` the same number of times. Pass ``sync=False`` for per-process statistics.

    Args:
        shape: feature shape of one sample (``()`` for scalars).
        momentum: ``None`` for exact statistics, or the EMA weight of the past in ``[0, 1)``.
        clip: normalized values are clamped to ``[-clip, clip]``; ``None`` disables clamping.
        epsilon: added to the variance before the square root in ``normalize``.
        until: stop updating once ``count`` has reached this many samples (the batch that
            crosses it is taken whole, so that all ranks stop together).
        center: subtract the mean in ``normalize``; ``False`` only divides by the standard
            deviation (scale-only normalization).
        var_floor: EMA mode only: keep the variance at least this fraction of the latest
            batch's second moment around the running mean.
        nonfinite: ``"skip"`` leaves rows holding NaN or Inf out of the update and counts them
            in ``nonfinite_count``; ``"raise"`` raises a ``ValueError`` before anything changes.
        sync: reduce updates over ``torch.distributed`` when it is initialised.
        process_group: the group to reduce over; ``None`` is the default group.
        prior_weight: exact mode only: weight of a fake prior sample set at mean 0 and
            variance 1 that the statistics start from (``weight_sum`` starts there, ``count``
            at 0), and ``normalize`` applies the prior before any data, clamp included.
            ``1e-4`` reproduces Stable-Baselines3 and Gymnasium, whose counts start at
            ``1e-4``; the default ``0.0`` is no prior (identity until data arrive).
        device: where the statistics live.

    Example:
        >>> import torch
        >>> from rlnorm import RunningMeanStd
        >>> rms = RunningMeanStd(3)
        >>> batch = rms.update(torch.tensor([[0.0, 10.0, -4.0], [2.0, 30.0, 4.0]]))
        >>> rms.mean.tolist(), rms.std.tolist(), int(rms.count)
        ([1.0, 20.0, 0.0], [1.0, 10.0, 4.0], 2)
        >>> rms.normalize(torch.tensor([[1.0, 30.0, 8.0]])).round(decimals=4).tolist()
        [[0.0, 1.0, 2.0]]
    """

    mean: Tensor
    var: Tensor
    count: Tensor
    weight_sum: Tensor
    nonfinite_count: Tensor

    def __init__(
        self,
        shape: int | tuple[int, ...] | torch.Size = (),
        *,
        momentum: float | None = None,
        clip: float | None = 10.0,
        epsilon: float = 1e-8,
        until: int | None = None,
        center: bool = True,
        var_floor: float | None = None,
        nonfinite: str = "skip",
        sync: bool = True,
        process_group: dist.ProcessGroup | None = None,
        prior_weight: float = 0.0,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.shape = check.check_shape("shape", shape)
        self.momentum = (
            None
            if momentum is None
            else check.check_float("momentum", momentum, low=0.0, high=1.0, high_open=True)
        )
        self.clip = (
            None if clip is None else check.check_float("clip", clip, low=0.0, low_open=True)
        )
        self.epsilon = check.check_float("epsilon", epsilon, low=0.0, low_open=True)
        self.until = None if until is None else check.check_positive_int("until", until)
        if not isinstance(center, bool):
            raise TypeError(f"`center` must be a bool, got {center!r}.")
        self.center = center
        if var_floor is not None:
            if momentum is None:
                raise ValueError(
                    f"`var_floor` applies to EMA statistics only; got var_floor={var_floor!r} "
                    "with momentum=None. Set `momentum` or drop `var_floor`."
                )
            var_floor = check.check_float("var_floor", var_floor, low=0.0, high=1.0, low_open=True)
        self.var_floor = var_floor
        self.nonfinite = check.check_choice("nonfinite", nonfinite, ("skip", "raise"))
        if not isinstance(sync, bool):
            raise TypeError(f"`sync` must be a bool, got {sync!r}.")
        self.sync = sync
        self.process_group = process_group
        self.prior_weight = check.check_float("prior_weight", prior_weight, low=0.0)
        if self.prior_weight > 0 and momentum is not None:
            raise ValueError(
                f"`prior_weight` applies to exact statistics only; got "
                f"prior_weight={prior_weight!r} with momentum={momentum!r}. Set momentum=None "
                "or prior_weight=0.0."
            )
        device = check.check_device("device", device)

        # Normal tensors even when built under `torch.inference_mode()` (a deployment wrapper):
        # inference tensors cannot be updated outside that mode and keep no version counter.
        with torch.inference_mode(False):
            state = self._initial_moments(device)
            nonfinite_count = torch.zeros((), dtype=torch.int64, device=device)
        self.register_buffer("mean", state.mean)
        self.register_buffer("var", state.var)
        self.register_buffer("count", state.count)
        self.register_buffer("weight_sum", state.weight)
        self.register_buffer("nonfinite_count", nonfinite_count)
        # The exact mean is `mean + mean_residual` (see `Moments.mean_residual`).
        self.register_buffer("mean_residual", state.mean_residual)
        # Shift agreed across ranks at the first synchronised update (see `_shift`). Once set it
        # is kept (moved by `.to()`, kept by `reset` and loads): whether a rank runs the extra
        # collective must not depend on anything one rank can do alone.
        self._agreed_shift: Tensor | None = None
        # Serializes writers (update, merge_, reset, loads) and the refresh of normalize's cache:
        # two threads updating at once would otherwise lose each other's rows.
        self._lock = threading.RLock()
        # Buffers the native kernels were last cleared to write (see `_native._state_ok`).
        self._native_state: tuple[tuple[Tensor, ...], tuple[int, ...], tuple[int, ...]] | None
        self._native_state = None
        self._affine_cache: tuple[tuple, Affine, tuple[int, int, int, float, int]] | None = None
        # CUDA graphs of eager CUDA calls, per input signature (see `rlnorm.backends.cuda_graphs`).
        self._update_graphs = cuda_graphs.GraphedCalls("RunningMeanStd.update")
        self._normalize_graphs = cuda_graphs.GraphedCalls("RunningMeanStd.normalize")

    # ------------------------------------------------------------------ statistics

    @property
    def std(self) -> Tensor:
        """Standard deviation ``sqrt(var)`` (float64; ``normalize`` adds ``epsilon`` first)."""
        return self.var.sqrt()

    @property
    def moments(self) -> Moments:
        """The current state as plain :class:`~rlnorm.algebra.moments.Moments` (live tensors)."""
        return Moments(self.weight_sum, self.count, self.mean, self.var, self.mean_residual)

    @property
    def numel(self) -> int:
        """Number of features, ``prod(shape)``."""
        return math.prod(self.shape)

    # ------------------------------------------------------------------ updating

    def update(self, x: Tensor, mask: Tensor | None = None) -> Moments:
        """Fold a batch into the statistics.

        Args:
            x: tensor of shape ``(*batch, *shape)`` with any number of leading batch dims.
            mask: optional tensor of shape ``batch``: bool to keep rows, or non-negative float
                weights. Rows with mask ``False`` or weight 0 are left out; negative, NaN and
                infinite weights count as 0 (checking them would need a host sync).

        Returns:
            The batch's own moments (after the distributed reduction, if any), which callers
            such as :class:`~rlnorm.NormalizerCallback` use to measure drift. An empty batch
            changes nothing and returns zero weight.

        Raises:
            ValueError: ``x`` or ``mask`` has the wrong shape or device, or, with
                ``nonfinite="raise"``, the batch holds NaN or Inf.
            TypeError: ``x`` or ``mask`` is not a tensor, a NumPy array or numbers.

        Updates from several threads are serialized (each takes a lock, about half a
        microsecond when uncontended), so no rows are lost.
        """
        if type(x) is not Tensor:
            x = check.as_tensor("x", x, self._buffers["mean"].device)  # type: ignore[union-attr]
        if mask is not None and type(mask) is not Tensor:
            mask = check.as_tensor("mask", mask, self._buffers["mean"].device)  # type: ignore[union-attr]
        if torch.compiler.is_compiling():  # traced once: no lock in the graph
            return self._update(x, mask)
        with self._lock:
            return self._update(x, mask)

    def _update(self, x: Tensor, mask: Tensor | None) -> Moments:
        flat, weights = self._flatten(x, mask)
        if not self._should_sync():
            batch = _native.try_update(self, flat, weights, x.shape)
            if batch is not None:
                return batch
            if self.nonfinite == "skip" and cuda_graphs.eligible(flat):
                return self._graphed_update(flat, weights)
        with torch.no_grad():
            return self._update_torch(x, flat, weights)

    def _graphed_update(self, flat: Tensor, weights: Tensor | None) -> Moments:
        """``update`` on CUDA through a CUDA graph of it (:mod:`~rlnorm.backends.cuda_graphs`)."""
        d = self.numel

        def packed_update(flat: Tensor, weights: Tensor | None) -> tuple[Tensor, Tensor]:
            with torch.no_grad():
                m = self._update_torch(flat, flat, weights)
            # One float64 tensor and the count: two copies out of the graph instead of five.
            parts = (m.weight.view(1), m.mean.view(-1), m.var.view(-1), residual(m).view(-1))
            return torch.cat(parts), m.count

        key = (
            tuple(flat.shape),
            flat.dtype,
            weights is None,
            self.momentum,
            self.var_floor,
            self.until,
            torch.is_inference_mode_enabled(),
        )
        with torch.no_grad():  # copies into the graph's inputs must not record autograd history
            packed, count = self._update_graphs(
                key,
                packed_update,
                (flat, weights),
                lambda out: (out[0].clone(), out[1].clone()),
                self._buffer_list(),
            )
        return Moments(
            packed[0],
            count,
            packed[1 : 1 + d].view(self.shape),
            packed[1 + d : 1 + 2 * d].view(self.shape),
            packed[1 + 2 * d :].view(self.shape),
        )

    def _update_torch(self, x: Tensor, flat: Tensor, weights: Tensor | None) -> Moments:
        """``update`` with torch operations (any device, compiled, synchronised)."""
        if self.until is not None:
            active = (self.count < self.until).to(torch.float64)
            weights = active.expand(flat.shape[0]) if weights is None else weights * active
        shift = self._shift(flat, weights)
        sums = shifted_sums(flat, weights, shift)
        if self._should_sync():
            sums = all_reduce_sums(sums, self.process_group)
        if self.nonfinite == "raise" and bool(sums.nonfinite > 0):
            raise check.nonfinite_error(int(sums.nonfinite), x.shape)
        batch = batch_moments(sums)
        flat_state = (self.mean.reshape(-1), self.var.reshape(-1), self.mean_residual.reshape(-1))
        state = Moments(self.weight_sum, self.count, *flat_state)
        if self.momentum is None:
            new = merge(state, batch)
        else:
            new = merge_ema(state, batch, self.momentum, self.var_floor)
        self._store(new, self.nonfinite_count + sums.nonfinite)
        # Built explicitly: some torch.compile versions cannot return `NamedTuple._replace`.
        return Moments(
            batch.weight,
            batch.count,
            batch.mean.reshape(self.shape),
            batch.var.reshape(self.shape),
            residual(batch).reshape(self.shape),
        )

    @torch.no_grad()
    def merge_(self, other: RunningMeanStd) -> RunningMeanStd:
        """Fold another normalizer's statistics into this one (exact Chan merge), in place.

        In EMA mode the two estimates are mixed in proportion to their debiasing weights.

        Args:
            other: a normalizer of the same ``shape``, on the same device.

        Returns:
            ``self``.
        """
        if not isinstance(other, RunningMeanStd):
            raise TypeError(f"`other` must be a RunningMeanStd, got {check.show(other)}.")
        if other.shape != self.shape:
            raise ValueError(
                f"`other` has shape {other.shape} but this normalizer has shape {self.shape}."
            )
        if other.mean.device != self.mean.device:
            raise ValueError(
                f"`other` is on {other.mean.device} but this normalizer is on {self.mean.device}."
            )
        with self._lock:
            new = merge(self.moments, other.moments)
            self._store(new, self.nonfinite_count + other.nonfinite_count)
        return self

    def _store(self, new: Moments, nonfinite_count: Tensor) -> None:
        """Write a new state into the buffers, in place (CUDA graphs keep their addresses).

        Writes go through 1-D views: torch.compile on the CPU drops in-place writes to 0-d
        float64 buffers (seen with torch 2.11 and 2.13), and 1-D views of them are written.
        """
        for buffer, value in (
            (self.mean, new.mean),
            (self.var, new.var),
            (self.count, new.count),
            (self.weight_sum, new.weight),
            (self.nonfinite_count, nonfinite_count),
            (self.mean_residual, residual(new)),
        ):
            buffer.view(-1).copy_(value.reshape(-1))

    @torch.no_grad()
    def reset(self) -> None:
        """Forget all data: back to count 0, mean 0, variance 1 (and ``prior_weight``)."""
        with self._lock:
            if self._agreed_shift is not None:
                # The next synchronised update sums around the last mean, as all ranks do.
                seen = self.count > 0
                self._agreed_shift = torch.where(seen, self.mean.reshape(-1), self._agreed_shift)
            self._store(self._initial_moments(self.mean.device), self.nonfinite_count * 0)

    def _initial_moments(self, device: torch.device | None) -> Moments:
        """The state before any data: the prior (weight ``prior_weight``) at mean 0, var 1."""
        state = empty_moments(self.shape, device=device)
        if self.prior_weight > 0:
            state.weight.fill_(self.prior_weight)
        return state

    # ------------------------------------------------------------------ normalizing

    @overload
    def normalize(self, x: Tensor, *, return_clipped: Literal[False] = False) -> Tensor: ...

    @overload
    def normalize(
        self, x: Tensor, *, return_clipped: Literal[True]
    ) -> tuple[Tensor, int | Tensor]: ...

    def normalize(
        self, x: Tensor, *, return_clipped: bool = False
    ) -> Tensor | tuple[Tensor, int | Tensor]:
        """``clamp((x - mean) / sqrt(var + epsilon), -clip, clip)`` in ``x``'s dtype.

        float32 inputs are computed in float32 with the mean split into two float32 parts, so
        the result is accurate to float32 precision even when the mean is large compared with
        the standard deviation.

        Before the first update this is the identity (no clamp either), unless a
        ``prior_weight`` gives the statistics a prior to normalize with. The statistics are
        buffers without gradients, so the output carries no autograd history into them and can
        feed a later forward and backward pass. Call it under ``torch.no_grad()`` rather than
        ``torch.inference_mode()``: inference tensors cannot be saved for a later backward.

        Args:
            x: tensor of shape ``(*batch, *shape)``. Integer inputs give float32 output.
            return_clipped: also return how many output values sit at ``+-clip`` (what the
                clamp cut), counted for free on the native CPU path: an ``int`` there, a 0-d
                tensor elsewhere (no host synchronisation).

        Returns:
            The normalized tensor, same shape as ``x`` (and the clipped count if asked).
        """
        if type(x) is not Tensor:
            x = check.as_tensor("x", x, self._buffers["mean"].device)  # type: ignore[union-attr]
        self._check_input(x)
        native = _native.try_normalize(self, x)
        if native is not None:
            return native if return_clipped else native[0]
        if cuda_graphs.eligible(x):
            key = (
                tuple(x.shape),
                x.dtype,
                self.clip,
                self.epsilon,
                self.center,
                return_clipped,
                torch.is_inference_mode_enabled(),
            )
            return self._normalize_graphs(
                key,
                lambda x: self._normalize_torch(x, return_clipped),
                (x,),
                lambda out: tuple(t.clone() for t in out) if return_clipped else out.clone(),
                self._buffer_list(),
            )
        return self._normalize_torch(x, return_clipped)

    def _buffer_list(self) -> tuple[Tensor, ...]:
        """The statistics buffers, which captured CUDA graphs read and write by address."""
        return tuple(self._buffers.values())  # type: ignore[arg-type]

    def _normalize_torch(
        self, x: Tensor, return_clipped: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """``normalize`` with torch operations (any device, compiled, graph-captured)."""
        affine = self._affine(x)
        y = torch.sub(x.to(affine.scale.dtype), affine.offset).sub_(affine.offset_lo)
        y = y.mul_(affine.scale)
        if self.clip is not None:
            y = y.clamp_(affine.low, affine.high)
        out = y if y.dtype == x.dtype or not x.is_floating_point() else y.to(x.dtype)
        if not return_clipped:
            return out
        if self.clip is None:
            return out, torch.zeros((), dtype=torch.int64, device=y.device)
        # Values the clamp set to a finite bound (before any cast back to x's dtype).
        return out, ((y.abs() == affine.high) & torch.isfinite(affine.high)).sum()

    def denormalize(self, y: Tensor) -> Tensor:
        """Inverse of :meth:`normalize`: ``y * sqrt(var + epsilon) + mean`` where not clipped.

        Args:
            y: normalized tensor of shape ``(*batch, *shape)``.

        Returns:
            The tensor in the original units, in ``y``'s dtype.
        """
        if type(y) is not Tensor:
            y = check.as_tensor("y", y, self._buffers["mean"].device)  # type: ignore[union-attr]
        self._check_input(y, name="y")
        affine = self._affine(y)
        dtype = affine.scale.dtype
        return (
            torch.div(y.to(dtype), affine.scale)
            .add_(affine.offset_lo)
            .add_(affine.offset)
            .to(y.dtype if y.is_floating_point() else dtype)
        )

    def forward(self, x: Tensor) -> Tensor:
        """Same as :meth:`normalize`, so the module can sit inside ``nn.Sequential``."""
        return self.normalize(x)

    # ------------------------------------------------------------------ internals

    def _affine(self, x: Tensor) -> Affine:
        """Offset, scale and clamp bounds in the dtype ``x`` is computed in.

        On the CPU they are cached until a statistic or setting changes (tensor version counters
        tell), which saves a dozen small kernels per ``normalize`` call. Under ``torch.compile``
        and on accelerators they are recomputed from the buffers each call, so CUDA graphs and
        their replays always see the statistics of the moment.
        """
        dtype = x.dtype
        if not x.is_floating_point():
            dtype = torch.get_default_dtype()
        elif dtype in (torch.float16, torch.bfloat16):
            dtype = torch.float32
        if torch.compiler.is_compiling() or self.mean.device.type != "cpu":
            # CUDA-graph replays write the buffers without bumping their version counters, so
            # accelerators always read the statistics afresh.
            return self._compute_affine(dtype)
        return self._cached_affine(dtype)[0]

    def _cached_affine(self, dtype: torch.dtype) -> tuple[Affine, tuple[int, int, int, float, int]]:
        """CPU only, cached: the affine of ``dtype`` and the native normalize kernel's arguments.

        The arguments are the addresses of offset, offset_lo and scale, the clamp bound as a
        number and the number of features.

        The cached tensors are made outside inference mode, so one cache serves calls under
        ``torch.inference_mode()`` and calls whose output feeds a backward pass alike.
        """
        cache = self._affine_cache
        key = self._affine_key(dtype)
        if cache is not None and cache[0] == key:
            return cache[1], cache[2]
        with self._lock:  # a consistent state: no update is halfway through writing it
            key = self._affine_key(dtype)
            with torch.inference_mode(False):
                affine = self._compute_affine(dtype)
            high = affine.high.reshape(-1)
            # The native kernel takes the bound as a number: one host read per change.
            bound = float(high[0]) if high.numel() else math.inf
            args = (
                affine.offset.data_ptr(),
                affine.offset_lo.data_ptr(),
                affine.scale.data_ptr(),
                bound,
                affine.offset.numel(),
            )
            if key is not None:
                self._affine_cache = (key, affine, args)
        return affine, args

    def _affine_key(self, dtype: torch.dtype) -> tuple | None:
        """What the cached affine depends on; ``None`` when it cannot be told (no caching)."""
        buffers = self._buffers
        mean, var, weight = buffers["mean"], buffers["var"], buffers["weight_sum"]
        try:
            return (
                dtype,
                self.clip,
                self.epsilon,
                self.center,
                id(mean),
                mean._version,  # type: ignore[union-attr]
                id(var),
                var._version,  # type: ignore[union-attr]
                id(weight),
                weight._version,  # type: ignore[union-attr]
            )
        except RuntimeError:
            # Inference tensors (buffers a user replaced inside inference mode) keep no version
            # counter, so a cache could not see their updates: recompute every call.
            return None

    def _compute_affine(self, dtype: torch.dtype) -> Affine:
        # Statistics count as seen once they carry weight: data, or a `prior_weight`.
        seen = self.weight_sum > 0
        scale = torch.where(seen, torch.rsqrt(self.var + self.epsilon), 1.0)
        if self.center:
            mean = torch.where(seen, self.mean, 0.0)
            offset = mean.to(dtype)
            # What rounding the mean to `dtype` lost, plus the mean's own residual: subtracting
            # both keeps float32 outputs accurate to float32 precision relative to the std
            # however far the data sit from zero (a float32 mean alone is off by up to
            # 6e-8 * |mean|, i.e. 6e-5 in normalized units at mean 1e3 and std 1).
            residual = torch.where(seen, self.mean_residual, 0.0)
            offset_lo = ((mean - offset.to(torch.float64)) + residual).to(dtype)
        else:
            offset = offset_lo = torch.zeros_like(self.mean, dtype=dtype)
        clip = math.inf if self.clip is None else self.clip
        high = torch.where(seen, clip, math.inf).to(dtype=dtype, device=self.mean.device)
        # Bounds of the feature shape: clamp with 0-d tensor bounds is ~10x slower on the CPU.
        high = high.expand(self.mean.shape).contiguous()
        return Affine(offset, offset_lo, scale.to(dtype), -high, high)

    def _check_input(self, x: Tensor, name: str = "x") -> None:
        mean = self._buffers["mean"]
        # The common case in two cheap tests (this runs on every environment step).
        if not (type(x) is Tensor and x.is_cpu and mean.is_cpu and not x.is_complex()):  # type: ignore[union-attr]
            check.check_tensor(name, x, mean.device)  # type: ignore[union-attr]
        ndim = len(self.shape)
        if x.dim() < ndim or tuple(x.shape[x.dim() - ndim :]) != self.shape:
            raise ValueError(
                f"`{name}` must have shape (*batch, *{self.shape}) to match the normalizer's "
                f"`shape`, got {tuple(x.shape)}."
            )

    def _flatten(self, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """``x`` as ``(rows, features)`` and the mask as float64 row weights."""
        self._check_input(x)
        batch_shape = tuple(x.shape[: x.dim() - len(self.shape)])
        if x.dtype == torch.bool:
            x = x.to(torch.uint8)
        flat = x.reshape(-1, self.numel)
        if mask is None:
            return flat, None
        check.check_tensor("mask", mask, self.mean.device)
        if tuple(mask.shape) != batch_shape:
            raise ValueError(
                f"`mask` must have the batch shape {batch_shape} of `x` (x has shape "
                f"{tuple(x.shape)}, the normalizer shape {self.shape}), got {tuple(mask.shape)}."
            )
        return flat, mask.reshape(-1).to(torch.float64)

    def _should_sync(self) -> bool:
        return self.sync and is_distributed(self.process_group)

    def _shift(self, flat: Tensor, weights: Tensor | None) -> Tensor:
        """The point the batch is summed around; common to all ranks when synchronising."""
        local = batch_shift(flat, weights)
        if not self._should_sync():
            return local
        if self._agreed_shift is None:
            # Before the first synchronised update the ranks share no running mean yet; agree
            # on a shift once (the only extra collective), afterwards the running mean serves.
            head = flat[:SHIFT_ROWS]
            head_weight = (
                torch.full((), float(head.shape[0]), dtype=torch.float64, device=flat.device)
                if weights is None
                else weights[:SHIFT_ROWS].sum()
            )
            self._agreed_shift = agree_shift(local, head_weight, self.process_group)
        return torch.where(self.count > 0, self.mean.reshape(-1), self._agreed_shift)

    def _apply(self, fn: Any, recurse: bool = True) -> RunningMeanStd:
        """Device moves apply; dtype casts (``.half()``, ``.float()``) keep float64 statistics."""

        def move_only(t: Tensor) -> Tensor:
            out = fn(t)
            return out if out.dtype == t.dtype else t.to(device=out.device)

        # The buffers are replaced: drop what was derived from them. The agreed shift moves with
        # them (dropping it on one rank would make that rank alone agree again: a collective
        # the other ranks never join). Moves made inside inference mode still give normal tensors.
        with torch.inference_mode(False):
            if self._agreed_shift is not None:
                self._agreed_shift = move_only(self._agreed_shift)
            self._drop_derived()
            return super()._apply(move_only, recurse)

    def _drop_derived(self) -> None:
        """Forget caches that hold buffer addresses (normalize's affine, kernels, graphs)."""
        self._affine_cache = None
        self._native_state = None
        self._update_graphs.clear()
        self._normalize_graphs.clear()

    def __getstate__(self) -> dict[str, Any]:
        """Pickling and deep copies leave out caches that hold buffer addresses, and the lock."""
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        state = dict(state)
        state["_affine_cache"] = None
        state["_native_state"] = None
        state.pop("_lock", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._lock = threading.RLock()

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        for key in ("mean", "var"):
            value = state_dict.get(prefix + key)
            if isinstance(value, Tensor) and tuple(value.shape) != self.shape:
                raise ValueError(
                    f"Cannot load `{prefix}{key}`: the state has shape {tuple(value.shape)}, "
                    f"this normalizer expects {self.shape}."
                )
        if prefix + "count" in state_dict and prefix + "weight_sum" not in state_dict:
            # States written before `weight_sum` existed: every sample had weight 1.
            state_dict[prefix + "weight_sum"] = state_dict[prefix + "count"].to(torch.float64)
        if prefix + "count" in state_dict and prefix + "nonfinite_count" not in state_dict:
            state_dict[prefix + "nonfinite_count"] = torch.zeros((), dtype=torch.int64)
        if prefix + "mean" in state_dict and prefix + "mean_residual" not in state_dict:
            state_dict[prefix + "mean_residual"] = torch.zeros_like(state_dict[prefix + "mean"])
        for key in _STATE_KEYS:
            value = state_dict.get(prefix + key)
            finite_or_int = (
                not isinstance(value, Tensor)
                or not value.is_floating_point()
                or bool(torch.isfinite(value).all())
            )
            if not finite_or_int:
                raise ValueError(f"Cannot load `{prefix}{key}`: it holds NaN or Inf values.")
            if key == "var" and isinstance(value, Tensor) and bool((value < 0).any()):
                raise ValueError(f"Cannot load `{prefix}var`: it holds negative variances.")
        with self._lock:
            super()._load_from_state_dict(
                state_dict,
                prefix,
                local_metadata,
                strict,
                missing_keys,
                unexpected_keys,
                error_msgs,
            )
            for name, buffer in self._buffers.items():
                if buffer is not None and buffer.is_inference():
                    # `assign=True` inside inference mode: keep normal, updatable tensors.
                    with torch.inference_mode(False):
                        self._buffers[name] = buffer.clone()
            # `load_state_dict(assign=True)` replaces the buffers: forget what pointed at them.
            self._drop_derived()

    def extra_repr(self) -> str:  # noqa: D102
        parts = [f"shape={self.shape}"]
        parts.append("exact" if self.momentum is None else f"momentum={self.momentum}")
        parts.append(f"clip={self.clip}, epsilon={self.epsilon}")
        if self.until is not None:
            parts.append(f"until={self.until}")
        if not self.center:
            parts.append("center=False")
        if self.var_floor is not None:
            parts.append(f"var_floor={self.var_floor}")
        if self.prior_weight:
            parts.append(f"prior_weight={self.prior_weight}")
        return ", ".join(parts)
