"""Fits a CartPole agent under ``Trainer(accelerator="cpu", devices=2, strategy="ddp")``.

Usage: ``python tests/ddp_fit.py OUTDIR``. Lightning re-launches this script once per extra
rank (hence the ``__main__`` guard); later ``Trainer`` objects in the same script reuse the two
processes.

1. Uneven data: rank ``r`` plays ``5 + 37 * r`` environments, so every ``update_obs`` call gets
   a different number of rows on each rank. Each rank writes what it fed the normalizer and its
   final normalizer state to ``OUTDIR/rank{r}.pt``; rank 0's TensorBoard logger writes under
   ``OUTDIR/tb`` (every ``LOG_EVERY`` steps and at the end of each 3-step epoch) and the final
   checkpoint goes to ``OUTDIR/final.ckpt``.
2. Resume: with 3 environments per rank (different seeds per rank), an uninterrupted fit of
   ``RESUME_STEPS`` steps, and a fit of half of them saved to ``OUTDIR/half.ckpt`` then resumed
   by new Trainer/module/callback objects. Each rank writes the three final states to
   ``OUTDIR/resume{r}.pt``.
3. One rank alone: after a barrier, rank 0 alone calls ``callback.state_dict()`` (in a thread,
   given ``ONE_RANK_TIMEOUT_S``) while rank 1 runs no collective; rank 0 writes whether it
   returned, and what, to ``OUTDIR/one_rank.pt``. A ``state_dict`` that waited for the other
   rank would not return: rank 0 then records that and exits at once.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lightning.pytorch.loggers import TensorBoardLogger

import rlnorm
from rollout_agents import RolloutAgent, make_trainer

BASE_ENVS, EXTRA_ENVS_PER_RANK = 5, 37
ROLLOUT_LEN, MAX_STEPS, LOG_EVERY, GAMMA = 2, 6, 2, 0.95
RESUME_STEPS, RESUME_ENVS, RESUME_ROLLOUT_LEN = 6, 3, 16
ONE_RANK_TIMEOUT_S = 15.0


def main(outdir: Path) -> None:
    torch.set_num_threads(1)
    callback = rlnorm.NormalizerCallback(reward=True, gamma=GAMMA, log_every_n_steps=LOG_EVERY)
    agent = RolloutAgent(
        num_envs=BASE_ENVS,
        extra_envs_per_rank=EXTRA_ENVS_PER_RANK,
        rollout_len=ROLLOUT_LEN,
        gamma=GAMMA,
        steps_per_epoch=MAX_STEPS,  # split over the 2 ranks: 3-step epochs
    )
    trainer = make_trainer(
        outdir,
        [callback],
        devices=2,
        strategy="ddp",
        max_steps=MAX_STEPS,
        logger=TensorBoardLogger(outdir, name="tb"),
    )
    trainer.fit(agent)
    trainer.save_checkpoint(outdir / "final.ckpt")
    torch.save(
        {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "num_envs": agent.envs_here,
            "state": {k: v.clone() for k, v in callback.normalizers.state_dict().items()},
            "obs_updates": agent.obs_updates,
            "reward_updates": agent.reward_updates,
        },
        outdir / f"rank{trainer.global_rank}.pt",
    )
    resume(outdir)
    one_rank_state_dict(outdir, trainer, callback)


def one_rank_state_dict(outdir: Path, trainer: Any, callback: rlnorm.NormalizerCallback) -> None:
    trainer.strategy.barrier()  # the last collective both ranks run
    done = outdir / "one_rank.pt"
    if trainer.global_rank != 0:
        deadline = time.monotonic() + ONE_RANK_TIMEOUT_S + 30
        while not done.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        return
    result: dict[str, Any] = {}

    def call() -> None:
        try:
            result["state"] = callback.state_dict()
        except BaseException as err:  # recorded for the test to show
            result["error"] = repr(err)

    start = time.monotonic()
    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(ONE_RANK_TIMEOUT_S)
    state = result.get("state") or {}
    assert callback.normalizers.reward is not None
    record = {
        "returned": not thread.is_alive(),
        "seconds": time.monotonic() - start,
        "error": result.get("error"),
        "keys": sorted(state),
        "returns": state["normalizers"]["reward.returns"].clone() if state else None,
        "own_returns": callback.normalizers.reward.returns.detach().clone(),
    }
    torch.save(record, outdir / "one_rank.tmp")
    os.replace(outdir / "one_rank.tmp", done)
    if thread.is_alive():
        os._exit(1)  # stuck in a collective: nothing else can run in this process group


def _state(callback: rlnorm.NormalizerCallback) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in callback.normalizers.state_dict().items()}


def resume(outdir: Path) -> None:
    def run(max_steps: int, ckpt_path: Path | None = None) -> tuple:
        callback = rlnorm.NormalizerCallback(reward=True, gamma=GAMMA)
        agent = RolloutAgent(
            num_envs=RESUME_ENVS, rollout_len=RESUME_ROLLOUT_LEN, gamma=GAMMA, seed=1
        )
        trainer = make_trainer(outdir, [callback], devices=2, strategy="ddp", max_steps=max_steps)
        trainer.fit(agent, ckpt_path=ckpt_path)
        return trainer, callback

    _, uninterrupted = run(RESUME_STEPS)
    trainer, half = run(RESUME_STEPS // 2)
    trainer.save_checkpoint(outdir / "half.ckpt")
    trainer.strategy.barrier()
    trainer, resumed = run(RESUME_STEPS, ckpt_path=outdir / "half.ckpt")
    torch.save(
        {
            "uninterrupted": _state(uninterrupted),
            "half": _state(half),
            "resumed": _state(resumed),
        },
        outdir / f"resume{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
