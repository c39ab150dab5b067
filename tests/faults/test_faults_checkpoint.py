"""Damaged and mismatching checkpoints, and training processes killed with SIGKILL.

Every fault must end in a clear error (or a warning) that names the problem and the file where
known, on both ways in: ``rlnorm.load_normalizers`` and ``Trainer.fit(..., ckpt_path=...)``.
None may silently hand back fresh statistics.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import kill_fit
import rlnorm
from conftest import assert_state_equal, state_of
from rlnorm.io.checkpoint import check_checkpoint_file, read_checkpoint
from rlnorm.stats.schema import SCHEMA_VERSION
from rollout_agents import QUIET_LIGHTNING, RolloutAgent, make_trainer

pytestmark = pytest.mark.filterwarnings(*QUIET_LIGHTNING)

NUM_ENVS, ROLLOUT_LEN, GAMMA, SAVED_AT = 2, 4, 0.97, 2
STATE_KEY = "NormalizerCallback{'name': 'rlnorm'}"


def _agent() -> RolloutAgent:
    return RolloutAgent(num_envs=NUM_ENVS, rollout_len=ROLLOUT_LEN, gamma=GAMMA)


def _callback(**kwargs: Any) -> rlnorm.NormalizerCallback:
    return rlnorm.NormalizerCallback(reward=True, gamma=GAMMA, **kwargs)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A whole checkpoint written by ModelCheckpoint after SAVED_AT steps."""
    root = tmp_path_factory.mktemp("saved")
    callback = _callback()
    checkpoint = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=SAVED_AT)
    trainer = make_trainer(
        root, [callback, checkpoint], max_steps=SAVED_AT, enable_checkpointing=True
    )
    trainer.fit(_agent())
    (path,) = sorted((root / "ckpt").glob("*.ckpt"))
    return {"path": path, "state": state_of(callback.normalizers)}


def _resume(path: Path, root: Path, steps: int = SAVED_AT + 1, **kwargs: Any):
    callback = _callback(**kwargs)
    make_trainer(root, [callback], max_steps=steps).fit(_agent(), ckpt_path=path)
    return callback


def _write_edited(saved: dict, tmp_path: Path, edit: Callable[[dict], Any], name: str) -> Path:
    checkpoint = torch.load(saved["path"], weights_only=True)
    edit(checkpoint["callbacks"][STATE_KEY])
    path = tmp_path / name
    torch.save(checkpoint, path)
    return path


def _entries(path: Path) -> list[tuple[str, int, int]]:
    """``(name, offset of its data, size)`` of every entry of a checkpoint's zip archive."""
    out = []
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            with path.open("rb") as f:  # the local header: 30 bytes + name + extra field
                f.seek(info.header_offset + 26)
                name_len, extra_len = (int.from_bytes(f.read(2), "little") for _ in range(2))
            out.append(
                (info.filename, info.header_offset + 30 + name_len + extra_len, info.file_size)
            )
    return out


def _flip(data: bytes, offset: int, count: int = 1) -> bytes:
    out = bytearray(data)
    for i in range(offset, offset + count):
        out[i] ^= 0x5A
    return bytes(out)


def _normalizer_entry(path: Path) -> tuple[str, int, int]:
    """The zip entry holding the observation mean (found by flipping and looking)."""
    want = read_checkpoint(path)["callbacks"][STATE_KEY]["normalizers"]["obs.obs.mean"]
    for name, offset, size in _entries(path):
        if name.split("/")[-2:-1] != ["data"] or size != want.numel() * 8:
            continue
        with zipfile.ZipFile(path) as archive, archive.open(name) as f:
            if f.read() == want.numpy().tobytes():
                return name, offset, size
    raise AssertionError("no entry holds obs.obs.mean")


# ---------------------------------------------------------------------------- damaged files


@pytest.mark.parametrize(
    "cut", [0.5, 0.99, 0.01, "minus-1"], ids=["half", "all-but-1pct", "first-1pct", "last-byte"]
)
def test_truncated_checkpoint_is_refused_by_load_normalizers_naming_the_file(
    saved: dict, tmp_path: Path, cut: Any
) -> None:
    data = saved["path"].read_bytes()
    keep = len(data) - 1 if cut == "minus-1" else int(len(data) * cut)
    path = tmp_path / "cut.ckpt"
    path.write_bytes(data[:keep])
    with pytest.raises(ValueError, match=r"'.*cut\.ckpt' is truncated or corrupted") as info:
        rlnorm.load_normalizers(path)
    assert info.value.__cause__ is not None  # the original error is chained


