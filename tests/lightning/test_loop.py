"""The fit-loop facts read through Lightning's private attributes, checked on a live Trainer.

These tests fail first when a Lightning release renames what ``rlnorm.lightning.loop`` reads.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch.utils.data import DataLoader

from rlnorm.lightning import loop
from rollout_agents import QUIET_LIGHTNING

pytestmark = [pytest.mark.filterwarnings(w) for w in QUIET_LIGHTNING]


class Model(LightningModule):
    def __init__(self, manual: bool = False) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.automatic_optimization = not manual

    def train_dataloader(self) -> DataLoader:
        return DataLoader(torch.ones(3, 1), batch_size=1)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor | None:
        loss = self.layer(batch).sum()
        if self.automatic_optimization:
            return loss
        for optimizer in self.optimizers():  # two optimizer steps per batch
            optimizer.zero_grad()
            self.manual_backward(self.layer(batch).sum())
            optimizer.step()
        return None

    def configure_optimizers(self) -> Any:
        optimizers = [torch.optim.SGD(self.parameters(), lr=0.1) for _ in range(2)]
        return optimizers if not self.automatic_optimization else optimizers[0]


class Reads(Callback):
    def __init__(self) -> None:
        self.batches: list[tuple[int, bool, int]] = []
        self.epoch_ends: list[bool] = []

    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        step = loop.logging_step(trainer)
        self.batches.append((step, loop.optimizer_steps_after_batch(trainer), trainer.global_step))

    def on_train_epoch_end(self, trainer: Trainer, *args: Any) -> None:
        self.epoch_ends.append(loop.epoch_data_ran_out(trainer))


def fit(model: Model, **kwargs: Any) -> Reads:
    reads = Reads()
    trainer = Trainer(
        callbacks=[reads],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )
    trainer.fit(model)
    return reads


def test_logging_step_counts_batches_that_stepped_and_the_short_last_window_steps() -> None:
    reads = fit(Model(), max_epochs=1, accumulate_grad_batches=2)
    # Batch 0 accumulates; batch 1 steps; batch 2 is the epoch's last and steps alone.
    assert reads.batches == [(0, False, 0), (0, True, 1), (1, True, 2)]
    assert reads.epoch_ends == [True]


def test_logging_step_is_not_global_step_under_manual_optimization() -> None:
    reads = fit(Model(manual=True), max_epochs=1)
    assert [step for step, _, _ in reads.batches] == [0, 1, 2]
    assert [global_step for _, _, global_step in reads.batches] == [2, 4, 6]


def test_an_epoch_cut_short_by_max_steps_did_not_run_out_of_data() -> None:
    reads = fit(Model(), max_steps=1)
    assert reads.epoch_ends == [False]
