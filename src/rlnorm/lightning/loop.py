"""What the callback reads from and does through the ``Trainer`` beyond its public properties.

Three facts about the fit loop have no public accessor in Lightning (2.x); each is read in one
function here, which says why it is needed, so that a Lightning release that renames one
changes one line. The collectives go through the public ``trainer.strategy``.
"""

from __future__ import annotations

from lightning.pytorch import Trainer
from torch import Tensor

__all__ = [
    "all_gather",
    "any_rank",
    "epoch_data_ran_out",
    "logging_step",
    "optimizer_steps_after_batch",
]


def logging_step(trainer: Trainer) -> int:
    """The step Lightning's loggers write at now: batches that ended in an optimizer step.

    Private (``_batches_that_stepped``) because ``trainer.global_step`` is a different count:
    under manual optimization it counts every ``optimizer.step()`` call (several per batch
    with several optimizers), and in ``on_train_batch_end`` it already includes the batch's
    own step while Lightning still logs the batch at the step before. Figures logged at this
    step line up with what the module logs with ``self.log``.

    Example:
        >>> logging_step(trainer)  # doctest: +SKIP
        0
    """
    return trainer.fit_loop.epoch_loop._batches_that_stepped


def optimizer_steps_after_batch(trainer: Trainer) -> bool:
    """Whether the training batch now ending is followed by an optimizer step.

    Private (``_should_accumulate()``) because the answer depends on more than
    ``trainer.accumulate_grad_batches``: the epoch's last batch steps with a short window, and
    strategies that accumulate themselves (DeepSpeed) do not. Lightning's logger connector asks
    the same to log once per optimizer step.

    Example:
        >>> optimizer_steps_after_batch(trainer)  # doctest: +SKIP
        True
    """
    return not trainer.fit_loop.epoch_loop._should_accumulate()


def epoch_data_ran_out(trainer: Trainer) -> bool:
    """Whether the training epoch ended because its data ran out, not cut short.

    Private (``_num_ready_batches_reached()``) because it also covers iterable datasets of
    unknown length, whose last batch is known only once fetching the next one fails;
    ``trainer.num_training_batches`` is infinite for them. An epoch cut short (``max_steps``, a
    stop signal) also ends the fit, which the end-of-fit log covers.

    Example:
        >>> epoch_data_ran_out(trainer)  # in on_train_epoch_end  # doctest: +SKIP
        True
    """
    return trainer.fit_loop.epoch_loop._num_ready_batches_reached()


def any_rank(trainer: Trainer, decision: bool) -> bool:
    """Whether ``decision`` holds on any rank (a collective when several ranks run).

    Example:
        >>> any_rank(trainer, False)  # doctest: +SKIP
        False
    """
    if trainer.world_size == 1:
        return decision
    return trainer.strategy.reduce_boolean_decision(decision, all=False)


def all_gather(trainer: Trainer, tensor: Tensor) -> Tensor:
    """Every rank's ``tensor`` (same shape) stacked along a new first dim (a collective).

    Example:
        >>> all_gather(trainer, torch.ones(3)).shape  # with two ranks  # doctest: +SKIP
        torch.Size([2, 3])
    """
    strategy = trainer.strategy
    return strategy.all_gather(tensor.to(strategy.root_device))
