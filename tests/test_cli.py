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
from lightning.pytorch.callbacks import TQDMProgressBar
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import rlnorm
from conftest import write_user_env_module
from rlnorm.agents.ppo import PPO
from rlnorm.cli import RunProgressBar, default_progress_bar, main
from rollout_agents import QUIET_LIGHTNING, make_trainer

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
    all, so the tags could not be checked.) A periodic checkpoint every 3 of its 8 steps: the
    run's length is not a multiple of the checkpoint interval.
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
                "--checkpoint.every_n_train_steps",
                "3",
                # Lightning's default bar is Rich's when `rich` is installed (import-linter
                # brings it into the dev environment), which draws nothing into a StringIO.
                "--trainer.callbacks+=lightning.pytorch.callbacks.TQDMProgressBar",
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


def test_last_ckpt_holds_the_end_of_a_run_whose_length_is_not_a_multiple_of_the_interval(fitted):
    # 8 steps, a checkpoint every 3: Lightning alone leaves last.ckpt at step 6 (384 env steps).
    periodic = [p.name for p in fitted["ckpt"].parent.glob("epoch=*.ckpt")]
    assert periodic == ["epoch=0-step=6.ckpt"]
    checkpoint = torch.load(fitted["ckpt"], map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 8
    assert checkpoint["rlnorm_ppo"] == {"env_steps": 512}
    stats = rlnorm.load_normalizers(fitted["ckpt"]).named_normalizers()
    assert int(stats["obs"].count) == 512
    assert int(stats["reward"].count) == 512


def test_fit_as_a_newcomer_runs_it_ends_its_progress_bar_on_epoch_0_without_warnings(tmp_path):
    # The command as the README gives it, in a subprocess: Lightning's default bar is Rich's
    # (when `rich` is installed), which under max_epochs=-1 Lightning labels "Epoch 0/-2", and
    # the run used to end by starting an empty "Epoch 1" to notice that it was done.
    pytest.importorskip("rich")
    config = str(ROOT / "configs" / "cartpole.yaml")
    done = rlnorm_command(
        "fit", "--config", config, "--trainer.default_root_dir", str(tmp_path), *TINY
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Epoch 0" in done.stdout, done.stdout[-3000:]
    assert "Epoch 1" not in done.stdout
    assert "/-2" not in done.stdout
    assert "8/8" in done.stdout
    assert "Warning" not in done.stderr, done.stderr[-3000:]


@pytest.mark.parametrize(
    ("trainer_config", "adds_its_bar"),
    [
        ({}, True),
        ({"callbacks": None}, True),
        ({"callbacks": [rlnorm.NormalizerCallback()]}, True),
        ({"enable_progress_bar": False}, False),
        ({"callbacks": TQDMProgressBar()}, False),
        ({"callbacks": [rlnorm.NormalizerCallback(), TQDMProgressBar()]}, False),
    ],
    ids=["defaults", "no_callbacks", "other_callbacks", "bar_disabled", "bar_given", "bar_listed"],
)
def test_fit_adds_its_rich_bar_only_where_lightning_would_add_its_default_one(
    trainer_config, adds_its_bar
):
    pytest.importorskip("rich")
    assert isinstance(default_progress_bar(trainer_config), RunProgressBar) == adds_its_bar


def test_fit_ends_with_one_line_giving_return_env_steps_checkpoint_and_logs(fitted):
    lines = [line for line in fitted["stdout"].splitlines() if line.startswith("rlnorm: fit")]
    assert len(lines) == 1, fitted["stdout"][-3000:]
    line = lines[0]
    assert "512 env steps" in line
    assert "mean return " in line
    assert "not solved (target 475)" in line  # CartPole-v1's reward_threshold
    assert f"checkpoint {fitted['ckpt']}" in line
    assert f"logs {fitted['run_dir']}" in line


def test_fit_logs_episode_return_against_environment_steps(fitted):
    events = EventAccumulator(str(fitted["run_dir"]), size_guidance={"scalars": 0})
    events.Reload()
    for tag in ("by_env_step/episode_return", "by_env_step/episode_length"):
        steps = [event.step for event in events.Scalars(tag)]
        assert steps, tag
        # One point per rollout of 2 envs x 32 steps, the environment step count as its step.
        assert all(step % 64 == 0 for step in steps), steps
        assert steps[-1] == 512
    returns = events.Scalars("by_env_step/episode_return")
    assert all(event.value > 0 for event in returns)


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
    # The closing line comes from rank zero alone (and must not wait on the other rank).
    assert result.stdout.count("rlnorm: fit done: 512 env steps") == 1, result.stdout[-3000:]
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
    assert rows["reward:discounted_return"][1:3] == ["()", "512"]
    assert "gamma=0.98" in out


def test_inspect_table_shows_the_inferred_num_envs_and_names_the_discounted_return(fitted, capsys):
    assert main(["inspect", str(fitted["ckpt"])]) == 0
    out = capsys.readouterr().out
    assert "num_envs=None" not in out
    assert "num_envs=2 (inferred)" in out
    assert "discounted returns in progress, 2 envs:" in out
    assert "reward:discounted_return: running mean/std of each env's discounted return" in out


def test_inspect_json_matches_load_normalizers(fitted, capsys):
    assert main(["inspect", str(fitted["ckpt"]), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    checkpoint = torch.load(fitted["ckpt"], map_location="cpu", weights_only=True)
    assert report["global_step"] == checkpoint["global_step"]
    assert list(report["normalizers"]) == ["rlnorm"]
    entry = report["normalizers"]["rlnorm"]
    norms = rlnorm.load_normalizers(fitted["ckpt"])
    configured = json.loads(json.dumps(norms.config.to_dict()))
    assert entry["config"] == {**configured, "obs_shape": [4], "num_envs": 2}
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


def test_inspect_json_fills_in_the_inferred_obs_shape_and_num_envs(fitted, capsys):
    assert main(["inspect", str(fitted["ckpt"]), "--json"]) == 0
    entry = json.loads(capsys.readouterr().out)["normalizers"]["rlnorm"]
    assert entry["config"]["obs_shape"] == [4]
    assert entry["config"]["num_envs"] == 2
    assert entry["inferred"] == ["obs_shape", "num_envs"]


@pytest.mark.parametrize("where", ["root", "run_dir", "checkpoints"])
def test_inspect_a_directory_says_so_and_names_the_checkpoint_to_pass(fitted, where, capsys):
    directory = {
        "root": fitted["root"],
        "run_dir": fitted["run_dir"],
        "checkpoints": fitted["ckpt"].parent,
    }[where]
    assert main(["inspect", str(directory)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1, err
    assert f"'{directory}' is a directory, not a checkpoint file" in err[0]
    assert f"'{fitted['ckpt']}'" in err[0]


def test_inspect_a_directory_without_checkpoints_says_it_holds_none(tmp_path, capsys):
    assert main(["inspect", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "is a directory, not a checkpoint file" in err
    assert "it holds none" in err


def test_inspect_json_into_a_closed_pipe_exits_quietly_like_unix_tools(fitted):
    # `rlnorm inspect CKPT --json | head`: the reader is gone before the command writes.
    process = subprocess.Popen(
        [sys.executable, "-m", "rlnorm.cli", "inspect", str(fitted["ckpt"]), "--json"],
        cwd=ROOT,
        env=command_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    assert process.stderr is not None
    process.stdout.close()
    stderr = process.stderr.read()
    process.wait(timeout=300)
    assert stderr == ""
    assert process.returncode == 141  # 128 + SIGPIPE, as `cat` or `yes` end


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
    # float64 observations, and the same cast to float32 for the float32 programs.
    wide = rms.mean + (torch.rand(5, 4, generator=gen, dtype=torch.float64) * 6 - 3) * rms.std
    plain["cast_b5"] = folded["cast_b5"] = wide.float()
    plain["cast_one"] = folded["cast_one"] = wide[0].float()[None]
    # name -> (extra export arguments, inputs): the programs for one observation and float64.
    variants = {
        "single": (["--single"], {"one": within(1)[0], "cast_one": wide[0].float()}),
        "float64": (["--dtype", "float64"], {"b5": wide, "b0": wide[:0]}),
        "single_float64": (["--single", "--dtype", "float64"], {"one": wide[0]}),
        "folded_single": (["--fold-policy", "--single"], {"one": wide[0].float()}),
        "folded_float64": (["--fold-policy", "--dtype", "float64"], {"b5": wide}),
        "folded_single_float64": (
            ["--fold-policy", "--single", "--dtype", "float64"],
            {"one": wide[0]},
        ),
    }
    torch.save(plain, out / "plain.pt")
    torch.save(folded, out / "folded.pt")
    for name, (_, inputs) in variants.items():
        torch.save(inputs, out / f"{name}.pt")

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        status_plain = main(["export", ckpt, "--out", str(out / "obs_norm.pt2")])
        status_fold = main(["export", ckpt, "--out", str(out / "policy.pt2"), "--fold-policy"])
        status_variants = {
            name: main(["export", ckpt, "--out", str(out / f"{name}.pt2"), *extra])
            for name, (extra, _) in variants.items()
        }
    (out / "runner.py").write_text(BLOCKED_RUNNER)
    programs = ["plain", "obs_norm.pt2", "plain.pt", "folded", "policy.pt2", "folded.pt"]
    for name in variants:
        programs += [name, f"{name}.pt2", f"{name}.pt"]
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
        "status_variants": status_variants,
        "stdout": stdout.getvalue(),
        "norms": norms,
        "inputs": {"plain": plain, "folded": folded, **{k: v[1] for k, v in variants.items()}},
        "outputs": torch.load(out / "outputs.pt", weights_only=True),
        "dir": out,
    }


def test_export_writes_programs_that_load_without_rlnorm(exported):
    assert exported["status"] == (0, 0)
    assert (exported["dir"] / "obs_norm.pt2").is_file()
    assert (exported["dir"] / "policy.pt2").is_file()
    assert "torch.export.load" in exported["stdout"]
    assert exported["outputs"]["rlnorm_modules"] == []


@pytest.mark.parametrize("batch", [*(f"b{b}" for b in BATCHES), "clipped", "cast_b5"])
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


def folded_actor_of(fitted: dict[str, Any]) -> torch.nn.Module:
    checkpoint = torch.load(fitted["ckpt"], map_location="cpu", weights_only=True)
    hparams = {k: v for k, v in checkpoint["hyper_parameters"].items() if not k.startswith("_")}
    model = PPO(**hparams)
    model.load_state_dict(checkpoint["state_dict"])
    return model.actor


def test_export_says_which_input_each_program_takes(exported):
    assert set(exported["status_variants"].values()) == {0}
    out = exported["stdout"]
    assert "taking float32 observations (batch, 4), any batch size" in out
    assert "taking float32 observations (4,)" in out
    assert "taking float64 observations (4,)" in out


def test_single_export_normalizes_one_observation_like_load_normalizers(exported):
    for key in ("one", "cast_one"):
        x = exported["inputs"]["single"][key]
        got = exported["outputs"]["single"][key]
        assert x.shape == got.shape == (4,)  # what env.reset() of one CartPole returns
        torch.testing.assert_close(got, exported["norms"].normalize_obs(x), rtol=0, atol=1e-6)
    # Bitwise what the batched program gives for the same observation as a batch of one.
    cast_one = exported["outputs"]["single"]["cast_one"]
    assert torch.equal(cast_one, exported["outputs"]["plain"]["cast_one"][0])


def test_float64_export_equals_the_float32_program_on_the_input_cast_to_float32(exported):
    outputs = exported["outputs"]
    got = outputs["float64"]["b5"]
    assert got.dtype == torch.float32
    assert torch.equal(got, outputs["plain"]["cast_b5"])
    assert outputs["float64"]["b0"].shape == (0, 4)
    single = outputs["single_float64"]["one"]
    assert single.shape == (4,)
    assert torch.equal(single, outputs["plain"]["cast_one"][0])


def test_fold_policy_single_and_float64_exports_equal_the_ppo_actor(exported, fitted):
    actor = folded_actor_of(fitted)
    outputs, inputs = exported["outputs"], exported["inputs"]
    with torch.no_grad():
        for name, key in (
            ("folded_single", "one"),
            ("folded_float64", "b5"),
            ("folded_single_float64", "one"),
        ):
            x = inputs[name][key].float()
            expected = actor(exported["norms"].normalize_obs(x))
            got = outputs[name][key]
            assert got.shape == expected.shape == (*x.shape[:-1], 2), name
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(outputs["folded_float64"]["b5"], outputs["folded"]["cast_b5"])
    assert torch.equal(outputs["folded_single_float64"]["one"], outputs["folded"]["cast_one"][0])


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
    "fit_with_a_misspelled_option": (
        ["fit", "--model.total_timestep", "5", "--trainer.default_root_dir", "{root}/runs"],
        ["--model.total_timestep", "spelled out in full"],
    ),
    "fit_with_an_abbreviated_option": (
        ["fit", "--model.tot", "7", "--trainer.default_root_dir", "{root}/runs"],
        ["--model.tot", "spelled out in full"],
    ),
    "fit_with_a_module_that_cannot_be_imported": (
        ["fit", "--model.env_id", "no_such_module_rlnorm:MyEnv-v0"],
        ["`env_id`", "'no_such_module_rlnorm'"],
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


def test_fit_help_starts_with_what_rlnorm_adds_and_how_to_see_the_callbacks_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--help"])
    assert exit_info.value.code in (0, None)
    out = capsys.readouterr().out
    head = "\n".join(out.splitlines()[:25])
    assert head.startswith("rlnorm fit: train the reference PPO")
    assert "rlnorm fit --trainer.callbacks.help rlnorm.NormalizerCallback" in head
    assert "--model.total_timesteps" in head
    assert "not --trainer.max_steps" in head
    assert "usage: rlnorm [options] fit" in out


def test_fit_help_of_the_callback_lists_its_options():
    result = rlnorm_command("fit", "--trainer.callbacks.help", "rlnorm.NormalizerCallback")
    assert result.returncode == 0, result.stderr[-3000:]
    for option in ("reward", "gamma", "clip", "num_envs"):
        assert f"--trainer.callbacks.{option}" in result.stdout


def test_fit_without_config_warns_that_no_normalizer_is_attached_and_trains_a_module_env(
    tmp_path, monkeypatch, capsys
):
    # The user's own environment as gymnasium's "module:id": importing the module registers it.
    env_id = write_user_env_module(tmp_path, "rlnorm_cli_user_envs", "FourSteps-v0")
    monkeypatch.syspath_prepend(str(tmp_path))
    status = main(
        [
            "fit",
            "--model.env_id",
            env_id,
            "--trainer.default_root_dir",
            str(tmp_path / "runs"),
            "--trainer.enable_progress_bar",
            "false",
            *TINY,
        ]
    )
    captured = capsys.readouterr()
    assert status == 0, captured.err[-3000:]
    warnings = [line for line in captured.err.splitlines() if line.startswith("rlnorm: warning")]
    assert len(warnings) == 1, captured.err[-3000:]
    assert "no NormalizerCallback is attached" in warnings[0]
    assert "--trainer.callbacks+=rlnorm.NormalizerCallback" in warnings[0]
    assert "--config configs/cartpole.yaml" in warnings[0]
    done = [line for line in captured.out.splitlines() if line.startswith("rlnorm: fit done")]
    # Every episode returns 4, the env's reward_threshold: solved once 20 episodes are in.
    assert len(done) == 1
    assert "solved (>= 4) at 128 env steps" in done[0]


def test_fit_with_the_callback_added_on_the_command_line_does_not_warn(tmp_path, capsys):
    status = main(
        [
            "fit",
            "--trainer.callbacks+=rlnorm.NormalizerCallback",
            "--trainer.callbacks.reward=true",
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.enable_progress_bar",
            "false",
            *TINY,
            "--model.total_timesteps",  # the last value wins: 2 rollouts
            "128",
        ]
    )
    captured = capsys.readouterr()
    assert status == 0, captured.err[-3000:]
    assert "rlnorm: warning" not in captured.err
    ckpt = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert rlnorm.load_normalizers(ckpt).config.reward is True


@pytest.mark.parametrize("command", ["inspect", "export"])
def test_command_help_exits_0_and_describes_its_options(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: rlnorm {command}" in out
    assert "checkpoint" in out
    assert ("--json" if command == "inspect" else "--out") in out
