"""Reducing batch moments over ``torch.distributed`` so that every rank applies the same update.

Each rank sums its own batch around a shift that all ranks share; the sums are then added
with a single all-reduce whose payload is ``2 * D + 3`` float64 values, whatever the world
size. Because every rank receives the same reduced sums and holds the same state, every rank
computes bitwise the same new statistics, and they equal those of one process fed the union
of all ranks' batches (to float64 rounding), also when ranks hold different numbers of rows.

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

import torch
import torch.distributed as dist
from torch import Tensor

from rlnorm.algebra.moments import ShiftedSums

__all__ = ["agree_shift", "all_reduce_sums", "is_distributed"]


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
    d = sums.sum.numel()
    payload = torch.cat(
        [
            sums.weight.reshape(1),
            sums.count.to(torch.float64).reshape(1),
            sums.nonfinite.to(torch.float64).reshape(1),
            sums.sum.reshape(-1),
            sums.sum_sq.reshape(-1),
        ]
    )
    dist.all_reduce(payload, op=dist.ReduceOp.SUM, group=group)
    # Counts travel as float64, exact up to 2**53 rows per update.
    return ShiftedSums(
        weight=payload[0],
        count=payload[1].round().to(torch.int64),
        sum=payload[3 : 3 + d].reshape(sums.sum.shape),
        sum_sq=payload[3 + d :].reshape(sums.sum_sq.shape),
        nonfinite=payload[2].round().to(torch.int64),
        shift=sums.shift,
    )


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
