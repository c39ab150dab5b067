"""Reading normalizer statistics back from Lightning checkpoints, without a Trainer."""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from rlnorm import _validation as check
from rlnorm.stats.normalizers import NormalizerConfig, Normalizers
from rlnorm.stats.schema import restore_normalizers

__all__ = [
    "ZIP_START",
    "check_checkpoint_file",
    "checkpoint_in_directory",
    "find_normalizer_states",
    "load_normalizers",
    "read_checkpoint",
]

#: First bytes of a zip archive: the files ``torch.save`` writes (and SB3's model files) ...
ZIP_START = b"PK\x03\x04"
#: ... and of the legacy format (``_use_new_zipfile_serialization=False``): a pickle.
_LEGACY_PICKLE_START = b"\x80"


def check_checkpoint_file(path: str | os.PathLike[str]) -> None:
    """Check that a checkpoint file is whole: its zip structure and every member's CRC.

    ``torch.load`` does not verify checksums, so flipped bits inside a tensor load silently as
    wrong values; a truncated file fails deep inside torch with an unrelated message. This reads
    the file once and names the problem instead. Files in the legacy (pre-zip) ``torch.save``
    format carry no checksums and are only checked for being non-empty.

    Raises:
        FileNotFoundError: no file at ``path`` (a directory says so, and names the checkpoint
            in it to pass, if it holds one).
        ValueError: the file is empty, truncated or corrupted; the message names the file.
    """
    path = Path(path)
    if path.is_dir():
        inside = checkpoint_in_directory(path)
        hint = (
            f"pass the checkpoint file in it, e.g. {str(inside)!r}"
            if inside is not None
            else "pass the path of a checkpoint file (.ckpt); it holds none"
        )
        raise FileNotFoundError(f"{str(path)!r} is a directory, not a checkpoint file: {hint}.")
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint file at {str(path)!r}.")
    with path.open("rb") as f:
        head = f.read(4)
    where = f"Checkpoint {str(path)!r}"
    if not head:
        raise ValueError(f"{where} is empty (0 bytes): it was never written completely.")
    if head[:1] == _LEGACY_PICKLE_START:
        return
    if head != ZIP_START:
        raise ValueError(
            f"{where} is not a PyTorch checkpoint: it starts with {head!r}, not with the zip "
            "header torch.save writes (a corrupted file, or another format)."
        )
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except Exception as err:  # BadZipFile, OSError, EOFError, NotImplementedError, ...
        raise ValueError(
            f"{where} is truncated or corrupted: its zip structure cannot be read ({err}). "
            "Was the process writing it killed, or the copy interrupted?"
        ) from err
    if bad is not None:
        raise ValueError(
            f"{where} is corrupted: its entry {bad!r} fails the zip integrity check (its data "
            "do not match the stored checksum, or its header is damaged). Use another checkpoint."
        )


def checkpoint_in_directory(directory: str | os.PathLike[str]) -> Path | None:
    """The checkpoint a run directory most likely means, or ``None``.

    Looks for ``last.ckpt`` in ``directory``, in its ``checkpoints/`` folder, and in the
    newest ``lightning_logs/version_N/checkpoints/`` under it (what ``rlnorm fit`` and
    ``ModelCheckpoint(save_last=True)`` write); failing that, the newest ``*.ckpt`` in the
    first two places.

    Args:
        directory: a run's root, ``version_N`` or ``checkpoints`` folder.

    Returns:
        The file's path, or ``None`` if there is none.
    """
    directory = Path(directory)
    places = [directory, directory / "checkpoints"]
    versions = sorted(
        (d for d in (directory / "lightning_logs").glob("version_*") if d.is_dir()),
        key=lambda d: int(number) if (number := d.name.removeprefix("version_")).isdigit() else -1,
    )
    if versions:
        places.append(versions[-1] / "checkpoints")
    for place in places:
        if (place / "last.ckpt").is_file():
            return place / "last.ckpt"
    found = [f for place in places[:2] for f in place.glob("*.ckpt") if f.is_file()]
    return max(found, key=lambda f: f.stat().st_mtime) if found else None


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a checkpoint with ``torch.load(weights_only=True)`` on the CPU, checked first.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not a readable checkpoint (empty, truncated, corrupted, or
            holding objects that ``weights_only=True`` refuses); the message names the file.
    """
    path = Path(path)
    check_checkpoint_file(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"Cannot read checkpoint {str(path)!r}: it is not a PyTorch checkpoint, or it holds "
            "objects other than tensors and plain containers (rlnorm reads checkpoints with "
            "weights_only=True and never runs pickled code)."
        ) from err
    except Exception as err:  # torch raises many types for damaged files (OSError, KeyError...)
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"Cannot read checkpoint {str(path)!r}: it is truncated, corrupted or not a "
            f"PyTorch checkpoint ({type(err).__name__}: {detail})."
        ) from err
    if not isinstance(checkpoint, dict):
        raise ValueError(
            f"Checkpoint {str(path)!r} holds a {type(checkpoint).__name__}, not a Lightning "
            "checkpoint dict."
        )
    return checkpoint


def find_normalizer_states(checkpoint: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The normalizer states in a checkpoint dict, by their ``name``.

    A ``Trainer`` checkpoint holds them under ``checkpoint["callbacks"]`` (one per
    ``NormalizerCallback``); a Fabric checkpoint (``fabric.save(path, {..., "rlnorm": norm})``)
    at whatever top-level key the loop saved a ``FabricNormalizers`` under.
    """
    candidates = [*checkpoint.get("callbacks", {}).values(), *checkpoint.values()]
    found = {}
    for value in candidates:
        if isinstance(value, Mapping) and "schema_version" in value and "normalizers" in value:
            found[str(value.get("name", "rlnorm"))] = dict(value)
    return found


