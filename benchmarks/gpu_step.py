"""A 4096-env step with rlnorm's callback attached, and the callback's share of a GPU PPO step.

Usage:
    python benchmarks/gpu_step.py [--device cuda|cpu] [--num-envs N] [--repeats R]
        [--block-steps S] [--ppo-repeats P] [--ppo-iterations I] [--out [PATH]]

Everything runs on one device, environment included: ``rlnorm.agents.torch_envs.TorchCartPole``
(gymnasium's ``CartPole-v1`` as batched tensor code, observations scaled like
``rlnorm/ScaledCartPole-v1``), so no step copies data to the host and what is measured is the
GPU work and its launch cost. Two measurements, both with a real Lightning ``Trainer`` and a
``NormalizerCallback(reward=True)`` (no logger, so no telemetry is written):

1. **One environment step** of ``--num-envs`` copies (default 4096 on CUDA), microseconds per
   step, inside ``training_step`` of a module whose Trainer has the callback attached. Modes:
   ``env only`` (fixed actions), ``policy + env`` (a 64-64 tanh actor's forward pass and a
   categorical sample, then the step), ``policy + env + rlnorm`` (before the policy:
   ``update_obs`` and ``normalize_obs`` of the raw observations through the callback's API;
   after the step: ``normalize_rewards``, i.e. the reward normalizer's update and scaling),
   and, where ``rlnorm.backends.fused`` exists, the same with ``use_fused(False)``. Each mode
   keeps its own environment. Each timed sample is a block of ``--block-steps`` steps between
   two CUDA events (host clock on the CPU), synchronised before and after; the modes take
   turns, the first mode rotating from one repeat to the next, and the first ``--warmup``
   repeats are dropped. Reported: the median over repeats and rlnorm's extra time per step.
2. **One PPO iteration** (a rollout of ``--num-steps`` steps in every environment, then
   ``update_epochs`` x ``num_minibatches`` clipped-objective updates) of the reference PPO
   (``rlnorm.agents.ppo.PPO``) whose ``collect_rollout`` is replaced by a device-resident one
   (:class:`DevicePPO`; the same normalization protocol: ``normalize_obs`` every step,
   ``update_obs`` of the whole rollout, ``normalize_rewards`` of the rollout), trained by
   ``Trainer.fit`` with the callback attached and without it (and with ``use_fused(False)``
   where the fused module exists), one fresh fit per mode and repeat, the modes alternating.
   An iteration's time is the host clock between the module's consecutive
   ``on_train_batch_start`` hooks (the device synchronised at each), so it includes every
   hook, the callback's too; the first ``--ppo-warmup`` iterations of each fit are dropped.
   Reported: the median iteration per mode and the callback's share of an iteration,
   ``(with - without) / with``, paired by repeat (median and range).

``torch.distributions`` argument validation is turned off (``Distribution.
set_default_validate_args(False)``) for every mode: validating a categorical's logits reads
a value back to the host at every step, which would measure that synchronisation rather than
the GPU work. Results go to ``benchmarks/results/gpu_step_<device>.md`` with ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import platform
import statistics
import time
import warnings
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import lightning as L  # noqa: N812 - the conventional alias
import torch
from torch import Tensor
from torch.distributions import Categorical, Distribution
from torch.utils.data import DataLoader

import rlnorm
from rlnorm.agents.envs import SCALED_CARTPOLE
from rlnorm.agents.ppo import PPO, Rollout, mlp
from rlnorm.agents.torch_envs import TorchCartPole

try:  # the fused CUDA kernels; older checkouts have no such module
    from rlnorm.backends import fused as _fused
except ImportError:
    _fused = None

SCALE, OFFSET = 100.0, 1000.0  # rlnorm/ScaledCartPole-v1's observation scale
GAMMA = 0.99

QUIET = (
    ".*does not have many workers.*",
    ".*isinstance.treespec, LeafSpec.*",
    ".*smaller than the logging interval.*",
    ".*GPU available but not used.*",
    ".*TPU available but not used.*",
    ".*`training_step` returned `None`.*",
)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fused_off() -> contextlib.AbstractContextManager[object]:
    return _fused.use_fused(False) if _fused is not None else contextlib.nullcontext()


def make_trainer(device: torch.device, callbacks: list) -> L.Trainer:
    """A quiet single-device Trainer for one epoch (the modules size their data loaders)."""
    return L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        max_epochs=1,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )


def make_callback(num_envs: int) -> rlnorm.NormalizerCallback:
    return rlnorm.NormalizerCallback(
        obs_shape=TorchCartPole.observation_dim,
        reward=True,
        num_envs=num_envs,
        gamma=GAMMA,
        log_histograms=False,
    )


# ---------------------------------------------------------------------- 1. one env step


class StepBench(L.LightningModule):
    """Each ``training_step`` times one block of env steps in every mode (one repeat)."""

    def __init__(
        self, num_envs: int, block_steps: int, modes: list[str], blocks: int, seed: int = 0
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.blocks = blocks
        self.num_envs = num_envs
        self.block_steps = block_steps
        self.modes = modes
        self.seed = seed
        self.actor = mlp(TorchCartPole.observation_dim, 64, TorchCartPole.action_count, 0.01)
        self.samples: dict[str, list[float]] = {mode: [] for mode in modes}

    def train_dataloader(self) -> DataLoader:
        return DataLoader(range(self.blocks), batch_size=None)

    def configure_optimizers(self) -> None:
        return None

    def on_fit_start(self) -> None:
        self.norm = rlnorm.get_normalizer(self)
        self.envs: dict[str, TorchCartPole] = {}
        self.obs: dict[str, Tensor] = {}
        for mode in self.modes:
            env = TorchCartPole(
                self.num_envs, device=self.device, scale=SCALE, offset=OFFSET, seed=self.seed
            )
            self.envs[mode] = env
            self.obs[mode] = env.reset()
        self.fixed_actions = torch.arange(self.num_envs, device=self.device) % 2

    def act(self, obs: Tensor) -> Tensor:
        return Categorical(logits=self.actor(obs)).sample()

    def one_step(self, mode: str) -> None:
        env, raw = self.envs[mode], self.obs[mode]
        if mode == "env only":
            self.obs[mode] = env.step(self.fixed_actions).obs
            return
        if mode == "policy + env":
            self.obs[mode] = env.step(self.act(raw)).obs
            return
        norm = self.norm
        norm.update_obs(raw)
        step = env.step(self.act(norm.normalize_obs(raw)))
        norm.normalize_rewards(step.reward, step.terminated | step.truncated)
        self.obs[mode] = step.obs

    def time_block(self, mode: str) -> float:
        """Seconds per step of one block of ``block_steps`` steps in ``mode``."""
        context = fused_off() if mode.endswith("fused off") else contextlib.nullcontext()
        with context:
            sync(self.device)
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(True)
                start.record()
                for _ in range(self.block_steps):
                    self.one_step(mode)
                end.record()
                end.synchronize()
                return start.elapsed_time(end) / 1e3 / self.block_steps
            begin = time.perf_counter()
            for _ in range(self.block_steps):
                self.one_step(mode)
            return (time.perf_counter() - begin) / self.block_steps

    @torch.no_grad()
    def training_step(self, batch: int, batch_idx: int) -> None:
        shift = batch_idx % len(self.modes)  # rotate which mode goes first
        for mode in self.modes[shift:] + self.modes[:shift]:
            self.samples[mode].append(self.time_block(mode))


def step_modes() -> list[str]:
    modes = ["env only", "policy + env", "policy + env + rlnorm"]
    if _fused is not None:
        modes.append("policy + env + rlnorm, fused off")
    return modes


def bench_step(
    device: torch.device, num_envs: int, block_steps: int, repeats: int, warmup: int
) -> list[str]:
    modes = step_modes()
    module = StepBench(num_envs, block_steps, modes, blocks=warmup + repeats)
    trainer = make_trainer(device, [make_callback(num_envs)])
    trainer.fit(module)
    med = {mode: statistics.median(ts[warmup:]) * 1e6 for mode, ts in module.samples.items()}
    spread = {
        mode: (min(ts[warmup:]) * 1e6, max(ts[warmup:]) * 1e6)
        for mode, ts in module.samples.items()
    }
    base = med["policy + env"]
    lines = [
        f"### One step of {num_envs} environments (µs per step)",
        "",
        f"Median of {repeats} blocks of {block_steps} steps per mode ({warmup} warm-up blocks "
        "dropped), modes interleaved.",
        "",
        "| mode | µs per step | range | rlnorm's extra µs | rlnorm's share of the step |",
        "|---|---:|---:|---:|---:|",
    ]
    for mode in modes:
        extra = share = "—"
        if "rlnorm" in mode:
            extra = f"{med[mode] - base:.1f}"
            share = f"{100 * (med[mode] - base) / med[mode]:.1f}%"
        low, high = spread[mode]
        lines.append(f"| {mode} | {med[mode]:.1f} | {low:.1f}-{high:.1f} | {extra} | {share} |")
    rl = med["policy + env + rlnorm"]
    lines += [
        "",
        f"Env steps per second: {num_envs / (rl * 1e-6):,.0f} with rlnorm, "
        f"{num_envs / (base * 1e-6):,.0f} without (policy + env).",
        "",
    ]
    return lines


# ---------------------------------------------------------------------- 2. a PPO iteration


class DevicePPO(PPO):
    """The reference PPO on :class:`TorchCartPole`: rollouts never leave the device.

    Only the environment side changes: ``setup`` makes a :class:`TorchCartPole` on the
    training device, and ``collect_rollout`` keeps every tensor there (truncated episodes are
    bootstrapped from the critic's values of their last observations, computed for the whole
    rollout in one batch, with the statistics the rollout acted on). The update, the losses
    and the normalization protocol are the reference PPO's.
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("env_id", SCALED_CARTPOLE)
        super().__init__(**kwargs)
        if self.hparams.env_id not in ("CartPole-v1", SCALED_CARTPOLE):
            raise ValueError("DevicePPO plays CartPole-v1 or rlnorm/ScaledCartPole-v1 only.")
        self.env: TorchCartPole | None = None
        self.batch_starts: list[float] = []

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.env is None:
            scaled = self.hparams.env_id == SCALED_CARTPOLE
            self.env = TorchCartPole(
                self.hparams.num_envs,
                device=self.trainer.strategy.root_device,
                scale=SCALE if scaled else 1.0,
                offset=OFFSET if scaled else 0.0,
                seed=self.hparams.seed,
            )
            self._obs = self.env.reset()
            self._generator = torch.Generator().manual_seed(self.hparams.seed)

    def teardown(self, stage: str) -> None:
        self.env = None

    def on_train_batch_start(self, batch: int, batch_idx: int) -> int | None:
        sync(self.device)
        self.batch_starts.append(time.perf_counter())
        return super().on_train_batch_start(batch, batch_idx)

    def on_train_end(self) -> None:
        sync(self.device)
        self.batch_starts.append(time.perf_counter())

    @torch.no_grad()
    def collect_rollout(self) -> Rollout:
        assert self.env is not None
        hp = self.hparams
        raw_buf, obs_buf, actions, logprobs, values = [], [], [], [], []
        rewards, ended, truncated, final_raw, returns, lengths = [], [], [], [], [], []
        raw_obs = self._obs
        obs = self.observe(raw_obs)
        for _ in range(hp.num_steps):
            dist = self.distribution(obs)
            action = dist.sample()
            raw_buf.append(raw_obs)
            obs_buf.append(obs)
            actions.append(action)
            logprobs.append(self.log_prob(dist, action))
            values.append(self.critic(obs).squeeze(-1))
            step = self.env.step(action)
            rewards.append(step.reward)
            ended.append(step.terminated | step.truncated)
            truncated.append(step.truncated)  # never set where terminated
            final_raw.append(step.final_obs)
            returns.append(step.episode_return)
            lengths.append(step.episode_length)
            raw_obs = step.obs
            obs = self.observe(raw_obs)
        self._obs = raw_obs
        next_value = self.critic(obs).squeeze(-1)
        # Truncated episodes: the value of their last observation, under the statistics the
        # rollout acted on (before this rollout's update), for the whole rollout at once.
        final_values = self.critic(self.observe(torch.stack(final_raw))).squeeze(-1)
        bootstrap = torch.where(torch.stack(truncated), final_values, 0.0)

        if self.normalizer is not None:
            self.normalizer.update_obs(torch.stack(raw_buf))
        reward = torch.stack(rewards)
        done = torch.stack(ended)
        if self.normalizer is not None and self.normalizer.config.reward:
            reward = self.normalizer.normalize_rewards(reward, done)
        reward = reward + hp.gamma * bootstrap
        self.env_steps += self.steps_per_rollout * self.trainer.world_size
        self._record_device_episodes(torch.stack(returns), torch.stack(lengths))
        return Rollout(
            obs=torch.stack(obs_buf),
            actions=torch.stack(actions),
            logprobs=torch.stack(logprobs),
            values=torch.stack(values),
            rewards=reward,
            ended=done,
            next_value=next_value,
        )

    def _record_device_episodes(self, returns: Tensor, lengths: Tensor) -> None:
        """The last episodes that ended (one read back to the host per rollout)."""
        finished = lengths > 0
        keep = self.episode_returns.maxlen or 20
        self.episode_returns.extend(returns[finished][-keep:].tolist())
        self.episode_lengths.extend(lengths[finished][-keep:].float().tolist())


