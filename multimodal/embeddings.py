"""Embeddings for the diffusion transformer: fixed sin-cos positions, timesteps, class labels and the
pooled condition.

Positions (as in MAE / DiT): a 1-D table gives position ``p`` the vector
``[sin(p * w_0), ..., sin(p * w_{k-1}), cos(p * w_0), ..., cos(p * w_{k-1})]`` with
``w_i = 1 / 10000^(i / k)`` and ``k = dim / 2``. A 2-D grid of ``h x w`` tokens (row-major) uses half
of the channels for the row index and half for the column index.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def sincos_1d(dim: int, positions: Tensor) -> Tensor:
    """positions [N] (any dtype) -> [N, dim] float32; ``dim`` must be even."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding dim must be even, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64, device=positions.device) / (dim / 2.0)
    omega = 1.0 / 10000**omega  # [dim/2]
    angles = positions.to(torch.float64)[:, None] * omega[None, :]  # [N, dim/2]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1).float()


def sincos_2d(dim: int, height: int, width: int, device: torch.device | None = None) -> Tensor:
    """A row-major ``height x width`` grid -> [height * width, dim] float32; ``dim`` divisible by 4.

    The first ``dim / 2`` channels encode the column (x) index, the last ``dim / 2`` the row (y)
    index, the same layout as DiT's ``get_2d_sincos_pos_embed``.
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding dim must be divisible by 4, got {dim}")
    rows = torch.arange(height, device=device).repeat_interleave(width)  # [h*w]: y of each token
    cols = torch.arange(width, device=device).repeat(height)  # [h*w]: x of each token
    return torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features of (possibly fractional) timesteps: t [B] -> [B, dim] float32.

    ``[cos(t * f_0), ..., cos(t * f_{k-1}), sin(t * f_0), ..., sin(t * f_{k-1})]`` with
    ``f_i = max_period^(-i / k)``, ``k = dim // 2`` (zero-padded when ``dim`` is odd).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None, :]  # [B, half]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """t [B] (float or long) -> [B, hidden]: sinusoidal features through Linear-SiLU-Linear."""

    def __init__(self, hidden_size: int, frequency_size: int = 256) -> None:
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, t: Tensor) -> Tensor:
        freq = timestep_embedding(t, self.frequency_size)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels y [B] -> [B, hidden], with a "null" row (index ``num_classes``) for guidance.

    ``y < 0`` (e.g. -1) selects the null row. In training, ``drop(y, p)`` replaces each label by the
    null label with probability ``p`` (classifier-free guidance training).
    """

    def __init__(self, num_classes: int, hidden_size: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def null_labels(self, batch: int, device: torch.device) -> Tensor:
        return torch.full((batch,), self.num_classes, dtype=torch.long, device=device)

    def drop(self, y: Tensor, p: float) -> Tensor:
        """Replace each label by the null label with probability ``p``."""
        dropped = torch.rand(y.shape, device=y.device) < p
        return torch.where(dropped, torch.full_like(y, self.num_classes), y)

    def forward(self, y: Tensor) -> Tensor:
        y = torch.where(y < 0, torch.full_like(y, self.num_classes), y)
        return self.embedding_table(y)


class PooledConditionEmbedder(nn.Module):
    """Condition tokens [B, L, hidden] + valid [B, L] bool -> [B, hidden], added to the adaLN vector c.

    ``MLP(sum_l valid * tokens / max(1, sum_l valid))``: the masked mean of the embedded condition
    (for a caption: its bag of words plus the mean of its positions, so its length) through
    Linear-SiLU-Linear, times 1 where any token is valid and 0 where none is. So the null condition
    (every token masked: classifier-free guidance's unconditional half, condition dropout) adds
    exactly nothing, as it adds nothing to attention. The role of SD3's pooled text vector in its
    adaLN; here there is no text encoder, so it is the mean of the trunk's own condition embedding.
    Global attributes (a one-object caption's colour, shape and size) reach every block through
    the modulation at once, instead of waiting for attention to learn to look them up.
    """

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, tokens: Tensor, valid: Tensor) -> Tensor:
        weight = valid.to(tokens.dtype).unsqueeze(-1)  # [B, L, 1]
        count = weight.sum(dim=1)  # [B, 1]
        mean = (tokens * weight).sum(dim=1) / count.clamp(min=1.0)  # [B, hidden]
        return self.mlp(mean.to(self.mlp[0].weight.dtype)) * (count > 0).to(mean.dtype)
