"""How latents and conditions become the DiT trunk's tokens (a mixin of
:class:`multimodal.dit.DiffusionTransformer`).

    image latents x [B, h*w, D] -> Linear(patchify(x, p)) + 2-D sin-cos positions + modality embedding   [B, h*w/p^2, H]
    audio latents x [B, N, D]   -> Linear(x)               + 1-D sin-cos positions + modality embedding   [B, N, H]
    text ids      [B, L]        -> Embedding(ids)          + 1-D sin-cos positions + text embedding       [B, L, H]

(``self_condition``: + Linear(patchify(x0 estimate)), the previous step's estimate of the clean latents)

and, with ``rope``, the rotation table of the joint sequence (:mod:`multimodal.rope`). Position tables
are cached per size and device in eager mode and computed in-graph under ``torch.compile``. The mixin
uses the trunk's ``in_dim``, ``hidden_size``, ``num_heads``, ``patch_size``, ``x_embedder``,
``seq_embedder``, ``text_embedder``, ``modality_embed`` and ``_pos_cache`` (and, with ``self_condition``,
``self_cond_embedder`` / ``self_cond_seq_embedder``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .dit_blocks import patchify
from .embeddings import sincos_1d, sincos_2d
from .rope import Segment, rope_table

MODALITIES = ("image", "audio", "text")
GRID_MODALITIES = ("image",)  # 2-D token grids; the others are 1-D sequences


class TrunkInputs:
    """Token embedding of latents and condition tokens, and the position tables (see the module docstring)."""

    def _cached(self, key: tuple, compute: Callable[[], Tensor]) -> Tensor:
        """A position table, cached per key (sizes, device) in eager mode, computed in-graph under
        torch.compile; the cache is kept bounded (variable-length audio)."""
        if torch.compiler.is_compiling():
            return compute()
        table = self._pos_cache.get(key)
        if table is None:
            if len(self._pos_cache) > 64:
                self._pos_cache.clear()
            table = self._pos_cache[key] = compute()
        return table

    def _positions(self, kind: str, size: tuple[int, ...], device: torch.device) -> Tensor:
        """Fixed sin-cos table [S, hidden] float32 for a 2-D grid (``kind='2d'``) or a 1-D sequence."""
        def compute() -> Tensor:
            if kind == "2d":
                return sincos_2d(self.hidden_size, size[0], size[1], device=device)
            return sincos_1d(self.hidden_size, torch.arange(size[0], device=device))

        return self._cached((kind, size, str(device)), compute)

    def _rope(self, segments: list[Segment], device: torch.device) -> Tensor:
        """The rotation table [S, 2 * head_dim] of a joint sequence."""
        head_dim = self.hidden_size // self.num_heads
        return self._cached(("rope", tuple(segments), str(device)), lambda: rope_table(segments, head_dim, device))

    @staticmethod
    def _segment(n: int, grid: tuple[int, int] | None, p: int) -> Segment:
        """The rope segment of n latent tokens: a (patch) grid, or a 1-D sequence."""
        return ("grid", (grid[0] // p, grid[1] // p)) if grid is not None else ("sequence", (n,))

    def _modality_index(self, modality: str, name: str = "modality") -> int:
        if modality not in MODALITIES:
            raise ValueError(f"DiffusionTransformer: {name} must be one of {MODALITIES}, got {modality!r}")
        return MODALITIES.index(modality)

    def _resolve_grid(self, n: int, grid: tuple[int, int] | None, name: str = "grid") -> tuple[int, int]:
        if grid is None:
            side = math.isqrt(n)
            if side * side != n:
                raise ValueError(f"DiffusionTransformer: {n} image tokens are not a square grid; pass {name}=(h, w)")
            grid = (side, side)
        h, w = int(grid[0]), int(grid[1])
        if h * w != n:
            raise ValueError(f"DiffusionTransformer: {name}={grid} has {h * w} tokens but x has {n}")
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"DiffusionTransformer: {name}={grid} is not divisible by patch_size={p}")
        return h, w

    def _embed_latents(self, x: Tensor, modality: str, grid: tuple[int, int] | None,
                       name: str = "grid") -> tuple[Tensor, tuple[int, int] | None]:
        """Latent tokens x [B, N, D] -> (tokens [B, N', hidden], the grid or None for sequences)."""
        index = self._modality_index(modality)
        if x.dim() != 3 or x.shape[-1] != self.in_dim:
            raise ValueError(f"DiffusionTransformer: latents must be [B, N, {self.in_dim}], got {tuple(x.shape)}")
        if modality in GRID_MODALITIES:
            grid = self._resolve_grid(x.shape[1], grid, name)
            p = self.patch_size
            tokens = self.x_embedder(patchify(x, grid, p))
            pos = self._positions("2d", (grid[0] // p, grid[1] // p), x.device)
        else:
            if modality == "text":
                raise ValueError("DiffusionTransformer: text is a condition (cond_ids), not a latent modality")
            grid = None
            tokens = (self.seq_embedder or self.x_embedder)(x)
            pos = self._positions("1d", (x.shape[1],), x.device)
        tokens = tokens + (pos + self.modality_embed[index]).to(tokens.dtype)
        return tokens, grid

    def _embed_self_condition(self, x_self_cond: Tensor | None, like: Tensor, grid: tuple[int, int] | None) -> Tensor:
        """Self-conditioning (Chen et al. 2023): the previous x0 estimate [B, N, D] (None: zeros, the first
        pass) -> tokens [B, N', hidden] to add to the latents' tokens, through its own zero-initialised
        projection (patchified like the latents on a grid)."""
        if x_self_cond is None:
            x_self_cond = torch.zeros_like(like)
        elif x_self_cond.shape != like.shape:
            raise ValueError(f"DiffusionTransformer: x_self_cond must be shaped like x {tuple(like.shape)}, "
                             f"got {tuple(x_self_cond.shape)}")
        x_self_cond = x_self_cond.to(like.dtype)
        if grid is not None:
            return self.self_cond_embedder(patchify(x_self_cond, grid, self.patch_size))
        return (self.self_cond_seq_embedder or self.self_cond_embedder)(x_self_cond)

    def _embed_condition(self, batch: int, device: torch.device, cond_ids: Tensor | None,
                         cond_mask: Tensor | None, cond_latents: Tensor | None, cond_modality: str | None,
                         cond_grid: tuple[int, int] | None) -> tuple[Tensor, Tensor, Segment] | None:
        """Condition tokens -> (tokens [B, L', hidden], valid [B, L'] bool, their rope segment), or None
        without a condition."""
        if cond_ids is not None and cond_latents is not None:
            raise ValueError("DiffusionTransformer: pass cond_ids (text) or cond_latents, not both")
        if cond_ids is None and cond_latents is None:
            if cond_mask is not None:
                raise ValueError("DiffusionTransformer: cond_mask given without cond_ids or cond_latents")
            return None
        if cond_ids is not None:
            if self.text_embedder is None:
                raise ValueError("DiffusionTransformer: cond_ids need a text table; set text_vocab_size > 0")
            L = cond_ids.shape[1]
            pos = self._positions("1d", (L,), device)
            tokens = self.text_embedder(cond_ids)
            tokens = tokens + (pos + self.modality_embed[MODALITIES.index("text")]).to(tokens.dtype)
            segment: Segment = ("none", (L,))
        else:
            if cond_modality is None:
                raise ValueError("DiffusionTransformer: cond_latents need cond_modality ('image' or 'audio')")
            tokens, grid = self._embed_latents(cond_latents, cond_modality, cond_grid, "cond_grid")
            L = tokens.shape[1]  # patch tokens for a patchified image condition
            segment = self._segment(L, grid, self.patch_size)
        if cond_mask is None:
            cond_mask = torch.ones(batch, L, dtype=torch.bool, device=device)
        elif tuple(cond_mask.shape) != (batch, L):
            raise ValueError(f"DiffusionTransformer: cond_mask must be [B, L]=({batch}, {L}), "
                             f"got {tuple(cond_mask.shape)}")
        return tokens, cond_mask.to(torch.bool), segment
