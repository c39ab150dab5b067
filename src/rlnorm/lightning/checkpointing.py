"""The callback's checkpoint state: writing it, restoring it, and what to warn about.

The state holds the statistics (:mod:`rlnorm.stats.schema`), every rank's reward returns and
the drift telemetry. Every check says what happens and how to avoid it: checkpoints that
cannot hold the statistics, checkpoints without them, damaged files, and settings that changed
since the checkpoint.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from rlnorm._version import __version__
from rlnorm.io.checkpoint import check_checkpoint_file
from rlnorm.lightning.telemetry import DriftTelemetry
from rlnorm.stats.distributed import is_distributed
from rlnorm.stats.normalizers import NormalizerConfig
from rlnorm.stats.schema import check_state, restore_normalizers, statistics_state, with_own_returns

__all__ = [
    "add_every_ranks_state",
    "gather_uneven",
    "note_damaged_file",
    "restore",
    "resume_path",
    "state",
    "warn_if_no_state",
    "warn_if_weights_only",
]


def state(telemetry: DriftTelemetry, name: str) -> dict[str, Any]:
    """The callback state of ``telemetry.normalizers``: local, no collective.

    The reward returns in it are this rank's; :func:`add_every_ranks_state` adds every rank's
    when Lightning writes a checkpoint.

    Example:
        >>> sorted(state(telemetry, "rlnorm"))[:3]  # doctest: +SKIP
        ['config', 'dict_obs', 'last_logged']
    """
    norms = telemetry.normalizers
    return {
        **statistics_state(norms),
        "rlnorm_version": __version__,
        "name": name,
        **telemetry.state_dict(),
    }


def add_every_ranks_state(
    saved: dict[str, Any],
    telemetry: DriftTelemetry,
    all_gather: Callable[[Tensor], Tensor] | None,
) -> None:
    """Add to a :func:`state` being checkpointed what differs by rank (a collective).

    Every rank's reward returns go to ``reward_returns_by_rank`` (each rank resumes its own),
    and the open telemetry interval is reduced over the ranks (rank zero resumes it).

    Args:
        saved: the state to complete.
        telemetry: the telemetry (and normalizers) it was taken from.
        all_gather: every rank's tensor stacked along a new first dim, e.g.
            ``fabric.all_gather`` or the Trainer's strategy's (``None``: a single process).

    Example:
        >>> saved = checkpoint["callbacks"][callback.state_key]  # doctest: +SKIP
        >>> add_every_ranks_state(saved, callback.telemetry, None)  # doctest: +SKIP
    """
    reward = telemetry.normalizers.reward
    if all_gather is None:
        if reward is not None:
            saved["reward_returns_by_rank"] = [reward.returns.detach().cpu().clone()]
        return
    with warnings.catch_warnings():
        # Lightning's all_gather (Trainer strategies and Fabric alike) calls
        # torch.distributed.nn.functional.all_gather, which torch deprecates: one warning per
        # checkpoint that the user can do nothing about.
        warnings.filterwarnings("ignore", message=r".*all_gather.*deprecated", category=Warning)
        if reward is not None:
            saved["reward_returns_by_rank"] = gather_uneven(all_gather, reward.returns)
        saved.update(telemetry.state_dict(all_gather=all_gather))


def gather_uneven(all_gather: Callable[[Tensor], Tensor], tensor: Tensor) -> list[Tensor]:
    """Every rank's 1-D ``tensor`` (lengths may differ), on the CPU (a collective).

    Example:
        >>> [t.numel() for t in gather_uneven(fabric.all_gather, returns)]  # doctest: +SKIP
        [5, 42]
    """
    flat = tensor.detach().reshape(-1)
    size = torch.tensor([flat.numel()], device=flat.device)
    sizes = [int(n) for n in all_gather(size).reshape(-1)]
    padded = torch.zeros(max(sizes), dtype=flat.dtype, device=flat.device)
    padded[: flat.numel()] = flat
    gathered = all_gather(padded).reshape(len(sizes), -1).cpu()
    return [row[:n].clone() for row, n in zip(gathered, sizes, strict=True)]


def resume_path(trainer: Trainer | None) -> str | None:
    """The local checkpoint file ``trainer`` is resuming from, if any.

    Example:
        >>> resume_path(None) is None
        True
    """
    path = None if trainer is None else trainer.ckpt_path
    return str(path) if path is not None and os.path.isfile(path) else None


def warn_if_weights_only(trainer: Trainer, name: str) -> None:
    """Warn about checkpoint callbacks that will write no statistics (``save_weights_only``).

    Example:
        >>> warn_if_weights_only(trainer, "rlnorm")  # doctest: +SKIP
    """
    for ckpt in trainer.checkpoint_callbacks:
        if getattr(ckpt, "save_weights_only", False):
            rank_zero_warn(
                f"{type(ckpt).__name__}(save_weights_only=True) writes no callback state, "
                f"so its checkpoints will not hold the statistics of "
                f"NormalizerCallback(name={name!r}); evaluating from them would use "
                "fresh statistics. Save full checkpoints (save_weights_only=False) to "
                "use `rlnorm.load_normalizers`.",
                category=UserWarning,
            )


def warn_if_no_state(checkpoint: Mapping[str, Any], state_key: str, name: str) -> None:
    """Warn when ``checkpoint`` holds no state under ``state_key`` (statistics start fresh).

    Example:
        >>> warn_if_no_state({"callbacks": {"k": {}}}, "k", "rlnorm")  # has a state: silent
    """
    callbacks = checkpoint.get("callbacks", {})
    if state_key in callbacks:
        return
    others = [
        key
        for key, value in callbacks.items()
        if isinstance(value, Mapping) and "schema_version" in value and "normalizers" in value
    ]
    hint = f" It holds normalizer state under {others}: was `name` changed?" if others else ""
    rank_zero_warn(
        f"The checkpoint holds no state for NormalizerCallback(name={name!r}); its "
        f"statistics start fresh.{hint}",
        category=UserWarning,
    )


def restore(
    telemetry: DriftTelemetry,
    saved: Mapping[str, Any],
    *,
    config: NormalizerConfig,
    name: str,
    where: str,
    path: str | None,
    owner: str = "NormalizerCallback",
) -> None:
    """Check a saved :func:`state` (and its file) and load it into ``telemetry``, statistics too.

    Each rank resumes its own reward returns (with a warning when it has none) and rank zero the
    open telemetry interval. Warns when the callback's ``config`` differs from the
    checkpoint's: the restored statistics are kept.

    Args:
        telemetry: the callback's telemetry, with its normalizers.
        saved: the callback's state from the checkpoint.
        config: the callback's settings now.
        name: the callback's name, for messages.
        where: what ``saved`` is, for messages.
        path: the checkpoint file it was read from, if known: checked first.
        owner: who resumes, for messages (``NormalizerCallback``, ``FabricNormalizers``).

    Example:
        >>> restore(telemetry, saved, config=config, name="rlnorm",  # doctest: +SKIP
        ...         where="state", path=None)
    """
    if path is not None:
        # torch.load does not check checksums: flipped bytes would load as wrong statistics.
        check_checkpoint_file(path)
        where += f" in checkpoint {path!r}"
    check_state(saved, where)
    rank = dist.get_rank() if is_distributed() else 0
    own, warning = with_own_returns(saved, rank)
    if warning is not None:
        rank_zero_warn(warning, category=UserWarning)
    restore_normalizers(telemetry.normalizers, own, where=where)
    saved = own.get("config", {})
    changed = {
        key: (saved[key], value)
        for key, value in config.to_dict().items()
        if key in saved and key != "obs_shape" and saved[key] != value
    }
    if changed:
        details = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
        rank_zero_warn(
            f"{owner}(name={name!r}) resumes with settings that differ from "
            f"the checkpoint's ({details}); the restored statistics are kept and the new "
            "settings apply from now on.",
            category=UserWarning,
        )
    # The open interval saved is the sum over all ranks: one rank resumes it.
    telemetry.load_state_dict(own, is_global_zero=rank == 0)


def note_damaged_file(path: str | None, exception: BaseException) -> None:
    """Add to ``exception`` what is wrong with the checkpoint file ``path``, if anything.

    Lightning reads the checkpoint to resume from before any hook knows its path, so a damaged
    file fails deep inside torch; this names the file and the problem on the way out.

    Example:
        >>> note_damaged_file(None, RuntimeError("boom"))  # no file: nothing to add
    """
    if path is None or path in str(exception):
        return
    try:
        check_checkpoint_file(path)
    except ValueError as err:
        note = f"rlnorm: cannot resume: {err}"
        if hasattr(exception, "add_note"):
            exception.add_note(note)
        else:  # Python 3.10
            rank_zero_warn(note, category=UserWarning)
