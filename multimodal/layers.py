"""Convolutional building blocks shared by the image codec (2-D) and the audio codec (1-D).

Every block takes ``dims`` (1 or 2) and works on ``[B, C, L]`` or ``[B, C, H, W]`` tensors.
Normalisation is GroupNorm everywhere. Variable-length 1-D inputs (padded audio clips) may pass a
``mask`` of shape ``[B, 1, L]`` (1 = valid, 0 = padding): normalisation statistics are then taken over
the valid positions only and padded positions are held at zero before every convolution, so a clip's
features do not depend on how much padding its batch added.

Initialisation: every convolution keeps PyTorch's default (Kaiming-uniform with a = sqrt(5), bias
uniform in +-1/sqrt(fan_in)); GroupNorm starts at weight 1, bias 0; the second convolution of every
residual branch is zero-initialised, so each ``ResBlock`` is the identity (or its 1x1 skip) at
initialisation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def conv_nd(dims: int, *args: Any, **kwargs: Any) -> nn.Module:
    """``nn.Conv1d`` or ``nn.Conv2d``."""
    if dims == 1:
        return nn.Conv1d(*args, **kwargs)
    if dims == 2:
        return nn.Conv2d(*args, **kwargs)
    raise ValueError(f"dims must be 1 or 2, got {dims}")


def apply_mask(x: Tensor, mask: Tensor | None) -> Tensor:
    """Zero the padded positions of ``x`` ([B, C, *S]) where ``mask`` ([B, 1, *S]) is 0."""
    return x if mask is None else x * mask


def length_mask(lengths: Tensor, size: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """``lengths`` [B] -> float mask [B, 1, size], 1 where ``position < length``."""
    positions = torch.arange(size, device=lengths.device)
    return (positions[None, :] < lengths[:, None]).to(dtype)[:, None, :]


def downsample_factor_levels(factor: int, allowed: Sequence[int], name: str = "downsample") -> int:
    """Validate a down-sampling factor and return the number of stride-2 stages, log2(factor)."""
    if factor not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {factor!r}")
    return int(math.log2(factor))


def level_channels(channels: int, channel_mult: Sequence[int], num_down: int) -> list[int]:
    """Channel width of every resolution level.

    There are ``max(len(channel_mult), num_down + 1)`` levels; level ``i`` has
    ``channels * channel_mult[min(i, len(channel_mult) - 1)]`` channels (a short ``channel_mult`` reuses
    its last entry). The first ``num_down`` level transitions halve the resolution, later ones keep it.
    """
    if channels < 1:
        raise ValueError(f"channels must be a positive integer, got {channels!r}")
    if len(channel_mult) == 0 or any(int(m) < 1 for m in channel_mult):
        raise ValueError(f"channel_mult must be a non-empty tuple of positive integers, got {channel_mult!r}")
    num_levels = max(len(channel_mult), num_down + 1)
    return [channels * int(channel_mult[min(i, len(channel_mult) - 1)]) for i in range(num_levels)]


def check_groups(num_groups: int, channel_counts: Sequence[int], name: str = "norm_groups") -> None:
    """Raise ValueError unless ``num_groups`` divides every entry of ``channel_counts``."""
    if num_groups < 1:
        raise ValueError(f"{name} must be a positive integer, got {num_groups!r}")
    bad = sorted({c for c in channel_counts if c % num_groups != 0})
    if bad:
        raise ValueError(
            f"{name}={num_groups} must divide every GroupNorm channel count, but does not divide {bad} "
            f"(channel widths {sorted(set(channel_counts))})"
        )


def resolve_preset(
    presets: Mapping[str, Mapping[str, Any]], preset: str, owner: str, **overrides: Any
) -> dict[str, Any]:
    """The preset's settings with every override that is not None applied on top."""
    if preset not in presets:
        raise ValueError(f"{owner}: preset must be one of {sorted(presets)}, got {preset!r}")
    settings = dict(presets[preset])
    unknown = set(overrides) - set(settings)
    if unknown:
        raise TypeError(f"{owner}: settings {sorted(unknown)} are not part of a preset")
    settings.update({k: v for k, v in overrides.items() if v is not None})
    return settings