def ppo_modes() -> list[str]:
    modes = ["without rlnorm", "with NormalizerCallback"]
    if _fused is not None:
        modes.append("with NormalizerCallback, fused off")
    return modes


def run_ppo(
    device: torch.device, mode: str, settings: dict[str, int], iterations: int, warmup: int
) -> list[float]:
    """One fresh fit; seconds of each iteration after the warm-up ones."""
    L.seed_everything(1, verbose=False)
    total = (warmup + iterations) * settings["num_envs"] * settings["num_steps"]
    model = DevicePPO(total_timesteps=total, gamma=GAMMA, **settings)
    callbacks = [] if mode == "without rlnorm" else [make_callback(settings["num_envs"])]
    trainer = make_trainer(device, callbacks)
    with fused_off() if mode.endswith("fused off") else contextlib.nullcontext():
        trainer.fit(model)
    starts = model.batch_starts
    # Each iteration: from its on_train_batch_start to the next one (or to on_train_end).
    times = [b - a for a, b in itertools.pairwise(starts)]
    return times[warmup : warmup + iterations]


def bench_ppo(
    device: torch.device, settings: dict[str, int], repeats: int, iterations: int, warmup: int
) -> list[str]:
    modes = ppo_modes()
    per_repeat: dict[str, list[float]] = {mode: [] for mode in modes}
    for repeat in range(repeats):
        for mode in modes if repeat % 2 == 0 else modes[::-1]:
            per_repeat[mode].append(
                statistics.median(run_ppo(device, mode, settings, iterations, warmup))
            )
    med = {mode: statistics.median(ts) * 1e3 for mode, ts in per_repeat.items()}
    steps = settings["num_envs"] * settings["num_steps"]
    base = per_repeat["without rlnorm"]
    lines = [
        f"### One PPO iteration: {settings['num_steps']} steps x {settings['num_envs']} "
        f"environments, then {settings['update_epochs']} epochs x "
        f"{settings['num_minibatches']} minibatches (ms per iteration)",
        "",
        f"{repeats} fresh fits per mode (modes alternating), each the median of {iterations} "
        f"iterations after {warmup} warm-up ones; the table gives the median over the fits.",
        "",
        "| mode | ms per iteration | env steps/s | callback's share (by fit: median, range) |",
        "|---|---:|---:|---:|",
    ]
    for mode in modes:
        share = "—"
        if mode != "without rlnorm":
            shares = sorted((w - b) / w for w, b in zip(per_repeat[mode], base, strict=True))
            share = (
                f"{100 * statistics.median(shares):.1f}% "
                f"({100 * shares[0]:.1f}% to {100 * shares[-1]:.1f}%)"
            )
        rate = steps / (med[mode] * 1e-3)
        lines.append(f"| {mode} | {med[mode]:.2f} | {rate:,.0f} | {share} |")
    lines.append("")
    return lines


