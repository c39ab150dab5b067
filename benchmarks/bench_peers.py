"""Time rlnorm's update / normalize against SB3, Gymnasium, TorchRL, rsl_rl and two floors.

Usage (the peers come with the ``bench`` extra: ``pip install -e ".[bench]"``; rsl_rl is
``pip install rsl-rl-lib``):
    python benchmarks/bench_peers.py [--device cpu|cuda] [--repeats 15] [--threads N]
        [--skip-compile] [--block-ms 5] [--out [PATH]]

For float32 batches of shape (16, 8), (1024, 64) and (16384, 256) on the CPU, and (16, 8),
(4096, 48) and (16384, 256) on CUDA, it prints, per shape, a markdown table of microseconds per
call (median of repeats, warm-up excluded) of ``update`` and ``normalize`` for every candidate,
and each time as a ratio to rlnorm eager (peer / rlnorm: above 1 means rlnorm is faster). What
is timed, exactly:

- rlnorm eager: ``RunningMeanStd(dims).update(x)`` and ``.normalize(x)`` on the torch tensor:
  what users get by default (on the CPU, the native kernels when built; on CUDA, the fused
  Triton kernels of ``rlnorm.backends.fused`` when that module is there and available, else
  the automatic CUDA graphs).
- rlnorm torch path (CPU only): the same with the native kernels turned off
  (``rlnorm.backends.native.native_kernels(False)``, as ``RLNORM_NATIVE=0`` does), i.e. the
  code that also runs under ``torch.compile`` and on CUDA.
- rlnorm fused off (CUDA only, when ``rlnorm.backends.fused`` exists): the same call inside
  ``rlnorm.backends.fused.use_fused(False)``: the path CUDA took before the fused kernels (the
  automatic CUDA graphs), so its ratio is the fused kernels' gain.
- rlnorm, automatic graphs off (CUDA only): the same with
  ``rlnorm.backends.cuda_graphs.use_graphs(False)`` (as ``RLNORM_CUDA_GRAPHS=0`` does) and the
  fused kernels off: every call launches its torch kernels one by one.
- rlnorm CUDA graph (CUDA only): replays of CUDA graphs that captured ``rms.update(x)`` and
  ``rms.normalize(x)`` (``x`` a static input; the default path, so the fused kernels where
  they run).
- rlnorm compiled: ``torch.compile(rms.update, fullgraph=True)`` and the same for ``normalize``,
  on a separate instance; the compile time (first call) is reported separately, not timed.
- SB3: ``stable_baselines3.common.running_mean_std.RunningMeanStd.update`` on the numpy view of
  ``x``, and SB3's own ``VecNormalize._normalize_obs`` (called on an instance made without an
  env, with SB3's defaults ``epsilon=1e-8, clip_obs=10``): ``np.clip((obs - mean) /
  np.sqrt(var + eps), -clip, clip)``. It returns float64; ``VecNormalize.normalize_obs`` would
  add a deepcopy and an ``astype(np.float32)`` on top, which are not timed.
- Gymnasium: the statistics of ``gymnasium.wrappers.vector.NormalizeObservation``:
  ``gymnasium.wrappers.utils.RunningMeanStd(shape, dtype=float32).update(obs)`` and the
  wrapper's formula ``((obs - mean) / np.sqrt(var + 1e-8)).astype(np.float32)`` (no clip).
- TorchRL: ``torchrl.envs.transforms.VecNormV2(in_keys=["observation"],
  reduce_batch_dims=True, decay=1.0)`` (``VecNorm`` itself is deprecated in favour of it;
  ``decay=1.0`` gives the exact running statistics rlnorm computes by default, whereas the
  default ``decay=0.9999`` adds bias-correction kernels to normalize and, subtracting the
  squared mean before the bias correction, statistics far from rlnorm's), stateful, on a
  ``TensorDict({"observation": x}, batch_size=[rows])`` built outside the timed region: update
  is its ``_stateful_update(td)`` and normalize its ``_stateful_norm(td)``, the two halves of
  what ``VecNormV2._step`` runs for each env step (``_step`` adds the lock, a ``select`` and
  the write-back ``update``, which are not timed). On CUDA ``_stateful_norm`` synchronises
  the stream on every call (TorchRL's own code).
- rsl_rl: ``EmpiricalNormalization(dims, eps=1e-8)`` from rsl-rl-lib (``rsl_rl.modules``, the
  observation normalizer of rsl_rl's PPO and of Isaac Lab), in training mode: update is its
  ``update(x)`` and normalize its ``forward(x)``, ``(x - mean) / (std + eps)`` with float32
  statistics and no clip. ``eps=1e-8`` (its default is ``1e-2``, added to the std) makes its
  output agree with the others' at no cost in time. Where ``rsl_rl.modules`` cannot be
  imported (its package ``__init__`` needs ``tensordict``) the installed
  ``rsl_rl/modules/normalization.py`` is loaded on its own; where rsl-rl-lib is not installed,
  ``benchmarks/rsl_rl_equivalent.py`` (the same arithmetic) is timed instead, and its row says
  "(equivalent)".
- floors: one read pass ``x.sum(0)`` (update column) and one copy ``x.clone()`` (normalize
  column).

Methodology: every candidate reads the same data (numpy peers get ``x.numpy()``, a view made
outside the timed region, as they receive numpy arrays from environments). Each timed sample
runs a block of calls sized to last about ``--block-ms`` and divides by the call count; the
candidates are interleaved round-robin across repeats so they share the machine's noise. On
CUDA each block is synchronised before and after; numpy peers then read a host copy of ``x``.
The statistics of all candidates are checked to agree before anything is timed. Rows that
switch a path off (``use_fused(False)``, ``use_graphs(False)``) enter the context manager on
every call, which adds about a microsecond of Python to them.

Targets (CUDA, per shape; printed as PASS/FAIL under each table and summed up at the end):
rlnorm eager ``update`` at most 3x the read floor, ``normalize`` at most 1.5x the copy floor,
and both faster than rsl_rl's ``EmpiricalNormalization`` and TorchRL's ``VecNormV2``; a whole
step (update then normalize, eager) under 30 µs at (4096, 48). A whole step is also timed with
the fused kernels off and as one replay of a captured CUDA graph.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

import numpy as np
import torch

from rlnorm import RunningMeanStd
from rlnorm.backends import cuda_graphs
from rlnorm.backends import native as _native

try:  # the fused CUDA kernels; older checkouts have no such module
    from rlnorm.backends import fused as _fused
except ImportError as _err:
    _fused: ModuleType | None = None
    _FUSED_MISSING = f"{type(_err).__name__}: {_err}"
else:
    _FUSED_MISSING = ""

SHAPES = {
    "cpu": [(16, 8), (1024, 64), (16384, 256)],
    "cuda": [(16, 8), (4096, 48), (16384, 256)],
}
EPS = 1e-8
CLIP = 10.0
#: The shape at which a whole step (update then normalize) must take under STEP_TARGET_US.
STEP_TARGET_SHAPE = (4096, 48)
STEP_TARGET_US = 30.0
UPDATE_TARGET = 3.0  # x the read floor
NORMALIZE_TARGET = 1.5  # x the copy floor
READ_FLOOR = "floor: read x.sum(0)"
COPY_FLOOR = "floor: copy x.clone()"
TORCHRL = "TorchRL VecNormV2"
RSL_RL = "rsl_rl EmpiricalNormalization"

Fn = Callable[[], object]


def version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device) -> str:
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "?"
    gpu = f", GPU {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    libs = ", ".join(
        f"{name} {version(name)}"
        for name in (
            "rlnorm",
            "torch",
            "triton",
            "numpy",
            "stable-baselines3",
            "gymnasium",
            "torchrl",
            "tensordict",
            "rsl-rl-lib",
        )
    )
    return (
        f"CPU {cpu_model()} ({os.cpu_count()} logical cores, {affinity} usable), "
        f"torch threads {torch.get_num_threads()}{gpu}; Python {platform.python_version()}, "
        f"{libs}; fused CUDA kernels: {fused_status(device)}"
    )


def fused_available(device: torch.device) -> bool:
    """Whether ``rlnorm.backends.fused`` is there and says its kernels can run."""
    if _fused is None or device.type != "cuda":
        return False
    try:
        return bool(_fused.available())
    except Exception as err:  # a broken Triton install must not stop the benchmark
        print(f"rlnorm.backends.fused.available() raised {type(err).__name__}: {err}")
        return False


def fused_status(device: torch.device) -> str:
    if _fused is None:
        return f"module absent ({_FUSED_MISSING})"
    if device.type != "cuda":
        return "module present (CUDA only)"
    return "available" if fused_available(device) else "module present, not available"


def fused_off() -> contextlib.AbstractContextManager[object]:
    """``use_fused(False)`` where the fused module exists, else nothing to switch off."""
    return _fused.use_fused(False) if _fused is not None else contextlib.nullcontext()


class Candidate:
    """One implementation: its update and normalize callables (``None`` where not applicable)."""

    def __init__(
        self, name: str, update: Fn | None, normalize: Fn | None, keep_alive: object = None
    ) -> None:
        self.name = name
        self.fns = {"update": update, "normalize": normalize}
        # What graph replays read without the callables holding it (the normalizer's buffers).
        self.keep_alive = keep_alive


def make_candidates(
    x: torch.Tensor, compile_times: dict[str, float], skip_compile: bool
) -> tuple[list[Candidate], list[str]]:
    """All candidates for one batch ``x``, each already updated once with it (warm state)."""
    dims = x.shape[1]
    device = x.device
    x_np = x.detach().cpu().numpy()  # a view on the CPU; a host copy for CUDA inputs
    cands = []

    rms = RunningMeanStd(dims, device=device)
    rms.update(x)
    cands.append(Candidate("rlnorm eager", lambda: rms.update(x), lambda: rms.normalize(x)))

    if device.type == "cpu" and _native.available():
        rms_t = RunningMeanStd(dims, device=device)
        rms_t.update(x)

        def torch_update() -> object:
            with _native.native_kernels(False):
                return rms_t.update(x)

        def torch_normalize() -> object:
            with _native.native_kernels(False):
                return rms_t.normalize(x)

        cands.append(Candidate("rlnorm torch path", torch_update, torch_normalize))

    if device.type == "cuda":
        if _fused is not None:
            rms_f = RunningMeanStd(dims, device=device)
            with _fused.use_fused(False):
                rms_f.update(x)

            def unfused_update() -> object:
                with _fused.use_fused(False):
                    return rms_f.update(x)

            def unfused_normalize() -> object:
                with _fused.use_fused(False):
                    return rms_f.normalize(x)

            cands.append(Candidate("rlnorm fused off", unfused_update, unfused_normalize))

        rms_e = RunningMeanStd(dims, device=device)
        with fused_off(), cuda_graphs.use_graphs(False):
            rms_e.update(x)

        def eager_update() -> object:
            with fused_off(), cuda_graphs.use_graphs(False):
                return rms_e.update(x)

        def eager_normalize() -> object:
            with fused_off(), cuda_graphs.use_graphs(False):
                return rms_e.normalize(x)

        cands.append(Candidate("rlnorm, automatic graphs off", eager_update, eager_normalize))
        try:
            with cuda_graphs.use_graphs(False):  # the user's own graph, not rlnorm's inside it
                cands.append(graph_candidate(x))
        except Exception as err:  # e.g. a kernel that cannot be captured: say so, go on
            print(f"rlnorm CUDA graph row skipped: capture failed ({type(err).__name__}: {err})")
    if not skip_compile:
        cands.append(compiled_candidate(x, compile_times))
    cands += peer_candidates(x, x_np)
    notes = check_agreement(x, rms, cands)
    return cands, notes


def capture(fn: Callable[[], object]) -> tuple[torch.cuda.CUDAGraph, object]:
    """``fn`` captured into a CUDA graph after a warm-up on a side stream (the usual recipe).

    Returns:
        The graph and the output of the captured call (rewritten by every replay).
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def graph_candidate(x: torch.Tensor) -> Candidate:
    """Replays of CUDA graphs that captured ``update(x)`` and ``normalize(x)`` (``x`` static)."""
    rms_g = RunningMeanStd(x.shape[1], device=x.device)
    rms_g.update(x)
    update_graph, _ = capture(lambda: rms_g.update(x))
    normalize_graph, normalized = capture(lambda: rms_g.normalize(x))

    def normalize() -> object:
        normalize_graph.replay()
        return normalized

    return Candidate("rlnorm CUDA graph", update_graph.replay, normalize, keep_alive=rms_g)


