"""The one door to the backends: it takes plain tensors and picks native kernels, graphs or torch.

The statistics modules call :class:`Dispatcher` (``update``, ``normalize``, ``affine``) with
their buffers as a :class:`~rlnorm.algebra.state.State` of tensors, the batch, and their
:class:`Settings`; :func:`shifted_sums` and :func:`discounted_returns` are the plain functions
behind them. Each call takes the first path that applies:

- the fused Triton kernels (:mod:`rlnorm.backends.fused`): eager CUDA calls of a floating
  dtype, no autograd through the input, triton importable; replayed from CUDA graphs
  (:mod:`rlnorm.backends.cuda_graphs`) where those apply, launched eagerly where not (inside a
  caller's own capture, graphs turned off, a distributed reduction, ``nonfinite="raise"``);
- the native CPU kernels (:mod:`rlnorm.backends.native`): eager float32/float64 CPU batches,
  no autograd through the input, no distributed reduction;
- CUDA graphs of the torch code: other eager CUDA calls (``RLNORM_FUSED=0``, no triton,
  integer inputs);
- the torch code over :mod:`rlnorm.algebra`: everything else, including ``torch.compile``.

The paths give the same statistics (the merges bitwise given the same sums; the sums to
rounding, in a different summation order; normalize to rounding of the variance's inverse
square root) and none synchronises with the host, except ``nonfinite="raise"``, which must look
at the data. What a normalizer's calls cache (its buffers' addresses for the
kernels, normalize's affine map, its CUDA graphs) lives in its :class:`Dispatcher`, never on
the module.

Example:
    >>> import torch
    >>> from rlnorm.algebra.state import initial_state
    >>> from rlnorm.backends.dispatch import Dispatcher, Settings
    >>> state = initial_state((2,), prior_weight=0.0)
    >>> settings = Settings(None, None, None, "skip", 10.0, 1e-8, True)
    >>> door = Dispatcher("example")
    >>> x = torch.tensor([[0.0, 10.0], [2.0, 30.0]])
    >>> _ = door.update(state, x, None, settings, x.shape)
    >>> state.mean.tolist(), door.normalize(state, x, settings).round().tolist()
    ([1.0, 20.0], [[-1.0, -1.0], [1.0, 1.0]])
"""

from __future__ import annotations

import threading
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor

from rlnorm import _validation as check
from rlnorm.algebra import affine as _affine
from rlnorm.algebra import drift as _drift
from rlnorm.algebra import moments as _moments
from rlnorm.algebra import returns as _returns
from rlnorm.algebra.moments import Moments, ShiftedSums, batch_moments, batch_shift, residual
from rlnorm.algebra.state import State, as_moments, from_moments
from rlnorm.backends import cuda_graphs, fused, native

__all__ = [
    "Dispatcher",
    "Reducer",
    "Settings",
    "discounted_returns",
    "drift_batch_shift",
    "shifted_sums",
    "store",
]


class Settings(NamedTuple):
    """What a normalizer's update and normalize depend on besides its state (see its docs).

    Attributes:
        momentum: ``None`` for exact statistics, else the EMA weight of the past.
        var_floor: the EMA variance floor, or ``None``.
        until: stop updating at this many samples, or ``None``.
        nonfinite: ``"skip"`` or ``"raise"``.
        clip: clamp bound of normalized values, or ``None``.
        epsilon: added to the variance before the square root.
        center: subtract the mean in normalize.
    """

    momentum: float | None
    var_floor: float | None
    until: int | None
    nonfinite: str
    clip: float | None
    epsilon: float
    center: bool


class Reducer(Protocol):
    """A distributed reduction of batch sums (see :class:`rlnorm.stats.distributed.Sync`)."""

    def shift(self, flat: Tensor, weights: Tensor | None, state: State) -> Tensor:
        """The shift to sum ``flat`` around, identical on every rank."""

    def __call__(self, sums: ShiftedSums) -> ShiftedSums:
        """The sums over every rank."""


