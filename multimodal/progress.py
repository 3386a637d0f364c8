"""Progress that reads well where it lands: Lightning's tqdm bar on a terminal, plain lines elsewhere.

On a terminal the CLI uses ``TQDMProgressBar``. Where stdout is not a terminal (a log file, CI, a
notebook's captured output, ``nohup``), tqdm's carriage-return redraws pile up into one unreadable
line, so :class:`LineProgressBar` prints one self-contained line per update instead, at most every
``every_seconds`` (and at the first and last batch of every stage)::

    fit       step   120/1000  12%  2.31 it/s  eta 6:21  loss 0.523
    validate  batch     2/2   100%  0.85 it/s
    test      batch    10/16   62%  1.02 it/s  eta 0:06

Lightning's ``ProgressBar`` base class is the protocol; only the printing is written here (tqdm has no
line-per-update mode).
"""

from __future__ import annotations

import sys
import time
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar


def _clock(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def _total(counts: Any, index: int) -> float | int | None:
    """The batch count of dataloader ``index`` (inf for a stream of unknown length)."""
    try:
        return counts[index]
    except (IndexError, KeyError, TypeError):
        return None


class LineProgressBar(ProgressBar):
    """One plain line per update (see the module docstring). ``every_seconds``: the least time between
    two lines of the same stage."""

    def __init__(self, every_seconds: float = 15.0) -> None:
        super().__init__()
        self.every_seconds = every_seconds
        self._enabled = True
        self._stage: dict[str, float] = {}

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    # ------------------------------------------------------------------ the line
    def _start(self, stage: str) -> None:
        self._stage[stage] = time.perf_counter()
        self._stage[f"{stage}/last"] = 0.0

    def _update(self, trainer: pl.Trainer, stage: str, done: int, total: float | int | None, unit: str,
                metrics: dict[str, Any] | None = None) -> None:
        if not self._enabled or not trainer.is_global_zero:
            return
        now = time.perf_counter()
        started = self._stage.setdefault(stage, now)
        last = self._stage.get(f"{stage}/last", 0.0)
        finite = isinstance(total, int) or (isinstance(total, float) and total != float("inf"))
        final = finite and done >= int(total)
        if done != 1 and not final and now - last < self.every_seconds:
            return
        self._stage[f"{stage}/last"] = now
        rate = done / max(now - started, 1e-9)
        parts = [f"{stage:<9s} {unit} {done:>5d}" + (f"/{int(total)}" if finite else "")]
        if finite and total:
            parts.append(f"{100 * done / total:3.0f}%")
        parts.append(f"{rate:.2f} it/s")
        if finite and not final and rate > 0:
            parts.append(f"eta {_clock((int(total) - done) / rate)}")
        for name, value in (metrics or {}).items():
            if name != "v_num" and isinstance(value, (int, float)):
                parts.append(f"{name} {value:.4g}")
        print("  ".join(parts), flush=True)

    # ------------------------------------------------------------------ Lightning hooks
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start("fit")
        self._first_step = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else trainer.estimated_stepping_batches
        metrics = {k.split("/")[-1] if k == "train/loss" else k: v for k, v in self.get_metrics(trainer, pl_module).items()}
        self._update(trainer, "fit", trainer.global_step, total, "step", metrics)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._start("validate")

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if not trainer.sanity_checking:
            self._update(trainer, "validate", batch_idx + 1, _total(trainer.num_val_batches, dataloader_idx), "batch")

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start("test")

    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        self._update(trainer, "test", batch_idx + 1, _total(trainer.num_test_batches, dataloader_idx), "batch")

    def on_predict_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start("predict")

    def on_predict_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        self._update(trainer, "predict", batch_idx + 1, _total(trainer.num_predict_batches, dataloader_idx), "batch")


def default_progress_bar(stream: Any = None) -> ProgressBar:
    """Lightning's tqdm bar on a terminal, :class:`LineProgressBar` elsewhere."""
    stream = sys.stdout if stream is None else stream
    return TQDMProgressBar() if getattr(stream, "isatty", lambda: False)() else LineProgressBar()
