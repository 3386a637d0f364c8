"""Metrics torchmetrics does not have, written as torchmetrics ``Metric`` s (DDP-synchronised), and
:func:`update_fp32`, how every metric is fed under bf16 autocast."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric


def update_fp32(metric: Metric, *args: Any, **kwargs: Any) -> None:
    """``metric.update(...)`` with floating tensors cast to float32 and autocast off.

    Evaluation runs under the trainer's autocast, so a head's outputs (and any network a metric runs
    inside, like FID's feature extractor) would be bf16: torchmetrics computes in the input dtype, and
    SSIM in bf16 came out above 1 (E[x^2] - E[x]^2 in 8 bits of mantissa). Metric inputs and states
    stay float32."""

    def cast(value: Any) -> Any:
        return value.float() if isinstance(value, Tensor) and value.is_floating_point() else value

    device = next((a.device.type for a in (*args, *kwargs.values()) if isinstance(a, Tensor)), "cpu")
    with torch.autocast(device, enabled=False):
        metric.update(*map(cast, args), **{k: cast(v) for k, v in kwargs.items()})


class CodebookUsage(Metric):
    """Codebook health over a whole split: which of the K codes were used, and how evenly.

    ``update(codes [...] long, mask [...] bool | None)``; ``compute()`` returns
    ``{"codebook/usage": used / K, "codebook/perplexity": exp(entropy of the code histogram),
    "codebook/unused": K - used}``.
    """

    full_state_update = False

    def __init__(self, num_codes: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_codes = num_codes
        self.add_state("counts", default=torch.zeros(num_codes, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, codes: Tensor, mask: Tensor | None = None) -> None:
        codes = codes[mask] if mask is not None else codes.reshape(-1)
        self.counts += torch.bincount(codes.reshape(-1), minlength=self.num_codes)

    def compute(self) -> dict[str, Tensor]:
        return codebook_stats(self.counts)


def codebook_stats(counts: Tensor) -> dict[str, Tensor]:
    """A code histogram [K] -> ``codebook/usage`` (fraction used), ``perplexity``, ``unused`` (count)."""
    p = counts.float() / counts.sum().clamp(min=1)
    entropy = -(p * p.clamp(min=1e-12).log()).sum()
    used = (counts > 0).sum()
    return {
        "codebook/usage": used.float() / counts.numel(),
        "codebook/perplexity": entropy.exp(),
        "codebook/unused": (counts.numel() - used).float(),
    }
