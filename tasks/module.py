"""``MultiTaskModule``: the one training loop. A backbone, a dict of heads, weighted losses.

Batches are ``{task: batch}`` (from ``datamodules.MultiTaskDataModule``) or, with a single head,
a plain batch (a plain ``WebDataModule``), which is routed to that head. Logs
``train/<task>/<name>``, ``val/<task>/<metric>``, ``test/<task>/<metric>`` and ``train/loss``.

Heads with a ``discriminator`` switch the module to Lightning's manual optimisation with a second
optimizer for the discriminators; the discriminator step uses the raw torch optimizer so that
``global_step`` counts generator steps only (Lightning counts every LightningOptimizer.step).
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from functools import partial
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from multimodal.backbone import Backbone
from tasks.heads.base import Head, has_key
from tasks.metrics import CodebookUsage, codebook_stats
from tasks.task_adam import TaskAdamW, TaskGradients
from tasks.weights import CheckpointWeights

log = logging.getLogger(__name__)
COUNTS_KEY = "__counts__"  # the data layer's {event: count} per batch (see datamodules.webdata)


class MultiTaskModule(CheckpointWeights, L.LightningModule):
    """Args:
    backbone: the shared ``multimodal.Backbone``.
    heads: ``{task name: Head}``; task names match the data module's task names.
    loss_weights: ``{task: weight}``, default 1 for every head.
    loss_weighting: ``static`` (the weights above) or ``uncertainty`` (Kendall et al. 2018: learned
        log-variances s_t, total = sum_t w_t * (exp(-s_t) * L_t + s_t); logged as ``train/<task>/weight``).
    lr / weight_decay / betas: AdamW for backbone and heads.
    backbone_lr: learning rate of the backbone's trainable parameters (default ``lr``), e.g. lower
        when fine-tuning a trained trunk under new heads.
    warmup_steps / min_lr_ratio: linear warm-up, then cosine decay to ``lr * min_lr_ratio`` at the
        last step (``trainer.max_steps`` or the estimated stepping batches).
    disc_lr: AdamW learning rate of the discriminators (adversarial heads only).
    grad_clip: gradient norm clip in manual optimisation (use ``trainer.gradient_clip_val`` otherwise).
    check_finite: skip a training step whose inputs or loss hold NaN/Inf (on every rank at once, so
        DDP stays in step), counted in ``train/skipped_nonfinite_steps`` with a warning naming the task
        and key; ``nonfinite_patience`` skips in a row stop the run with a clear error.
    media_every_n_val: write images/audio/text to TensorBoard every n-th validation (0 = never).
    init_from: a checkpoint to initialise from (weights only; e.g. the stage-1 tokenizer). Backbone
        weights whose shapes do not match are an error naming the setting; head weights that do not
        match (a new class list) are reported and skipped.
    freeze: modules to freeze (no gradient, kept in eval mode): ``codecs``, ``codecs.image``,
        ``quantizer``, ``trunk``, ``heads.<task>``, or any submodule path of the backbone.
    cache_latents: heads whose training input is the frozen tokenizer's codes (generation, and the
        understanding heads with ``source: quantized``) have their task's data encode the training split
        ONCE and read the cached codes (``datamodules.latent_cache``) instead of re-encoding every batch;
        only where the codec and quantizer are frozen and the data module supports it.
    fused_optimizer: step with torch's fused AdamW kernel (one pass per tensor); None (default) = where the
        parameters' device supports it, False = the plain per-parameter implementation.
    compile: ``torch.compile`` every DiT block of the trunk (regional compilation: the blocks share one
        graph, shapes become dynamic after their first change); the first step's time (the compilation)
        is logged. Off by default: measured on this project's CPU (one thread, ``cpu`` preset, batch 32
        of 64 tokens, bf16) it took 60 s to compile and the step stayed at 135 ms; not measured on a GPU.
    shared_adam: ``joint`` (one AdamW over the summed loss) or ``per_task`` (every task keeps its own
        AdamW moments for the backbone's weights and their updates are summed, so each task moves the
        shared trunk as far as it would alone: :mod:`tasks.task_adam`; there ``loss_weights`` scale each
        task's step on the shared weights, since a loss scale cancels in Adam). Identical for one head.
    """

    def __init__(
        self,
        backbone: Backbone,
        heads: dict[str, Head],
        loss_weights: dict[str, float] | None = None,
        loss_weighting: str = "static",
        lr: float = 2e-4,
        backbone_lr: float | None = None,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.99),
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
        disc_lr: float = 2e-4,
        grad_clip: float | None = 1.0,
        check_finite: bool = True,
        nonfinite_patience: int = 20,
        media_every_n_val: int = 1,
        init_from: str | None = None,
        freeze: list[str] | None = None,
        shared_adam: str = "joint",
        cache_latents: bool = True,
        fused_optimizer: bool | None = None,
        compile: bool = False,
    ) -> None:
        super().__init__()
        if not heads:
            raise ValueError("model.heads is empty: give at least one task head")
        loss_weights = dict(loss_weights or {})
        unknown = sorted(set(loss_weights) - set(heads))
        if unknown:
            raise ValueError(f"model.loss_weights names tasks with no head: {unknown} (heads: {sorted(heads)})")
        for task, head in heads.items():
            for modality in getattr(head, "backbone_modalities", ()):
                backbone.codec(modality)  # raises, naming the missing codec
            if not isinstance(head, Head):
                raise TypeError(f"model.heads.{task} is a {type(head).__name__}, not a tasks.heads.Head")
        if loss_weighting not in ("static", "uncertainty"):
            raise ValueError(f"model.loss_weighting must be 'static' or 'uncertainty', got {loss_weighting!r}")
        if shared_adam not in ("joint", "per_task"):
            raise ValueError(f"model.shared_adam must be 'joint' or 'per_task', got {shared_adam!r}")
        if shared_adam == "per_task":
            if any(h.discriminator is not None for h in heads.values()):
                raise ValueError("model.shared_adam='per_task' does not support adversarial heads (a discriminator)")
            if loss_weighting != "static":
                log.warning("model.shared_adam='per_task': every task's gradient is normalised by its own Adam "
                            "moments, so learned loss scales (loss_weighting=%r) do not change the update; "
                            "static loss_weights scale each task's step on the shared weights", loss_weighting)
            if getattr(backbone.trunk, "grad_checkpointing", False):
                raise ValueError("model.shared_adam='per_task' records per-task gradients in the forward graph; "
                                 "gradient checkpointing recomputes it without them: set "
                                 "model.backbone.trunk.grad_checkpointing false or shared_adam 'joint'")
        for name, value in (("lr", lr), ("backbone_lr", backbone_lr)):
            if value is not None and not value > 0:
                raise ValueError(f"model.{name} must be positive, got {value}")
        self.save_hyperparameters()
        _drop_module_hparams(self)
        self.backbone = backbone
        self.heads = nn.ModuleDict(heads)
        self.loss_weights = {task: float(loss_weights.get(task, 1.0)) for task in heads}
        # learned log-variances for uncertainty weighting (in the state dict: they resume exactly)
        self.log_vars = nn.ParameterDict(
            {task: nn.Parameter(torch.zeros(())) for task in heads} if loss_weighting == "uncertainty" else {}
        )
        self.metrics = nn.ModuleDict(
            {stage: nn.ModuleDict({task: head.build_metrics(backbone) for task, head in heads.items()}) for stage in ("val", "test")}
        )
        for task, head in heads.items():
            head.attach(backbone, task)
        if init_from:
            self.load_weights(init_from)
        self.init_from = init_from
        self.frozen = [self._module(name) for name in (freeze or [])]
        for module in self.frozen:
            module.requires_grad_(False)
            module.eval()
        self.adversarial = any(h.discriminator is not None for h in heads.values())
        self.automatic_optimization = not self.adversarial
        self._media_batches: dict[str, dict[str, Any]] = {}
        self._val_count = 0
        self._nonfinite_total = 0
        self._nonfinite_run = 0
        self._counts: dict[str, dict[str, float]] = {}
        self._taps: TaskGradients | None = None  # per-task gradients (shared_adam='per_task')
        self._compiled = False
        self._step_started: float | None = None

    # ------------------------------------------------------------------ fine-tuning
    def _module(self, name: str) -> nn.Module:
        try:
            if name.startswith("heads."):
                return self.heads.get_submodule(name[len("heads."):])
            return self.backbone.get_submodule(name)
        except AttributeError as err:
            raise ValueError(f"model.freeze: no module {name!r} (try codecs, quantizer, trunk, heads.<task>)") from err

    def train(self, mode: bool = True) -> MultiTaskModule:
        super().train(mode)
        for module in getattr(self, "frozen", []):
            module.eval()  # frozen modules never switch to training behaviour (e.g. codebook EMA updates)
        return self

    # ------------------------------------------------------------------ batches
    def _route(self, batch: Any) -> dict[str, dict[str, Any]]:
        """-> ``{task: batch}`` for the tasks present (None entries of exhausted loaders dropped)."""
        if isinstance(batch, dict) and batch and set(batch) <= set(self.heads) and not any(
            isinstance(v, Tensor) for v in batch.values()
        ):
            return {task: b for task, b in batch.items() if b is not None}
        if len(self.heads) != 1:
            raise ValueError(
                f"got a plain batch but the model has {len(self.heads)} heads {sorted(self.heads)}: "
                "use datamodules.MultiTaskDataModule with one DataModule per task"
            )
        return {next(iter(self.heads)): batch}

    def _check(self, task: str, batch: dict[str, Any]) -> str | None:
        """Raise naming a missing key; return the first batch key holding NaN/Inf (or None)."""
        head = self.heads[task]
        missing = [k for k in head.required_keys if not has_key(batch, k)]
        if missing:
            raise KeyError(f"head {task!r} needs batch keys {missing}; its data gives {sorted(k for k in batch if not k.startswith('__'))}")
        if self.hparams.check_finite:
            for key, value in batch.items():
                if isinstance(value, Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
                    return key
        return None

    def _log_counts(self, task: str, batch: dict[str, Any], stage: str) -> None:
        """Add the data layer's skip counts of this batch to the stage's tally (logged at epoch end)."""
        tally = self._counts.setdefault(stage, {})
        for event, n in batch.get(COUNTS_KEY, {}).items():
            key = f"data/{stage}/{task}/{event}"
            tally[key] = tally.get(key, 0.0) + float(n)

    def _flush_counts(self, stage: str) -> None:
        """Log the tally summed over ranks. Every rank logs the UNION of the keys (zeros where it had
        none): ranks that logged different keys would issue different collectives and hang."""
        tally = self._counts.pop(stage, {})
        keys = set(tally)
        if self._trainer is not None and self.trainer.world_size > 1 and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(gathered, sorted(keys))
            keys = set().union(*map(set, gathered))
        for key in sorted(keys):
            self.log(key, tally.get(key, 0.0), reduce_fx="sum", on_step=False, on_epoch=True, batch_size=1,
                     sync_dist=True)

    def _batch_size(self, batch: dict[str, Any]) -> int:
        return len(batch["__key__"]) if "__key__" in batch else 1

    # ------------------------------------------------------------------ training
    def _losses(self, batch: Any) -> Tensor | None:
        """The weighted sum of the heads' losses, or None when the step is skipped (non-finite)."""
        total, bad = None, None
        for task, sub in self._route(batch).items():
            key = self._check(task, sub)
            if key is not None:
                bad = bad or f"batch key {key!r} of task {task!r}"
            with self._taps.capture(task) if self._taps is not None else nullcontext():
                loss, logs = self.heads[task].loss(self.backbone, sub, self.global_step)
            n = self._batch_size(sub)
            if bool(self.hparams.check_finite) and bad is None and not torch.isfinite(loss.detach()).all():
                bad = f"the loss of task {task!r}"
            self.log(f"train/{task}/loss", loss.detach(), batch_size=n)
            for name, value in logs.items():
                self.log(f"train/{task}/{name}", value, batch_size=n)
            self._log_counts(task, sub, "train")
            weighted = self.loss_weights[task] * self._weigh(task, loss)
            total = weighted if total is None else total + weighted
        if self.hparams.check_finite and self._skip_nonfinite(bad):
            return None
        self.log("train/loss", total.detach(), prog_bar=True)
        return total

    def _weigh(self, task: str, loss: Tensor) -> Tensor:
        """``L`` (static) or ``exp(-s) * L + s`` with the task's learned log-variance ``s`` (uncertainty)."""
        if task not in self.log_vars:
            return loss
        s = self.log_vars[task]
        self.log(f"train/{task}/weight", torch.exp(-s.detach()))
        return torch.exp(-s) * loss + s

    def _skip_nonfinite(self, bad: str | None) -> bool:
        """Agree over all ranks whether this step holds NaN/Inf; count it, and give up when it persists."""
        flag = torch.tensor(float(bad is not None), device=self.device)
        if self._trainer is not None and self.trainer.world_size > 1:
            flag = self.trainer.strategy.reduce(flag, reduce_op="max")
        if not flag.item():
            self._nonfinite_run = 0
            return False
        self._nonfinite_total += 1
        self._nonfinite_run += 1
        log.warning("step %d skipped: non-finite values in %s (%d skipped so far)", self.global_step,
                    bad or "another rank's batch", self._nonfinite_total)
        self.log("train/skipped_nonfinite_steps", float(self._nonfinite_total), reduce_fx="max")
        if self._nonfinite_run >= self.hparams.nonfinite_patience:
            raise RuntimeError(
                f"{self._nonfinite_run} training steps in a row had NaN/Inf ({bad or 'on another rank'}): "
                "stopping. Lower model.lr, check the data, or raise model.nonfinite_patience."
            )
        return True

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        if self.automatic_optimization:
            return self._losses(batch)
        opt_g, opt_d = self.optimizers()
        sched_g, sched_d = self.lr_schedulers()
        loss = self._losses(batch)
        if loss is None:
            return None
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        if self.hparams.grad_clip:
            self.clip_gradients(opt_g, gradient_clip_val=self.hparams.grad_clip, gradient_clip_algorithm="norm")
        opt_g.step()
        sched_g.step()
        d_total = None
        for task, head in self.heads.items():
            if head.discriminator is None:
                continue
            d_loss, logs = head.discriminator_loss(self.backbone, self.global_step)
            for name, value in logs.items():
                self.log(f"train/{task}/{name}", value)
            if d_loss.requires_grad:
                d_total = d_loss if d_total is None else d_total + d_loss
        if d_total is not None:
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(d_total)
            opt_d.optimizer.step()  # raw step: global_step counts generator steps only
            sched_d.step()
        return None

    # ------------------------------------------------------------------ evaluation
    def _evaluate(self, batch: Any, stage: str) -> None:
        for task, sub in self._route(batch).items():
            key = self._check(task, sub)
            if key is not None:
                log.warning("%s batch of task %r skipped: non-finite values in key %r", stage, task, key)
                tally = self._counts.setdefault(stage, {})
                name = f"data/{stage}/{task}/skipped/nonfinite_batches"
                tally[name] = tally.get(name, 0.0) + 1.0
                continue
            head = self.heads[task]
            logs = head.evaluate(self.backbone, sub, self.metrics[stage][task])
            n = self._batch_size(sub)
            for name, value in logs.items():
                self.log(f"{stage}/{task}/{name}", value, batch_size=n, sync_dist=True)
            self._log_counts(task, sub, stage)
            if stage == "val" and task not in self._media_batches:
                self._media_batches[task] = sub

    def _media_due(self) -> bool:
        every = self.hparams.media_every_n_val
        return bool(every) and self._val_count % every == 0 and not self.trainer.sanity_checking

    def _epoch_start(self) -> None:
        self._media_batches = {}
        for head in self.heads.values():
            head.reset_evaluation(active=not self.trainer.sanity_checking)

    def on_train_epoch_end(self) -> None:
        self._flush_counts("train")

    def _epoch_end(self, stage: str) -> None:
        self._flush_counts(stage)
        self._log_shared_codebook(stage)
        for task, metrics in self.metrics[stage].items():
            head = self.heads[task]
            head.evaluate_end(self.backbone, metrics, seed=self.global_step + self.global_rank)
            for name, metric in metrics.items(keep_base=True, copy_state=False):
                if not metric.update_called:
                    continue
                value = metric.compute()
                values = _flatten(value) if isinstance(value, dict) else {name: value}
                for key, v in values.items():
                    if isinstance(v, Tensor) and v.numel() != 1:
                        continue  # e.g. a confusion matrix: the head draws it in log_media
                    self.log(f"{stage}/{task}/{key}", v, sync_dist=False)
            metrics.reset()
            if stage == "val" and task in self._media_batches and self._media_due():
                if self.trainer.is_global_zero and self.logger is not None:
                    head.log_media(self.backbone, self._media_batches[task], self.logger.experiment, self.global_step, f"{stage}/{task}")
        self._media_batches = {}

    def _log_shared_codebook(self, stage: str) -> None:
        """Usage of the ONE codebook over all tasks, and per modality (``{stage}/codebook/...``)."""
        groups: dict[str, list[Tensor]] = {}
        for task, metrics in self.metrics[stage].items():
            usage = metrics["codebook"] if "codebook" in metrics else None
            if isinstance(usage, CodebookUsage) and usage.update_called:
                counts = self.all_gather(usage.counts).sum(0) if self.trainer.world_size > 1 else usage.counts
                modality = getattr(self.heads[task], "modality", task)
                groups.setdefault("all", []).append(counts)
                groups.setdefault(modality, []).append(counts)
        if len(groups.get("all", [])) < 2:
            return
        for name, counts in groups.items():
            for key, value in codebook_stats(torch.stack(counts).sum(0)).items():
                self.log(f"{stage}/codebook/{name}/{key.split('/')[-1]}", value, sync_dist=False)

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, "val")

    def on_validation_epoch_start(self) -> None:
        self._epoch_start()

    def on_test_epoch_start(self) -> None:
        self._epoch_start()

    def on_validation_epoch_end(self) -> None:
        self._epoch_end("val")
        if not self.trainer.sanity_checking:
            self._val_count += 1

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._epoch_end("test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, list[dict[str, Any]]]:
        tasks = getattr(getattr(self.trainer, "datamodule", None), "tasks", None)
        if isinstance(tasks, dict) and len(self.heads) > 1 and isinstance(batch, dict) and "__key__" in batch:
            task = list(tasks)[dataloader_idx]  # MultiTaskDataModule predicts task after task (sequential)
            return {task: self.heads[task].predict(self.backbone, batch)}
        return {task: self.heads[task].predict(self.backbone, sub) for task, sub in self._route(batch).items()}

    # ------------------------------------------------------------------ checks before the first step
    def _task_data(self) -> dict[str, Any]:
        """``{task: its DataModule}`` for the tasks with data (a plain DataModule serves a lone head)."""
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is None:
            return {}
        tasks = getattr(dm, "tasks", None)
        if isinstance(tasks, dict):
            return {task: tasks[task] for task in self.heads if task in tasks}
        return {next(iter(self.heads)): dm} if len(self.heads) == 1 else {}

    def setup(self, stage: str) -> None:
        """Hand every head its DataModule (after the data's ``prepare_data``/``setup``: text tokenizers),
        and the image codec's format to data that reads images (unset sizes follow it, set ones must
        agree); for ``fit``, ask the data of heads that train on frozen codes to cache them
        (``cache_latents``)."""
        image = self.backbone.codecs["image"] if "image" in self.backbone.codecs else None
        for task, data in self._task_data().items():
            if image is not None and hasattr(data, "bind_image_format") and "image" in getattr(data, "keys", ()):
                h, w = image.image_size
                if h != w:
                    raise ValueError(f"the image codec takes {h} x {w} images; the data modules crop squares")
                data.bind_image_format(h, image.in_channels, f"the image codec (model.backbone codecs.image, task {task})")
            self.heads[task].bind_data(data, task)
            if stage == "fit" and self.hparams.get("cache_latents", True):
                self._request_latent_cache(task, data)

    def _request_latent_cache(self, task: str, data: Any) -> None:
        request = self.heads[task].latent_request(self.backbone)
        if request is None or not hasattr(data, "cache_latents"):
            return
        modality, keep_raw = request
        frozen = self.backbone.codec(modality), self.backbone.quantizer
        if any(p.requires_grad for module in frozen for p in module.parameters()):
            return  # a tokenizer being trained gives other codes every step
        per_token = self.backbone.codec(modality).samples_per_token if modality == "audio" else None
        data.cache_latents(partial(self._encode_codes, modality), self.backbone.tokenizer_fingerprint(modality),
                           keep_raw=keep_raw, samples_per_token=per_token)

    @torch.no_grad()
    def _encode_codes(self, modality: str, batch: dict[str, Any]) -> dict[str, tuple[Tensor, Tensor]]:
        """The frozen tokenizer's codes of a raw batch, as a training step computes them (the same device
        and autocast): ``{modality: (codes [B, N], token lengths [B])}``."""
        x = batch[modality].to(self.device)
        lengths = batch["audio_lengths"].to(self.device) if modality == "audio" else None
        with self.trainer.strategy.precision_plugin.forward_context():
            return {modality: self.backbone.encode_codes(modality, x, lengths)}

    def configure_model(self) -> None:
        """``compile``: compile the trunk's blocks in place (parameters unchanged, so the optimizer and
        the per-task gradient taps see the same tensors)."""
        if self.hparams.get("compile") and not self._compiled and self.backbone.trunk is not None:
            for block in getattr(self.backbone.trunk, "blocks", []):
                block.compile()
            self._compiled = True

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._compiled and self._step_started is None:
            self._step_started = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._compiled and self._step_started is not None and self._step_started > 0:
            log.info("torch.compile: the first training step took %.1f s (compiling the trunk's blocks)",
                     time.perf_counter() - self._step_started)
            self._step_started = -1.0

    def on_fit_start(self) -> None:
        if self.hparams.get("shared_adam") == "per_task":
            if self.trainer.gradient_clip_val:
                raise ValueError("model.shared_adam='per_task' normalises every task's gradient on its own; "
                                 "trainer.gradient_clip_val would clip only their sum, which it does not use: "
                                 "remove trainer.gradient_clip_val or use shared_adam 'joint'")
            if str(self.trainer.precision).startswith("16"):
                raise ValueError("model.shared_adam='per_task' reads per-task gradients that fp16 loss scaling "
                                 "does not unscale: use trainer.precision bf16-mixed (or 32)")
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None:
            return
        tasks = getattr(dm, "tasks", None)
        for task, head in self.heads.items():
            sub = tasks.get(task) if isinstance(tasks, dict) else (dm if len(self.heads) == 1 else None)
            if sub is None:
                raise ValueError(f"head {task!r} has no data: add data.tasks.{task} (data tasks: {sorted(tasks or [])})")
            keys = getattr(sub, "keys", None)
            if keys is None:
                continue
            needed = {k.split("_")[0] for k in head.required_keys}
            missing = sorted(needed - set(keys))
            if missing:
                raise ValueError(
                    f"head {task!r} needs {missing} but its data set {getattr(sub, 'name', sub)!r} loads only {list(keys)}"
                )

    # ------------------------------------------------------------------ optimisation
    def _schedule(self, step: int) -> float:
        warmup = self.hparams.warmup_steps
        if step < warmup:
            return (step + 1) / warmup
        total = self.trainer.max_steps if self.trainer.max_steps and self.trainer.max_steps > 0 else self.trainer.estimated_stepping_batches
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        floor = self.hparams.min_lr_ratio
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        disc_params = {id(p) for h in self.heads.values() if h.discriminator is not None for p in h.discriminator.parameters()}
        params = [p for p in self.parameters() if p.requires_grad and id(p) not in disc_params]
        backbone_ids = {id(p) for p in self.backbone.parameters()}
        groups = [
            {"params": [p for p in params if id(p) in backbone_ids], "lr": hp.get("backbone_lr") or hp.lr},
            {"params": [p for p in params if id(p) not in backbone_ids], "lr": hp.lr},
        ]
        groups = [g for g in groups if g["params"]]
        if hp.get("shared_adam", "joint") == "per_task":
            self._taps = TaskGradients([self.backbone], self.heads)
            opt = TaskAdamW(groups, self._taps, lr=hp.lr, betas=tuple(hp.betas), weight_decay=hp.weight_decay,
                            task_weights=self.loss_weights, fused=hp.get("fused_optimizer"))
        else:
            fused = hp.get("fused_optimizer")
            foreach = False if fused is False else None  # false: the plain per-parameter implementation
            # Lightning's mixed-precision plugin refuses to clip the gradients of a fused optimizer (it
            # could unscale them itself): clipping (the adversarial heads' grad_clip, or
            # trainer.gradient_clip_val) under bf16/fp16 autocast steps with torch's unfused AdamW instead
            trainer = self._trainer
            clips = (self.adversarial and hp.get("grad_clip")) or (trainer is not None and trainer.gradient_clip_val)
            mixed = trainer is not None and str(trainer.precision) in ("bf16-mixed", "16-mixed")
            if clips and mixed:
                if fused:
                    raise ValueError(f"model.fused_optimizer=true cannot clip gradients under trainer.precision="
                                     f"{trainer.precision} (Lightning refuses a fused optimizer there): leave "
                                     "model.fused_optimizer unset, or turn the clipping off (model.grad_clip / "
                                     "trainer.gradient_clip_val)")
                if fused is None:
                    log.info("gradient clipping under %s: AdamW steps unfused (Lightning does not clip a fused "
                             "optimizer's gradients)", trainer.precision)
                fused = False
            elif fused is None:
                fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point()
                            for g in groups for p in g["params"])
            opt = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas), weight_decay=hp.weight_decay,
                                    fused=fused or None, foreach=foreach)
        sched = {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, self._schedule), "interval": "step"}
        if not self.adversarial:
            return {"optimizer": opt, "lr_scheduler": sched}
        d_params = [p for h in self.heads.values() if h.discriminator is not None for p in h.discriminator.parameters()]
        opt_d = torch.optim.AdamW(d_params, lr=hp.disc_lr, betas=tuple(hp.betas))
        sched_d = {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt_d, self._schedule), "interval": "step"}
        return [opt, opt_d], [sched, sched_d]


def _drop_module_hparams(module: L.LightningModule) -> None:
    """Keep ``backbone``/``heads`` in the hyperparameters only as configuration (``class_path``
    dicts, as the CLI gives them: ``multimodal.load_backbone`` rebuilds the backbone from it), never
    as pickled modules (a model built in Python)."""

    def is_config(value: Any) -> bool:
        if isinstance(value, nn.Module):
            return False
        if isinstance(value, dict):
            return all(is_config(v) for v in value.values())
        return not isinstance(value, (Tensor,))

    for store in (module._hparams, module._hparams_initial):
        for key in ("backbone", "heads"):
            if key in store and not is_config(store[key]):
                del store[key]


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for k, v in values.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out
