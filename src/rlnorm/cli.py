"""The ``rlnorm`` command: train the reference PPO, inspect and export checkpoints.

- ``rlnorm fit --config configs/cartpole.yaml`` trains through ``LightningCLI`` (every
  ``--trainer.*``, ``--model.*`` and ``--seed_everything`` override works; options must be
  spelled out in full). ``--model.total_timesteps`` sets the length of training in
  environment steps. ``last.ckpt`` holds the end of the run, and a last line says where it is.
- ``rlnorm inspect CKPT [--json]`` prints the normalizers stored in a checkpoint.
- ``rlnorm export CKPT --out FILE [--fold-policy] [--single] [--dtype float64]`` writes the
  frozen observation normalizer (or the reference policy with the normalizer folded into its
  first layer) as a ``torch.export`` program that loads without rlnorm.

Bad input (a missing file, a checkpoint without rlnorm state, a wrong config key) prints one
line starting with ``rlnorm: error:`` and exits with status 2; set ``RLNORM_DEBUG=1`` to see
the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar, RichProgressBar
from typing_extensions import override

__all__ = ["EndOfFitCheckpoint", "main"]

USAGE = """usage: rlnorm {fit,inspect,export} ...

Observation and reward normalization for RL, with a reference PPO trainer.

commands:
  fit        train the reference PPO (LightningCLI): rlnorm fit --config configs/cartpole.yaml
  inspect    print the normalizers stored in a checkpoint: rlnorm inspect CKPT [--json]
  export     write the frozen observation normalizer: rlnorm export CKPT --out FILE

`rlnorm COMMAND --help` describes each command."""

#: Printed before LightningCLI's own ``rlnorm fit --help``.
FIT_HELP = """rlnorm fit: train the reference PPO (rlnorm.agents.ppo.PPO) with Lightning's CLI.

What rlnorm adds (Lightning's own options follow below):
  --config configs/cartpole.yaml
        attaches rlnorm.NormalizerCallback (observation and reward normalization) as the
        config's trainer.callbacks. Without a config no normalizer is attached (a warning
        says so) and PPO trains on raw observations and rewards. To add one without a config:
        --trainer.callbacks+=rlnorm.NormalizerCallback --trainer.callbacks.reward=true
  The callback's options:  rlnorm fit --trainer.callbacks.help rlnorm.NormalizerCallback
  --model.total_timesteps N
        the length of training, in environment steps over all processes (default 100000).
        Use it, not --trainer.max_steps: under PPO's manual optimization a Trainer step is
        one optimizer step, update_epochs x num_minibatches of them per rollout (10 by
        default; 40 in configs/pendulum.yaml).
  --model.env_id ID
        a gymnasium id, or module:id for your own environment (importing module registers id).
  --checkpoint.*
        ModelCheckpoint's options. DEFAULT_ROOT_DIR/lightning_logs/version_N/checkpoints/
        last.ckpt holds the end of the run (for rlnorm inspect/export and load_normalizers).
  Options must be spelled out in full; a misspelled or abbreviated one is an error.
  Logs: TensorBoard under DEFAULT_ROOT_DIR/lightning_logs/version_N (episode_return against
  Trainer steps; by_env_step/episode_return against environment steps).
