"""Log-mel spectrogram front end and Griffin-Lim inversion, computed with torch only.

Forward:  audio [B, T] --STFT (Hann window, centred, zero padded)--> |X| [B, n_fft/2+1, frames]
          --mel filterbank [n_mels, n_fft/2+1]--> mel [B, n_mels, frames] --clamp(1e-5).log()--> log-mel.
          ``frames = ceil(T / hop_length)``: frame k is centred on sample k * hop_length.
Inverse:  log-mel --exp, pseudo-inverse of the filterbank + non-negative refinement--> |X|
          --fast Griffin-Lim (Perraudin et al., 2013)--> audio [B, frames * hop_length].

The spectrogram is a magnitude (power 1) spectrogram; the log floor 1e-5 makes silence finite
(log(1e-5) = -11.51).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

LOG_FLOOR = 1e-5
LOG_SILENCE = float(torch.tensor(LOG_FLOOR).log())  # log-mel of silence, -11.5129 (float32)
MEL_SCALES = ("slaney", "htk")
MEL_NORMS = ("slaney", None)


def hz_to_mel(hz: Tensor, scale: str = "slaney") -> Tensor:
    """Hertz -> mel. HTK: 2595 log10(1 + f / 700). Slaney: linear f / (200/3) below 1 kHz, then
    logarithmic with 27 mels per factor 6.4."""
    if scale == "htk":
        return 2595.0 * torch.log10(1.0 + hz / 700.0)
    f_sp, min_log_hz = 200.0 / 3.0, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    linear = hz / f_sp
    log = min_log_mel + torch.log(hz.clamp(min=min_log_hz) / min_log_hz) / logstep
    return torch.where(hz >= min_log_hz, log, linear)


def mel_to_hz(mel: Tensor, scale: str = "slaney") -> Tensor:
    """Inverse of ``hz_to_mel``."""
    if scale == "htk":
        return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)
    f_sp, min_log_hz = 200.0 / 3.0, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    linear = mel * f_sp
    log = min_log_hz * torch.exp(logstep * (mel - min_log_mel))
    return torch.where(mel >= min_log_mel, log, linear)


def mel_filterbank(
    sample_rate: int,
    n_fft: int,
    n_mels: int,
    f_min: float = 0.0,
    f_max: float | None = None,
    scale: str = "slaney",
    norm: str | None = "slaney",
) -> Tensor:
    """Triangular mel filters, [n_mels, n_fft // 2 + 1], float64.

    Filter m rises linearly from edge m to a peak of 1 at edge m+1 and falls to 0 at edge m+2, the
    n_mels + 2 edges being equally spaced on the mel scale between f_min and f_max. ``norm="slaney"``
    divides filter m by half its bandwidth, (edge[m+2] - edge[m]) / 2 in Hz, so every filter has unit
    area; ``norm=None`` keeps peaks of 1 (adjacent filters then sum to 1 between the outer peaks).
    """
    if scale not in MEL_SCALES:
        raise ValueError(f"mel_scale must be one of {MEL_SCALES}, got {scale!r}")
    if norm not in MEL_NORMS:
        raise ValueError(f"mel norm must be one of {MEL_NORMS}, got {norm!r}")
    f_max = sample_rate / 2.0 if f_max is None else float(f_max)
    if not 0.0 <= f_min < f_max <= sample_rate / 2.0:
        raise ValueError(
            f"need 0 <= f_min < f_max <= sample_rate / 2, got f_min={f_min}, f_max={f_max}, sample_rate={sample_rate}"
        )
    freqs = torch.linspace(0.0, sample_rate / 2.0, n_fft // 2 + 1, dtype=torch.float64)  # [n_freqs]
    mel_lo, mel_hi = hz_to_mel(torch.tensor([f_min, f_max], dtype=torch.float64), scale)
    edges = mel_to_hz(torch.linspace(float(mel_lo), float(mel_hi), n_mels + 2, dtype=torch.float64), scale)
    lower, center, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]  # [n_mels, 1]
    rising = (freqs[None, :] - lower) / (center - lower)
    falling = (upper - freqs[None, :]) / (upper - center)
    fb = torch.minimum(rising, falling).clamp(min=0.0)  # [n_mels, n_freqs]
    if norm == "slaney":
        fb = fb * (2.0 / (upper - lower))
    empty = (fb.sum(dim=1) == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(
            f"mel filters {empty} contain no FFT bin: n_mels={n_mels} is too many for n_fft={n_fft} "
            f"at sample_rate={sample_rate} (lower n_mels or raise n_fft)"
        )
    return fb


class MelSpectrogram(nn.Module):
    """audio [B, T] -> log-mel [B, n_mels, ceil(T / hop_length)].

    The STFT is centred with zero padding (n_fft // 2 either side), so a clip's frames do not depend
    on what follows it in a padded batch, and any T >= 1 works. Runs in float32 with autocast off.
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
        mel_scale: str = "slaney",
        norm: str | None = "slaney",
    ):
        super().__init__()
        win_length = n_fft if win_length is None else win_length
        if sample_rate < 1 or n_fft < 2 or n_mels < 1:
            raise ValueError(
                f"sample_rate, n_fft and n_mels must be positive (n_fft >= 2), got {sample_rate}, {n_fft}, {n_mels}"
            )
        if not 1 <= win_length <= n_fft:
            raise ValueError(f"win_length must be in [1, n_fft={n_fft}], got {win_length}")
        if not 1 <= hop_length <= win_length:
            raise ValueError(f"hop_length must be in [1, win_length={win_length}], got {hop_length}")
        self.sample_rate, self.n_fft = sample_rate, n_fft
        self.hop_length, self.win_length = hop_length, win_length
        self.n_mels, self.f_min, self.f_max = n_mels, f_min, f_max
        fb = mel_filterbank(sample_rate, n_fft, n_mels, f_min, f_max, mel_scale, norm)
        # Derived from the settings, so kept out of the state dict.
        self.register_buffer("filterbank", fb.float(), persistent=False)  # [n_mels, n_freqs]
        self.register_buffer("window", torch.hann_window(win_length, periodic=True), persistent=False)

    @property
    def n_freqs(self) -> int:
        return self.n_fft // 2 + 1

    def frames_for(self, num_samples: int | Tensor) -> int | Tensor:
        """Number of frames of ``num_samples`` samples: ceil(T / hop_length)."""
        return -(-num_samples // self.hop_length)

    def stft(self, audio: Tensor) -> Tensor:
        """audio [B, T] -> complex spectrum [B, n_freqs, T // hop_length + 1] (centred, zero padded)."""
        return torch.stft(
            audio, self.n_fft, self.hop_length, self.win_length, self.window,
            center=True, pad_mode="constant", return_complex=True,
        )  # fmt: skip

    def istft(self, spectrum: Tensor, length: int) -> Tensor:
        """complex spectrum [B, n_freqs, frames] -> audio [B, length] (inverse of ``stft``)."""
        return torch.istft(
            spectrum, self.n_fft, self.hop_length, self.win_length, self.window, center=True, length=length
        )

    def forward(self, audio: Tensor) -> Tensor:
        if audio.dim() != 2 or audio.shape[-1] < 1:
            raise ValueError(f"expected audio [B, T] with T >= 1, got shape {tuple(audio.shape)}")
        with torch.autocast(device_type=audio.device.type, enabled=False):
            magnitude = self.stft(audio.float()).abs()[..., : self.frames_for(audio.shape[-1])]
            mel = torch.matmul(self.filterbank, magnitude)  # [B, n_mels, frames]
            return mel.clamp(min=LOG_FLOOR).log()


def mel_to_linear(mel: Tensor, filterbank: Tensor, n_iter: int = 20) -> Tensor:
    """Least-squares non-negative magnitude S with filterbank @ S ~= mel.

    mel [B, n_mels, F], filterbank [n_mels, n_freqs] -> S [B, n_freqs, F]. Starts from the
    pseudo-inverse solution clamped to be non-negative, then ``n_iter`` multiplicative updates
    S <- S * (Fb^T mel) / (Fb^T Fb S), which keep S >= 0 and do not increase ||Fb S - mel||^2.
    """
    fb = filterbank.to(mel.dtype)
    S = torch.matmul(torch.linalg.pinv(fb), mel).clamp(min=1e-10)
    numerator = torch.matmul(fb.T, mel)
    gram = fb.T @ fb  # [n_freqs, n_freqs]
    for _ in range(n_iter):
        # the floor keeps S away from subnormal floats, which are very slow on CPUs
        S = (S * numerator / torch.matmul(gram, S).clamp(min=1e-12)).clamp(min=1e-10)
    return S


@torch.no_grad()
def griffin_lim(
    log_mel: Tensor,
    frontend: MelSpectrogram,
    n_iter: int = 32,
    momentum: float = 0.99,
    nnls_iter: int = 20,
    generator: torch.Generator | None = None,
) -> Tensor:
    """log-mel [B, n_mels, F] -> audio [B, F * hop_length] by fast Griffin-Lim.

    1. |X| = mel_to_linear(exp(log_mel)); one extra frame (a copy of the last) is appended because a
       centred STFT of F * hop samples has F + 1 frames.
    2. Start from random phases (``generator``; a fixed seed 0 when None), then iterate
       c_n = STFT(ISTFT(|X| e^{i phase})),  t_n = c_n + momentum (c_n - c_{n-1}),  phase = angle(t_n);
       momentum = 0 is plain Griffin-Lim, 0.99 the fast variant.
    3. Return ISTFT(|X| e^{i phase}).
    """
    if log_mel.dim() != 3 or log_mel.shape[1] != frontend.n_mels:
        raise ValueError(f"expected log-mel [B, {frontend.n_mels}, frames], got shape {tuple(log_mel.shape)}")
    if n_iter < 0:
        raise ValueError(f"n_iter must be >= 0, got {n_iter}")
    with torch.autocast(device_type=log_mel.device.type, enabled=False):
        magnitude = mel_to_linear(log_mel.float().exp(), frontend.filterbank, nnls_iter)
        magnitude = torch.cat([magnitude, magnitude[..., -1:]], dim=-1)  # [B, n_freqs, F + 1]
        length = log_mel.shape[-1] * frontend.hop_length
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        angles = 2 * math.pi * torch.rand(magnitude.shape, generator=generator, device=generator.device)
        phase = torch.polar(torch.ones_like(angles), angles).to(magnitude.device)
        previous = magnitude * phase
        for _ in range(n_iter):
            consistent = frontend.stft(frontend.istft(magnitude * phase, length))
            accelerated = consistent + momentum * (consistent - previous)
            phase = accelerated / accelerated.abs().clamp(min=1e-8)
            previous = consistent
        return frontend.istft(magnitude * phase, length)
