"""What the callback costs: PPO environment steps per second with and without rlnorm.

Usage:
    python benchmarks/callback_cost.py [--config configs/cartpole.yaml] [--steps 30000]
        [--repeats 5] [--accelerator cpu|gpu]

Runs the reference PPO of a config (its model and ``NormalizerCallback`` settings, as
``rlnorm fit`` reads them) for a fixed number of environment steps, alternately with the
callback and without normalization, each run in a fresh process with one torch thread, one
run at a time so the two modes share the machine's noise. It prints two figures:

- the share of the training wall time spent inside the callback (its API and its Lightning
  hooks, timed call by call in the runs with rlnorm): the direct measure of its cost;
- the median environment steps per second of each mode and their ratio (with / without); the
  performance target is a ratio of at least 0.97. The runs learn different policies, so
  episode lengths (and with them environment resets per step) differ between the modes, which
  makes this ratio noisy by several percent on a shared machine; the share above is not.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from normalization_effect import MODES, run_one


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/cartpole.yaml")
    parser.add_argument("--steps", type=int, default=30_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"])
    args = parser.parse_args()
    sps: dict[str, list[float]] = {mode: [] for mode in MODES}
    shares = []
    for repeat in range(args.repeats):
        # Alternate which mode goes first, so a trend in the machine's load favours neither.
        for mode in MODES if repeat % 2 == 0 else MODES[::-1]:
            result = run_one(args.config, mode, repeat + 1, args.steps, args.accelerator)
            sps[mode].append(result["sps"])
            if mode == "rlnorm":
                shares.append(result["rlnorm_s"] / result["wall_s"])
    with_rlnorm, without = (statistics.median(sps[mode]) for mode in MODES)
    runs = ", ".join(f"{100 * share:.2f}%" for share in shares)
    print(
        f"\n{args.config}, {args.steps} env steps, {args.repeats} repeats, {args.accelerator}:\n"
        f"- time inside the callback: median {100 * statistics.median(shares):.2f}% of the "
        f"training wall time (runs: {runs})\n"
        f"- median env steps/s with rlnorm {with_rlnorm:,.0f}, without {without:,.0f}, "
        f"ratio {with_rlnorm / without:.3f} (target >= 0.97)"
    )


if __name__ == "__main__":
    main()
