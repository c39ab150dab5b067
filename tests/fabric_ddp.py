"""Two Fabric DDP ranks (gloo on the CPU) driving ``FabricNormalizers`` with uneven batches.

Usage: ``python tests/fabric_ddp.py OUTDIR``. ``fabric.launch()`` re-runs this script for the
second rank. Each rank updates with its own number of rows per step, logs, saves with
``fabric.save``, then loads the file into fresh normalizers with ``fabric.load``, and writes
what it saw to ``OUTDIR/rank{r}.pt`` for the test to compare.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from lightning.fabric import Fabric
from lightning.fabric.loggers import TensorBoardLogger

import rlnorm

OBS_DIM, NUM_ENVS, STEPS, GAMMA = 3, 4, 5, 0.9


def rank_data(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s observations (uneven: 2 rows on rank 0, 7 on rank 1), rewards, dones."""
    gen = torch.Generator().manual_seed(100 * rank + step)
    rows = 2 if rank == 0 else 7
    obs = torch.randn(rows, OBS_DIM, generator=gen) * (1 + rank) + 10.0 * rank
    rewards = torch.randn(NUM_ENVS, generator=gen) + rank
    dones = torch.rand(NUM_ENVS, generator=gen) < 0.3
    return obs, rewards, dones


def main(outdir: Path) -> None:
    torch.set_num_threads(1)
    fabric = Fabric(
        accelerator="cpu",
        strategy="ddp",
        devices=2,
        loggers=TensorBoardLogger(str(outdir / "logs"), name="fabric"),
    )
    fabric.launch()
    rank = fabric.global_rank
    norm = rlnorm.FabricNormalizers(fabric, reward=True, gamma=GAMMA)
    for step in range(STEPS):
        obs, rewards, dones = rank_data(rank, step)
        norm.update_obs(obs)
        norm.normalize_obs(obs)
        norm.normalize_rewards(rewards, dones)
        if step % 2 == 1:
            norm.log(step=(step + 1) * 9)  # environment steps over both ranks
    figures = norm.log(step=STEPS * 9)
    path = outdir / "state.ckpt"
    fabric.save(path, {"rlnorm": norm, "env_steps": STEPS * 9})
    fresh = rlnorm.FabricNormalizers(fabric, reward=True, gamma=GAMMA)
    remainder = fabric.load(path, {"rlnorm": fresh})
    torch.save(
        {
            "state": {k: v.clone() for k, v in norm.normalizers.state_dict().items()},
            "loaded": {k: v.clone() for k, v in fresh.normalizers.state_dict().items()},
            "figures": figures,
            "remainder": remainder,
        },
        outdir / f"rank{rank}.pt",
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
