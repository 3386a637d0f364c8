"""A learned vocoder: log-mel frames -> waveform, Vocos-style (Siuzdak 2023, "Vocos: Closing the gap
between time-domain and Fourier-based neural vocoders for audio synthesis").

    log-mel [B, n_mels, F] -> ConvNeXt over frames -> per frame log|X| and phase -> X [B, n_fft/2+1, F+1]
    -> inverse STFT -> waveform [B, F * hop_length]

The network never works at the sample rate: it predicts the STFT of the waveform at the codec's own
frame rate (100 frames/s at 16 kHz, hop 160), and ``torch.istft`` (the codec's window, n_fft, hop)
makes the samples. A centred STFT of F * hop samples has F + 1 frames, so the last mel frame is
repeated once (as Griffin-Lim does). Magnitude: exp of the prediction, clipped at 100; phase: the
angle p of the prediction, used through cos p and sin p (Vocos' parametrisation, which wraps).

Training (:func:`vocoder_loss`): multi-resolution STFT loss (spectral convergence + L1 on log
magnitude at FFT sizes 256, 512, 1024) and L1 on the log-mel of the output against the target's,
through the codec's own front end. No adversarial term (Vocos adds one for quality; here the
measured comparison is against Griffin-Lim, and a GAN would double the CPU cost).

A vocoder belongs to one mel layout (sample rate, n_fft, hop, window, mel bands and range): the
layout is saved with its weights and checked against the codec's (:meth:`Vocoder.check_layout`).

ConvNeXt blocks are written here for 1-D sequences (timm's ``ConvNeXtBlock`` is 2-D only).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from multimodal.audio_codec import LOG_MEL_CENTER, LOG_MEL_SCALE  # the codec's input normalisation, reused
from multimodal.mel import MelSpectrogram

MAX_MAGNITUDE = 100.0
STFT_RESOLUTIONS = ((256, 64), (512, 128), (1024, 256))  # (n_fft, hop) of the multi-resolution loss


class ConvNeXtBlock1d(nn.Module):
    """x [B, C, T] -> x + gamma * MLP(LayerNorm(depthwise_conv(x))) (ConvNeXt, 1-D, no downsampling).

    Init: PyTorch defaults for the convolutions and linears; layer scale gamma = ``layer_scale``."""

    def __init__(self, dim: int, hidden: int, kernel: int = 7, layer_scale: float = 1e-2) -> None:
        super().__init__()
        self.dwconv = nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale))

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(self.dwconv(x).transpose(1, 2))  # [B, T, C]
        h = self.fc2(F.gelu(self.fc1(h))) * self.gamma
        return x + h.transpose(1, 2)


class Vocoder(nn.Module):
    """log-mel [B, n_mels, F] -> waveform [B, F * hop_length] (see the module docstring).

    Args:
        sample_rate, n_fft, hop_length, win_length, n_mels, f_min, f_max: the mel layout it inverts
            (the audio codec's front end, ``multimodal.mel.MelSpectrogram``).
        width / depth / kernel / mlp_ratio: the ConvNeXt stack over frames.
    """

    def __init__(
        self,
        sample_rate: int = 16000,
        n_fft: int = 512,
        hop_length: int = 160,
        win_length: int | None = None,
        n_mels: int = 64,
        f_min: float = 0.0,
        f_max: float | None = None,
        width: int = 256,
        depth: int = 6,
        kernel: int = 7,
        mlp_ratio: int = 3,
    ) -> None:
        super().__init__()
        if width < 1 or depth < 1 or kernel < 1 or kernel % 2 == 0 or mlp_ratio < 1:
            raise ValueError(f"Vocoder: width, depth, mlp_ratio >= 1 and an odd kernel, got {width}, {depth}, "
                             f"{mlp_ratio}, {kernel}")
        self.config = dict(sample_rate=sample_rate, n_fft=n_fft, hop_length=hop_length, win_length=win_length,
                           n_mels=n_mels, f_min=f_min, f_max=f_max, width=width, depth=depth, kernel=kernel,
                           mlp_ratio=mlp_ratio)
        self.frontend = MelSpectrogram(sample_rate, n_fft, hop_length, win_length, n_mels, f_min, f_max)
        self.embed = nn.Conv1d(n_mels, width, kernel, padding=kernel // 2)
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.blocks = nn.ModuleList(ConvNeXtBlock1d(width, mlp_ratio * width, kernel, 1.0 / depth) for _ in range(depth))
        self.final_norm = nn.LayerNorm(width, eps=1e-6)
        self.out = nn.Linear(width, 2 * self.frontend.n_freqs)

    @staticmethod
    def layout_of(frontend: MelSpectrogram) -> dict[str, Any]:
        """What a mel spectrogram means: rate, STFT, window and mel bands."""
        return {"sample_rate": frontend.sample_rate, "n_fft": frontend.n_fft, "hop_length": frontend.hop_length,
                "win_length": frontend.win_length, "n_mels": frontend.n_mels, "f_min": float(frontend.f_min),
                "f_max": None if frontend.f_max is None else float(frontend.f_max)}

    @property
    def layout(self) -> dict[str, Any]:
        return self.layout_of(self.frontend)

    def check_layout(self, frontend: MelSpectrogram, where: str = "the audio codec") -> None:
        """ValueError naming both layouts when ``frontend``'s mel layout is not the one this vocoder inverts."""
        theirs = self.layout_of(frontend)
        if theirs != self.layout:
            diff = sorted(k for k in theirs if theirs[k] != self.layout[k])
            raise ValueError(f"the vocoder was trained for another mel layout than {where}'s (differs in {diff}): "
                             f"vocoder {self.layout}, {where} {theirs}")

    def spectrum(self, log_mel: Tensor) -> Tensor:
        """log-mel [B, n_mels, F] -> complex STFT [B, n_fft/2+1, F+1]."""
        if log_mel.dim() != 3 or log_mel.shape[1] != self.frontend.n_mels:
            raise ValueError(f"Vocoder expects log-mel [B, {self.frontend.n_mels}, F], got {tuple(log_mel.shape)}")
        x = (log_mel - LOG_MEL_CENTER) / LOG_MEL_SCALE
        x = torch.cat([x, x[..., -1:]], dim=-1)  # F + 1 frames
        h = self.norm(self.embed(x).transpose(1, 2)).transpose(1, 2)
        for block in self.blocks:
            h = block(h)
        h = self.out(self.final_norm(h.transpose(1, 2))).float()  # [B, F+1, 2 * n_freqs]
        log_mag, phase = h.transpose(1, 2).chunk(2, dim=1)
        magnitude = log_mag.exp().clamp(max=MAX_MAGNITUDE)
        return torch.complex(magnitude * torch.cos(phase), magnitude * torch.sin(phase))

    def forward(self, log_mel: Tensor) -> Tensor:
        """log-mel [B, n_mels, F] -> waveform [B, F * hop_length] (float32)."""
        spec = self.spectrum(log_mel)
        with torch.autocast(device_type=log_mel.device.type, enabled=False):
            return self.frontend.istft(spec, log_mel.shape[-1] * self.frontend.hop_length)

    # the configuration travels with the weights, so a checkpoint rebuilds its vocoder (multimodal.checkpoint)
    def get_extra_state(self) -> dict[str, Any]:
        return {"config": dict(self.config)}

    def set_extra_state(self, state: Any) -> None:
        if isinstance(state, dict) and state.get("config") and state["config"] != self.config:
            raise ValueError(f"vocoder weights for {state['config']} loaded into a vocoder built as {self.config}")


def _stft_magnitude(x: Tensor, n_fft: int, hop: int) -> Tensor:
    window = torch.hann_window(n_fft, device=x.device)
    return torch.stft(x, n_fft, hop, n_fft, window, center=True, return_complex=True).abs().clamp(min=1e-7)


def vocoder_loss(pred: Tensor, target: Tensor, frontend: MelSpectrogram,
                 mel_weight: float = 1.0) -> tuple[Tensor, dict[str, Tensor]]:
    """Waveforms [B, T] (zero past each clip's end in both) -> multi-resolution STFT loss + mel L1."""
    with torch.autocast(device_type=pred.device.type, enabled=False):
        pred, target = pred.float(), target.float()
        convergence, log_l1 = pred.new_zeros(()), pred.new_zeros(())
        for n_fft, hop in STFT_RESOLUTIONS:
            p, t = _stft_magnitude(pred, n_fft, hop), _stft_magnitude(target, n_fft, hop)
            convergence = convergence + (t - p).norm() / t.norm().clamp(min=1e-6)
            log_l1 = log_l1 + (t.log() - p.log()).abs().mean()
        stft = (convergence + log_l1) / len(STFT_RESOLUTIONS)
        mel = (frontend(pred) - frontend(target)).abs().mean()
    loss = stft + mel_weight * mel
    return loss, {"stft": stft.detach(), "mel_l1": mel.detach()}


def load_vocoder(path: str) -> tuple[Vocoder, str]:
    """The vocoder of a vocoder run (a ``tasks.VocoderHead``'s, or a bare ``Vocoder`` state) -> (vocoder,
    resolved file). Rebuilt from the configuration saved with its weights."""
    from .checkpoint import read_checkpoint, resolve_checkpoint

    source = str(resolve_checkpoint(path).resolve())
    state = read_checkpoint(source).get("state_dict", {})
    configs = {k[: -len("_extra_state")]: v for k, v in state.items()
               if k.endswith("vocoder._extra_state") and isinstance(v, dict) and "config" in v}
    if len(configs) != 1:
        raise ValueError(f"{source} holds {len(configs)} vocoders (want one: a configs/vocoder.yaml run)")
    (prefix, extra), = configs.items()
    vocoder = Vocoder(**extra["config"])
    vocoder.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    return vocoder, source
