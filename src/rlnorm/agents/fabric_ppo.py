"""PPO on Lightning Fabric, CleanRL style, with rlnorm's normalizers attached.

Read it top to bottom: :func:`train` is CleanRL's single-file PPO loop on Fabric (each rank
steps its own environments, DDP averages the gradients of the ranks' minibatches). The
normalizer is attached by the lines marked ``# rlnorm``: create
:class:`~rlnorm.FabricNormalizers`, ``update_obs`` and ``normalize_obs`` on every observation
the policy acts on, ``normalize_rewards`` before GAE, ``norm.log(global_step)`` every few
updates, and ``"rlnorm": norm`` in what ``fabric.save`` / ``fabric.load`` handle. The
statistics are reduced over the ranks, so every rank normalizes with the same numbers.

Checkpoints (``ROOT_DIR/checkpoints/update-000010.ckpt``, every ``checkpoint_every`` updates
and at the end) hold the agent, the optimizer, the normalizers, the update and environment step
counts, and each rank's player state (its environments, the next observation and torch's RNG
state). A run resumed from one with ``--resume-from`` on the same number of devices continues
bitwise as the uninterrupted run would have. Metrics are logged against environment steps to
TensorBoard under ``ROOT_DIR/logs``.

Example:
    Two CPU processes::

        python -m rlnorm.agents.fabric_ppo --env-id CartPole-v1 --total-timesteps 20000 --devices 2
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pickle
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
import torch.distributed
from lightning.fabric import Fabric
from lightning.fabric.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.distributions import Categorical, Normal

import rlnorm
from rlnorm.agents.envs import make_vector_env
from rlnorm.agents.ppo import gae, mlp, ppo_loss

__all__ = ["ActorCritic", "Args", "main", "parse_args", "train"]


@dataclass
class Args:
    """The run's settings; each is a command-line flag (``env_id`` is ``--env-id``).

    Attributes:
        env_id: gymnasium id with flat ``Box`` observations.
        num_envs: environments per rank.
        num_steps: steps per environment and rollout.
        total_timesteps: environment steps over all ranks (rounded down to whole updates).
        learning_rate: Adam step size.
        anneal_lr: anneal the learning rate linearly to 0 over the run.
        gamma: discount (also of the reward normalizer's returns).
        gae_lambda: GAE's lambda.
        update_epochs: passes over each rollout.
        num_minibatches: minibatches per pass (per rank).
        clip_coef: PPO's ratio clip.
        ent_coef: entropy bonus weight.
        vf_coef: value loss weight.
        max_grad_norm: gradient norm clip.
        hidden_size: width of the hidden layers.
        seed: seed of the weights, the actions (offset by rank) and the environments.
        normalize: attach rlnorm (observation and reward normalization).
        log_every: log the normalizer telemetry every this many updates (and at the end).
        checkpoint_every: save a checkpoint every this many updates (and at the end).
        resume_from: a checkpoint of this script to continue from.
        root_dir: where the logs and the checkpoints go.
        devices: processes (DDP when more than one).
        accelerator: Fabric's accelerator (``cpu``, ``cuda``, ``auto``).
    """

    env_id: str = "CartPole-v1"
    num_envs: int = 4
    num_steps: int = 128
    total_timesteps: int = 100_000
    learning_rate: float = 2.5e-4
    anneal_lr: bool = True
    gamma: float = 0.99
    gae_lambda: float = 0.95
    update_epochs: int = 4
    num_minibatches: int = 4
    clip_coef: float = 0.2
    ent_coef: float = 0.01
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    hidden_size: int = 64
    seed: int = 1
    normalize: bool = True
    log_every: int = 5
    checkpoint_every: int = 10
    resume_from: str | None = None
    root_dir: str = "runs/fabric_ppo"
    devices: int = 1
    accelerator: str = "cpu"

    def __post_init__(self) -> None:
        positive = ("num_envs", "num_steps", "total_timesteps", "update_epochs")
        positive += ("num_minibatches", "hidden_size", "log_every", "checkpoint_every", "devices")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"`{name}` must be a positive int, got {value!r}.")


class ActorCritic(nn.Module):
    """CleanRL's agent: separate actor and critic MLPs (``rlnorm.agents.ppo.mlp``).

    Args:
        obs_dim: size of the (flat) observations.
        action_space: ``Discrete`` or ``Box`` (a diagonal Gaussian with a learned log-std).
        hidden_size: width of the hidden layers.
    """

    def __init__(self, obs_dim: int, action_space: gym.Space, hidden_size: int) -> None:
        super().__init__()
        self.continuous = isinstance(action_space, gym.spaces.Box)
        if self.continuous:
            action_dim = int(np.prod(action_space.shape))
        elif isinstance(action_space, gym.spaces.Discrete):
            action_dim = int(action_space.n)
        else:
            raise ValueError(f"unsupported action space {action_space}.")
        self.critic = mlp(obs_dim, hidden_size, 1, 1.0)
        self.actor = mlp(obs_dim, hidden_size, action_dim, 0.01)
        if self.continuous:
            self.actor_logstd = nn.Parameter(torch.zeros(action_dim))

    def get_value(self, obs: Tensor) -> Tensor:
        """The critic's values of (normalized) observations."""
        return self.critic(obs).squeeze(-1)

    def forward(
        self, obs: Tensor, action: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """CleanRL's ``get_action_and_value``: ``(action, log_prob, entropy, value)``.

        Args:
            obs: (normalized) observations, ``(B, obs_dim)``.
            action: the actions to score; sampled from the policy when ``None``.
        """
        logits = self.actor(obs)
        if self.continuous:
            dist = Normal(logits, self.actor_logstd.exp().expand_as(logits))
        else:
            dist = Categorical(logits=logits)
        if action is None:
            action = dist.sample()
        logprob, entropy = dist.log_prob(action), dist.entropy()
        if self.continuous:
            logprob, entropy = logprob.sum(-1), entropy.sum(-1)
        return action, logprob, entropy, self.get_value(obs)


def train(args: Args) -> Path:
    """Train PPO with Fabric; every process runs this (``fabric.launch()`` starts the others).

    Args:
        args: the settings.

    Returns:
        The path of the last checkpoint.
    """
    strategy = "ddp" if args.devices > 1 else "auto"
    logger = TensorBoardLogger(root_dir=args.root_dir, name="logs")
    fabric = Fabric(
        accelerator=args.accelerator, strategy=strategy, devices=args.devices, loggers=logger
    )
    fabric.launch()
    rank, world_size, device = fabric.global_rank, fabric.world_size, fabric.device
    fabric.logger.log_hyperparams(dataclasses.asdict(args))

    # Environments, agent and optimizer. Same weights everywhere, then per-rank action noise.
    env_seed = args.seed + 1000 * rank
    envs = make_vector_env(args.env_id, args.num_envs, env_seed)
    obs_space = envs.single_observation_space
    if not isinstance(obs_space, gym.spaces.Box) or len(obs_space.shape) != 1:
        raise ValueError(f"`env_id` {args.env_id!r} must have flat Box observations.")
    action_space = envs.single_action_space
    fabric.seed_everything(args.seed)
    agent = ActorCritic(obs_space.shape[0], action_space, args.hidden_size)
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5)
    agent, optimizer = fabric.setup(agent, optimizer)
    agent.mark_forward_method("get_value")
    torch.manual_seed(env_seed)

    # rlnorm: observation and reward statistics, reduced over the ranks.
    norm = None
    if args.normalize:
        norm = rlnorm.FabricNormalizers(
            fabric, obs_shape=obs_space.shape[0], reward=True, gamma=args.gamma
        )

    def observe(raw_obs: Tensor, learn: bool = True) -> Tensor:
        """What the policy sees; ``learn`` feeds the observation to the statistics first."""
        if norm is None:
            return raw_obs
        if learn:
            norm.update_obs(raw_obs)  # rlnorm: once per observation acted on
        return norm.normalize_obs(raw_obs)  # rlnorm

    per_update = args.num_envs * args.num_steps * world_size
    num_updates = args.total_timesteps // per_update
    if num_updates == 0:
        raise ValueError(
            f"`total_timesteps` {args.total_timesteps} is less than one update "
            f"({args.num_envs} envs x {args.num_steps} steps x {world_size} ranks)."
        )
    checkpoint_dir = Path(args.root_dir) / "checkpoints"
    start_update, global_step = 0, 0
    next_obs = torch.as_tensor(envs.reset(seed=env_seed)[0], dtype=torch.float32)
    if args.resume_from is not None:
        state: dict[str, Any] = {"agent": agent, "optimizer": optimizer}
        if norm is not None:
            state["rlnorm"] = norm  # rlnorm: each rank gets its own reward returns back
        rest = fabric.load(args.resume_from, state)
        start_update, global_step = int(rest["update"]), int(rest["global_step"])
        players = rest["players"]
        if len(players) != world_size:
            raise ValueError(
                f"{args.resume_from} was written by {len(players)} processes; resume it on as "
                f"many (--devices {len(players)}), not {world_size}."
            )
        envs.close()
        envs, next_obs = load_player(players[rank])
    next_obs = next_obs.to(device)

    start_time, start_step = time.perf_counter(), global_step
    last_checkpoint = checkpoint_dir / f"update-{start_update:06d}.ckpt"
    for update in range(start_update + 1, num_updates + 1):
        if args.anneal_lr:
            frac = 1.0 - (update - 1.0) / num_updates
            optimizer.param_groups[0]["lr"] = frac * args.learning_rate

        # Rollout: num_steps steps in each of this rank's environments.
        obs, actions, logprobs, values = [], [], [], []
        rewards = torch.zeros((args.num_steps, args.num_envs), device=device)
        dones = torch.zeros((args.num_steps, args.num_envs), dtype=torch.bool, device=device)
        bootstrap = torch.zeros((args.num_steps, args.num_envs), device=device)
        episodes = torch.zeros(3, dtype=torch.float64)  # count, sum of returns, of lengths
        for step in range(args.num_steps):
            global_step += args.num_envs * world_size
            with torch.no_grad():
                obs.append(observe(next_obs))
                action, logprob, _, value = agent(obs[-1])
            actions.append(action)
            logprobs.append(logprob)
            values.append(value)

            env_action = action.cpu().numpy()
            if isinstance(action_space, gym.spaces.Box):
                env_action = np.clip(env_action, action_space.low, action_space.high)
            raw_obs, reward, terminated, truncated, info = envs.step(env_action)
            rewards[step] = torch.as_tensor(reward, dtype=torch.float32, device=device)
            dones[step] = torch.as_tensor(terminated | truncated, device=device)
            next_obs = torch.as_tensor(raw_obs, dtype=torch.float32, device=device)
            only_truncated = truncated & ~terminated
            if only_truncated.any():  # bootstrap from the last observation of the episode
                ended = np.flatnonzero(only_truncated)
                final = np.stack([info["final_obs"][i] for i in ended])
                final_obs = torch.as_tensor(final, dtype=torch.float32, device=device)
                with torch.no_grad():
                    value = agent.get_value(observe(final_obs, learn=False))
                bootstrap[step, torch.as_tensor(ended, device=device)] = value
            if "episode" in info:
                done_envs = info["_episode"]
                episodes += torch.tensor(
                    [
                        done_envs.sum(),
                        info["episode"]["r"][done_envs].sum(),
                        info["episode"]["l"][done_envs].sum(),
                    ],
                    dtype=torch.float64,
                )

        with torch.no_grad():
            next_value = agent.get_value(observe(next_obs, learn=False))
        if norm is not None:
            rewards = norm.normalize_rewards(rewards, dones)  # rlnorm: update + scale
        rewards = rewards + args.gamma * bootstrap
        advantages, returns = gae(
            rewards, torch.stack(values), dones, next_value, args.gamma, args.gae_lambda
        )

        # PPO update on this rank's rollout; DDP averages the gradients over the ranks.
        data = {
            "obs": torch.stack(obs).flatten(0, 1),
            "actions": torch.stack(actions).flatten(0, 1),
            "logprobs": torch.stack(logprobs).flatten(),
            "values": torch.stack(values).flatten(),
            "advantages": advantages.flatten(),
            "returns": returns.flatten(),
        }
        batch_size = args.num_envs * args.num_steps
        minibatch_size = max(1, batch_size // args.num_minibatches)
        clip_fractions = []
        for _ in range(args.update_epochs):
            order = torch.randperm(batch_size).to(device)
            for start in range(0, batch_size, minibatch_size):
                mb = {
                    key: value[order[start : start + minibatch_size]] for key, value in data.items()
                }
                _, logprob, entropy, value = agent(mb["obs"], mb["actions"])
                losses = ppo_loss(
                    logprob, entropy, value, mb, args.clip_coef, args.ent_coef, args.vf_coef
                )
                optimizer.zero_grad(set_to_none=True)
                fabric.backward(losses.loss)
                fabric.clip_gradients(agent, optimizer, max_norm=args.max_grad_norm)
                optimizer.step()
                clip_fractions.append(losses.clip_fraction.detach())

        # Logging against environment steps (rank zero writes).
        episodes = fabric.all_reduce(episodes.to(device), reduce_op="sum").cpu()
        metrics = {
            "charts/learning_rate": optimizer.param_groups[0]["lr"],
            "charts/SPS": (global_step - start_step) / (time.perf_counter() - start_time),
            "losses/policy_loss": losses.policy.item(),
            "losses/value_loss": losses.value.item(),
            "losses/entropy": losses.entropy.item(),
            "losses/clipfrac": torch.stack(clip_fractions).mean().item(),
        }
        if episodes[0] > 0:
            metrics["charts/episodic_return"] = (episodes[1] / episodes[0]).item()
            metrics["charts/episodic_length"] = (episodes[2] / episodes[0]).item()
        fabric.log_dict(metrics, step=global_step)
        if norm is not None and (update % args.log_every == 0 or update == num_updates):
            norm.log(global_step)  # rlnorm: collective, every rank calls it

        if update % args.checkpoint_every == 0 or update == num_updates:
            last_checkpoint = checkpoint_dir / f"update-{update:06d}.ckpt"
            state = {
                "agent": agent,
                "optimizer": optimizer,
                "update": update,
                "global_step": global_step,
                "players": gather_objects(fabric, save_player(envs, next_obs)),
                "args": dataclasses.asdict(args),
            }
            if norm is not None:
                state["rlnorm"] = norm  # rlnorm: gathers every rank's reward returns
            save_atomically(fabric, last_checkpoint, state)
        if "charts/episodic_return" in metrics:
            fabric.print(
                f"global_step={global_step} episodic_return={metrics['charts/episodic_return']:.1f}"
            )

    envs.close()
    return last_checkpoint


def save_player(envs: gym.vector.VectorEnv, next_obs: Tensor) -> dict[str, Any]:
    """This rank's player state: its environments (pickled), next observation and torch RNG.

    The environments go in as bytes, so that the checkpoint still loads with
    ``torch.load(weights_only=True)`` (as ``rlnorm.load_normalizers`` reads it): only this
    script unpickles them. The vector environment's ``env_fns`` (closures that made the
    environments, never used again) cannot be pickled and are left out.
    """
    vector_env = envs.unwrapped
    env_fns, vector_env.env_fns = vector_env.env_fns, None
    try:
        env_bytes = pickle.dumps(envs)
    finally:
        vector_env.env_fns = env_fns
    return {"envs": env_bytes, "next_obs": next_obs.cpu(), "torch_rng": torch.get_rng_state()}


def load_player(player: dict[str, Any]) -> tuple[gym.vector.VectorEnv, Tensor]:
    """Restore what :func:`save_player` saved: torch's RNG state is set, the rest returned.

    Returns:
        ``(envs, next_obs)``.
    """
    torch.set_rng_state(player["torch_rng"])
    return pickle.loads(player["envs"]), player["next_obs"]


def gather_objects(fabric: Fabric, obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (a collective under DDP)."""
    if fabric.world_size == 1:
        return [obj]
    gathered: list[Any] = [None] * fabric.world_size
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


def save_atomically(fabric: Fabric, path: Path, state: dict[str, Any]) -> None:
    """``fabric.save`` to a temporary name, then rename: a kill never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    fabric.save(tmp, state)  # a collective: every rank calls it, rank zero writes
    if fabric.is_global_zero:
        os.replace(tmp, path)


def parse_args(argv: Sequence[str] | None = None) -> Args:
    """:class:`Args` from the command line: ``--env-id``, ``--normalize/--no-normalize``, ...

    Args:
        argv: the arguments (``sys.argv[1:]`` when ``None``).
    """
    parser = argparse.ArgumentParser(
        prog="python -m rlnorm.agents.fabric_ppo",
        description="PPO on Lightning Fabric with rlnorm's normalizers.",
    )
    # Each flag's help is its line in the Attributes section of the Args docstring.
    helps = dict(re.findall(r"^ {8}(\w+): (.+)$", Args.__doc__ or "", flags=re.MULTILINE))
    for field in dataclasses.fields(Args):
        flag = "--" + field.name.replace("_", "-")
        default, text = field.default, helps.get(field.name, "") + " (default: %(default)s)"
        if isinstance(default, bool):
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=default, help=text
            )
        elif default is None:
            parser.add_argument(flag, type=str, default=None, help=text)
        else:
            parser.add_argument(flag, type=type(default), default=default, help=text)
    return Args(**vars(parser.parse_args(argv)))


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``python -m rlnorm.agents.fabric_ppo``."""
    train(parse_args(argv))


if __name__ == "__main__":
    main()
