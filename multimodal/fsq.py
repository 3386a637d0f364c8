"""Finite Scalar Quantization (Mentzer et al. 2023): a codebook-free drop-in for VectorQuantizer.

Each of the ``len(levels)`` channels of the projected input is bounded and rounded to one of ``L_i``
values; the implicit codebook is the grid of all combinations, ``K = prod(levels)`` codes
(``[8, 5, 5, 5]`` -> 1000). Nothing is learnt but the two projections, so there is no codebook loss,
no collapse and nothing to synchronise under DDP; the returned loss is 0.

Per channel with L levels (half = (L - 1)(1 + eps) / 2, offset = 0.5 for even L else 0)::

    bound(x)  = tanh(x + atanh(offset / half)) * half - offset      in (-L/2, L/2), bound(0) = 0
    q         = round(bound(x)) / (L // 2)                          straight-through round
    digit     = round(bound(x)) + L // 2                            in [0, L)
    code      = sum_i digit_i * prod_{j < i} L_j

Initialisation: the projections D -> len(levels) -> D keep PyTorch's default Linear initialisation
(identity when D == len(levels)).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from multimodal.quantizer import CodeUsage


class FSQ(nn.Module):
    """Finite scalar quantizer with the VectorQuantizer interface.

    Args:
        levels: number of values per channel, each >= 2 (``num_codes = prod(levels)``).
        dim: D, the size of the vectors given to ``forward`` and returned by it and by ``lookup``.
        eps: widens the bound slightly so that the extreme values are reachable.
        usage_window: the ``usage_window`` statistic counts codes used in this many recent steps.
        dead_code_steps: codes unused for this many training steps are reported in ``dead_codes``.
    """

    def __init__(
        self,
        levels: Sequence[int] = (8, 5, 5, 5),
        dim: int = 64,
        eps: float = 1e-3,
        usage_window: int = 100,
        dead_code_steps: int = 100,
    ):
        super().__init__()
        levels = list(levels)
        if not levels or any(int(n) != n or n < 2 for n in levels):
            raise ValueError(f"levels must be a non-empty list of ints >= 2, got {levels!r}")
        if dim < 1:
            raise ValueError(f"dim must be an int >= 1, got {dim!r}")
        if not 0 < eps < 1:
            raise ValueError(f"eps must be in (0, 1), got {eps!r}")
        if usage_window < 1:
            raise ValueError(f"usage_window must be an int >= 1, got {usage_window!r}")
        if dead_code_steps < 1:
            raise ValueError(f"dead_code_steps must be an int >= 1, got {dead_code_steps!r}")
        self.levels = levels
        self.num_codes = math.prod(levels)
        self.dim = dim
        self.code_dim = len(levels)
        self.eps = eps

        same = dim == self.code_dim
        self.project_in = nn.Identity() if same else nn.Linear(dim, self.code_dim)
        self.project_out = nn.Identity() if same else nn.Linear(self.code_dim, dim)

        lv = torch.tensor(levels, dtype=torch.long)
        half = (lv - 1).double() * (1 + eps) / 2
        offset = (lv % 2 == 0).double() * 0.5
        self.register_buffer("_levels", lv, persistent=False)
        self.register_buffer("_basis", torch.cumprod(torch.cat([lv.new_ones(1), lv[:-1]]), 0), persistent=False)
        self.register_buffer("_half_width", (lv // 2).float(), persistent=False)
        self.register_buffer("_half", half.float(), persistent=False)
        self.register_buffer("_offset", offset.float(), persistent=False)
        self.register_buffer("_shift", torch.atanh(offset / half).float(), persistent=False)
        self.usage = CodeUsage(self.num_codes, usage_window, dead_code_steps)

    def bound(self, x: Tensor) -> Tensor:
        """x [..., len(levels)] -> values in (-L/2, L/2) per channel, 0 -> 0."""
        return torch.tanh(x + self._shift) * self._half - self._offset

    def forward(self, z: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
        """z [B, N, D], mask [B, N] bool (True = valid) or None ->
        (quantized [B, N, D], codes [B, N] long, loss [] (= 0), stats {name: detached []})."""
        if z.shape[-1] != self.dim:
            raise ValueError(f"FSQ(dim={self.dim}) got z of shape {tuple(z.shape)}")
        if mask is not None and mask.shape != z.shape[:-1]:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match z shape {tuple(z.shape[:-1])}")
        with torch.autocast(z.device.type, enabled=False):
            b = self.bound(self.project_in(z.float()))
            rounded = (b - b.detach()) + b.detach().round()  # exactly round(b), identity gradient
            digits = rounded.detach().long() + self._half_width.long()
            codes = (digits * self._basis).sum(-1)
            quantized = self.project_out(rounded / self._half_width).to(z.dtype)

        flat_codes = codes.reshape(-1)
        weight = z.new_ones(flat_codes.shape[0], dtype=torch.float32) if mask is None else mask.reshape(-1).float()
        counts = weight.new_zeros(self.num_codes).index_add_(0, flat_codes, weight)
        self.usage.count(counts)
        if self.training:
            self.usage.advance(counts)
        loss = z.new_zeros((), dtype=torch.float32)
        stats = self.usage.stats(counts, self.usage.dead())
        stats["commit_loss"] = loss.detach()
        return quantized, codes, loss, stats

    @torch.no_grad()
    def encode(self, z: Tensor) -> Tensor:
        """Codes only. z [..., D] -> codes [...] long."""
        digits = self.bound(self.project_in(z.float())).round().long() + self._half_width.long()
        return (digits * self._basis).sum(-1)

    def lookup(self, codes: Tensor) -> Tensor:
        """codes [...] long -> vectors [..., D]."""
        digits = (codes[..., None] // self._basis) % self._levels
        return self.project_out((digits - self._half_width.long()).float() / self._half_width)

    def code_usage_counts(self) -> Tensor:
        """[K] tokens per code quantized by this process since the last ``reset_usage()`` (a copy)."""
        return self.usage.usage_counts.clone()

    def reset_usage(self) -> None:
        """Zero the per-code usage histogram."""
        self.usage.reset()

    def extra_repr(self) -> str:
        return f"levels={self.levels}, dim={self.dim}, num_codes={self.num_codes}"
