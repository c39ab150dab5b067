"""``Normalizers``: the observation and reward normalizers of one agent, with their config.

This is what :class:`~rlnorm.NormalizerCallback` owns during training and what
:func:`~rlnorm.load_normalizers` returns for evaluation and deployment, so both sides apply
the statistics the same way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal, overload

import torch
import torch.distributed as dist
from torch import Tensor, nn

from rlnorm import _validation as check
from rlnorm.algebra.moments import Moments
from rlnorm.stats.reward import RewardNormalizer
from rlnorm.stats.running_mean_std import RunningMeanStd

__all__ = ["NormalizerConfig", "Normalizers", "Observation"]

Shape = int | tuple[int, ...]
#: An observation: one tensor, or a mapping of named tensors (dict observations).
Observation = Tensor | Mapping[str, Tensor]

#: Name of the single normalizer when observations are plain tensors.
TENSOR_KEY = "obs"
#: Weight of the prior Stable-Baselines3 and Gymnasium start their statistics from.
SB3_PRIOR_WEIGHT = 1e-4


@dataclasses.dataclass(frozen=True)
class NormalizerConfig:
    """Settings of an agent's normalizers; stored in checkpoints next to the statistics.

    Attributes:
        obs_shape: feature shape of one observation, a dict of shapes for dict observations,
            or ``None`` to infer it from the first observation seen.
        obs_feature_dims: when inferring, how many trailing dims are features (1 for vectors,
            3 for images).
        momentum: ``None`` for exact statistics, or an EMA momentum in ``[0, 1)``.
        clip: observation clamp bound (``None``: no clamp).
        epsilon: added to the variance before the square root.
        until: stop updating observation statistics after this many samples.
        center: subtract the mean from observations (``False``: scale only).
        var_floor: EMA only: lower bound of the variance relative to the latest batch.
        reward: own a reward normalizer.
        num_envs: number of environments of the reward normalizer (inferred when ``None``).
        gamma: discount of the return the rewards are scaled by.
        reward_clip: clamp bound of scaled rewards (``None``: no clamp).
        reward_mode: ``"return"`` (divide by the return's std) or ``"reward"`` (standardize).
        nonfinite: ``"skip"`` NaN/Inf rows (counted) or ``"raise"``.
        sync: reduce updates over ``torch.distributed`` when it is initialised.
        prior_weight: weight of a fake prior (mean 0, variance 1) that every statistic starts
            from; ``0.0`` is none. :meth:`sb3_compatible` sets Stable-Baselines3's ``1e-4``.
    """

    obs_shape: Shape | dict[str, Shape] | None = None
    obs_feature_dims: int = 1
    momentum: float | None = None
    clip: float | None = 10.0
    epsilon: float = 1e-8
    until: int | None = None
    center: bool = True
    var_floor: float | None = None
    reward: bool = False
    num_envs: int | None = None
    gamma: float = 0.99
    reward_clip: float | None = 10.0
    reward_mode: str = "return"
    nonfinite: str = "skip"
    sync: bool = True
    prior_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.obs_shape is not None:
            if isinstance(self.obs_shape, Mapping):
                if not self.obs_shape:
                    raise ValueError("`obs_shape` must not be an empty dict, got {}.")
                shapes = {
                    str(k): check.check_shape(f"obs_shape[{k!r}]", v)
                    for k, v in self.obs_shape.items()
                }
                object.__setattr__(self, "obs_shape", shapes)
            else:
                object.__setattr__(
                    self, "obs_shape", check.check_shape("obs_shape", self.obs_shape)
                )
        check.check_positive_int("obs_feature_dims", self.obs_feature_dims)
        if self.num_envs is not None:
            check.check_positive_int("num_envs", self.num_envs)
        if not isinstance(self.reward, bool):
            raise TypeError(f"`reward` must be a bool, got {self.reward!r}.")
        if self.reward_clip is not None:
            check.check_float("reward_clip", self.reward_clip, low=0.0, low_open=True)
        check.check_choice("reward_mode", self.reward_mode, ("return", "reward"))
        object.__setattr__(
            self, "prior_weight", check.check_float("prior_weight", self.prior_weight, low=0.0)
        )
        # Building throwaway normalizers runs their own argument checks, messages included.
        self.make_obs(())
        self.make_reward(1)

    def make_obs(
        self,
        shape: tuple[int, ...],
        device: torch.device | None = None,
        process_group: dist.ProcessGroup | None = None,
    ) -> RunningMeanStd:
        """A fresh observation normalizer of ``shape`` with these settings."""
        return RunningMeanStd(
            shape,
            momentum=self.momentum,
            clip=self.clip,
            epsilon=self.epsilon,
            until=self.until,
            center=self.center,
            var_floor=self.var_floor,
            nonfinite=self.nonfinite,
            sync=self.sync,
            process_group=process_group,
            prior_weight=self.prior_weight,
            device=device,
        )

    def make_reward(
        self,
        num_envs: int,
        device: torch.device | None = None,
        process_group: dist.ProcessGroup | None = None,
    ) -> RewardNormalizer:
        """A fresh reward normalizer for ``num_envs`` environments with these settings."""
        return RewardNormalizer(
            num_envs,
            gamma=self.gamma,
            clip=self.reward_clip,
            epsilon=self.epsilon,
            mode=self.reward_mode,
            nonfinite=self.nonfinite,
            sync=self.sync,
            process_group=process_group,
            prior_weight=self.prior_weight,
            device=device,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain Python values only, so ``torch.load(weights_only=True)`` reads them back."""
        out = dataclasses.asdict(self)
        shape = out["obs_shape"]
        if isinstance(shape, dict):
            out["obs_shape"] = {k: list(v) for k, v in shape.items()}
        elif shape is not None:
            out["obs_shape"] = list(shape)
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> NormalizerConfig:
        """Inverse of :meth:`to_dict`.

        Unknown keys (from newer versions) are ignored; missing ones (from older versions,
        e.g. ``prior_weight``) take their defaults, so old checkpoints keep loading.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in values.items() if k in known}
        shape = kwargs.get("obs_shape")
        if isinstance(shape, Mapping):
            kwargs["obs_shape"] = {k: tuple(v) for k, v in shape.items()}
        elif isinstance(shape, list):
            kwargs["obs_shape"] = tuple(shape)
        return cls(**kwargs)

    @classmethod
    def sb3_compatible(cls, **overrides: Any) -> NormalizerConfig:
        """Settings that reproduce Stable-Baselines3 ``VecNormalize`` step for step.

        SB3's statistics start from a prior of weight ``1e-4`` at mean 0 and variance 1
        (``prior_weight=1e-4``), observations become ``clip((obs - mean) / sqrt(var + eps),
        ±clip_obs)`` and rewards ``clip(r / sqrt(var_ret + eps), ±clip_reward)``, where the
        per-environment return ``ret = ret * gamma + r`` is updated before the reward is
        scaled and reset to 0 after a done; the defaults are ``clip_obs = clip_reward = 10``,
        ``gamma=0.99`` and ``epsilon=1e-8``. Fed the same stream (``update_obs`` with every
        observation SB3 updates with, reset observations included, then ``normalize_obs``;
        ``normalize_rewards(rewards, dones)`` each step) rlnorm's outputs match SB3's to
        float rounding. Statistics stay exact float64 with rlnorm's NaN handling.

        Args:
            **overrides: any :class:`NormalizerConfig` field, e.g. ``obs_shape``,
                ``num_envs``, ``gamma``, ``clip`` (SB3's ``clip_obs``), ``reward_clip``
                (``clip_reward``), ``epsilon``, ``reward`` (``norm_reward``).

        Returns:
            The config: exact statistics, ``prior_weight=1e-4``, ``reward=True``,
            ``reward_mode="return"``, SB3's clip, gamma and epsilon, then the overrides.

        Raises:
            TypeError: an override is not a field of :class:`NormalizerConfig`.

        Example:
            >>> from rlnorm import NormalizerConfig, Normalizers
            >>> config = NormalizerConfig.sb3_compatible(obs_shape=4, num_envs=8, gamma=0.98)
            >>> config.prior_weight, config.clip, config.reward_clip, config.reward
            (0.0001, 10.0, 10.0, True)
            >>> norms = Normalizers(config)
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(
                f"`sb3_compatible` got unknown setting(s) {unknown}; valid ones are "
                f"{sorted(known)}."
            )
        values: dict[str, Any] = {
            "momentum": None,
            "clip": 10.0,
            "epsilon": 1e-8,
            "center": True,
            "reward": True,
            "gamma": 0.99,
            "reward_clip": 10.0,
            "reward_mode": "return",
            "prior_weight": SB3_PRIOR_WEIGHT,
        }
        values.update(overrides)
        return cls(**values)


class ObservationNormalizers(nn.ModuleDict):
    """The observation normalizers by key; for tensor observations, also the one normalizer.

    Dict observations have one :class:`~rlnorm.RunningMeanStd` per key: ``obs["position"]``.
    Tensor observations have a single one (under the key ``"obs"``), whose statistics read
    directly: ``obs.mean``, ``obs.var``, ``obs.std``, ``obs.count``, ``obs.shape``, ...
    """

    #: Attributes of the single normalizer that read through for tensor observations.
    STATISTICS = frozenset(
        {
            "mean",
            "var",
            "std",
            "count",
            "weight_sum",
            "nonfinite_count",
            "mean_residual",
            "moments",
            "shape",
            "numel",
            "clip",
            "epsilon",
            "momentum",
            "center",
            "until",
            "prior_weight",
        }
    )

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name not in ObservationNormalizers.STATISTICS:
                raise
        modules = self.__dict__["_modules"]
        if list(modules) == [TENSOR_KEY]:
            return getattr(modules[TENSOR_KEY], name)
        if not modules:
            raise AttributeError(
                f"No observation statistics yet, so no `obs.{name}`: the normalizers are created "
                "from the first observation (or pass `obs_shape`)."
            )
        raise AttributeError(
            f"These normalizers are for dict observations: read `obs[key].{name}` for one of "
            f"the keys {sorted(modules)}."
        )


class Normalizers(nn.Module):
    """The observation normalizer(s) and the optional reward normalizer of one agent.

    Observations are either plain tensors (one :class:`~rlnorm.RunningMeanStd`, whose
    statistics read as ``norms.obs.mean``, ``norms.obs.std``, ``norms.obs.count``) or dicts of
    tensors (one per key: ``norms.obs["position"].mean``). When ``config.obs_shape`` is
    ``None`` the normalizers are created from the first observation seen, or from a loaded
    state. Dict keys are kept in sorted order, so every rank reduces the same key in the same
    collective whatever order its dicts list them in.

    Observations, rewards and dones may be tensors, NumPy arrays or Python numbers (what
    gymnasium hands out); outputs are tensors.

    ``frozen`` normalizers ignore updates: evaluation and deployment use them as trained.

    Args:
        config: the settings.
        device: where the statistics live; ``None`` follows the buffers once they exist (the
            first observation's device when shapes are inferred), or the device of the last
            ``.to(device)``.
        process_group: the ``torch.distributed`` group updates are reduced over (``None``:
            the default group), e.g. the trainers' group of a decoupled loop.

    Example:
        >>> import torch
        >>> from rlnorm import NormalizerConfig, Normalizers
        >>> norms = Normalizers(NormalizerConfig(obs_shape=3, reward=True, num_envs=2))
        >>> _ = norms.update_obs(torch.randn(2, 3))
        >>> norms.normalize_obs(torch.randn(2, 3)).shape
        torch.Size([2, 3])
        >>> norms.normalize_rewards(torch.ones(2), torch.zeros(2, dtype=torch.bool)).shape
        torch.Size([2])
    """

    def __init__(
        self,
        config: NormalizerConfig,
        device: torch.device | str | None = None,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(config, NormalizerConfig):
            raise TypeError(f"`config` must be a NormalizerConfig, got {check.show(config)}.")
        self.config = config
        # The group updates are reduced over (not a setting: it is this run's, not saved).
        self.process_group = process_group
        self.frozen = False
        # Where statistics are created while none exist; once they do, `device` reads them.
        self._home_device = check.check_device("device", device)
        self.obs = ObservationNormalizers()
        self.dict_obs: bool | None = None
        shape = config.obs_shape
        if isinstance(shape, Mapping):
            self.ensure_obs_shapes(shape, dict_obs=True)
        elif shape is not None:
            self.ensure_obs_shapes({TENSOR_KEY: shape}, dict_obs=False)
        self.reward: RewardNormalizer | None = None
        if config.reward and config.num_envs is not None:
            self.ensure_reward(config.num_envs)

    @property
    def device(self) -> torch.device | None:
        """Where the statistics are: their buffers' device, or where they will be created.

        ``None`` until statistics exist or a device is set (by ``device=`` or ``.to()``); the
        first observation's device is then used.
        """
        for tensor in self.buffers():
            return tensor.device
        return self._home_device

    def to(self, *args: Any, **kwargs: Any) -> Normalizers:
        """Move the statistics, as ``nn.Module.to``; also sets where future ones are created."""
        device = torch._C._nn._parse_to(*args, **kwargs)[0]
        if device is not None:
            self._home_device = device
        return super().to(*args, **kwargs)

    def _apply(self, fn: Any, recurse: bool = True) -> Normalizers:
        # `.cpu()`, `.cuda()`: follow the move even before any statistics exist (as
        # torchmetrics' `Metric._apply` does), probing `fn` with an integer tensor so that
        # dtype casts (`.double()`) leave it alone.
        probe = torch.empty(0, dtype=torch.int64, device=self._home_device)
        moved = fn(probe)
        if isinstance(moved, Tensor) and moved.device != probe.device:
            self._home_device = moved.device
        return super()._apply(fn, recurse)

    # ------------------------------------------------------------------ observations

    @property
    def obs_shapes(self) -> dict[str, tuple[int, ...]]:
        """Feature shape of each observation normalizer (empty before they exist)."""
        return {key: norm.shape for key, norm in self.obs.items()}

    def update_obs(self, obs: Observation, mask: Tensor | None = None) -> dict[str, Any]:
        """Fold observations into the statistics (ignored while :attr:`frozen`).

        Args:
            obs: a tensor ``(*batch, *shape)`` or a dict of them.
            mask: optional rows to keep, of shape ``batch`` (bool or float weights).

        Returns:
            The batch moments per key (empty when frozen), for drift telemetry.
        """
        obs = self._ensure_obs(obs)
        if self.frozen:
            return {}
        return {key: self.obs[key].update(x, mask) for key, x in self._items(obs)}

    def normalize_obs(self, obs: Observation) -> Observation:
        """Normalize observations with the current statistics (never updates them).

        Args:
            obs: a tensor or a dict of tensors; dict entries without a normalizer pass
                through unchanged.

        Returns:
            The same structure, normalized.
        """
        obs = self._ensure_obs(obs)
        if not self.dict_obs:
            return self.obs[TENSOR_KEY].normalize(self._tensor(obs))
        return {k: self.obs[k].normalize(v) if k in self.obs else v for k, v in obs.items()}

    def normalize_obs_counting_clipped(
        self, obs: Observation
    ) -> tuple[Observation, dict[str, tuple[int | Tensor, int]]]:
        """:meth:`normalize_obs`, plus per normalizer key the values at ``+-clip`` and in all.

        The counts are free on the native CPU path (see
        :meth:`RunningMeanStd.normalize`'s ``return_clipped``).
        """
        if type(obs) is not Tensor or self.dict_obs is not False:  # else: the per-step case
            obs = self._ensure_obs(obs)
        if not self.dict_obs:
            y, clipped = self.obs[TENSOR_KEY].normalize(self._tensor(obs), return_clipped=True)
            return y, {TENSOR_KEY: (clipped, y.numel())}
        out: dict[str, Tensor] = {}
        counts: dict[str, tuple[int | Tensor, int]] = {}
        for key, value in obs.items():  # type: ignore[union-attr]
            if key in self.obs:
                value, clipped = self.obs[key].normalize(value, return_clipped=True)
                counts[key] = (clipped, value.numel())
            out[key] = value
        return out, counts

    def denormalize_obs(self, obs: Observation) -> Observation:
        """Inverse of :meth:`normalize_obs` where values were not clipped."""
        obs = self._ensure_obs(obs)
        if not self.dict_obs:
            return self.obs[TENSOR_KEY].denormalize(self._tensor(obs))
        return {k: self.obs[k].denormalize(v) if k in self.obs else v for k, v in obs.items()}

    # ------------------------------------------------------------------ rewards

    def normalize_rewards(self, rewards: Tensor, dones: Tensor) -> Tensor:
        """Update the reward statistics (unless frozen) and scale ``rewards``, in one step.

        Args:
            rewards: ``(num_envs,)`` or ``(T, num_envs)``.
            dones: same shape, ``terminated | truncated``.

        Returns:
            The scaled rewards.
        """
        self.update_rewards(rewards, dones)
        return self.scale_rewards(rewards)

    def update_rewards(self, rewards: Tensor, dones: Tensor) -> Moments | None:
        """Advance the returns and update the reward statistics (ignored while frozen).

        Returns:
            The moments of the values fed to the statistics, or ``None`` when frozen.
        """
        reward = self._reward_normalizer(rewards)
        return None if self.frozen else reward.update(rewards, dones)

    @overload
    def scale_rewards(
        self, rewards: Tensor, *, return_clipped: Literal[False] = False
    ) -> Tensor: ...

    @overload
    def scale_rewards(
        self, rewards: Tensor, *, return_clipped: Literal[True]
    ) -> tuple[Tensor, int | Tensor]: ...

    def scale_rewards(
        self, rewards: Tensor, *, return_clipped: bool = False
    ) -> Tensor | tuple[Tensor, int | Tensor]:
        """Scale rewards with the current statistics, without updating them.

        Args:
            rewards: any shape ending in ``num_envs``.
            return_clipped: also return how many scaled rewards sit at ``+-reward_clip``.
        """
        normalizer = self._reward_normalizer(rewards)
        return normalizer.normalize(rewards, return_clipped=return_clipped)  # type: ignore[call-overload]

    def denormalize_rewards(self, rewards: Tensor) -> Tensor:
        """Inverse of the reward scaling where not clipped."""
        return self._reward_normalizer(rewards).denormalize(rewards)

    # ------------------------------------------------------------------ state

    def freeze(self) -> Normalizers:
        """Stop updating; returns ``self``."""
        self.frozen = True
        return self

    def unfreeze(self) -> Normalizers:
        """Resume updating; returns ``self``."""
        self.frozen = False
        return self

    def obs_tag(self, key: str) -> str:
        """Telemetry name of an observation normalizer: ``obs``, or ``obs/<key>`` for dicts."""
        return f"obs/{key}" if self.dict_obs else "obs"

    def named_normalizers(self) -> dict[str, RunningMeanStd]:
        """Every running statistic by its telemetry name: ``obs``, ``obs/<key>``, ``reward``."""
        out: dict[str, RunningMeanStd] = {self.obs_tag(key): norm for key, norm in self.obs.items()}
        if self.reward is not None:
            out["reward"] = self.reward.stats
        return out

    def ensure_obs_shapes(self, obs_shapes: Mapping[str, tuple[int, ...]], dict_obs: bool) -> None:
        """Create the observation normalizers with these shapes, or check existing ones.

        Raises:
            ValueError: existing normalizers have other keys or shapes; the message names both.
        """
        shapes = {str(k): check.check_shape(f"obs_shape[{k!r}]", v) for k, v in obs_shapes.items()}
        if self.dict_obs is None:
            self.dict_obs = dict_obs
            device = self.device
            # Sorted: the order of the per-key collectives must not depend on the rank.
            for key in sorted(shapes):
                self.obs[key] = self.config.make_obs(shapes[key], device, self.process_group)
        elif self.obs_shapes != shapes or self.dict_obs != dict_obs:
            raise ValueError(
                f"observation shapes do not match: the state has {shapes}, the normalizers "
                f"have {self.obs_shapes}."
            )

    def ensure_reward(self, num_envs: int) -> None:
        """Create the reward normalizer for ``num_envs`` environments, or check the existing one.

        Raises:
            ValueError: the existing reward normalizer has another ``num_envs``.
        """
        if self.reward is None:
            self.reward = self.config.make_reward(num_envs, self.device, self.process_group)
        elif self.reward.num_envs != num_envs:
            raise ValueError(
                f"reward normalizer sizes do not match: the state has num_envs={num_envs}, "
                f"the normalizer has num_envs={self.reward.num_envs}."
            )

    # ------------------------------------------------------------------ internals

    def _tensor(self, obs: Observation) -> Tensor:
        if type(obs) is Tensor:  # the per-step common case, before the costlier checks
            return obs
        if isinstance(obs, Mapping):
            raise TypeError(
                f"`obs` is a dict (keys {sorted(obs)}) but these normalizers were built for "
                "tensor observations."
            )
        return check.as_tensor("obs", obs, self.device)

    def _items(self, obs: Observation) -> list[tuple[str, Tensor]]:
        if not self.dict_obs:
            return [(TENSOR_KEY, self._tensor(obs))]
        if not isinstance(obs, Mapping):
            raise TypeError(
                f"`obs` is a {type(obs).__name__} but these normalizers were built for dict "
                f"observations with keys {sorted(self.obs)}."
            )
        missing = sorted(set(self.obs) - set(obs))
        if missing:
            raise ValueError(f"`obs` lacks the key(s) {missing}; it has {sorted(obs)}.")
        # `self.obs` is in sorted key order on every rank (see `ensure_obs_shapes`).
        return [(key, obs[key]) for key in self.obs]

    def _ensure_obs(self, obs: Observation) -> Observation:
        """``obs`` with NumPy arrays as tensors; creates the normalizers from it if needed."""
        if type(obs) is not Tensor:
            obs = self._as_tensors(obs)
        if self.dict_obs is not None:
            return obs
        dims = self.config.obs_feature_dims
        if isinstance(obs, Mapping):
            shapes = {str(k): self._feature_shape(f"obs[{k!r}]", v, dims) for k, v in obs.items()}
            first = next(iter(obs.values()), None)
        else:
            shapes = {TENSOR_KEY: self._feature_shape("obs", obs, dims)}
            first = obs
        if self.device is None and isinstance(first, Tensor):
            self._home_device = first.device
        self.ensure_obs_shapes(shapes, isinstance(obs, Mapping))
        return obs

    def _as_tensors(self, obs: Any) -> Observation:
        """Tensors, or dicts of them, from what environments hand out (NumPy arrays, numbers)."""
        device = self.device
        if isinstance(obs, Mapping):
            if all(type(v) is Tensor for v in obs.values()):
                return obs
            # Entries without a normalizer pass through `normalize_obs` unchanged.
            return {
                k: check.as_tensor(f"obs[{k!r}]", v, device)
                if self.dict_obs is None or k in self.obs
                else v
                for k, v in obs.items()
            }
        return check.as_tensor("obs", obs, device)

    @staticmethod
    def _feature_shape(name: str, x: Any, dims: int) -> tuple[int, ...]:
        if not isinstance(x, Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor, got {check.show(x)}.")
        if x.dim() < dims:
            raise ValueError(
                f"`{name}` has shape {tuple(x.shape)}, fewer dims than obs_feature_dims={dims}."
            )
        return tuple(x.shape[x.dim() - dims :])

    def _reward_normalizer(self, rewards: Tensor) -> RewardNormalizer:
        reward = self.reward  # one `nn.Module.__getattr__` (a Python call) on the common path
        if reward is not None:
            return reward
        if not self.config.reward:
            raise RuntimeError(
                "No reward normalizer: construct with `reward=True` to normalize rewards."
            )
        rewards = check.as_tensor("rewards", rewards, self.device)
        if rewards.dim() not in (1, 2):
            raise ValueError(
                "`rewards` must have shape (num_envs,) or (T, num_envs), got "
                f"{tuple(rewards.shape)}."
            )
        if self.device is None:
            self._home_device = rewards.device
        self.ensure_reward(rewards.shape[-1])
        assert self.reward is not None
        return self.reward
