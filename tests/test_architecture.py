"""The package's layering, checked the way the build checks it, and what deployment imports.

The layers (README "Layout") are import-linter contracts in ``pyproject.toml``; here they run
as part of the suite. The deployment path (``rlnorm.load_normalizers``, ``rlnorm.io``,
``rlnorm.stats`` and everything below) must load without Lightning, torchmetrics or
gymnasium: checked in a fresh interpreter, where nothing else imported them first.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
TRAINING_STACK = ("lightning", "pytorch_lightning", "torchmetrics", "gymnasium")


def run_python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(SRC)},
        timeout=300,
    )


def test_the_layer_contracts_in_pyproject_hold() -> None:
    code = (
        "import sys\n"
        "from importlinter.cli import lint_imports\n"
        "sys.exit(lint_imports(no_cache=True, no_logo=True))\n"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "BROKEN" not in result.stdout
    assert "KEPT" in result.stdout


LOADED_STACK = f"""
import importlib, json, pkgutil, sys
import rlnorm
loaded = []
for package in ("rlnorm.algebra", "rlnorm.backends", "rlnorm.stats", "rlnorm.io"):
    module = importlib.import_module(package)
    loaded.append(package)
    for info in pkgutil.walk_packages(module.__path__, package + "."):
        importlib.import_module(info.name)
        loaded.append(info.name)
stack = {TRAINING_STACK!r}
norms = rlnorm.load_normalizers(sys.argv[1])
print(json.dumps({{
    "modules": loaded,
    "training_stack": sorted(m for m in sys.modules if m.split(".")[0] in stack),
    "mean": norms.obs.mean.tolist(),
}}))
"""


def test_load_normalizers_and_the_lower_layers_import_no_training_stack(tmp_path: Path) -> None:
    from rlnorm import NormalizerConfig, Normalizers
    from rlnorm.stats.schema import statistics_state

    norms = Normalizers(NormalizerConfig())
    norms.update_obs(torch.tensor([[1.0, 2.0], [3.0, 6.0]]))
    # A checkpoint laid out as Lightning writes it: the callback's state under its state key.
    checkpoint = {"callbacks": {"NormalizerCallback{'name': 'rlnorm'}": statistics_state(norms)}}
    path = tmp_path / "last.ckpt"
    torch.save(checkpoint, path)

    result = run_python(LOADED_STACK, str(path))
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["training_stack"] == []
    assert report["mean"] == [2.0, 4.0]
    assert {"rlnorm.stats.running_mean_std", "rlnorm.io.checkpoint"} <= set(report["modules"])


def test_the_lightning_names_of_rlnorm_still_resolve_on_first_use() -> None:
    code = (
        "import sys, rlnorm\n"
        "assert 'lightning' not in sys.modules\n"
        "print(rlnorm.NormalizerCallback.__module__, rlnorm.get_normalizer.__module__)\n"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.split() == ["rlnorm.lightning.callback", "rlnorm.lightning.callback"]
