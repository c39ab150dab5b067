"""What the callback costs: PPO environment steps per second with and without rlnorm.

Usage:
    python benchmarks/callback_cost.py [--config configs/cartpole.yaml] [--steps 30000]
        [--repeats 5] [--accelerator cpu|gpu]

Runs the reference PPO of a config (its model and ``NormalizerCallback`` settings, as
``rlnorm fit`` reads them) for a fixed number of environment steps, alternately with the
callback and without normalization, each run in a fresh process with one torch thread, one
run at a time so the two modes share the machine's noise. It prints:

- the headline: the whole-loop ratio of environment steps per second, with rlnorm / without,
  paired by repeat (the same seed, run back to back), as the median over the repeats with its
  quartiles and range; the performance target is at least 0.97 (use 6 repeats or more). The
  runs learn different policies, so episode lengths (and with them environment resets per
  step) differ between the modes, which makes each ratio noisy by several percent on a shared
  machine: read the spread, not one run;
- the median environment steps per second of each mode;
- the share of the training wall time spent inside the callback (its API and its Lightning
  hooks, timed call by call in the runs with rlnorm): a direct measure of its own cost.
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
    # The headline: whole-loop throughput with / without, paired by repeat (same seed, run back
    # to back), with its spread over the repeats.
    ratios = sorted(a / b for a, b in zip(sps[MODES[0]], sps[MODES[1]], strict=True))
    quartiles = (
        statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else ratios * 3
    )
    runs = ", ".join(f"{100 * share:.2f}%" for share in shares)
    print(
        f"\n{args.config}, {args.steps} env steps, {args.repeats} repeats, {args.accelerator}:\n"
        f"- whole-loop env steps/s, with rlnorm / without (paired by seed): median "
        f"{statistics.median(ratios):.3f}, quartiles {quartiles[0]:.3f}-{quartiles[2]:.3f}, "
        f"range {ratios[0]:.3f}-{ratios[-1]:.3f} (target >= 0.97)\n"
        f"- median env steps/s with rlnorm {with_rlnorm:,.0f}, without {without:,.0f}\n"
        f"- time inside the callback: median {100 * statistics.median(shares):.2f}% of the "
        f"training wall time (runs: {runs})"
    )


if __name__ == "__main__":
    main()
