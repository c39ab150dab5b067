"""Reducing batch moments over ``torch.distributed`` so that every rank applies the same update.

Each rank sums its own batch around a shift that all ranks share; the sums are then added
with a single all-reduce whose payload is ``2 * D + 3`` float64 values, whatever the world
size: the fields of :class:`~rlnorm.algebra.moments.ShiftedSums` declared summed, packed by
:func:`rlnorm.algebra.fields.pack`. Because every rank receives the same reduced sums and
holds the same state, every rank computes bitwise the same new statistics, and they equal
those of one process fed the union of all ranks' batches (to float64 rounding), also when
ranks hold different numbers of rows.

All functions are no-ops, and launch no collective, when ``torch.distributed`` is not
initialised or the group has a single process.

Example:
    >>> import torch
    >>> from rlnorm.stats.distributed import all_reduce_sums, is_distributed
    >>> from rlnorm.algebra.moments import batch_shift, shifted_sums
    >>> x = torch.randn(5, 3)
    >>> sums = shifted_sums(x, None, batch_shift(x, None))
    >>> is_distributed()
    False
    >>> all_reduce_sums(sums) is sums  # nothing to reduce in a single process
    True
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from rlnorm.algebra.fields import pack, unpack
from rlnorm.algebra.moments import SHIFT_ROWS, ShiftedSums, batch_shift
from rlnorm.algebra.state import State

__all__ = ["Sync", "agree_shift", "all_reduce_sums", "is_distributed"]


def is_distributed(group: dist.ProcessGroup | None = None) -> bool:
    """Whether ``torch.distributed`` is initialised with more than one process in ``group``.

    Args:
        group: the process group; ``None`` is the default (world) group.

    Returns:
        ``True`` when a collective over ``group`` would involve other processes.
    """
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group=group) > 1


def all_reduce_sums(sums: ShiftedSums, group: dist.ProcessGroup | None = None) -> ShiftedSums:
    """Sum every rank's :class:`~rlnorm.algebra.moments.ShiftedSums` with one all-reduce.

    Every rank must pass sums taken around the same ``shift`` (see :func:`agree_shift`) and
    call this the same number of times, as with any collective.

    Args:
        sums: this rank's shifted sums.
        group: the process group; ``None`` is the default group.

    Returns:
        The sums over all ranks, identical on every rank; ``sums`` itself when not distributed.
    """
    if not is_distributed(group):
        return sums
    payload = pack(sums)
    dist.all_reduce(payload, op=dist.ReduceOp.SUM, group=group)
    return unpack(payload, sums)


def agree_shift(shift: Tensor, weight: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """The weight-averaged shift over all ranks, identical on every rank.

    Used once, before a normalizer's first synchronised update, when there is no common
    running mean yet to sum around.

    Args:
        shift: this rank's float64 shift (e.g. from :func:`~rlnorm.algebra.moments.batch_shift`).
        weight: how much this rank's shift counts (0 for a rank without data).
        group: the process group; ``None`` is the default group.

    Returns:
        The agreed shift; ``shift`` itself when not distributed.
    """
    if not is_distributed(group):
        return shift
    payload = torch.cat([(shift * weight).reshape(-1), weight.to(torch.float64).reshape(1)])
    dist.all_reduce(payload, op=dist.ReduceOp.SUM, group=group)
    total = payload[-1].clamp_min(torch.finfo(torch.float64).tiny)
    return (payload[:-1] / total).reshape(shift.shape)


class Sync:
    """How one normalizer synchronises its updates over ``group``: the backends' reducer.

    Before the first synchronised update the ranks share no running mean yet, so they agree
    on a shift once (the only extra collective); afterwards the running mean serves. The agreed
    shift is then kept: moved by ``.to()``, kept by resets and loads, since whether a rank runs
    the extra collective must not depend on anything one rank can do alone.

    Args:
        group: the process group; ``None`` is the default group.

    Example:
        >>> sync = Sync()
        >>> sync.active()  # no process group initialised
        False
    """

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        self.agreed_shift: Tensor | None = None

    def active(self) -> bool:
        """Whether updates are reduced: ``group`` holds more than one process."""
        return is_distributed(self.group)

    def shift(self, flat: Tensor, weights: Tensor | None, state: State) -> Tensor:
        """The point to sum the batch around, common to all ranks."""
        if self.agreed_shift is None:
            head = flat[:SHIFT_ROWS]
            head_weight = (
                torch.full((), float(head.shape[0]), dtype=torch.float64, device=flat.device)
                if weights is None
                else weights[:SHIFT_ROWS].sum()
            )
            local = batch_shift(flat, weights)
            self.agreed_shift = agree_shift(local, head_weight, self.group)
        return torch.where(state.count > 0, state.mean.reshape(-1), self.agreed_shift)

    def __call__(self, sums: ShiftedSums) -> ShiftedSums:
        """The sums over every rank (:func:`all_reduce_sums`)."""
        return all_reduce_sums(sums, self.group)

    def reset(self, state: State) -> None:
        """Before ``state`` is reset: the next update sums around its last mean, on all ranks."""
        if self.agreed_shift is not None:
            seen = state.count > 0
            self.agreed_shift = torch.where(seen, state.mean.reshape(-1), self.agreed_shift)

    def move(self, fn: Callable[[Tensor], Tensor]) -> None:
        """Apply a device move of the normalizer's buffers to the agreed shift too."""
        if self.agreed_shift is not None:
            self.agreed_shift = fn(self.agreed_shift)
