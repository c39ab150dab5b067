"""Bad arguments anywhere in the public API: a ValueError or TypeError naming both.

Every case calls one public constructor or method with one bad value and checks the exception
type, that the message names the argument in backticks, and that it shows the bad value (its
``repr``; for a tensor, its shape, dtype or device, whichever is wrong).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
from torch import nn

import rlnorm
from rlnorm import (
    NormalizerCallback,
    NormalizerConfig,
    Normalizers,
    RewardNormalizer,
    RunningMeanStd,
)
from rlnorm.algebra.moments import empty_moments, merge_ema
from rlnorm.io.export import export_observation_normalizer, fold_into_linear

NAN, INF = math.nan, math.inf


class Case(NamedTuple):
    id: str
    call: Callable[[], Any]
    error: type[Exception]
    argument: str
    shown: str  # text of the bad value the message must contain


def ctor(cls: Callable[..., Any], argument: str, value: Any, error: type[Exception], **base: Any):
    """A constructor case: ``cls(**base, argument=value)``."""
    kwargs = {**base, argument: value}
    return Case(
        f"{getattr(cls, '__name__', cls)}({argument}={value!r})",
        lambda: cls(**kwargs),
        error,
        argument,
        repr(value),
    )


def method(ident: str, call: Callable[[], Any], error: type[Exception], argument: str, shown: Any):
    return Case(ident, call, error, argument, shown if isinstance(shown, str) else repr(shown))


def rms(*shape: int, **kwargs: Any) -> RunningMeanStd:
    return RunningMeanStd(shape, **kwargs)


def reward(num_envs: int = 3) -> RewardNormalizer:
    return RewardNormalizer(num_envs)


def norms(**kwargs: Any) -> Normalizers:
    return Normalizers(NormalizerConfig(obs_shape=3, reward=True, num_envs=2, **kwargs))


NUMBER_CASES = [
    # (argument, bad value, exception) for the float settings shared by the constructors
    ("momentum", 1.0, ValueError),
    ("momentum", -0.1, ValueError),
    ("momentum", NAN, ValueError),
    ("momentum", INF, ValueError),
    ("momentum", True, TypeError),
    ("momentum", "0.9", TypeError),
    ("clip", 0.0, ValueError),
    ("clip", -1.0, ValueError),
    ("clip", NAN, ValueError),
    ("clip", INF, ValueError),
    ("clip", False, TypeError),
    ("epsilon", 0.0, ValueError),
    ("epsilon", -1e-8, ValueError),
    ("epsilon", NAN, ValueError),
    ("epsilon", True, TypeError),
    ("nonfinite", "ignore", ValueError),
    ("nonfinite", None, ValueError),
    ("sync", 1, TypeError),
    ("sync", "yes", TypeError),
    ("device", "gpu0", ValueError),
    ("device", 3.5, TypeError),
]

CASES: list[Case] = []
for arg, value, err in NUMBER_CASES:
    CASES.append(ctor(RunningMeanStd, arg, value, err, shape=3))
    CASES.append(ctor(RewardNormalizer, arg, value, err, num_envs=2))
    if arg not in ("device",):
        CASES.append(ctor(NormalizerConfig, arg, value, err))
        CASES.append(ctor(NormalizerCallback, arg, value, err))

CASES += [
    # RunningMeanStd settings of its own
    ctor(RunningMeanStd, "shape", -1, ValueError),
    ctor(RunningMeanStd, "shape", (2, -3), ValueError),
    ctor(RunningMeanStd, "shape", 2.0, TypeError),
    ctor(RunningMeanStd, "shape", True, TypeError),
    ctor(RunningMeanStd, "shape", "4", TypeError),
    ctor(RunningMeanStd, "shape", (2, True), ValueError),
    ctor(RunningMeanStd, "until", 0, ValueError),
    ctor(RunningMeanStd, "until", -5, ValueError),
    ctor(RunningMeanStd, "until", 1.5, TypeError),
    ctor(RunningMeanStd, "until", True, TypeError),
    ctor(RunningMeanStd, "center", 1, TypeError),
    ctor(RunningMeanStd, "center", None, TypeError),
    ctor(RunningMeanStd, "var_floor", 0.5, ValueError, shape=2),  # EMA only
    ctor(RunningMeanStd, "var_floor", 0.0, ValueError, shape=2, momentum=0.9),
    ctor(RunningMeanStd, "var_floor", 1.5, ValueError, shape=2, momentum=0.9),
    ctor(RunningMeanStd, "var_floor", NAN, ValueError, shape=2, momentum=0.9),
    ctor(RunningMeanStd, "var_floor", True, TypeError, shape=2, momentum=0.9),
    # RewardNormalizer settings of its own
    ctor(RewardNormalizer, "num_envs", 0, ValueError),
    ctor(RewardNormalizer, "num_envs", -2, ValueError),
    ctor(RewardNormalizer, "num_envs", 2.0, TypeError),
    ctor(RewardNormalizer, "num_envs", True, TypeError),
    ctor(RewardNormalizer, "gamma", 1.5, ValueError, num_envs=2),
    ctor(RewardNormalizer, "gamma", -0.01, ValueError, num_envs=2),
    ctor(RewardNormalizer, "gamma", NAN, ValueError, num_envs=2),
    ctor(RewardNormalizer, "gamma", "0.99", TypeError, num_envs=2),
    ctor(RewardNormalizer, "mode", "advantage", ValueError, num_envs=2),
    # NormalizerConfig / NormalizerCallback settings
    ctor(NormalizerConfig, "obs_shape", -1, ValueError),
    ctor(NormalizerConfig, "obs_shape", 4.0, TypeError),
    ctor(NormalizerConfig, "obs_shape", {}, ValueError),
    ctor(NormalizerConfig, "obs_feature_dims", 0, ValueError),
    ctor(NormalizerConfig, "obs_feature_dims", 1.0, TypeError),
    ctor(NormalizerConfig, "until", 0, ValueError),
    ctor(NormalizerConfig, "center", "yes", TypeError),
    ctor(NormalizerConfig, "reward", 1, TypeError),
    ctor(NormalizerConfig, "num_envs", 0, ValueError),
    ctor(NormalizerConfig, "num_envs", 2.5, TypeError),
    ctor(NormalizerConfig, "gamma", 2.0, ValueError),
    ctor(NormalizerConfig, "gamma", NAN, ValueError),
    ctor(NormalizerConfig, "reward_clip", 0.0, ValueError),
    ctor(NormalizerConfig, "reward_clip", NAN, ValueError),
    ctor(NormalizerConfig, "reward_clip", True, TypeError),
    ctor(NormalizerConfig, "reward_mode", "advantage", ValueError),
    ctor(NormalizerCallback, "name", "", ValueError),
    ctor(NormalizerCallback, "name", "my norm", ValueError),
    ctor(NormalizerCallback, "name", 3, TypeError),
    ctor(NormalizerCallback, "obs_shape", (4, -1), ValueError),
    ctor(NormalizerCallback, "num_envs", -1, ValueError),
    ctor(NormalizerCallback, "gamma", INF, ValueError),
    ctor(NormalizerCallback, "reward", "yes", TypeError),
    ctor(NormalizerCallback, "batch_keys", 1.5, TypeError),
    ctor(NormalizerCallback, "update_mask_key", 1.5, TypeError, batch_keys="obs"),
    ctor(NormalizerCallback, "update_mask_key", "fresh", ValueError),
    ctor(NormalizerCallback, "log_every_n_steps", 0, ValueError),
    ctor(NormalizerCallback, "log_every_n_steps", 2.0, TypeError),
    ctor(NormalizerCallback, "log_histograms", "no", TypeError),
    ctor(NormalizerCallback, "device", "gpu0", ValueError),
    ctor(Normalizers, "config", {"obs_shape": 3}, TypeError),
    ctor(Normalizers, "device", 7, TypeError, config=NormalizerConfig()),
    # RunningMeanStd methods
    method("update(x=str)", lambda: rms(2).update("obs"), TypeError, "x", "str 'obs'"),
    method("update(x=None)", lambda: rms(2).update(None), TypeError, "x", None),
    method("update(x=3.0)", lambda: rms(2).update(3.0), ValueError, "x", "got ()"),
    method(
        "update(x wrong shape)", lambda: rms(2).update(torch.zeros(4, 3)), ValueError, "x", "(4, 3)"
    ),
    method(
        "update(x complex)",
        lambda: rms(2).update(torch.zeros(4, 2, dtype=torch.complex64)),
        TypeError,
        "x",
        "complex64",
    ),
    method(
        "update(x on meta)",
        lambda: rms(2).update(torch.zeros(4, 2, device="meta")),
        ValueError,
        "x",
        "meta",
    ),
    method(
        "update(mask wrong shape)",
        lambda: rms(2).update(torch.zeros(4, 2), torch.ones(3, dtype=torch.bool)),
        ValueError,
        "mask",
        "(3,)",
    ),
    method(
        "update(mask=str)",
        lambda: rms(2).update(torch.zeros(2, 2), "all"),
        TypeError,
        "mask",
        "str 'all'",
    ),
    method(
        "normalize(x wrong shape)",
        lambda: rms(2).normalize(torch.zeros(2, 5)),
        ValueError,
        "x",
        "(2, 5)",
    ),
    method(
        "normalize(x=dict)", lambda: rms(2).normalize({"a": 1.0}), TypeError, "x", "dict {'a': 1.0}"
    ),
    method("denormalize(y=1)", lambda: rms(2).denormalize(1), ValueError, "y", "got ()"),
    method(
        "denormalize(y wrong shape)",
        lambda: rms(2).denormalize(torch.zeros(3)),
        ValueError,
        "y",
        "(3,)",
    ),
    method("merge_(other=dict)", lambda: rms(2).merge_({}), TypeError, "other", {}),
    method("merge_(other wrong shape)", lambda: rms(2).merge_(rms(3)), ValueError, "other", "(3,)"),
    # RewardNormalizer methods
    method(
        "reward.update(rewards wrong envs)",
        lambda: reward(3).update(torch.zeros(4), torch.zeros(4, dtype=torch.bool)),
        ValueError,
        "rewards",
        "(4,)",
    ),
    method(
        "reward.update(rewards 3-d)",
        lambda: reward(3).update(torch.zeros(2, 2, 3), torch.zeros(2, 2, 3, dtype=torch.bool)),
        ValueError,
        "rewards",
        "(2, 2, 3)",
    ),
    method(
        "reward.update(dones wrong shape)",
        lambda: reward(3).update(torch.zeros(3), torch.zeros(2, dtype=torch.bool)),
        ValueError,
        "dones",
        "(2,)",
    ),
    method(
        "reward.update(rewards=str)",
        lambda: reward(2).update("high", torch.zeros(2, dtype=torch.bool)),
        TypeError,
        "rewards",
        "str 'high'",
    ),
    method(
        "reward.update(dones=None)",
        lambda: reward(2).update(torch.zeros(2), None),
        TypeError,
        "dones",
        None,
    ),
    method(
        "reward.update(rewards on meta)",
        lambda: reward(2).update(torch.zeros(2, device="meta"), torch.zeros(2, dtype=torch.bool)),
        ValueError,
        "rewards",
        "meta",
    ),
    method(
        "reward.normalize(rewards=str)",
        lambda: reward(2).normalize("1.0"),
        TypeError,
        "rewards",
        "str '1.0'",
    ),
    method(
        "reward.reset_returns(env_mask wrong shape)",
        lambda: reward(2).reset_returns(torch.ones(3, dtype=torch.bool)),
        ValueError,
        "env_mask",
        "(3,)",
    ),
    method(
        "reward.reset_returns(env_mask=str)",
        lambda: reward(2).reset_returns("all"),
        TypeError,
        "env_mask",
        "str 'all'",
    ),
    # Normalizers methods
    method(
        "update_obs(obs=str)",
        lambda: norms().update_obs("obs"),
        TypeError,
        "obs",
        "str 'obs'",
    ),
    method(
        "update_obs(obs wrong shape)",
        lambda: norms().update_obs(torch.zeros(2, 4)),
        ValueError,
        "x",
        "(2, 4)",
    ),
    method(
        "update_obs(obs=dict)",
        lambda: norms().update_obs({"a": torch.zeros(2, 3)}),
        TypeError,
        "obs",
        "['a']",
    ),
    method(
        "normalize_rewards(rewards wrong envs)",
        lambda: norms().normalize_rewards(torch.zeros(5), torch.zeros(5, dtype=torch.bool)),
        ValueError,
        "rewards",
        "(5,)",
    ),
    method(
        "normalize_rewards(rewards=str)",
        lambda: Normalizers(NormalizerConfig(reward=True)).normalize_rewards("1", [False]),
        TypeError,
        "rewards",
        "str '1'",
    ),
    # load_normalizers
    method(
        "load_normalizers(checkpoint=3)",
        lambda: rlnorm.load_normalizers(3),
        TypeError,
        "checkpoint",
        3,
    ),
    method(
        "load_normalizers(checkpoint=None)",
        lambda: rlnorm.load_normalizers(None),
        TypeError,
        "checkpoint",
        None,
    ),
    method(
        "load_normalizers(name=3)",
        lambda: rlnorm.load_normalizers({"callbacks": {}}, name=3),
        TypeError,
        "name",
        3,
    ),
    method(
        "load_normalizers(device=1.5)",
        lambda: rlnorm.load_normalizers({"callbacks": {}}, device=1.5),
        TypeError,
        "device",
        1.5,
    ),
    # export functions
    method(
        "export_observation_normalizer(norms=rms)",
        lambda: export_observation_normalizer(rms(2), Path("never.pt2")),
        TypeError,
        "norms",
        "RunningMeanStd",
    ),
    method(
        "fold_into_linear(linear=conv)",
        lambda: fold_into_linear(nn.Conv1d(2, 2, 1), rms(2)),
        TypeError,
        "linear",
        "Conv1d",
    ),
    method(
        "fold_into_linear(rms=reward)",
        lambda: fold_into_linear(nn.Linear(2, 2), reward(2)),
        TypeError,
        "rms",
        "RewardNormalizer",
    ),
    method(
        "fold_into_linear(rms wrong features)",
        lambda: fold_into_linear(nn.Linear(3, 2), rms(2)),
        ValueError,
        "rms",
        "(2,)",
    ),
    # get_normalizer
    method(
        "get_normalizer(owner=object)",
        lambda: rlnorm.get_normalizer("trainer"),
        TypeError,
        "owner",
        "'trainer'",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_argument_raises_naming_the_argument_and_the_value(case: Case) -> None:
    with pytest.raises(case.error) as info:
        case.call()
    message = str(info.value)
    assert f"`{case.argument}" in message, message
    assert case.shown in message, f"{case.shown!r} not in {message!r}"


# ---------------------------------------------------------------------------- moments

# The pure functions in rlnorm.algebra.moments are the hot path (compiled, inside CUDA graphs)
# and do not check their tensors. merge_ema does check its Python-number arguments, momentum and
# var_floor, at no cost to the tensors: a momentum outside [0, 1), NaN included, would give
# negative or NaN weights, so it raises ValueError naming the argument.


@pytest.mark.parametrize("momentum", [NAN, 1.5, -0.5])
def test_merge_ema_rejects_a_bad_momentum(momentum: float) -> None:
    one = empty_moments((2,))
    batch = one._replace(
        weight=torch.ones((), dtype=torch.float64), count=torch.ones((), dtype=torch.int64)
    )
    with pytest.raises(ValueError, match="`momentum`"):
        merge_ema(one, batch, momentum)
