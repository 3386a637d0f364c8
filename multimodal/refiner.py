"""A convolutional refiner at the latent grid's own resolution, after a patchified DiT's final layer.

Why: a DiT with p x p patches sees an image only through p x p cells a token, and draws each token's
p x p cells with one linear map (the final layer). On the demo shapes at f = 2 with p = 2 a small object
covers about 2 x 2 tokens, and its outline is the layout of cells inside them: the caption -> image trunk
loses small outlines at every noise level, even from t = 150 (README, caption -> image: "What is still
wrong: small objects"). A U-Net keeps a full-resolution stage with a skip from its input for exactly
this; the refiner adds one such stage to the transformer::

    f   = unpatchify(Linear(LayerNorm(h)))                     [B, h, w, C]   the trunk's last hidden states,
                                                                              C channels a cell
    z   = Conv3x3([f ; x_t])  -> GELU -> Conv3x3 -> GELU       [B, C, h, w]   x_t: the noisy input's cells
    out = out_trunk + Conv1x1(z)                               [B, h*w, D]    Conv1x1 zero-initialised

so a trunk with a refiner starts as the plain trunk. Only image grids pass through it (1-D sequences keep
the trunk's output). Written here: timm and torchvision have no refiner over a DiT's unpatchified output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .dit_blocks import unpatchify


class CellRefiner(nn.Module):
    """h [B, N', hidden] (image tokens after the last block), x [B, h*w, in_dim] (the noisy cells),
    grid (h, w) -> a correction [B, h*w, out_dim] to add to the trunk's output.

    Args:
        hidden_size: the trunk's width.
        in_dim: channels of a latent cell (the trunk's input).
        out_dim: channels of the trunk's output per cell.
        patch_size: the trunk's patch p (each token lifts to p x p cells).
        channels: C, the refiner's width a cell.
    """

    def __init__(self, hidden_size: int, in_dim: int, out_dim: int, patch_size: int, channels: int) -> None:
        super().__init__()
        if channels < 1:
            raise ValueError(f"CellRefiner: channels must be >= 1, got {channels!r}")
        self.patch_size = patch_size
        self.channels = channels
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.lift = nn.Linear(hidden_size, patch_size * patch_size * channels)
        self.conv1 = nn.Conv2d(channels + in_dim, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.out = nn.Conv2d(channels, out_dim, 1)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Xavier-uniform lift, Kaiming-uniform convolutions (PyTorch's default), zero biases, and a ZERO
        output convolution: the refiner adds exactly nothing until it learns to."""
        nn.init.xavier_uniform_(self.lift.weight)
        nn.init.zeros_(self.lift.bias)
        for conv in (self.conv1, self.conv2):
            conv.reset_parameters()
            nn.init.zeros_(conv.bias)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, h: Tensor, x: Tensor, grid: tuple[int, int]) -> Tensor:
        gh, gw = grid
        B = h.shape[0]
        f = unpatchify(self.lift(self.norm(h)), grid, self.patch_size)  # [B, h*w, C]
        z = torch.cat([f, x.to(f.dtype)], dim=-1).transpose(1, 2).reshape(B, -1, gh, gw)  # [B, C + D, h, w]
        z = F.gelu(self.conv2(F.gelu(self.conv1(z))))
        return self.out(z).flatten(2).transpose(1, 2)  # [B, h*w, out_dim]
