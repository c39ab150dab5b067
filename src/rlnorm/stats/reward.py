"""``RewardNormalizer``: rewards scaled by the spread of the discounted return, per env."""

from __future__ import annotations

import threading
from typing import Any, Literal, overload

import torch
import torch.distributed as dist
from torch import Tensor, nn

from rlnorm import _validation as check
from rlnorm.algebra.moments import Moments
from rlnorm.backends.dispatch import discounted_returns
from rlnorm.stats.inputs import check_input
from rlnorm.stats.running_mean_std import RunningMeanStd

__all__ = ["RewardNormalizer"]


class RewardNormalizer(nn.Module):
    """Scale rewards so that the discounted return has unit variance.

    Keeps one discounted return per environment, ``ret = ret * gamma + r``, feeds it to a
    scalar :class:`~rlnorm.RunningMeanStd` (``stats``), and resets an environment's return
    to 0 after every step where its ``dones`` entry is true. Pass ``terminated | truncated``
    as ``dones``: a return must not run on into the next episode, whichever way the episode
    ended (time-limit truncation only matters for value bootstrapping, not for this scale).

    - ``mode="return"`` (default) divides rewards by the standard deviation of the discounted
      return, without subtracting a mean: the Stable-Baselines3 ``VecNormalize`` and
      Gymnasium ``NormalizeReward`` convention, so numbers match after migrating. The sign of
      every reward is kept, which matters for termination penalties and sparse rewards.
    - ``mode="reward"`` standardizes rewards by the running mean and std of the rewards
      themselves.

    The per-environment returns are a buffer, so they are part of ``state_dict`` and a
    resumed run continues exactly where it stopped. Rewards that are NaN or Inf leave their
    environment's return unchanged, are left out of the statistics and counted in
    ``stats.nonfinite_count`` (or raise, with ``nonfinite="raise"``, before anything changes).

    Args:
        num_envs: number of parallel environments.
        gamma: discount of the return, in ``[0, 1]``; use the agent's own discount.
        clip: normalized rewards are clamped to ``[-clip, clip]``; ``None`` disables it.
        epsilon: added to the variance before the square root.
        mode: ``"return"`` or ``"reward"``, see above.
        momentum: ``None`` for exact statistics, or an EMA weight in ``[0, 1)``.
        nonfinite: ``"skip"`` or ``"raise"``, as in :class:`~rlnorm.RunningMeanStd`.
        sync: reduce updates over ``torch.distributed`` when it is initialised.
        process_group: the group to reduce over; ``None`` is the default group.
        prior_weight: weight of a fake prior (mean 0, variance 1) the statistics start from;
            ``1e-4`` reproduces Stable-Baselines3 and Gymnasium (see
            :class:`~rlnorm.RunningMeanStd`), ``0.0`` (default) is none.
        device: where the statistics and returns live.

    Example:
        >>> import torch
        >>> from rlnorm import RewardNormalizer
        >>> norm = RewardNormalizer(num_envs=2, gamma=0.9)
        >>> rewards = torch.tensor([[1.0, 0.0], [1.0, 2.0], [1.0, 0.0]])  # (T, num_envs)
        >>> dones = torch.tensor([[False, False], [True, False], [False, False]])
        >>> _ = norm.update(rewards, dones)
        >>> norm.returns.tolist()  # env 0 reset after step 1, env 1 carries on
        [1.0, 1.8]
        >>> scaled = norm.normalize(rewards)  # rewards / std of the returns seen
    """

    returns: Tensor

    def __init__(
        self,
        num_envs: int,
        *,
        gamma: float = 0.99,
        clip: float | None = 10.0,
        epsilon: float = 1e-8,
        mode: str = "return",
        momentum: float | None = None,
        nonfinite: str = "skip",
        sync: bool = True,
        process_group: dist.ProcessGroup | None = None,
        prior_weight: float = 0.0,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.num_envs = check.check_positive_int("num_envs", num_envs)
        self.gamma = check.check_float("gamma", gamma, low=0.0, high=1.0)
        self.mode = check.check_choice("mode", mode, ("return", "reward"))
        device = check.check_device("device", device)
        self.stats = RunningMeanStd(
            (),
            momentum=momentum,
            clip=clip,
            epsilon=epsilon,
            center=self.mode == "reward",
            nonfinite=nonfinite,
            sync=sync,
            process_group=process_group,
            prior_weight=prior_weight,
            device=device,
        )
        with torch.inference_mode(False):  # updatable even when built in inference mode
            returns = torch.zeros(num_envs, dtype=torch.float64, device=device)
        self.register_buffer("returns", returns)
        # The returns and the statistics advance together: one update at a time.
        self._lock = threading.RLock()

    @property
    def clip(self) -> float | None:
        """Clamp bound of normalized rewards."""
        return self.stats.clip

    @property
    def epsilon(self) -> float:
        """Added to the variance before the square root."""
        return self.stats.epsilon

    @property
    def prior_weight(self) -> float:
        """Weight of the prior the statistics start from (0: none)."""
        return self.stats.prior_weight

    @property
    def std(self) -> Tensor:
        """The scale rewards are divided by, before ``epsilon`` (a float64 0-d tensor)."""
        return self.stats.std

    @property
    def count(self) -> Tensor:
        """Number of values (returns or rewards) the statistics were computed from."""
        return self.stats.count

    @torch.no_grad()
    def update(self, rewards: Tensor, dones: Tensor) -> Moments:
        """Advance the returns by one step or a rollout and update the statistics.

        A rollout ``(T, num_envs)`` is one update of the statistics (which matters only in
        EMA mode); the returns step through it in order, resetting after each done.

        Args:
            rewards: shape ``(num_envs,)`` for one step or ``(T, num_envs)`` for a rollout.
            dones: same shape as ``rewards``, bool (or 0/1): ``terminated | truncated``.

        Returns:
            The moments of the values the statistics were fed (returns or rewards).

        Raises:
            ValueError: on a shape or device mismatch, or with ``nonfinite="raise"`` on a
                non-finite reward (nothing is changed then).
            TypeError: ``rewards`` or ``dones`` is not a tensor, a NumPy array or numbers.

        Updates from several threads are serialized.
        """
        steps, dones = self._check(rewards, dones)
        with self._lock:
            return self._update(steps, dones)

    def _update(self, steps: Tensor, dones: Tensor) -> Moments:
        if self.mode == "reward":
            return self.stats.update(steps)
        trajectory, returns = discounted_returns(steps, dones, self.returns, self.gamma)
        # Statistics first: with nonfinite="raise" they raise before the returns move.
        batch = self.stats.update(trajectory)
        self.returns.copy_(returns)
        return batch

    @overload
    def normalize(self, rewards: Tensor, *, return_clipped: Literal[False] = False) -> Tensor: ...

    @overload
    def normalize(
        self, rewards: Tensor, *, return_clipped: Literal[True]
    ) -> tuple[Tensor, int | Tensor]: ...

    def normalize(
        self, rewards: Tensor, *, return_clipped: bool = False
    ) -> Tensor | tuple[Tensor, int | Tensor]:
        """Scale rewards by the current statistics (identity before the first update).

        Args:
            rewards: any shape ending in ``num_envs`` (or a scalar per env).
            return_clipped: also return how many scaled rewards sit at ``+-clip`` (see
                :meth:`RunningMeanStd.normalize <rlnorm.RunningMeanStd.normalize>`).

        Returns:
            Scaled and clipped rewards in ``rewards``' dtype (and the clipped count if asked).
        """
        rewards = self._as_tensor("rewards", rewards)
        check_input("rewards", rewards, (), self.returns.device)
        return self.stats.normalize(rewards, return_clipped=return_clipped)  # type: ignore[call-overload]

    def denormalize(self, rewards: Tensor) -> Tensor:
        """Inverse of :meth:`normalize` where not clipped."""
        rewards = self._as_tensor("rewards", rewards)
        check_input("rewards", rewards, (), self.returns.device)
        return self.stats.denormalize(rewards)

    def forward(self, rewards: Tensor) -> Tensor:
        """Same as :meth:`normalize`."""
        return self.normalize(rewards)

    @torch.no_grad()
    def reset(self) -> None:
        """Forget the statistics and zero every environment's return."""
        with self._lock:
            self.stats.reset()
            self.returns.zero_()

    @torch.no_grad()
    def reset_returns(self, env_mask: Tensor | None = None) -> None:
        """Zero the running returns of some (or all) environments, e.g. after a manual reset.

        Args:
            env_mask: bool tensor of shape ``(num_envs,)``; ``None`` resets every environment.
        """
        if env_mask is None:
            self.returns.zero_()
            return
        env_mask = self._as_tensor("env_mask", env_mask)
        check.check_tensor("env_mask", env_mask, self.returns.device)
        if tuple(env_mask.shape) != (self.num_envs,):
            raise ValueError(
                f"`env_mask` must have shape ({self.num_envs},), got {tuple(env_mask.shape)}."
            )
        self.returns.masked_fill_(env_mask.to(torch.bool), 0.0)

    def _check(self, rewards: Tensor, dones: Tensor) -> tuple[Tensor, Tensor]:
        """Validate and reshape ``rewards`` and ``dones`` to ``(T, num_envs)``."""
        device = self.returns.device
        rewards = check.check_tensor("rewards", self._as_tensor("rewards", rewards), device)
        dones = check.check_tensor("dones", self._as_tensor("dones", dones), device)
        if rewards.dim() not in (1, 2) or rewards.shape[-1] != self.num_envs:
            raise ValueError(
                f"`rewards` must have shape ({self.num_envs},) or (T, {self.num_envs}) "
                f"for num_envs={self.num_envs}, got {tuple(rewards.shape)}."
            )
        if dones.shape != rewards.shape:
            raise ValueError(
                f"`dones` must have the shape of `rewards` {tuple(rewards.shape)}, "
                f"got {tuple(dones.shape)}."
            )
        return rewards.reshape(-1, self.num_envs), dones.reshape(-1, self.num_envs).to(torch.bool)

    def _apply(self, fn: Any, recurse: bool = True) -> RewardNormalizer:
        with torch.inference_mode(False):  # moves inside inference mode keep normal tensors
            return super()._apply(fn, recurse)

    def _as_tensor(self, name: str, value: Any) -> Tensor:
        """NumPy arrays and Python numbers as tensors on the returns' device."""
        if type(value) is Tensor:
            return value
        return check.as_tensor(name, value, self.returns.device)

    def __getstate__(self) -> dict[str, Any]:
        """Pickling and deep copies leave out the lock."""
        state = dict(super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__)
        state.pop("_lock", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._lock = threading.RLock()

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        returns = state_dict.get(prefix + "returns")
        if isinstance(returns, Tensor) and tuple(returns.shape) != (self.num_envs,):
            raise ValueError(
                f"Cannot load `{prefix}returns`: the state has {tuple(returns.shape)} returns, "
                f"this normalizer has num_envs={self.num_envs}."
            )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:  # noqa: D102
        return f"num_envs={self.num_envs}, gamma={self.gamma}, mode={self.mode!r}"
