"""The checkpoint state of an agent's normalizers: its layout, checks, save and restore.

:class:`~rlnorm.NormalizerCallback` writes this state into Lightning checkpoints and
:func:`rlnorm.load_normalizers` reads it back; both go through the functions here, so training,
resuming, evaluating and deploying agree on one layout (``SCHEMA_VERSION``). The state is plain
tensors, numbers, strings and dicts, so ``torch.load(weights_only=True)`` reads it.

Example:
    >>> import torch
    >>> from rlnorm import NormalizerConfig, Normalizers
    >>> from rlnorm.stats.schema import restore_normalizers, statistics_state
    >>> norms = Normalizers(NormalizerConfig())
    >>> _ = norms.update_obs(torch.randn(8, 3))
    >>> copy = Normalizers(NormalizerConfig())
    >>> restore_normalizers(copy, statistics_state(norms), where="example state")
    >>> bool((copy.obs.mean == norms.obs.mean).all())
    True
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from rlnorm._version import __version__
from rlnorm.stats.normalizers import Normalizers

__all__ = [
    "FIRST_SCHEMA_VERSION",
    "SCHEMA_VERSION",
    "check_state",
    "restore_normalizers",
    "statistics_state",
    "with_own_returns",
]

#: Version of the checkpoint layout written by :meth:`NormalizerCallback.state_dict`.
SCHEMA_VERSION = 1
#: The oldest layout this rlnorm reads.
FIRST_SCHEMA_VERSION = 1
#: Keys every state of a readable schema version holds (later additions are optional).
REQUIRED_STATE_KEYS = ("config", "dict_obs", "obs_shapes", "num_envs", "normalizers")


def check_state(state: Mapping[str, Any], where: str) -> None:
    """Check that ``state`` is a :meth:`NormalizerCallback.state_dict` this rlnorm reads.

    Raises:
        ValueError: not a normalizer state, a schema version this rlnorm does not read, or
            keys missing; the message names ``where`` and the problem.
    """
    version = state.get("schema_version")
    if isinstance(version, bool) or not isinstance(version, int) or "normalizers" not in state:
        raise ValueError(
            f"The {where} is not an rlnorm normalizer state (schema_version={version!r}, keys: "
            f"{sorted(state)})."
        )
    if version > SCHEMA_VERSION:
        raise ValueError(
            f"The {where} has schema version {version}, newer than this rlnorm "
            f"({__version__}) reads ({SCHEMA_VERSION}); upgrade rlnorm."
        )
    if version < FIRST_SCHEMA_VERSION:
        raise ValueError(
            f"The {where} has schema version {version}, which no rlnorm release wrote (the "
            f"first is {FIRST_SCHEMA_VERSION}, this rlnorm {__version__} writes {SCHEMA_VERSION})."
        )
    missing_keys = [key for key in REQUIRED_STATE_KEYS if key not in state]
    if missing_keys or not isinstance(state["normalizers"], Mapping):
        raise ValueError(
            f"The {where} (schema version {version}) is incomplete: it lacks {missing_keys} "
            f"(keys: {sorted(state)}); it was edited or damaged."
        )


def statistics_state(norms: Normalizers) -> dict[str, Any]:
    """The part of a normalizer state that holds the statistics (:func:`restore_normalizers`)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "config": norms.config.to_dict(),
        "dict_obs": norms.dict_obs,
        "obs_shapes": {key: list(shape) for key, shape in norms.obs_shapes.items()},
        "num_envs": None if norms.reward is None else norms.reward.num_envs,
        "normalizers": {k: v.detach().clone() for k, v in norms.state_dict().items()},
    }


def restore_normalizers(norms: Normalizers, state: Mapping[str, Any], where: str) -> None:
    """Load a :meth:`NormalizerCallback.state_dict` into ``norms``, checking it first.

    Raises:
        ValueError: the state is from a schema this rlnorm does not read, malformed, or does
            not match the normalizers' keys or shapes; the message names ``where`` and both
            sides.
    """
    check_state(state, where)
    shapes = {key: tuple(shape) for key, shape in state.get("obs_shapes", {}).items()}
    try:
        if state.get("dict_obs") is not None:
            norms.ensure_obs_shapes(shapes, bool(state["dict_obs"]))
        if state.get("num_envs") is not None:
            norms.ensure_reward(int(state["num_envs"]))
        missing, unexpected = _load_tensors(norms, state["normalizers"])
    except (ValueError, TypeError, KeyError, RuntimeError) as err:
        raise ValueError(f"Cannot restore the {where}: {err}") from err
    # Parts the saved state never had (no data seen yet) stay fresh.
    if state.get("dict_obs") is None:
        missing = [k for k in missing if not k.startswith("obs.")]
    if state.get("num_envs") is None:
        missing = [k for k in missing if not k.startswith("reward.")]
    if missing or unexpected:
        raise ValueError(
            f"Cannot restore the {where}: its tensors do not match the normalizers "
            f"(missing {missing}, unexpected {unexpected})."
        )


def _load_tensors(norms: Normalizers, tensors: Mapping[str, Tensor]) -> tuple[list, list]:
    result = norms.load_state_dict(dict(tensors), strict=False)
    return list(result.missing_keys), list(result.unexpected_keys)


def with_own_returns(state: Mapping[str, Any], rank: int) -> tuple[dict[str, Any], str | None]:
    """``state`` with rank ``rank``'s reward returns in place of those it holds.

    Checkpoints written by several ranks hold every rank's per-environment returns under
    ``reward_returns_by_rank``; each rank resumes its own.

    Args:
        state: a normalizer state.
        rank: the rank that resumes.

    Returns:
        The state to restore, and a warning to show when ``rank`` has no returns in it (its
        environments' returns then start at 0), else ``None``.
    """
    state = dict(state)
    by_rank = state.get("reward_returns_by_rank")
    if not by_rank:
        return state, None
    warning = None
    if rank < len(by_rank) and isinstance(by_rank[rank], Tensor):
        mine = by_rank[rank]
    else:
        warning = (
            f"The checkpoint holds reward returns of {len(by_rank)} rank(s); rank {rank} has "
            "none and starts its environments' returns at 0."
        )
        mine = torch.zeros_like(by_rank[0])
    tensors = dict(state["normalizers"])
    tensors["reward.returns"] = mine
    state["normalizers"] = tensors
    state["num_envs"] = int(mine.numel())
    return state, warning
