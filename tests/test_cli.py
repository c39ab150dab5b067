"""The ``rlnorm`` command: ``fit`` (LightningCLI), ``inspect``, ``export`` and its errors.

``rlnorm.cli.main([...])`` runs in-process where only the outcome matters; the command runs as
a subprocess (``python -m rlnorm.cli`` and the ``rlnorm`` console script) where the exit
status and what reaches stderr matter.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import rlnorm
from agents import QUIET_LIGHTNING, make_trainer
from rlnorm.cli import main
from rlnorm.ppo import PPO

pytestmark = [pytest.mark.filterwarnings(w) for w in QUIET_LIGHTNING]

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
CONSOLE_SCRIPT = Path(sys.executable).parent / "rlnorm"
STATE_KEY = "NormalizerCallback{'name': 'rlnorm'}"

#: The tiny run of the brief: 8 rollouts of 2 envs x 32 steps, one update epoch each.
TINY = [
    "--model.total_timesteps",
    "512",
    "--model.num_envs",
    "2",
    "--model.num_steps",
    "32",
    "--model.update_epochs",
    "1",
]


def command_env() -> dict[str, str]:
    """The environment of the subprocesses: no traceback switch, no stray backend."""
    env = {k: v for k, v in os.environ.items() if k != "RLNORM_DEBUG"}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def rlnorm_command(
    *args: str, cwd: Path = ROOT, timeout: float = 300, script: bool = False
) -> subprocess.CompletedProcess:
    """Run ``python -m rlnorm.cli ARGS`` (or the ``rlnorm`` console script)."""
    head = [str(CONSOLE_SCRIPT)] if script else [sys.executable, "-m", "rlnorm.cli"]
    return subprocess.run(
        [*head, *args],
        cwd=cwd,
        env=command_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def scalar_tags(run_dir: Path) -> set[str]:
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return set(events.Tags()["scalars"]) | {f"image:{t}" for t in events.Tags()["images"]}


# ---------------------------------------------------------------------------- fit


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """``rlnorm fit`` on configs/cartpole.yaml, tiny, in-process; logs every 2 steps.

    (With the command's default ``log_every_n_steps=5`` a run of 8 steps logs no scalar at
    all, so the tags could not be checked.)
    """
    root = tmp_path_factory.mktemp("fit")
    progress = io.StringIO()
    with contextlib.redirect_stdout(progress):
        status = main(
            [
                "fit",
                "--config",
                str(ROOT / "configs" / "cartpole.yaml"),
                "--trainer.default_root_dir",
                str(root),
                *TINY,
                "--seed_everything",
                "3",
                "--trainer.log_every_n_steps",
                "2",
            ]
        )
    run_dir = root / "lightning_logs" / "version_0"
    return {
        "status": status,
        "root": root,
        "run_dir": run_dir,
        "ckpt": run_dir / "checkpoints" / "last.ckpt",
        "stdout": progress.getvalue(),
    }


def test_fit_with_cartpole_config_writes_version_0_logs_and_last_ckpt_under_root_dir(fitted):
    assert fitted["status"] == 0
    run_dir = fitted["run_dir"]
    assert sorted(p.name for p in (fitted["root"] / "lightning_logs").iterdir()) == ["version_0"]
    assert list(run_dir.glob("events.out.tfevents.*"))
    assert fitted["ckpt"].is_file()
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["seed_everything"] == 3
    assert saved["model"]["env_id"] == "CartPole-v1"
    assert saved["trainer"]["default_root_dir"] == str(fitted["root"])


def test_fit_logs_rlnorm_obs_drift_and_episode_return_tags_to_tensorboard(fitted):
    tags = scalar_tags(fitted["run_dir"])
    for tag in (
        "rlnorm/obs/count",
        "rlnorm/obs/mean_abs_mean",
        "rlnorm/obs/std_min",
        "rlnorm/obs/std_max",
        "rlnorm/obs/drift/mean",
        "rlnorm/obs/drift/kl",
        "rlnorm/obs/batch_shift",
        "rlnorm/obs/clip_fraction",
        "rlnorm/reward/count",
        "episode_return",
        "episode_length",
        "image:rlnorm/obs/drift_heatmap",
    ):
        assert tag in tags, f"{tag} not in {sorted(tags)}"


def test_fit_progress_bar_shows_episode_return(fitted):
    assert "episode_return=" in fitted["stdout"]


def test_fit_applies_command_line_overrides_and_the_config_callback(fitted):
    checkpoint = torch.load(fitted["ckpt"], map_location="cpu", weights_only=True)
    hparams = checkpoint["hyper_parameters"]
    assert hparams["total_timesteps"] == 512
    assert hparams["num_envs"] == 2
    assert hparams["num_steps"] == 32
    assert hparams["update_epochs"] == 1
    assert checkpoint["rlnorm_ppo"] == {"env_steps": 512}
    state = checkpoint["callbacks"][STATE_KEY]
    assert state["config"]["reward"] is True
    assert state["config"]["gamma"] == 0.98
    norms = rlnorm.load_normalizers(fitted["ckpt"])
    stats = norms.named_normalizers()
    assert int(stats["obs"].count) == 512
    assert int(stats["reward"].count) == 512


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_config_is_documented_parses_and_builds_its_model_and_callbacks(config, capsys):
    lines = config.read_text().splitlines()
    assert lines[0].startswith("# "), "document the config in a comment at its top"
    assert len(lines[0]) > 20, lines[0]
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    model = PPO(**printed["model"])
    assert model.hparams.env_id == yaml.safe_load(config.read_text())["model"]["env_id"]
    callbacks = printed["trainer"]["callbacks"]
    assert [c["class_path"] for c in callbacks] == ["rlnorm.NormalizerCallback"]
    rlnorm.NormalizerCallback(**callbacks[0]["init_args"])
    assert printed["checkpoint"]["save_last"] is True


def test_ddp_config_parses_to_two_cpu_processes():
    config = yaml.safe_load((ROOT / "configs" / "cartpole_ddp.yaml").read_text())
    assert config["trainer"]["devices"] == 2
    assert config["trainer"]["strategy"] == "ddp"
    assert config["trainer"]["accelerator"] == "cpu"


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_config_trains_two_processes_with_statistics_over_both_ranks(tmp_path):
    result = rlnorm_command(
        "fit",
        "--config",
        "configs/cartpole_ddp.yaml",
        "--trainer.default_root_dir",
        str(tmp_path),
        *TINY,
        "--trainer.enable_progress_bar",
        "false",
        timeout=400,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    # 512 steps over both ranks: each rank ran 4 rollouts of 2 envs x 32 steps.
    assert checkpoint["rlnorm_ppo"] == {"env_steps": 512}
    assert checkpoint["global_step"] == 4
    state = checkpoint["callbacks"][STATE_KEY]
    assert len(state["reward_returns_by_rank"]) == 2
    stats = rlnorm.load_normalizers(checkpoint).named_normalizers()
    # Each rank played 256 steps; the synchronised statistics hold both ranks' data.
    assert int(stats["reward"].count) == 512
    assert int(stats["obs"].count) == 512


# ---------------------------------------------------------------------------- inspect


def test_inspect_prints_a_table_with_shapes_and_counts(fitted, capsys):
    assert main(["inspect", str(fitted["ckpt"])]) == 0
    out = capsys.readouterr().out
    assert str(fitted["ckpt"]) in out
    header = next(line for line in out.splitlines() if "statistic" in line)
    for column in ("shape", "count", "mean", "std"):
        assert column in header
    cells = [line.split() for line in out.splitlines()]
    rows = {row[0]: row for row in cells if len(row) > 2 and row[1].startswith("(")}
    assert rows["obs"][1:3] == ["(4,)", "512"]
    assert rows["reward"][1:3] == ["()", "512"]
    assert "gamma=0.98" in out


def test_inspect_json_matches_load_normalizers(fitted, capsys):
    assert main(["inspect", str(fitted["ckpt"]), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    checkpoint = torch.load(fitted["ckpt"], map_location="cpu", weights_only=True)
    assert report["global_step"] == checkpoint["global_step"]
    assert list(report["normalizers"]) == ["rlnorm"]
    entry = report["normalizers"]["rlnorm"]
    norms = rlnorm.load_normalizers(fitted["ckpt"])
    assert entry["config"] == json.loads(json.dumps(norms.config.to_dict()))
    expected = norms.named_normalizers()
    assert set(entry["statistics"]) == set(expected)
    for tag, rms in expected.items():
        stats = entry["statistics"][tag]
        assert stats["shape"] == list(rms.shape)
        assert stats["count"] == int(rms.count)
        assert stats["nonfinite_rows"] == int(rms.nonfinite_count)
        assert stats["mean"] == rms.mean.reshape(-1).tolist()
        assert stats["std"] == rms.std.reshape(-1).tolist()
    assert entry["reward_returns"] == norms.reward.returns.tolist()


def test_inspect_name_selects_the_normalizer_and_an_unknown_name_is_one_error_line(fitted, capsys):
    assert main(["inspect", str(fitted["ckpt"]), "--json", "--name", "rlnorm"]) == 0
    assert list(json.loads(capsys.readouterr().out)["normalizers"]) == ["rlnorm"]
    assert main(["inspect", str(fitted["ckpt"]), "--name", "other"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1
    assert err[0].startswith("rlnorm: error:")
    assert "'other'" in err[0]


# ---------------------------------------------------------------------------- export

#: Runs in a fresh interpreter where ``import rlnorm`` fails: loads each exported program
#: and applies it to the saved inputs.
BLOCKED_RUNNER = textwrap.dedent(
    """
    import sys

    sys.modules["rlnorm"] = None  # rlnorm is "not installed"
    import torch

    try:
        import rlnorm  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("rlnorm was importable")

    results = {}
    for name, program, inputs in zip(sys.argv[1::3], sys.argv[2::3], sys.argv[3::3]):
        module = torch.export.load(program).module()
        xs = torch.load(inputs, weights_only=True)
        with torch.no_grad():
            results[name] = {key: module(x) for key, x in xs.items()}
    loaded = sorted(k for k, v in sys.modules.items() if k.startswith("rlnorm") and v)
    results["rlnorm_modules"] = loaded
    torch.save(results, "outputs.pt")
    """
)

BATCHES = (1, 5, 0)


@pytest.fixture(scope="module")
def exported(fitted, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Both exports of the fitted checkpoint, run in a subprocess that blocks rlnorm."""
    out = tmp_path_factory.mktemp("export")
    ckpt = str(fitted["ckpt"])
    norms = rlnorm.load_normalizers(ckpt)
    rms = norms.named_normalizers()["obs"]
    gen = torch.Generator().manual_seed(0)

    def within(batch: int) -> torch.Tensor:  # |normalized| <= 3: never clipped
        z = torch.rand(batch, 4, generator=gen, dtype=torch.float64) * 6 - 3
        return (rms.mean + z * rms.std).float()

    plain = {f"b{b}": within(b) for b in BATCHES}
    # Rows far outside the data: the normalizer must clip them exactly as rlnorm does.
    plain["clipped"] = torch.tensor([[1e6, -1e6, 50.0, -50.0], [0.0, 0.0, 0.0, 0.0]])
    folded = {f"b{b}": within(b) for b in BATCHES}
    torch.save(plain, out / "plain.pt")
    torch.save(folded, out / "folded.pt")

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        status_plain = main(["export", ckpt, "--out", str(out / "obs_norm.pt2")])
        status_fold = main(["export", ckpt, "--out", str(out / "policy.pt2"), "--fold-policy"])
    (out / "runner.py").write_text(BLOCKED_RUNNER)
    programs = ["plain", "obs_norm.pt2", "plain.pt", "folded", "policy.pt2", "folded.pt"]
    result = subprocess.run(
        [sys.executable, "runner.py", *programs],
        cwd=out,
        env=command_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return {
        "status": (status_plain, status_fold),
        "stdout": stdout.getvalue(),
        "norms": norms,
        "inputs": {"plain": plain, "folded": folded},
        "outputs": torch.load(out / "outputs.pt", weights_only=True),
        "dir": out,
    }


def test_export_writes_programs_that_load_without_rlnorm(exported):
    assert exported["status"] == (0, 0)
    assert (exported["dir"] / "obs_norm.pt2").is_file()
    assert (exported["dir"] / "policy.pt2").is_file()
    assert "torch.export.load" in exported["stdout"]
    assert exported["outputs"]["rlnorm_modules"] == []


@pytest.mark.parametrize("batch", [*(f"b{b}" for b in BATCHES), "clipped"])
def test_exported_normalizer_equals_load_normalizers_normalize_obs(exported, batch):
    x = exported["inputs"]["plain"][batch]
    got = exported["outputs"]["plain"][batch]
    expected = exported["norms"].normalize_obs(x)
    assert got.shape == x.shape
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected.float(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("batch", [f"b{b}" for b in BATCHES])
def test_fold_policy_export_equals_ppo_actor_of_normalized_obs(exported, fitted, batch):
    checkpoint = torch.load(fitted["ckpt"], map_location="cpu", weights_only=True)
    hparams = {k: v for k, v in checkpoint["hyper_parameters"].items() if not k.startswith("_")}
    model = PPO(**hparams)
    model.load_state_dict(checkpoint["state_dict"])
    x = exported["inputs"]["folded"][batch]
    with torch.no_grad():
        expected = model.actor(exported["norms"].normalize_obs(x))
    got = exported["outputs"]["folded"][batch]
    assert got.shape == (x.shape[0], 2)  # CartPole's two action logits
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def bad_inputs(fitted, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Files the error cases point the command at."""
    root = tmp_path_factory.mktemp("bad")
    # Normalizer state but no policy weights: what --fold-policy cannot use.
    stats_only = root / "stats_only.ckpt"
    checkpoint = torch.load(fitted["ckpt"], map_location="cpu", weights_only=True)
    torch.save({"callbacks": checkpoint["callbacks"], "state_dict": {}}, stats_only)
    text = root / "notes.ckpt"
    text.write_text("hello, this is not a checkpoint\n")
    weights_only = root / "weights_only.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, weights_only)
    bad_config = root / "bad.yaml"
    bad_config.write_text("model:\n  bogus: 1\n")
    # A real Lightning checkpoint of the reference PPO trained without NormalizerCallback.
    model = PPO(total_timesteps=64, num_envs=2, num_steps=32, update_epochs=1)
    trainer = make_trainer(root, [], max_steps=-1, max_epochs=-1)
    trainer.fit(model)
    plain = root / "plain_trainer.ckpt"
    trainer.save_checkpoint(plain)
    return {
        "root": root,
        "missing": root / "missing.ckpt",
        "text": text,
        "weights_only": weights_only,
        "plain": plain,
        "bad_config": bad_config,
        "stats_only": stats_only,
    }


#: name -> (arguments, texts the one error line must contain); {name}: a bad_inputs path.
#: These run as subprocesses: the exit status and everything on stderr are checked.
ERROR_COMMANDS: dict[str, tuple[list[str], list[str]]] = {
    "inspect_missing_file": (["inspect", "{missing}"], ["{missing}"]),
    "inspect_file_that_is_not_a_checkpoint": (["inspect", "{text}"], ["{text}"]),
    "inspect_checkpoint_of_a_trainer_without_the_callback": (
        ["inspect", "{plain}"],
        ["{plain}", "NormalizerCallback"],
    ),
    "fit_config_with_a_wrong_key": (
        ["fit", "--config", "{bad_config}", "--trainer.default_root_dir", "{root}/runs"],
        ["bogus"],
    ),
    "unknown_command": (["frobnicate"], ["frobnicate"]),
}

#: More bad input, run in-process through ``main`` (cheaper than a subprocess each).
ERROR_CALLS: dict[str, tuple[list[str], list[str]]] = {
    "export_missing_file": (["export", "{missing}", "--out", "{root}/x.pt2"], ["{missing}"]),
    "inspect_config_file_given_as_checkpoint": (["inspect", "{bad_config}"], ["{bad_config}"]),
    "export_file_that_is_not_a_checkpoint": (
        ["export", "{text}", "--out", "{root}/x.pt2"],
        ["{text}"],
    ),
    "export_checkpoint_of_a_trainer_without_the_callback": (
        ["export", "{plain}", "--out", "{root}/x.pt2"],
        ["{plain}", "NormalizerCallback"],
    ),
    "inspect_weights_only_checkpoint": (
        ["inspect", "{weights_only}"],
        ["{weights_only}", "save_weights_only"],
    ),
    "fold_policy_of_a_checkpoint_without_ppo_weights": (
        ["export", "{stats_only}", "--out", "{root}/x.pt2", "--fold-policy"],
        ["--fold-policy"],
    ),
    "fit_with_an_invalid_model_value": (
        ["fit", "--model.num_envs", "0", "--trainer.default_root_dir", "{root}/runs"],
        ["`num_envs`"],
    ),
    "fit_with_an_unknown_env_id": (
        ["fit", "--model.env_id", "NoSuchEnv-v0", "--trainer.default_root_dir", "{root}/runs"],
        ["NoSuchEnv-v0"],
    ),
    "inspect_without_path": (["inspect"], ["checkpoint"]),
    "inspect_unknown_option": (["inspect", "{text}", "--bogus"], ["--bogus"]),
    "export_without_out": (["export", "{text}"], ["--out"]),
    "export_into_a_missing_directory": (
        ["export", "{fitted}", "--out", "{root}/no/such/dir/x.pt2"],
        ["{root}/no/such/dir/x.pt2"],
    ),
}


@pytest.fixture(scope="module")
def error_runs(bad_inputs) -> dict[str, subprocess.CompletedProcess]:
    """Every ERROR_COMMANDS case as a subprocess, two at a time."""
    paths = {k: str(v) for k, v in bad_inputs.items()}

    def run(name: str) -> subprocess.CompletedProcess:
        args = [a.format(**paths) for a in ERROR_COMMANDS[name][0]]
        # The console script for some cases, `python -m rlnorm.cli` for the others.
        script = CONSOLE_SCRIPT.exists() and len(name) % 2 == 0
        return rlnorm_command(*args, cwd=bad_inputs["root"], script=script)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(ERROR_COMMANDS, pool.map(run, ERROR_COMMANDS), strict=True))


def assert_one_error_line(stderr: str, expected: list[str], paths: dict[str, str]) -> None:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("rlnorm: error: ")
    for text in expected:
        assert text.format(**paths) in lines[0], lines[0]
    assert "The the " not in lines[0], lines[0]


@pytest.mark.parametrize("case", list(ERROR_COMMANDS))
def test_bad_input_command_prints_one_rlnorm_error_line_and_exits_2(case, error_runs, bad_inputs):
    result = error_runs[case]
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output[-3000:]
    assert result.returncode == 2, output[-3000:]
    paths = {k: str(v) for k, v in bad_inputs.items()}
    assert_one_error_line(result.stderr, ERROR_COMMANDS[case][1], paths)


@pytest.mark.parametrize("case", list(ERROR_CALLS))
def test_bad_input_main_returns_2_with_one_rlnorm_error_line(case, bad_inputs, fitted, capsys):
    paths = {k: str(v) for k, v in bad_inputs.items()}
    paths["fitted"] = str(fitted["ckpt"])
    args, expected = ERROR_CALLS[case]
    status = main([a.format(**paths) for a in args])
    captured = capsys.readouterr()
    assert status == 2, captured.err
    assert_one_error_line(captured.err, expected, paths)


def test_validate_command_listed_in_usage_runs_or_fails_with_one_error_line(tmp_path):
    result = rlnorm_command(
        "validate",
        "--config",
        "configs/cartpole.yaml",
        "--trainer.default_root_dir",
        str(tmp_path),
        "--trainer.enable_progress_bar",
        "false",
    )
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output[-3000:]
    if result.returncode != 0:
        assert result.returncode == 2
        lines = result.stderr.splitlines()
        assert len(lines) == 1
        assert lines[0].startswith("rlnorm: error: ")


def test_help_exits_0_and_lists_fit_inspect_export():
    result = rlnorm_command("--help", script=CONSOLE_SCRIPT.exists())
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    usage = result.stdout
    for command in ("fit", "inspect", "export"):
        assert f"  {command} " in usage, usage


@pytest.mark.parametrize("command", ["inspect", "export"])
def test_command_help_exits_0_and_describes_its_options(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: rlnorm {command}" in out
    assert "checkpoint" in out
    assert ("--json" if command == "inspect" else "--out") in out
