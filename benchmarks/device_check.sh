#!/usr/bin/env bash
# The one script a session runs on the lent GPU machine (kind nvidia-h200: Python 3.12 at
# python3 with torch+CUDA, Triton, Lightning; no network) to check and time rlnorm's CUDA code
# in a single `run` call. Before the call, here:
#
#   bash benchmarks/fetch_device_wheels.sh     # the missing wheels into .whl/ (~8.5 MiB)
#
# then call the device tool's `run` with
#   command:   bash benchmarks/device_check.sh
#   carry:     [".whl"]
#   timeout_s: 570
# and copy what comes back (peers_cuda.md, gpu_step_cuda.md) into benchmarks/results/.
#
# What it does, each part time-boxed with `timeout` (limits below, 505 s in all at most; it
# takes about 3-5 minutes when all goes well), logging to $OUT and going on past failures:
#   1. setup (60 s): install the carried wheels into /tmp/site (pip --no-index --no-deps),
#      PYTHONPATH=src:/tmp/site, and build the native CPU extension in place
#      (python3 setup.py build_ext --inplace);
#   2. env (25 s): versions (python, torch, CUDA, triton, lightning, the peers), whether
#      rlnorm.backends.fused is there and available, the git commit, nvidia-smi;
#   3. tests (150 s): pytest on every test file that mentions CUDA (tests/backends/test_cuda.py,
#      tests/backends/test_fused.py where it exists, tests/agents/test_torch_envs.py, ...),
#      failures listed, stopping after 10 (so one run shows more than the first failure);
#   4. peers (170 s): benchmarks/bench_peers.py --device cuda --repeats 11 --skip-compile
#      (torch.compile rows left out: their compile would take most of the budget), with the
#      PASS/FAIL targets;
#   5. gpu_step (100 s): benchmarks/gpu_step.py --device cuda (4096 environments).
# $OUT receives at most 7 files: 01-setup.log ... 05-gpu_step.log and the two result tables.
# The last lines printed are a summary: each part's exit status and time, the pytest result
# line, every PASS/FAIL target line and the step tables.
#
# Dry run on a machine without a GPU: DEVICE=cpu bash benchmarks/device_check.sh (small
# sizes, CUDA tests skipped; the cp312 wheels will not install on another Python, which is
# logged and passed over).
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=${OUT:-/tmp/device_check_out}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT/src:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
PY=python3
SUMMARY=()

# part NAME LIMIT_S CMD...: run CMD under `timeout`, output to $OUT/NAME.log and the terminal.
part() {
  local name=$1 limit=$2
  shift 2
  local log="$OUT/$name.log" start rc
  start=$(date +%s)
  echo "===== $name (limit ${limit}s): $*" | tee "$log"
  timeout -k 10 "$limit" bash -c "$*" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  local took=$(($(date +%s) - start))
  [ "$rc" -eq 124 ] && echo "===== $name TIMED OUT after ${limit}s" | tee -a "$log"
  SUMMARY+=("$name: exit $rc, ${took}s")
  echo "===== $name: exit $rc after ${took}s" | tee -a "$log"
}

setup() {
  if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl || echo "wheel install FAILED (going on)"
    # torchrl's wheel also ships top-level folders of its own scripts: keep them off the path
    rm -rf /tmp/site/benchmarks /tmp/site/sota-check /tmp/site/sota-implementations \
      /tmp/site/scripts
  else
    echo "no .whl/ carried: the peers and gymnasium-based tests will be missing"
  fi
  $PY setup.py -q build_ext --inplace || echo "native extension build FAILED (going on)"
  ls src/rlnorm/backends/
}

env_info() {
  git -C "$ROOT" log -1 --format='commit %h %s' 2>/dev/null || echo "commit: (no git)"
  $PY - <<'EOF'
import importlib, platform
from importlib import metadata

import torch

print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"{p.total_memory / 2**30:.0f} GiB", p.multi_processor_count, "SMs",
          "capability", f"{p.major}.{p.minor}")
for name in ("triton", "lightning", "torchmetrics", "numpy", "gymnasium", "jsonargparse",
             "stable-baselines3", "torchrl", "tensordict", "rsl-rl-lib", "hypothesis", "pytest"):
    try:
        print(f"{name} {metadata.version(name)}")
    except metadata.PackageNotFoundError:
        print(f"{name} MISSING")
for module in ("rlnorm", "rlnorm.backends.native", "torchrl.envs.transforms", "rsl_rl.modules",
               "gymnasium", "stable_baselines3"):
    try:
        importlib.import_module(module)
        print(f"import {module}: ok")
    except Exception as err:
        print(f"import {module}: {type(err).__name__}: {err}")
from rlnorm.backends import native
print("native kernels:", native.available())
try:
    from rlnorm.backends import fused
except ImportError as err:
    print("rlnorm.backends.fused: absent:", err)
else:
    try:
        print("rlnorm.backends.fused.available():", fused.available())
    except Exception as err:
        print("rlnorm.backends.fused.available() raised", type(err).__name__, err)
EOF
  nvidia-smi || echo "nvidia-smi failed"
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw \
    --format=csv || true
}

tests() {
  local files
  files=$(grep -rlE "cuda" tests --include='test_*.py' | sort)
  [ -f tests/backends/test_fused.py ] || echo "tests/backends/test_fused.py: not in this tree"
  echo "test files: $files"
  local extra=()
  $PY -c "import pytest_timeout" 2>/dev/null && extra=(--timeout 120)
  # shellcheck disable=SC2086
  $PY -m pytest -q -p no:cacheprovider --maxfail=10 -rfEs --durations=15 "${extra[@]}" $files
}

peers() {
  local args=(--device "$DEVICE" --skip-compile --out "$OUT/peers_$DEVICE.md")
  if [ "$DEVICE" = cuda ]; then args+=(--repeats 11); else args+=(--repeats 3); fi
  $PY benchmarks/bench_peers.py "${args[@]}"
}

gpu_step() {
  $PY benchmarks/gpu_step.py --device "$DEVICE" --out "$OUT/gpu_step_$DEVICE.md"
}

export ROOT OUT DEVICE PY
export -f setup env_info tests peers gpu_step
part 01-setup 60 setup
part 02-env 25 env_info
part 03-tests 150 tests
part 04-peers 170 peers
part 05-gpu_step 100 gpu_step

echo
echo "================ summary ================"
printf '%s\n' "${SUMMARY[@]}"
grep -hE "^(=+ )?[0-9]+ (passed|failed)|^FAILED|^ERROR|passed|failed" "$OUT/03-tests.log" |
  grep -vE "^=====" | tail -n 15
grep -hE "^Step that" "$OUT/04-peers.log"
sed -n '/^### Targets/,/PASS, /p' "$OUT/04-peers.log"
grep -hE "^\| (env only|policy|without|with)" "$OUT/05-gpu_step.log"
ls -l "$OUT"
