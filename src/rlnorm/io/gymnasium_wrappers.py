"""Gymnasium's normalization wrappers as rlnorm normalizers, without importing Gymnasium.

:func:`from_gymnasium` copies the statistics of live ``NormalizeObservation`` /
``NormalizeReward`` wrappers (single-env or vector versions). The wrappers are duck-typed by
the attributes they hold (``obs_rms``, ``return_rms``, ...), so this module imports no
Gymnasium. The normalizers use Gymnasium's conventions: the prior of weight ``1e-4`` at
mean 0 and variance 1 (``prior_weight=1e-4``), its ``gamma`` and ``epsilon``, no clipping.

Example:
    >>> import gymnasium as gym
    >>> import rlnorm
    >>> env = gym.wrappers.NormalizeObservation(gym.make("CartPole-v1"))
    >>> norms = rlnorm.from_gymnasium(env, frozen=True)
    >>> norms.obs_shapes, norms.config.prior_weight
    ({'obs': (4,)}, 0.0001)
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from rlnorm import _validation as check
from rlnorm.io.convert import build_normalizers, read_moments
from rlnorm.stats.normalizers import SB3_PRIOR_WEIGHT, TENSOR_KEY, NormalizerConfig, Normalizers

__all__ = ["from_gymnasium"]


def _find_wrapper(obj: Any, attribute: str, argument: str, expected: str) -> Any:
    """``obj`` or the first wrapper in its ``.env`` chain holding ``attribute``."""
    seen: set[int] = set()
    current = obj
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        own = getattr(current, "__dict__", {})
        if attribute in own:
            return current
        current = own.get("env")
    raise TypeError(
        f"`{argument}` must be a Gymnasium {expected} wrapper (single-env or vector) or an env "
        f"wrapped in one; found no `{attribute}` in {type(obj).__name__} or the envs it wraps."
    )


def _wrapper_float(wrapper: Any, name: str, argument: str, **bounds: Any) -> float:
    value = getattr(wrapper, name, None)
    if isinstance(value, np.generic):
        value = value.item()
    try:
        return check.check_float(f"{argument}.{name}", value, **bounds)
    except (TypeError, ValueError) as err:
        raise ValueError(f"Cannot migrate `{argument}`: {err}") from None


def from_gymnasium(
    obs_wrapper: Any = None,
    reward_wrapper: Any = None,
    *,
    frozen: bool = False,
    device: torch.device | str | None = None,
) -> Normalizers:
    """Gymnasium ``NormalizeObservation`` / ``NormalizeReward`` statistics as rlnorm normalizers.

    Copies the live wrappers' state: ``obs_rms`` (mean, var and count, float32 in Gymnasium,
    widened exactly to float64), ``return_rms``, the running discounted return
    (``discounted_reward`` of the single-env wrapper, ``accumulated_reward`` of the vector
    one), ``gamma`` and ``epsilon``. The normalizers use Gymnasium's conventions: the prior
    of weight ``1e-4`` (``prior_weight=1e-4``), observations ``(obs - mean) / sqrt(var + eps)``
    and rewards ``r / sqrt(var_ret + eps)``, both without clipping (``clip=None``,
    ``reward_clip=None``). Normalizing gives the wrappers' own outputs; further observation
    updates follow Gymnasium's recursion. Further reward updates follow rlnorm's (and SB3's)
    return: ``ret = ret * gamma + r``, reset after every done; Gymnasium's ``NormalizeReward``
    instead drops the previous return on a step that terminates and never on truncation.

    Args:
        obs_wrapper: a ``NormalizeObservation`` wrapper (or an env wrapped in one; the
            ``.env`` chain is searched), or ``None`` to carry no observation statistics.
        reward_wrapper: a ``NormalizeReward`` wrapper (or an env wrapped in one), or ``None``.
        frozen: ``True`` for evaluation (statistics never update, eval mode).
        device: where the statistics live.

    Returns:
        The normalizers (with a reward normalizer when ``reward_wrapper`` is given).

    Raises:
        TypeError: a wrapper argument holds no Gymnasium normalization state, or another
            argument has the wrong type.
        ValueError: neither wrapper given, malformed statistics, or different ``epsilon``
            values in the two wrappers (rlnorm uses one for both).

    Example:
        >>> import gymnasium as gym
        >>> import rlnorm
        >>> env = gym.wrappers.NormalizeReward(
        ...     gym.wrappers.NormalizeObservation(gym.make("CartPole-v1")), gamma=0.98
        ... )
        >>> norms = rlnorm.from_gymnasium(env, env)
        >>> norms.config.gamma, norms.config.clip, norms.reward.num_envs
        (0.98, None, 1)
    """
    check.check_bool("frozen", frozen)
    device = check.check_device("device", device)
    if obs_wrapper is None and reward_wrapper is None:
        raise ValueError(
            "Pass `obs_wrapper` (a NormalizeObservation wrapper), `reward_wrapper` (a "
            "NormalizeReward wrapper), or both; got neither."
        )
    obs_stats = None
    epsilons: dict[str, float] = {}
    if obs_wrapper is not None:
        wrapper = _find_wrapper(obs_wrapper, "obs_rms", "obs_wrapper", "NormalizeObservation")
        obs_stats = read_moments(wrapper.obs_rms, "obs_wrapper.obs_rms", "`obs_wrapper`")
        epsilons["obs_wrapper"] = _wrapper_float(
            wrapper, "epsilon", "obs_wrapper", low=0.0, low_open=True
        )
    ret_stats = None
    returns = None
    gamma = 0.99
    if reward_wrapper is not None:
        wrapper = _find_wrapper(reward_wrapper, "return_rms", "reward_wrapper", "NormalizeReward")
        ret_stats = read_moments(
            wrapper.return_rms, "reward_wrapper.return_rms", "`reward_wrapper`"
        )
        if ret_stats["mean"].size != 1:
            raise ValueError(
                f"Cannot migrate `reward_wrapper`: its `return_rms` has shape "
                f"{ret_stats['mean'].shape}, expected a scalar."
            )
        ret_stats = {
            **ret_stats,
            "mean": ret_stats["mean"].reshape(()),
            "var": ret_stats["var"].reshape(()),
        }
        epsilons["reward_wrapper"] = _wrapper_float(
            wrapper, "epsilon", "reward_wrapper", low=0.0, low_open=True
        )
        gamma = _wrapper_float(wrapper, "gamma", "reward_wrapper", low=0.0, high=1.0)
        own = vars(wrapper)
        raw = own.get("accumulated_reward", own.get("discounted_reward"))
        if raw is None:
            raise ValueError(
                "Cannot migrate `reward_wrapper`: it holds neither `discounted_reward` "
                "(NormalizeReward) nor `accumulated_reward` (the vector NormalizeReward)."
            )
        returns = np.array(raw, dtype=np.float64).reshape(-1)
        if returns.size == 0 or not np.isfinite(returns).all():
            raise ValueError(
                f"Cannot migrate `reward_wrapper`: its running returns are {returns!r}."
            )
    if len(set(epsilons.values())) > 1:
        details = ", ".join(f"{k}.epsilon={v!r}" for k, v in epsilons.items())
        raise ValueError(
            f"The wrappers use different epsilons ({details}); rlnorm's normalizers share "
            "one `epsilon`. Migrate them separately, one wrapper per call."
        )
    config = NormalizerConfig(
        obs_shape=None if obs_stats is None else tuple(obs_stats["mean"].shape),
        clip=None,
        epsilon=next(iter(epsilons.values())),
        reward=ret_stats is not None,
        num_envs=None if returns is None else int(returns.size),
        gamma=gamma,
        reward_clip=None,
        reward_mode="return",
        prior_weight=SB3_PRIOR_WEIGHT,
    )
    obs = {} if obs_stats is None else {TENSOR_KEY: obs_stats}
    return build_normalizers(config, obs, ret_stats, returns, frozen=frozen, device=device)