class GroupNorm(nn.GroupNorm):
    """GroupNorm whose statistics can skip padded positions.

    x: [B, C, *S]; mask: [B, 1, *S] or None. With a mask, mean and variance of each group are
    taken over the valid positions only (every row needs at least one). Computed in float32.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-6):
        check_groups(num_groups, [num_channels])
        super().__init__(num_groups, num_channels, eps=eps, affine=True)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        if mask is None:
            return super().forward(x)
        B, C = x.shape[:2]
        G = self.num_groups
        xg = x.float().reshape(B, G, C // G, -1)  # [B, G, C/G, S]
        mg = mask.float().reshape(B, 1, 1, -1)  # [B, 1, 1, S]
        count = mg.sum(dim=(2, 3), keepdim=True) * (C // G)
        mean = (xg * mg).sum(dim=(2, 3), keepdim=True) / count
        var = ((xg - mean).square() * mg).sum(dim=(2, 3), keepdim=True) / count
        xn = ((xg - mean) * torch.rsqrt(var + self.eps)).reshape(x.shape)
        shape = (1, C) + (1,) * (x.dim() - 2)
        return (xn * self.weight.reshape(shape) + self.bias.reshape(shape)).to(x.dtype)


class ResBlock(nn.Module):
    """Pre-activation residual block: x + conv(SiLU(GN(conv(SiLU(GN(x)))))).

    [B, in_channels, *S] -> [B, out_channels, *S]; a 1x1 convolution maps the skip path when the
    widths differ. The second convolution is zero-initialised.
    """

    def __init__(self, dims: int, in_channels: int, out_channels: int, num_groups: int):
        super().__init__()
        self.norm1 = GroupNorm(num_groups, in_channels)
        self.conv1 = conv_nd(dims, in_channels, out_channels, 3, padding=1)
        self.norm2 = GroupNorm(num_groups, out_channels)
        self.conv2 = conv_nd(dims, out_channels, out_channels, 3, padding=1)
        self.skip = (
            nn.Identity() if in_channels == out_channels else conv_nd(dims, in_channels, out_channels, 1)
        )
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        h = self.conv1(apply_mask(F.silu(self.norm1(x, mask)), mask))
        h = self.conv2(apply_mask(F.silu(self.norm2(h, mask)), mask))
        return apply_mask(self.skip(x) + h, mask)


class Downsample(nn.Module):
    """Stride-2 3x3 convolution: [B, in_channels, *S] -> [B, out_channels, *ceil(S / 2)]."""

    def __init__(self, dims: int, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = conv_nd(dims, in_channels, out_channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 convolution: [B, in_channels, *S] -> [B, out_channels, *(2 S)]."""

    def __init__(self, dims: int, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = conv_nd(dims, in_channels, out_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class ConvEncoder(nn.Module):
    """ResNet encoder: [B, in_channels, *S] -> [B, out_channels, *ceil(S / 2**num_down)].

    conv_in -> level 0 -> ... -> level L-1 -> middle ResBlock -> GN, SiLU, conv_out, where level i is
    ``num_res_blocks`` ResBlocks of width ``widths[i]`` (``level_channels``) and the transition to
    level i+1 is a convolution from widths[i] to widths[i+1]: stride 2 (``Downsample``) for the
    first ``num_down`` transitions, stride 1 after. ``lengths`` ([B], 1-D only) are the valid input
    lengths; they become ceil(length / 2) at every Downsample.
    """

    def __init__(
        self,
        dims: int,
        in_channels: int,
        out_channels: int,
        channels: int,
        channel_mult: Sequence[int],
        num_res_blocks: int,
        num_down: int,
        num_groups: int,
    ):
        super().__init__()
        if num_res_blocks < 1:
            raise ValueError(f"num_res_blocks must be >= 1, got {num_res_blocks!r}")
        widths = level_channels(channels, channel_mult, num_down)
        check_groups(num_groups, widths)
        self.conv_in = conv_nd(dims, in_channels, widths[0], 3, padding=1)
        self.levels = nn.ModuleList()
        for i, width in enumerate(widths):
            level = nn.Module()
            level.blocks = nn.ModuleList(
                ResBlock(dims, width, width, num_groups) for _ in range(num_res_blocks)
            )
            level.down = i < num_down
            if i < num_down:
                level.resample = Downsample(dims, width, widths[i + 1])
            elif i + 1 < len(widths):
                level.resample = conv_nd(dims, width, widths[i + 1], 3, padding=1)
            else:
                level.resample = None
            self.levels.append(level)
        self.mid = ResBlock(dims, widths[-1], widths[-1], num_groups)
        self.norm_out = GroupNorm(num_groups, widths[-1])
        self.conv_out = conv_nd(dims, widths[-1], out_channels, 3, padding=1)

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        mask = None if lengths is None else length_mask(lengths, x.shape[-1], x.dtype)
        h = apply_mask(self.conv_in(apply_mask(x, mask)), mask)
        for level in self.levels:
            for block in level.blocks:
                h = block(h, mask)
            if level.resample is not None:
                h = level.resample(h)
                if level.down and lengths is not None:
                    lengths = (lengths + 1) // 2
                    mask = length_mask(lengths, h.shape[-1], h.dtype)
                h = apply_mask(h, mask)
        h = self.mid(h, mask)
        return apply_mask(self.conv_out(apply_mask(F.silu(self.norm_out(h, mask)), mask)), mask)


class ConvDecoder(nn.Module):
    """Mirror of ``ConvEncoder``: [B, in_channels, *S] -> [B, out_channels, *(S * 2**num_up)].

    conv_in -> middle ResBlock -> level L-1 -> ... -> level 0 -> GN, SiLU, conv_out; the transition
    from level i+1 to level i is ``Upsample`` (widths[i+1] -> widths[i]) for i < num_up, a stride-1
    convolution otherwise. ``conv_out.weight`` is the codec's ``last_layer_weight``. ``lengths``
    ([B], 1-D only) are the valid input lengths; they double at every Upsample.
    """

    def __init__(
        self,
        dims: int,
        in_channels: int,
        out_channels: int,
        channels: int,
        channel_mult: Sequence[int],
        num_res_blocks: int,
        num_up: int,
        num_groups: int,
    ):
        super().__init__()
        if num_res_blocks < 1:
            raise ValueError(f"num_res_blocks must be >= 1, got {num_res_blocks!r}")
        widths = level_channels(channels, channel_mult, num_up)
        check_groups(num_groups, widths)
        self.conv_in = conv_nd(dims, in_channels, widths[-1], 3, padding=1)
        self.mid = ResBlock(dims, widths[-1], widths[-1], num_groups)
        self.levels = nn.ModuleList()
        for i in reversed(range(len(widths))):
            level = nn.Module()
            level.blocks = nn.ModuleList(
                ResBlock(dims, widths[i], widths[i], num_groups) for _ in range(num_res_blocks)
            )
            level.up = 0 < i <= num_up
            if 0 < i <= num_up:
                level.resample = Upsample(dims, widths[i], widths[i - 1])
            elif i > 0:
                level.resample = conv_nd(dims, widths[i], widths[i - 1], 3, padding=1)
            else:
                level.resample = None
            self.levels.append(level)
        self.norm_out = GroupNorm(num_groups, widths[0])
        self.conv_out = conv_nd(dims, widths[0], out_channels, 3, padding=1)

    def forward(self, z: Tensor, lengths: Tensor | None = None) -> Tensor:
        mask = None if lengths is None else length_mask(lengths, z.shape[-1], z.dtype)
        h = apply_mask(self.conv_in(apply_mask(z, mask)), mask)
        h = self.mid(h, mask)
        for level in self.levels:
            for block in level.blocks:
                h = block(h, mask)
            if level.resample is not None:
                h = level.resample(h)
                if level.up and lengths is not None:
                    lengths = lengths * 2
                    mask = length_mask(lengths, h.shape[-1], h.dtype)
                h = apply_mask(h, mask)
        return apply_mask(self.conv_out(apply_mask(F.silu(self.norm_out(h, mask)), mask)), mask)
