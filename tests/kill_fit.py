"""A training process for the SIGKILL tests: ``python tests/kill_fit.py OUTDIR MODE``.

Fits :class:`agents.RolloutAgent` with a ``NormalizerCallback`` and a ``ModelCheckpoint`` that
saves every ``EVERY`` steps into ``OUTDIR/ckpt`` (``last.ckpt`` kept), with ``max_steps`` far
beyond what the tests let it reach. It never ends by itself:

- ``MODE=run``: once a checkpoint exists it writes ``OUTDIR/ready`` and trains on, slowly,
  until the test kills it with SIGKILL at whatever point it has reached.
- ``MODE=die-writing``: the save at step ``2 * EVERY`` is cut off half-way through writing the
  file and the process SIGKILLs itself, as a kill during a checkpoint copy does. Lightning
  writes to a temporary file and moves it into place; when the temporary directory is on
  another filesystem that move is a copy, which is what this simulates.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lightning.pytorch.callbacks import Callback, ModelCheckpoint

import rlnorm
from rollout_agents import RolloutAgent, make_trainer

EVERY, NUM_ENVS, ROLLOUT_LEN, GAMMA = 2, 3, 6, 0.97


def agent() -> RolloutAgent:
    return RolloutAgent(num_envs=NUM_ENVS, rollout_len=ROLLOUT_LEN, gamma=GAMMA, seed=3)


def callback() -> rlnorm.NormalizerCallback:
    return rlnorm.NormalizerCallback(reward=True, gamma=GAMMA)


class Beacon(Callback):
    """Tells the test a checkpoint exists, then slows training so the kill lands mid-run."""

    def __init__(self, outdir: Path) -> None:
        self.outdir = outdir

    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        # ModelCheckpoint saves after this hook (Lightning runs checkpoint callbacks last):
        # ready one step after last.ckpt first exists.
        ready = self.outdir / "ready"
        if (self.outdir / "ckpt" / "last.ckpt").exists() and not ready.exists():
            ready.write_text(str(trainer.global_step))
        time.sleep(0.02)


def die_while_writing_at(step: int) -> None:
    """Make the save at ``step`` write half the file to its final path, then SIGKILL."""
    real_move = shutil.move

    def move(src: str, dst: str, *args: Any, **kwargs: Any) -> Any:
        if f"step={step}" not in str(dst):
            return real_move(src, dst, *args, **kwargs)
        data = Path(src).read_bytes()
        with open(dst, "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
        return None

    shutil.move = move


def main(outdir: Path, mode: str) -> None:
    torch.set_num_threads(1)
    checkpoint = ModelCheckpoint(
        dirpath=outdir / "ckpt", every_n_train_steps=EVERY, save_top_k=-1, save_last=True
    )
    callbacks: list[Callback] = [callback(), checkpoint]
    if mode == "run":
        callbacks.append(Beacon(outdir))
    else:
        die_while_writing_at(2 * EVERY)
    trainer = make_trainer(outdir, callbacks, max_steps=100_000, enable_checkpointing=True)
    trainer.fit(agent())


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
