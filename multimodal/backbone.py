"""The shared backbone: modality codecs -> ONE vector quantizer -> (stage 2) the DiT trunk.

Every modality's codec writes latents of the shared code dimension D into the same codebook,
so image and audio tokens live in one code space.
"""

from __future__ import annotations

import hashlib
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
    tokenizer_ckpt: instead of ``quantizer`` and ``codecs``, take both (configuration and weights)
        from a stage-1 checkpoint file or run folder (its newest last.ckpt).
    freeze_tokenizer: keep codecs and quantizer frozen (no gradient, always in eval mode), as
        stage 2 wants; default: frozen when they come from ``tokenizer_ckpt``.
    vocoder_ckpt: a vocoder run (``configs/vocoder.yaml``; checkpoint file or run folder): its learned
        vocoder turns decoded log-mel into waveforms (:meth:`to_audio`), frozen; refused when it was
        trained for another mel layout than the audio codec's. Without it: Griffin-Lim.
    """

    MODALITIES = ("image", "audio")

    def __init__(
        self,
        quantizer: nn.Module | None = None,
        codecs: dict[str, nn.Module] | None = None,
        trunk: nn.Module | None = None,
        tokenizer_ckpt: str | None = None,
        freeze_tokenizer: bool | None = None,
        vocoder_ckpt: str | None = None,
    ) -> None:
        super().__init__()
        state = None
        self.tokenizer_source: str | None = None  # the tokenizer file, when built from tokenizer_ckpt
        if tokenizer_ckpt is not None:
            if quantizer is not None or codecs:
                raise ValueError("model.backbone: give either tokenizer_ckpt or quantizer + codecs, not both")
            from .checkpoint import (
                backbone_config,
                build_backbone,
                read_checkpoint,
                resolve_checkpoint,
                tokenizer_state,
            )

            self.tokenizer_source = str(resolve_checkpoint(tokenizer_ckpt).resolve())
            checkpoint = read_checkpoint(self.tokenizer_source)
            stage1 = build_backbone(backbone_config(checkpoint))
            quantizer, codecs = stage1.quantizer, dict(stage1.codecs)
            state = tokenizer_state(checkpoint)
        if quantizer is None:
            raise ValueError("model.backbone.quantizer is missing (or give model.backbone.tokenizer_ckpt)")
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
        if state is not None:
            self.load_state_dict(state, strict=False)
        self.freeze_tokenizer = tokenizer_ckpt is not None if freeze_tokenizer is None else freeze_tokenizer
        if self.freeze_tokenizer:
            self.quantizer.requires_grad_(False)
            self.codecs.requires_grad_(False)
        self.vocoder: nn.Module | None = None
        self.vocoder_source: str | None = None
        if vocoder_ckpt is not None:
            from .vocoder import load_vocoder

            self.vocoder, self.vocoder_source = load_vocoder(vocoder_ckpt)
            self.vocoder.check_layout(self.codec("audio").frontend, "the backbone's audio codec")
            self.vocoder.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> Backbone:
        super().train(mode)
        if getattr(self, "freeze_tokenizer", False):
            self.quantizer.eval()
            self.codecs.eval()
        if getattr(self, "vocoder", None) is not None:
            self.vocoder.eval()
        return self

    @torch.no_grad()
    def to_audio(self, log_mel: Tensor, generator: torch.Generator | None = None, method: str | None = None) -> Tensor:
        """Decoded log-mel [B, n_mels, F] -> waveform [B, F * hop]: the learned vocoder when there is one
        (``vocoder_ckpt``), else Griffin-Lim (``generator`` seeds its random phases); ``method``
        (``vocoder`` or ``griffin_lim``) forces one."""
        method = method or ("vocoder" if self.vocoder is not None else "griffin_lim")
        if method == "vocoder":
            if self.vocoder is None:
                raise ValueError("no learned vocoder: set model.backbone.vocoder_ckpt (a configs/vocoder.yaml run)")
            return self.vocoder(log_mel.float())
        if method != "griffin_lim":
            raise ValueError(f"to_audio: method must be vocoder or griffin_lim, got {method!r}")
        return self.codec("audio").to_audio(log_mel, generator=generator)

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

    def tokenizer_fingerprint(self, modality: str) -> str:
        """A short SHA-256 of everything that decides ``modality``'s codes: the codec's and the quantizer's
        weights and buffers, and their classes and scalar settings (e.g. the audio hop). Keys caches of
        codes (``datamodules.latent_cache``) to the very tokenizer that made them."""
        digest = hashlib.sha256()
        for name, module in (("codec", self.codec(modality)), ("quantizer", self.quantizer)):
            for sub_name, sub in module.named_modules():
                settings = {k: v for k, v in vars(sub).items() if not k.startswith("_") and k != "training"
                            and isinstance(v, (bool, int, float, str, tuple))}
                digest.update(f"{name}.{sub_name}:{type(sub).__qualname__}:{sorted(settings.items())}".encode())
            for key, tensor in module.state_dict().items():
                if not isinstance(tensor, Tensor):
                    continue  # extra state (the quantizer's restart bookkeeping) does not change codes
                t = tensor.detach().cpu().contiguous()
                digest.update(f"{name}.{key}:{t.dtype}:{tuple(t.shape)}".encode())
                digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return f"{modality}-{digest.hexdigest()[:16]}"

    @torch.no_grad()
    def snap_to_codebook(self, latents: Tensor) -> Tensor:
        """Continuous latents [B, N, D] (e.g. sampled by the diffusion) -> nearest code vectors [B, N, D]."""
        return self.quantizer.lookup(self.quantizer.encode(latents))

    @torch.no_grad()
    def quantized_latents(self, modality: str, x: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The clean latents the trunk models: code vectors [B, N, D] and token lengths [B].

        A pure lookup (no codebook update, no gradient): stage 2 trains on a frozen tokenizer.
        """
        z, token_lengths = self.encode(modality, x, lengths)
        return self.snap_to_codebook(z), token_lengths

    @torch.no_grad()
    def encode_codes(self, modality: str, x: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Codes only, nothing updated: -> (codes [B, N] long, token lengths [B])."""
        z, token_lengths = self.encode(modality, x, lengths)
        return self.quantizer.encode(z), token_lengths

    @torch.no_grad()
    def decode_codes(self, modality: str, codes: Tensor, lengths: Tensor | None = None) -> Tensor:
        """codes [B, N] -> image [B, C, H, W] in [-1, 1], or waveform [B, T] (:meth:`to_audio`) for audio."""
        out = self.decode(modality, self.quantizer.lookup(codes), lengths)
        if modality == "audio":
            return self.to_audio(out)
        return out.clamp(-1.0, 1.0)