def load_normalizers(
    checkpoint: str | os.PathLike[str] | Mapping[str, Any],
    name: str | None = None,
    device: torch.device | str | None = None,
) -> Normalizers:
    """The frozen normalizers a run was trained with, for evaluation or deployment.

    Reads the state :class:`~rlnorm.NormalizerCallback` wrote into a Lightning checkpoint
    (``ModelCheckpoint``'s files, ``last.ckpt``, ``trainer.save_checkpoint``), with
    ``torch.load(weights_only=True)``: no pickled code runs. Checkpoints written with
    ``save_weights_only=True`` hold no callback state at all, so they cannot be used here;
    the error says so rather than handing back fresh statistics.

    Args:
        checkpoint: path of a checkpoint file, or an already loaded checkpoint dict.
        name: the callback's ``name``, needed only when several were attached.
        device: where to put the statistics.

    Returns:
        :class:`~rlnorm.Normalizers`, frozen and in eval mode.

    Raises:
        FileNotFoundError: no file at the path.
        ValueError: unreadable file, no (or no single) normalizer state, or a malformed one.

    Example:
        >>> import rlnorm
        >>> ckpt = "runs/lightning_logs/version_0/checkpoints/last.ckpt"
        >>> norms = rlnorm.load_normalizers(ckpt)  # doctest: +SKIP
        >>> action = policy(norms.normalize_obs(obs))  # doctest: +SKIP
    """
    if not isinstance(checkpoint, (str, os.PathLike, Mapping)):
        raise TypeError(
            "`checkpoint` must be a path (str or os.PathLike) or a loaded checkpoint dict, got "
            f"{check.show(checkpoint)}."
        )
    if name is not None and not isinstance(name, str):
        raise TypeError(f"`name` must be a str or None, got {check.show(name)}.")
    device = check.check_device("device", device)
    where = "given checkpoint"
    if not isinstance(checkpoint, Mapping):
        where = f"checkpoint {str(checkpoint)!r}"
        checkpoint = read_checkpoint(checkpoint)
    states = find_normalizer_states(checkpoint)
    if not states:
        if "callbacks" not in checkpoint and "state_dict" in checkpoint:
            raise ValueError(
                f"The {where} holds no callback state: it was saved with save_weights_only=True, "
                "which drops the normalizer statistics. Use a full checkpoint (the default of "
                "ModelCheckpoint, e.g. last.ckpt)."
            )
        raise ValueError(
            f"The {where} holds no rlnorm normalizer state (top-level keys: {sorted(checkpoint)}): "
            "was NormalizerCallback attached to the Trainer that wrote it, or a "
            "FabricNormalizers put in the state given to fabric.save?"
        )
    if name is None:
        if len(states) > 1:
            raise ValueError(
                f"The {where} holds several normalizer states {sorted(states)}; pass `name=`."
            )
        name = next(iter(states))
    if name not in states:
        raise ValueError(f"The {where} has no normalizer named {name!r}; it has {sorted(states)}.")
    state = states[name]
    config = NormalizerConfig.from_dict(state.get("config", {}))
    norms = Normalizers(config, device=device)
    restore_normalizers(norms, state, where=f"normalizer state {name!r} in {where}")
    if device is not None:
        norms.to(device)
    return norms.freeze().eval()
