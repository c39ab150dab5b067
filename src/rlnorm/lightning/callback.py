"""``NormalizerCallback``: observation and reward normalization for Lightning RL trainers."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, MutableMapping, MutableSequence, Sequence
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from rlnorm import _validation as check
from rlnorm._version import __version__
from rlnorm.algebra.drift import batch_shift, drift, per_dim_drift, summary
from rlnorm.algebra.moments import Moments
from rlnorm.lightning.telemetry import DriftHeatmap, IntervalMetrics, tensorboard_writers
from rlnorm.stats.distributed import is_distributed
from rlnorm.stats.normalizers import NormalizerConfig, Normalizers, Observation, Shape
from rlnorm.stats.schema import check_state, restore_normalizers, statistics_state, with_own_returns

__all__ = ["NormalizerCallback", "get_normalizer"]

BatchKey = str | int


class NormalizerCallback(Callback):
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
        if not isinstance(name, str):
            raise TypeError(f"`name` must be a str, got {name!r}.")
        if not name or any(c.isspace() for c in name):
            raise ValueError(f"`name` must be a non-empty string without spaces, got {name!r}.")
        self.name = name
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
        self.batch_keys = self._check_batch_keys(batch_keys)
        if update_mask_key is not None and not isinstance(update_mask_key, (str, int)):
            raise TypeError(f"`update_mask_key` must be a str or int, got {update_mask_key!r}.")
        if update_mask_key is not None and not self.batch_keys:
            raise ValueError(
                f"`update_mask_key={update_mask_key!r}` needs `batch_keys`: it selects the rows "
                "of the batch entries that statistics are learned from."
            )
        self.update_mask_key = update_mask_key
        if log_every_n_steps is not None:
            check.check_positive_int("log_every_n_steps", log_every_n_steps)
        self.log_every_n_steps = log_every_n_steps
        self.log_histograms = check.check_bool("log_histograms", log_histograms)
        self.device = check.check_device("device", device)
        self._frozen = False
        # Everything below holds tensors: created in `setup`, never in `__init__` (under
        # `ddp_spawn`, tensors made here would be shared memory between the workers).
        self._normalizers: Normalizers | None = None
        self._trainer: Trainer | None = None
        # Telemetry state, all of it checkpointed (see `state_dict`): the interval aggregates
        # (`_interval`, or `_pending_interval` until the metrics are rebuilt on the right
        # device), the statistics, step and counts of the last log, the heatmap history.
        self._interval: dict[str, IntervalMetrics] = {}
        self._pending_interval: dict[str, Tensor] = {}
        self._last_logged: dict[str, Moments] = {}
        self._last_logged_step: int | None = None
        self._logged_counts: dict[str, tuple[int, int]] = {}
        self._heatmaps: dict[str, DriftHeatmap] = {}
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
        return self._generate_state_key(name=self.name)

    @property
    def normalizers(self) -> Normalizers:
        """The :class:`~rlnorm.Normalizers` owned by this callback (after ``setup``)."""
        if self._normalizers is None:
            raise RuntimeError(
                f"NormalizerCallback(name={self.name!r}) has no normalizers yet: they are "
                "created in `setup`, when `trainer.fit(...)` (or validate/test/predict) starts. "
                "Outside a Trainer, use `rlnorm.load_normalizers(ckpt_path)`."
            )
        return self._normalizers

    @property
    def updates_enabled(self) -> bool:
        """Whether updates change the statistics now: inside the training loop, not frozen."""
        trainer = self._trainer
        return (
            not self._frozen
            and trainer is not None
            and trainer.training
            and not trainer.sanity_checking
        )

    def freeze(self) -> None:
        """Stop updating the statistics until :meth:`unfreeze` (normalizing goes on)."""
        self._frozen = True

    def unfreeze(self) -> None:
        """Resume updating the statistics (inside the training loop)."""
        self._frozen = False

    # ------------------------------------------------------------------ rollout API

    def update_obs(self, obs: Observation, mask: Tensor | None = None) -> None:
        """Fold raw observations into the statistics; call once per collected transition.

        Ignored outside the training loop, while frozen and after ``until`` samples.

        Args:
            obs: tensor ``(*batch, *obs_shape)`` or a dict of them.
            mask: optional rows to learn from, shape ``batch`` (bool or float weights).
        """
        norms = self._sync_frozen()
        batches = norms.update_obs(obs, mask)
        for key, batch in batches.items():
            metrics = self._metrics(norms.obs_tag(key))
            metrics.update_shift(batch_shift(batch, norms.obs[key].moments))

    def normalize_obs(self, obs: Observation) -> Observation:
        """Normalize observations with the current statistics (never updates them).

        Args:
            obs: tensor or dict of tensors, raw.

        Returns:
            The normalized observations, same structure.
        """
        norms = self.normalizers
        if self.config.clip is None or not self.updates_enabled:
            return norms.normalize_obs(obs)
        # In the training loop the clip fraction is logged; the counts come with the output.
        out, counts = norms.normalize_obs_counting_clipped(obs)
        for key, (clipped, values) in counts.items():
            self._metrics(norms.obs_tag(key)).add_clipped(clipped, values)
        return out

    def denormalize_obs(self, obs: Observation) -> Observation:
        """Inverse of :meth:`normalize_obs` where values were not clipped."""
        return self.normalizers.denormalize_obs(obs)

    def normalize_rewards(self, rewards: Tensor, dones: Tensor) -> Tensor:
        """Update the reward statistics (in the training loop) and scale ``rewards``.

        Call once per environment step or once per rollout ``(T, num_envs)``, before returns
        and advantages are computed.

        Args:
            rewards: ``(num_envs,)`` or ``(T, num_envs)`` raw rewards.
            dones: same shape, ``terminated | truncated``.

        Returns:
            The scaled rewards.
        """
        norms = self._sync_frozen()
        batch = norms.update_rewards(rewards, dones)
        if batch is not None:
            assert norms.reward is not None
            self._metrics("reward").update_shift(batch_shift(batch, norms.reward.stats.moments))
        out = norms.scale_rewards(rewards)
        clip = self.config.reward_clip
        if clip is not None and self.updates_enabled:
            self._metrics("reward").update_clipped(out, clip)
        return out

    def scale_rewards(self, rewards: Tensor) -> Tensor:
        """Scale rewards with the current statistics without updating them."""
        return self.normalizers.scale_rewards(rewards)

    def denormalize_rewards(self, rewards: Tensor) -> Tensor:
        """Inverse of the reward scaling where not clipped."""
        return self.normalizers.denormalize_rewards(rewards)

    # ------------------------------------------------------------------ Lightning hooks

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._trainer = trainer
        if self._normalizers is None:
            self._normalizers = Normalizers(self.config, device=self.device)
            if self._initial_state is not None:
                where = f"statistics given to {self.state_key} by `from_normalizers`"
                restore_normalizers(self._normalizers, self._initial_state, where)
        if stage == "fit":
            for ckpt in trainer.checkpoint_callbacks:
                if getattr(ckpt, "save_weights_only", False):
                    rank_zero_warn(
                        f"{type(ckpt).__name__}(save_weights_only=True) writes no callback state, "
                        f"so its checkpoints will not hold the statistics of "
                        f"NormalizerCallback(name={self.name!r}); evaluating from them would use "
                        "fresh statistics. Save full checkpoints (save_weights_only=False) to "
                        "use `rlnorm.load_normalizers`.",
                        category=UserWarning,
                    )

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        device = self.device or pl_module.device
        self.normalizers.to(device)
        # The open interval carries over (from a checkpoint or an earlier fit); its metrics are
        # rebuilt on the statistics' device when next used.
        for tag, metrics in self._interval.items():
            self._pending_interval[tag] = metrics.partials().cpu()
        self._interval.clear()
        self._last_logged = {tag: _to(m, device) for tag, m in self._last_logged.items()}

    @override
    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self.batch_keys:
            return
        # Checked before anything changes: a batch that cannot take the result is not learned.
        _check_replaceable(batch, self.batch_keys)
        mask = None if self.update_mask_key is None else _get(batch, self.update_mask_key)
        first = self.batch_keys[0]
        if self.updates_enabled:
            self.update_obs(_get(batch, first), mask)
        for key in self.batch_keys:
            # A new entry: the old tensor (maybe the dataset's own storage) stays raw.
            batch[key] = self.normalize_obs(_get(batch, key))

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
        loop = trainer.fit_loop.epoch_loop
        step = loop._batches_that_stepped
        if not trainer.loggers or every <= 0 or (step + 1) % every != 0:
            return
        if loop._should_accumulate():  # log once per optimizer step, as Lightning does
            return
        self._log(trainer, step)

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Only where the epoch's data ran out: an epoch cut short (max_steps, a stop signal)
        # ends the fit, which `on_train_end` logs.
        if trainer.fit_loop.epoch_loop._num_ready_batches_reached():
            self._log_if_changed(trainer, final=False)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log_if_changed(trainer, final=True)

    @override
    def on_load_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self.state_key in checkpoint.get("callbacks", {}):
            return
        others = [
            key
            for key, value in checkpoint.get("callbacks", {}).items()
            if isinstance(value, Mapping) and "schema_version" in value and "normalizers" in value
        ]
        hint = f" It holds normalizer state under {others}: was `name` changed?" if others else ""
        rank_zero_warn(
            f"The checkpoint holds no state for NormalizerCallback(name={self.name!r}); its "
            f"statistics start fresh.{hint}",
            category=UserWarning,
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        if self._normalizers is None:
            return {}
        # Local: no collective, so any rank may call it alone. The reward returns in it are this
        # rank's; `on_save_checkpoint` adds every rank's when Lightning writes a checkpoint.
        norms = self._normalizers
        return {
            **statistics_state(norms),
            "rlnorm_version": __version__,
            "name": self.name,
            "config": self.config.to_dict(),
            "last_logged": {tag: m._asdict() for tag, m in self._last_logged.items()},
            "telemetry": self._telemetry_state(),
        }

    @override
    def on_save_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Add what differs by rank to the state ``state_dict`` put in the checkpoint.

        Lightning calls this on every rank while writing a checkpoint (after the callbacks'
        ``state_dict``), so the collectives here, through ``trainer.strategy``, are matched:
        every rank's reward returns go to ``reward_returns_by_rank`` (each rank resumes its
        own), and the open telemetry interval is reduced over the ranks (rank zero resumes it).
        """
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        if state is None or self._normalizers is None:
            return
        norms = self._normalizers
        world_size = trainer.world_size
        if norms.reward is not None:
            returns = norms.reward.returns.detach()
            if world_size > 1:
                state["reward_returns_by_rank"] = _all_gather_uneven(trainer, returns)
            else:
                state["reward_returns_by_rank"] = [returns.cpu().clone()]
        tags = sorted(norms.named_normalizers())
        if world_size > 1 and tags:
            local = torch.stack([self._metrics(tag).partials() for tag in tags])
            gathered = trainer.strategy.all_gather(local.to(trainer.strategy.root_device))
            reduced = torch.stack(
                [gathered[..., 0].amax(0), gathered[..., 1].sum(0), gathered[..., 2].sum(0)],
                dim=-1,
            ).cpu()
            state["telemetry"]["interval"] = dict(zip(tags, reduced.unbind(0), strict=True))

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._normalizers is None:
            self._normalizers = Normalizers(self.config, device=self.device)
        where = f"state of {self.state_key}"
        path = self._resume_path()
        if path is not None:
            # torch.load does not check checksums: flipped bytes would load as wrong statistics.
            from rlnorm.io.checkpoint import check_checkpoint_file

            check_checkpoint_file(path)
            where += f" in checkpoint {path!r}"
        check_state(state_dict, where)
        rank = dist.get_rank() if is_distributed() else 0
        state_dict, warning = with_own_returns(state_dict, rank)
        if warning is not None:
            rank_zero_warn(warning, category=UserWarning)
        restore_normalizers(self._normalizers, state_dict, where=where)
        saved = state_dict.get("config", {})
        changed = {
            key: (saved[key], value)
            for key, value in self.config.to_dict().items()
            if key in saved and key != "obs_shape" and saved[key] != value
        }
        if changed:
            details = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
            rank_zero_warn(
                f"NormalizerCallback(name={self.name!r}) resumes with settings that differ from "
                f"the checkpoint's ({details}); the restored statistics are kept and the new "
                "settings apply from now on.",
                category=UserWarning,
            )
        device = self._normalizers.device
        self._last_logged = {
            tag: _to(Moments(**m), device) for tag, m in state_dict.get("last_logged", {}).items()
        }
        self._load_telemetry(state_dict.get("telemetry"))

    @override
    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exception: BaseException
    ) -> None:
        # Lightning reads the checkpoint to resume from before any hook knows its path, so a
        # damaged file fails deep inside torch. Name the file and the problem on the way out.
        path = self._resume_path()
        if path is None or path in str(exception):
            return
        from rlnorm.io.checkpoint import check_checkpoint_file

        try:
            check_checkpoint_file(path)
        except ValueError as err:
            note = f"rlnorm: cannot resume: {err}"
            if hasattr(exception, "add_note"):
                exception.add_note(note)
            else:  # Python 3.10
                rank_zero_warn(note, category=UserWarning)

    # ------------------------------------------------------------------ internals

    def _resume_path(self) -> str | None:
        """The local checkpoint file the trainer is resuming from, if any."""
        path = None if self._trainer is None else self._trainer.ckpt_path
        return str(path) if path is not None and os.path.isfile(path) else None

    def _sync_frozen(self) -> Normalizers:
        norms = self.normalizers
        norms.frozen = not self.updates_enabled
        return norms

    def _metrics(self, tag: str) -> IntervalMetrics:
        metrics = self._interval.get(tag)
        if metrics is None:
            device = self.normalizers.named_normalizers()[tag].mean.device
            metrics = self._interval[tag] = IntervalMetrics(device)
            pending = self._pending_interval.pop(tag, None)
            if pending is not None:
                metrics.load_partials(pending)
        return metrics

    def _counts(self) -> dict[str, tuple[int, int]]:
        """Samples and non-finite rows seen per statistic: equal on every rank when synced."""
        return {
            tag: (int(norm.moments.count), int(norm.nonfinite_count))
            for tag, norm in self.normalizers.named_normalizers().items()
        }

    def _telemetry_state(self) -> dict[str, Any]:
        """Everything the next logged figures depend on, besides ``last_logged``."""
        interval = dict(self._pending_interval)
        interval.update({tag: m.partials().cpu() for tag, m in self._interval.items()})
        return {
            "last_logged_step": self._last_logged_step,
            "logged_counts": {tag: list(c) for tag, c in self._logged_counts.items()},
            "interval": interval,
            "heatmaps": {tag: h.state_dict() for tag, h in self._heatmaps.items()},
        }

    def _load_telemetry(self, state: Mapping[str, Any] | None) -> None:
        """Restore :meth:`_telemetry_state`; states written before it existed start afresh."""
        self._interval.clear()
        self._pending_interval = {}
        self._heatmaps = {}
        if state is None:  # an older checkpoint: what it implies
            self._last_logged_step = None
            nonfinite = {tag: c[1] for tag, c in self._counts().items()}
            self._logged_counts = {
                tag: (int(m.count), nonfinite.get(tag, 0)) for tag, m in self._last_logged.items()
            }
            return
        step = state.get("last_logged_step")
        self._last_logged_step = None if step is None else int(step)
        self._logged_counts = {
            tag: (int(c[0]), int(c[1])) for tag, c in state.get("logged_counts", {}).items()
        }
        # The interval saved with a checkpoint is the sum over all ranks: one rank resumes it.
        rank = dist.get_rank() if is_distributed() else 0
        if rank == 0:
            self._pending_interval = {
                tag: t.detach().cpu() for tag, t in state.get("interval", {}).items()
            }
        for tag, columns in state.get("heatmaps", {}).items():
            heatmap = self._heatmaps[tag] = DriftHeatmap()
            heatmap.load_state_dict(columns)

    def _log_if_changed(self, trainer: Trainer, final: bool) -> None:
        """Log at the last step if the statistics changed since the last log, and not twice.

        The decision rests on replicated facts (the step, and the counts, agreed over the ranks
        in case they are not synced) because logging runs collectives on every rank.
        """
        if not trainer.loggers or self._normalizers is None:
            return
        step = trainer.fit_loop.epoch_loop._batches_that_stepped - 1
        if step < 0 or step == self._last_logged_step:
            return
        counts = self._counts()
        changed = any(counts[tag] != self._logged_counts.get(tag, (0, 0)) for tag in counts)
        if trainer.world_size > 1:
            changed = trainer.strategy.reduce_boolean_decision(changed, all=False)
        if changed:
            self._log(trainer, step, final=final)

    def _log(self, trainer: Trainer, step: int, final: bool = False) -> None:
        """Compute every figure (collectives included, on all ranks) and write on rank zero.

        Args:
            trainer: the trainer whose loggers receive the figures.
            step: the step to log at.
            final: the point logged where the fit ends: it reads the figures without starting
                a new interval, so that a run resumed from a checkpoint written now logs what
                an uninterrupted run logs.
        """
        metrics: dict[str, float] = {}
        histograms: dict[str, Tensor] = {}
        images: dict[str, Tensor] = {}
        for tag, norm in self.normalizers.named_normalizers().items():
            prefix = f"{self.name}/{tag}"
            state = _clone(norm.moments)
            figures = summary(state)
            last = self._last_logged.get(tag)
            if last is not None and last.mean.shape == state.mean.shape:
                figures.update(drift(last, state))
                heatmap = self._heatmaps.setdefault(tag, DriftHeatmap())
                column = per_dim_drift(last, state)
                if final:
                    image = heatmap.image(extra=column)
                else:
                    heatmap.add(column)
                    image = heatmap.image()
                if image is not None:
                    images[f"{prefix}/drift_heatmap"] = image
            figures.update(self._metrics(tag).compute(reset=not final))
            figures["nonfinite_rows"] = norm.nonfinite_count
            if not final:
                self._last_logged[tag] = state
            for key, value in figures.items():
                value = float(value)
                if value == value:  # NaN: no data in this interval
                    metrics[f"{prefix}/{key}"] = value
            histograms[f"{prefix}/mean"] = state.mean.reshape(-1)
            histograms[f"{prefix}/std"] = state.var.sqrt().reshape(-1)
        if not final:
            self._last_logged_step = step
            self._logged_counts = self._counts()
        self._write(trainer, step, metrics, histograms, images)

    @rank_zero_only
    def _write(
        self,
        trainer: Trainer,
        step: int,
        metrics: dict[str, float],
        histograms: dict[str, Tensor],
        images: dict[str, Tensor],
    ) -> None:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        if not self.log_histograms:
            return
        for writer in tensorboard_writers(trainer.loggers):
            for tag, values in histograms.items():
                if values.numel():
                    writer.add_histogram(f"{tag}_hist", values.detach().cpu(), global_step=step)
            for tag, image in images.items():
                writer.add_image(tag, image, global_step=step, dataformats="CHW")

    @staticmethod
    def _check_batch_keys(keys: BatchKey | Sequence[BatchKey] | None) -> tuple[BatchKey, ...]:
        if keys is None:
            return ()
        if isinstance(keys, (str, int)):
            keys = (keys,)
        if not isinstance(keys, Sequence) or not all(isinstance(k, (str, int)) for k in keys):
            raise TypeError(f"`batch_keys` must be a str, an int or a list of them, got {keys!r}.")
        return tuple(keys)


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
        trainer = owner._trainer
        if trainer is None:
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


