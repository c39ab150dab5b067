"""The state declared on ``State`` is what a normalizer registers, resets, checks and loads."""

from __future__ import annotations

import math

import pytest
import torch

from rlnorm import RunningMeanStd
from rlnorm.algebra.fields import fields
from rlnorm.algebra.state import State, as_moments, from_moments, initial_state

SHAPE = (2, 3)


def fitted(**kwargs) -> RunningMeanStd:
    rms = RunningMeanStd(SHAPE, **kwargs)
    x = torch.randn(16, *SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x[3, 0, 0] = math.nan
    rms.update(x * 5 + 100)
    return rms


def test_every_declared_buffer_is_registered_in_order_with_its_dtype_shape_and_initial_value():
    rms = RunningMeanStd(SHAPE, prior_weight=0.5)
    assert list(rms.state_dict()) == list(State._fields)
    for name, field in fields(State):
        buffer = rms.get_buffer(name)
        assert buffer.dtype == field.dtype, name
        assert tuple(buffer.shape) == (SHAPE if field.per_feature else ()), name
        initial = 0.5 if name == "weight_sum" else field.initial  # the prior's weight
        assert bool((buffer == initial).all()), name


def test_reset_restores_every_declared_buffer_to_its_initial_value():
    rms = fitted(prior_weight=0.25)
    assert int(rms.nonfinite_count) == 1
    rms.reset()
    fresh = initial_state(SHAPE, prior_weight=0.25)
    for name, value in zip(State._fields, fresh, strict=True):
        assert torch.equal(rms.get_buffer(name), value), name


@pytest.mark.parametrize(
    "name", [name for name, field in fields(State) if field.dtype.is_floating_point]
)
def test_every_floating_buffer_is_checked_finite_on_load(name: str):
    state = fitted().state_dict()
    state[name] = torch.full_like(state[name], math.inf)
    with pytest.raises(ValueError, match=f"Cannot load `{name}`: it holds NaN or Inf"):
        RunningMeanStd(SHAPE).load_state_dict(state)


@pytest.mark.parametrize("name", [name for name, field in fields(State) if field.per_feature])
def test_every_per_feature_buffer_is_checked_for_the_feature_shape_on_load(name: str):
    state = fitted().state_dict()
    state[name] = torch.zeros(4, dtype=torch.float64)
    with pytest.raises(ValueError, match=f"Cannot load `{name}`: the state has shape"):
        RunningMeanStd(SHAPE).load_state_dict(state)


@pytest.mark.parametrize("name", [name for name, field in fields(State) if field.nonnegative])
def test_buffers_declared_nonnegative_refuse_negative_values_on_load(name: str):
    state = fitted().state_dict()
    state[name] = -state[name]
    with pytest.raises(ValueError, match=f"Cannot load `{name}`: it holds negative"):
        RunningMeanStd(SHAPE).load_state_dict(state)


@pytest.mark.parametrize("name", [name for name, field in fields(State) if field.legacy_from])
def test_states_written_before_a_buffer_existed_load_with_its_declared_stand_in(name: str):
    trained = fitted()
    state = trained.state_dict()
    del state[name]
    loaded = RunningMeanStd(SHAPE)
    loaded.load_state_dict(state)
    field = dict(fields(State))[name]
    source = trained.get_buffer(field.legacy_from)
    want = (
        source.to(field.dtype) if field.legacy_copy else torch.zeros_like(source, dtype=field.dtype)
    )
    assert torch.equal(loaded.get_buffer(name), want)


def test_moments_round_trip_through_the_state():
    rms = fitted()
    state = rms.state
    again = from_moments(as_moments(state), state.nonfinite_count)
    for a, b in zip(state, again, strict=True):
        assert a is b
