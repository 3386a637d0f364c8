"""Audio generated at a fixed length: what the generation head trains on and what its judges hear.

A mixin of :class:`tasks.heads.generation.GenerationHead` (uses its ``modality`` and ``audio_tokens``),
kept apart because it is the one place audio differs from images in generation. Audio is generated at
a fixed length, ``audio_tokens`` (50 = 2 s at hop 160, r = 4): training clips are padded to it with the
code of digital silence (and cut to it), so the trunk learns where speech ends instead of never seeing
the tokens past a clip (a padding mask) and then having to fill them at sampling. The judges hear a
log-mel of that same length, padded with the log-mel of silence. ``data.audio_max_seconds`` should
hold whole clips, or crops can cut off the word a class or transcript names.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from multimodal.backbone import Backbone
from multimodal.mel import LOG_SILENCE
from tasks.heads.base import clean_latents


def judge_mel(mel: Tensor, frames: int) -> Tensor:
    """log-mel [B, n_mels, F] -> the judges' input [B, 1, n_mels, frames]: padded with the log-mel of
    silence (what the codec gives silence) or cut to ``frames``, scaled to roughly [-1.6, 1]."""
    if mel.shape[-1] < frames:
        mel = F.pad(mel, (0, frames - mel.shape[-1]), value=LOG_SILENCE)
    return ((mel[..., :frames] + 5.0) / 4.0).unsqueeze(1)


class FixedLengthAudio:
    """The generation head's clean latents and judge inputs; audio at ``audio_tokens`` tokens."""

    _silence_code: Tensor | None = None  # derived from the tokenizer: not checkpointed

    def _latents(self, backbone: Backbone, batch: dict[str, Any]) -> tuple[Tensor, None]:
        """Clean latents [B, N, D]; audio padded with silence (and cut) to ``audio_tokens``: no padding mask."""
        x0, lengths = clean_latents(backbone, batch, self.modality)
        if self.modality == "image":
            return x0, None
        n = self.audio_tokens
        silence = self._silence(backbone).to(x0.dtype)
        x0 = torch.cat([x0, silence.expand(x0.shape[0], max(0, n - x0.shape[1]), -1)], dim=1)[:, :n]
        real = torch.arange(n, device=x0.device)[None, :, None] < lengths[:, None, None]
        return torch.where(real, x0, silence), None

    @torch.no_grad()
    def _silence(self, backbone: Backbone) -> Tensor:
        """The code vector [D] the tokenizer gives digital silence (a token away from the edges); computed
        once for a frozen tokenizer, not at every training step."""
        device = backbone.quantizer.codebook.device
        if self._silence_code is not None and backbone.freeze_tokenizer and self._silence_code.device == device:
            return self._silence_code
        codec = backbone.codec("audio")
        zeros = torch.zeros(1, 8 * codec.samples_per_token, device=device)
        self._silence_code = backbone.quantized_latents("audio", zeros)[0][0, 4]
        return self._silence_code

    def judge_input(self, backbone: Backbone, batch: dict[str, Any]) -> Tensor:
        """Real data as the judge sees it: images, or log-mel [B, 1, n_mels, frames] of fixed length."""
        if self.modality == "image":
            return batch["image"]
        codec = backbone.codec("audio")
        mel = codec.mel(batch["audio"], batch["audio_lengths"])
        return self._fixed_mel(mel, codec)

    def _fixed_mel(self, mel: Tensor, codec: nn.Module) -> Tensor:
        """Decoded or real log-mel [B, n_mels, F] -> the judges' input at ``audio_tokens`` tokens."""
        return judge_mel(mel, self.audio_tokens * codec.downsample)
