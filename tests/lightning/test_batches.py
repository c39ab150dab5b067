"""Batch plumbing of ``batch_keys``: validation, and replacing entries without touching tensors."""

from __future__ import annotations

from typing import Any, NamedTuple

import pytest
import torch

from rlnorm.lightning.batches import check_batch_keys, check_update_mask_key, normalize_entries


def test_batch_keys_become_a_tuple_and_anything_else_is_a_type_error() -> None:
    assert check_batch_keys(None) == ()
    assert check_batch_keys("obs") == ("obs",)
    assert check_batch_keys(0) == (0,)
    assert check_batch_keys(["obs", 1]) == ("obs", 1)
    for bad in (1.5, ["obs", None], {"obs"}):
        with pytest.raises(TypeError, match="batch_keys"):
            check_batch_keys(bad)  # type: ignore[arg-type]


def test_an_update_mask_key_needs_batch_keys_and_a_str_or_int() -> None:
    assert check_update_mask_key(None, ()) is None
    assert check_update_mask_key("fresh", ("obs",)) == "fresh"
    with pytest.raises(ValueError, match="needs `batch_keys`"):
        check_update_mask_key("fresh", ())
    with pytest.raises(TypeError, match="update_mask_key"):
        check_update_mask_key(1.5, ("obs",))  # type: ignore[arg-type]


def test_entries_are_replaced_and_the_original_tensors_stay_raw() -> None:
    obs, next_obs, fresh = torch.ones(4, 2), torch.full((4, 2), 3.0), torch.tensor([1, 0, 1, 0])
    batch: dict[str, Any] = {"obs": obs, "next_obs": next_obs, "fresh": fresh}
    updates: list[tuple[torch.Tensor, torch.Tensor | None]] = []
    normalize_entries(
        batch, ("obs", "next_obs"), "fresh", lambda x: x * 2, lambda x, m: updates.append((x, m))
    )
    assert torch.equal(batch["obs"], torch.full((4, 2), 2.0))
    assert torch.equal(batch["next_obs"], torch.full((4, 2), 6.0))
    assert torch.equal(obs, torch.ones(4, 2))  # the dataset's tensor is not written into
    assert len(updates) == 1  # learned from the first entry only, with the mask
    assert updates[0][0] is obs
    assert updates[0][1] is fresh


def test_list_batches_are_indexed_and_no_update_learns_nothing() -> None:
    batch = [torch.ones(2), torch.zeros(2)]
    normalize_entries(batch, (0,), None, lambda x: x + 1)
    assert torch.equal(batch[0], torch.full((2,), 2.0))
    assert torch.equal(batch[1], torch.zeros(2))


class Pair(NamedTuple):
    obs: torch.Tensor
    action: torch.Tensor


def test_immutable_batches_raise_before_anything_is_learned() -> None:
    updates: list[Any] = []
    for batch in ((torch.ones(2), torch.ones(2)), Pair(torch.ones(2), torch.ones(2))):
        with pytest.raises(TypeError, match="cannot be replaced"):
            normalize_entries(batch, (0,), None, lambda x: x, lambda x, m: updates.append(x))
    assert updates == []


def test_a_missing_entry_is_a_key_error_naming_the_entries_there_are() -> None:
    with pytest.raises(KeyError, match=r"'next_obs'.*entries: \['obs'\]"):
        normalize_entries({"obs": torch.ones(2)}, ("next_obs",), None, lambda x: x)
    with pytest.raises(KeyError, match=r"'mask'.*entries: 1"):
        normalize_entries([torch.ones(2)], (0,), "mask", lambda x: x)
