"""The backend door: plain tensors in and out, native kernel where eligible, torch elsewhere."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from rlnorm.algebra import moments, returns
from rlnorm.algebra.state import State, initial_state
from rlnorm.backends import fused, native
from rlnorm.backends.dispatch import (
    Dispatcher,
    Settings,
    discounted_returns,
    shifted_sums,
    store,
)

needs_kernels = pytest.mark.skipif(not native.available(), reason="native kernels not built")

EXACT = Settings(None, None, None, "skip", 5.0, 1e-8, True)
EMA = Settings(0.9, 0.5, None, "skip", None, 1e-8, False)


def batches(features: int = 3) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    return [torch.randn(40, features, generator=gen) * (i + 1) + 50 * i for i in range(4)]


def run(on: bool, settings: Settings, x_of=lambda x: x) -> tuple[State, list, list, dict]:
    """Updates and normalizes through one door; the states, outputs and kernel calls."""
    state = initial_state((3,), prior_weight=0.0)
    door = Dispatcher("test")
    before = native.calls()
    updates, outs = [], []
    with native.native_kernels(on):
        for x in batches():
            updates.append(door.update(state, x_of(x), None, settings, x.shape))
            outs.append(door.normalize(state, x_of(x), settings, return_clipped=True))
    after = native.calls()
    return state, updates, outs, {k: after[k] - before[k] for k in after}


@needs_kernels
@pytest.mark.parametrize("settings", [EXACT, EMA], ids=["exact", "ema"])
def test_eligible_cpu_tensors_take_the_native_kernels_others_torch_with_equal_results(settings):
    nat, nat_updates, nat_outs, nat_calls = run(True, settings)
    assert [int(m.count) for m in nat_updates] == [40] * 4
    assert nat_calls["update"] == nat_calls["normalize"] == 4
    ref, _, _, ref_calls = run(True, settings, lambda x: x.T.contiguous().T)
    assert ref_calls["update"] == ref_calls["normalize"] == 0  # non-contiguous: torch
    assert ref_calls["shifted_sums"] == 0
    off, _, off_outs, off_calls = run(False, settings)
    assert not any(off_calls.values())
    for other in (ref, off):
        assert torch.equal(nat.count, other.count)
        torch.testing.assert_close(nat.mean, other.mean, rtol=1e-13, atol=1e-12)
        torch.testing.assert_close(nat.var, other.var, rtol=1e-12, atol=0.0)
    for (y, clipped), (y_ref, clipped_ref) in zip(nat_outs, off_outs, strict=True):
        torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
        assert int(clipped) == int(clipped_ref)
        assert isinstance(clipped, int)
        assert isinstance(clipped_ref, torch.Tensor)


def test_updates_write_the_given_tensors_in_place():
    state = initial_state((3,), prior_weight=0.0)
    addresses = [t.data_ptr() for t in state]
    Dispatcher("test").update(state, batches()[0], None, EXACT, torch.Size((40, 3)))
    assert [t.data_ptr() for t in state] == addresses
    assert int(state.count) == 40


def test_raise_mode_refuses_nonfinite_rows_before_writing():
    state = initial_state((3,), prior_weight=0.0)
    x = batches()[0]
    x[5, 1] = torch.nan
    raising = EXACT._replace(nonfinite="raise")
    for on in (True, False):
        with native.native_kernels(on), pytest.raises(ValueError, match="NaN or Inf"):
            Dispatcher("test").update(state, x, None, raising, x.shape)
    assert int(state.count) == 0


@needs_kernels
def test_the_kernel_state_arguments_follow_the_declarations_in_the_c_order():
    state = initial_state((3,), prior_weight=0.0)
    pointers = native.StatePointers()
    got = pointers.get(state, 3)
    order = ("mean", "var", "mean_residual", "weight_sum", "count", "nonfinite_count")
    assert got == tuple(getattr(state, name).data_ptr() for name in order)
    assert pointers.tensors == tuple(getattr(state, name) for name in order)


def test_buffers_the_kernel_may_not_write_are_refused():
    state = initial_state((3,), prior_weight=0.0)
    assert (
        native.StatePointers().get(state._replace(var=torch.ones(2, dtype=torch.float64)), 3)
        is None
    )
    assert native.StatePointers().get(state._replace(count=torch.zeros(())), 3) is None
    with torch.inference_mode():
        inference = initial_state((3,), prior_weight=0.0)
    assert native.StatePointers().get(inference, 3) is None


def test_copies_of_the_door_start_without_caches_and_with_their_own_lock():
    state = initial_state((3,), prior_weight=0.0)
    door = Dispatcher("test")
    door.update(state, batches()[0], None, EXACT, torch.Size((40, 3)))
    door.normalize(state, batches()[0], EXACT)
    for clone in (copy.deepcopy(door), pickle.loads(pickle.dumps(door))):
        assert clone.name == "test"
        assert clone._affine_cache is None
        assert clone.pointers.tensors == ()
        assert clone.lock is not door.lock


def test_the_cached_affine_follows_updates_and_setting_changes():
    state = initial_state((3,), prior_weight=0.0)
    door = Dispatcher("test")
    x = batches()[1]
    assert torch.equal(door.normalize(state, x, EXACT), x)  # identity before any data
    door.update(state, x, None, EXACT, x.shape)
    first = door.normalize(state, x, EXACT)
    assert not torch.equal(first, x)
    assert float(door.normalize(state, x * 100, EXACT._replace(clip=1.0)).abs().max()) == 1.0


def test_store_writes_every_buffer_in_place():
    state = initial_state((2,), prior_weight=0.0)
    new = State(*(torch.full_like(t, 3) for t in state))
    store(state, new)
    assert all(bool((t == 3).all()) for t in state)


@pytest.mark.parametrize("on", [True, False])
def test_shifted_sums_and_returns_pick_the_kernel_only_where_eligible(on: bool):
    x = batches()[2].double()
    shift = moments.batch_shift(x, None)
    before = native.calls()
    with native.native_kernels(on):
        sums = shifted_sums(x, None, shift)
        rewards = x[:, :2].contiguous()
        dones = rewards > 100
        start = torch.zeros(2, dtype=torch.float64)
        trajectory, final = discounted_returns(rewards, dones, start, 0.9)
    after = native.calls()
    served = on and native.available()
    assert after["shifted_sums"] - before["shifted_sums"] == served
    assert after["discounted_returns"] - before["discounted_returns"] == served
    ref = moments.shifted_sums(x, None, shift)
    assert torch.equal(sums.count, ref.count)
    torch.testing.assert_close(sums.sum_sq, ref.sum_sq, rtol=1e-12, atol=0.0)
    want_trajectory, want_final = returns.discounted_returns(rewards, dones, start, 0.9)
    assert torch.equal(trajectory, want_trajectory)
    assert torch.equal(final, want_final)


@needs_kernels
def test_normalize_cached_serves_repeats_and_steps_aside_whenever_normalize_would_not() -> None:
    state = initial_state((3,), prior_weight=0.0)
    door = Dispatcher("test")
    x = batches()[1]
    assert door.normalize_cached(state, x, EXACT) is None  # no map cached yet
    door.update(state, x, None, EXACT, x.shape)
    full, full_clipped = door.normalize(state, x, EXACT, return_clipped=True)
    cached = door.normalize_cached(state, x, EXACT)
    assert cached is not None
    assert torch.equal(cached[0], full)
    assert cached[1] == full_clipped
    assert door.normalize_cached(state, x[:, :2].contiguous(), EXACT) is None  # wrong features
    assert door.normalize_cached(state, x.double(), EXACT) is None  # another dtype
    assert door.normalize_cached(state, x.T.contiguous().T, EXACT) is None  # not contiguous
    assert door.normalize_cached(state, x.numpy(), EXACT) is None  # not a tensor
    assert door.normalize_cached(state, x, EXACT._replace(clip=1.0)) is None  # other settings
    with torch.enable_grad():
        assert door.normalize_cached(state, x.requires_grad_(), EXACT) is None
    x = x.detach()
    with native.native_kernels(False):
        assert door.normalize_cached(state, x, EXACT) is None
    if fused.interpreting():
        with fused.interpret_on_cpu():
            assert not native.enabled()  # the CPU stands in for a GPU: no native kernels
            assert door.normalize_cached(state, x, EXACT) is None  # the fused kernels serve
        assert native.enabled()
    replaced = State(*(t.clone() for t in state))  # e.g. `load_state_dict(assign=True)`
    assert door.normalize_cached(replaced, x, EXACT) is None
    assert door.normalize_cached(state, x, EXACT) is not None
    door.update(state, x * 5, None, EXACT, x.shape)  # new statistics: the map is stale
    assert door.normalize_cached(state, x, EXACT) is None
    state.mean.add_(1.0)  # any in-place write bumps the version too
    door.normalize(state, x, EXACT)
    refreshed = door.normalize_cached(state, x, EXACT)
    assert refreshed is not None
    assert torch.equal(refreshed[0], door.normalize(state, x, EXACT))
