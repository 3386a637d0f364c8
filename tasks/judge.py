"""The judge: a small CNN classifier the generation head trains on REAL data alongside the trunk.

torchmetrics' FID needs Inception weights that cannot be downloaded here, so generation is judged
with this project's own network instead: its penultimate features feed
``FrechetInceptionDistance(feature=judge)`` (reported as ``fid_cls``, not comparable to published
FID), and its predictions on generated samples give the "does it draw what it was asked" accuracy.
It sees images [B, C, H, W] or log-mel spectrograms as 1-channel images [B, 1, n_mels, frames].
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class JudgeNet(nn.Module):
    """x [B, C, H, W] -> features [B, num_features] (``forward``) and logits [B, num_classes] (``classify``).

    Three conv stages (width w, 2w, 4w; GroupNorm, SiLU, stride-2 downsampling), global average
    pooling, a linear projection to ``num_features``. Default PyTorch init.
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 32, num_features: int = 64) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"judge needs num_classes >= 2, got {num_classes}")
        layers: list[nn.Module] = []
        c = in_channels
        for mult in (1, 2, 4):
            out = width * mult
            layers += [nn.Conv2d(c, out, 3, 1, 1), nn.GroupNorm(8, out), nn.SiLU(),
                       nn.Conv2d(out, out, 3, 2, 1), nn.GroupNorm(8, out), nn.SiLU()]
            c = out
        self.body = nn.Sequential(*layers)
        self.proj = nn.Linear(c, num_features)
        self.head = nn.Linear(num_features, num_classes)
        self.num_features = num_features  # read by torchmetrics' FID

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.body(x).mean(dim=(2, 3)))

    def classify(self, x: Tensor) -> Tensor:
        return self.head(F.silu(self(x)))
