"""The shared backbone: modality codecs -> ONE vector quantizer -> (stage 2) the DiT trunk.

Every modality's codec writes latents of the shared code dimension D into the same codebook,
so image and audio tokens live in one code space.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class Tokens:
    """What :meth:`Backbone.tokenize` returns for a batch of one modality.

    z: encoder output [B, N, D]; quantized: [B, N, D] (straight-through in training);
    codes: [B, N] long; mask: [B, N] bool (True = a real token, False = padding);
    lengths: [B] tokens per item; loss: quantizer loss []; stats: detached scalars.
    """

    z: Tensor
    quantized: Tensor
    codes: Tensor
    mask: Tensor
    lengths: Tensor
    loss: Tensor
    stats: dict[str, Tensor]


class Backbone(nn.Module):
    """Args:
    quantizer: the shared quantizer (``VectorQuantizer`` or ``FSQ``): ``forward(z, mask)``.
    codecs: ``{modality: codec}`` with ``modality`` in (``image``, ``audio``).
    trunk: the diffusion transformer (stage 2), or None for a tokenizer-only backbone.
    """

    MODALITIES = ("image", "audio")

    def __init__(self, quantizer: nn.Module, codecs: dict[str, nn.Module], trunk: nn.Module | None = None) -> None:
        super().__init__()
        if not codecs:
            raise ValueError("backbone.codecs is empty: give at least one of 'image', 'audio'")
        for name, codec in codecs.items():
            if name not in self.MODALITIES:
                raise ValueError(f"backbone.codecs has unknown modality {name!r}; choose from {self.MODALITIES}")
            if codec.code_dim != quantizer.dim:
                raise ValueError(
                    f"backbone.codecs.{name}.code_dim={codec.code_dim} does not match the shared "
                    f"quantizer dim={quantizer.dim}: every codec must project into the same D"
                )
        self.quantizer = quantizer
        self.codecs = nn.ModuleDict(codecs)
        self.trunk = trunk

    @property
    def num_codes(self) -> int:
        return self.quantizer.num_codes

    def codec(self, modality: str) -> nn.Module:
        if modality not in self.codecs:
            raise ValueError(
                f"the backbone has no codec for modality {modality!r} (it has {sorted(self.codecs)}): "
                f"add model.backbone.codecs.{modality}"
            )
        return self.codecs[modality]

    def encode(self, modality: str, x: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Codec encoder only: -> (z [B, N, D], token lengths [B])."""
        codec = self.codec(modality)
        if modality == "audio":
            return codec.encode(x, lengths)
        z = codec.encode(x)
        return z, torch.full((z.shape[0],), z.shape[1], dtype=torch.long, device=z.device)

    def quantize(self, z: Tensor, token_lengths: Tensor) -> Tokens:
        """Encoder latents z [B, N, D] with token lengths [B] -> :class:`Tokens` (the shared codebook)."""
        mask = torch.arange(z.shape[1], device=z.device)[None, :] < token_lengths[:, None]
        quantized, codes, loss, stats = self.quantizer(z, mask)
        return Tokens(z, quantized, codes, mask, token_lengths, loss, stats)

    def tokenize(self, modality: str, x: Tensor, lengths: Tensor | None = None) -> Tokens:
        """image [B, C, H, W] or audio [B, T] (+ lengths [B]) -> :class:`Tokens` through the shared codebook."""
        return self.quantize(*self.encode(modality, x, lengths))

    def decode(self, modality: str, quantized: Tensor, lengths: Tensor | None = None) -> Tensor:
        """Quantized latents [B, N, D] -> image [B, C, H, W] or log-mel [B, n_mels, frames]."""
        codec = self.codec(modality)
        return codec.decode(quantized, lengths) if modality == "audio" else codec.decode(quantized)

    @torch.no_grad()
    def encode_codes(self, modality: str, x: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Codes only, nothing updated: -> (codes [B, N] long, token lengths [B])."""
        z, token_lengths = self.encode(modality, x, lengths)
        return self.quantizer.encode(z), token_lengths

    @torch.no_grad()
    def decode_codes(self, modality: str, codes: Tensor, lengths: Tensor | None = None) -> Tensor:
        """codes [B, N] -> image [B, C, H, W] in [-1, 1], or waveform [B, T] (Griffin-Lim) for audio."""
        out = self.decode(modality, self.quantizer.lookup(codes), lengths)
        if modality == "audio":
            return self.codec("audio").to_audio(out)
        return out.clamp(-1.0, 1.0)
