"""Other libraries' running statistics (mean, var, count) as rlnorm normalizers.

Shared by the readers of Stable-Baselines3 files (:mod:`rlnorm.io.sb3`) and of Gymnasium
wrappers (:mod:`rlnorm.io.gymnasium_wrappers`): both libraries keep a ``RunningMeanStd``
with ``mean``, ``var`` and a float ``count`` that includes a prior of weight ``1e-4``.
:func:`read_moments` checks and copies one; :func:`build_normalizers` writes them into
:class:`~rlnorm.Normalizers`: the float weight (prior included) becomes ``weight_sum``, and
``count`` the number of real rows, ``round(weight - prior_weight)``.

Example:
    >>> import numpy as np
    >>> from types import SimpleNamespace
    >>> from rlnorm import NormalizerConfig
    >>> from rlnorm.io.convert import build_normalizers, read_moments
    >>> theirs = SimpleNamespace(mean=np.array([1.0, 2.0]), var=np.ones(2), count=10.0001)
    >>> moments = read_moments(theirs, "obs_rms", "my file")
    >>> config = NormalizerConfig.sb3_compatible(obs_shape=2, reward=False)
    >>> norms = build_normalizers(config, {"obs": moments}, frozen=True)
    >>> int(norms.obs["obs"].count), norms.obs["obs"].mean.tolist()
    (10, [1.0, 2.0])
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from rlnorm.stats.normalizers import NormalizerConfig, Normalizers
from rlnorm.stats.running_mean_std import RunningMeanStd

__all__ = ["build_normalizers", "read_moments"]


def read_moments(obj: Any, field: str, where: str) -> dict[str, Any]:
    """Checked statistics of any object with ``mean``, ``var`` and ``count`` attributes.

    Args:
        obj: the other library's running statistics (or an inert stand-in for them).
        field: the attribute holding ``obj``, as messages name it, e.g. ``"obs_rms"``.
        where: the source, as messages name it, e.g. ``"Stable-Baselines3 ... file 'x.pkl'"``.

    Returns:
        ``{"mean", "var", "count"}``: float64 arrays of one shape and a float count.

    Raises:
        ValueError: an attribute is missing, non-numeric, NaN or Inf, the shapes differ, or
            a variance or the count is negative; the message names ``where`` and ``field``.

    Example:
        >>> from types import SimpleNamespace
        >>> from rlnorm.io.convert import read_moments
        >>> read_moments(SimpleNamespace(mean=0.5, var=2.0, count=3), "ret_rms", "file")
        {'mean': array(0.5), 'var': array(2.), 'count': 3.0}
    """
    values = vars(obj)
    missing = [key for key in ("mean", "var", "count") if key not in values]
    if missing:
        raise ValueError(f"Cannot read {where}: `{field}` lacks {missing}.")
    try:
        mean = np.array(values["mean"], dtype=np.float64)
        var = np.array(values["var"], dtype=np.float64)
        count = float(values["count"])
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"Cannot read {where}: `{field}` holds non-numeric data ({err})."
        ) from None
    if mean.shape != var.shape:
        raise ValueError(
            f"Cannot read {where}: `{field}.mean` has shape {mean.shape} but `{field}.var` "
            f"has shape {var.shape}."
        )
    if not (np.isfinite(mean).all() and np.isfinite(var).all()):
        raise ValueError(f"Cannot read {where}: `{field}` holds NaN or Inf statistics.")
    if (var < 0).any():
        raise ValueError(f"Cannot read {where}: `{field}.var` holds negative variances.")
    if not math.isfinite(count) or count < 0:
        raise ValueError(f"Cannot read {where}: `{field}.count` is {count!r}.")
    return {"mean": mean, "var": var, "count": count}


def build_normalizers(
    config: NormalizerConfig,
    obs: Mapping[str, Mapping[str, Any]],
    reward: Mapping[str, Any] | None = None,
    returns: np.ndarray | None = None,
    *,
    frozen: bool,
    device: torch.device | None = None,
) -> Normalizers:
    """:class:`~rlnorm.Normalizers` for ``config`` holding the given statistics.

    Args:
        config: the normalizers' settings; its ``prior_weight`` is the prior the counts
            include.
        obs: statistics from :func:`read_moments` per observation key (``"obs"`` for plain
            tensor observations), each matching its key's shape in ``config.obs_shape``.
        reward: statistics of the discounted return, used when ``config`` has a reward
            normalizer.
        returns: each environment's running discounted return; carried over when it has
            one entry per environment of the reward normalizer (else they start at 0).
        frozen: freeze the normalizers and put them in eval mode.
        device: where the statistics live.

    Returns:
        The normalizers.

    Example:
        >>> import numpy as np
        >>> from rlnorm import NormalizerConfig
        >>> from rlnorm.io.convert import build_normalizers
        >>> ret = {"mean": np.array(0.0), "var": np.array(4.0), "count": 8.0001}
        >>> config = NormalizerConfig.sb3_compatible(obs_shape=None, num_envs=2)
        >>> norms = build_normalizers(config, {}, ret, np.array([1.0, -1.0]), frozen=False)
        >>> norms.reward.returns.tolist(), int(norms.reward.stats.count)
        ([1.0, -1.0], 8)
    """
    norms = Normalizers(config, device=device)
    for key, moments in obs.items():
        _load_moments(norms.obs[key], moments, config.prior_weight)
    if norms.reward is not None and reward is not None:
        _load_moments(norms.reward.stats, reward, config.prior_weight)
        if returns is not None and returns.shape == (norms.reward.num_envs,):
            norms.reward.returns.copy_(torch.from_numpy(returns))
    return norms.freeze().eval() if frozen else norms


@torch.no_grad()
def _load_moments(rms: RunningMeanStd, moments: Mapping[str, Any], prior_weight: float) -> None:
    """Write mean, var and a float count (prior included) into ``rms``'s buffers."""
    device = rms.mean.device
    f64 = {"dtype": torch.float64, "device": device}
    weight = float(moments["count"])
    rows = max(round(weight - prior_weight), 0)
    state = {
        "mean": torch.as_tensor(moments["mean"], **f64).reshape(rms.shape),
        "var": torch.as_tensor(moments["var"], **f64).reshape(rms.shape),
        "count": torch.tensor(rows, dtype=torch.int64, device=device),
        "weight_sum": torch.tensor(weight, **f64),
        "nonfinite_count": torch.zeros((), dtype=torch.int64, device=device),
        "mean_residual": torch.zeros(rms.shape, **f64),
    }
    rms.load_state_dict(state)
