"""``NormalizerCallback``: observation and reward normalization for Lightning RL trainers."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import RunningStage
from typing_extensions import override

from rlnorm import _validation as check
from rlnorm.lightning import checkpointing, loop
from rlnorm.lightning.batches import (
    BatchKey,
    check_batch_keys,
    check_update_mask_key,
    normalize_entries,
)
from rlnorm.lightning.rollout import RolloutNormalizers
from rlnorm.lightning.telemetry import DriftTelemetry, check_name
from rlnorm.stats.normalizers import NormalizerConfig, Normalizers, Shape
from rlnorm.stats.schema import restore_normalizers, statistics_state

__all__ = ["NormalizerCallback", "get_normalizer"]


class NormalizerCallback(RolloutNormalizers, Callback):
    r"""Owns an agent's observation and reward normalizers during Lightning training.

    The callback creates the normalizers in ``setup``, keeps them out of the module (so DDP's
    buffer broadcast cannot overwrite them) and identical on every rank (each update is
    reduced over ``torch.distributed``), freezes them outside the training loop (validation,
    test, predict, the sanity check) and after ``until`` samples, logs drift metrics under
    ``<name>/obs/...`` and ``<name>/reward/...`` every ``log_every_n_steps``, at the end of
    every training epoch and at the end of ``fit`` (whenever the statistics changed since the
    last log), and saves its state in checkpoints so that resuming, evaluating
    (:func:`rlnorm.load_normalizers`) and exporting use exactly the statistics the policy was
    trained with, and a resumed run logs exactly the telemetry of an uninterrupted one.

    Rollout code reaches it with one line, ``norm = rlnorm.get_normalizer(self)``, and calls
    :meth:`update_obs` once per collected transition, :meth:`normalize_obs` before the policy
    sees an observation, and :meth:`normalize_rewards` (update and scale in one step) before
    returns and advantages are computed. Modules whose batches still carry raw observations
    can instead name the entries in ``batch_keys``: they are updated from and normalized in
    ``on_train_batch_start``, before ``training_step`` sees the batch. The callback replaces
    the entries of the batch (a dict or a list) and never writes into the tensors, which may
    be the dataset's own storage; batches whose entries cannot be replaced (tuples, named
    tuples) raise a ``TypeError``.

    Args:
        obs_shape: feature shape of one observation; a dict of shapes for dict observations;
            ``None`` infers it from the first observation (or from a loaded checkpoint).
        name: distinguishes several instances: it prefixes every logged tag and is part of
            ``state_key``.
        obs_feature_dims: when inferring ``obs_shape``, how many trailing dims are features.
        momentum: ``None`` for exact statistics, or an EMA momentum in ``[0, 1)``.
        clip: clamp bound of normalized observations (``None``: none).
        epsilon: added to the variance before the square root.
        until: stop updating observation statistics after this many samples.
        center: subtract the running mean (``False``: only divide by the running std).
        var_floor: EMA only: keep the variance at least this fraction of the latest batch's
            second moment around the running mean.
        reward: also own a reward normalizer (see :class:`~rlnorm.RewardNormalizer`).
        num_envs: environments of the reward normalizer; inferred from the first rewards.
        gamma: discount of the return rewards are scaled by (use the agent's).
        reward_clip: clamp bound of scaled rewards (``None``: none).
        reward_mode: ``"return"`` divides by the std of the discounted return (SB3 and
            Gymnasium convention); ``"reward"`` standardizes rewards.
        nonfinite: ``"skip"`` leaves NaN/Inf rows out and counts them; ``"raise"`` raises.
        sync: reduce updates over ``torch.distributed`` (off only for per-rank statistics).
        prior_weight: weight of a fake prior (mean 0, variance 1) every statistic starts
            from; ``1e-4`` reproduces Stable-Baselines3 ``VecNormalize``, ``0.0`` is none.
        batch_keys: batch entries (dict keys or list indices) holding raw observations
            to update from and normalize in ``on_train_batch_start``. Statistics are learned
            from the first entry only; further ones (e.g. ``"next_obs"``) are normalized with
            the same statistics.
        update_mask_key: batch entry with a per-row bool mask of the rows to learn from, for
            datasets that serve each transition several times (PPO epochs, replay buffers):
            set it ``True`` on a transition's first pass only.
        log_every_n_steps: logging interval in optimizer steps; ``None`` uses the trainer's.
            Whatever the interval, the figures are also logged at the end of each training
            epoch and at the end of ``fit`` if the statistics changed since the last log.
        log_histograms: with a TensorBoard logger, also write histograms of the per-dimension
            mean and std and a drift heatmap image.
        device: where the statistics live; ``None`` follows the LightningModule's device.

    Example:
        >>> import rlnorm
        >>> from lightning.pytorch import Trainer
        >>> callback = rlnorm.NormalizerCallback(obs_shape=4, reward=True, gamma=0.99)
        >>> trainer = Trainer(callbacks=[callback], logger=False, enable_progress_bar=False)
        >>> callback.state_key
        "NormalizerCallback{'name': 'rlnorm'}"
    """

    # Hooks Lightning calls around every optimizer step or evaluation batch that this callback
    # has no use for. Lightning skips a callback's hook that is not callable, and dispatching
    # one costs several microseconds (a profiler context, the callback's state key): about 1%
    # of a small PPO loop on the CPU. A subclass that needs one defines it as usual.
    on_before_backward = None  # type: ignore[assignment]
    on_after_backward = None  # type: ignore[assignment]
    on_before_optimizer_step = None  # type: ignore[assignment]
    on_before_zero_grad = None  # type: ignore[assignment]
    on_validation_batch_start = None  # type: ignore[assignment]
    on_validation_batch_end = None  # type: ignore[assignment]
    on_test_batch_start = None  # type: ignore[assignment]
    on_test_batch_end = None  # type: ignore[assignment]
    on_predict_batch_start = None  # type: ignore[assignment]
    on_predict_batch_end = None  # type: ignore[assignment]

    def __init__(
        self,
        obs_shape: Shape | dict[str, Shape] | None = None,
        *,
        name: str = "rlnorm",
        obs_feature_dims: int = 1,
        momentum: float | None = None,
        clip: float | None = 10.0,
        epsilon: float = 1e-8,
        until: int | None = None,
        center: bool = True,
        var_floor: float | None = None,
        reward: bool = False,
        num_envs: int | None = None,
        gamma: float = 0.99,
        reward_clip: float | None = 10.0,
        reward_mode: str = "return",
        nonfinite: str = "skip",
        sync: bool = True,
        prior_weight: float = 0.0,
        batch_keys: BatchKey | Sequence[BatchKey] | None = None,
        update_mask_key: BatchKey | None = None,
        log_every_n_steps: int | None = None,
        log_histograms: bool = True,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.name = check_name(name)
        self._state_key = ("", "")  # (name, key) of the last `state_key`
        self.config = NormalizerConfig(
            obs_shape=obs_shape,
            obs_feature_dims=obs_feature_dims,
            momentum=momentum,
            clip=clip,
            epsilon=epsilon,
            until=until,
            center=center,
            var_floor=var_floor,
            reward=reward,
            num_envs=num_envs,
            gamma=gamma,
            reward_clip=reward_clip,
            reward_mode=reward_mode,
            nonfinite=nonfinite,
            sync=sync,
            prior_weight=prior_weight,
        )
        self.batch_keys = check_batch_keys(batch_keys)
        self.update_mask_key = check_update_mask_key(update_mask_key, self.batch_keys)
        if log_every_n_steps is not None:
            check.check_positive_int("log_every_n_steps", log_every_n_steps)
        self.log_every_n_steps = log_every_n_steps
        self.log_histograms = check.check_bool("log_histograms", log_histograms)
        self.device = check.check_device("device", device)
        self._frozen = False
        # Everything below holds tensors: created in `setup`, never in `__init__` (under
        # `ddp_spawn`, tensors made here would be shared memory between the workers).
        # The normalizers are created with their telemetry (`_create_normalizers`), which holds
        # them: `self.normalizers` is `self.telemetry.normalizers`.
        self._telemetry: DriftTelemetry | None = None
        self._trainer: Trainer | None = None
        # Statistics to start from (`from_normalizers`), loaded at `setup`.
        self._initial_state: dict[str, Any] | None = None

    # ------------------------------------------------------------------ identity

    @classmethod
    def from_normalizers(cls, normalizers: Normalizers, **kwargs: Any) -> NormalizerCallback:
        """A callback that trains on from existing statistics, e.g. migrated from SB3 or Gymnasium.

        The normalizer settings are ``normalizers.config``; the statistics (and the reward
        returns) are copied now and loaded into the callback's own normalizers at ``setup``. A
        checkpoint resumed later replaces them, as usual.

        Args:
            normalizers: the statistics to start from.
            **kwargs: the callback's own arguments: ``name``, ``batch_keys``,
                ``update_mask_key``, ``log_every_n_steps``, ``log_histograms``, ``device``.

        Example:
            >>> norms = rlnorm.load_sb3_vecnormalize("vec_normalize.pkl")  # doctest: +SKIP
            >>> callback = NormalizerCallback.from_normalizers(norms, name="obs")  # doctest: +SKIP
        """
        check.check_instance("normalizers", normalizers, Normalizers)
        fields = [f.name for f in dataclasses.fields(NormalizerConfig)]
        settings = sorted(set(kwargs) & set(fields))
        if settings:
            raise TypeError(
                f"`{settings[0]}` comes from `normalizers.config` in "
                "NormalizerCallback.from_normalizers; pass only the callback's own arguments "
                f"(got {sorted(kwargs)})."
            )
        callback = cls(**{name: getattr(normalizers.config, name) for name in fields}, **kwargs)
        # Copied now, loaded at `setup`: no tensor is shared with the caller's normalizers.
        callback._initial_state = statistics_state(normalizers)
        return callback

    @property
    @override
    def state_key(self) -> str:
        # Lightning reads it at every hook it dispatches: built once per name.
        name, key = self.__dict__.get("_state_key", ("", ""))
        if name != self.name:
            key = self._generate_state_key(name=self.name)
            self._state_key = (self.name, key)
        return key

    @property
    def telemetry(self) -> DriftTelemetry:
        """The :class:`~rlnorm.lightning.telemetry.DriftTelemetry` of :attr:`normalizers`."""
        if self._telemetry is None:
            raise self._not_set_up()
        return self._telemetry

    @property
    def updates_enabled(self) -> bool:
        """Whether updates change the statistics now: inside the training loop, not frozen."""
        trainer = self._trainer
        if self._frozen or trainer is None:
            return False
        # Asked before every normalize: the training stage by identity first (Lightning sets the
        # enum member itself), as `trainer.training` compares strings case-insensitively.
        stage = trainer.state.stage
        if stage is RunningStage.TRAINING:
            return True
        if stage is None or type(stage) is RunningStage:  # another member: not training
            return False
        return trainer.training and not trainer.sanity_checking

    # ------------------------------------------------------------------ Lightning hooks

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._trainer = trainer
        if self._telemetry is None:
            norms = self._create_normalizers()
            if self._initial_state is not None:
                where = f"statistics given to {self.state_key} by `from_normalizers`"
                restore_normalizers(norms, self._initial_state, where)
        if stage == "fit":
            checkpointing.warn_if_weights_only(trainer, self.name)

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.normalizers.to(self.device or pl_module.device)
        self.telemetry.normalizers_moved()

    @override
    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.batch_keys:
            update = self.update_obs if self.updates_enabled else None
            normalize_entries(
                batch, self.batch_keys, self.update_mask_key, self.normalize_obs, update
            )

    @override
    def on_train_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        every = self.log_every_n_steps or trainer.log_every_n_steps
        step = loop.logging_step(trainer)
        if not trainer.loggers or every <= 0 or (step + 1) % every != 0:
            return
        if loop.optimizer_steps_after_batch(trainer):  # once per optimizer step, as Lightning
            self.telemetry.log(trainer.loggers, step, is_global_zero=trainer.is_global_zero)

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Only where the epoch's data ran out: an epoch cut short (max_steps, a stop signal)
        # ends the fit, which `on_train_end` logs.
        if loop.epoch_data_ran_out(trainer):
            self._log_if_changed(trainer, final=False)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log_if_changed(trainer, final=True)

    @override
    def on_load_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpointing.warn_if_no_state(checkpoint, self.state_key, self.name)

    @override
    def state_dict(self) -> dict[str, Any]:
        # Local: no collective, so any rank may call it alone.
        return {} if self._telemetry is None else checkpointing.state(self._telemetry, self.name)

    @override
    def on_save_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Lightning calls this on every rank while writing a checkpoint (after the callbacks'
        # `state_dict`), so the collectives adding what differs by rank are matched.
        saved = checkpoint.get("callbacks", {}).get(self.state_key)
        if saved is not None and self._telemetry is not None:
            gather = partial(loop.all_gather, trainer) if trainer.world_size > 1 else None
            checkpointing.add_every_ranks_state(saved, self._telemetry, gather)

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._telemetry is None:
            self._create_normalizers()
        checkpointing.restore(
            self.telemetry,
            state_dict,
            config=self.config,
            name=self.name,
            where=f"state of {self.state_key}",
            path=checkpointing.resume_path(self._trainer),
        )

    @override
    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exception: BaseException
    ) -> None:
        checkpointing.note_damaged_file(checkpointing.resume_path(trainer), exception)

    # ------------------------------------------------------------------ internals

    def _not_set_up(self) -> RuntimeError:
        return RuntimeError(
            f"NormalizerCallback(name={self.name!r}) has no normalizers yet: they are "
            "created in `setup`, when `trainer.fit(...)` (or validate/test/predict) starts. "
            "Outside a Trainer, use `rlnorm.load_normalizers(ckpt_path)`."
        )

    def _create_normalizers(self) -> Normalizers:
        norms = Normalizers(self.config, device=self.device)
        self._telemetry = DriftTelemetry(norms, name=self.name, histograms=self.log_histograms)
        return norms

    def _log_if_changed(self, trainer: Trainer, final: bool) -> None:
        """Log where an epoch or the fit ends, if the statistics changed since the last log."""
        if self._telemetry is not None:
            self._telemetry.log_if_changed(
                trainer.loggers,
                loop.logging_step(trainer) - 1,  # the last batch's: the count is past it now
                is_global_zero=trainer.is_global_zero,
                final=final,
                any_rank=partial(loop.any_rank, trainer),
            )


def get_normalizer(owner: Trainer | LightningModule, name: str | None = None) -> NormalizerCallback:
    """The :class:`NormalizerCallback` attached to a trainer, the one line rollout code needs.

    Args:
        owner: the ``Trainer``, or a ``LightningModule`` attached to one (pass ``self``).
        name: which instance, when several are attached.

    Returns:
        The callback.

    Raises:
        LookupError: none (or no single one) is attached; the message says how to attach it.

    Example:
        >>> import rlnorm
        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[rlnorm.NormalizerCallback(4)], logger=False)
        >>> rlnorm.get_normalizer(trainer).name
        'rlnorm'
    """
    if isinstance(owner, LightningModule):
        try:
            trainer = owner.trainer
        except RuntimeError:  # not attached to a Trainer
            trainer = None
        if not isinstance(trainer, Trainer):  # none, or Fabric's stand-in
            raise LookupError(
                f"{type(owner).__name__} is not attached to a Trainer, so it has no "
                "NormalizerCallback; outside training use `rlnorm.load_normalizers(ckpt_path)`."
            )
    elif isinstance(owner, Trainer):
        trainer = owner
    else:
        raise TypeError(f"`owner` must be a Trainer or LightningModule, got {check.show(owner)}.")
    found = [cb for cb in trainer.callbacks if isinstance(cb, NormalizerCallback)]
    if name is not None:
        found = [cb for cb in found if cb.name == name]
    if len(found) == 1:
        return found[0]
    if not found:
        which = "" if name is None else f" with name={name!r}"
        raise LookupError(
            f"No NormalizerCallback{which} is attached to the Trainer: pass "
            "`Trainer(callbacks=[rlnorm.NormalizerCallback(...)])` or return it from "
            "`LightningModule.configure_callbacks`."
        )
    names = [cb.name for cb in found]
    raise LookupError(f"Several NormalizerCallbacks are attached ({names}); pass `name=`.")
