"""What the callback costs: PPO environment steps per second with and without rlnorm.

Usage:
    python benchmarks/callback_cost.py [--config configs/cartpole.yaml] [--steps 20000]
        [--repeats 6] [--actions policy|scripted] [--warmup 1] [--accelerator cpu|gpu]

Runs the reference PPO of a config (its model and ``NormalizerCallback`` settings, as
``rlnorm fit`` reads them, e.g. ``configs/cartpole.yaml`` or ``configs/pendulum.yaml``) for a
fixed number of environment steps, alternately with the callback and without normalization,
each run in a fresh process with one torch thread, one run at a time so the two modes share
the machine's noise; the order alternates between repeats and ``--warmup`` runs (discarded)
come first. What is timed is ``trainer.fit`` as a whole: every rollout (environment steps,
policy forward passes, the normalizer calls), every PPO update and every Lightning hook, not
the process start-up nor the imports.

``--actions`` chooses what drives the environments:

- ``policy`` (default): the policy's own samples, as in training. The two modes then learn
  different policies, so on CartPole the episode lengths (and with them the environment resets
  per step) differ between them: the ratio also measures what a different policy costs.
- ``scripted``: a controlled comparison. The policy still computes its distribution on its
  observations (normalized or raw), samples from it, and the log-probabilities and values are
  kept and trained on exactly as in training, but the actions sent to the environments (and
  trained on) come from a seeded random stream of their own, the same in both modes. The
  environments therefore go through identical trajectories, the updates run on tensors of the
  same shapes, and the only difference between the modes is the work of the callback and of
  the normalizer calls.

It prints:

- the headline: the whole-loop ratio of environment steps per second, with rlnorm / without,
  paired by repeat (the same seed, run back to back), as the median over the repeats with its
  quartiles and range; the performance target is at least 0.97 (use 6 repeats or more);
- the same ratio of process CPU time, which leaves out the time the machine's other processes
  took the CPU from the run (less noisy on a shared machine; ``wall`` is the figure that
  counts);
- the median environment steps per second of each mode;
- the share of the training wall time spent inside the callback (its API and its Lightning
  hooks, timed call by call in the runs with rlnorm): a direct measure of its own cost.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from normalization_effect import MODES, ROOT, time_calls

ACTIONS = ("policy", "scripted")


def worker(
    config_path: str, mode: str, seed: int, steps: int, accelerator: str, actions: str
) -> dict[str, Any]:
    """Train once and return the figures (runs in its own process)."""
    import warnings

    import lightning as L  # noqa: N812
    import torch
    import yaml
    from torch.distributions import Distribution

    import rlnorm
    from rlnorm.agents.ppo import PPO

    class ScriptedPPO(PPO):
        """PPO whose environments take actions from a seeded stream of their own.

        The policy's distribution is computed and sampled as in training (so the rollout does
        the same work), then the sample is replaced by the scripted action.
        """

        def setup(self, stage: str) -> None:
            super().setup(stage)
            self._actions = torch.Generator().manual_seed(10_000 + self.hparams.seed)

        def distribution(self, obs: torch.Tensor) -> Distribution:
            dist = super().distribution(obs)
            if torch.is_grad_enabled():  # the PPO update: nothing is sampled
                return dist
            sample = dist.sample

            def scripted(sample_shape: torch.Size = torch.Size()) -> torch.Tensor:  # noqa: B008
                shape = sample(sample_shape).shape
                if self.continuous:
                    assert self.envs is not None
                    space = self.envs.single_action_space
                    low = torch.as_tensor(space.low, dtype=torch.float32)
                    high = torch.as_tensor(space.high, dtype=torch.float32)
                    return low + (high - low) * torch.rand(shape, generator=self._actions)
                n = dist.logits.shape[-1]  # type: ignore[attr-defined]
                return torch.randint(0, n, shape, generator=self._actions)

            dist.sample = scripted  # type: ignore[method-assign]
            return dist

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    config = yaml.safe_load(Path(config_path).read_text())
    model_args = dict(config.get("model", {}))
    model_args.update(total_timesteps=steps, seed=seed)
    callbacks = []
    if mode == "rlnorm":
        for entry in config["trainer"]["callbacks"]:
            if entry["class_path"].endswith("NormalizerCallback"):
                callbacks.append(rlnorm.NormalizerCallback(**entry.get("init_args", {})))
    spent = [0.0]
    for callback in callbacks:
        time_calls(callback, spent)
    L.seed_everything(seed, verbose=False)
    model = (ScriptedPPO if actions == "scripted" else PPO)(**model_args)
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=1,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_epochs=-1,
    )
    start, cpu_start = time.perf_counter(), time.process_time()
    trainer.fit(model)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return {
        "env_id": model.hparams.env_id,
        "mode": mode,
        "actions": actions,
        "seed": seed,
        "steps": model.env_steps,
        "wall_s": wall,
        "cpu_s": cpu,
        "sps": model.env_steps / wall,
        "cpu_sps": model.env_steps / cpu,
        "rlnorm_s": spent[0],
    }


def run_one(
    config: str, mode: str, seed: int, steps: int, accelerator: str, actions: str
) -> dict[str, Any]:
    """Train once in a fresh process; print and return its figures."""
    cmd = [sys.executable, __file__, "--worker", config, mode, str(seed), str(steps)]
    cmd += [accelerator, actions]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"run {config} {mode} {seed} failed:\n{out.stderr[-2000:]}")
    result = json.loads(lines[-1])
    print(json.dumps(result), flush=True)
    return result


def spread(values: list[float]) -> str:
    """Median, quartiles and range of ``values`` as one phrase."""
    ordered = sorted(values)
    quartiles = (
        statistics.quantiles(ordered, n=4, method="inclusive") if len(ordered) > 1 else ordered * 3
    )
    return (
        f"median {statistics.median(ordered):.3f}, quartiles {quartiles[0]:.3f}-"
        f"{quartiles[2]:.3f}, range {ordered[0]:.3f}-{ordered[-1]:.3f}"
    )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        config, mode, seed, steps, accelerator, actions = sys.argv[2:8]
        print(json.dumps(worker(config, mode, int(seed), int(steps), accelerator, actions)))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/cartpole.yaml")
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--actions", default="policy", choices=ACTIONS)
    parser.add_argument("--warmup", type=int, default=1, help="discarded runs first")
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"])
    args = parser.parse_args()
    for _ in range(args.warmup):
        for mode in MODES:
            run_one(args.config, mode, 1, args.steps, args.accelerator, args.actions)
    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    for repeat in range(args.repeats):
        # Alternate which mode goes first, so a trend in the machine's load favours neither.
        for mode in MODES if repeat % 2 == 0 else MODES[::-1]:
            result = run_one(
                args.config, mode, repeat + 1, args.steps, args.accelerator, args.actions
            )
            runs[mode].append(result)
    with_rlnorm, without = runs["rlnorm"], runs["none"]
    # The headline: whole-loop throughput with / without, paired by repeat (same seed, run back
    # to back), with its spread over the repeats.
    ratios = [a["sps"] / b["sps"] for a, b in zip(with_rlnorm, without, strict=True)]
    cpu_ratios = [a["cpu_sps"] / b["cpu_sps"] for a, b in zip(with_rlnorm, without, strict=True)]
    shares = [r["rlnorm_s"] / r["wall_s"] for r in with_rlnorm]
    shown = ", ".join(f"{100 * share:.2f}%" for share in shares)
    print(
        f"\n{args.config}, {args.steps} env steps, {args.repeats} repeats, {args.actions} "
        f"actions, {args.accelerator}:\n"
        f"- whole-loop env steps/s, with rlnorm / without (paired by seed): "
        f"{spread(ratios)} (target >= 0.97)\n"
        f"- the same ratio by process CPU time: {spread(cpu_ratios)}\n"
        f"- median env steps/s with rlnorm {statistics.median(r['sps'] for r in with_rlnorm):,.0f}"
        f", without {statistics.median(r['sps'] for r in without):,.0f}\n"
        f"- time inside the callback: median {100 * statistics.median(shares):.2f}% of the "
        f"training wall time (runs: {shown})"
    )


if __name__ == "__main__":
    main()
