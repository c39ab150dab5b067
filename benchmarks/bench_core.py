"""Time RunningMeanStd.update / normalize against the read and copy floors.

Usage:
    python benchmarks/bench_core.py [--device cpu|cuda] [--repeats 30] [--compile]

Prints microseconds per call (median of repeats, warm-up excluded) and each time as a ratio to
the floors measured in the same run: one read pass over the batch (``x.sum(0)``) and one copy
(``x.clone()``). Ratios from one run are what counts on shared, noisy machines.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch

from rlnorm import RunningMeanStd

SHAPES = [(16, 8), (1024, 64), (16384, 256)]


def timer(device: torch.device) -> Callable[[Callable[[], object], int], float]:
    def run(fn: Callable[[], object], repeats: int) -> float:
        for _ in range(3):
            fn()
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e6

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile versions")
    args = parser.parse_args()
    device = torch.device(args.device)
    run = timer(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    print(
        f"device: {device} ({name}), torch {torch.__version__}, threads {torch.get_num_threads()}"
    )
    print(
        "| batch | sum floor µs | clone floor µs | update µs | update/sum | normalize µs "
        "| normalize/clone |"
        + (" compiled update µs | compiled normalize µs |" if args.compile else "")
    )
    print("|---|---|---|---|---|---|---|" + ("---|---|" if args.compile else ""))
    for rows, dims in SHAPES:
        print(bench_shape(rows, dims, device, run, args.repeats, args.compile), flush=True)


def bench_shape(
    rows: int,
    dims: int,
    device: torch.device,
    run: Callable[[Callable[[], object], int], float],
    repeats: int,
    compiled: bool,
) -> str:
    """One table row: floors, update and normalize (and their compiled versions) for a shape."""
    x = torch.randn(rows, dims, device=device) * 3 + 5
    rms = RunningMeanStd(dims, device=device)
    rms.update(x)
    t_sum = run(lambda: x.sum(0), repeats)
    t_clone = run(lambda: x.clone(), repeats)
    t_update = run(lambda: rms.update(x), repeats)
    t_norm = run(lambda: rms.normalize(x), repeats)
    line = (
        f"| {rows}x{dims} | {t_sum:.1f} | {t_clone:.1f} | {t_update:.1f} | "
        f"{t_update / t_sum:.2f} | {t_norm:.1f} | {t_norm / t_clone:.2f} |"
    )
    if compiled:
        update_c = torch.compile(rms.update, fullgraph=True)
        norm_c = torch.compile(rms.normalize, fullgraph=True)
        line += (
            f" {run(lambda: update_c(x), repeats):.1f} | {run(lambda: norm_c(x), repeats):.1f} |"
        )
    return line


if __name__ == "__main__":
    main()