def step_times(x: torch.Tensor, repeats: int, block_s: float) -> dict[str, float]:
    """µs of a whole step that updates then normalizes: eager, fused off, one graph replay.

    The three are interleaved round-robin like the table's candidates. "fused off" is left out
    where ``rlnorm.backends.fused`` does not exist, "graph" where the capture fails.
    """
    jobs: dict[str, Fn] = {}
    rms_e = RunningMeanStd(x.shape[1], device=x.device)

    def eager_step() -> object:
        rms_e.update(x)
        return rms_e.normalize(x)

    jobs["eager"] = eager_step
    if _fused is not None:
        rms_f = RunningMeanStd(x.shape[1], device=x.device)

        def unfused_step() -> object:
            with _fused.use_fused(False):
                rms_f.update(x)
                return rms_f.normalize(x)

        jobs["fused off"] = unfused_step
    rms_g = RunningMeanStd(x.shape[1], device=x.device)
    try:
        with cuda_graphs.use_graphs(False):
            graph, _ = capture(lambda: (rms_g.update(x), rms_g.normalize(x)))
        jobs["graph"] = graph.replay
    except Exception as err:
        print(f"whole-step graph skipped: capture failed ({type(err).__name__}: {err})")
    calls = {name: calibrate(fn, block_s, x.device) for name, fn in jobs.items()}
    samples: dict[str, list[float]] = {name: [] for name in jobs}
    for _ in range(repeats):
        for name, fn in jobs.items():
            samples[name].append(time_block(fn, calls[name], x.device))
    return {name: statistics.median(ts) * 1e6 for name, ts in samples.items()}


