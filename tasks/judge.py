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

POOLS = ("mean", "peak")


class JudgeNet(nn.Module):
    """x [B, C, H, W] -> features [B, num_features] (``forward``) and logits [B, num_classes] (``classify``).

    Three conv stages (width w, 2w, 4w; GroupNorm, SiLU, stride-2 downsampling), a pooling over the
    grid, a linear projection to ``num_features``. Default PyTorch init.

    ``pool``: ``"mean"``, global average pooling (images: the object fills the frame); ``"peak"``, the
    mean over H (mel bands) then the max over W (time), for spectrograms [B, 1, n_mels, frames] in which
    the word is a short part of a clip padded with silence: averaged over 2 s the word's features are
    diluted by the silence around it, and the judge did not learn (0.10-0.13 on real clips, chance 0.1;
    ``scripts/judge_probe.py``).
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 32, num_features: int = 64,
                 pool: str = "mean") -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"judge needs num_classes >= 2, got {num_classes}")
        if pool not in POOLS:
            raise ValueError(f"judge pool must be one of {POOLS}, got {pool!r}")
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
        self.pool = pool
        self.num_features = num_features  # read by torchmetrics' FID

    def forward(self, x: Tensor) -> Tensor:
        h = self.body(x)  # [B, 4w, H / 8, W / 8]
        h = h.mean(dim=(2, 3)) if self.pool == "mean" else h.mean(dim=2).amax(dim=2)
        return self.proj(h)

    def classify(self, x: Tensor) -> Tensor:
        return self.head(F.silu(self(x)))
