"""A callback for the DDP test: each rank writes what it did to ``<out_dir>/rank<k>.json``.

Recorded: training batches run and the global step, the keys of every validation sample it saw
(per task), a checksum of every parameter and buffer (codebook included), and the validation
metrics it logged (identical on every rank only if they were reduced across ranks).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import lightning as L
import torch


class DDPProbe(L.Callback):
    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.train_batches = 0
        self.val_keys: dict[str, list[str]] = {}
        self.val_metrics: dict[str, float] = {}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.train_batches += 1

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.val_keys = {}

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if trainer.sanity_checking:
            return
        for task, sub in batch.items():
            if isinstance(sub, dict) and "__key__" in sub:
                self.val_keys.setdefault(task, []).extend(sub["__key__"])

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.val_metrics = {k: float(v) for k, v in trainer.callback_metrics.items()
                                if k.startswith("val/") and torch.is_tensor(v) and v.numel() == 1}

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        digest = hashlib.sha256()
        for name, tensor in sorted(pl_module.state_dict().items()):
            if torch.is_tensor(tensor):
                digest.update(name.encode())
                digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        self.out_dir.mkdir(parents=True, exist_ok=True)
        record = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "global_step": trainer.global_step,
            "train_batches": self.train_batches,
            "val_keys": self.val_keys,
            "val_metrics": self.val_metrics,
            "checksum": digest.hexdigest(),
        }
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(record, indent=1))
