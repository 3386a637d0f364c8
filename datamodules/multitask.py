"""``MultiTaskDataModule``: one named DataModule per task, combined with Lightning's CombinedLoader.

Training batches are ``{task: batch}`` (mode ``max_size_cycle`` by default: the epoch lasts as
long as the longest task's loader, shorter ones cycle). Evaluation batches are ``{task: batch}``
too, through mode ``max_size``: a task whose loader is exhausted is absent from the dict.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.utilities import CombinedLoader

TRAIN_MODES = ("max_size_cycle", "max_size", "min_size")


class MultiTaskDataModule(L.LightningDataModule):
    """Args:
    tasks: ``{task name: LightningDataModule}`` (usually WebDataModules), one per head.
    mode: CombinedLoader mode for training, one of ``max_size_cycle`` (default), ``max_size``, ``min_size``.
    """

    def __init__(self, tasks: dict[str, L.LightningDataModule], mode: str = "max_size_cycle") -> None:
        super().__init__()
        if not tasks:
            raise ValueError("data.tasks is empty: give one DataModule per task")
        if mode not in TRAIN_MODES:
            raise ValueError(f"data.mode must be one of {TRAIN_MODES}, got {mode!r}")
        self.tasks = dict(tasks)
        self.mode = mode

    def __getitem__(self, task: str) -> L.LightningDataModule:
        return self.tasks[task]

    def prepare_data(self) -> None:
        for dm in self.tasks.values():
            dm.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        for dm in self.tasks.values():
            dm.trainer = self.trainer
            dm.setup(stage)

    def teardown(self, stage: str | None = None) -> None:
        for dm in self.tasks.values():
            dm.teardown(stage)

    def _combined(self, method: str, mode: str) -> CombinedLoader:
        return CombinedLoader({name: getattr(dm, method)() for name, dm in self.tasks.items()}, mode)

    def train_dataloader(self) -> CombinedLoader:
        return self._combined("train_dataloader", self.mode)

    def val_dataloader(self) -> CombinedLoader:
        return self._combined("val_dataloader", "max_size")

    def test_dataloader(self) -> CombinedLoader:
        return self._combined("test_dataloader", "max_size")

    def predict_dataloader(self) -> CombinedLoader:
        # Lightning's predict loop takes only the sequential mode: one task's loader after another,
        # each batch a plain batch with dataloader_idx = the task's position in ``tasks``
        return self._combined("predict_dataloader", "sequential")

    def state_dict(self) -> dict[str, Any]:
        return {name: dm.state_dict() for name, dm in self.tasks.items()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for name, dm in self.tasks.items():
            if name in state_dict:
                dm.load_state_dict(state_dict[name])
