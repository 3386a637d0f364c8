"""Rotary position embeddings (RoPE) for the trunk's joint attention: 2-D axial on image grids,
1-D on sequences, none on text condition tokens.

Each head's query and key vectors ``q [B, heads, S, d]`` are read as ``d / 2`` pairs; pair ``j`` of a
token at position ``n`` is rotated by the angle ``n * f_j`` (Su et al. 2021, RoFormer)::

    (q_2j, q_2j+1) -> (q_2j cos(n f_j) - q_2j+1 sin(n f_j),  q_2j sin(n f_j) + q_2j+1 cos(n f_j))

so the score ``q_m . k_n`` depends on the offset ``m - n`` only, not on where the two tokens are: an
attention head can learn "look one token up and to the left" once for every place in the image.
Absolute sin-cos positions added to the tokens cannot do that: a rule about an object's outline has
to be learnt again at every position the object can take (measured on the demo shapes: README,
caption -> image).

Image tokens at (row r, column c): half the pairs take r, the other half c (axial 2-D RoPE, as in
FLUX and Lumina-Next). Sequence tokens (audio): every pair takes the position. Text condition tokens
are not rotated (angle 0, the identity): their scores with image tokens stay content-based, and the
text's own order is in its sin-cos positions. The frequencies ``f_j = temperature^(-j / bands)`` and
the rotation itself are timm's (``timm.layers.pos_embed_sincos``); what is written here is only the
table of a joint sequence, segment by segment.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.layers.pos_embed_sincos import apply_rot_embed_cat, build_rotary_pos_embed
from torch import Tensor

Segment = tuple[str, tuple[int, ...]]
"""One run of tokens in the joint sequence: ``("grid", (h, w))`` (row-major image tokens),
``("sequence", (n,))`` or ``("none", (n,))`` (not rotated)."""


def rope_table(segments: Sequence[Segment], head_dim: int, device: torch.device | None = None,
               temperature: float = 10000.0) -> Tensor:
    """The rotation of every token of a joint sequence -> ``[S, 2 * head_dim]`` float32: sin then
    cos, each ``[S, head_dim]`` (timm's concatenated layout, :func:`apply_rope`'s input)."""
    if head_dim % 4:
        raise ValueError(f"rope: head_dim must be divisible by 4 (2-D axial pairs), got {head_dim}")
    parts = []
    for kind, size in segments:
        if kind == "grid":
            sin, cos = build_rotary_pos_embed(list(size), dim=head_dim, in_pixels=False,
                                              temperature=temperature, device=device)
        elif kind == "sequence":  # one axis: timm gives dim / 2 entries, so ask for twice the head
            sin, cos = build_rotary_pos_embed(list(size), dim=2 * head_dim, in_pixels=False,
                                              temperature=temperature, device=device)
        elif kind == "none":
            sin = torch.zeros(size[0], head_dim, device=device)
            cos = torch.ones(size[0], head_dim, device=device)
        else:
            raise ValueError(f"rope: unknown segment kind {kind!r} (grid, sequence or none)")
        parts.append(torch.cat([sin, cos], dim=-1).float())
    return torch.cat(parts, dim=0)


def apply_rope(x: Tensor, table: Tensor) -> Tensor:
    """Rotate ``x [B, heads, S, head_dim]`` by ``table [S, 2 * head_dim]`` -> the same shape and dtype
    (the rotation is computed in the table's float32 and cast back)."""
    return apply_rot_embed_cat(x, table)