"""


class EndOfFitCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` also holds the state at the end of ``fit``.

    Lightning's ``ModelCheckpoint(save_last=True, every_n_train_steps=K)`` writes
    ``last.ckpt`` only every ``K`` steps, so a run whose length is not a multiple of ``K``
    leaves a ``last.ckpt`` without its final steps (statistics and policy). This one saves it
    once more when training ends, unless it already holds the final step.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The global step of the newest checkpoint written, seen through the public hook.
        self._step_saved: int | None = None

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Note the step of every checkpoint written (``last.ckpt`` goes with the others)."""
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        self._step_saved = checkpoint.get("global_step")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Save ``last.ckpt`` at the final step (Lightning's rule alone may leave it stale)."""
        super().on_train_end(trainer, pl_module)
        if (
            self.save_last
            and self.last_model_path
            and not trainer.fast_dev_run
            and self._step_saved != trainer.global_step
        ):
            # Every rank calls this (it gathers callback state); rank zero writes the file.
            trainer.save_checkpoint(self.last_model_path)


class RunProgressBar(RichProgressBar):
    """Rich's progress bar, labelled ``Epoch N`` when the epoch count is unlimited.

    ``rlnorm fit`` trains with ``max_epochs=-1`` (its length is ``total_timesteps``), which
    Lightning's Rich bar would label ``Epoch 0/-2``.
    """

    @override
    def _get_train_description(self, current_epoch: int) -> str:
        if self.trainer.max_epochs != -1:
            return super()._get_train_description(current_epoch)
        # Padded as Lightning pads it, so the validation bar's label does not make it flicker.
        return f"{f'Epoch {current_epoch}':{len(self.validation_description)}}"


def default_progress_bar(trainer_config: dict[str, Any]) -> ProgressBar | None:
    """The bar ``rlnorm fit`` adds, or None where Lightning's choice stands.

    Lightning's own default stays when the progress bar is disabled, when the config lists
    one, or when ``rich`` is not installed (Lightning then draws a tqdm bar, which is labelled
    correctly).
    """
    if trainer_config.get("enable_progress_bar") is False:
        return None
    if any(isinstance(callback, ProgressBar) for callback in listed_callbacks(trainer_config)):
        return None
    try:
        return RunProgressBar()
    except ModuleNotFoundError:
        return None


def listed_callbacks(trainer_config: dict[str, Any]) -> list[Any]:
    """The callbacks a trainer config lists, as a list (a config may give one, or none)."""
    callbacks = trainer_config.get("callbacks") or []
    return callbacks if isinstance(callbacks, list) else [callbacks]


class UsageError(Exception):
    """Bad command-line input, reported as one line."""


#: Exit status after the reader of stdout went away (128 + SIGPIPE, as Unix tools end).
BROKEN_PIPE_STATUS = 141


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``rlnorm`` command; returns the exit status."""
    try:
        return _main(argv)
    except BrokenPipeError:
        # `rlnorm inspect CKPT --json | head`: the reader closed the pipe. Stop quietly as Unix
        # tools do, and point stdout at /dev/null so the flush at exit fails no more.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):
            pass
        return BROKEN_PIPE_STATUS


def _main(argv: Sequence[str] | None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if not args or args[0] in ("-h", "--help"):
            print(USAGE)
            return 0 if args else 2
        command, rest = args[0], args[1:]
        if command == "inspect":
            return inspect_command(rest)
        if command == "export":
            return export_command(rest)
        if command == "fit":
            if "-h" in rest or "--help" in rest:
                print(FIT_HELP)
            # From the shell LightningCLI reads sys.argv itself; from Python it gets `argv`.
            run_lightning_cli(None if argv is None else args)
            return 0
        raise UsageError(f"unknown command {command!r}; choose from fit, inspect, export")
    except (
        UsageError,
        FileNotFoundError,
        ValueError,
        LookupError,
        TypeError,
        MisconfigurationException,
    ) as err:
        if os.environ.get("RLNORM_DEBUG"):
            raise
        message = " ".join(str(err).split())
        print(f"rlnorm: error: {message}", file=sys.stderr)
        return 2


# ---------------------------------------------------------------------------- fit


#: Printed (on stderr) by ``rlnorm fit`` when no ``NormalizerCallback`` is attached.
NO_NORMALIZER_WARNING = (
    "rlnorm: warning: no NormalizerCallback is attached, so PPO trains on raw observations "
    "and rewards. Attach one with --config configs/cartpole.yaml, or with "
    "--trainer.callbacks+=rlnorm.NormalizerCallback --trainer.callbacks.reward=true "
    "(its options: rlnorm fit --trainer.callbacks.help rlnorm.NormalizerCallback)."
)


def run_lightning_cli(args: list[str] | None) -> None:
    """Run ``LightningCLI`` on the reference PPO with the project's defaults."""
    from jsonargparse import ArgumentError
    from lightning.pytorch.cli import LightningCLI

    from rlnorm.agents.ppo import PPO
    from rlnorm.lightning.callback import NormalizerCallback

    class RLNormCLI(LightningCLI):
        def add_arguments_to_parser(self, parser: Any) -> None:
            # Always keep last.ckpt (and a periodic one), so runs can resume and be evaluated;
            # last.ckpt is written once more at the end, so that it holds the whole run.
            parser.add_lightning_class_args(EndOfFitCheckpoint, "checkpoint")
            parser.set_defaults(
                {
                    "checkpoint.save_last": True,
                    "checkpoint.every_n_train_steps": 1000,
                    "checkpoint.save_top_k": 1,
                }
            )

        def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
            config = self.config_init[self.subcommand]["trainer"]
            bar = None if "callbacks" in kwargs else default_progress_bar(config)
            if bar is not None:
                kwargs["callbacks"] = [*listed_callbacks(config), bar]
            return super().instantiate_trainer(**kwargs)

        def before_fit(self) -> None:
            callbacks = self.trainer.callbacks
            if self.trainer.is_global_zero and not any(
                isinstance(c, NormalizerCallback) for c in callbacks
            ):
                print(NO_NORMALIZER_WARNING, file=sys.stderr, flush=True)

        def after_fit(self) -> None:
            if self.trainer.is_global_zero:
                print(fit_summary(self.trainer, self.model), flush=True)

    # Whole option names only: argparse would take `--model.tot 7` for total_timesteps.
    strict = {"exit_on_error": False, "allow_abbrev": False}
    try:
        with warnings.catch_warnings():
            # Lightning builds torch's deprecated `LeafSpec` at every step; the FutureWarning is
            # between the two libraries and nothing a user of `rlnorm fit` could act on.
            warnings.filterwarnings(
                "ignore",
                message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                category=FutureWarning,
            )
            RLNormCLI(
                PPO,
                args=args,
                trainer_defaults={
                    "accelerator": "cpu",
                    "devices": 1,
                    "default_root_dir": "runs",
                    "max_epochs": -1,
                    # A step is a whole rollout and PPO update (256 env steps by default).
                    "log_every_n_steps": 5,
                },
                parser_kwargs={
                    **strict,
                    "prog": "rlnorm",
                    "fit": {
                        **strict,
                        "description": "Train the reference PPO; see the lines above this usage.",
                    },
                },
                save_config_kwargs={"overwrite": True},
            )
    except ArgumentError as err:
        message = str(err)
        if "unrecognized arguments" in message:
            message += " (options must be spelled out in full; `rlnorm fit --help` lists them)"
        raise UsageError(f"bad arguments or config: {message}") from None


def fit_summary(trainer: pl.Trainer, model: pl.LightningModule) -> str:
    """The line ``rlnorm fit`` ends with: final return, environment steps, checkpoint, logs."""
    parts = []
    env_steps = getattr(model, "env_steps", None)
    if env_steps is not None:
        parts.append(f"{env_steps:,} env steps")
    returns = getattr(model, "episode_returns", None)
    if returns:
        mean = sum(returns) / len(returns)
        parts.append(f"mean return {mean:.4g} over the last {len(returns)} episodes")
    elif returns is not None:
        parts.append("no episode finished")
    target = getattr(model, "solved_return", None)
    if target is not None:
        solved_at = getattr(model, "solved_at", None)
        parts.append(
            f"solved (>= {target:g}) at {solved_at:,} env steps"
            if solved_at is not None
            else f"not solved (target {target:g})"
        )
    checkpoint = trainer.checkpoint_callback
    ckpt_path = None
    if isinstance(checkpoint, ModelCheckpoint):
        ckpt_path = checkpoint.last_model_path or checkpoint.best_model_path or None
    parts.append(f"checkpoint {_shown(ckpt_path) if ckpt_path else 'none'}")
    # The logger's own log_dir: Trainer.log_dir broadcasts, and only rank zero gets here.
    log_dir = getattr(trainer.logger, "log_dir", None) if trainer.logger is not None else None
    parts.append(f"logs {_shown(log_dir) if log_dir else 'none'}")
    return "rlnorm: fit done: " + "; ".join(parts)


def _shown(path: str) -> str:
    """``path`` relative to the working directory when it lies inside it."""
    absolute = os.path.abspath(path)
    relative = os.path.relpath(absolute)
    return absolute if relative.startswith(os.pardir) else relative


# ---------------------------------------------------------------------------- inspect


def inspect_command(args: list[str]) -> int:
    """``rlnorm inspect CKPT [--json] [--name NAME]``."""
    parser = _parser("inspect", "Print the normalizers stored in a Lightning checkpoint.")
    parser.add_argument(
        "checkpoint",
        help="path of a .ckpt file, e.g. runs/cartpole/lightning_logs/version_0/checkpoints/"
        "last.ckpt",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--name", help="only the NormalizerCallback with this name")
    opts = parser.parse_args(args)
    report = describe_checkpoint(opts.checkpoint, opts.name)
    print(json.dumps(report, indent=2) if opts.json else format_report(report))
    sys.stdout.flush()  # a closed pipe fails here, inside main's handler
    return 0


def describe_checkpoint(path: str, name: str | None = None) -> dict[str, Any]:
    """Everything ``inspect`` shows, as plain data."""
    from rlnorm.io.checkpoint import find_normalizer_states, read_checkpoint

    checkpoint = read_checkpoint(path)
    states = find_normalizer_states(checkpoint)
    names = sorted(states)
    if name is not None:
        names = [name]
    if not names:
        _load(checkpoint, path)  # raises the explanatory error
    report: dict[str, Any] = {
        "checkpoint": str(path),
        "epoch": checkpoint.get("epoch"),
        "global_step": checkpoint.get("global_step"),
        "normalizers": {},
    }
    for key in names:
        norms = _load(checkpoint, path, key)
        config = norms.config.to_dict()
        # What the callback inferred from the data, in place of the configured None.
        inferred = []
        if config.get("obs_shape") is None and norms.obs:
            shapes = {k: list(v) for k, v in norms.obs_shapes.items()}
            config["obs_shape"] = shapes if norms.dict_obs else next(iter(shapes.values()))
            inferred.append("obs_shape")
        if config.get("num_envs") is None and norms.reward is not None:
            config["num_envs"] = int(norms.reward.num_envs)
            inferred.append("num_envs")
        entry: dict[str, Any] = {
            "schema_version": states[key]["schema_version"] if key in states else None,
            "config": config,
            "inferred": inferred,
            "statistics": {},
        }
        for tag, rms in norms.named_normalizers().items():
            std = rms.std.reshape(-1)
            entry["statistics"][tag] = {
                "shape": list(rms.shape),
                "count": int(rms.count),
                "nonfinite_rows": int(rms.nonfinite_count),
                "mean": [float(v) for v in rms.mean.reshape(-1)],
                "std": [float(v) for v in std],
            }
        if norms.reward is not None:
            entry["reward_returns"] = [float(v) for v in norms.reward.returns]
        report["normalizers"][key] = entry
    return report


def format_report(report: dict[str, Any]) -> str:
    """The ``inspect`` table."""
    position = (
        f" (epoch {report['epoch']}, global step {report['global_step']})"
        if report["epoch"] is not None or report["global_step"] is not None
        else ""  # a Fabric checkpoint: the loop keeps its own counters
    )
    lines = [f"checkpoint {report['checkpoint']}{position}"]
    for name, entry in report["normalizers"].items():
        config = entry["config"]
        inferred = set(entry.get("inferred", ()))
        settings = ", ".join(
            f"{k}={v}" + (" (inferred)" if k in inferred else "")
            for k, v in config.items()
            if k != "obs_shape"
        )
        lines += ["", f"normalizer {name!r} (schema {entry['schema_version']})", f"  {settings}"]
        rows = [("statistic", "shape", "count", "mean min..max", "std min..max", "nonfinite")]
        for tag, stats in entry["statistics"].items():
            rows.append(
                (
                    REWARD_ROW if tag == "reward" else tag,
                    str(tuple(stats["shape"])),
                    str(stats["count"]),
                    _span(stats["mean"]),
                    _span(stats["std"]),
                    str(stats["nonfinite_rows"]),
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        for i, row in enumerate(rows):
            lines.append(
                "  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))
            )
            if i == 0:
                lines.append("  " + "  ".join("-" * w for w in widths))
        if "reward_returns" in entry:
            returns = entry["reward_returns"]
            lines.append(f"  discounted returns in progress, {len(returns)} envs: {_span(returns)}")
        if "reward" in entry["statistics"]:
            lines.append(
                f"  ({REWARD_ROW}: running mean/std of each env's discounted return; rewards "
                "are divided by its std)"
            )
    return "\n".join(lines)


#: The inspect table's label of the reward normalizer's statistic.
REWARD_ROW = "reward:discounted_return"


def _span(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{min(values):.4g}..{max(values):.4g}"


# ---------------------------------------------------------------------------- export


def export_command(args: list[str]) -> int:
    """``rlnorm export CKPT --out FILE [--name NAME] [--fold-policy] [--single] [--dtype D]``."""
    from rlnorm.io.checkpoint import read_checkpoint
    from rlnorm.io.export import export_observation_normalizer, export_policy

    parser = _parser(
        "export",
        "Write the frozen observation normalizer as a torch.export program (.pt2) that "
        "`torch.export.load(FILE).module()` runs without rlnorm installed. A program takes one "
        "input signature, fixed when it is written: a batch (batch, *shape) of any size by "
        "default, or one observation with --single; float32 by default, or float64 with "
        "--dtype float64.",
    )
    parser.add_argument("checkpoint", help="path of a .ckpt file")
    parser.add_argument("--out", required=True, help="file to write, e.g. normalizer.pt2")
    parser.add_argument("--name", help="the NormalizerCallback's name, if several")
    parser.add_argument(
        "--fold-policy",
        action="store_true",
        help="export the reference PPO's actor with the normalizer folded into its first "
        "linear layer (clipping is dropped), mapping raw observations to action logits/means",
    )
    parser.add_argument(
        "--single",
        action="store_true",
        help="the program takes one observation of shape `shape` (what env.reset() of one "
        "environment returns) instead of a batch (batch, *shape)",
    )
    parser.add_argument(
        "--dtype",
        choices=["float32", "float64"],
        default="float32",
        help="dtype of the observations the program takes (default float32); float64 input "
        "is cast to float32 first, giving exactly the float32 program's result",
    )
    opts = parser.parse_args(args)
    checkpoint = read_checkpoint(opts.checkpoint)
    norms = _load(checkpoint, opts.checkpoint, opts.name)
    out_dir = os.path.dirname(os.path.abspath(opts.out))
    if not os.path.isdir(out_dir):
        raise FileNotFoundError(f"The directory of --out {opts.out!r} does not exist.")
    dtype = getattr(torch, opts.dtype)
    batched = not opts.single
    if opts.fold_policy:
        actor, obs_dim = _folded_actor(checkpoint, norms)
        export_policy(actor, obs_dim, opts.out, batched=batched, dtype=dtype)
        what = "PPO actor (action logits/means)"
        shapes = {"obs": (obs_dim,)}
    else:
        export_observation_normalizer(norms, opts.out, batched=batched, dtype=dtype)
        what = "frozen observation normalizer"
        shapes = {k: tuple(v) for k, v in norms.obs_shapes.items()}
    takes = ", ".join(
        f"{key}: {_input_shape(shape, batched)}" if norms.dict_obs else _input_shape(shape, batched)
        for key, shape in shapes.items()
    )
    other = "one observation: add --single" if batched else "batches: leave out --single"
    print(f"wrote {opts.out}: {what} taking {opts.dtype} observations {takes} (for {other})")
    print("load it with: torch.export.load(path).module()")
    sys.stdout.flush()
    return 0


def _input_shape(shape: tuple[int, ...], batched: bool) -> str:
    """``(batch, 4), any batch size`` or ``(4,)``."""
    if not batched:
        return str(tuple(shape))
    return "(" + ", ".join(["batch", *map(str, shape)]) + "), any batch size"


def _folded_actor(checkpoint: dict[str, Any], norms: Any) -> tuple[torch.nn.Module, int]:
    """The reference PPO's actor with the observation normalizer folded into its first layer."""
    from rlnorm.agents.ppo import PPO
    from rlnorm.io.export import fold_into_linear

    hparams = checkpoint.get("hyper_parameters") or {}
    weights = checkpoint.get("state_dict") or {}
    if "env_id" not in hparams or "actor.0.weight" not in weights:
        raise ValueError(
            "--fold-policy needs a checkpoint of the reference PPO (rlnorm.agents.ppo.PPO)."
        )
    if norms.dict_obs or not norms.obs:
        raise ValueError("--fold-policy needs a single (non-dict) observation normalizer.")
    model = PPO(**{k: v for k, v in hparams.items() if not k.startswith("_")})
    model.load_state_dict(weights)
    actor = model.actor
    rms = next(iter(norms.obs.values()))
    actor[0] = fold_into_linear(actor[0], rms)
    return actor.eval(), actor[0].in_features


def _load(checkpoint: dict[str, Any], path: str, name: str | None = None) -> Any:
    """``load_normalizers`` on an already read checkpoint, errors naming the file."""
    from rlnorm.io.checkpoint import load_normalizers

    try:
        return load_normalizers(checkpoint, name=name)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def _parser(command: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"rlnorm {command}", description=description)

    def error(message: str) -> None:
        raise UsageError(message)

    parser.error = error  # type: ignore[method-assign]
    return parser


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
