"""``notebooks/inspect_drift.ipynb`` executes on a tiny run, so it cannot rot.

A tiny ``rlnorm fit`` (logging every 2 steps, so that the drift figures and the heatmap exist)
writes into a temporary directory; the notebook then runs in a fresh ``python3`` kernel with
``RLNORM_RUN_DIR`` pointing at the run and ``MPLBACKEND=agg`` (a headless machine), from the
repository root.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient

from agents import QUIET_LIGHTNING
from rlnorm.cli import main

pytestmark = [pytest.mark.slow, *(pytest.mark.filterwarnings(w) for w in QUIET_LIGHTNING)]

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "inspect_drift.ipynb"


@pytest.fixture(scope="module")
def executed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The notebook, executed on a fresh tiny run; the error if it raised."""
    root = tmp_path_factory.mktemp("notebook_run")
    status = main(
        [
            "fit",
            "--config",
            str(ROOT / "configs" / "cartpole.yaml"),
            "--trainer.default_root_dir",
            str(root),
            "--model.total_timesteps",
            "384",
            "--model.num_envs",
            "2",
            "--model.num_steps",
            "32",
            "--model.update_epochs",
            "1",
            "--trainer.log_every_n_steps",
            "2",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.enable_model_summary",
            "false",
        ]
    )
    assert status == 0
    run_dir = root / "lightning_logs" / "version_0"
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    saved = {k: os.environ.get(k) for k in ("RLNORM_RUN_DIR", "MPLBACKEND")}
    os.environ["RLNORM_RUN_DIR"] = str(run_dir)  # the kernel inherits this environment
    os.environ["MPLBACKEND"] = "agg"
    error = None
    try:
        client = NotebookClient(
            notebook,
            kernel_name="python3",
            timeout=300,
            resources={"metadata": {"path": str(ROOT)}},
        )
        client.execute()
    except Exception as err:  # reported by the test below, with the cell that failed
        error = err
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return {"notebook": notebook, "error": error, "run_dir": run_dir}


def outputs(notebook: Any) -> list[Any]:
    return [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs]


def test_drift_notebook_executes_on_a_tiny_run_without_errors(executed):
    assert executed["error"] is None, executed["error"]
    assert not [o for o in outputs(executed["notebook"]) if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs(executed["notebook"]))
    assert f"rlnorm scalar tags in {executed['run_dir']}" in text
    assert "last.ckpt" in text


def test_drift_notebook_renders_its_three_figures_as_images_under_mplbackend_agg(executed):
    assert executed["error"] is None, executed["error"]
    images = [
        o
        for o in outputs(executed["notebook"])
        if o.output_type in ("display_data", "execute_result") and "image/png" in o.get("data", {})
    ]
    # Drift figures, per-dimension statistics, drift heatmap.
    assert len(images) >= 3, f"{len(images)} image outputs"
