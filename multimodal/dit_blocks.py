"""The DiT trunk's parts: adaLN-Zero blocks, the adaLN final layer, and (un)patchify.

Shapes: tokens ``x [B, S, H]``, conditioning vector ``c [B, H]``. Used by
:class:`multimodal.dit.DiffusionTransformer`, which composes them (embeddings, joint attention over
condition tokens, initialisation).
"""

from __future__ import annotations

import torch
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


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block: x [B, S, H], c [B, H] -> [B, S, H].

    ``shift, scale, gate`` (for attention and for the MLP) = Linear(SiLU(c)); the branch input is
    ``LN(x) * (1 + scale) + shift`` (LayerNorm without affine) and its output is added as
    ``gate * branch``. ``rope`` (optional, [S, 2 * head_dim]) rotates the attention's q and k. The
    modulation Linear is zero-initialised, so the block starts as identity.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0,
                 gelu: str = "exact") -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), act_layer=GELU_LAYERS[gelu], drop=0.0)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: Tensor, c: Tensor, attn_mask: Tensor | None = None, rope: Tensor | None = None) -> Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = self._residual(x, gate_msa, self.attn(modulate(self.norm1(x), shift_msa, scale_msa), attn_mask, rope))
        x = self._residual(x, gate_mlp, self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))
        return x

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