def shifted_sums(x: Tensor, weights: Tensor | None, shift: Tensor) -> ShiftedSums:
    """:func:`~rlnorm.algebra.moments.shifted_sums` by the native kernel where eligible.

    Args:
        x: batch of shape ``(N, D)``.
        weights: optional float64 row weights of shape ``(N,)``.
        shift: float64 tensor of shape ``(D,)``.

    Returns:
        The :class:`~rlnorm.algebra.moments.ShiftedSums` of the batch.

    Example:
        >>> import torch
        >>> x = torch.tensor([[1.0], [3.0]])
        >>> float(shifted_sums(x, None, torch.zeros(1, dtype=torch.float64)).sum_sq)
        10.0
    """
    sums = native.try_shifted_sums(x, weights, shift)
    return _moments.shifted_sums(x, weights, shift) if sums is None else sums


def discounted_returns(
    rewards: Tensor, dones: Tensor, returns: Tensor, gamma: float
) -> tuple[Tensor, Tensor]:
    """:func:`~rlnorm.algebra.returns.discounted_returns` by the fused or native kernel if eligible.

    Example:
        >>> import torch
        >>> rewards = torch.ones(2, 1, dtype=torch.float64)
        >>> dones = torch.zeros(2, 1, dtype=torch.bool)
        >>> discounted_returns(rewards, dones, torch.zeros(1, dtype=torch.float64), 0.5)[1]
        tensor([1.5000], dtype=torch.float64)
    """
    if (
        fused.eligible(rewards)
        and returns.device == rewards.device
        and dones.device == rewards.device
        and returns.dtype == torch.float64
    ):
        try:
            return fused.discounted_returns(rewards, dones, returns, gamma)
        except fused.KernelError as error:  # the torch code below serves instead
            fused.fall_back(error)
    out = native.try_discounted_returns(rewards, dones, returns, gamma)
    return _returns.discounted_returns(rewards, dones, returns, gamma) if out is None else out


def drift_batch_shift(batch: Moments, running: Moments) -> Tensor | float:
    """:func:`~rlnorm.algebra.drift.batch_shift` by the native kernel where eligible.

    Returns:
        The shift: a float from the native kernel (CPU statistics), a 0-d tensor otherwise.

    Example:
        >>> import torch
        >>> from rlnorm.algebra.moments import Moments
        >>> f64 = torch.float64
        >>> one = torch.ones(1, dtype=f64)
        >>> running = Moments(one[0], torch.tensor(1), 0 * one, 4 * one)  # mean 0, std 2
        >>> batch = running._replace(mean=one)
        >>> float(drift_batch_shift(batch, running))  # half a std of 2 away
        0.5
    """
    shift = native.try_batch_shift(batch, running)
    return _drift.batch_shift(batch, running) if shift is None else shift


def store(state: State, new: State) -> None:
    """Write ``new`` into the buffers of ``state``, in place (graphs keep their addresses).

    Writes go through 1-D views: torch.compile on the CPU drops in-place writes to 0-d
    float64 buffers (seen with torch 2.11 and 2.13), and 1-D views of them are written.

    Example:
        >>> from rlnorm.algebra.state import initial_state
        >>> state = initial_state((), prior_weight=0.0)
        >>> store(state, initial_state((), prior_weight=2.0))
        >>> float(state.weight_sum)
        2.0
    """
    for buffer, value in zip(state, new, strict=True):
        buffer.view(-1).copy_(value.reshape(-1))


def _until_weights(
    state: State, flat: Tensor, weights: Tensor | None, s: Settings
) -> Tensor | None:
    """Row weights with ``until`` applied: all 0 once the count reached it (no host read)."""
    if s.until is None:
        return weights
    active = (state.count < s.until).to(torch.float64)
    return active.expand(flat.shape[0]) if weights is None else weights * active


