"""Batch plumbing of ``NormalizerCallback(batch_keys=...)``: which entries, and replacing them.

The callback replaces the entries of a batch (a dict or a list) and never writes into their
tensors, which may be the dataset's own storage.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping, MutableSequence, Sequence
from typing import Any

from torch import Tensor

__all__ = ["BatchKey", "check_batch_keys", "check_update_mask_key", "normalize_entries"]

BatchKey = str | int


def check_batch_keys(keys: BatchKey | Sequence[BatchKey] | None) -> tuple[BatchKey, ...]:
    """``batch_keys`` as a tuple: ``None`` is none, one key is a tuple of one.

    Example:
        >>> check_batch_keys(["obs", "next_obs"])
        ('obs', 'next_obs')
    """
    if keys is None:
        return ()
    if isinstance(keys, (str, int)):
        keys = (keys,)
    if not isinstance(keys, Sequence) or not all(isinstance(k, (str, int)) for k in keys):
        raise TypeError(f"`batch_keys` must be a str, an int or a list of them, got {keys!r}.")
    return tuple(keys)


def check_update_mask_key(key: BatchKey | None, batch_keys: Sequence[BatchKey]) -> BatchKey | None:
    """``update_mask_key``, which selects rows of the ``batch_keys`` entries, so needs them.

    Example:
        >>> check_update_mask_key("fresh", ("obs",))
        'fresh'
    """
    if key is not None and not isinstance(key, (str, int)):
        raise TypeError(f"`update_mask_key` must be a str or int, got {key!r}.")
    if key is not None and not batch_keys:
        raise ValueError(
            f"`update_mask_key={key!r}` needs `batch_keys`: it selects the rows "
            "of the batch entries that statistics are learned from."
        )
    return key


def normalize_entries(
    batch: Any,
    keys: Sequence[BatchKey],
    mask_key: BatchKey | None,
    normalize: Callable[[Any], Any],
    update: Callable[[Any, Tensor | None], None] | None = None,
) -> None:
    """Replace the entries ``keys`` of ``batch`` by their normalized values.

    Args:
        batch: a dict or a list (a batch whose entries cannot be replaced raises, before
            anything is updated).
        keys: the entries holding raw observations; statistics are learned from the first.
        mask_key: the entry with a per-row mask of the rows to learn from, if any.
        normalize: maps raw observations to normalized ones.
        update: folds raw observations (and the mask) into the statistics; ``None`` learns
            nothing.

    Example:
        >>> batch = {"obs": 3.0}
        >>> normalize_entries(batch, ["obs"], None, normalize=lambda x: x / 2)
        >>> batch
        {'obs': 1.5}
    """
    # Checked before anything changes: a batch that cannot take the result is not learned.
    _check_replaceable(batch, keys)
    mask = None if mask_key is None else _entry(batch, mask_key)
    if update is not None:
        update(_entry(batch, keys[0]), mask)
    for key in keys:
        # A new entry: the old tensor (maybe the dataset's own storage) stays raw.
        batch[key] = normalize(_entry(batch, key))


def _entry(batch: Any, key: BatchKey) -> Any:
    """``batch[key]``, or a ``KeyError`` naming the key and the entries there are."""
    try:
        return batch[key]
    except (KeyError, IndexError, TypeError):
        available = sorted(map(str, batch)) if isinstance(batch, Mapping) else len(batch)
        raise KeyError(
            f"Batch entry {key!r} (from `batch_keys`/`update_mask_key`) is not in the batch "
            f"(a {type(batch).__name__}; entries: {available})."
        ) from None


def _check_replaceable(batch: Any, keys: Sequence[BatchKey]) -> None:
    """Raise unless ``batch`` is a container whose entries can be replaced (dict or list)."""
    if isinstance(batch, (MutableMapping, MutableSequence)):
        return
    raise TypeError(
        f"NormalizerCallback cannot normalize batch entry {keys[0]!r} (from `batch_keys`) of a "
        f"{type(batch).__name__} batch: its entries cannot be replaced, and writing into the "
        "tensor would change the data the dataset serves (normalizing it again the next epoch). "
        "Yield batches as dicts or lists (the DataLoader's default collate turns plain tuples "
        "into lists, not named tuples), or drop `batch_keys` and call "
        "`rlnorm.get_normalizer(self).normalize_obs(...)` in `training_step`."
    )
