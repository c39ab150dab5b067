#!/usr/bin/env bash
# Download, into .whl/ at the repository root, the Python wheels that the lent GPU machine
# (kind nvidia-h200: Python 3.12, x86-64, no network) lacks for running rlnorm's CUDA tests and
# benchmarks/device_check.sh. Run it here, on a machine with pip and a registry, before the
# device run; then name `.whl` in the run's `carry` list (benchmarks/device_check.sh installs
# them with `pip install --no-index --no-deps --target /tmp/site`).
#
#   bash benchmarks/fetch_device_wheels.sh        # prints each wheel and the total size
#
# The list: pyproject.toml's runtime and test dependencies and the `bench` peers, less what the
# device image already holds (its package list is in the device notes, KINDS.md: torch,
# lightning, torchmetrics, tensorboard, numpy, pytest, hypothesis, cloudpickle, pyyaml, click,
# rich, typing-extensions, packaging, pandas, matplotlib are there), each dependency named
# (pip download runs with --no-deps), one version of each, pinned to what this project's
# machines run:
#   runtime   gymnasium (+ farama-notifications), jsonargparse[signatures]
#             (+ docstring-parser, typeshed-client)
#   tests     stable-baselines3 (tests/io/test_sb3.py), import-linter (+ grimp;
#             tests/test_architecture.py)
#   bench     torchrl (+ tensordict, hoptorch, pyvers) for TorchRL's VecNormV2,
#             rsl-rl-lib for rsl_rl's EmpiricalNormalization (its GitPython, onnx and
#             onnxscript are left out: rsl_rl.modules does not import them; onnx and
#             onnxscript are on the device anyway)
# Left out on purpose: tensordict's importlib_metadata and orjson (it falls back to the
# standard library's importlib.metadata and json), ruff (a linter, not run there) and the
# `notebook` extra (nbclient, nbformat, ipykernel and their dozen dependencies:
# tests/test_notebook.py is not run there).
# torchrl and tensordict carry compiled extensions for CPython 3.12: tensordict's links no
# torch library; torchrl's links libtorch, and a mismatch with the device's torch 2.11 only
# disables its C++ helpers (replay-buffer segment trees), not VecNormV2.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
rm -f .whl/*.whl

WHEELS=(
  gymnasium==1.4.0
  farama-notifications==0.0.6
  jsonargparse==4.53.0
  docstring-parser==0.18.0
  typeshed-client==2.15.0
  stable-baselines3==2.9.2
  import-linter==2.17
  grimp==3.20
  torchrl==0.14.1
  tensordict==0.14.3
  hoptorch==0.1.4
  pyvers==0.2.3
  rsl-rl-lib==5.5.1
)

python3 -m pip download --quiet --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d .whl "${WHEELS[@]}"

ls -l .whl/*.whl | awk '{print $5, $9}'
count=$(ls .whl/*.whl | wc -l)
if [ "$count" -ne "${#WHEELS[@]}" ]; then
  echo "expected ${#WHEELS[@]} wheels, got $count" >&2
  exit 1
fi
total=$(du -cb .whl/*.whl | tail -1 | cut -f1)
echo "$count wheels, $((total / 1024)) KiB in .whl/ (the device run carries at most 64 MiB)"
if [ "$total" -gt $((60 * 1024 * 1024)) ]; then
  echo "over 60 MiB: too large to carry with the working tree" >&2
  exit 1
fi
