"""Stable-Baselines3 ``VecNormalize`` files as rlnorm normalizers, without SB3 or pickle.load.

``VecNormalize.save()`` writes a pickle of the whole wrapper minus the vector environment.
:func:`load_sb3_vecnormalize` reads it with rlnorm's restricted unpickler
(:mod:`rlnorm.io.unpickler`), which only rebuilds numpy arrays and inert stand-ins for SB3's
``VecNormalize`` / ``RunningMeanStd``, Gymnasium's spaces and numpy's random generators, so
no code from the file runs and SB3 need not be installed. :func:`read_sb3_vecnormalize`
returns what it read as plain Python and numpy values.

The normalizers reproduce SB3's conventions: statistics starting from the prior of weight
``1e-4`` at mean 0 and variance 1 (``prior_weight=1e-4``), its clip bounds, ``gamma`` and
``epsilon``. Counts carry over as ``weight_sum`` (the float weight, prior included) and
``count`` (the number of real rows, ``round(weight - 1e-4)``).

Example:
    >>> import rlnorm
    >>> norms = rlnorm.load_sb3_vecnormalize("vec_normalize.pkl", frozen=True)  # doctest: +SKIP
    >>> action = policy(norms.normalize_obs(obs))  # doctest: +SKIP
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlnorm import _validation as check
from rlnorm.io.checkpoint import ZIP_START
from rlnorm.io.convert import build_normalizers, read_moments
from rlnorm.io.unpickler import (
    NUMPY_RANDOM_MODULES,
    AllowList,
    PickleFileWarning,
    is_stand_in,
    origin_of,
    unpickle,
)
from rlnorm.stats.normalizers import TENSOR_KEY, NormalizerConfig, Normalizers

__all__ = ["load_sb3_vecnormalize", "read_sb3_vecnormalize"]

_SB3_VECNORMALIZE = "stable_baselines3.common.vec_env.vec_normalize.VecNormalize"
_SB3_RUNNING_MEAN_STD = "stable_baselines3.common.running_mean_std.RunningMeanStd"
#: Gymnasium (and legacy gym) space classes a VecNormalize pickle holds as attributes.
_SPACE_NAMES = frozenset(
    {
        "Box",
        "Dict",
        "Discrete",
        "Graph",
        "GraphInstance",
        "MultiBinary",
        "MultiDiscrete",
        "OneOf",
        "Sequence",
        "Space",
        "Text",
        "Tuple",
    }
)
#: What a ``VecNormalize.save()`` pickle may reference besides numpy array data.
_VECNORMALIZE_FILE = AllowList(
    what="Stable-Baselines3/Gymnasium normalization state",
    writer="`VecNormalize.save()`",
    classes=frozenset({_SB3_VECNORMALIZE, _SB3_RUNNING_MEAN_STD}),
    modules=NUMPY_RANDOM_MODULES,  # seeded spaces pickle their generator (``_np_random``)
    packages={"gymnasium.spaces": _SPACE_NAMES, "gym.spaces": _SPACE_NAMES},
)


def _stats(obj: Any, field: str, where: str) -> dict[str, Any]:
    """``mean``, ``var`` (float64 arrays) and ``count`` (float) of a pickled RunningMeanStd."""
    if not is_stand_in(obj, _SB3_RUNNING_MEAN_STD):
        raise ValueError(
            f"Cannot read {where}: `{field}` is a {origin_of(obj)}, not a Stable-Baselines3 "
            "RunningMeanStd."
        )
    return read_moments(obj, field, where)


def _number(values: Mapping[str, Any], key: str, default: Any, where: str) -> Any:
    """``values[key]`` as a Python number (``default`` when absent); numpy scalars unwrapped."""
    value = values.get(key, default)
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        return value
    raise ValueError(f"Cannot read {where}: `{key}` is {value!r}, not a number.")


def _where(path: Path) -> str:
    """The file as messages name it."""
    return f"Stable-Baselines3 VecNormalize file {str(path)!r}"


def _read_sb3(path: str | os.PathLike[str], stacklevel: int) -> dict[str, Any]:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"`path` must be a str or os.PathLike, got {type(path).__name__}.")
    path = Path(path)
    where = _where(path)
    if not path.is_file():
        raise FileNotFoundError(f"No Stable-Baselines3 VecNormalize file at {str(path)!r}.")
    with path.open("rb") as file:
        if file.read(len(ZIP_START)) == ZIP_START:
            raise ValueError(
                f"Cannot read {where}: it is a zip archive (an SB3 model saved by "
                "`model.save()`?), not the statistics file written by `VecNormalize.save()`."
            )
    root = unpickle(path, where=where, allow=_VECNORMALIZE_FILE)
    if not is_stand_in(root, _SB3_VECNORMALIZE):
        raise ValueError(
            f"Cannot read {where}: it holds a {origin_of(root)}, not a Stable-Baselines3 "
            "VecNormalize (the file `VecNormalize.save()` writes)."
        )
    warnings.warn(
        f"{where} is a pickle. rlnorm read only its statistics and settings, through a "
        "restricted unpickler that rebuilds numpy arrays and inert stand-ins for SB3/Gymnasium "
        "objects and runs no code from the file. Save the migrated normalizers in rlnorm's "
        "format (a Lightning checkpoint, or torch.save of their state_dict) to leave pickles "
        "behind. Silence this with warnings.filterwarnings('ignore', "
        "category=rlnorm.io.unpickler.PickleFileWarning).",
        PickleFileWarning,
        stacklevel=stacklevel,
    )
    values = vars(root)
    norm_obs = bool(values.get("norm_obs", True))
    if "obs_rms" not in values:
        reason = (
            "it was saved with norm_obs=False (rewards only), and rlnorm's Normalizers always "
            "normalize observations; read the reward statistics with read_sb3_vecnormalize()"
            if not norm_obs
            else "the file is damaged or not written by VecNormalize.save()"
        )
        raise ValueError(
            f"Cannot read {where}: it holds no `obs_rms` (observation statistics): {reason}."
        )
    obs_rms_raw = values["obs_rms"]
    obs_rms: dict[str, Any]
    dict_obs = isinstance(obs_rms_raw, Mapping)
    if dict_obs:
        if not obs_rms_raw:
            raise ValueError(f"Cannot read {where}: `obs_rms` is an empty dict.")
        obs_rms = {
            str(key): _stats(value, f"obs_rms[{key!r}]", where)
            for key, value in obs_rms_raw.items()
        }
    else:
        obs_rms = _stats(obs_rms_raw, "obs_rms", where)
    ret_rms = None
    if "ret_rms" in values:
        ret_rms = _stats(values["ret_rms"], "ret_rms", where)
        if ret_rms["mean"].shape != ():
            raise ValueError(
                f"Cannot read {where}: `ret_rms` has shape {ret_rms['mean'].shape}, expected ()."
            )
    returns = values.get("returns")
    if returns is not None:
        try:
            returns = np.array(returns, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError):
            raise ValueError(f"Cannot read {where}: `returns` is {returns!r}.") from None
    keys = values.get("norm_obs_keys")
    return {
        "obs_rms": obs_rms,
        "dict_obs": dict_obs,
        "ret_rms": ret_rms,
        "returns": returns,
        "norm_obs": norm_obs,
        "norm_reward": bool(values.get("norm_reward", ret_rms is not None)),
        "norm_obs_keys": None if keys is None else [str(k) for k in keys],
        "clip_obs": _number(values, "clip_obs", 10.0, where),
        "clip_reward": _number(values, "clip_reward", 10.0, where),
        "gamma": _number(values, "gamma", 0.99, where),
        "epsilon": _number(values, "epsilon", 1e-8, where),
        "num_envs": _number(values, "num_envs", None, where),
        "training": bool(values.get("training", True)),
    }


def read_sb3_vecnormalize(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read the statistics and settings of a Stable-Baselines3 ``VecNormalize`` file.

    The file (written by ``VecNormalize.save()``) is a pickle; it is read with a restricted
    unpickler that only rebuilds numpy arrays and inert stand-ins for SB3's ``VecNormalize``
    and ``RunningMeanStd`` and Gymnasium's spaces, and refuses every other global with
    :class:`~rlnorm.io.unpickler.UnsafePickleError`. SB3 does not need to be installed. A
    :class:`~rlnorm.io.unpickler.PickleFileWarning` says so each time.

    Args:
        path: the file ``VecNormalize.save(path)`` wrote.

    Returns:
        Plain values: ``obs_rms`` (``{"mean", "var", "count"}`` with float64 arrays and a
        float count, or a dict of them per observation key), ``dict_obs`` (whether
        ``obs_rms`` is per key), ``ret_rms`` (scalar statistics, or ``None``), ``returns``
        (per-env returns, normally ``None``: SB3 drops them on save), ``norm_obs``,
        ``norm_reward``, ``norm_obs_keys``, ``clip_obs``, ``clip_reward``, ``gamma``,
        ``epsilon``, ``num_envs`` and ``training``.

    Raises:
        FileNotFoundError: no file at ``path``.
        UnsafePickleError: the pickle references a refused global (also a ``ValueError``).
        ValueError: the file is empty, truncated, not a pickle, not a ``VecNormalize``, or
            holds malformed statistics; the message names the file and the problem.

    Example:
        >>> from rlnorm.io.sb3 import read_sb3_vecnormalize
        >>> stats = read_sb3_vecnormalize("vec_normalize.pkl")  # doctest: +SKIP
        >>> stats["obs_rms"]["mean"], stats["clip_obs"]  # doctest: +SKIP
        (array([ 0.03, -0.02,  0.01,  0.04]), 10.0)
    """
    return _read_sb3(path, stacklevel=3)