def _all_gather_uneven(trainer: Trainer, tensor: Tensor) -> list[Tensor]:
    """Every rank's 1-D ``tensor`` (lengths may differ), on the CPU, through the strategy.

    A collective: call it on every rank.
    """
    device = trainer.strategy.root_device
    flat = tensor.detach().reshape(-1)
    size = torch.tensor([flat.numel()], device=device)
    sizes = [int(n) for n in trainer.strategy.all_gather(size).reshape(-1)]
    padded = torch.zeros(max(sizes), dtype=flat.dtype, device=device)
    padded[: flat.numel()] = flat
    gathered = trainer.strategy.all_gather(padded).reshape(len(sizes), -1).cpu()
    return [row[:n].clone() for row, n in zip(gathered, sizes, strict=True)]


def _clone(moments: Moments) -> Moments:
    return Moments(*(None if t is None else t.detach().clone() for t in moments))


def _to(moments: Moments, device: torch.device | None) -> Moments:
    return Moments(*(None if t is None else t.to(device) for t in moments))


def _get(batch: Any, key: BatchKey) -> Any:
    try:
        return batch[key]
    except (KeyError, IndexError, TypeError):
        available = sorted(map(str, batch)) if isinstance(batch, Mapping) else len(batch)
        raise KeyError(
            f"Batch entry {key!r} (from `batch_keys`/`update_mask_key`) is not in the batch "
            f"(a {type(batch).__name__}; entries: {available})."
        ) from None


def _check_replaceable(batch: Any, keys: Sequence[BatchKey]) -> None:
    """Raise unless ``batch`` is a container whose entries can be replaced (dict or list)."""
    if isinstance(batch, (MutableMapping, MutableSequence)):
        return
    raise TypeError(
        f"NormalizerCallback cannot normalize batch entry {keys[0]!r} (from `batch_keys`) of a "
        f"{type(batch).__name__} batch: its entries cannot be replaced, and writing into the "
        "tensor would change the data the dataset serves (normalizing it again the next epoch). "
        "Yield batches as dicts or lists (the DataLoader's default collate turns plain tuples "
        "into lists, not named tuples), or drop `batch_keys` and call "
        "`rlnorm.get_normalizer(self).normalize_obs(...)` in `training_step`."
    )
