"""The head protocol: what every task head gives the one training loop (``tasks.MultiTaskModule``).

A head is an ``nn.Module`` with

* ``required_keys``: the batch keys it reads (checked against the data before the first step);
* ``loss(backbone, batch, step) -> (loss, logs)``: the training loss and detached scalars to log;
* ``build_metrics(backbone) -> MetricCollection``: fresh torchmetrics, one copy per stage (val/test);
* ``attach(backbone, task)``: checks against the backbone at construction (clear errors at start);
* ``bind_data(data, task)``: called at setup with the task's DataModule (after ``prepare_data``),
  e.g. to take its text tokenizer; may raise naming the setting;
* ``reset_evaluation()`` / ``evaluate(backbone, batch, metrics) -> logs`` / ``evaluate_end(backbone,
  metrics)``: start of an evaluation, update ``metrics`` on each validation/test batch, and work done
  once at the end (e.g. generating samples) before the metrics are computed;
* ``predict(backbone, batch) -> list[dict]``: one JSON-able record per sample;
* ``log_media(backbone, batch, experiment, step, tag)``: images/audio/text to TensorBoard (optional);
* ``discriminator`` (None or a module) and ``discriminator_loss(backbone, step)`` for adversarial
  heads, which the module trains with a second optimizer;
* ``latent_request(backbone)``: ``(modality, keep_raw)`` when the head's training input is the frozen
  tokenizer's codes of ``modality`` (it reads them through :func:`clean_latents`), so the module may
  have the data read them from a cache encoded once (``datamodules.latent_cache``); ``keep_raw``
  names raw modalities the head reads as well. None (default): the head needs the raw batch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import MetricCollection

from multimodal.backbone import Backbone

MODALITY_KEYS = {"image": ("image",), "audio": ("audio", "audio_lengths")}
"""The batch keys a head reading each modality needs."""

CODE_KEYS = {"image": "image_codes", "audio": "audio_codes", "audio_lengths": "audio_codes"}
"""The cached-codes key that stands in for a raw modality key (``datamodules.latent_cache``)."""


def has_key(batch: dict[str, Any], key: str) -> bool:
    """Whether ``batch`` provides ``key``, raw or as cached codes."""
    return key in batch or (key in CODE_KEYS and CODE_KEYS[key] in batch)


def clean_latents(backbone: Backbone, batch: dict[str, Any], modality: str) -> tuple[Tensor, Tensor]:
    """The frozen tokenizer's quantized latents of a batch: code vectors [B, N, D] and token lengths [B].

    Looked up from cached codes (``<modality>_codes`` [B, N], ``audio_code_lengths`` [B]) when the batch
    has them, else encoded from the raw ``image`` / ``audio`` (``Backbone.quantized_latents``): the same
    vectors either way."""
    codes = batch.get(f"{modality}_codes")
    if codes is not None:
        lengths = batch.get(f"{modality}_code_lengths")
        if lengths is None:
            lengths = torch.full((codes.shape[0],), codes.shape[1], dtype=torch.long, device=codes.device)
        with torch.no_grad():
            return backbone.quantizer.lookup(codes), lengths
    lengths = batch["audio_lengths"] if modality == "audio" else None
    return backbone.quantized_latents(modality, batch[modality], lengths)


def check_modality(modality: str, head: str) -> tuple[str, ...]:
    """The batch keys of ``modality``; a clear error for an unknown one."""
    if modality not in MODALITY_KEYS:
        raise ValueError(f"{head} head: modality must be one of {sorted(MODALITY_KEYS)}, got {modality!r}")
    return MODALITY_KEYS[modality]


class Head(nn.Module):
    """Base class with the protocol's defaults; see the module docstring."""

    required_keys: tuple[str, ...] = ()

    def __init__(self) -> None:
        super().__init__()
        self.discriminator: nn.Module | None = None  # an instance attribute: nn.Module registers modules

    def loss(self, backbone: Backbone, batch: dict[str, Any], step: int) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def build_metrics(self, backbone: Backbone) -> MetricCollection:
        return MetricCollection({})

    def attach(self, backbone: Backbone, task: str) -> None:
        """Validate the head against the backbone; raise naming the setting. Default: nothing."""

    def bind_data(self, data: Any, task: str) -> None:
        """Take what the head needs from its DataModule (e.g. the text tokenizer). Default: nothing."""

    def reset_evaluation(self, active: bool = True) -> None:
        """Called at the start of each validation/test epoch (``active`` False during the sanity check)."""

    def evaluate_end(self, backbone: Backbone, metrics: MetricCollection, seed: int = 0) -> None:
        """Called at the end of each validation/test epoch, before ``metrics`` are computed."""

    def evaluate(self, backbone: Backbone, batch: dict[str, Any], metrics: MetricCollection) -> dict[str, Tensor]:
        loss, logs = self.loss(backbone, batch, step=-1)
        return {"loss": loss.detach(), **logs}

    def predict(self, backbone: Backbone, batch: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"__key__": k} for k in batch["__key__"]]

    def log_media(self, backbone: Backbone, batch: dict[str, Any], experiment: Any, step: int, tag: str) -> None:
        """Write examples to a TensorBoard ``SummaryWriter``; default: nothing."""

    def discriminator_loss(self, backbone: Backbone, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        return torch.zeros(()), {}

    def latent_request(self, backbone: Backbone) -> tuple[str, tuple[str, ...]] | None:
        """``(modality, keep_raw)`` when training reads only frozen codes of ``modality`` (see the module
        docstring); default None."""
        return None
