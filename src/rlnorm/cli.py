"""The ``rlnorm`` command: train the reference PPO, inspect and export checkpoints.

- ``rlnorm fit --config configs/cartpole.yaml`` trains through ``LightningCLI`` (every
  ``--trainer.*``, ``--model.*`` and ``--seed_everything`` override works).
- ``rlnorm inspect CKPT [--json]`` prints the normalizers stored in a checkpoint.
- ``rlnorm export CKPT --out FILE [--fold-policy]`` writes the frozen observation normalizer
  (or the reference policy with the normalizer folded into its first layer) as a
  ``torch.export`` program that loads without rlnorm.

Bad input (a missing file, a checkpoint without rlnorm state, a wrong config key) prints one
line starting with ``rlnorm: error:`` and exits with status 2; set ``RLNORM_DEBUG=1`` to see
the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException

__all__ = ["main"]

USAGE = """usage: rlnorm {fit,inspect,export} ...

Observation and reward normalization for RL, with a reference PPO trainer.

commands:
  fit        train the reference PPO (LightningCLI): rlnorm fit --config configs/cartpole.yaml
  inspect    print the normalizers stored in a checkpoint: rlnorm inspect CKPT [--json]
  export     write the frozen observation normalizer: rlnorm export CKPT --out FILE

`rlnorm COMMAND --help` describes each command."""


class UsageError(Exception):
    """Bad command-line input, reported as one line."""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``rlnorm`` command; returns the exit status."""
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


def run_lightning_cli(args: list[str] | None) -> None:
    """Run ``LightningCLI`` on the reference PPO with the project's defaults."""
    from jsonargparse import ArgumentError
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.cli import LightningCLI

    from rlnorm.ppo import PPO

    class RLNormCLI(LightningCLI):
        def add_arguments_to_parser(self, parser: Any) -> None:
            # Always keep last.ckpt (and a periodic one), so runs can resume and be evaluated.
            parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
            parser.set_defaults(
                {
                    "checkpoint.save_last": True,
                    "checkpoint.every_n_train_steps": 1000,
                    "checkpoint.save_top_k": 1,
                }
            )

    try:
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
            parser_kwargs={"exit_on_error": False},
            save_config_kwargs={"overwrite": True},
        )
    except ArgumentError as err:
        raise UsageError(f"bad arguments or config: {err}") from None


# ---------------------------------------------------------------------------- inspect


def inspect_command(args: list[str]) -> int:
    """``rlnorm inspect CKPT [--json] [--name NAME]``."""
    parser = _parser("inspect", "Print the normalizers stored in a Lightning checkpoint.")
    parser.add_argument("checkpoint", help="path of a .ckpt file")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--name", help="only the NormalizerCallback with this name")
    opts = parser.parse_args(args)
    report = describe_checkpoint(opts.checkpoint, opts.name)
    print(json.dumps(report, indent=2) if opts.json else format_report(report))
    return 0


def describe_checkpoint(path: str, name: str | None = None) -> dict[str, Any]:
    """Everything ``inspect`` shows, as plain data."""
    from rlnorm.checkpoint import find_normalizer_states, read_checkpoint

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
        entry: dict[str, Any] = {
            "schema_version": states[key]["schema_version"] if key in states else None,
            "config": norms.config.to_dict(),
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
    lines = [
        f"checkpoint {report['checkpoint']} (epoch {report['epoch']}, "
        f"global step {report['global_step']})"
    ]
    for name, entry in report["normalizers"].items():
        config = entry["config"]
        settings = ", ".join(f"{k}={v}" for k, v in config.items() if k != "obs_shape")
        lines += ["", f"normalizer {name!r} (schema {entry['schema_version']})", f"  {settings}"]
        rows = [("statistic", "shape", "count", "mean min..max", "std min..max", "nonfinite")]
        for tag, stats in entry["statistics"].items():
            rows.append(
                (
                    tag,
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
            lines.append(f"  reward returns of {len(returns)} envs: {_span(returns)}")
    return "\n".join(lines)


def _span(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{min(values):.4g}..{max(values):.4g}"


# ---------------------------------------------------------------------------- export


def export_command(args: list[str]) -> int:
    """``rlnorm export CKPT --out FILE [--name NAME] [--fold-policy]``."""
    from rlnorm.checkpoint import read_checkpoint
    from rlnorm.export import export_module, export_observation_normalizer

    parser = _parser(
        "export",
        "Write the frozen observation normalizer as a torch.export program (.pt2) that "
        "`torch.export.load(FILE).module()` runs without rlnorm installed.",
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
    opts = parser.parse_args(args)
    checkpoint = read_checkpoint(opts.checkpoint)
    norms = _load(checkpoint, opts.checkpoint, opts.name)
    out_dir = os.path.dirname(os.path.abspath(opts.out))
    if not os.path.isdir(out_dir):
        raise FileNotFoundError(f"The directory of --out {opts.out!r} does not exist.")
    if opts.fold_policy:
        actor, obs_dim = _folded_actor(checkpoint, norms)
        export_module(actor, torch.zeros(2, obs_dim), opts.out)
        print(f"wrote {opts.out}: PPO actor taking raw observations of {obs_dim} features")
    else:
        export_observation_normalizer(norms, opts.out)
        shapes = {k: tuple(v) for k, v in norms.obs_shapes.items()}
        print(f"wrote {opts.out}: frozen observation normalizer {shapes}")
    print("load it with: torch.export.load(path).module()")
    return 0


def _folded_actor(checkpoint: dict[str, Any], norms: Any) -> tuple[torch.nn.Module, int]:
    """The reference PPO's actor with the observation normalizer folded into its first layer."""
    from rlnorm.export import fold_into_linear
    from rlnorm.ppo import PPO

    hparams = checkpoint.get("hyper_parameters") or {}
    weights = checkpoint.get("state_dict") or {}
    if "env_id" not in hparams or "actor.0.weight" not in weights:
        raise ValueError("--fold-policy needs a checkpoint of the reference PPO (rlnorm.ppo.PPO).")
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
    from rlnorm.checkpoint import load_normalizers

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
