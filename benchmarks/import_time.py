"""Start-up cost of the deployment path: ``import rlnorm; rlnorm.load_normalizers``.

Each case runs in a fresh interpreter, interleaved with the others so that they share the
machine's noise; the table gives the median wall time of ``--repeats`` runs.

    python benchmarks/import_time.py --repeats 7
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

CASES = {
    "python (nothing)": "pass",
    "import torch": "import torch",
    "import rlnorm; rlnorm.load_normalizers": "import rlnorm; rlnorm.load_normalizers",
    "... + lightning.pytorch (what it cost before)": (
        "import rlnorm; rlnorm.load_normalizers; import lightning.pytorch"
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="runs per case (default 7)")
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in CASES}
    for _ in range(args.repeats):
        for name, code in CASES.items():
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True)
            times[name].append(time.perf_counter() - start)
    print("| what | median wall time |\n|---|---:|")
    for name, runs in times.items():
        print(f"| `{name}` | {statistics.median(runs):.2f} s |")


if __name__ == "__main__":
    main()