def step_line(step: dict[str, float]) -> str:
    eager = step["eager"]
    parts = [f"eager {eager:.1f} µs"]
    if "fused off" in step:
        parts.append(f"fused off {step['fused off']:.1f} µs ({step['fused off'] / eager:.1f}x)")
    if "graph" in step:
        parts.append(
            f"one CUDA-graph replay {step['graph']:.1f} µs ({eager / step['graph']:.1f}x faster "
            "than eager)"
        )
    return "Step that updates and normalizes: " + ", ".join(parts) + "."


def compiled_candidate(x: torch.Tensor, compile_times: dict[str, float]) -> Candidate:
    """``torch.compile(fullgraph=True)`` of update and normalize; the compile time is kept."""
    device = x.device
    torch._dynamo.reset()
    rms_c = RunningMeanStd(x.shape[1], device=device)
    update_c = torch.compile(rms_c.update, fullgraph=True)
    norm_c = torch.compile(rms_c.normalize, fullgraph=True)
    for key, fn in (("update", update_c), ("normalize", norm_c)):
        sync(device)
        start = time.perf_counter()
        fn(x)
        sync(device)
        compile_times[key] = time.perf_counter() - start
    return Candidate("rlnorm compiled", lambda: update_c(x), lambda: norm_c(x))


