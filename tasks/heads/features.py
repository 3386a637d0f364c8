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

``norm='batch'`` standardises the features per channel over the batch's real tokens (BatchNorm
without affine, running statistics at evaluation: :class:`FeatureNorm`). Measured on a trunk
trained by four heads together (``configs/quickstart.yaml``, 300 steps): its t = 0 features were
91 % a sample-independent offset (per-sample std / total std = 0.090) while a linear probe on them
still reached 0.983 digit accuracy, but a fresh classification head on those features stayed at
chance (0.101 after 300 steps) behind its LayerNorm; with ``batch`` it reached 0.726
(``python scripts/probe_features.py --ckpt CKPT``).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from multimodal.backbone import Backbone
from multimodal.diffusion import measure_latent_scale
from tasks.heads.base import clean_latents
from tasks.heads.vocab import TextVocabulary

SOURCES = ("quantized", "continuous")
NORMS = ("none", "batch")
INPUT_MODALITIES = ("image", "audio", "text")
INPUT_KEYS = {"image": ("image",), "audio": ("audio", "audio_lengths"), "text": ("text_ids", "text_lengths")}


class FeatureNorm(nn.Module):
    """Per-channel standardisation over the real tokens of a batch: [B, N, H] (+ mask [B, N] bool,
    True = real) -> [B, N, H], padded positions 0. Training uses the batch statistics (and updates
    running ones), evaluation the running statistics: ``nn.BatchNorm1d(affine=False)`` over the
    tokens gathered by the mask (a one-token training batch falls back to the running statistics)."""

    def __init__(self, dim: int, momentum: float = 0.1) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, affine=False, momentum=momentum)

    def forward(self, h: Tensor, mask: Tensor | None = None) -> Tensor:
        B, N, H = h.shape
        flat = h.reshape(B * N, H)
        keep = mask.reshape(B * N) if mask is not None else None
        x = flat[keep] if keep is not None else flat
        if self.training and x.shape[0] < 2:
            bn = self.bn
            y = F.batch_norm(x, bn.running_mean, bn.running_var, training=False, eps=bn.eps)
        else:
            y = self.bn(x)
        if keep is None:
            return y.reshape(B, N, H)
        out = torch.zeros_like(flat)
        out[keep] = y.to(out.dtype)
        return out.reshape(B, N, H)


class TrunkFeatures(nn.Module):
    """batch -> (features [B, N', hidden], mask [B, N'] bool or None) from the backbone's trunk.

    Args:
        modality: the input the head reads: ``image``, ``audio`` or ``text``.
        source: ``quantized`` or ``continuous`` (images and audio; see the module docstring).
        norm: ``batch`` (:class:`FeatureNorm`, needs ``dim``) or ``none``.
        dim: the trunk's hidden size (for ``norm='batch'``).
    """

    def __init__(self, modality: str, source: str = "quantized", norm: str = "batch", dim: int | None = None) -> None:
        super().__init__()
        if modality not in INPUT_MODALITIES:
            raise ValueError(f"input modality must be one of {INPUT_MODALITIES}, got {modality!r}")
        if source not in SOURCES:
            raise ValueError(f"features source must be one of {SOURCES}, got {source!r}")
        if norm not in NORMS:
            raise ValueError(f"feature_norm must be one of {NORMS}, got {norm!r}")
        if norm == "batch" and not dim:
            raise ValueError("feature_norm='batch' needs the trunk's hidden size (trunk_hidden)")
        self.modality, self.source, self.norm_kind, self.dim = modality, source, norm, dim
        self.keys = INPUT_KEYS[modality]
        self.register_buffer("latent_scale", torch.tensor(1.0))
        self.register_buffer("scale_measured", torch.tensor(modality == "text"))
        self.norm = FeatureNorm(dim) if norm == "batch" else None
        # text: the data's sentencepiece model, kept in the checkpoint (size checked against the trunk in check)
        self.vocab = TextVocabulary("sentencepiece", size=1 << 30) if modality == "text" else None

    def bind_data(self, data: Any, task: str) -> None:
        """Text: take the data's sentencepiece model and max_length (``TextVocabulary.bind``)."""
        if self.vocab is not None:
            self.vocab.bind(getattr(data, "tokenizer", None), task, follow_max_length=True, required=False)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        """A checkpoint from before ``feature_norm`` has no statistics: its head was trained without
        the norm, so it is read without it (a warning), not refused."""
        if self.norm is not None and f"{prefix}norm.bn.running_mean" not in state_dict:
            warnings.warn(f"{prefix}: the checkpoint has no feature-norm statistics (saved before feature_norm "
                          "existed): reading its features without the norm, as it was trained", stacklevel=2)
            self.norm, self.norm_kind = None, "none"
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def check(self, backbone: Backbone, task: str) -> None:
        """Clear errors at construction: a trunk of the head's width (``dim``) is needed, and a codec or
        text table for the input."""
        trunk = backbone.trunk
        if trunk is None:
            raise ValueError(f"head {task!r} reads trunk features: set model.backbone.trunk (a DiffusionTransformer)")
        if self.dim is not None and trunk.hidden_size != self.dim:
            raise ValueError(f"head {task!r}: trunk_hidden={self.dim} does not match model.backbone.trunk "
                             f"hidden_size={trunk.hidden_size}; set the head's trunk_hidden to {trunk.hidden_size}")
        if self.modality == "text":
            if not getattr(trunk, "text_vocab_size", 0):
                raise ValueError(f"head {task!r} reads text: set model.backbone.trunk.text_vocab_size")
            self.vocab.size = int(trunk.text_vocab_size)
            return
        backbone.codec(self.modality)
        if trunk.in_dim != backbone.quantizer.dim:
            raise ValueError(f"model.backbone.trunk.in_dim={trunk.in_dim} does not match the tokenizer's latent "
                             f"size (quantizer dim={backbone.quantizer.dim})")

    def latent_request(self, backbone: Backbone) -> tuple[str, tuple[str, ...]] | None:
        """``(modality, ())`` when the features read quantized codes (cacheable), else None."""
        return (self.modality, ()) if self.source == "quantized" and self.modality != "text" else None

    def latents(self, backbone: Backbone, batch: dict[str, Any]) -> tuple[Tensor, Tensor | None]:
        """Unscaled latents [B, N, D] and the token mask [B, N] (None for images)."""
        if self.source == "quantized":
            z, token_lengths = clean_latents(backbone, batch, self.modality)
        else:
            x = batch[self.modality]
            lengths = batch.get("audio_lengths") if self.modality == "audio" else None
            with torch.set_grad_enabled(torch.is_grad_enabled() and not backbone.freeze_tokenizer):
                z, token_lengths = backbone.encode(self.modality, x, lengths)
        if self.modality == "image":
            return z, None
        return z, torch.arange(z.shape[1], device=z.device)[None, :] < token_lengths[:, None]

    def forward(self, backbone: Backbone, batch: dict[str, Any]) -> tuple[Tensor, Tensor | None]:
        h, mask = self._encode(backbone, batch)
        if self.norm is not None:
            h = self.norm(h, mask)
        return h, mask

    def _encode(self, backbone: Backbone, batch: dict[str, Any]) -> tuple[Tensor, Tensor | None]:
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
