"""``FabricNormalizers``: the normalizers, drift telemetry and checkpoint state in Fabric loops.

Lightning Fabric loops (Lightning's own RL examples, SheepRL, CleanRL-style PPO) have no
``Trainer`` and so no callback hooks: the loop decides when to log and what to save. This
object gives them what :class:`~rlnorm.NormalizerCallback` gives a ``Trainer`` run, from the
same code: the rollout API (:class:`~rlnorm.lightning.rollout.RolloutNormalizers`), the drift
figures (:class:`~rlnorm.lightning.telemetry.DriftTelemetry`) and the checkpoint state
(:mod:`rlnorm.lightning.checkpointing`, the callback's layout, so ``rlnorm.load_normalizers``,
``rlnorm inspect`` and ``rlnorm export`` read Fabric checkpoints too).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric import Fabric
from typing_extensions import override

from rlnorm import _validation as check
from rlnorm.lightning import checkpointing
from rlnorm.lightning.rollout import RolloutNormalizers
from rlnorm.lightning.telemetry import DriftTelemetry, check_name
from rlnorm.stats.normalizers import NormalizerConfig, Normalizers, Shape
from rlnorm.stats.schema import restore_normalizers, statistics_state

__all__ = ["FabricNormalizers"]


class FabricNormalizers(RolloutNormalizers):
    """An agent's observation and reward normalizers in a Lightning Fabric training loop.

    Use it in the rollout exactly as the callback (:meth:`update_obs` once per collected
    transition, :meth:`normalize_obs` before the policy sees an observation,
    :meth:`normalize_rewards` before returns and advantages are computed), call :meth:`log`
    with the loop's step (environment steps, as Fabric loops log), and put it in the state that
    ``fabric.save`` / ``fabric.load`` are given. Under ``Fabric(strategy="ddp")`` every update is
    reduced over the ranks, so the statistics stay bitwise identical on every rank.

    Three calls are collectives under DDP and must run on every rank, like ``fabric.save``
    itself: :meth:`update_obs` and :meth:`normalize_rewards` (the same number of times on every
    rank), :meth:`log`, and :meth:`state_dict` (``fabric.save`` calls it on every rank: it
    gathers each rank's reward returns, which differ by rank, into the file rank zero writes;
    ``fabric.load`` gives each rank its own back).

    Args:
        fabric: the ``Fabric`` the loop runs on; its ``loggers`` receive the figures and its
            device holds the statistics.
        obs_shape: feature shape of one observation, a dict of them, or ``None`` to infer it.
        name: prefixes every logged tag (``<name>/obs/...``) and names the checkpoint state.
        log_histograms: with a TensorBoard logger, also write histograms of the per-dimension
            mean and std and a drift heatmap image.
        process_group: the group the statistics, the telemetry and the checkpoint gathers are
            reduced over: the processes of ``fabric`` (``None``: the default group, right for
            ``Fabric(strategy="ddp")``; pass the trainers' group when the ``Fabric`` runs on a
            ``DDPStrategy(process_group=...)`` inside a larger world, as in decoupled loops).
        **settings: any other :class:`~rlnorm.NormalizerConfig` field (``reward``, ``gamma``,
            ``clip``, ``momentum``, ...). ``sync`` defaults to whether ``fabric`` runs several
            processes: a single-process ``Fabric`` inside a larger process group (the player of
            a decoupled loop) updates and logs alone, with no collective over that group.

    Decoupled loops (one player process collects, trainer processes learn): the player
    updates the statistics alone (its ``Fabric`` has one process) and hands them to the
    trainers with :meth:`broadcast`, so trainers normalize with exactly its statistics.

    Example:
        >>> import rlnorm, torch
        >>> from lightning.fabric import Fabric
        >>> fabric = Fabric(accelerator="cpu", devices=1)
        >>> norm = rlnorm.FabricNormalizers(fabric, obs_shape=4, reward=True, gamma=0.99)
        >>> norm.update_obs(torch.randn(8, 4))
        >>> norm.normalize_obs(torch.randn(8, 4)).shape
        torch.Size([8, 4])
        >>> figures = norm.log(step=8)  # at the loop's step; rank zero writes to fabric.loggers
    """

    def __init__(
        self,
        fabric: Fabric,
        obs_shape: Shape | dict[str, Shape] | None = None,
        *,
        name: str = "rlnorm",
        log_histograms: bool = True,
        process_group: dist.ProcessGroup | None = None,
        **settings: Any,
    ) -> None:
        check.check_instance("fabric", fabric, Fabric, "lightning.fabric.Fabric")
        known = {field.name for field in dataclasses.fields(NormalizerConfig)} - {"obs_shape"}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise TypeError(
                f"FabricNormalizers got unknown setting(s) {unknown}; the settings are those of "
                f"NormalizerConfig: {sorted(known)}."
            )
        self.name = check_name(name)
        self._fabric = fabric
        self.process_group = process_group
        settings.setdefault("sync", fabric.world_size > 1)
        config = NormalizerConfig(obs_shape=obs_shape, **settings)
        normalizers = Normalizers(config, device=fabric.device, process_group=process_group)
        histograms = check.check_bool("log_histograms", log_histograms)
        self._telemetry = DriftTelemetry(
            normalizers, name=self.name, histograms=histograms, sync=config.sync
        )
        self._frozen = False

    @classmethod
    def from_normalizers(
        cls, fabric: Fabric, normalizers: Normalizers, **kwargs: Any
    ) -> FabricNormalizers:
        """Continue from existing statistics, e.g. migrated from SB3 or Gymnasium (copied).

        Args:
            fabric: the ``Fabric`` the loop runs on.
            normalizers: the statistics to start from; their ``config`` gives the settings.
            **kwargs: ``name``, ``log_histograms``.

        Example:
            >>> norms = rlnorm.load_sb3_vecnormalize("vec_normalize.pkl")  # doctest: +SKIP
            >>> norm = rlnorm.FabricNormalizers.from_normalizers(fabric, norms)  # doctest: +SKIP
        """
        check.check_instance("normalizers", normalizers, Normalizers)
        config = normalizers.config
        settings = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
        new = cls(fabric, **kwargs, **settings)
        where = "statistics given to FabricNormalizers by `from_normalizers`"
        restore_normalizers(new.normalizers, statistics_state(normalizers), where)
        return new

    @property
    @override
    def telemetry(self) -> DriftTelemetry:
        return self._telemetry

    @property
    def config(self) -> NormalizerConfig:
        """The normalizer settings."""
        return self.normalizers.config

    def log(self, step: int) -> dict[str, float]:
        """Write the drift figures at ``step`` to ``fabric.loggers`` (rank zero writes).

        A collective under DDP: call it on every rank. The interval figures (batch shift, clip
        fraction) cover everything since the previous call, over all ranks.

        Args:
            step: the step to log at, e.g. the loop's environment step count.

        Returns:
            The scalars logged (on every rank), by tag.
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise TypeError(f"`step` must be a non-negative int, got {check.show(step)}.")
        return self.telemetry.log(
            self._fabric.loggers, step, is_global_zero=self._fabric.is_global_zero
        )

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint state: statistics, settings, telemetry and every rank's returns.

        A collective under DDP (``fabric.save`` calls it on every rank), in the layout of the
        callback's state, so :func:`rlnorm.load_normalizers` reads a Fabric checkpoint too.
        """
        telemetry = self.telemetry
        saved = checkpointing.state(telemetry, self.name)
        fabric = self._fabric
        gather = None
        if fabric.world_size > 1:  # returns differ by rank, also with per-rank statistics
            gather = partial(fabric.all_gather, group=self.process_group)
        checkpointing.add_every_ranks_state(saved, telemetry, gather)
        return saved

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (each rank takes its own reward returns back).

        Raises:
            ValueError: not a normalizer state, or one that does not fit these normalizers; the
                message names it.
        """
        checkpointing.restore(
            self.telemetry,
            state,
            config=self.config,
            name=self.name,
            where=f"normalizer state {self.name!r}",
            path=None,
            owner="FabricNormalizers",
        )

    def broadcast(self, src: int = 0, group: dist.ProcessGroup | None = None) -> None:
        """Give every process of ``group`` the statistics of process ``src`` (a collective).

        For decoupled loops: the player (``src``) updates, then every process of ``group``
        (player and trainers) calls this, and the others normalize with bitwise the player's
        statistics (settings, shapes, counts; the reward returns in progress too). The others'
        telemetry is left as it is: the player logs.

        Args:
            src: global rank of the process whose statistics are sent.
            group: the process group of the player and the trainers (``None``: the world).

        Raises:
            RuntimeError: ``torch.distributed`` is not initialised.
            ValueError: the statistics received do not fit these normalizers' settings.

        Example:
            >>> norm.broadcast(src=0)  # on the player and on every trainer  # doctest: +SKIP
        """
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "FabricNormalizers.broadcast needs torch.distributed initialised (e.g. by "
                "fabric.launch() or torch.distributed.init_process_group)."
            )
        sender = dist.get_rank() == src
        box = [statistics_state(self.normalizers) if sender else None]
        dist.broadcast_object_list(box, src=src, group=group)
        if not sender:
            restore_normalizers(self.normalizers, box[0], f"statistics broadcast by rank {src}")

    def to(self, device: torch.device | str) -> FabricNormalizers:
        """Move the statistics (and the open telemetry interval) to ``device``."""
        self.normalizers.to(device)
        self.telemetry.normalizers_moved()
        return self
