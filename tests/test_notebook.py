"""``notebooks/inspect_drift.ipynb`` executes on a tiny run, so it cannot rot.

A tiny ``rlnorm fit`` (logging every 2 steps, so that the drift figures and the heatmap exist)
writes into ``<tmp>/project/runs/cartpole``; the notebook then runs in a fresh ``python3``
kernel started in ``<tmp>/project/notebooks`` (as Jupyter does: not the repository root), with
no ``RLNORM_RUN_DIR``, so it must find the run itself, and ``MPLBACKEND=agg`` (a headless
machine). A second execution, pointed at a folder without checkpoints, must stop with an error
that says what to do.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rlnorm.cli import main
from rollout_agents import QUIET_LIGHTNING

pytestmark = [pytest.mark.slow, *(pytest.mark.filterwarnings(w) for w in QUIET_LIGHTNING)]

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "inspect_drift.ipynb"


@contextmanager
def environment(**values: str | None) -> Iterator[None]:
    """Set (or, with ``None``, unset) environment variables; the kernel inherits them."""
    saved = {k: os.environ.get(k) for k in values}
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def execute(cwd: Path, run_dir: Path | None) -> dict[str, Any]:
    """The notebook executed in a kernel started in ``cwd``; the error if a cell raised."""
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    env = {"RLNORM_RUN_DIR": None if run_dir is None else str(run_dir), "MPLBACKEND": "agg"}
    error = None
    with environment(**env):
        client = NotebookClient(
            notebook, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(cwd)}}
        )
        try:
            client.execute()
        except Exception as err:  # reported by the tests, with the cell that failed
            error = err
    return {"notebook": notebook, "error": error}


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder laid out like the repository, holding one tiny run in runs/cartpole."""
    project = tmp_path_factory.mktemp("project")
    status = main(
        [
            "fit",
            "--config",
            str(ROOT / "configs" / "cartpole.yaml"),
            "--trainer.default_root_dir",
            str(project / "runs" / "cartpole"),
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
    assert (project / "runs/cartpole/lightning_logs/version_0/checkpoints/last.ckpt").is_file()
    # A later run that wrote no checkpoint (stopped early): not the one to read.
    (project / "runs/cartpole/lightning_logs/version_1").mkdir()
    (project / "notebooks").mkdir()
    return project


@pytest.fixture(scope="module")
def executed(project: Path) -> dict[str, Any]:
    return execute(cwd=project / "notebooks", run_dir=None)


def outputs(notebook: Any) -> list[Any]:
    return [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs]


def text_of(notebook: Any) -> str:
    return "".join(o.get("text", "") for o in outputs(notebook))


def test_drift_notebook_finds_the_newest_run_with_a_checkpoint_from_another_directory(
    executed: dict[str, Any], project: Path
) -> None:
    assert executed["error"] is None, executed["error"]
    assert not [o for o in outputs(executed["notebook"]) if o.output_type == "error"]
    run_dir = project / "runs" / "cartpole" / "lightning_logs" / "version_0"
    text = text_of(executed["notebook"])
    assert f"Reading run {run_dir.resolve()}\n" in text
    assert "checkpoint last.ckpt" in text


def test_drift_notebook_renders_its_figures_as_images_under_mplbackend_agg(
    executed: dict[str, Any],
) -> None:
    assert executed["error"] is None, executed["error"]
    images = [
        o
        for o in outputs(executed["notebook"])
        if o.output_type in ("display_data", "execute_result") and "image/png" in o.get("data", {})
    ]
    # Drift figures, per-dimension statistics, one drift heatmap per normalizer (obs, reward).
    assert len(images) >= 4, f"{len(images)} image outputs"


def test_drift_heatmap_rows_are_named_dimensions_and_columns_the_logged_steps(
    executed: dict[str, Any], project: Path
) -> None:
    assert executed["error"] is None, executed["error"]
    events = EventAccumulator(str(project / "runs/cartpole/lightning_logs/version_0"))
    events.Reload()
    text = text_of(executed["notebook"])
    for tag, rows in (("obs", "rows obs[0]..obs[3] (4)"), ("reward", "rows reward (1)")):
        steps = [e.step for e in events.Images(f"rlnorm/{tag}/drift_heatmap")]
        assert len(steps) >= 2
        line = f"rlnorm/{tag}/drift_heatmap: {rows}, "
        line += f"columns at steps {steps[0]}..{steps[-1]} ({len(steps)} logs)"
        assert line in text


def test_drift_notebook_without_a_run_says_how_to_make_one(project: Path) -> None:
    empty_run = project / "runs" / "cartpole" / "lightning_logs" / "version_1"
    result = execute(cwd=project, run_dir=empty_run)
    errors = [o for o in outputs(result["notebook"]) if o.output_type == "error"]
    assert result["error"] is not None
    assert len(errors) == 1
    message = errors[0]["evalue"]
    assert errors[0]["ename"] == "FileNotFoundError"
    assert f"RLNORM_RUN_DIR={empty_run.resolve()}" in message
    assert "rlnorm fit --config configs/cartpole.yaml" in message


@pytest.fixture(scope="module")
def fabric_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run of the Fabric PPO loop (one process): logs and checkpoints under its root."""
    from rlnorm.agents.fabric_ppo import Args, train

    root = tmp_path_factory.mktemp("fabric_project") / "runs" / "fabric_ppo"
    args = Args(
        num_envs=2,
        num_steps=32,
        total_timesteps=6 * 64,
        update_epochs=1,
        log_every=2,
        checkpoint_every=3,
        root_dir=str(root),
        devices=1,
    )
    train(args)
    assert sorted(p.name for p in (root / "checkpoints").glob("*.ckpt"))
    return root


def test_drift_notebook_reads_a_fabric_runs_logs_and_checkpoint(fabric_run: Path) -> None:
    result = execute(cwd=fabric_run, run_dir=fabric_run)
    assert result["error"] is None, result["error"]
    text = text_of(result["notebook"])
    assert f"Reading run {fabric_run}" in text
    assert "logs logs/version_0" in text
    assert "rlnorm/obs/drift_heatmap: rows obs[0]..obs[3] (4)" in text
