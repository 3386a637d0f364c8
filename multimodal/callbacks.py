"""Two Lightning callbacks with the behaviour a training run needs from them here.

``ModelCheckpoint``: Lightning's, plus ``last.ckpt`` written at the FINAL training step whatever
ended the run (``max_steps`` not a multiple of ``every_n_train_steps``, ``max_time``, ``max_epochs``,
early stopping). Since Lightning 2.6 ``save_last`` is written only together with a step/epoch
checkpoint, and ``on_train_end`` writes it only if none was ever written: a run stopped by
``max_time`` at step 1842 with ``every_n_train_steps: 500`` kept the weights of step 1500, and
everything evaluated from ``last.ckpt`` was 342 steps older than the run's own last validation.
The final save happens at the end of the last training batch/epoch, before weight averaging copies
its averaged weights into the model at ``on_train_end``, so ``current_model_state`` holds the raw
weights and resuming continues exactly. Three more things it does:

* ``save_last: link`` (the recipes' setting): ``last.ckpt`` is a symbolic link to the newest step
  checkpoint instead of a second full copy written seconds later (the final step gets a step
  checkpoint of its own first), replaced atomically (a new link renamed over the old one);
* every checkpoint file is written under a ``.partial`` name in its own folder and renamed when
  complete, so a file named ``*.ckpt`` is always whole (fsspec's transaction used by Lightning
  stages in ``$TMPDIR`` and copies across file systems);
* ``--ckpt_path last`` resumes from the newest complete checkpoint of the whole run folder (every
  ``version_N``, not only this run's new, empty one), whatever a kill left ``last.ckpt`` pointing at.

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

import os
from pathlib import Path
from typing import Any
from weakref import proxy

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
        candidates = self._monitor_candidates(trainer)
        if self.save_last == "link" and self.save_top_k != 0:
            self._save_topk_checkpoint(trainer, candidates)  # a step checkpoint of the final step to link to
        if self._last_global_step_saved != trainer.global_step:
            self._last_checkpoint_saved = ""  # nothing of this step on disk to link to: write last.ckpt in full
        self._save_last_checkpoint(trainer, candidates)

    def _is_local(self) -> bool:
        return "file" in getattr(self._fs, "protocol", ())

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        """Lightning's save, into ``<file>.partial`` in the same folder and renamed when complete."""
        if not self._is_local():
            return super()._save_checkpoint(trainer, filepath)
        partial = f"{filepath}.partial"
        trainer.save_checkpoint(partial, self.save_weights_only)
        if trainer.is_global_zero and os.path.exists(partial):
            os.replace(partial, filepath)
        trainer.strategy.barrier("ModelCheckpoint.rename")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))

    @staticmethod
    def _link_checkpoint(trainer: pl.Trainer, filepath: str, linkpath: str) -> None:
        """``linkpath`` -> ``filepath`` (relative), made under a temporary name and renamed over the old
        link, so ``last.ckpt`` never goes missing (Lightning removes the old link first)."""
        if trainer.is_global_zero and os.path.abspath(filepath) != os.path.abspath(linkpath):
            tmp = f"{linkpath}.link-{os.getpid()}"
            try:
                os.symlink(os.path.relpath(filepath, os.path.dirname(linkpath)), tmp)
                os.replace(tmp, linkpath)
            except OSError:  # no symbolic links here (e.g. Windows without the right): a full copy
                _LightningModelCheckpoint._link_checkpoint(trainer, filepath, linkpath)
                return
        trainer.strategy.barrier()

    def _find_last_checkpoints(self, trainer: pl.Trainer) -> set[str]:
        """What ``--ckpt_path last`` chooses from (Lightning takes the newest by modification time):
        every complete checkpoint (``*.ckpt``, links resolved, broken ones left out) under the run's
        ``default_root_dir`` when the checkpoints go inside it (all its ``version_N`` folders), else
        under ``dirpath``."""
        found = super()._find_last_checkpoints(trainer)
        if not self._is_local():
            return found
        root = Path(trainer.default_root_dir).resolve()
        where = Path(self.dirpath).resolve() if self.dirpath else root
        if where == root or root in where.parents:
            where = root
        if where.is_dir():
            found |= {os.path.normpath(p) for p in where.rglob(f"*{self.FILE_EXTENSION}") if p.is_file()}
        return found

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

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """The averaged weights as ``state_dict``, with the live model's module extra state: that is not
        averaged but metadata bound after the average was copied (the heads' text vocabularies and class
        names, bound at setup), which the copy made at fit start does not have."""
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        current = checkpoint.get("current_model_state")
        if current is not None:
            for key, value in current.items():
                if key.endswith("_extra_state"):
                    checkpoint["state_dict"][key] = value

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._average_model is not None:
            self._swap_models(pl_module)  # the raw weights again, before any checkpoint of this step
