"""Stage 1: reconstruct images or audio through the shared codebook (the VQ tokenizer's loss).

image: L1 (+ optional L2) on pixels.   audio: L1 on log-mel + a multi-resolution spectral loss.
Both add the quantizer's loss and, optionally, a PatchGAN hinge loss whose weight is balanced
against the reconstruction loss at the decoder's last layer (taming's adaptive weight) and which
starts at ``gan_start_step``.

About the audio loss: the codec decodes log-mel frames and reaches waveforms only through
Griffin-Lim, which is not part of the training graph, so the multi-resolution loss is computed on
the spectrogram: L1 on log-mel and spectral convergence on mel magnitude, each at time/frequency
pooling scales 1, 2 and 4 (coarse scales weigh broad spectral shape, fine ones detail).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.audio import SignalNoiseRatio
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from multimodal.backbone import Backbone, Tokens
from tasks.discriminator import PatchDiscriminator, adaptive_weight, hinge_d_loss
from tasks.heads.base import Head, check_modality
from tasks.metrics import CodebookUsage, update_fp32


class ReconstructionHead(Head):
    """Args:
    modality: ``image`` or ``audio``.
    l1_weight / l2_weight: pixel (image) or log-mel (audio) L1 and L2 weights.
    spectral_weight: audio only, the multi-resolution spectral loss weight.
    vq_weight: weight of the quantizer loss (commitment; codebook loss without EMA).
    discriminator: a ``PatchDiscriminator`` (or any x -> logits module) to train adversarially, or None.
    gan_weight / gan_start_step / adaptive_max: the adversarial term, when it starts, the clamp.
    num_media: examples written to TensorBoard at each validation.
    """

    def __init__(
        self,
        modality: str = "image",
        l1_weight: float = 1.0,
        l2_weight: float = 0.0,
        spectral_weight: float = 1.0,
        vq_weight: float = 1.0,
        discriminator: PatchDiscriminator | None = None,
        gan_weight: float = 0.1,
        gan_start_step: int = 2000,
        adaptive_max: float = 1e4,
        num_media: int = 8,
    ) -> None:
        super().__init__()
        modality_keys = check_modality(modality, "reconstruction")
        self.modality = modality
        self.required_keys = modality_keys
        self.backbone_modalities = (modality,)
        self.l1_weight, self.l2_weight, self.spectral_weight, self.vq_weight = l1_weight, l2_weight, spectral_weight, vq_weight
        self.discriminator = discriminator
        self.gan_weight, self.gan_start_step, self.adaptive_max = gan_weight, gan_start_step, adaptive_max
        self.num_media = num_media
        self._fake: Tensor | None = None
        self._real: Tensor | None = None

    # ------------------------------------------------------------------ forward pieces
    def reconstruct(self, backbone: Backbone, batch: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor, Tokens]:
        """-> (target, reconstruction, valid mask broadcastable to both, tokens).

        image: target/reconstruction [B, C, H, W], mask all ones.
        audio: log-mel [B, n_mels, F] and a frame mask [B, 1, F].
        """
        if self.modality == "image":
            x = batch["image"]
            tokens = backbone.tokenize("image", x)
            rec = backbone.decode("image", tokens.quantized)
            return x, rec, torch.ones_like(x[:, :1, :1, :1]), tokens
        codec = backbone.codec("audio")
        audio, lengths = batch["audio"], batch["audio_lengths"]
        target = codec.mel(audio, lengths)
        token_lengths = codec.tokens_for(lengths)
        tokens = backbone.quantize(codec.encode_mel(target, token_lengths), token_lengths)
        rec = backbone.decode("audio", tokens.quantized, token_lengths)
        frames = token_lengths * codec.downsample
        mask = (torch.arange(target.shape[-1], device=target.device)[None, :] < frames[:, None]).unsqueeze(1)
        return target, rec, mask.to(target.dtype), tokens

    def reconstruction_loss(self, target: Tensor, rec: Tensor, mask: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        denom = (mask.expand_as(target)).sum().clamp(min=1)
        l1 = ((rec - target).abs() * mask).sum() / denom
        logs = {"rec_l1": l1.detach()}
        loss = self.l1_weight * l1
        if self.l2_weight:
            l2 = ((rec - target).square() * mask).sum() / denom
            loss = loss + self.l2_weight * l2
            logs["rec_l2"] = l2.detach()
        if self.modality == "audio" and self.spectral_weight:
            spec = multi_resolution_spectral_loss(target, rec, mask)
            loss = loss + self.spectral_weight * spec
            logs["spectral"] = spec.detach()
        return loss, logs

    def _as_image(self, x: Tensor) -> Tensor:
        return x if self.modality == "image" else x.unsqueeze(1)  # log-mel as a 1-channel image

    # ------------------------------------------------------------------ protocol
    def loss(self, backbone: Backbone, batch: dict[str, Any], step: int) -> tuple[Tensor, dict[str, Tensor]]:
        target, rec, mask, tokens = self.reconstruct(backbone, batch)
        rec_loss, logs = self.reconstruction_loss(target, rec, mask)
        loss = rec_loss + self.vq_weight * tokens.loss
        logs.update({"vq_loss": tokens.loss.detach(), **{f"codebook/{k}": v for k, v in tokens.stats.items()}})
        if self.discriminator is not None and self.training:
            self._real, self._fake = self._as_image(target).detach(), self._as_image(rec).detach()
            if step >= self.gan_start_step:
                g_loss = -self.discriminator(self._as_image(rec)).mean()
                last = backbone.codec(self.modality).last_layer_weight
                weight = adaptive_weight(rec_loss, g_loss, last, self.adaptive_max)
                loss = loss + self.gan_weight * weight * g_loss
                logs.update({"g_loss": g_loss.detach(), "gan_adaptive_weight": weight})
        return loss, logs

    def discriminator_loss(self, backbone: Backbone, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        if self.discriminator is None or self._fake is None or step < self.gan_start_step:
            return torch.zeros((), device=backbone.quantizer.codebook.device), {}
        d_loss = hinge_d_loss(self.discriminator(self._real), self.discriminator(self._fake))
        return d_loss, {"d_loss": d_loss.detach()}

    def build_metrics(self, backbone: Backbone) -> MetricCollection:
        metrics: dict[str, Any] = {"codebook": CodebookUsage(backbone.num_codes)}
        if self.modality == "image":
            metrics["psnr"] = PeakSignalNoiseRatio(data_range=2.0)  # images in [-1, 1]
            metrics["ssim"] = StructuralSimilarityIndexMeasure(data_range=2.0)
        else:
            metrics["log_mel_l1"] = MeanMetric()
            metrics["mel_snr"] = SignalNoiseRatio()  # on mel magnitude: Griffin-Lim phase makes waveform SNR meaningless
        return MetricCollection(metrics)

    def evaluate(self, backbone: Backbone, batch: dict[str, Any], metrics: MetricCollection) -> dict[str, Tensor]:
        target, rec, mask, tokens = self.reconstruct(backbone, batch)
        rec_loss, logs = self.reconstruction_loss(target, rec, mask)
        if self.modality == "image":
            rec = rec.float().clamp(-1.0, 1.0)
            update_fp32(metrics["psnr"], rec, target)
            update_fp32(metrics["ssim"], rec, target)
        else:
            rec, target, mask = rec.float(), target.float(), mask.float()
            valid = mask.expand_as(target).bool()
            per_item = ((rec - target).abs() * mask).flatten(1).sum(1) / valid.flatten(1).sum(1).clamp(min=1)
            update_fp32(metrics["log_mel_l1"], per_item)
            update_fp32(metrics["mel_snr"], rec.exp() * mask, target.exp() * mask)
        metrics["codebook"].update(tokens.codes, tokens.mask)
        return {"loss": (rec_loss + self.vq_weight * tokens.loss).detach(), **logs}

    @torch.no_grad()
    def predict(self, backbone: Backbone, batch: dict[str, Any]) -> list[dict[str, Any]]:
        _, rec, _, tokens = self.reconstruct(backbone, batch)
        return [
            {"__key__": key, "codes": codes[m].tolist()}
            for key, codes, m in zip(batch["__key__"], tokens.codes, tokens.mask)
        ]

    @torch.no_grad()
    def log_media(self, backbone: Backbone, batch: dict[str, Any], experiment: Any, step: int, tag: str) -> None:
        n = self.num_media
        if n <= 0 or not hasattr(experiment, "add_image"):
            return
        sub = {k: (v[:n] if isinstance(v, (Tensor, list)) else v) for k, v in batch.items()}
        target, rec, _, tokens = self.reconstruct(backbone, sub)
        experiment.add_histogram(f"{tag}/code_histogram", tokens.codes[tokens.mask].float(), step, bins=min(backbone.num_codes, 256))
        if self.modality == "image":
            pairs = torch.stack([target, rec.clamp(-1, 1)], dim=1).flatten(0, 1)  # original, reconstruction, ...
            experiment.add_images(f"{tag}/original_then_reconstruction", (pairs + 1) / 2, step)
            return
        codec = backbone.codec("audio")
        mels = torch.cat([target, rec], dim=-1)  # original | reconstruction, side by side
        mels = (mels - mels.amin()) / (mels.amax() - mels.amin()).clamp(min=1e-6)
        experiment.add_images(f"{tag}/log_mel_original_left_reconstruction_right", mels.unsqueeze(1).flip(2), step)
        waves = backbone.to_audio(rec)
        for i, (wave, length) in enumerate(zip(waves, sub["audio_lengths"])):
            experiment.add_audio(f"{tag}/clip{i}_reconstruction", wave[: int(length)].clamp(-1, 1).cpu(), step, codec.sample_rate)
            experiment.add_audio(f"{tag}/clip{i}_original", sub["audio"][i, : int(length)].cpu(), step, codec.sample_rate)


def multi_resolution_spectral_loss(target: Tensor, rec: Tensor, mask: Tensor, scales: tuple[int, ...] = (1, 2, 4)) -> Tensor:
    """Log-mel [B, M, F] pair and frame mask [B, 1, F] -> mean over scales of
    L1(log) + spectral convergence ||S - S_hat||_F / ||S||_F on average-pooled mel magnitudes."""
    total = target.new_zeros(())
    for s in scales:
        t = F.avg_pool2d((target.exp() * mask).unsqueeze(1), s, ceil_mode=True)
        r = F.avg_pool2d((rec.exp() * mask).unsqueeze(1), s, ceil_mode=True)
        convergence = (t - r).norm() / t.norm().clamp(min=1e-6)
        log_l1 = (t.clamp(min=1e-5).log() - r.clamp(min=1e-5).log()).abs().mean()
        total = total + convergence + log_l1
    return total / len(scales)
