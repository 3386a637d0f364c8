"""What the understanding heads read: trunk features of CLEAN inputs (t = 0, null condition).

The same DiT that denoises latents for generation encodes clean latents into features
(``DiffusionTransformer.features``); text goes through the trunk's text table
(``DiffusionTransformer.text_features``). ``source`` chooses what the trunk sees for images and audio:

* ``quantized``: the code vectors of the shared codebook (what generation models; a lookup, no
  gradient into the tokenizer);
* ``continuous``: the codec encoder's output before quantization (finer; gradients reach the
  encoder when the tokenizer is not frozen).

Both are multiplied by ``latent_scale`` (1 / std, measured on the first training batch and
saved in the checkpoint), so the trunk sees unit-variance inputs as in generation training.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from multimodal.backbone import Backbone
from multimodal.diffusion import measure_latent_scale

SOURCES = ("quantized", "continuous")
INPUT_MODALITIES = ("image", "audio", "text")
INPUT_KEYS = {"image": ("image",), "audio": ("audio", "audio_lengths"), "text": ("text_ids", "text_lengths")}


class TrunkFeatures(nn.Module):
    """batch -> (features [B, N', hidden], mask [B, N'] bool or None) from the backbone's trunk.

    Args:
        modality: the input the head reads: ``image``, ``audio`` or ``text``.
        source: ``quantized`` or ``continuous`` (images and audio; see the module docstring).
    """

    def __init__(self, modality: str, source: str = "quantized") -> None:
        super().__init__()
        if modality not in INPUT_MODALITIES:
            raise ValueError(f"input modality must be one of {INPUT_MODALITIES}, got {modality!r}")
        if source not in SOURCES:
            raise ValueError(f"features source must be one of {SOURCES}, got {source!r}")
        self.modality, self.source = modality, source
        self.keys = INPUT_KEYS[modality]
        self.register_buffer("latent_scale", torch.tensor(1.0))
        self.register_buffer("scale_measured", torch.tensor(modality == "text"))

    def check(self, backbone: Backbone, task: str) -> None:
        """Clear errors at construction: a trunk is needed, and a codec or text table for the input."""
        trunk = backbone.trunk
        if trunk is None:
            raise ValueError(f"head {task!r} reads trunk features: set model.backbone.trunk (a DiffusionTransformer)")
        if self.modality == "text":
            if not getattr(trunk, "text_vocab_size", 0):
                raise ValueError(f"head {task!r} reads text: set model.backbone.trunk.text_vocab_size")
            return
        backbone.codec(self.modality)
        if trunk.in_dim != backbone.quantizer.dim:
            raise ValueError(f"model.backbone.trunk.in_dim={trunk.in_dim} does not match the tokenizer's latent "
                             f"size (quantizer dim={backbone.quantizer.dim})")

    def latents(self, backbone: Backbone, batch: dict[str, Any]) -> tuple[Tensor, Tensor | None]:
        """Unscaled latents [B, N, D] and the token mask [B, N] (None for images)."""
        x = batch[self.modality]
        lengths = batch.get("audio_lengths") if self.modality == "audio" else None
        if self.source == "quantized":
            z, token_lengths = backbone.quantized_latents(self.modality, x, lengths)
        else:
            with torch.set_grad_enabled(torch.is_grad_enabled() and not backbone.freeze_tokenizer):
                z, token_lengths = backbone.encode(self.modality, x, lengths)
        if self.modality == "image":
            return z, None
        return z, torch.arange(z.shape[1], device=z.device)[None, :] < token_lengths[:, None]

    def forward(self, backbone: Backbone, batch: dict[str, Any]) -> tuple[Tensor, Tensor | None]:
        trunk = backbone.trunk
        if self.modality == "text":
            ids, lengths = batch["text_ids"], batch["text_lengths"]
            mask = torch.arange(ids.shape[1], device=ids.device)[None, :] < lengths[:, None]
            return trunk.text_features(ids, mask), mask
        z, mask = self.latents(backbone, batch)
        if self.training and not bool(self.scale_measured):
            self.latent_scale.fill_(measure_latent_scale(z, mask))  # same value on every rank
            self.scale_measured.fill_(True)
        x = z * self.latent_scale.to(z.dtype)
        if self.modality == "image":
            h = trunk.features(x, "image", grid=backbone.codec("image").grid_size)
            return h, None
        return trunk.features(x, "audio", x_mask=mask), mask
