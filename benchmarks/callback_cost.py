"""What the callback costs: PPO environment steps per second with and without rlnorm.

Usage:
    python benchmarks/callback_cost.py [--config configs/cartpole.yaml] [--steps 20000]
        [--repeats 6] [--actions policy|scripted] [--schedule turns|runs] [--warmup 1]
        [--accelerator cpu|gpu]

Runs the reference PPO of a config (its model and ``NormalizerCallback`` settings, as
``rlnorm fit`` reads them, e.g. ``configs/cartpole.yaml`` or ``configs/pendulum.yaml``) for a
fixed number of environment steps, with the callback and without normalization, each mode in
a fresh process with one torch thread. What is timed is ``trainer.fit`` as a whole: every
rollout (environment steps, policy forward passes, the normalizer calls), every PPO update and
every Lightning hook, not the process start-up nor the imports. ``--warmup`` pairs (discarded)
come first, and which mode goes first alternates between repeats.

``--schedule`` says how the two modes of a repeat share the machine:

- ``turns`` (default): both processes run at once but take turns, one PPO iteration (rollout
  and update, about 0.1 s) at a time, and each clock runs only during its own turns
  (:class:`Turns`). This machine's speed drifts by 10-20% between runs seconds apart (one
  seeded run, repeated four times back to back, took 6.3 to 8.7 s), which swamps a cost of a
  few percent when the modes run one after the other; taking turns puts both under the same
  drift.
- ``runs``: one run after the other (the earlier method, kept for comparison).

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
  hooks, timed call by call in the runs with rlnorm): a direct measure of its own cost, and
  that share method by method with the time of one call (where the time inside goes).
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

from normalization_effect import MODES, ROOT, bare_trainer, run_setup, seconds_inside

ACTIONS = ("policy", "scripted")
SCHEDULES = ("turns", "runs")


def worker(
    config_path: str,
    mode: str,
    seed: int,
    steps: int,
    accelerator: str,
    actions: str,
    baton: tuple[Any, Any] | None = None,
) -> dict[str, Any]:
    """Train once and return the figures (runs in its own process).

    With a ``baton`` (this run's semaphore and the other run's), the run holds the CPU in
    turns with the other mode's run: it works only between acquiring its semaphore and
    releasing the other's, one rollout-and-update iteration at a time, and times only those
    turns.
    """
    import warnings

    import lightning as L  # noqa: N812
    import torch
    from torch.distributions import Distribution

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
    model_args, callbacks, spent = run_setup(config_path, mode, seed, steps)
    turns = Turns(baton) if baton is not None else None
    if turns is not None:
        # First and last in the list: the turns enclose every hook of the other callbacks.
        callbacks = [turns.start_hooks(), *callbacks, turns.end_hooks()]
    L.seed_everything(seed, verbose=False)
    model = (ScriptedPPO if actions == "scripted" else PPO)(**model_args)
    trainer = bare_trainer(accelerator, callbacks)
    start, cpu_start = time.perf_counter(), time.process_time()
    trainer.fit(model)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    spans = []
    if turns is not None:
        wall, cpu, spans = turns.wall, turns.cpu, turns.spans
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
        "rlnorm_s": seconds_inside(spent),
        "rlnorm_calls": spent,
        "turns": spans,
    }


#: Longest wait for the other run's turn before giving up (it crashed).
TURN_TIMEOUT_S = 600.0


class Turns:
    """Two runs in two processes taking turns, one PPO iteration at a time, each timing its own.

    The machines this runs on change speed by 10-20% between runs seconds apart (the same
    seeded run, repeated, took 6.3 to 8.7 s), far more than the few percent to measure. Taking
    turns every iteration (about 0.1 s) puts both modes under the same slow drifts of the
    machine's speed: a run's clock runs only during its own turns. A turn starts when the run
    acquires its semaphore and ends at the start of its next iteration, when it releases the
    other's: it covers the rollout, the update and every hook in between. The first turn starts
    at ``setup`` and the last ends at ``teardown``, so the turns add up to the whole fit.
    """

    def __init__(self, baton: tuple[Any, Any]) -> None:
        self.mine, self.other = baton
        self.wall = 0.0
        self.cpu = 0.0
        #: (start, end) of every turn, on the monotonic clock all processes share.
        self.spans: list[tuple[float, float]] = []
        self._started: tuple[float, float] | None = None

    def begin(self) -> None:
        if not self.mine.acquire(timeout=TURN_TIMEOUT_S):
            raise RuntimeError("the other run never handed over its turn")
        self._started = (time.perf_counter(), time.process_time())

    def end(self) -> None:
        assert self._started is not None
        wall, cpu = self._started
        now = time.perf_counter()
        self.spans.append((wall, now))
        self.wall += now - wall
        self.cpu += time.process_time() - cpu
        self._started = None
        self.other.release()

    def start_hooks(self) -> Any:
        """A callback that takes the first turn and changes turns at each iteration's start."""
        import lightning as L  # noqa: N812

        turns = self

        class TurnStart(L.Callback):
            def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
                turns.begin()

            def on_train_batch_start(self, *args: Any) -> None:
                if trainer_batch_started[0]:
                    turns.end()
                    turns.begin()
                trainer_batch_started[0] = True

        trainer_batch_started = [False]
        return TurnStart()

    def end_hooks(self) -> Any:
        """A callback that ends the last turn after every other callback's teardown."""
        import lightning as L  # noqa: N812

        turns = self

        class TurnEnd(L.Callback):
            def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
                turns.end()

        return TurnEnd()