def test_empty_checkpoint_file_is_refused_as_empty(tmp_path: Path) -> None:
    path = tmp_path / "empty.ckpt"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.ckpt' is empty"):
        rlnorm.load_normalizers(path)


def test_a_flipped_byte_in_any_entry_of_the_checkpoint_is_refused_by_load_normalizers(
    saved: dict, tmp_path: Path
) -> None:
    # torch.load checks no checksums: a flip inside a tensor would load as a wrong value.
    data = saved["path"].read_bytes()
    path = tmp_path / "flipped.ckpt"
    entries = [e for e in _entries(saved["path"]) if e[2] > 0]
    assert len(entries) > 20
    for name, offset, size in entries:
        path.write_bytes(_flip(data, offset + size // 2))
        with pytest.raises(ValueError, match=r"flipped\.ckpt") as info:
            rlnorm.load_normalizers(path)
        assert name in str(info.value) or "zip structure" in str(info.value), name


@pytest.mark.parametrize(
    "field",
    [
        "local-signature",
        "local-name",
        "local-method",
        "central-crc",
        "central-method",
        "central-name",
        "end-count",
        "end-size",
        "end-offset",
    ],
)
def test_flipped_bytes_in_the_zip_structure_are_refused_or_harmless(
    saved: dict, tmp_path: Path, field: str
) -> None:
    data = saved["path"].read_bytes()
    with zipfile.ZipFile(saved["path"]) as archive:
        local = archive.infolist()[5].header_offset
    central, end = data.find(b"PK\x01\x02"), data.rfind(b"PK\x05\x06")
    offset = {
        "local-signature": local,
        "local-name": local + 30,
        "local-method": local + 8,
        "central-crc": central + 16,
        "central-method": central + 10,
        "central-name": central + 46,
        "end-count": end + 10,
        "end-size": end + 12,
        "end-offset": end + 16,
    }[field]
    path = tmp_path / "structure.ckpt"
    path.write_bytes(_flip(data, offset, 4))
    refused, norms = "", None
    try:
        norms = rlnorm.load_normalizers(path)
    except ValueError as err:
        refused = str(err)
    if norms is None:
        assert "structure.ckpt' is " in refused
        assert "corrupted" in refused
    else:  # fields that zip readers recompute or ignore: then the statistics are exact
        assert_state_equal(state_of(norms), saved["state"])


def test_file_that_is_no_checkpoint_at_all_is_refused_naming_what_it_starts_with(
    tmp_path: Path,
) -> None:
    path = tmp_path / "notes.ckpt"
    path.write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"notes\.ckpt' is not a PyTorch checkpoint.*b'not "):
        rlnorm.load_normalizers(path)


def test_resume_from_a_checkpoint_with_a_flipped_statistic_is_refused_naming_file_and_entry(
    saved: dict, tmp_path: Path
) -> None:
    name, offset, _ = _normalizer_entry(saved["path"])
    path = tmp_path / "flipped-mean.ckpt"
    path.write_bytes(_flip(saved["path"].read_bytes(), offset + 3))
    # Without the checksum check this loads: torch.load reads the flipped mean as a number.
    flipped = torch.load(path, weights_only=True)["callbacks"][STATE_KEY]["normalizers"]
    assert not torch.equal(flipped["obs.obs.mean"], saved["state"]["obs.obs.mean"])
    with pytest.raises(ValueError, match=rf"flipped-mean\.ckpt' is corrupted.*{name}"):
        _resume(path, tmp_path)
    with pytest.raises(ValueError, match=rf"flipped-mean\.ckpt' is corrupted.*{name}"):
        rlnorm.load_normalizers(path)


def test_resume_from_a_truncated_checkpoint_fails_with_a_note_naming_the_file(
    saved: dict, tmp_path: Path
) -> None:
    data = saved["path"].read_bytes()
    path = tmp_path / "half.ckpt"
    path.write_bytes(data[: len(data) // 2])
    # Lightning reads the file before any callback hook runs, so its (torch's) exception
    # propagates; the callback adds a note that names the file and the problem.
    with pytest.raises(Exception) as info:  # noqa: PT011 - whatever torch raises
        _resume(path, tmp_path)
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert f"'{path}' is truncated or corrupted" in notes, notes


# ---------------------------------------------------------------------------- wrong content


def test_checkpoint_from_another_observation_shape_names_both_shapes(
    saved: dict, tmp_path: Path
) -> None:
    def edit(state: dict) -> None:
        state["obs_shapes"] = {"obs": [5]}
        state["config"]["obs_shape"] = [5]

    path = _write_edited(saved, tmp_path, edit, "shape.ckpt")
    with pytest.raises(ValueError, match=r"shape\.ckpt.*\(4,\).*\(5,\)"):
        rlnorm.load_normalizers(path)
    with pytest.raises(ValueError, match=r"shape\.ckpt.*\(4,\).*\(5,\)|\(5,\).*\(4,\)"):
        _resume(path, tmp_path)


def test_resume_with_another_observation_shape_names_the_file_and_both_shapes(
    saved: dict, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match=rf"{saved['path'].name}.*\(4,\).*\(7,\)"):
        _resume(saved["path"], tmp_path, obs_shape=7)


@pytest.mark.parametrize(
    ("version", "problem"),
    [
        (SCHEMA_VERSION + 1, "newer than this rlnorm"),
        (SCHEMA_VERSION + 40, "newer than this rlnorm"),
        (0, "which no rlnorm release wrote"),
        (-1, "which no rlnorm release wrote"),
        (True, "not an rlnorm normalizer state"),
        ("1", "not an rlnorm normalizer state"),
    ],
)
def test_unknown_schema_versions_are_refused_on_both_paths(
    saved: dict, tmp_path: Path, version: Any, problem: str
) -> None:
    path = _write_edited(saved, tmp_path, lambda s: s.update(schema_version=version), "schema.ckpt")
    with pytest.raises(ValueError, match=rf"schema\.ckpt.*{problem}"):
        rlnorm.load_normalizers(path)
    with pytest.raises(ValueError, match=rf"schema\.ckpt.*{problem}"):
        _resume(path, tmp_path)


@pytest.mark.parametrize("key", ["config", "dict_obs", "obs_shapes", "num_envs"])
def test_state_missing_a_required_key_is_refused_naming_it(
    saved: dict, tmp_path: Path, key: str
) -> None:
    path = _write_edited(saved, tmp_path, lambda s: s.pop(key), "incomplete.ckpt")
    with pytest.raises(ValueError, match=rf"incomplete\.ckpt.*is incomplete.*'{key}'"):
        rlnorm.load_normalizers(path)
    with pytest.raises(ValueError, match=rf"incomplete\.ckpt.*is incomplete.*'{key}'"):
        _resume(path, tmp_path)


def test_state_without_the_later_added_buffers_loads_with_their_exact_defaults(
    saved: dict, tmp_path: Path
) -> None:
    # weight_sum, nonfinite_count and mean_residual were added to RunningMeanStd later.
    later = ("weight_sum", "nonfinite_count", "mean_residual")

    def edit(state: dict) -> None:
        state.pop("last_logged")
        state.pop("rlnorm_version")
        for key in list(state["normalizers"]):
            if key.endswith(later):
                del state["normalizers"][key]

    path = _write_edited(saved, tmp_path, edit, "older.ckpt")
    norms = rlnorm.load_normalizers(path)
    got, want = state_of(norms), saved["state"]
    for key in want:
        if key.endswith("weight_sum"):
            assert torch.equal(got[key], want[key.replace("weight_sum", "count")].double())
        elif key.endswith(("nonfinite_count", "mean_residual")):
            assert not got[key].any()
        else:
            assert torch.equal(got[key], want[key]), key
    resumed = _resume(path, tmp_path)
    assert int(resumed.normalizers.obs["obs"].count) == (SAVED_AT + 1) * NUM_ENVS * ROLLOUT_LEN


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("obs.obs.mean", float("nan"), "NaN or Inf"),
        ("obs.obs.var", -1.0, "negative variances"),
        ("reward.stats.var", float("inf"), "NaN or Inf"),
    ],
)
def test_impossible_statistics_in_a_checkpoint_are_refused_naming_file_and_key(
    saved: dict, tmp_path: Path, key: str, value: float, problem: str
) -> None:
    def edit(state: dict) -> None:
        state["normalizers"][key] = torch.full_like(state["normalizers"][key], value)

    path = _write_edited(saved, tmp_path, edit, "impossible.ckpt")
    for load in (lambda: rlnorm.load_normalizers(path), lambda: _resume(path, tmp_path)):
        with pytest.raises(ValueError, match=rf"impossible\.ckpt.*`{key}`.*{problem}"):
            load()


def test_checkpoint_without_the_callback_state_errors_on_load_and_warns_on_resume(
    saved: dict, tmp_path: Path
) -> None:
    checkpoint = torch.load(saved["path"], weights_only=True)
    del checkpoint["callbacks"][STATE_KEY]
    path = tmp_path / "stateless.ckpt"
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match=r"stateless\.ckpt.*no rlnorm normalizer state"):
        rlnorm.load_normalizers(path)
    with pytest.warns(UserWarning, match="holds no state for NormalizerCallback.*start fresh"):
        _resume(path, tmp_path)


