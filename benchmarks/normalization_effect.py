"""Does normalization help, and does it do no harm? PPO with and without rlnorm, several seeds.

Usage:
    python benchmarks/normalization_effect.py [--configs configs/cartpole.yaml ...]
        [--seeds 1 2 3] [--steps 100000] [--jobs 2]
        [--out benchmarks/results/normalization_effect.md]

Each run trains the reference PPO from a config in ``configs/`` (the model settings and the
``NormalizerCallback`` settings are read from the YAML, so the benchmark measures exactly what
``rlnorm fit`` runs) in a fresh process with one torch thread, once with the callback and once
without it. The table reports, per environment and mode, the mean return of the last 20
episodes at the end, how many seeds solved the task (CartPole: last-20 mean >= 475) and after
how many environment steps, the wall time and the environment steps per second.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

from rlnorm.agents.ppo import solved_return

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIGS = ["configs/cartpole.yaml", "configs/cartpole_scaled.yaml", "configs/pendulum.yaml"]
MODES = ("rlnorm", "none")


def run_setup(
    config_path: str, mode: str, seed: int, steps: int
) -> tuple[dict[str, Any], list[Any], dict[str, list[float]]]:
    """A run's model arguments, its callbacks (timed) and where their time adds up.

    The model arguments are the config's, for ``steps`` environment steps and ``seed``; with
    ``mode="rlnorm"`` the callbacks are the config's ``NormalizerCallback``, each call of which
    is counted and timed per method in ``spent`` (see :func:`time_calls`); with ``"none"``
    there are none.
    """
    import rlnorm

    config = yaml.safe_load(Path(config_path).read_text())
    model_args = dict(config.get("model", {}))
    model_args.update(total_timesteps=steps, seed=seed)
    callbacks: list[Any] = []
    if mode == "rlnorm":
        for entry in config["trainer"]["callbacks"]:
            if entry["class_path"].endswith("NormalizerCallback"):
                callbacks.append(rlnorm.NormalizerCallback(**entry.get("init_args", {})))
    spent: dict[str, list[float]] = {}
    for callback in callbacks:
        time_calls(callback, spent)
    return model_args, callbacks, spent


def bare_trainer(accelerator: str, callbacks: list[Any]) -> Any:
    """A one-device Trainer that trains until the model stops it, writing and printing nothing."""
    import logging

    import lightning as L  # noqa: N812

    # Lightning's start-up lines ("GPU available: ...", tips) would repeat for every run.
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    return L.Trainer(
        accelerator=accelerator,
        devices=1,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_epochs=-1,
    )


def worker(config_path: str, mode: str, seed: int, steps: int, accelerator: str = "cpu") -> dict:
    """Train once and return the figures (runs in its own process)."""
    import warnings

    import lightning as L  # noqa: N812
    import numpy as np
    import torch

    from rlnorm.agents.ppo import PPO

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    model_args, callbacks, spent = run_setup(config_path, mode, seed, steps)
    L.seed_everything(seed, verbose=False)
    model = PPO(**model_args)
    trainer = bare_trainer(accelerator, callbacks)
    start = time.perf_counter()
    trainer.fit(model)
    wall = time.perf_counter() - start
    return {
        "env_id": model.hparams.env_id,
        "mode": mode,
        "seed": seed,
        "steps": model.env_steps,
        "final_return": float(np.mean(model.episode_returns)),
        "solved_at": model.solved_at,
        "wall_s": wall,
        "sps": model.env_steps / wall,
        "rlnorm_s": seconds_inside(spent),
    }


#: What the trainer and the model call on the callback: its API and its Lightning hooks.
TIMED_METHODS = (
    "update_obs",
    "normalize_obs",
    "normalize_rewards",
    "scale_rewards",
    "setup",
    "on_fit_start",
    "on_train_start",
    "on_train_batch_start",
    "on_train_batch_end",
    "on_train_end",
    "on_train_epoch_end",
    "state_dict",
    "on_save_checkpoint",
)


def time_calls(callback: object, spent: dict[str, list[float]]) -> None:
    """Count and time every call of the callback's timed methods: ``spent[name] = [calls, s]``."""

    def timed(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        tally = spent.setdefault(name, [0, 0.0])

        def call(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                tally[1] += time.perf_counter() - start
                tally[0] += 1

        return call

    for name in TIMED_METHODS:
        if callable(getattr(callback, name, None)):  # hooks set to None are never dispatched
            setattr(callback, name, timed(name, getattr(callback, name)))


def seconds_inside(spent: dict[str, list[float]]) -> float:
    """The wall time of all timed calls together."""
    return sum(seconds for _, seconds in spent.values())


def run_one(config: str, mode: str, seed: int, steps: int, accelerator: str = "cpu") -> dict:
    """Train once in a fresh process; print and return its figures."""
    cmd = [sys.executable, __file__, "--worker", config, mode, str(seed), str(steps), accelerator]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"run {config} {mode} {seed} failed:\n{out.stderr[-2000:]}")
    result = json.loads(lines[-1])
    print(json.dumps(result), flush=True)
    return result


def table(results: list[dict], steps: int) -> str:
    rows = [
        f"PPO ({steps:,} environment steps per run), seeds {sorted({r['seed'] for r in results})}; "
        f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores, one torch "
        f"thread per run, Python {platform.python_version()}.",
        "",
        "| environment | normalization | return, last 20 episodes (mean ± sd) | solved | "
        "steps to solve (median) | wall time (median) | env steps/s (median) |",
        "|---|---|---|---|---|---|---|",
    ]
    for env_id in dict.fromkeys(r["env_id"] for r in results):
        for mode in MODES:
            runs = [r for r in results if r["env_id"] == env_id and r["mode"] == mode]
            if not runs:
                continue
            returns = [r["final_return"] for r in runs]
            solved = [r["solved_at"] for r in runs if r["solved_at"] is not None]
            has_target = solved_return(env_id) is not None
            spread = statistics.stdev(returns) if len(returns) > 1 else 0.0
            rows.append(
                f"| {env_id} | {'rlnorm (config)' if mode == 'rlnorm' else 'none'} | "
                f"{statistics.mean(returns):.1f} ± {spread:.1f} | "
                f"{f'{len(solved)}/{len(runs)}' if has_target else 'no target'} | "
                f"{f'{statistics.median(solved):,.0f}' if solved else '-'} | "
                f"{statistics.median(r['wall_s'] for r in runs):.0f} s | "
                f"{statistics.median(r['sps'] for r in runs):,.0f} |"
            )
    return "\n".join(rows) + "\n"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        config, mode, seed, steps, accelerator = sys.argv[2:7]
        print(json.dumps(worker(config, mode, int(seed), int(steps), accelerator)))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/normalization_effect.md")
    args = parser.parse_args()
    jobs = [(c, m, s) for c in args.configs for m in MODES for s in args.seeds]
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda job: run_one(*job, args.steps), jobs))
    text = table(results, args.steps)
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    (out.with_suffix(".json")).write_text(json.dumps(results, indent=1))
    print(text)


if __name__ == "__main__":
    main()
