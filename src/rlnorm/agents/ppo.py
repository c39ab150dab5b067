"""A reference PPO trainer as a LightningModule, normalized by ``NormalizerCallback``.

Read it top to bottom: ``training_step`` collects one rollout from a gymnasium vector
environment, scales its rewards, computes GAE advantages and runs the clipped PPO update.
Observation and reward normalization are done exactly as the README tells users to: one
``rlnorm.get_normalizer(self)`` lookup, ``normalize_obs`` before the policy sees an
observation, ``update_obs`` once per collected transition (here once per rollout, with all of
its observations) and ``normalize_rewards`` before the advantages are computed. Without a
``NormalizerCallback`` the trainer runs on raw values, which is how the benchmark measures
what normalization brings.

Example:
    >>> import lightning as L  # noqa: N812 - the conventional alias
    >>> import rlnorm
    >>> from rlnorm.agents.ppo import PPO
    >>> model = PPO("CartPole-v1", total_timesteps=512, num_envs=4, num_steps=32)
    >>> trainer = L.Trainer(
    ...     callbacks=[rlnorm.NormalizerCallback(reward=True, gamma=0.98)],
    ...     logger=False, enable_checkpointing=False, enable_progress_bar=False,
    ...     enable_model_summary=False,
    ... )
    >>> trainer.fit(model)
    >>> model.env_steps
    512
"""

from __future__ import annotations

import importlib
import math
import time
from collections import deque
from collections.abc import Mapping
from typing import Any, NamedTuple

import gymnasium as gym
import lightning as L  # noqa: N812 - the conventional alias
import numpy as np
import torch
from torch import Tensor, nn
from torch.distributions import Categorical, Distribution, Normal
from torch.utils.data import DataLoader

from rlnorm.agents.envs import make_vector_env
from rlnorm.lightning.callback import NormalizerCallback, get_normalizer

__all__ = [
    "PPO",
    "PPOLoss",
    "Rollout",
    "env_spec",
    "gae",
    "layer",
    "mlp",
    "ppo_loss",
    "solved_return",
]

#: Mean return over the last 20 episodes at which an environment counts as solved, for ids
#: whose gymnasium spec has no ``reward_threshold`` (or to override it); see
#: :func:`solved_return`.
SOLVED_RETURN: dict[str, float] = {"CartPole-v1": 475.0, "rlnorm/ScaledCartPole-v1": 475.0}

#: Tag prefix of the metrics logged with the environment step count as their step.
BY_ENV_STEP = "by_env_step"


def env_spec(env_id: str) -> gym.envs.registration.EnvSpec:
    """The gymnasium spec of ``env_id``, importing its module first for ``"module:id"`` ids.

    ``"my_envs:MyEnv-v0"`` is gymnasium's own form for an environment that ``my_envs``
    registers when imported (what ``gymnasium.make`` accepts too).

    Args:
        env_id: a registered id such as ``"CartPole-v1"``, or ``"module:id"``.

    Returns:
        The registered ``EnvSpec``.

    Raises:
        ValueError: the module cannot be imported or the id is not registered; the message
            names ``env_id``.
    """
    if not isinstance(env_id, str) or not env_id:
        raise ValueError(f"`env_id` must be a non-empty str, got {env_id!r}.")
    module, _, name = env_id.rpartition(":")
    if module:
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise ValueError(
                f"`env_id` {env_id!r}: cannot import the module {module!r} that should register "
                f"{name!r} ({type(err).__name__}: {err}). Is it on PYTHONPATH?"
            ) from err
    spec = gym.registry.get(name)
    if spec is None:
        where = (
            f"importing {module!r} did not register {name!r}"
            if module
            else "for your own environment use the form 'module:id', where importing the module "
            "registers the id"
        )
        raise ValueError(
            f"`env_id` {env_id!r} is not a registered gymnasium environment ({where})."
        )
    return spec


