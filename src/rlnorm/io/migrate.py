"""Import normalization statistics from Stable-Baselines3 and Gymnasium into rlnorm.

Two sources are supported:

- Stable-Baselines3 ``VecNormalize``: the file its ``save()`` writes, a pickle of the whole
  wrapper minus the vector environment. :func:`load_sb3_vecnormalize` reads it with a
  restricted unpickler that only rebuilds numpy arrays and inert stand-ins for SB3's
  ``VecNormalize`` / ``RunningMeanStd`` and Gymnasium's spaces, so no code from the file runs
  and SB3 need not be installed. :func:`read_sb3_vecnormalize` returns what it read as plain
  Python and numpy values.
- Gymnasium ``NormalizeObservation`` / ``NormalizeReward`` (single-env or vector versions):
  :func:`from_gymnasium` copies the statistics of the live wrapper objects.

Both return :class:`~rlnorm.Normalizers` configured to reproduce the source's conventions:
statistics starting from the prior of weight ``1e-4`` at mean 0 and variance 1 that both
libraries use (``prior_weight=1e-4``), their clip bounds, ``gamma`` and ``epsilon``. Counts
carry over as ``weight_sum`` (the float weight, prior included) and ``count`` (the number of
real rows, ``round(weight - 1e-4)``).

Example:
    >>> import rlnorm
    >>> norms = rlnorm.load_sb3_vecnormalize("vec_normalize.pkl", frozen=True)  # doctest: +SKIP
    >>> action = policy(norms.normalize_obs(obs))  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import math
import os
import pickle
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

import numpy as np
import torch

from rlnorm import _validation as check
from rlnorm.stats.normalizers import SB3_PRIOR_WEIGHT, TENSOR_KEY, NormalizerConfig, Normalizers
from rlnorm.stats.running_mean_std import RunningMeanStd

__all__ = [
    "PickleFileWarning",
    "UnsafePickleError",
    "from_gymnasium",
    "load_sb3_vecnormalize",
    "read_sb3_vecnormalize",
]

_SB3_VECNORMALIZE = "stable_baselines3.common.vec_env.vec_normalize.VecNormalize"
_SB3_RUNNING_MEAN_STD = "stable_baselines3.common.running_mean_std.RunningMeanStd"
#: Gymnasium (and legacy gym) space classes a VecNormalize pickle holds as attributes.
_SPACE_MODULES = ("gymnasium.spaces.", "gym.spaces.")
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
#: Modules of numpy's random generators, pickled inside seeded spaces (``_np_random``).
_NUMPY_RANDOM_MODULES = frozenset(
    {
        "numpy.random._pickle",
        "numpy.random._pcg64",
        "numpy.random._mt19937",
        "numpy.random._philox",
        "numpy.random._sfc64",
        "numpy.random.bit_generator",
        "numpy.random.mtrand",
    }
)
_ZIP_MAGIC = b"PK\x03\x04"


class PickleFileWarning(UserWarning):
    """Emitted when statistics are read from a pickle file (Stable-Baselines3's format).

    Silence it with ``warnings.filterwarnings("ignore", category=PickleFileWarning)``.
    """


class UnsafePickleError(pickle.UnpicklingError, ValueError):
    """A pickle references a global that rlnorm's restricted unpickler refuses to load."""


# ---------------------------------------------------------------------------- unpickling


class _Inert:
    """Stand-in for a pickled object: keeps the state it is given and runs nothing.

    Each refused-to-import class the unpickler accepts maps to a subclass of this one that
    records the original name in ``_rlnorm_origin``.
    """

    _rlnorm_origin: ClassVar[str] = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> _Inert:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        slots = None
        if isinstance(state, tuple) and len(state) == 2:
            state, slots = state
        for part in (state, slots):
            if isinstance(part, dict):
                self.__dict__.update({str(k): v for k, v in part.items()})
            elif part is not None:
                self.__dict__["_rlnorm_state"] = part

    def __repr__(self) -> str:
        return f"<inert stand-in for {self._rlnorm_origin}>"


_STAND_INS: dict[str, type[_Inert]] = {}


def _stand_in(origin: str) -> type[_Inert]:
    cls = _STAND_INS.get(origin)
    if cls is None:
        name = "Inert" + origin.rsplit(".", 1)[-1].strip("_").replace("_", "")
        cls = type(name, (_Inert,), {"_rlnorm_origin": origin, "__module__": __name__})
        _STAND_INS[origin] = cls
    return cls


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it for bytes, limited to latin-1 text."""
    if not isinstance(text, str) or encoding.replace("-", "").lower() != "latin1":
        raise pickle.UnpicklingError(
            "`_codecs.encode` is accepted only the way protocol-2 pickles encode bytes "
            f"(latin-1 text), got encoding {encoding!r}"
        )
    return text.encode("latin1")


def _numpy_globals() -> dict[str, Any]:
    """The numpy callables array pickles need, under both numpy 1 and numpy 2 names."""
    try:
        multiarray = importlib.import_module("numpy._core.multiarray")
        numeric = importlib.import_module("numpy._core.numeric")
    except ImportError:  # numpy 1.x
        multiarray = importlib.import_module("numpy.core.multiarray")
        numeric = importlib.import_module("numpy.core.numeric")
    out: dict[str, Any] = {"numpy.ndarray": np.ndarray, "numpy.dtype": np.dtype}
    for package in ("numpy.core", "numpy._core"):
        out[f"{package}.multiarray._reconstruct"] = multiarray._reconstruct
        out[f"{package}.multiarray.scalar"] = multiarray.scalar
        if hasattr(numeric, "_frombuffer"):  # protocol-5 array pickles
            out[f"{package}.numeric._frombuffer"] = numeric._frombuffer
    out["collections.OrderedDict"] = OrderedDict
    out["_codecs.encode"] = _latin1_bytes  # bytes inside protocol-2 pickles
    return out


def _allowed_global(module: str, name: str) -> Any:
    """What the unpickler may hand out for ``module.name``; ``None`` if it is refused."""
    origin = f"{module}.{name}"
    real = _numpy_globals().get(origin)
    if real is not None:
        return real
    if origin in (_SB3_VECNORMALIZE, _SB3_RUNNING_MEAN_STD):
        return _stand_in(origin)
    if module.startswith(_SPACE_MODULES) and name in _SPACE_NAMES:
        return _stand_in(origin)
    if module in _NUMPY_RANDOM_MODULES:
        return _stand_in(origin)
    return None


class _RestrictedUnpickler(pickle.Unpickler):
    """Rebuilds numpy arrays and inert stand-ins; refuses every other global."""

    def __init__(self, file: BinaryIO, where: str) -> None:
        super().__init__(file)
        self._where = where

    def find_class(self, module: str, name: str) -> Any:
        allowed = _allowed_global(module, name)
        if allowed is None:
            raise UnsafePickleError(
                f"Refused to load {self._where}: it references the global `{module}.{name}`, "
                "which is neither numpy array data nor Stable-Baselines3/Gymnasium normalization "
                "state. rlnorm's restricted unpickler imports nothing else and ran no code "
                "from the file."
            )
        return allowed

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError(
            "it uses pickle persistent IDs, which VecNormalize.save() never writes"
        )


def _unpickle(path: Path, where: str) -> Any:
    with path.open("rb") as file:
        head = file.read(4)
        if head == _ZIP_MAGIC:
            raise ValueError(
                f"Cannot read {where}: it is a zip archive (an SB3 model saved by "
                "`model.save()`?), not the statistics file written by `VecNormalize.save()`."
            )
        if not head:
            raise ValueError(f"Cannot read {where}: the file is empty.")
        file.seek(0)
        try:
            return _RestrictedUnpickler(file, where).load()
        except UnsafePickleError:
            raise
        except EOFError:
            raise ValueError(
                f"Cannot read {where}: it is truncated (the pickle ends before its last "
                "object is complete)."
            ) from None
        except Exception as err:  # malformed pickles raise many types (KeyError, ...)
            detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise ValueError(
                f"Cannot read {where}: it is not a pickle written by `VecNormalize.save()` "
                f"({type(err).__name__}{': ' + detail if detail else ''})."
            ) from None


# ---------------------------------------------------------------------------- SB3 files


def _origin(obj: Any) -> str:
    if isinstance(obj, _Inert):
        return obj._rlnorm_origin
    return type(obj).__name__


def _stats(obj: Any, field: str, where: str) -> dict[str, Any]:
    """``mean``, ``var`` (float64 arrays) and ``count`` (float) of a pickled RunningMeanStd."""
    if not (isinstance(obj, _Inert) and obj._rlnorm_origin == _SB3_RUNNING_MEAN_STD):
        raise ValueError(
            f"Cannot read {where}: `{field}` is a {_origin(obj)}, not a Stable-Baselines3 "
            "RunningMeanStd."
        )
    return _stats_from(obj, field, where)


def _stats_from(obj: Any, field: str, where: str) -> dict[str, Any]:
    """Validated statistics of any object with ``mean``, ``var`` and ``count`` attributes."""
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


def _number(values: Mapping[str, Any], key: str, default: Any, where: str) -> Any:
    """``values[key]`` as a Python number (``default`` when absent); numpy scalars unwrapped."""
    value = values.get(key, default)
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        return value
    raise ValueError(f"Cannot read {where}: `{key}` is {value!r}, not a number.")


def _read_sb3(path: str | os.PathLike[str], stacklevel: int) -> dict[str, Any]:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"`path` must be a str or os.PathLike, got {type(path).__name__}.")
    path = Path(path)
    where = f"Stable-Baselines3 VecNormalize file {str(path)!r}"
    if not path.is_file():
        raise FileNotFoundError(f"No Stable-Baselines3 VecNormalize file at {str(path)!r}.")
    root = _unpickle(path, where)
    if not (isinstance(root, _Inert) and root._rlnorm_origin == _SB3_VECNORMALIZE):
        raise ValueError(
            f"Cannot read {where}: it holds a {_origin(root)}, not a Stable-Baselines3 "
            "VecNormalize (the file `VecNormalize.save()` writes)."
        )
    warnings.warn(
        f"{where} is a pickle. rlnorm read only its statistics and settings, through a "
        "restricted unpickler that rebuilds numpy arrays and inert stand-ins for SB3/Gymnasium "
        "objects and runs no code from the file. Save the migrated normalizers in rlnorm's "
        "format (a Lightning checkpoint, or torch.save of their state_dict) to leave pickles "
        "behind. Silence this with warnings.filterwarnings('ignore', "
        "category=rlnorm.io.migrate.PickleFileWarning).",
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
    :class:`UnsafePickleError`. SB3 does not need to be installed. A
    :class:`PickleFileWarning` says so each time.

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
        >>> from rlnorm.io.migrate import read_sb3_vecnormalize
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
    if not isinstance(frozen, bool):
        raise TypeError(f"`frozen` must be a bool, got {frozen!r}.")
    device = check.check_device("device", device)
    stats = _read_sb3(path, stacklevel=3)
    where = f"Stable-Baselines3 VecNormalize file {str(Path(path))!r}"
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
    norms = Normalizers(config, device=device)
    for key, values in per_key.items():
        _load_stats(norms.obs[key], values, SB3_PRIOR_WEIGHT)
    if norms.reward is not None:
        _load_stats(norms.reward.stats, stats["ret_rms"], SB3_PRIOR_WEIGHT)
        returns = stats["returns"]
        if returns is not None and returns.shape == (norms.reward.num_envs,):
            norms.reward.returns.copy_(torch.from_numpy(returns))
    return norms.freeze().eval() if frozen else norms


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


@torch.no_grad()
def _load_stats(rms: RunningMeanStd, stats: Mapping[str, Any], prior_weight: float) -> None:
    """Write mean, var and a float count (prior included) into ``rms``'s buffers."""
    device = rms.mean.device
    f64 = {"dtype": torch.float64, "device": device}
    weight = float(stats["count"])
    rows = max(round(weight - prior_weight), 0)
    state = {
        "mean": torch.as_tensor(stats["mean"], **f64).reshape(rms.shape),
        "var": torch.as_tensor(stats["var"], **f64).reshape(rms.shape),
        "count": torch.tensor(rows, dtype=torch.int64, device=device),
        "weight_sum": torch.tensor(weight, **f64),
        "nonfinite_count": torch.zeros((), dtype=torch.int64, device=device),
        "mean_residual": torch.zeros(rms.shape, **f64),
    }
    rms.load_state_dict(state)


# ---------------------------------------------------------------------------- Gymnasium


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
    if not isinstance(frozen, bool):
        raise TypeError(f"`frozen` must be a bool, got {frozen!r}.")
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
        obs_stats = _stats_from(wrapper.obs_rms, "obs_wrapper.obs_rms", "`obs_wrapper`")
        epsilons["obs_wrapper"] = _wrapper_float(
            wrapper, "epsilon", "obs_wrapper", low=0.0, low_open=True
        )
    ret_stats = None
    returns = None
    gamma = 0.99
    if reward_wrapper is not None:
        wrapper = _find_wrapper(reward_wrapper, "return_rms", "reward_wrapper", "NormalizeReward")
        ret_stats = _stats_from(wrapper.return_rms, "reward_wrapper.return_rms", "`reward_wrapper`")
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
    norms = Normalizers(config, device=device)
    if obs_stats is not None:
        _load_stats(norms.obs[TENSOR_KEY], obs_stats, SB3_PRIOR_WEIGHT)
    if norms.reward is not None and ret_stats is not None and returns is not None:
        _load_stats(norms.reward.stats, ret_stats, SB3_PRIOR_WEIGHT)
        norms.reward.returns.copy_(torch.from_numpy(returns))
    return norms.freeze().eval() if frozen else norms
