"""Two Lightning callbacks with the behaviour a training run needs from them here.

``ModelCheckpoint``: Lightning's, plus ``last.ckpt`` written at the FINAL training step whatever
ended the run (``max_steps`` not a multiple of ``every_n_train_steps``, ``max_time``, ``max_epochs``,
early stopping). Since Lightning 2.6 ``save_last`` is written only together with a step/epoch
checkpoint, and ``on_train_end`` writes it only if none was ever written: a run stopped by
``max_time`` at step 1842 with ``every_n_train_steps: 500`` kept the weights of step 1500, and
everything evaluated from ``last.ckpt`` was 342 steps older than the run's own last validation.
The final save happens at the end of the last training batch/epoch, before weight averaging copies
its averaged weights into the model at ``on_train_end``, so ``current_model_state`` holds the raw
weights and resuming continues exactly.

``EMA``: Lightning's ``EMAWeightAveraging`` with a decay warm-up, ``decay_n = min(decay, (1 + n) /
(10 + n))`` after n updates (as TensorFlow's ``ExponentialMovingAverage(num_updates=...)``): with a
fixed 0.995 the average of a 300-step run is still 37 % the weights of its first update (0.995^200),
so short runs evaluate a model from early in training. Lightning and torch's ``AveragedModel`` have
no warm-up option, hence the ``avg_fn`` written here. It also keeps the averaged weights in the
model until ``on_validation_end``: Lightning's callback swaps them out at ``on_validation_epoch_end``,
which runs BEFORE the module's, so whatever a head computes at epoch end (the generation head's
samples, gen_acc, fid_cls) came from the raw weights while the per-batch metrics came from the average.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging
from lightning.pytorch.callbacks import ModelCheckpoint as _LightningModelCheckpoint
from torch import Tensor


class ModelCheckpoint(_LightningModelCheckpoint):
    """``lightning.pytorch.callbacks.ModelCheckpoint`` (same arguments) that also writes ``last.ckpt``
    (when ``save_last``) at the step where training ends."""

    def _final_step_unsaved(self, trainer: pl.Trainer) -> bool:
        return bool(self.save_last) and not self._should_skip_saving_checkpoint(trainer)

    def _save_final(self, trainer: pl.Trainer) -> None:
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    @staticmethod
    def _last_epoch(trainer: pl.Trainer) -> bool:
        max_epochs = trainer.max_epochs
        return max_epochs is not None and max_epochs >= 0 and trainer.current_epoch + 1 >= max_epochs

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        max_steps_done = trainer.max_steps is not None and 0 < trainer.max_steps <= trainer.global_step
        last_batch = bool(getattr(trainer.fit_loop.epoch_loop.batch_progress, "is_last_batch", False))
        ending = trainer.should_stop or max_steps_done or (last_batch and self._last_epoch(trainer))
        if ending and self._final_step_unsaved(trainer):
            self._save_final(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if (trainer.should_stop or self._last_epoch(trainer)) and self._final_step_unsaved(trainer):
            self._save_final(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if trainer.should_stop and self._final_step_unsaved(trainer):  # e.g. early stopping
            self._save_final(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Any end the hooks above did not see. Weight averaging may already have copied its
        # averaged weights into the model here, so current_model_state would hold them too.
        if self._final_step_unsaved(trainer):
            self._save_final(trainer)


def ema_decay(decay: float, num_averaged: float) -> float:
    """The warmed-up decay ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates."""
    return min(decay, (1.0 + num_averaged) / (10.0 + num_averaged))


def ema_warmup_multi_avg_fn(decay: float):
    """``multi_avg_fn(averaged, current, n)`` of ``AveragedModel``: the warmed-up EMA over lists of
    tensors in one ``torch._foreach_lerp_`` (``averaged += (1 - d) * (current - averaged)``) instead of
    a Python loop over parameters."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must be in [0, 1], got {decay}")

    @torch.no_grad()
    def multi_avg_fn(averaged: list[Tensor], current: list[Tensor], num_averaged: Tensor) -> None:
        torch._foreach_lerp_(averaged, current, 1.0 - ema_decay(decay, float(num_averaged)))

    return multi_avg_fn


def ema_warmup_avg_fn(decay: float):
    """``avg_fn(averaged, current, n)`` of ``AveragedModel``: an EMA whose decay warms up as
    ``min(decay, (1 + n) / (10 + n))`` (0.1 at the first update, 0.5 at the 8th, 0.9 at the 80th)."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must be in [0, 1], got {decay}")

    @torch.no_grad()
    def avg_fn(averaged: Tensor, current: Tensor, num_averaged: Tensor) -> Tensor:
        d = ema_decay(decay, float(num_averaged))
        return averaged * d + current * (1.0 - d)

    return avg_fn


class EMA(EMAWeightAveraging):
    """An exponential moving average of the model's weights, used for validation, test, prediction and
    saved as the checkpoint's ``state_dict`` (the raw weights as ``current_model_state``).

    Args:
        decay: the decay after warm-up. warmup: warm the decay up as ``min(decay, (1+n)/(10+n))``.
        use_buffers / update_every_n_steps / update_starting_at_step: as ``EMAWeightAveraging``.
    """

    def __init__(self, decay: float = 0.999, warmup: bool = True, use_buffers: bool = False,
                 update_every_n_steps: int = 1, update_starting_at_step: int | None = None, **kwargs: Any) -> None:
        super().__init__(decay=decay, use_buffers=use_buffers, update_every_n_steps=update_every_n_steps,
                         update_starting_at_step=update_starting_at_step, **kwargs)
        if warmup:  # one foreach lerp over all parameters per update (AveragedModel's multi_avg_fn)
            self._kwargs["avg_fn"] = None
            self._kwargs["multi_avg_fn"] = ema_warmup_multi_avg_fn(decay)
        self.decay, self.warmup = decay, warmup

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Keep the averaged weights for the module's own epoch-end evaluation (swapped back below)."""

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._average_model is not None:
            self._swap_models(pl_module)  # the raw weights again, before any checkpoint of this step
