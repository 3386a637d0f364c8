"""The DiT trunk's parts: adaLN-Zero blocks (optionally with a depthwise convolution in the MLP), the
adaLN final layer, and (un)patchify.

Shapes: tokens ``x [B, S, H]``, conditioning vector ``c [B, H]``. Used by
:class:`multimodal.dit.DiffusionTransformer`, which composes them (embeddings, joint attention over
condition tokens, initialisation).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath, GELUTanh, Mlp
from torch import Tensor, nn

from .attention import attention
from .rope import apply_rope

GELU_LAYERS = {"exact": nn.GELU, "tanh": GELUTanh}
"""The MLP's activation. DiT uses GELU's tanh approximation; the exact (erf) GELU is the default here:
on this project's CPU in bf16 it is 5.0x faster forward and 2.5x forward + backward on [32, 256, 1536]
(one thread, ``python scripts/benchmark.py kernels``) and
differs from the approximation by < 5e-4, below bf16's rounding of the activations."""

def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """x [B, S, H]; shift, scale [B, H] -> x * (1 + scale) + shift (one fused addcmul pass over x)."""
    return torch.addcmul(shift[:, None, :], x, 1 + scale[:, None, :])


def patchify(x: Tensor, grid: tuple[int, int], p: int) -> Tensor:
    """Row-major token grid x [B, h*w, D] -> patches [B, (h/p)*(w/p), p*p*D] (channels: row, col, D)."""
    if p == 1:
        return x
    B, _, D = x.shape
    h, w = grid
    x = x.reshape(B, h // p, p, w // p, p, D).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, (h // p) * (w // p), p * p * D)


def unpatchify(x: Tensor, grid: tuple[int, int], p: int) -> Tensor:
    """Inverse of :func:`patchify`: [B, (h/p)*(w/p), p*p*D] -> [B, h*w, D]."""
    if p == 1:
        return x
    B, _, C = x.shape
    h, w = grid
    D = C // (p * p)
    x = x.reshape(B, h // p, w // p, p, p, D).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, h * w, D)


class Attention(nn.Module):
    """Multi-head self-attention through :func:`multimodal.attention.attention` (SDPA; explicit on CPUs in bf16).

    x [B, S, H]; attn_mask None or bool [B, 1, 1, S] (True = key takes part); rope None or the
    rotation of q and k, [S, 2 * head_dim] (:mod:`multimodal.rope`) -> [B, S, H].
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, rope: Tensor | None = None) -> Tensor:
        B, S, C = x.shape
        qkv = self.qkv(x).reshape(B, S, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [B, heads, S, head_dim]
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        x = attention(q, k, v, attn_mask)
        return self.proj(x.transpose(1, 2).reshape(B, S, C))


class ConvMlp(nn.Module):
    """The block MLP with a depthwise convolution between its layers (PVTv2's / LocalViT's ConvFFN)::

        h = fc1(x);  h = h + DWConv(h);  out = fc2(act(h))          x [B, S, H] -> [B, S, H]

    The convolution runs on each run of the joint sequence by its ``layout`` (the segments of
    :mod:`multimodal.rope`): k x k over an image grid, k over a sequence (the middle row of the
    same kernel, so one parameter serves both and none goes unused), not at all over text
    condition tokens. Padded tokens (``valid`` [B, S] False) are zeroed before it, so they do not
    leak into their neighbours. It gives every block a translation-equivariant local filter:
    an outline's corners are a neighbourhood pattern, the same at every place. The kernel starts
    at zero: the block starts as the plain MLP. Written here because timm's Mlp variants work on
    one layout (tokens or NCHW), not on a joint sequence of grids, sequences and text.
    """

    def __init__(self, dim: int, hidden: int, act_layer: type[nn.Module], kernel_size: int = 3) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"ConvMlp: kernel_size must be odd, got {kernel_size}")
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, kernel_size, padding=kernel_size // 2, groups=hidden)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden, dim)
        nn.init.zeros_(self.dwconv.weight)
        nn.init.zeros_(self.dwconv.bias)

    def forward(self, x: Tensor, layout: Sequence[tuple[str, tuple[int, ...]]] | None = None,
                valid: Tensor | None = None) -> Tensor:
        h = self.fc1(x)
        if layout:
            h = h + self._local(h if valid is None else h * valid[..., None].to(h.dtype), layout)
        return self.fc2(self.act(h))

    def _local(self, h: Tensor, layout: Sequence[tuple[str, tuple[int, ...]]]) -> Tensor:
        """The depthwise convolution of each segment of h [B, S, C] -> [B, S, C] (0 on text)."""
        B, S, C = h.shape
        k = self.dwconv.kernel_size[0]
        parts, start = [], 0
        for kind, size in layout:
            n = math.prod(size)
            seg = h[:, start:start + n].transpose(1, 2)  # [B, C, n]
            if kind == "grid":
                out = self.dwconv(seg.reshape(B, C, size[0], size[1])).flatten(2)
            elif kind == "sequence":
                out = F.conv1d(seg, self.dwconv.weight[:, :, k // 2], self.dwconv.bias, padding=k // 2, groups=C)
            else:
                out = torch.zeros_like(seg)
            parts.append(out.transpose(1, 2))
            start += n
        if start != S:
            raise ValueError(f"ConvMlp: the layout covers {start} tokens but the sequence has {S}")
        return torch.cat(parts, dim=1)


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block: x [B, S, H], c [B, H] -> [B, S, H].

    ``shift, scale, gate`` (for attention and for the MLP) = Linear(SiLU(c)); the branch input is
    ``LN(x) * (1 + scale) + shift`` (LayerNorm without affine) and its output is added as
    ``gate * branch``. ``rope`` (optional, [S, 2 * head_dim]) rotates the attention's q and k;
    ``conv_mlp`` makes the MLP a :class:`ConvMlp`, which reads the sequence's ``layout``. The
    modulation Linear is zero-initialised, so the block starts as identity.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0,
                 gelu: str = "exact", conv_mlp: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        mlp_hidden, act = int(hidden_size * mlp_ratio), GELU_LAYERS[gelu]
        self.mlp = ConvMlp(hidden_size, mlp_hidden, act) if conv_mlp else Mlp(hidden_size, mlp_hidden, act_layer=act)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: Tensor, c: Tensor, attn_mask: Tensor | None = None, rope: Tensor | None = None,
                layout: Sequence[tuple[str, tuple[int, ...]]] | None = None) -> Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = self._residual(x, gate_msa, self.attn(modulate(self.norm1(x), shift_msa, scale_msa), attn_mask, rope))
        y = modulate(self.norm2(x), shift_mlp, scale_mlp)
        if isinstance(self.mlp, ConvMlp):
            valid = attn_mask[:, 0, 0] if attn_mask is not None else None  # [B, S]: the keys that take part
            y = self.mlp(y, layout, valid)
        else:
            y = self.mlp(y)
        return self._residual(x, gate_mlp, y)

    def _residual(self, x: Tensor, gate: Tensor, branch: Tensor) -> Tensor:
        """x + gate * branch (fused addcmul; stochastic depth drops the gated branch per sample)."""
        if isinstance(self.drop_path, DropPath) and self.training:
            return x + self.drop_path(gate[:, None] * branch)
        return torch.addcmul(x, gate[:, None], branch)


class FinalLayer(nn.Module):
    """adaLN output layer: x [B, S, H], c [B, H] -> [B, S, out_dim] (``out_seq_dim`` for 1-D sequences
    when the image patch makes the two differ). Zero-initialised: the trunk's output starts at 0."""

    def __init__(self, hidden_size: int, out_dim: int, out_seq_dim: int | None = None) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        self.linear = nn.Linear(hidden_size, out_dim)
        self.linear_seq = nn.Linear(hidden_size, out_seq_dim) if out_seq_dim is not None else None

    def forward(self, x: Tensor, c: Tensor, sequence: bool = False) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        x = modulate(self.norm_final(x), shift, scale)
        linear = self.linear_seq if sequence and self.linear_seq is not None else self.linear
        return linear(x)