def _update_torch(
    state: State,
    flat: Tensor,
    weights: Tensor | None,
    s: Settings,
    input_shape: torch.Size,
    reducer: Reducer | None,
) -> Moments:
    """``update`` with torch operations (any device, compiled, graph-captured, reduced)."""
    weights = _until_weights(state, flat, weights, s)
    shift = batch_shift(flat, weights) if reducer is None else reducer.shift(flat, weights, state)
    sums = shifted_sums(flat, weights, shift)
    if reducer is not None:
        sums = reducer(sums)
    if s.nonfinite == "raise" and bool(sums.nonfinite > 0):
        raise check.nonfinite_error(int(sums.nonfinite), input_shape)
    return _merge_torch(state, sums, s)


def _merge_torch(state: State, sums: ShiftedSums, s: Settings) -> Moments:
    """Merge a batch's (reduced) sums into ``state`` in place; the batch's moments."""
    batch = batch_moments(sums)
    flat_state = (state.mean.reshape(-1), state.var.reshape(-1), state.mean_residual.reshape(-1))
    current = Moments(state.weight_sum, state.count, *flat_state)
    if s.momentum is None:
        new = _moments.merge(current, batch)
    else:
        new = _moments.merge_ema(current, batch, s.momentum, s.var_floor)
    store(state, from_moments(new, state.nonfinite_count + sums.nonfinite))
    shape = state.mean.shape
    # Built explicitly: some torch.compile versions cannot return `NamedTuple._replace`.
    return Moments(
        batch.weight,
        batch.count,
        batch.mean.reshape(shape),
        batch.var.reshape(shape),
        residual(batch).reshape(shape),
    )


class _CachedAffine(NamedTuple):
    """Normalize's map on the CPU for one state, settings and dtype, and the kernel's arguments.

    It holds while the buffers are the same objects (``state``) at the same versions: every
    in-place write (an update, ``load_state_dict``, ``fill_``) bumps a tensor's version counter.
    """

    state: State
    settings: Settings
    dtype: torch.dtype
    versions: tuple[int, int, int] | None
    affine: _affine.Affine
    args: native.KernelMap
    feature_shape: torch.Size


def _versions(state: State) -> tuple[int, int, int] | None:
    """The version counters normalize's map depends on; ``None`` when they cannot be read."""
    try:
        return (state.mean._version, state.var._version, state.weight_sum._version)
    except RuntimeError:
        # Inference tensors (buffers a user replaced inside inference mode) keep no version
        # counter, so a cache could not see their updates: recompute every call.
        return None