def _interleaved_worker(args: tuple[Any, ...], baton: tuple[Any, Any], results: Any) -> None:
    try:
        results.put(worker(*args, baton=baton))
    except BaseException as error:  # report it: the parent is waiting on the queue
        results.put({"error": repr(error)})
        raise


def run_pair(
    config: str, seed: int, steps: int, accelerator: str, actions: str, first: str
) -> dict[str, dict[str, Any]]:
    """Both modes at once in two processes taking turns (:class:`Turns`); ``first`` starts."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    semaphores = {mode: context.Semaphore(0) for mode in MODES}
    results = context.Queue()
    processes = []
    for mode in MODES:
        other = next(m for m in MODES if m != mode)
        baton = (semaphores[mode], semaphores[other])
        process = context.Process(
            target=_interleaved_worker,
            args=((config, mode, seed, steps, accelerator, actions), baton, results),
        )
        process.start()
        processes.append(process)
    semaphores[first].release()
    out = [results.get(timeout=TURN_TIMEOUT_S * 2) for _ in processes]
    for process in processes:
        process.join()
    errors = [r["error"] for r in out if "error" in r]
    if errors:
        raise RuntimeError(f"run {config} seed {seed} failed: {errors}")
    for result in out:
        print(json.dumps({k: v for k, v in result.items() if k != "turns"}), flush=True)
    return {r["mode"]: r for r in out}


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
    print(json.dumps({k: v for k, v in result.items() if k != "turns"}), flush=True)
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
    parser.add_argument(
        "--schedule",
        default="turns",
        choices=SCHEDULES,
        help="turns: both modes at once, taking turns every iteration; runs: one after another",
    )
    args = parser.parse_args()
    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    for repeat in range(-args.warmup, args.repeats):  # negative repeats: discarded warm-up
        # Alternate which mode goes first, so a trend in the machine's load favours neither.
        order = MODES if repeat % 2 == 0 else MODES[::-1]
        seed = max(repeat + 1, 1)
        if args.schedule == "turns":
            pair = run_pair(args.config, seed, args.steps, args.accelerator, args.actions, order[0])
        else:
            pair = {
                mode: run_one(args.config, mode, seed, args.steps, args.accelerator, args.actions)
                for mode in order
            }
        if repeat >= 0:
            for mode in MODES:
                runs[mode].append(pair[mode])
    with_rlnorm, without = runs["rlnorm"], runs["none"]
    # The headline: whole-loop throughput with / without, paired by repeat (same seed, run back
    # to back), with its spread over the repeats.
    ratios = [a["sps"] / b["sps"] for a, b in zip(with_rlnorm, without, strict=True)]
    cpu_ratios = [a["cpu_sps"] / b["cpu_sps"] for a, b in zip(with_rlnorm, without, strict=True)]
    shares = [r["rlnorm_s"] / r["wall_s"] for r in with_rlnorm]
    shown = ", ".join(f"{100 * share:.2f}%" for share in shares)
    print(
        f"\n{args.config}, {args.steps} env steps, {args.repeats} repeats, {args.actions} "
        f"actions, schedule {args.schedule}, {args.accelerator}:\n"
        f"- whole-loop env steps/s, with rlnorm / without (paired by seed): "
        f"{spread(ratios)} (target >= 0.97)\n"
        f"- the same ratio by process CPU time: {spread(cpu_ratios)}\n"
        f"- median env steps/s with rlnorm {statistics.median(r['sps'] for r in with_rlnorm):,.0f}"
        f", without {statistics.median(r['sps'] for r in without):,.0f}\n"
        f"- time inside the callback: median {100 * statistics.median(shares):.2f}% of the "
        f"training wall time (runs: {shown})\n"
        f"- of which, by method: {by_method(with_rlnorm)}"
    )


def by_method(runs: list[dict[str, Any]]) -> str:
    """Each timed method's median share of the wall time and time per call, largest first."""
    rows = []
    for name in sorted({name for run in runs for name in run["rlnorm_calls"]}):
        tallies = [(run["rlnorm_calls"].get(name, [0, 0.0]), run["wall_s"]) for run in runs]
        called = [(calls, seconds, wall) for (calls, seconds), wall in tallies if calls]
        if not called:  # a hook this loop never reached
            continue
        share = statistics.median(seconds / wall for _, seconds, wall in called)
        calls = statistics.median(calls for calls, _, _ in called)
        per_call = statistics.median(seconds / calls for calls, seconds, _ in called)
        if share >= 5e-4:  # 0.05% of the loop
            row = f"{name} {100 * share:.2f}% ({calls:,.0f} calls, {1e6 * per_call:,.1f} us each)"
            rows.append((share, row))
    return "; ".join(row for _, row in sorted(rows, reverse=True)) or "none above 0.05%"


if __name__ == "__main__":
    main()
