"""A test-only LightningModule for exercising the CLI and data layer (not shipped in the package)."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn


class TinyClassifier(L.LightningModule):
    """Mean-pooled image -> linear -> label; logs the data layer's skip counts."""

    def __init__(self, num_classes: int = 10, channels: int = 3, lr: float = 1e-2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(channels * 16, num_classes))

    def _step(self, batch: dict, stage: str) -> torch.Tensor:
        logits = self.net(batch["image"])
        loss = F.cross_entropy(logits, batch["label"])
        acc = (logits.argmax(-1) == batch["label"]).float().mean()
        n = len(batch["label"])
        self.log(f"{stage}/loss", loss, batch_size=n)
        self.log(f"{stage}/acc", acc, batch_size=n)
        skipped = sum(v for k, v in batch.get("__counts__", {}).items() if k.startswith("skipped/"))
        self.log(f"{stage}/skipped", float(skipped), reduce_fx="sum", batch_size=n)
        return loss

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._step(batch, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)