def solved_return(env_id: str) -> float | None:
    """Mean return over the last 20 episodes at which ``env_id`` counts as solved.

    :data:`SOLVED_RETURN` first, then the environment's own ``spec.reward_threshold``
    (``None`` where neither knows one, e.g. ``Pendulum-v1``).
    """
    if env_id in SOLVED_RETURN:
        return SOLVED_RETURN[env_id]
    threshold = env_spec(env_id).reward_threshold
    return None if threshold is None else float(threshold)


class Rollout(NamedTuple):
    """One rollout of ``num_steps`` steps in ``num_envs`` environments (leading dims ``T, N``)."""

    obs: Tensor  # normalized observations the policy acted on
    actions: Tensor
    logprobs: Tensor
    values: Tensor
    rewards: Tensor  # scaled rewards, truncated episodes bootstrapped
    ended: Tensor  # the episode ended at this step (terminated or truncated)
    next_value: Tensor  # value of the observation after the last step


def layer(linear: nn.Linear, std: float = math.sqrt(2)) -> nn.Linear:
    """Orthogonal weights and zero bias, the usual PPO initialisation."""
    nn.init.orthogonal_(linear.weight, std)
    nn.init.zeros_(linear.bias)
    return linear


def mlp(in_features: int, hidden_size: int, out_features: int, out_std: float) -> nn.Sequential:
    """Two tanh hidden layers, initialised with :func:`layer` (output layer gain ``out_std``)."""
    return nn.Sequential(
        layer(nn.Linear(in_features, hidden_size)),
        nn.Tanh(),
        layer(nn.Linear(hidden_size, hidden_size)),
        nn.Tanh(),
        layer(nn.Linear(hidden_size, out_features), out_std),
    )


