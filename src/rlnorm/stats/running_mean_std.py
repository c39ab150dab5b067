"""``RunningMeanStd``: exact (or EMA) running statistics of observations, as a ``nn.Module``.

A thin shell: the state is declared in :mod:`rlnorm.algebra.state`, the formulas are the pure
functions of :mod:`rlnorm.algebra`, and every update and normalize goes through one door,
:class:`rlnorm.backends.dispatch.Dispatcher`, which picks native kernels, CUDA graphs or torch.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager
from typing import Any, Literal, overload

import torch
import torch.distributed as dist
from torch import Tensor, nn

from rlnorm import _validation as check
from rlnorm.algebra.affine import compute_dtype, denormalize
from rlnorm.algebra.moments import Moments, merge
from rlnorm.algebra.state import (
    State,
    as_moments,
    check_loadable,
    fill_legacy,
    from_moments,
    initial_state,
)
from rlnorm.backends.dispatch import Dispatcher, Settings, store
from rlnorm.stats.distributed import Sync
from rlnorm.stats.inputs import check_input, checked_settings, flatten

__all__ = ["RunningMeanStd"]


def _setting(name: str, doc: str) -> property:
    """A setting read from, and assigned (checked) into, the normalizer's ``Settings``."""

    def get(self: RunningMeanStd) -> Any:
        return getattr(self._settings, name)

    def assign(self: RunningMeanStd, value: Any) -> None:
        self._settings = checked_settings(**{**self._settings._asdict(), name: value})

    return property(get, assign, doc=doc)


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
    mean_residual: Tensor

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
        # Built once (and again when a setting is assigned): update and normalize read it on
        # every call.
        self._settings = checked_settings(
            momentum, var_floor, until, nonfinite, clip, epsilon, center
        )
        # The buffers as a `State`, built on first use and dropped whenever a buffer is replaced.
        self._state: State | None = None
        if not isinstance(sync, bool):
            raise TypeError(f"`sync` must be a bool, got {sync!r}.")
        self.sync = sync
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
            state = initial_state(self.shape, self.prior_weight, device)
        for name, buffer in zip(State._fields, state, strict=True):
            self.register_buffer(name, buffer)
        self._sync = Sync(process_group)
        # The caches of the backends (kernel addresses, normalize's map, CUDA graphs) and the
        # lock of the writers (update, merge_, reset, loads) and of the cache refresh.
        self._dispatch = Dispatcher(type(self).__name__)

    # ------------------------------------------------------------------ statistics

    @property
    def std(self) -> Tensor:
        """Standard deviation ``sqrt(var)`` (float64; ``normalize`` adds ``epsilon`` first)."""
        return self.var.sqrt()

    @property
    def state(self) -> State:
        """The statistics buffers as a :class:`~rlnorm.algebra.state.State` (live tensors)."""
        state = self._state
        if state is None:
            buffers = self._buffers
            state = State(*[buffers[name] for name in State._fields])  # type: ignore[arg-type]
            self._state = state
        return state

    @property
    def moments(self) -> Moments:
        """The current state as plain :class:`~rlnorm.algebra.moments.Moments` (live tensors)."""
        return as_moments(self.state)

    @property
    def settings(self) -> Settings:
        """The settings the backends run ``update`` and ``normalize`` with."""
        return self._settings

    momentum = _setting("momentum", "``None`` for exact statistics, or the EMA weight.")
    var_floor = _setting("var_floor", "EMA variance floor relative to the latest batch.")
    until = _setting("until", "Updates stop once ``count`` reached this (``None``: never).")
    nonfinite = _setting("nonfinite", "``'skip'`` or ``'raise'`` NaN/Inf rows.")
    clip = _setting("clip", "Clamp bound of normalized values (``None``: none).")
    epsilon = _setting("epsilon", "Added to the variance before the square root.")
    center = _setting("center", "Whether ``normalize`` subtracts the mean.")

    @property
    def numel(self) -> int:
        """Number of features, ``prod(shape)``."""
        return math.prod(self.shape)

    @property
    def process_group(self) -> dist.ProcessGroup | None:
        """The group updates are reduced over (``None``: the default group)."""
        return self._sync.group

    @property
    def _lock(self) -> AbstractContextManager[bool]:
        """Serializes writers and the normalize cache refresh (a ``threading.RLock``)."""
        return self._dispatch.lock

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
            x = check.as_tensor("x", x, self._device)
        if mask is not None and type(mask) is not Tensor:
            mask = check.as_tensor("mask", mask, self._device)
        if torch.compiler.is_compiling():  # traced once: no lock in the graph
            return self._update(x, mask)
        with self._lock:
            return self._update(x, mask)

    def _update(self, x: Tensor, mask: Tensor | None) -> Moments:
        flat, weights = flatten(x, mask, self.shape, self._device)
        reducer = self._sync if self.sync and self._sync.active() else None
        return self._dispatch.update(self.state, flat, weights, self.settings, x.shape, reducer)

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
            store(self.state, from_moments(new, self.nonfinite_count + other.nonfinite_count))
        return self

    @torch.no_grad()
    def reset(self) -> None:
        """Forget all data: back to count 0, mean 0, variance 1 (and ``prior_weight``)."""
        with self._lock:
            self._sync.reset(self.state)
            store(self.state, initial_state(self.shape, self.prior_weight, self.mean.device))

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
        state, settings = self._state or self.state, self._settings
        done = self._dispatch.normalize_cached(state, x, settings)
        if done is not None:  # the per-step CPU call: checked and normalized in one step
            return done if return_clipped else done[0]
        if type(x) is not Tensor:
            x = check.as_tensor("x", x, self._device)
        check_input("x", x, self.shape, self._device)
        return self._dispatch.normalize(state, x, settings, return_clipped)

    def denormalize(self, y: Tensor) -> Tensor:
        """Inverse of :meth:`normalize`: ``y * sqrt(var + epsilon) + mean`` where not clipped.

        Args:
            y: normalized tensor of shape ``(*batch, *shape)``.

        Returns:
            The tensor in the original units, in ``y``'s dtype.
        """
        if type(y) is not Tensor:
            y = check.as_tensor("y", y, self._device)
        check_input("y", y, self.shape, self._device)
        return denormalize(y, self._dispatch.affine(self.state, self.settings, compute_dtype(y)))

    def forward(self, x: Tensor) -> Tensor:
        """Same as :meth:`normalize`, so the module can sit inside ``nn.Sequential``."""
        return self.normalize(x)

    # ------------------------------------------------------------------ internals

    @property
    def _device(self) -> torch.device:
        return self.state.mean.device

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name in State._fields:  # a buffer replaced (e.g. `load_state_dict(assign=True)`)
            self.__dict__["_state"] = None

    def _apply(self, fn: Any, recurse: bool = True) -> RunningMeanStd:
        """Device moves apply; dtype casts (``.half()``, ``.float()``) keep float64 statistics."""

        def move_only(t: Tensor) -> Tensor:
            out = fn(t)
            return out if out.dtype == t.dtype else t.to(device=out.device)

        # The buffers are replaced: drop what was derived from them. The agreed shift moves with
        # them (dropping it on one rank would make that rank alone agree again: a collective
        # the other ranks never join). Moves made inside inference mode still give normal tensors.
        with torch.inference_mode(False):
            self._sync.move(move_only)
            self._dispatch.clear()
            self._state = None
            return super()._apply(move_only, recurse)

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
        fill_legacy(state_dict, prefix)
        check_loadable(state_dict, prefix, self.shape)
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
            self._dispatch.clear()
            self._state = None

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