def peer_candidates(x: torch.Tensor, x_np: np.ndarray) -> list[Candidate]:
    """The peers that are installed, and the two floors."""
    rows, dims = x.shape
    device = x.device
    cands = []

    try:
        from stable_baselines3.common.running_mean_std import RunningMeanStd as SB3RunningMeanStd
        from stable_baselines3.common.vec_env import VecNormalize
    except ImportError:
        print("stable-baselines3 not installed: skipped (pip install -e '.[bench]')")
    else:
        sb3 = SB3RunningMeanStd(shape=(dims,))
        sb3.update(x_np)
        vecnorm = VecNormalize.__new__(VecNormalize)  # no env: only what _normalize_obs reads
        vecnorm.epsilon, vecnorm.clip_obs = EPS, CLIP
        cands.append(
            Candidate(
                "SB3 RunningMeanStd / VecNormalize",
                lambda: sb3.update(x_np),
                lambda: vecnorm._normalize_obs(x_np, sb3),
            )
        )

    try:
        from gymnasium.wrappers.utils import RunningMeanStd as GymRunningMeanStd
    except ImportError:
        print("gymnasium not installed: skipped")
    else:
        gym = GymRunningMeanStd(shape=(dims,), dtype=np.float32)
        gym.update(x_np)

        def gym_normalize() -> np.ndarray:
            return ((x_np - gym.mean) / np.sqrt(gym.var + EPS)).astype(np.float32)

        cands.append(
            Candidate("Gymnasium NormalizeObservation", lambda: gym.update(x_np), gym_normalize)
        )

    try:
        from tensordict import TensorDict
        from torchrl.envs.transforms import VecNormV2
    except Exception as err:  # OSError, or any error of a build for another torch version
        print(f"torchrl not usable ({type(err).__name__}: {err}): skipped")
    else:
        try:
            td = TensorDict({"observation": x}, batch_size=[rows], device=device)
            vn = VecNormV2(in_keys=["observation"], reduce_batch_dims=True, decay=1.0)
            vn = vn.to(device)
            vn._maybe_stateful_init(td)
            vn._stateful_update(td)
        except Exception as err:
            print(f"TorchRL VecNormV2 failed to start ({type(err).__name__}: {err}): skipped")
        else:
            cands.append(
                Candidate(
                    TORCHRL,
                    lambda: vn._stateful_update(td),
                    lambda: vn._stateful_norm(td),
                )
            )

    rsl_cls, rsl_name = rsl_rl_normalization()
    rsl = rsl_cls(dims, eps=EPS).to(device).train()
    rsl.update(x)
    cands.append(Candidate(rsl_name, lambda: rsl.update(x), lambda: rsl(x)))

    cands.append(Candidate(READ_FLOOR, lambda: x.sum(0), None))
    cands.append(Candidate(COPY_FLOOR, None, lambda: x.clone()))
    return cands


