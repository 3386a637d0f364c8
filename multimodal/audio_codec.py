"""Audio codec: log-mel front end + conv1d encoder/decoder over time, Griffin-Lim back to audio.

    mel:      audio [B, T] -> log-mel [B, n_mels, frames_for(T)]
    encode:   audio [B, T], lengths [B] -> z [B, N, D], token_lengths [B],   N = tokens_for(T)
    decode:   z [B, N, D] -> log-mel [B, n_mels, N * r]
    to_audio: log-mel [B, n_mels, F] -> audio [B, F * hop_length]  (Griffin-Lim)

Frame and token counts are deterministic in the number of samples T, with r = ``downsample``:
    frames_for(T) = r * ceil(ceil(T / hop_length) / r)      tokens_for(T) = ceil(ceil(T / hop_length) / r)
i.e. the ceil(T / hop_length) STFT frames are padded at the end to a multiple of r with the silence
value log(1e-5). Any T >= 1 is accepted: a clip shorter than one token (r * hop_length samples) is
padded to one token. Within a padded batch each clip is encoded with its own ``lengths``: frames
past a clip's end are set to silence, the encoder's GroupNorm statistics skip them and they are held
at zero, so a clip's tokens do not depend on the padding around it; the padding mask of the token
sequence is ``arange(N) < token_lengths``.

The encoder sees (log_mel - LOG_MEL_CENTER) / LOG_MEL_SCALE, a fixed affine map putting silence
(-11.5) near -1.6 and loud frames near +1; the decoder's output goes through the inverse map, so
``decode`` returns log-mel directly. Initialisation is described in ``multimodal.layers``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from multimodal.layers import (
    ConvDecoder,
    ConvEncoder,
    check_groups,
    downsample_factor_levels,
    length_mask,
    level_channels,
    resolve_preset,
)
from multimodal.mel import LOG_SILENCE, MelSpectrogram, griffin_lim

AUDIO_PRESETS: dict[str, dict] = {
    # unit tests
    "tiny": dict(channels=16, channel_mult=(1, 2), num_res_blocks=1, code_dim=16, norm_groups=4),
    # CPU training: ~5 GFLOP per forward+backward of 16 one-second clips
    "small": dict(channels=64, channel_mult=(1, 2), num_res_blocks=2, code_dim=32, norm_groups=16),
    # GPU training
    "base": dict(channels=256, channel_mult=(1, 2, 2), num_res_blocks=2, code_dim=64, norm_groups=32),
}
DOWNSAMPLE_FACTORS = (2, 4)
LOG_MEL_CENTER = -5.0
LOG_MEL_SCALE = 4.0


class AudioCodec(nn.Module):
    """Log-mel conv1d encoder/decoder speaking token sequences.

    Args:
        preset: "tiny" | "small" | "base" (see ``AUDIO_PRESETS``); the explicit model arguments that
            are None are taken from it.
        sample_rate, n_fft, hop_length, win_length, n_mels, f_min, f_max: the log-mel front end
            (``multimodal.mel.MelSpectrogram``); 16 kHz, n_fft 512, hop 160 gives 100 frames/s.
        downsample: r = 2 or 4 frames per token (r = 4, hop 160: 25 tokens/s).
        channels, channel_mult, num_res_blocks, norm_groups: encoder/decoder width and depth
            (``multimodal.layers.ConvEncoder`` with conv1d); ``norm_groups`` must divide every width.
        code_dim: D, the token dimension shared with the quantizer and the image codec.
        griffin_lim_iters: default iteration count of ``to_audio``.
    """

    def __init__(
        self,
        preset: str = "small",
        sample_rate: int = 16000,
        n_fft: int = 512,
        hop_length: int = 160,
        win_length: int | None = None,
        n_mels: int = 64,
        f_min: float = 0.0,
        f_max: float | None = None,
        downsample: int = 4,
        channels: int | None = None,
        channel_mult: Sequence[int] | None = None,
        num_res_blocks: int | None = None,
        code_dim: int | None = None,
        norm_groups: int | None = None,
        griffin_lim_iters: int = 32,
    ):
        super().__init__()
        cfg = resolve_preset(
            AUDIO_PRESETS, preset, "AudioCodec",
            channels=channels, channel_mult=channel_mult, num_res_blocks=num_res_blocks,
            code_dim=code_dim, norm_groups=norm_groups,
        )  # fmt: skip
        num_down = downsample_factor_levels(downsample, DOWNSAMPLE_FACTORS, "AudioCodec: downsample")
        if cfg["code_dim"] < 1:
            raise ValueError(f"AudioCodec: code_dim must be positive, got {cfg['code_dim']!r}")
        widths = level_channels(cfg["channels"], cfg["channel_mult"], num_down)
        check_groups(cfg["norm_groups"], widths, "AudioCodec: norm_groups")
        if griffin_lim_iters < 0:
            raise ValueError(f"AudioCodec: griffin_lim_iters must be >= 0, got {griffin_lim_iters!r}")

        self.preset, self.downsample, self.griffin_lim_iters = preset, downsample, griffin_lim_iters
        self.code_dim: int = cfg["code_dim"]
        self.config = cfg
        self.frontend = MelSpectrogram(sample_rate, n_fft, hop_length, win_length, n_mels, f_min, f_max)
        self.sample_rate, self.hop_length, self.n_mels = sample_rate, hop_length, n_mels
        common = dict(
            dims=1, channels=cfg["channels"], channel_mult=tuple(cfg["channel_mult"]),
            num_res_blocks=cfg["num_res_blocks"], num_groups=cfg["norm_groups"],
        )  # fmt: skip
        self.encoder = ConvEncoder(
            in_channels=n_mels, out_channels=self.code_dim, num_down=num_down, **common
        )
        self.decoder = ConvDecoder(in_channels=self.code_dim, out_channels=n_mels, num_up=num_down, **common)

    # ---- sizes -------------------------------------------------------------------------------------

    @property
    def samples_per_token(self) -> int:
        return self.downsample * self.hop_length

    def tokens_for(self, num_samples: int | Tensor) -> int | Tensor:
        """Tokens of a clip of ``num_samples`` samples (int or LongTensor): ceil(ceil(T / hop) / r)."""
        frames = -(-num_samples // self.hop_length)
        return -(-frames // self.downsample)

    def frames_for(self, num_samples: int | Tensor) -> int | Tensor:
        """Log-mel frames of a clip of ``num_samples`` samples, padded to a multiple of r: r * tokens_for(T)."""
        return self.downsample * self.tokens_for(num_samples)

    @property
    def last_layer_weight(self) -> Tensor:
        """The decoder's final conv weight [n_mels, width, 3] (for the adaptive GAN loss weight)."""
        return self.decoder.conv_out.weight

    def _check_audio(self, audio: Tensor, lengths: Tensor | None) -> None:
        if audio.dim() != 2 or audio.shape[-1] < 1:
            raise ValueError(f"AudioCodec expects audio [B, T] with T >= 1, got shape {tuple(audio.shape)}")
        if lengths is not None:
            if lengths.shape != audio.shape[:1]:
                raise ValueError(f"lengths must be [B={audio.shape[0]}], got shape {tuple(lengths.shape)}")
            if bool((lengths < 1).any()) or bool((lengths > audio.shape[-1]).any()):
                raise ValueError(f"lengths must lie in [1, T={audio.shape[-1]}], got {lengths.tolist()}")

    # ---- features ----------------------------------------------------------------------------------

    def mel(self, audio: Tensor, lengths: Tensor | None = None) -> Tensor:
        """audio [B, T] (+ lengths [B]) -> log-mel [B, n_mels, frames_for(T)].

        Samples past each clip's length are zeroed before the STFT; frames at or after a clip's
        ceil(length / hop_length) STFT frames, and the end padding, hold log(1e-5), exactly as when
        the clip is processed alone.
        """
        self._check_audio(audio, lengths)
        if lengths is not None:  # whatever the collate padded with, the STFT sees zeros after the clip
            audio = audio * length_mask(lengths.to(audio.device), audio.shape[-1], audio.dtype)[:, 0]
        log_mel = self.frontend(audio)  # [B, n_mels, ceil(T / hop)]
        frames = self.frames_for(audio.shape[-1])
        log_mel = nn.functional.pad(log_mel, (0, frames - log_mel.shape[-1]), value=LOG_SILENCE)
        if lengths is not None:
            valid = length_mask(self.frontend.frames_for(lengths.to(log_mel.device)), frames).bool()
            log_mel = log_mel.masked_fill(~valid, LOG_SILENCE)
        return log_mel

    # ---- codec -------------------------------------------------------------------------------------

    def encode_mel(self, log_mel: Tensor, token_lengths: Tensor | None = None) -> Tensor:
        """log-mel [B, n_mels, F] (F a multiple of r) -> z [B, F / r, D]."""
        if log_mel.dim() != 3 or log_mel.shape[1] != self.n_mels or log_mel.shape[-1] % self.downsample:
            raise ValueError(
                f"AudioCodec.encode_mel expects [B, {self.n_mels}, F] with F a multiple of {self.downsample}, "
                f"got {tuple(log_mel.shape)}"
            )
        frame_lengths = None if token_lengths is None else token_lengths * self.downsample
        x = (log_mel - LOG_MEL_CENTER) / LOG_MEL_SCALE
        return self.encoder(x, frame_lengths).transpose(1, 2)  # [B, N, D]

    def encode(self, audio: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """audio [B, T], lengths [B] | None -> (z [B, N, D], token_lengths [B]), N = tokens_for(T).

        Padded token positions of z are zero; mask = arange(N) < token_lengths.
        """
        log_mel = self.mel(audio, lengths)
        num_tokens = log_mel.shape[-1] // self.downsample
        if lengths is None:
            token_lengths = torch.full((audio.shape[0],), num_tokens, dtype=torch.long, device=audio.device)
            return self.encode_mel(log_mel), token_lengths
        token_lengths = self.tokens_for(lengths.long().to(audio.device))
        return self.encode_mel(log_mel, token_lengths), token_lengths

    def decode(self, z: Tensor, token_lengths: Tensor | None = None) -> Tensor:
        """z [B, N, D] (+ token_lengths [B]) -> log-mel [B, n_mels, N * r].

        With ``token_lengths`` the decoder ignores padded tokens and frames past
        ``token_lengths * r`` are log(1e-5); without, every token is treated as valid.
        """
        if z.dim() != 3 or z.shape[-1] != self.code_dim:
            raise ValueError(f"AudioCodec.decode expects [B, N, {self.code_dim}], got {tuple(z.shape)}")
        frame_lengths = None if token_lengths is None else token_lengths * self.downsample
        log_mel = self.decoder(z.transpose(1, 2), token_lengths) * LOG_MEL_SCALE + LOG_MEL_CENTER
        if frame_lengths is not None:
            valid = length_mask(frame_lengths, log_mel.shape[-1]).bool()
            log_mel = log_mel.masked_fill(~valid, LOG_SILENCE)
        return log_mel

    def forward(self, audio: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Autoencode without quantisation: audio [B, T] -> (log-mel [B, n_mels, frames_for(T)], token_lengths)."""
        z, token_lengths = self.encode(audio, lengths)
        return self.decode(z, None if lengths is None else token_lengths), token_lengths

    @torch.no_grad()
    def to_audio(
        self, log_mel: Tensor, n_iter: int | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """log-mel [B, n_mels, F] -> waveform [B, F * hop_length] by fast Griffin-Lim.

        The waveform is at least as long as the clip; trim it to the clip's ``lengths``.
        """
        n_iter = self.griffin_lim_iters if n_iter is None else n_iter
        return griffin_lim(log_mel, self.frontend, n_iter=n_iter, generator=generator)
