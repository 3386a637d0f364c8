"""Vocoder training: the learned vocoder (``multimodal.vocoder.Vocoder``) learns to turn the frozen
tokenizer's decoded log-mel back into the clip's waveform.

Input (``source``): ``codes`` (default) = the log-mel the audio codec decodes from the clip's own codes,
exactly what generation and ``decode_codes`` hand to a vocoder, so the vocoder learns to invert the
codec's smoothed mel rather than an ideal one; ``mel`` = the clip's true log-mel (a codec-independent
vocoder). Target: the clip's waveform. Loss: ``multimodal.vocoder.vocoder_loss``.

Evaluation, on each validation/test clip resynthesised from the same input by the vocoder and by
Griffin-Lim (``griffin_lim_iters``) side by side: SI-SNR and SI-SDR (torchmetrics) against the
original waveform, and the L1 distance between the log-mel of the result and of the original
(``mel_l1``; the STFT analysis anything downstream sees). Clips to TensorBoard: original, vocoder,
Griffin-Lim. ``scripts/vocoder_eval.py`` adds the judge's accuracy, a transcriber's WER and the
real-time factor.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.audio import ScaleInvariantSignalDistortionRatio, ScaleInvariantSignalNoiseRatio

from multimodal.backbone import Backbone
from multimodal.layers import length_mask
from multimodal.vocoder import Vocoder, vocoder_loss
from tasks.heads.base import Head, clean_latents
from tasks.metrics import update_fp32

SOURCES = ("codes", "mel")
METHODS = ("vocoder", "griffin_lim")


class VocoderHead(Head):
    """Args:
    vocoder: the network (default ``Vocoder()``, the default codec's mel layout).
    source: ``codes`` or ``mel`` (module docstring).
    mel_weight: weight of the mel L1 term against the multi-resolution STFT loss.
    griffin_lim_iters: iterations of the Griffin-Lim it is compared with (the codec's default: 32).
    num_media: clips written to TensorBoard per validation.
    """

    def __init__(self, vocoder: Vocoder | None = None, source: str = "codes", mel_weight: float = 1.0,
                 griffin_lim_iters: int = 32, num_media: int = 4) -> None:
        super().__init__()
        if source not in SOURCES:
            raise ValueError(f"vocoder head: source must be one of {SOURCES}, got {source!r}")
        self.vocoder = vocoder if vocoder is not None else Vocoder()
        self.source, self.mel_weight = source, mel_weight
        self.griffin_lim_iters, self.num_media = griffin_lim_iters, num_media
        self.required_keys = ("audio", "audio_lengths")
        self.backbone_modalities = ("audio",)

    def attach(self, backbone: Backbone, task: str) -> None:
        self.vocoder.check_layout(backbone.codec("audio").frontend, "model.backbone's audio codec")
        if self.source == "codes" and not backbone.freeze_tokenizer:
            raise ValueError(f"head {task!r} (source: codes) learns to invert a frozen tokenizer: set "
                             "model.backbone.tokenizer_ckpt (a stage-1 run)")

    def latent_request(self, backbone: Backbone) -> tuple[str, tuple[str, ...]] | None:
        return ("audio", ("audio",)) if self.source == "codes" else None

    def inputs(self, backbone: Backbone, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """(log-mel [B, n_mels, F], target waveform [B, F * hop] zero past each clip)."""
        codec = backbone.codec("audio")
        with torch.no_grad():
            if self.source == "codes":
                x0, token_lengths = clean_latents(backbone, batch, "audio")
                mel = backbone.decode("audio", x0, token_lengths).float()
            else:
                mel = codec.mel(batch["audio"], batch["audio_lengths"]).float()
        length = mel.shape[-1] * codec.hop_length
        audio = batch["audio"].float()
        audio = torch.nn.functional.pad(audio, (0, max(0, length - audio.shape[-1])))[:, :length]
        return mel, audio * length_mask(batch["audio_lengths"], length, audio.dtype)[:, 0]

    def loss(self, backbone: Backbone, batch: dict[str, Any], step: int) -> tuple[Tensor, dict[str, Tensor]]:
        mel, target = self.inputs(backbone, batch)
        pred = self.vocoder(mel) * length_mask(batch["audio_lengths"], target.shape[-1], target.dtype)[:, 0]
        return vocoder_loss(pred, target, self.vocoder.frontend, self.mel_weight)

    @torch.no_grad()
    def resynthesise(self, backbone: Backbone, batch: dict[str, Any], method: str) -> tuple[Tensor, Tensor]:
        """(waveforms [B, T] by ``method``, the originals [B, T]), zero past each clip's end."""
        mel, target = self.inputs(backbone, batch)
        if method == "vocoder":
            wave = self.vocoder(mel)
        else:
            wave = backbone.codec("audio").to_audio(mel, n_iter=self.griffin_lim_iters)
        return wave * length_mask(batch["audio_lengths"], wave.shape[-1], wave.dtype)[:, 0], target

    def build_metrics(self, backbone: Backbone) -> MetricCollection:
        metrics: dict[str, Any] = {"loss": MeanMetric()}
        for method in METHODS:
            metrics[f"{method}/si_snr"] = ScaleInvariantSignalNoiseRatio()
            metrics[f"{method}/si_sdr"] = ScaleInvariantSignalDistortionRatio()
            metrics[f"{method}/mel_l1"] = MeanMetric()
        return MetricCollection(metrics, compute_groups=False)

    def evaluate(self, backbone: Backbone, batch: dict[str, Any], metrics: MetricCollection) -> dict[str, Tensor]:
        loss, _ = self.loss(backbone, batch, step=-1)
        update_fp32(metrics["loss"], loss)
        frontend = backbone.codec("audio").frontend
        for method in METHODS:
            wave, target = self.resynthesise(backbone, batch, method)
            for i, n in enumerate(batch["audio_lengths"].tolist()):  # per clip, its own length
                update_fp32(metrics[f"{method}/si_snr"], wave[i, :n], target[i, :n])
                update_fp32(metrics[f"{method}/si_sdr"], wave[i, :n], target[i, :n])
                update_fp32(metrics[f"{method}/mel_l1"], (frontend(wave[i : i + 1, :n]) - frontend(target[i : i + 1, :n])).abs().mean())
        return {"loss": loss.detach()}

    def predict(self, backbone: Backbone, batch: dict[str, Any]) -> list[dict[str, Any]]:
        """Each clip resynthesised by the vocoder (``audio``), written beside its key."""
        wave, _ = self.resynthesise(backbone, batch, "vocoder")
        rate = backbone.codec("audio").sample_rate
        return [{"__key__": key, "audio": wave[i, : int(n)].cpu(), "sample_rate": rate}
                for i, (key, n) in enumerate(zip(batch["__key__"], batch["audio_lengths"].tolist()))]

    @torch.no_grad()
    def log_media(self, backbone: Backbone, batch: dict[str, Any], experiment: Any, step: int, tag: str) -> None:
        if self.num_media <= 0 or not hasattr(experiment, "add_audio"):
            return
        sub = {k: (v[: self.num_media] if isinstance(v, (Tensor, list)) else v) for k, v in batch.items()}
        rate = backbone.codec("audio").sample_rate
        for method in METHODS:
            wave, target = self.resynthesise(backbone, sub, method)
            for i, n in enumerate(sub["audio_lengths"].tolist()):
                experiment.add_audio(f"{tag}/clip{i}_{method}", wave[i, :n].clamp(-1, 1).cpu(), step, rate)
                if method == "vocoder":
                    experiment.add_audio(f"{tag}/clip{i}_original", target[i, :n].cpu(), step, rate)