def rsl_rl_normalization() -> tuple[type[torch.nn.Module], str]:
    """rsl_rl's ``EmpiricalNormalization`` and its row name (see the module docstring)."""
    try:
        from rsl_rl.modules import EmpiricalNormalization
    except Exception as err:  # ImportError, or tensordict failing on this torch
        reason = f"{type(err).__name__}: {err}"
    else:
        return EmpiricalNormalization, RSL_RL
    spec = importlib.util.find_spec("rsl_rl")
    if spec is not None and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations))) / "modules" / "normalization.py"
        if path.is_file():  # it imports torch alone: load it without the package's __init__
            file_spec = importlib.util.spec_from_file_location("_rsl_rl_normalization", path)
            assert file_spec is not None
            assert file_spec.loader is not None
            module = importlib.util.module_from_spec(file_spec)
            file_spec.loader.exec_module(module)
            print(f"rsl_rl.modules not importable ({reason}): loaded {path} on its own")
            return module.EmpiricalNormalization, RSL_RL
    print("rsl-rl-lib not installed: timing benchmarks/rsl_rl_equivalent.py in its place")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from rsl_rl_equivalent import EmpiricalNormalization as Equivalent

    return Equivalent, f"{RSL_RL} (equivalent)"


def as_numpy(y: object) -> np.ndarray:
    if isinstance(y, torch.Tensor):
        return y.detach().cpu().numpy()
    if hasattr(y, "get"):  # a TensorDict
        return y.get("observation").detach().cpu().numpy()
    return np.asarray(y)