# ---------------------------------------------------------------------- main


def version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine(device: torch.device) -> str:
    gpu = f"GPU {torch.cuda.get_device_name(device)}, " if device.type == "cuda" else ""
    libs = ", ".join(f"{name} {version(name)}" for name in ("rlnorm", "torch", "lightning"))
    fused = "absent" if _fused is None else "present"
    return (
        f"{gpu}{os.cpu_count()} logical CPU cores, torch threads {torch.get_num_threads()}; "
        f"Python {platform.python_version()}, {libs}; rlnorm.backends.fused {fused}"
    )


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        for pattern in QUIET:
            warnings.filterwarnings("ignore", message=pattern)
        yield


DEFAULTS: dict[str, dict[str, int]] = {
    # device: num_envs, block_steps, repeats, warmup, num_steps, ppo_repeats, ppo_iterations,
    # ppo_warmup, update_epochs, num_minibatches
    "cuda": {
        "num_envs": 4096,
        "block_steps": 100,
        "repeats": 15,
        "warmup": 3,
        "num_steps": 32,
        "ppo_repeats": 3,
        "ppo_iterations": 10,
        "ppo_warmup": 3,
        "update_epochs": 4,
        "num_minibatches": 4,
    },
    "cpu": {
        "num_envs": 64,
        "block_steps": 20,
        "repeats": 5,
        "warmup": 2,
        "num_steps": 16,
        "ppo_repeats": 2,
        "ppo_iterations": 3,
        "ppo_warmup": 1,
        "update_epochs": 2,
        "num_minibatches": 2,
    },
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    for name in DEFAULTS["cuda"]:
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            type=int,
            default=None,
            help=f"default {DEFAULTS['cuda'][name]} on cuda, {DEFAULTS['cpu'][name]} on cpu",
        )
    parser.add_argument("--skip-ppo", action="store_true", help="time the env step only")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads (default 1 on cpu: tiny matrices, shared cores)",
    )
    parser.add_argument(
        "--out",
        nargs="?",
        const="",
        default=None,
        help="also write the tables to PATH (default benchmarks/results/gpu_step_<device>.md)",
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    opts = {
        name: getattr(args, name) if getattr(args, name) is not None else default
        for name, default in DEFAULTS[device.type].items()
    }
    if args.threads is not None or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    Distribution.set_default_validate_args(False)
    header = [
        f"## rlnorm on a device-resident environment: env step and PPO iteration ({device.type})",
        "",
        f"Machine: {machine(device)}.",
        "",
        "Environment: `rlnorm.agents.torch_envs.TorchCartPole` (CartPole-v1 as tensor code, "
        "observations scaled x100 + 1000 like rlnorm/ScaledCartPole-v1) on the same device; "
        "callback `NormalizerCallback(reward=True, gamma=0.99)`, no logger. See the docstring "
        "of `benchmarks/gpu_step.py` for exactly what is timed.",
        "",
    ]
    print("\n".join(header), flush=True)
    parts = list(header)
    with quiet():
        lines = bench_step(
            device, opts["num_envs"], opts["block_steps"], opts["repeats"], opts["warmup"]
        )
        print("\n".join(lines), flush=True)
        parts += lines
        if not args.skip_ppo:
            settings = {
                "num_envs": opts["num_envs"],
                "num_steps": opts["num_steps"],
                "update_epochs": opts["update_epochs"],
                "num_minibatches": opts["num_minibatches"],
            }
            lines = bench_ppo(
                device,
                settings,
                opts["ppo_repeats"],
                opts["ppo_iterations"],
                opts["ppo_warmup"],
            )
            print("\n".join(lines), flush=True)
            parts += lines
    if args.out is not None:
        out = Path(args.out or Path(__file__).parent / "results" / f"gpu_step_{device.type}.md")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(parts))
        print(f"written to {out}")


if __name__ == "__main__":
    main()