def _clone_outputs(out: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """Fresh copies of a graph's normalized output and clipped count."""
    return out[0].clone(), out[1].clone()


class Dispatcher:
    """One normalizer's door to the backends, and what its calls cache.

    It holds the addresses of the normalizer's buffers for the native kernels, the affine map
    of normalize on the CPU, its CUDA graphs and the fused kernels' scratch buffers;
    :meth:`clear` forgets them when the buffers are replaced. Copies and pickles start empty.
    ``lock`` serialises the normalizer's writers and the refresh of the cached map.

    Args:
        name: the normalizer's class name, for warnings.

    Example:
        >>> door = Dispatcher("RunningMeanStd")
        >>> with door.lock:
        ...     door.clear()
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.lock = threading.RLock()
        self.pointers = native.StatePointers()
        self.update_graphs = cuda_graphs.GraphedCalls(f"{name}.update")
        self.normalize_graphs = cuda_graphs.GraphedCalls(f"{name}.normalize")
        self.workspace = fused.Workspace()
        self._affine_cache: _CachedAffine | None = None

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles keep the name only: the caches hold the original's addresses."""
        return {"name": self.name}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["name"])  # type: ignore[misc]

    def clear(self) -> None:
        """Forget everything that holds buffer addresses (kernels, affine map, graphs, scratch)."""
        self._affine_cache = None
        self.pointers.clear()
        self.update_graphs.clear()
        self.normalize_graphs.clear()
        self.workspace.clear()

    def update(
        self,
        state: State,
        flat: Tensor,
        weights: Tensor | None,
        s: Settings,
        input_shape: torch.Size,
        reducer: Reducer | None = None,
    ) -> Moments:
        """Fold a ``(rows, features)`` batch into ``state`` in place.

        Args:
            state: the buffers, of the feature shape.
            flat: the batch as ``(rows, features)``.
            weights: optional float64 row weights.
            s: the settings.
            input_shape: the batch's shape as given, for error messages.
            reducer: the distributed reduction, when the update is synchronised.

        Returns:
            The batch's moments (after the reduction), in the feature shape.

        Raises:
            ValueError: ``nonfinite="raise"`` and the batch holds NaN or Inf rows; the state
                is unchanged.
        """
        if (
            fused.eligible(flat)
            and self.workspace.state_ok(state, flat.device)
            and (weights is None or weights.device == flat.device)
        ):
            try:
                return self._fused_update(state, flat, weights, s, input_shape, reducer)
            except fused.KernelError as error:  # nothing was written: the paths below serve
                fused.fall_back(error)
        if reducer is None:
            raise_nonfinite = s.nonfinite == "raise"
            batch = native.try_update(
                self.pointers, state, flat, weights, s.momentum, s.var_floor, s.until,
                raise_nonfinite, input_shape,
            )  # fmt: skip
            if batch is not None:
                return batch
            if not raise_nonfinite and cuda_graphs.eligible(flat):
                return self._graphed_update(state, flat, weights, s, False)
        with torch.no_grad():
            return _update_torch(state, flat, weights, s, input_shape, reducer)

    def _fused_update(
        self,
        state: State,
        flat: Tensor,
        weights: Tensor | None,
        s: Settings,
        input_shape: torch.Size,
        reducer: Reducer | None,
    ) -> Moments:
        """``update`` by the fused kernels (:mod:`~rlnorm.backends.fused`).

        Without a reducer or ``nonfinite="raise"``: three launches (shift, sums, merge), from a
        CUDA graph where the graphs apply. Otherwise the host takes part: the sums are
        finalized, reduced over the ranks and/or checked for non-finite rows, then merged by
        the same merge kernel, so every rank merges bitwise identical sums identically.
        """
        ws = self.workspace
        if reducer is None and s.nonfinite != "raise":
            if cuda_graphs.eligible(flat):
                return self._graphed_update(state, flat, weights, s, True)
            packed = fused.update(ws, state, flat, weights, s.momentum, s.var_floor, s.until)
            return fused.moments_of(packed, state.mean.shape)
        with torch.no_grad():
            if reducer is None:
                shift = fused.batch_shift(ws, flat, weights, state.count, s.until)
                sums = fused.shifted_sums(ws, flat, weights, shift, state.count, s.until)
            else:
                weights = _until_weights(state, flat, weights, s)
                shift = reducer.shift(flat, weights, state)
                sums = reducer(fused.shifted_sums(ws, flat, weights, shift))
            if s.nonfinite == "raise" and bool(sums.nonfinite > 0):
                raise check.nonfinite_error(int(sums.nonfinite), input_shape)
            try:
                packed = fused.merge_sums(ws, state, sums, s.momentum, s.var_floor)
            except fused.KernelError as error:
                # The sums are already reduced over the ranks: merge them here rather than
                # start the update again, which would run the collectives a second time.
                fused.fall_back(error)
                return _merge_torch(state, sums, s)
        return fused.moments_of(packed, state.mean.shape)

    def _graphed_update(
        self, state: State, flat: Tensor, weights: Tensor | None, s: Settings, use_fused: bool
    ) -> Moments:
        """``update`` on CUDA through a CUDA graph of it (:mod:`~rlnorm.backends.cuda_graphs`).

        The graph holds the fused kernels (``use_fused``) or the torch code; a replay is the
        copy of the batch (and weights) into the graph, the graph, and one copy out.
        """

        def packed_update(flat: Tensor, weights: Tensor | None) -> Tensor:
            if use_fused:
                return fused.update(
                    self.workspace, state, flat, weights, s.momentum, s.var_floor, s.until
                )
            with torch.no_grad():
                m = _update_torch(state, flat, weights, s, flat.shape, None)
            # One float64 tensor, the count as its int64 bits: one copy out of the graph.
            parts = (
                m.weight.view(1),
                m.count.view(1).view(torch.float64),
                m.mean.view(-1),
                m.var.view(-1),
                residual(m).view(-1),
            )
            return torch.cat(parts)

        key = (
            tuple(flat.shape),
            flat.dtype,
            weights is None,
            s.momentum,
            s.var_floor,
            s.until,
            torch.is_inference_mode_enabled(),
            use_fused,
        )
        with torch.no_grad():  # copies into the graph's inputs must not record autograd history
            packed = self.update_graphs(
                key, packed_update, (flat, weights), Tensor.clone, tuple(state)
            )
        return fused.moments_of(packed, state.mean.shape)

    def normalize_cached(self, state: State, x: Any, s: Settings) -> tuple[Tensor, int] | None:
        """:meth:`normalize` by the native kernel and the cached map, in the fewest steps.

        The per-step call of a CPU rollout, where the kernel takes a microsecond or two and
        each Python call around it about as much. It applies when :meth:`normalize` would take
        the native kernel, ``x`` ends in the state's feature shape, and the map cached by an
        earlier call still holds (the same buffers at the same versions, the same settings and
        dtype); otherwise it returns ``None``, and the caller checks ``x`` and calls
        :meth:`normalize`.

        Args:
            state: the buffers.
            x: what to normalize; only a tensor can take this path.
            s: the settings.

        Returns:
            The normalized tensor and how many of its values sit at the clamp bound, or
            ``None``.
        """
        cache = self._affine_cache
        # Each attribute read of `x` costs about half a microsecond here: each is read once.
        if (
            cache is None
            or cache.state is not state
            or cache.settings is not s
            or type(x) is not Tensor
            or x.dtype is not cache.dtype
            or (shape := x.shape)[len(shape) - len(cache.feature_shape) :] != cache.feature_shape
            # Before the versions: false while torch.compile traces. (CPU tensors the fused
            # kernels take, inside `fused.interpret_on_cpu`, find the native kernels off.)
            or not native.eligible_as(x, cache.dtype)
            # `_versions` inlined (a call costs about a microsecond here); the buffers are the
            # cached ones, never inference tensors, so the counters can be read.
            or cache.versions
            != (state.mean._version, state.var._version, state.weight_sum._version)
        ):
            return None
        return native.normalize(x, cache.args)

    def normalize(
        self, state: State, x: Tensor, s: Settings, return_clipped: bool = False
    ) -> Tensor | tuple[Tensor, int | Tensor]:
        """``clamp((x - mean) / sqrt(var + epsilon), -clip, clip)`` in ``x``'s dtype.

        Args:
            state: the buffers.
            x: a checked tensor of shape ``(*batch, *shape)``.
            s: the settings.
            return_clipped: also return how many values sit at the clamp bound (an ``int`` from
                the native kernel, a 0-d tensor elsewhere).

        Returns:
            The normalized tensor (and the clipped count if asked).
        """
        if fused.eligible(x) and self.workspace.state_ok(state, x.device):
            try:
                if not cuda_graphs.eligible(x):
                    return fused.normalize(state, x, s.clip, s.epsilon, s.center, return_clipped)
                return self.normalize_graphs(
                    self._normalize_key(x, s, return_clipped, True),
                    lambda x: fused.normalize(
                        state, x, s.clip, s.epsilon, s.center, return_clipped
                    ),
                    (x,),
                    _clone_outputs if return_clipped else Tensor.clone,
                    tuple(state),
                )
            except fused.KernelError as error:  # the paths below serve instead
                fused.fall_back(error)
        if native.eligible(x) and state.mean.is_cpu:
            # `cache` holds the tensors whose addresses `args` are: alive until the kernel returns.
            cache = self._cached_affine(state, s, x.dtype)
            out, at_bound = native.normalize(x, cache.args)
            return (out, at_bound) if return_clipped else out
        if cuda_graphs.eligible(x):
            return self.normalize_graphs(
                self._normalize_key(x, s, return_clipped, False),
                lambda x: self._normalize_torch(state, x, s, return_clipped),
                (x,),
                _clone_outputs if return_clipped else Tensor.clone,
                tuple(state),
            )
        return self._normalize_torch(state, x, s, return_clipped)

    @staticmethod
    def _normalize_key(x: Tensor, s: Settings, return_clipped: bool, use_fused: bool) -> tuple:
        """What a graph of normalize depends on besides the input values and the state."""
        return (
            tuple(x.shape),
            x.dtype,
            s.clip,
            s.epsilon,
            s.center,
            return_clipped,
            torch.is_inference_mode_enabled(),
            use_fused,
        )

    def _normalize_torch(
        self, state: State, x: Tensor, s: Settings, return_clipped: bool
    ) -> Tensor | tuple[Tensor, Tensor]:
        """``normalize`` with torch operations (any device, compiled, graph-captured)."""
        a = self.affine(state, s, _affine.compute_dtype(x))
        if return_clipped:
            return _affine.normalize_clipped(x, a, s.clip is not None)
        return _affine.normalize(x, a, s.clip is not None)

    def affine(self, state: State, s: Settings, dtype: torch.dtype) -> _affine.Affine:
        """The affine map of normalize in ``dtype``.

        On the CPU it is cached until a statistic or setting changes (tensor version counters
        tell), which saves a dozen small kernels per ``normalize`` call. Under
        ``torch.compile`` and on accelerators it is recomputed from the buffers each call, so
        CUDA graphs and their replays always see the statistics of the moment (replays write
        the buffers without bumping their version counters).

        Args:
            state: the buffers.
            s: the settings.
            dtype: the computing dtype (:func:`rlnorm.algebra.affine.compute_dtype`).

        Returns:
            The :class:`~rlnorm.algebra.affine.Affine` map.
        """
        if torch.compiler.is_compiling() or state.mean.device.type != "cpu":
            return _affine.affine(as_moments(state), s.clip, s.epsilon, s.center, dtype)
        return self._cached_affine(state, s, dtype).affine

    def _cached_affine(self, state: State, s: Settings, dtype: torch.dtype) -> _CachedAffine:
        """CPU only, cached: the map in ``dtype`` and the native normalize kernel's arguments.

        The cached tensors are made outside inference mode, so one cache serves calls under
        ``torch.inference_mode()`` and calls whose output feeds a backward pass alike.
        """
        cache = self._affine_cache
        if (
            cache is not None
            and cache.state is state
            and cache.dtype is dtype
            and cache.settings is s  # a normalizer's settings change by replacement
            and cache.versions == _versions(state)
        ):
            return cache
        with self.lock:  # a consistent state: no update is halfway through writing it
            versions = _versions(state)
            with torch.inference_mode(False):
                made = native.try_affine(state, s.clip, s.epsilon, s.center, dtype)
                if made is None:
                    a = _affine.affine(as_moments(state), s.clip, s.epsilon, s.center, dtype)
                    made = a, native.affine_args(a)
            a, args = made
            cache = _CachedAffine(state, s, dtype, versions, a, args, state.mean.shape)
            if versions is not None:
                self._affine_cache = cache
        return cache