def check_agreement(x: torch.Tensor, rms: RunningMeanStd, cands: list[Candidate]) -> list[str]:
    """All normalizers saw ``x`` (rlnorm eager: ``rms``); their outputs must agree.

    A candidate that disagrees (or fails) is removed from ``cands`` and not timed: a wrong
    result is no result. Returns one message per removed candidate (they go into the table's
    notes, so that one such row does not cost a whole run of the benchmark).
    """
    ref = rms.normalize(x).cpu().numpy()
    notes = []
    for cand in list(cands):
        fn = cand.fns["normalize"]
        if fn is None or cand.name == "rlnorm eager" or cand.name.startswith("floor"):
            continue
        try:
            err = float(np.abs(as_numpy(fn()).astype(np.float64) - ref).max())
        except Exception as exc:
            err, why = float("nan"), f"failed: {type(exc).__name__}: {exc}"
        else:
            why = f"max abs difference {err:.3g} from rlnorm eager"
        if not err < 1e-2:
            cands.remove(cand)
            notes.append(f"**Left out: {cand.name} disagrees ({why}).**")
            print(notes[-1])
    return notes


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_block(fn: Fn, calls: int, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync(device)
    return (time.perf_counter() - start) / calls


def calibrate(fn: Fn, block_s: float, device: torch.device) -> int:
    """Warm up, then pick the number of calls per timed block (at least one)."""
    for _ in range(3):
        fn()
    per_call = time_block(fn, 3, device)
    return max(1, round(block_s / max(per_call, 1e-9)))


class Check(NamedTuple):
    """One performance target at one shape: what was measured and whether it passes."""

    shape: tuple[int, int]
    target: str
    measured: str
    passed: bool | None  # None: not measurable here (a peer is missing)

    def line(self) -> str:
        verdict = {True: "PASS", False: "FAIL", None: "n/a"}[self.passed]
        return f"| {self.shape} | {self.target} | {self.measured} | {verdict} |"


def bench_shape(
    rows: int, dims: int, device: torch.device, repeats: int, block_s: float, skip_compile: bool
) -> tuple[str, dict[tuple[str, str], float], list[Check]]:
    gen = torch.Generator().manual_seed(rows * 1000 + dims)
    x = (torch.randn(rows, dims, generator=gen) * 3 + 5).to(device)
    compile_times: dict[str, float] = {}
    cands, notes = make_candidates(x, compile_times, skip_compile)
    jobs = [
        (cand.name, op, fn, calibrate(fn, block_s, device))
        for cand in cands
        for op, fn in cand.fns.items()
        if fn is not None
    ]
    samples: dict[tuple[str, str], list[float]] = {(name, op): [] for name, op, _, _ in jobs}
    for _ in range(repeats):  # round-robin: every candidate once per repeat
        for name, op, fn, calls in jobs:
            samples[name, op].append(time_block(fn, calls, device))
    med = {key: statistics.median(ts) * 1e6 for key, ts in samples.items()}
    ref = {op: med["rlnorm eager", op] for op in ("update", "normalize")}

    def cell(name: str, op: str) -> str:
        if (name, op) not in med:
            return "— | —"
        return f"{med[name, op]:.1f} | {med[name, op] / ref[op]:.2f}"

    lines = [
        f"### float32 batch ({rows}, {dims}) on {device.type}",
        "",
        "| implementation | update µs | update ratio | normalize µs | normalize ratio |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {cand.name} | {cell(cand.name, 'update')} | {cell(cand.name, 'normalize')} |"
        for cand in cands
    ]
    lines += ["", *notes, targets_line(med)]
    checks: list[Check] = []
    if device.type == "cuda":
        step = step_times(x, repeats, block_s)
        lines.append(step_line(step))
        checks = target_checks((rows, dims), med, step)
        lines += [
            "",
            "| shape | target | measured | |",
            "|---|---|---|---|",
            *(check.line() for check in checks),
        ]
    if compile_times:
        lines.append(
            f"Compile time of the rlnorm compiled versions (first call, not in the table): "
            f"update {compile_times['update']:.2f} s, normalize {compile_times['normalize']:.2f} s."
        )
    lines.append("")
    return "\n".join(lines), med, checks


def target_checks(
    shape: tuple[int, int], med: dict[tuple[str, str], float], step: dict[str, float]
) -> list[Check]:
    """The CUDA performance targets of rlnorm eager at one shape (see the module docstring)."""
    eager = {op: med["rlnorm eager", op] for op in ("update", "normalize")}
    checks = []
    for op, floor, bound in (
        ("update", READ_FLOOR, UPDATE_TARGET),
        ("normalize", COPY_FLOOR, NORMALIZE_TARGET),
    ):
        ratio = eager[op] / med[floor, op]
        checks.append(
            Check(
                shape,
                f"{op} <= {bound:g}x {floor.removeprefix('floor: ')}",
                f"{eager[op]:.1f} µs = {ratio:.2f}x ({med[floor, op]:.1f} µs)",
                ratio <= bound,
            )
        )
    for peer in (RSL_RL, TORCHRL):
        name = next((n for n, _ in med if n.startswith(peer)), None)
        for op in ("update", "normalize"):
            if name is None:
                checks.append(Check(shape, f"{op} faster than {peer}", "not installed", None))
                continue
            checks.append(
                Check(
                    shape,
                    f"{op} faster than {name}",
                    f"{eager[op]:.1f} vs {med[name, op]:.1f} µs ({med[name, op] / eager[op]:.2f}x)",
                    eager[op] < med[name, op],
                )
            )
    if shape == STEP_TARGET_SHAPE:
        checks.append(
            Check(
                shape,
                f"whole step (update + normalize) < {STEP_TARGET_US:g} µs",
                f"{step['eager']:.1f} µs",
                step["eager"] < STEP_TARGET_US,
            )
        )
    return checks


def targets_line(med: dict[tuple[str, str], float]) -> str:
    """rlnorm eager against the floors and SB3, in the terms of the performance targets."""
    parts = []
    eager = {op: med["rlnorm eager", op] for op in ("update", "normalize")}
    if (READ_FLOOR, "update") in med:
        parts.append(f"update = {eager['update'] / med[READ_FLOOR, 'update']:.2f}x the read floor")
    if (COPY_FLOOR, "normalize") in med:
        parts.append(
            f"normalize = {eager['normalize'] / med[COPY_FLOOR, 'normalize']:.2f}x the copy floor"
        )
    sb3 = "SB3 RunningMeanStd / VecNormalize"
    for op in ("update", "normalize"):
        if (sb3, op) in med:
            parts.append(f"SB3 / rlnorm {op} = {med[sb3, op] / eager[op]:.1f}")
    if ("rlnorm fused off", "update") in med:
        parts += [
            f"fused off / fused {op} = {med['rlnorm fused off', op] / eager[op]:.1f}"
            for op in ("update", "normalize")
        ]
    return "rlnorm eager: " + "; ".join(parts) + "."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument(
        "--skip-compile", action="store_true", help="leave out the torch.compile versions"
    )
    parser.add_argument(
        "--block-ms", type=float, default=5.0, help="target duration of one timed block"
    )
    parser.add_argument(
        "--out",
        nargs="?",
        const="",
        default=None,
        help="also write the tables to PATH (default benchmarks/results/peers_<device>.md)",
    )
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")

    header = [
        f"## rlnorm vs peers: update and normalize, µs per call ({device.type})",
        "",
        f"Machine: {machine(device)}.",
        "",
        f"Median of {args.repeats} repeats (warm-up excluded), candidates interleaved "
        "round-robin. Ratio = time / rlnorm eager time of the same operation: above 1 means "
        "rlnorm eager is faster. See the docstring of `benchmarks/bench_peers.py` for exactly "
        "what is timed for each peer.",
        "",
    ]
    print("\n".join(header), flush=True)
    parts = list(header)
    checks: list[Check] = []
    for rows, dims in SHAPES[device.type]:
        table, _, shape_checks = bench_shape(
            rows, dims, device, args.repeats, args.block_ms / 1e3, args.skip_compile
        )
        print(table, flush=True)
        parts.append(table)
        checks += shape_checks
    if checks:
        passed = sum(check.passed is True for check in checks)
        failed = sum(check.passed is False for check in checks)
        summary = [
            "### Targets (rlnorm eager on CUDA)",
            "",
            "| shape | target | measured | |",
            "|---|---|---|---|",
            *(check.line() for check in checks),
            "",
            f"{passed} PASS, {failed} FAIL, {len(checks) - passed - failed} n/a.",
            "",
        ]
        print("\n".join(summary), flush=True)
        parts.append("\n".join(summary))
    if args.out is not None:
        out = Path(args.out or Path(__file__).parent / "results" / f"peers_{device.type}.md")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(parts))
        print(f"written to {out}")


if __name__ == "__main__":
    main()