def load_sb3_vecnormalize(
    path: str | os.PathLike[str],
    *,
    num_envs: int | None = None,
    frozen: bool = False,
    device: torch.device | str | None = None,
) -> Normalizers:
    """Stable-Baselines3 ``VecNormalize`` statistics as rlnorm :class:`~rlnorm.Normalizers`.

    Reads the file with :func:`read_sb3_vecnormalize` (a restricted unpickler, no code runs)
    and builds normalizers with :meth:`NormalizerConfig.sb3_compatible` settings taken from
    the file (``clip_obs`` becomes ``clip``, ``clip_reward`` ``reward_clip``, ``gamma``,
    ``epsilon``, ``norm_reward`` ``reward``). Observations and rewards then normalize exactly
    as ``VecNormalize.load(path, venv)`` does, and further updates follow SB3's recursion
    (float64, with rlnorm's NaN handling). Dict observations get one normalizer per key in
    ``norm_obs_keys``; other keys pass through unchanged, as in SB3. SB3 does not save the
    per-environment returns, so they start at 0, as after ``VecNormalize.load``; a file that
    does hold ``returns`` has them carried over.

    Args:
        path: the file ``VecNormalize.save(path)`` wrote.
        num_envs: environments of the reward normalizer; defaults to the file's ``num_envs``
            (pass it when continuing with another number of environments).
        frozen: ``True`` for evaluation or deployment (statistics never update, eval mode);
            ``False`` (default) to continue training with them.
        device: where the statistics live.

    Returns:
        The normalizers.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: an unreadable, refused or malformed file (see
            :func:`read_sb3_vecnormalize`), or a file saved with ``norm_obs=False``.
        TypeError: an argument of the wrong type (the message names it).

    Example:
        >>> import rlnorm
        >>> norms = rlnorm.load_sb3_vecnormalize("vec_normalize.pkl", frozen=True)  # doctest: +SKIP
        >>> obs = norms.normalize_obs(torch.as_tensor(raw_obs))  # doctest: +SKIP
    """
    if num_envs is not None:
        check.check_positive_int("num_envs", num_envs)
    check.check_bool("frozen", frozen)
    device = check.check_device("device", device)
    stats = _read_sb3(path, stacklevel=3)
    where = _where(Path(path))
    if not stats["norm_obs"]:
        warnings.warn(
            f"{where} has norm_obs=False: SB3 passes observations through unchanged, while "
            "these normalizers normalize them with the saved statistics.",
            UserWarning,
            stacklevel=2,
        )
    obs_rms = stats["obs_rms"]
    per_key = obs_rms if stats["dict_obs"] else {TENSOR_KEY: obs_rms}
    shapes = {key: tuple(value["mean"].shape) for key, value in per_key.items()}
    obs_shape: Any = shapes if stats["dict_obs"] else shapes[TENSOR_KEY]
    reward = stats["norm_reward"] and stats["ret_rms"] is not None
    if num_envs is None and reward:
        num_envs = _file_num_envs(stats, where)
    try:
        config = NormalizerConfig.sb3_compatible(
            obs_shape=obs_shape,
            clip=stats["clip_obs"],
            reward=reward,
            reward_clip=stats["clip_reward"],
            gamma=stats["gamma"],
            epsilon=stats["epsilon"],
            num_envs=num_envs if reward else None,
        )
    except (TypeError, ValueError) as err:
        raise ValueError(f"Cannot use the settings of {where}: {err}") from None
    return build_normalizers(
        config, per_key, stats["ret_rms"], stats["returns"], frozen=frozen, device=device
    )


def _file_num_envs(stats: Mapping[str, Any], where: str) -> int:
    value = stats["num_envs"]
    if value is None and stats["returns"] is not None:
        value = int(stats["returns"].shape[0])
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(
            f"Cannot read {where}: it records no valid `num_envs` ({value!r}); pass "
            "`num_envs=` to load_sb3_vecnormalize."
        )
    return value