def gae(
    rewards: Tensor,
    values: Tensor,
    ended: Tensor,
    next_value: Tensor,
    gamma: float,
    gae_lambda: float,
) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimates and the value targets (returns) of one rollout.

    Args:
        rewards: ``(T, N)`` rewards (scaled, truncated episodes already bootstrapped).
        values: ``(T, N)`` values of the observations acted on.
        ended: ``(T, N)`` bool, the episode ended at this step (terminated or truncated).
        next_value: ``(N,)`` value of the observation after the last step.
        gamma: discount.
        gae_lambda: GAE's lambda.

    Returns:
        ``(advantages, returns)``, both ``(T, N)``.
    """
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(next_value)
    for t in reversed(range(rewards.shape[0])):
        alive = (~ended[t]).float()
        delta = rewards[t] + gamma * next_value * alive - values[t]
        last = delta + gamma * gae_lambda * alive * last
        advantages[t] = last
        next_value = values[t]
    return advantages, advantages + values


class PPOLoss(NamedTuple):
    """The clipped PPO objective of one minibatch and its parts."""

    loss: Tensor  # what is minimised: policy - ent_coef * entropy + vf_coef * value
    policy: Tensor
    value: Tensor
    entropy: Tensor
    clip_fraction: Tensor  # share of ratios outside [1 - clip_coef, 1 + clip_coef]


def ppo_loss(
    logprob: Tensor,
    entropy: Tensor,
    value: Tensor,
    mb: Mapping[str, Tensor],
    clip_coef: float,
    ent_coef: float,
    vf_coef: float,
) -> PPOLoss:
    """The clipped policy and value losses with the entropy bonus (advantages normalized).

    Args:
        logprob: log-probabilities of ``mb["actions"]`` under the current policy.
        entropy: entropies of the current policy's action distributions.
        value: the current critic's values of ``mb["obs"]``.
        mb: the minibatch as collected: ``logprobs``, ``values``, ``advantages``, ``returns``.
        clip_coef: PPO's ratio clip (also the value clip).
        ent_coef: entropy bonus weight.
        vf_coef: value loss weight.

    Returns:
        :class:`PPOLoss`.
    """
    logratio = logprob - mb["logprobs"]
    ratio = logratio.exp()
    adv = mb["advantages"]
    adv = (adv - adv.mean()) / (adv.std(unbiased=False) + 1e-8)
    pg_loss = torch.max(-adv * ratio, -adv * ratio.clamp(1 - clip_coef, 1 + clip_coef)).mean()
    v_clipped = mb["values"] + (value - mb["values"]).clamp(-clip_coef, clip_coef)
    v_loss = 0.5 * torch.max((value - mb["returns"]) ** 2, (v_clipped - mb["returns"]) ** 2).mean()
    entropy = entropy.mean()
    return PPOLoss(
        loss=pg_loss - ent_coef * entropy + vf_coef * v_loss,
        policy=pg_loss,
        value=v_loss,
        entropy=entropy,
        clip_fraction=((ratio - 1).abs() > clip_coef).float().mean(),
    )


class PPO(L.LightningModule):
    """Proximal Policy Optimization on a gymnasium vector environment.

    The statistics are learned once per rollout, from all of its observations, so the first
    rollout acts on raw observations (the normalization is the identity until data is seen).

    Each ``training_step`` collects ``num_steps`` steps in each of ``num_envs`` environments
    and runs ``update_epochs`` epochs of clipped-objective updates over ``num_minibatches``
    minibatches (manual optimization). Training ends after ``total_timesteps`` environment
    steps summed over all ranks. Discrete (``Discrete``) and continuous (``Box``) actions.

    Args:
        env_id: gymnasium id, e.g. ``CartPole-v1``, ``Pendulum-v1``,
            ``rlnorm/ScaledCartPole-v1``, or ``module:id`` for your own environment, registered
            by importing ``module`` (gymnasium's form).
        total_timesteps: environment steps to train for, over all ranks: the length of
            training (``--model.total_timesteps`` on the command line). The Trainer's
            ``max_steps`` counts optimizer steps instead, ``update_epochs * num_minibatches``
            per rollout of ``num_envs * num_steps`` environment steps.
        num_envs: environments per rank.
        num_steps: steps per environment and rollout.
        learning_rate: Adam step size (annealed linearly to 0 if ``anneal_lr``).
        anneal_lr: anneal the learning rate over training.
        gamma: discount.
        gae_lambda: GAE's lambda.
        update_epochs: passes over each rollout.
        num_minibatches: minibatches per pass.
        clip_coef: PPO's ratio clip.
        ent_coef: entropy bonus weight.
        vf_coef: value loss weight.
        max_grad_norm: gradient norm clip.
        hidden_size: width of the two hidden layers of actor and critic.
        seed: seed of the environments (offset by rank) and of the minibatch order; weights
            and action sampling follow torch's global seed (``seed_everything``).
    """

    def __init__(
        self,
        env_id: str = "CartPole-v1",
        total_timesteps: int = 100_000,
        num_envs: int = 8,
        num_steps: int = 32,
        learning_rate: float = 1e-3,
        anneal_lr: bool = True,
        gamma: float = 0.98,
        gae_lambda: float = 0.8,
        update_epochs: int = 10,
        num_minibatches: int = 1,
        clip_coef: float = 0.2,
        ent_coef: float = 0.0,
        vf_coef: float = 0.5,
        max_grad_norm: float = 0.5,
        hidden_size: int = 64,
        seed: int = 1,
    ) -> None:
        super().__init__()
        for name, value in (
            ("total_timesteps", total_timesteps),
            ("num_envs", num_envs),
            ("num_steps", num_steps),
            ("update_epochs", update_epochs),
            ("num_minibatches", num_minibatches),
            ("hidden_size", hidden_size),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
        self.solved_return = solved_return(env_id)  # checks (and imports) env_id
        self.save_hyperparameters()
        self.automatic_optimization = False

        probe = gym.make(env_id)
        obs_space, action_space = probe.observation_space, probe.action_space
        probe.close()
        if not isinstance(obs_space, gym.spaces.Box) or len(obs_space.shape) != 1:
            raise ValueError(f"`env_id` {env_id!r} must have flat Box observations.")
        self.continuous = isinstance(action_space, gym.spaces.Box)
        obs_dim = obs_space.shape[0]
        if self.continuous:
            action_dim = int(np.prod(action_space.shape))
        elif isinstance(action_space, gym.spaces.Discrete):
            action_dim = int(action_space.n)
        else:
            raise ValueError(f"`env_id` {env_id!r} has unsupported actions {action_space}.")

        self.critic = mlp(obs_dim, hidden_size, 1, 1.0)
        self.actor = mlp(obs_dim, hidden_size, action_dim, 0.01)
        if self.continuous:
            self.actor_logstd = nn.Parameter(torch.zeros(action_dim))

        self.envs: gym.vector.VectorEnv | None = None
        self.normalizer: NormalizerCallback | None = None
        self.env_steps = 0
        self.episode_returns: deque[float] = deque(maxlen=20)
        self.episode_lengths: deque[float] = deque(maxlen=20)
        self.solved_at: int | None = None

    # ------------------------------------------------------------------ set-up

    @property
    def steps_per_rollout(self) -> int:
        """Environment steps one rank collects per ``training_step``."""
        return self.hparams.num_envs * self.hparams.num_steps

    def setup(self, stage: str) -> None:
        """Create this rank's environments (in ``setup``, so each process gets its own)."""
        if stage == "fit" and self.envs is None:
            seed = self.hparams.seed + 1000 * self.global_rank
            self.envs = make_vector_env(self.hparams.env_id, self.hparams.num_envs, seed)
            obs, _ = self.envs.reset(seed=seed)
            self._obs = torch.as_tensor(obs, dtype=torch.float32)
            self._generator = torch.Generator().manual_seed(seed)

    def on_fit_start(self) -> None:
        """Find the normalizer, if the trainer has one."""
        try:
            self.normalizer = get_normalizer(self)
        except LookupError:
            self.normalizer = None
        self._start_time = time.perf_counter()
        self._start_steps = self.env_steps

    def teardown(self, stage: str) -> None:
        """Close the environments."""
        if self.envs is not None:
            self.envs.close()
            self.envs = None

    def train_dataloader(self) -> DataLoader:
        """One item per rollout; under DDP the sampler splits the rollouts between ranks."""
        world = self.trainer.world_size
        iterations = math.ceil(self.hparams.total_timesteps / (self.steps_per_rollout * world))
        return DataLoader(range(iterations * world), batch_size=None)

    def on_train_batch_start(self, batch: int, batch_idx: int) -> int | None:
        """Skip the rollout once ``total_timesteps`` were collected (a finished run resumed)."""
        if self.env_steps >= self.hparams.total_timesteps:
            self.trainer.should_stop = True
            return -1
        return None

    def on_train_batch_end(self, outputs: Any, batch: int, batch_idx: int) -> None:
        """Stop after the rollout that completes ``total_timesteps``.

        Stopping here rather than at the next batch's start keeps an unlimited epoch count
        (``max_epochs=-1``, which lets a finished run resume with a larger budget) from
        starting an empty epoch after the last rollout.
        """
        if self.env_steps >= self.hparams.total_timesteps:
            self.trainer.should_stop = True

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Adam, as in the reference implementations."""
        return torch.optim.Adam(self.parameters(), lr=self.hparams.learning_rate, eps=1e-5)

    # ------------------------------------------------------------------ policy

    def distribution(self, obs: Tensor) -> Distribution:
        """The action distribution for (normalized) observations."""
        logits = self.actor(obs)
        if self.continuous:
            return Normal(logits, self.actor_logstd.exp().expand_as(logits))
        return Categorical(logits=logits)

    def log_prob(self, dist: Distribution, actions: Tensor) -> Tensor:
        """Log-probability of actions, summed over action dimensions when continuous."""
        logp = dist.log_prob(actions)
        return logp.sum(-1) if self.continuous else logp

    def forward(self, obs: Tensor) -> Tensor:
        """Greedy action for normalized observations (for evaluation and export)."""
        logits = self.actor(obs)
        return logits if self.continuous else logits.argmax(-1)

    def observe(self, raw_obs: Tensor) -> Tensor:
        """What the policy sees: observations normalized with the current statistics."""
        if self.normalizer is None:
            return raw_obs
        return self.normalizer.normalize_obs(raw_obs)

    # ------------------------------------------------------------------ rollout

    @torch.no_grad()
    def collect_rollout(self) -> Rollout:
        """Play ``num_steps`` steps in every environment with the current policy."""
        assert self.envs is not None
        hp = self.hparams
        shape = (hp.num_steps, hp.num_envs)
        raw_buf, obs_buf, actions, logprobs, values = [], [], [], [], []
        raw_rewards = torch.zeros(shape)
        ended = torch.zeros(shape, dtype=torch.bool)
        bootstrap = torch.zeros(shape)  # value of the last observation of truncated episodes

        raw_obs = self._obs.to(self.device)
        obs = self.observe(raw_obs)
        for t in range(hp.num_steps):
            dist = self.distribution(obs)
            action = dist.sample()
            raw_buf.append(raw_obs)
            obs_buf.append(obs)
            actions.append(action)
            logprobs.append(self.log_prob(dist, action))
            values.append(self.critic(obs).squeeze(-1))

            env_action = action.cpu().numpy()
            if self.continuous:
                space = self.envs.single_action_space
                env_action = np.clip(env_action, space.low, space.high)
            next_obs, reward, terminated, truncated, info = self.envs.step(env_action)
            raw_rewards[t] = torch.as_tensor(reward, dtype=torch.float32)
            ended[t] = torch.as_tensor(terminated | truncated)
            only_truncated = truncated & ~terminated
            if only_truncated.any():
                final = np.stack([info["final_obs"][i] for i in np.flatnonzero(only_truncated)])
                final_obs = self.observe(torch.as_tensor(final, device=self.device))
                bootstrap[t, torch.as_tensor(only_truncated)] = (
                    self.critic(final_obs).squeeze(-1).float().cpu()
                )
            self._record_episodes(info)
            self._obs = torch.as_tensor(next_obs, dtype=torch.float32)
            raw_obs = self._obs.to(self.device)
            obs = self.observe(raw_obs)
        next_value = self.critic(obs).squeeze(-1)

        # Learn the statistics from this rollout's observations, each once, in one update:
        # the policy acted on statistics that stay fixed within a rollout.
        if self.normalizer is not None:
            self.normalizer.update_obs(torch.stack(raw_buf))

        rewards = raw_rewards.to(self.device)
        if self.normalizer is not None and self.normalizer.config.reward:
            rewards = self.normalizer.normalize_rewards(rewards, ended.to(self.device))
        rewards = rewards + hp.gamma * bootstrap.to(self.device)
        self.env_steps += self.steps_per_rollout * self.trainer.world_size
        return Rollout(
            obs=torch.stack(obs_buf),
            actions=torch.stack(actions),
            logprobs=torch.stack(logprobs),
            values=torch.stack(values),
            rewards=rewards,
            ended=ended.to(self.device),
            next_value=next_value,
        )

    def _record_episodes(self, info: dict[str, Any]) -> None:
        if "episode" not in info:
            return
        for i in np.flatnonzero(info["_episode"]):
            self.episode_returns.append(float(info["episode"]["r"][i]))
            self.episode_lengths.append(float(info["episode"]["l"][i]))

    def advantages(self, rollout: Rollout) -> tuple[Tensor, Tensor]:
        """Generalized advantage estimates and the value targets (returns)."""
        hp = self.hparams
        return gae(
            rollout.rewards,
            rollout.values,
            rollout.ended,
            rollout.next_value,
            hp.gamma,
            hp.gae_lambda,
        )

    # ------------------------------------------------------------------ update

    def training_step(self, batch: int, batch_idx: int) -> None:
        """Collect a rollout, then run the PPO update on it."""
        hp = self.hparams
        optimizer = self.optimizers()
        if hp.anneal_lr:
            progress = min(1.0, self.env_steps / hp.total_timesteps)
            for group in optimizer.param_groups:
                group["lr"] = hp.learning_rate * (1.0 - progress)

        rollout = self.collect_rollout()
        advantages, returns = self.advantages(rollout)
        flat = {
            "obs": rollout.obs.flatten(0, 1),
            "actions": rollout.actions.flatten(0, 1),
            "logprobs": rollout.logprobs.flatten(0, 1),
            "values": rollout.values.flatten(0, 1),
            "advantages": advantages.flatten(),
            "returns": returns.flatten(),
        }
        size = flat["returns"].shape[0]
        minibatch = max(1, size // hp.num_minibatches)
        clip_fractions = []
        for _ in range(hp.update_epochs):
            order = torch.randperm(size, generator=self._generator).to(self.device)
            for start in range(0, size, minibatch):
                idx = order[start : start + minibatch]
                mb = {key: value[idx] for key, value in flat.items()}
                dist = self.distribution(mb["obs"])
                entropy = dist.entropy()
                losses = ppo_loss(
                    self.log_prob(dist, mb["actions"]),
                    entropy.sum(-1) if self.continuous else entropy,
                    self.critic(mb["obs"]).squeeze(-1),
                    mb,
                    hp.clip_coef,
                    hp.ent_coef,
                    hp.vf_coef,
                )

                optimizer.zero_grad()
                self.manual_backward(losses.loss)
                nn.utils.clip_grad_norm_(self.parameters(), hp.max_grad_norm)
                optimizer.step()
                clip_fractions.append(losses.clip_fraction)

        self._log_progress(
            losses.policy, losses.value, losses.entropy, torch.stack(clip_fractions).mean()
        )

    def _log_progress(
        self, pg_loss: Tensor, v_loss: Tensor, entropy: Tensor, clipfrac: Tensor
    ) -> None:
        if self.episode_returns:
            mean_return = float(np.mean(self.episode_returns))
            self.log("episode_return", mean_return, prog_bar=True)
            self.log("episode_length", float(np.mean(self.episode_lengths)))
            target = self.solved_return
            solved = len(self.episode_returns) == self.episode_returns.maxlen
            if target is not None and solved and mean_return >= target and self.solved_at is None:
                self.solved_at = self.env_steps
            # SB3-style curves: the same means with the environment step count as the step.
            for logger in self.loggers:
                logger.log_metrics(
                    {
                        f"{BY_ENV_STEP}/episode_return": mean_return,
                        f"{BY_ENV_STEP}/episode_length": float(np.mean(self.episode_lengths)),
                    },
                    step=self.env_steps,
                )
        elapsed = max(time.perf_counter() - self._start_time, 1e-9)
        self.log("env_steps", float(self.env_steps), prog_bar=True)
        self.log("sps", (self.env_steps - self._start_steps) / elapsed)
        self.log_dict(
            {
                "losses/policy": pg_loss.detach(),
                "losses/value": v_loss.detach(),
                "losses/entropy": entropy.detach(),
                "losses/clip_fraction": clipfrac,
            }
        )

    # ------------------------------------------------------------------ checkpoints

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the environment-step counter with the weights."""
        checkpoint["rlnorm_ppo"] = {"env_steps": self.env_steps}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the environment-step counter."""
        self.env_steps = int(checkpoint.get("rlnorm_ppo", {}).get("env_steps", 0))
