"""Small, real RL-style LightningModules that the callback tests train (no mocks).

Everything here plays a real Gymnasium ``CartPole-v1`` (``SyncVectorEnv``) and goes through the
one documented line, ``rlnorm.get_normalizer(self)``. The modules are importable both from the
tests and from the DDP subprocess script ``tests/ddp_fit.py``.

Determinism (what the bitwise resume test relies on): every rollout of :class:`RolloutAgent`
starts from ``envs.reset(seed=...)`` and samples actions with a ``torch.Generator``, both seeded
from ``(seed, global_rank, global_step)``. A rollout is therefore a pure function of the global
step, the policy weights and the normalizer state, all of which a Lightning checkpoint holds:
a run resumed from a checkpoint plays exactly the transitions an uninterrupted run plays.
The running discounted returns of the reward normalizer carry over from one rollout to the next
(no ``done`` at the rollout boundary), so a resume that lost them would show.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, NamedTuple

import gymnasium as gym
import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset

import rlnorm

#: Lightning's advice for real training runs, irrelevant to these tiny ones; test modules pass
#: these to ``pytest.mark.filterwarnings``.
QUIET_LIGHTNING = (
    "ignore:.*does not have many workers.*",
    "ignore:.*isinstance.treespec, LeafSpec.*",
    "ignore:.*smaller than the logging interval.*",
    "ignore:.*resuming from a checkpoint that ended before the epoch ended.*",
    "ignore:.*callbacks used to create the checkpoint need to be provided.*",
)

OBS_DIM = 4  # CartPole observation size
CRITIC_DIM = OBS_DIM + 1  # CartPole observation + the time-in-rollout feature


def make_cartpole_envs(num_envs: int) -> gym.vector.SyncVectorEnv:
    """``num_envs`` CartPole-v1 environments that reset in the step where an episode ends."""
    return gym.vector.SyncVectorEnv(
        [lambda: gym.make("CartPole-v1") for _ in range(num_envs)],
        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
    )


def make_trainer(root: Any, callbacks: list | None = None, **kwargs: Any) -> Trainer:
    """A quiet CPU ``Trainer``: no logger, checkpoints, progress bar or sanity check by default."""
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": 8,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "default_root_dir": str(root),
    }
    options.update(kwargs)
    return Trainer(callbacks=callbacks or [], **options)


def discounted_returns(rewards: Tensor, dones: Tensor, gamma: float) -> Tensor:
    """Reward-to-go of a ``(T, num_envs)`` rollout, cut at every done."""
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[0])
    for t in range(rewards.shape[0] - 1, -1, -1):
        running = rewards[t] + gamma * running * (~dones[t]).to(rewards.dtype)
        out[t] = running
    return out


def _small_init(module: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.3)


class RolloutAgent(LightningModule):
    """REINFORCE-style CartPole agent that collects its rollout inside ``training_step``.

    Per environment step it calls ``update_obs`` then ``normalize_obs`` (the policy acts on
    normalized observations); per rollout it calls ``normalize_rewards(rewards, dones)`` before
    computing returns, then takes one Adam step on a policy-gradient loss.

    Args:
        num_envs: environments on rank 0.
        extra_envs_per_rank: rank ``r`` plays ``num_envs + r * extra_envs_per_rank``
            environments (uneven data per rank under DDP).
        rollout_len: environment steps per training step.
        seed: base seed of the policy weights, the environments and the action sampling.
        steps_per_epoch: length of the (dummy) training dataloader.
        normalizer: ``name`` of the NormalizerCallback to use (``None``: the only one).
        critic_normalizer: ``name`` of a second NormalizerCallback fed the critic's input,
            the observation plus a time feature (shape ``(5,)``).
        rewards: normalize rewards too.
        nan_row: at the first step of each rollout, feed ``update_obs`` one extra all-NaN row.
        freeze_steps: global steps during which the rollout calls ``norm.freeze()`` (and
            ``norm.unfreeze()`` otherwise).
    """

    def __init__(
        self,
        *,
        num_envs: int = 4,
        extra_envs_per_rank: int = 0,
        rollout_len: int = 8,
        seed: int = 0,
        steps_per_epoch: int = 6,
        normalizer: str | None = None,
        critic_normalizer: str | None = None,
        rewards: bool = True,
        nan_row: bool = False,
        freeze_steps: tuple[int, ...] = (),
        gamma: float = 0.99,
        lr: float = 1e-2,
    ) -> None:
        super().__init__()
        self.num_envs = num_envs
        self.extra_envs_per_rank = extra_envs_per_rank
        self.rollout_len = rollout_len
        self.seed = seed
        self.steps_per_epoch = steps_per_epoch
        self.normalizer_name = normalizer
        self.critic_name = critic_normalizer
        self.use_rewards = rewards
        self.nan_row = nan_row
        self.freeze_steps = set(freeze_steps)
        self.gamma = gamma
        self.lr = lr
        self.policy = nn.Sequential(nn.Linear(OBS_DIM, 16), nn.Tanh(), nn.Linear(16, 2))
        _small_init(self.policy, seed)
        self._envs: gym.vector.SyncVectorEnv | None = None
        # What went through the normalizer in the training loop, for reference computations.
        self.obs_updates: list[tuple[int, Any]] = []  # (global_step, raw obs fed to update_obs)
        self.obs_normalized: list[tuple[int, Any]] = []  # (global_step, normalize_obs output)
        self.critic_updates: list[tuple[int, Tensor]] = []
        self.reward_updates: list[tuple[int, Tensor, Tensor]] = []  # (step, rewards, dones)
        self.train_start_shapes: dict[str, tuple[int, ...]] | None = None
        self.train_start_count: int | None = None

    # ------------------------------------------------------------------ environment

    @property
    def envs_here(self) -> int:
        rank = self.trainer.global_rank if self._trainer is not None else 0
        return self.num_envs + rank * self.extra_envs_per_rank

    @property
    def envs(self) -> gym.vector.SyncVectorEnv:
        if self._envs is None:
            self._envs = make_cartpole_envs(self.envs_here)
        return self._envs

    def seed_for(self, step: int, stream: int = 0) -> int:
        rank = self.trainer.global_rank if self._trainer is not None else 0
        return 1_000_003 * self.seed + 10_007 * rank + 101 * step + stream

    def observation(self, raw: np.ndarray) -> Any:
        """The observation the agent sees (a tensor here; subclasses build dicts)."""
        return torch.as_tensor(raw, dtype=torch.float32)

    def policy_input(self, normalized: Any) -> Tensor:
        return normalized

    def play(self, seed: int, record_step: int | None) -> dict[str, Tensor]:
        """One rollout through the normalizer; records it when ``record_step`` is given."""
        norm = rlnorm.get_normalizer(self, self.normalizer_name)
        critic = None if self.critic_name is None else rlnorm.get_normalizer(self, self.critic_name)
        gen = torch.Generator().manual_seed(seed)
        raw, _ = self.envs.reset(seed=seed)
        inputs, actions, rewards, dones = [], [], [], []
        for t in range(self.rollout_len):
            obs = self.observation(raw)
            fed = obs
            if self.nan_row and t == 0:
                fed = torch.cat([obs, torch.full((1, *obs.shape[1:]), math.nan)])
            norm.update_obs(fed)
            normalized = norm.normalize_obs(obs)
            x = self.policy_input(normalized)
            if critic is not None:
                time_feature = torch.full((x.shape[0], 1), float(t))
                critic_in = torch.cat([torch.as_tensor(raw, dtype=torch.float32), time_feature], 1)
                critic.update_obs(critic_in)
                critic.normalize_obs(critic_in)
                if record_step is not None:
                    self.critic_updates.append((record_step, critic_in))
            if record_step is not None:
                self.obs_updates.append((record_step, fed))
                self.obs_normalized.append((record_step, normalized))
            with torch.no_grad():
                probs = torch.softmax(self.policy(x), dim=-1)
            action = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
            raw, reward, terminated, truncated, _ = self.envs.step(action.numpy())
            inputs.append(x)
            actions.append(action)
            rewards.append(torch.as_tensor(reward, dtype=torch.float32))
            dones.append(torch.as_tensor(terminated | truncated))
        out = {
            "inputs": torch.stack(inputs),
            "actions": torch.stack(actions),
            "rewards": torch.stack(rewards),
            "dones": torch.stack(dones),
        }
        if self.use_rewards:
            out["scaled"] = norm.normalize_rewards(out["rewards"], out["dones"])
            if record_step is not None:
                self.reward_updates.append((record_step, out["rewards"], out["dones"]))
        else:
            out["scaled"] = out["rewards"]
        return out

    # ------------------------------------------------------------------ Lightning

    def train_dataloader(self) -> DataLoader:
        return DataLoader(range(self.steps_per_epoch), batch_size=None)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)

    def on_train_start(self) -> None:
        norm = rlnorm.get_normalizer(self, self.normalizer_name)
        self.train_start_shapes = dict(norm.normalizers.obs_shapes)
        counts = [int(n.count) for n in norm.normalizers.named_normalizers().values()]
        self.train_start_count = sum(counts)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        step = self.global_step
        norm = rlnorm.get_normalizer(self, self.normalizer_name)
        if self.freeze_steps:
            if step in self.freeze_steps:
                norm.freeze()
            else:
                norm.unfreeze()
        rollout = self.play(self.seed_for(step), record_step=step)
        returns = discounted_returns(rollout["scaled"], rollout["dones"], self.gamma)
        advantages = returns - returns.mean()
        logits = self.policy(rollout["inputs"])
        logp = torch.log_softmax(logits, dim=-1)
        chosen = logp.gather(-1, rollout["actions"].unsqueeze(-1)).squeeze(-1)
        return -(chosen * advantages).mean()

    def on_train_end(self) -> None:
        if self._envs is not None:
            self._envs.close()
            self._envs = None


class ValidatingAgent(RolloutAgent):
    """:class:`RolloutAgent` with validation, test and predict loops that play rollouts too.

    ``validation_step`` (also used as ``test_step`` and ``predict_step``) calls ``update_obs``,
    ``normalize_obs`` and ``normalize_rewards`` like training does, and records the normalizer
    state before and after, and ``updates_enabled``.
    """

    def __init__(self, *, val_batches: int = 2, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.val_batches = val_batches
        self.val_records: list[dict[str, Any]] = []

    def val_dataloader(self) -> DataLoader:
        return DataLoader(range(self.val_batches), batch_size=None)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def predict_step(self, batch: Any, batch_idx: int) -> Any:
        self.validation_step(batch, batch_idx)
        return batch

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        norm = rlnorm.get_normalizer(self, self.normalizer_name)
        before = {k: v.clone() for k, v in norm.normalizers.state_dict().items()}
        self.play(self.seed_for(10_000 + int(batch), stream=7), record_step=None)
        after = {k: v.clone() for k, v in norm.normalizers.state_dict().items()}
        self.val_records.append(
            {
                "sanity": self.trainer.sanity_checking,
                "updates_enabled": norm.updates_enabled,
                "before": before,
                "after": after,
            }
        )


class DictObsAgent(RolloutAgent):
    """:class:`RolloutAgent` whose observations are dicts: ``pos`` (2) and ``vel`` (3).

    ``pos`` holds the cart position and the pole angle, ``vel`` the two velocities and the
    squared angular velocity.
    """

    def observation(self, raw: np.ndarray) -> dict[str, Tensor]:
        x = torch.as_tensor(raw, dtype=torch.float32)
        return {
            "pos": x[:, [0, 2]].contiguous(),
            "vel": torch.stack([x[:, 1], x[:, 3], x[:, 3] * x[:, 3]], dim=1),
        }

    def policy_input(self, normalized: Any) -> Tensor:
        return torch.cat([normalized["pos"], normalized["vel"][:, :2]], dim=1)

    def play(self, seed: int, record_step: int | None) -> dict[str, Tensor]:
        if self.nan_row:
            raise ValueError("nan_row is for tensor observations")
        return super().play(seed, record_step)


class SelfNormalizingAgent(RolloutAgent):
    """Ships its own NormalizerCallback through ``configure_callbacks``."""

    def configure_callbacks(self) -> list:
        return [rlnorm.NormalizerCallback(OBS_DIM, reward=True, name="shipped")]


class Transitions(NamedTuple):
    """A minibatch as a named tuple (Lightning and ``default_convert`` keep its type)."""

    obs: Tensor
    fresh: Tensor
    raw_obs: Tensor
    ids: Tensor


class PPORolloutDataset(IterableDataset):
    """Plays CartPole with a seeded random policy and serves each rollout for several epochs.

    Each rollout of ``rollout_len * num_envs`` raw transitions is served ``ppo_epochs``
    times in minibatches. ``fresh`` is ``True`` only on a transition's first epoch; ``ids`` are
    unique per transition; ``raw_obs``/``raw_next_obs`` are untouched copies of
    ``obs``/``next_obs`` for the tests' checks.

    Args:
        shuffle: shuffled minibatches (fancy indexing: copies); otherwise consecutive slices
            of the rollout buffer (views, as ``buffer[i : i + minibatch]`` gives).
        as_tuple: yield :class:`Transitions` named tuples instead of dicts.
        as_list: yield the entries of :class:`Transitions` as a plain tuple, which the
            DataLoader's default collate turns into a list (indices 0 to 3).
    """

    def __init__(
        self,
        *,
        num_rollouts: int = 2,
        rollout_len: int = 8,
        num_envs: int = 4,
        ppo_epochs: int = 3,
        minibatch: int = 8,
        seed: int = 0,
        shuffle: bool = True,
        as_tuple: bool = False,
        as_list: bool = False,
    ) -> None:
        self.num_rollouts = num_rollouts
        self.rollout_len = rollout_len
        self.num_envs = num_envs
        self.ppo_epochs = ppo_epochs
        self.minibatch = minibatch
        self.seed = seed
        self.shuffle = shuffle
        self.as_tuple = as_tuple
        self.as_list = as_list

    @property
    def transitions(self) -> int:
        return self.num_rollouts * self.rollout_len * self.num_envs

    @property
    def batches(self) -> int:
        per_rollout = math.ceil(self.rollout_len * self.num_envs / self.minibatch)
        return self.num_rollouts * self.ppo_epochs * per_rollout

    def __iter__(self) -> Iterator[Any]:
        envs = make_cartpole_envs(self.num_envs)
        gen = torch.Generator().manual_seed(self.seed)
        raw, _ = envs.reset(seed=self.seed)
        first_id = 0
        for _ in range(self.num_rollouts):
            obs, next_obs = [], []
            for _ in range(self.rollout_len):
                action = torch.randint(0, 2, (self.num_envs,), generator=gen)
                nxt, _, _, _, _ = envs.step(action.numpy())
                obs.append(torch.as_tensor(raw, dtype=torch.float32))
                next_obs.append(torch.as_tensor(nxt, dtype=torch.float32))
                raw = nxt
            obs_t = torch.cat(obs)
            next_t = torch.cat(next_obs)
            # Copies taken now: whatever happens to the served tensors, these stay raw.
            raw_obs_t, raw_next_t = obs_t.clone(), next_t.clone()
            n = obs_t.shape[0]
            ids = torch.arange(first_id, first_id + n)
            first_id += n
            for epoch in range(self.ppo_epochs):
                if self.shuffle:
                    minibatches: list[Any] = list(
                        torch.randperm(n, generator=gen).split(self.minibatch)
                    )
                else:
                    minibatches = [
                        slice(i, i + self.minibatch) for i in range(0, n, self.minibatch)
                    ]
                for rows in minibatches:
                    fresh = torch.full((ids[rows].numel(),), epoch == 0)
                    if self.as_tuple or self.as_list:
                        item = Transitions(obs_t[rows], fresh, raw_obs_t[rows].clone(), ids[rows])
                        yield item if self.as_tuple else tuple(item)
                        continue
                    yield {
                        "obs": obs_t[rows],
                        "next_obs": next_t[rows],
                        "raw_obs": raw_obs_t[rows].clone(),
                        "raw_next_obs": raw_next_t[rows].clone(),
                        "fresh": fresh,
                        "ids": ids[rows],
                    }
        envs.close()


class BatchKeyAgent(LightningModule):
    """PPO-style value learner whose batches carry raw observations under ``obs``.

    The callback is configured with ``batch_keys`` and ``update_mask_key="fresh"``: it updates
    from and normalizes the batch in ``on_train_batch_start``. ``training_step`` asserts that
    every key in ``normalized_keys`` arrives normalized with the current statistics.
    """

    def __init__(
        self, dataset: PPORolloutDataset, normalized_keys: tuple[str, ...] = ("obs",)
    ) -> None:
        super().__init__()
        self.dataset = dataset
        self.normalized_keys = normalized_keys
        self.value = nn.Linear(OBS_DIM, 1)
        _small_init(self.value, dataset.seed)
        self.fresh_obs: list[Tensor] = []  # raw rows with fresh=True, in the order served
        self.fresh_ids: list[Tensor] = []
        self.served_ids: list[Tensor] = []
        self.checked_batches = 0

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=None)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-2)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        def entry(name: str) -> Tensor:
            if isinstance(batch, tuple):
                return getattr(batch, name)
            if isinstance(batch, list):
                return batch[Transitions._fields.index(name)]
            return batch[name]

        norms = rlnorm.get_normalizer(self).normalizers
        for key in self.normalized_keys:
            expected = norms.normalize_obs(entry(f"raw_{key}"))
            assert torch.equal(entry(key), expected), (
                f"batch[{key!r}] did not reach training_step normalized once with the current "
                f"statistics (batch {batch_idx})"
            )
        self.checked_batches += 1
        fresh = entry("fresh")
        self.fresh_obs.append(entry("raw_obs")[fresh])
        self.fresh_ids.append(entry("ids")[fresh])
        self.served_ids.append(entry("ids"))
        obs = entry("obs")
        target = obs[:, 2:3]  # predict the normalized pole angle
        return (self.value(obs) - target).pow(2).mean()


class StoredObs(NamedTuple):
    """A one-entry named tuple batch (Lightning and ``default_convert`` keep its type)."""

    obs: Tensor


class StoredBatchDataset(torch.utils.data.Dataset):
    """Serves the very tensors it stores, as ``DataLoader(batch_size=None)`` passes them on.

    Each item is one stored ``(rows, 4)`` tensor of raw CartPole observations (a random
    policy's), wrapped in the container ``container`` names: ``"dict"`` (``{"obs": t}``),
    ``"list"`` (a plain tuple, which the default collate turns into a list) or
    ``"namedtuple"`` (:class:`StoredObs`, kept as it is). Nothing is copied: writing into a
    served tensor writes into the dataset.
    """

    def __init__(self, container: str, items: int = 1, rows: int = 16, seed: int = 0) -> None:
        envs = make_cartpole_envs(rows)
        raw, _ = envs.reset(seed=seed)
        gen = torch.Generator().manual_seed(seed)
        self.stored: list[Tensor] = []
        for _ in range(items):
            for _ in range(3):
                raw, *_ = envs.step(torch.randint(0, 2, (rows,), generator=gen).numpy())
            self.stored.append(torch.as_tensor(raw, dtype=torch.float32).clone())
        envs.close()
        self.container = container

    def __len__(self) -> int:
        return len(self.stored)

    def __getitem__(self, index: int) -> Any:
        obs = self.stored[index]
        if self.container == "dict":
            return {"obs": obs}
        if self.container == "list":
            return (obs,)
        return StoredObs(obs)


class StoredBatchAgent(LightningModule):
    """Records, per epoch, the observations ``training_step`` receives under ``batch_keys``."""

    def __init__(self, dataset: StoredBatchDataset) -> None:
        super().__init__()
        self.dataset = dataset
        self.value = nn.Linear(OBS_DIM, 1)
        _small_init(self.value, 0)
        self.seen: list[Tensor] = []  # (epoch-ordered) observations training_step received

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=None)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-2)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        obs = batch["obs"] if isinstance(batch, dict) else batch[0]
        self.seen.append(obs.detach().clone())
        return self.value(obs).pow(2).mean()
