"""The rollout API shared by ``NormalizerCallback`` and ``FabricNormalizers``.

Rollout code calls :meth:`~RolloutNormalizers.update_obs` once per collected transition,
:meth:`~RolloutNormalizers.normalize_obs` before the policy sees an observation and
:meth:`~RolloutNormalizers.normalize_rewards` before returns and advantages are computed. Each
call goes to the owner's :class:`~rlnorm.Normalizers` and records what the drift telemetry
needs (batch shifts, clipped values), so the Trainer and Fabric integrations log the same
figures from the same code.
"""

from __future__ import annotations

from torch import Tensor

from rlnorm.lightning.telemetry import DriftTelemetry
from rlnorm.stats.normalizers import Normalizers, Observation

__all__ = ["RolloutNormalizers"]


class RolloutNormalizers:
    """Normalizing and updating during rollouts, with the telemetry recorded as it goes.

    Subclasses provide :attr:`telemetry` (which holds the normalizers) and
    :attr:`updates_enabled`; updates are ignored while it is false, normalizing goes on.

    Example:
        >>> norm = rlnorm.get_normalizer(self)  # a NormalizerCallback  # doctest: +SKIP
        >>> norm.update_obs(raw_obs)  # doctest: +SKIP
        >>> obs = norm.normalize_obs(raw_obs)  # doctest: +SKIP
    """

    _frozen: bool = False

    @property
    def telemetry(self) -> DriftTelemetry:
        """The drift telemetry of :attr:`normalizers`."""
        raise NotImplementedError

    @property
    def normalizers(self) -> Normalizers:
        """The :class:`~rlnorm.Normalizers` in use."""
        return self.telemetry.normalizers

    @property
    def updates_enabled(self) -> bool:
        """Whether updates change the statistics now (not frozen)."""
        return not self._frozen

    def freeze(self) -> None:
        """Stop updating the statistics until :meth:`unfreeze` (normalizing goes on)."""
        self._frozen = True

    def unfreeze(self) -> None:
        """Resume updating the statistics."""
        self._frozen = False

    def update_obs(self, obs: Observation, mask: Tensor | None = None) -> None:
        """Fold raw observations into the statistics; call once per collected transition.

        Ignored while updates are disabled (see :attr:`updates_enabled`) and after ``until``
        samples.

        Args:
            obs: tensor ``(*batch, *obs_shape)`` or a dict of them (NumPy arrays too).
            mask: optional rows to learn from, shape ``batch`` (bool or float weights).
        """
        norms = self._sync_frozen()
        self.telemetry.record_obs_update(norms.update_obs(obs, mask))

    def normalize_obs(self, obs: Observation) -> Observation:
        """Normalize observations with the current statistics (never updates them).

        Args:
            obs: tensor or dict of tensors, raw.

        Returns:
            The normalized observations, same structure.
        """
        telemetry = self.telemetry
        norms = telemetry.normalizers
        # While learning, the clip fraction is logged; the counts come with the output.
        counting = norms.config.clip is not None and self.updates_enabled
        if type(obs) is Tensor and norms.dict_obs is False:
            # The per-step call of every rollout or evaluation (one tensor normalizer), in the
            # fewest Python calls (each costs about a microsecond there): what
            # `Normalizers.normalize_obs` (`normalize_obs_counting_clipped` and
            # `record_obs_clipped` when counting) do for one key.
            normalizer, interval = telemetry.tensor_obs()
            if not counting:
                return normalizer.normalize(obs)
            out, clipped = normalizer.normalize(obs, return_clipped=True)
            interval.add_clipped(clipped, out.numel())
            return out
        if not counting:
            return norms.normalize_obs(obs)
        out, counts = norms.normalize_obs_counting_clipped(obs)
        telemetry.record_obs_clipped(counts)
        return out

    def denormalize_obs(self, obs: Observation) -> Observation:
        """Inverse of :meth:`normalize_obs` where values were not clipped."""
        return self.normalizers.denormalize_obs(obs)

    def normalize_rewards(self, rewards: Tensor, dones: Tensor) -> Tensor:
        """Update the reward statistics (while updates are enabled) and scale ``rewards``.

        Call once per environment step or once per rollout ``(T, num_envs)``, before returns
        and advantages are computed.

        Args:
            rewards: ``(num_envs,)`` or ``(T, num_envs)`` raw rewards.
            dones: same shape, ``terminated | truncated``.

        Returns:
            The scaled rewards.
        """
        norms = self._sync_frozen()
        telemetry = self.telemetry
        telemetry.record_reward_update(norms.update_rewards(rewards, dones))
        if norms.config.reward_clip is None or norms.frozen:
            return norms.scale_rewards(rewards)
        out, clipped = norms.scale_rewards(rewards, return_clipped=True)
        telemetry.record_reward_clipped(clipped, out.numel())
        return out

    def scale_rewards(self, rewards: Tensor) -> Tensor:
        """Scale rewards with the current statistics without updating them."""
        return self.normalizers.scale_rewards(rewards)

    def denormalize_rewards(self, rewards: Tensor) -> Tensor:
        """Inverse of the reward scaling where not clipped."""
        return self.normalizers.denormalize_rewards(rewards)

    def _sync_frozen(self) -> Normalizers:
        norms = self.normalizers
        frozen = not self.updates_enabled
        if norms.frozen is not frozen:  # `nn.Module.__setattr__` is slow: set on change only
            norms.frozen = frozen
        return norms