# ---------------------------------------------------------------------------- SIGKILL


def _launch(outdir: Path, mode: str) -> subprocess.Popen:
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[2] / "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    env["OMP_NUM_THREADS"] = "1"
    outdir.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [sys.executable, str(Path(kill_fit.__file__)), str(outdir), mode],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def _wait(proc: subprocess.Popen, timeout: float) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise
    return out.decode(errors="replace")[-3000:]


@pytest.fixture(scope="module")
def killed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Both kinds of killed training processes, run side by side."""
    root = tmp_path_factory.mktemp("killed")
    running = _launch(root / "run", "run")
    writing = _launch(root / "writing", "die-writing")
    ready = root / "run" / "ready"
    deadline = time.monotonic() + 120
    while not ready.exists() and running.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    alive = running.poll() is None
    os.kill(running.pid, signal.SIGKILL)
    run_log = _wait(running, 30)
    assert ready.exists(), f"kill_fit.py never got ready:\n{run_log}"
    assert alive, f"kill_fit.py ended before it was killed:\n{run_log}"
    writing_log = _wait(writing, 120)
    return {
        "run": root / "run",
        "run_code": running.returncode,
        "writing": root / "writing",
        "writing_code": writing.returncode,
        "logs": (run_log, writing_log),
    }


def _resume_kill_fit(path: Path, root: Path, steps: int) -> tuple[Any, RolloutAgent]:
    callback, agent = kill_fit.callback(), kill_fit.agent()
    make_trainer(root, [callback], max_steps=steps).fit(agent, ckpt_path=path)
    return callback, agent


@pytest.mark.slow
def test_run_killed_mid_training_resumes_bitwise_like_an_uninterrupted_run(
    killed: dict, tmp_path: Path
) -> None:
    assert killed["run_code"] == -signal.SIGKILL, killed["logs"][0]
    ckpt_dir = killed["run"] / "ckpt"
    # Whatever the kill interrupted, no file with the checkpoint suffix is damaged.
    files = sorted(ckpt_dir.glob("*.ckpt"))
    assert files
    for path in files:
        check_checkpoint_file(path)
    last = tmp_path / "last.ckpt"
    shutil.copy(ckpt_dir / "last.ckpt", last)
    saved_step = int(read_checkpoint(last)["global_step"])
    assert saved_step >= kill_fit.EVERY
    total = saved_step + 3

    first, first_agent = _resume_kill_fit(last, tmp_path / "a", total)
    second, _ = _resume_kill_fit(last, tmp_path / "b", total)
    straight = kill_fit.callback()
    straight_agent = kill_fit.agent()
    make_trainer(tmp_path / "c", [straight], max_steps=total).fit(straight_agent)

    rows = total * kill_fit.NUM_ENVS * kill_fit.ROLLOUT_LEN
    assert int(first.normalizers.obs["obs"].count) == rows
    assert_state_equal(state_of(first.normalizers), state_of(second.normalizers))
    assert_state_equal(state_of(first.normalizers), state_of(straight.normalizers))
    assert_state_equal(state_of(first_agent), state_of(straight_agent))


@pytest.mark.slow
def test_checkpoint_cut_off_by_a_kill_while_written_is_refused_and_the_previous_one_resumes(
    killed: dict, tmp_path: Path
) -> None:
    assert killed["writing_code"] == -signal.SIGKILL, killed["logs"][1]
    ckpt_dir = killed["writing"] / "ckpt"
    cut = ckpt_dir / f"epoch=0-step={2 * kill_fit.EVERY}.ckpt"
    whole = ckpt_dir / f"epoch=0-step={kill_fit.EVERY}.ckpt"
    assert cut.is_file()
    assert whole.is_file()
    with pytest.raises(ValueError, match="is truncated or corrupted") as info:
        rlnorm.load_normalizers(cut)
    assert str(cut) in str(info.value)
    with pytest.raises(Exception) as info:  # noqa: PT011 - Lightning's loader raises torch's
        _resume_kill_fit(cut, tmp_path / "cut", 2 * kill_fit.EVERY + 1)
    assert any(str(cut) in note for note in getattr(info.value, "__notes__", []))

    # The checkpoint before it is whole and training resumes from it.
    callback, _ = _resume_kill_fit(whole, tmp_path / "whole", kill_fit.EVERY + 1)
    rows = (kill_fit.EVERY + 1) * kill_fit.NUM_ENVS * kill_fit.ROLLOUT_LEN
    assert int(callback.normalizers.obs["obs"].count) == rows
