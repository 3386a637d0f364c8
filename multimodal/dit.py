"""The DiffusionTransformer trunk: adaLN-Zero DiT blocks over token latents of the shared code space.

Inputs are token latents ``x [B, N, D]`` (``D`` = the shared quantizer's dim). An image is an
``h x w`` grid of tokens in row-major order, optionally patchified by ``p x p`` (``p`` in {1, 2, 4}: an
8 x 8 grid becomes 16 tokens of ``D * 4`` channels at ``p = 2``, like DiT's "/2" models); audio is a
1-D sequence of variable length with a padding mask (always ``p = 1``).

One forward (the token embedding is :class:`multimodal.dit_inputs.TrunkInputs`, the blocks
:mod:`multimodal.dit_blocks`)::

    tokens = Linear(patchify(x)) + sincos positions + modality embedding            [B, N', H]
             (``rope``: attention's q and k also rotated by their 2-D / 1-D position, multimodal.rope;
              ``conv_mlp``: a depthwise conv over the grid inside each block's MLP)
    c      = TimestepEmbedder(t) + LabelEmbedder(y)                                  [B, H]
           (+ PooledConditionEmbedder(condition tokens) with ``pool_condition``)
    h      = [condition tokens ; tokens]  (joint attention, padding masked)          [B, L + N', H]
    h      = DiTBlock(h, c) x depth       (adaLN-Zero: shift/scale/gate from c)
             (``long_skip``: block depth-1-i also reads block i's output, for i < depth / 2, U-ViT)
    out    = unpatchify(FinalLayer(h[:, L:], c))                                     [B, N, D]
             (``refiner``: + a convolutional stage over the cells, multimodal.refiner)

Timesteps ``t`` are on the discrete diffusion scale ``[0, num_timesteps)`` (1000 by default); floats
are allowed, so a rectified-flow time ``s in [0, 1]`` is passed as ``s * 1000`` (see
:class:`multimodal.diffusion.GaussianDiffusion`). ``t = 0`` means clean latents: :meth:`features`
uses it to encode clean latents for the understanding heads with the same weights.

Conditioning:

* class labels ``y [B]``: an embedding table with one extra "null" row (index ``num_classes``);
  ``y=None`` or ``y == -1`` is the null label. In training (``self.training`` and
  ``drop_condition=True``) every label is replaced by null with probability ``class_dropout_prob``.
* condition tokens prepended to the sequence: text ids ``cond_ids [B, L]`` (embedding table of
  ``text_vocab_size``, 1-D sin-cos positions, the text modality embedding) or another modality's
  latents ``cond_latents [B, L, D]`` (through the input projection, with that modality's positions
  and embedding); ``cond_mask [B, L]`` marks real tokens (True) vs padding (for a patchified image
  condition it has one entry per patch token, ``L / p^2``). The null token
  condition is the EMPTY condition: every condition token masked out of attention, which is exactly
  the same as running without condition tokens. It needs no extra parameters and is what training
  drops to with probability ``cond_dropout_prob`` and what :meth:`forward_with_cfg` uses for its
  unconditional half. The output keeps only the ``x`` positions.

Initialisation (:meth:`DiffusionTransformer.initialize_weights`, as in DiT): Xavier-uniform Linear
weights with zero biases, N(0, 0.02) embedding tables and timestep MLP, and ZERO adaLN modulation and
final projection, so every block starts as the identity and the output starts at exactly zero.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .dit_blocks import GELU_LAYERS, DiTBlock, FinalLayer, unpatchify
from .dit_guidance import GuidedForward
from .dit_inputs import MODALITIES, TrunkInputs
from .embeddings import LabelEmbedder, PooledConditionEmbedder, TimestepEmbedder
from .layers import resolve_preset
from .refiner import CellRefiner

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"depth": 2, "hidden_size": 64, "num_heads": 2, "mlp_ratio": 4.0},
    "cpu": {"depth": 6, "hidden_size": 256, "num_heads": 4, "mlp_ratio": 4.0},
    "S": {"depth": 12, "hidden_size": 384, "num_heads": 6, "mlp_ratio": 4.0},
    "B": {"depth": 12, "hidden_size": 768, "num_heads": 12, "mlp_ratio": 4.0},
    "L": {"depth": 24, "hidden_size": 1024, "num_heads": 16, "mlp_ratio": 4.0},
    "XL": {"depth": 28, "hidden_size": 1152, "num_heads": 16, "mlp_ratio": 4.0},
}
PATCH_SIZES = (1, 2, 4)


class DiffusionTransformer(TrunkInputs, GuidedForward, nn.Module):
    """A DiT over token latents of every modality.

    Args:
        in_dim: latent dim D of the shared code space (input channels per token, and output channels
            unless ``out_dim`` is set).
        out_dim: output channels per latent token when they are not D: the codebook size K for a trunk
            that predicts logits over the codes (:class:`multimodal.score_interpolation.CodeDenoiser`).
        preset: ``tiny`` (2 x 64, 2 heads; tests), ``cpu`` (6 x 256, 4 heads), ``S`` (12 x 384, 6),
            ``B`` (12 x 768, 12), ``L`` (24 x 1024, 16), ``XL`` (28 x 1152, 16); mlp_ratio 4.
        depth, hidden_size, num_heads, mlp_ratio: override the preset when not None.
        patch_size: p in {1, 2, 4}; image grids are patchified p x p (audio and text always use 1);
            4 is for a finely down-sampled codec (f = 2) whose grid would otherwise give too many tokens.
            A trunk that generates images needs ``in_dim * p**2 <= hidden_size`` (the generation head
            warns otherwise: ``tasks.heads.generation``).
        num_classes: size of the class table (plus one null row); 0 for no classes (null row only).
        class_dropout_prob: training probability of replacing a label by the null label.
        text_vocab_size: size of the text-condition embedding table; 0 disables ``cond_ids``.
        cond_dropout_prob: training probability of dropping a sample's condition tokens (all masked).
        pool_condition: also add the masked mean of the condition tokens, through an MLP, to the adaLN
            vector c (:class:`multimodal.embeddings.PooledConditionEmbedder`); the null condition adds 0.
        drop_path: stochastic depth rate of the last block (linearly increasing from 0).
        grad_checkpointing: recompute each block in backward (torch.utils.checkpoint) in training.
        sequence_output: with patch_size 2, give 1-D sequences (audio) their own output projection so
            the trunk can DENOISE them; False when no head generates audio (audio is then only encoded,
            by ``features``), so no parameter goes unused (plain DDP needs every parameter in the loss).
        frequency_size: sinusoidal timestep features before the timestep MLP.
        gelu: the MLP activation, ``exact`` (default) or ``tanh`` (DiT's approximation; see ``GELU_LAYERS``).
        rope: rotary positions in every attention (:mod:`multimodal.rope`: 2-D axial on image grids,
            1-D on audio, none on text condition tokens) besides the sin-cos ones added to the tokens:
            attention scores that depend on offsets, so what is learnt about an outline at one place
            holds at every place. Needs ``hidden_size / num_heads`` divisible by 4.
        conv_mlp: a depthwise 3 x 3 convolution inside every block's MLP over the image (patch) grid, 3
            over audio, none over text (:class:`multimodal.dit_blocks.ConvMlp`, zero-initialised):
            a translation-equivariant local filter in every block, for outlines at any place.
        self_condition: self-conditioning (Chen et al. 2023, "Analog Bits"): :meth:`forward` also takes
            ``x_self_cond``, an estimate of the clean latents [B, N, D] from an earlier pass (the
            previous sampling step; in training, a no-grad pass of the same batch half the time,
            :class:`multimodal.diffusion.GaussianDiffusion`), through its own zero-initialised input
            projection, so a sample can keep what it has decided (an outline) from step to step.
        long_skip: U-ViT's long skip connections (Bao et al. 2023, "All are Worth Words"): before each
            block of the second half, ``h = Linear([h ; h_i])`` with h_i the output of its mirror block i
            in the first half (the middle block of an odd depth has none), so the late blocks that draw
            the prediction see the early, low-level features of the noisy input directly. Initialised to
            ``[I, 0]``: the trunk starts as the plain DiT.
        refiner: C > 0 adds a convolutional stage at the latent grid's resolution after the final layer
            (:class:`multimodal.refiner.CellRefiner`, C channels a cell; zero-initialised, image grids only):
            the p x p cells of a token drawn by 3 x 3 convolutions that see the noisy input's cells.
    """

    def __init__(
        self,
        in_dim: int = 64,
        preset: str = "cpu",
        depth: int | None = None,
        hidden_size: int | None = None,
        num_heads: int | None = None,
        mlp_ratio: float | None = None,
        patch_size: int = 1,
        num_classes: int = 0,
        class_dropout_prob: float = 0.1,
        text_vocab_size: int = 0,
        cond_dropout_prob: float = 0.1,
        pool_condition: bool = False,
        drop_path: float = 0.0,
        grad_checkpointing: bool = False,
        frequency_size: int = 256,
        sequence_output: bool = True,
        gelu: str = "exact",
        rope: bool = False,
        conv_mlp: bool = False,
        out_dim: int | None = None,
        self_condition: bool = False,
        long_skip: bool = False,
        refiner: int = 0,
    ) -> None:
        super().__init__()
        if gelu not in GELU_LAYERS:
            raise ValueError(f"DiffusionTransformer: gelu must be one of {sorted(GELU_LAYERS)}, got {gelu!r}")
        cfg = resolve_preset(PRESETS, preset, "DiffusionTransformer", depth=depth, hidden_size=hidden_size,
                             num_heads=num_heads, mlp_ratio=mlp_ratio)
        depth, hidden_size, num_heads, mlp_ratio = (cfg["depth"], cfg["hidden_size"], cfg["num_heads"],
                                                    cfg["mlp_ratio"])
        out_dim = in_dim if out_dim is None else out_dim
        _check_positive(in_dim=in_dim, out_dim=out_dim, depth=depth, hidden_size=hidden_size, num_heads=num_heads,
                        frequency_size=frequency_size)
        if refiner < 0:
            raise ValueError(f"DiffusionTransformer: refiner must be >= 0 channels (0 = none), got {refiner!r}")
        if hidden_size % num_heads:
            raise ValueError(f"DiffusionTransformer: hidden_size={hidden_size} must be divisible by "
                             f"num_heads={num_heads}")
        if hidden_size % 4:
            raise ValueError(f"DiffusionTransformer: hidden_size={hidden_size} must be divisible by 4 "
                             "(2-D sin-cos positions)")
        if rope and (hidden_size // num_heads) % 4:
            raise ValueError(f"DiffusionTransformer: rope needs a head dim divisible by 4, got hidden_size / "
                             f"num_heads = {hidden_size // num_heads}")
        if patch_size not in PATCH_SIZES:
            raise ValueError(f"DiffusionTransformer: patch_size must be one of {PATCH_SIZES}, got {patch_size!r}")
        if mlp_ratio <= 0:
            raise ValueError(f"DiffusionTransformer: mlp_ratio must be positive, got {mlp_ratio!r}")
        if num_classes < 0 or text_vocab_size < 0:
            raise ValueError(f"DiffusionTransformer: num_classes={num_classes} and "
                             f"text_vocab_size={text_vocab_size} must be >= 0")
        for name, p in (("class_dropout_prob", class_dropout_prob), ("cond_dropout_prob", cond_dropout_prob),
                        ("drop_path", drop_path)):
            if not 0.0 <= p < 1.0:
                raise ValueError(f"DiffusionTransformer: {name} must be in [0, 1), got {p!r}")

        self.in_dim = in_dim
        self.out_dim = out_dim
        self.depth = depth
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.patch_size = patch_size
        self.num_classes = num_classes
        self.class_dropout_prob = class_dropout_prob
        self.text_vocab_size = text_vocab_size
        self.cond_dropout_prob = cond_dropout_prob
        self.grad_checkpointing = grad_checkpointing
        self.rope = rope
        self.conv_mlp = conv_mlp
        self.self_condition = self_condition
        self.long_skip = long_skip

        p2 = patch_size * patch_size
        self.x_embedder = nn.Linear(in_dim * p2, hidden_size)  # image patches (and sequences when p = 1)
        self.seq_embedder = nn.Linear(in_dim, hidden_size) if patch_size > 1 else None
        if self_condition:  # the x0 estimate's own projections, like x_embedder / seq_embedder
            self.self_cond_embedder = nn.Linear(in_dim * p2, hidden_size)
            self.self_cond_seq_embedder = nn.Linear(in_dim, hidden_size) if patch_size > 1 else None
        self.t_embedder = TimestepEmbedder(hidden_size, frequency_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        self.text_embedder = nn.Embedding(text_vocab_size, hidden_size) if text_vocab_size else None
        self.modality_embed = nn.Parameter(torch.zeros(len(MODALITIES), hidden_size))
        self.cond_pool = PooledConditionEmbedder(hidden_size) if pool_condition else None
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio, r, gelu, conv_mlp)
                                    for r in rates)
        # long_skip: one Linear(2H -> H) per block of the second half, mirror of a first-half block
        self.skip_linears = (nn.ModuleList(nn.Linear(2 * hidden_size, hidden_size) for _ in range(depth // 2))
                             if long_skip else None)
        self.final_layer = FinalLayer(hidden_size, out_dim * p2, out_dim if patch_size > 1 and sequence_output else None)
        self.refiner = CellRefiner(hidden_size, in_dim, out_dim, patch_size, refiner) if refiner else None
        self._pos_cache: dict[tuple, Tensor] = {}
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's initialisation; zero adaLN modulation and final layer (adaLN-Zero)."""

        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        if self.text_embedder is not None:
            nn.init.normal_(self.text_embedder.weight, std=0.02)
        nn.init.normal_(self.modality_embed, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        final = self.final_layer
        # zero self-conditioning projections: a trunk starts as if it had none
        self_cond = (self.self_cond_embedder, self.self_cond_seq_embedder) if self.self_condition else ()
        for linear in (final.adaLN_modulation[-1], final.linear, final.linear_seq, *self_cond):
            if linear is not None:
                nn.init.zeros_(linear.weight)
                nn.init.zeros_(linear.bias)
        if self.refiner is not None:
            self.refiner.initialize_weights()  # not DiT's Xavier: its convolutions, its zero output
        for skip in self.skip_linears or ():  # [I, 0]: h passes, the skip adds nothing until it learns to
            with torch.no_grad():
                skip.weight.zero_()
                skip.weight[:, : self.hidden_size].copy_(torch.eye(self.hidden_size))
                skip.bias.zero_()

    # ------------------------------------------------------------------ trunk

    def _trunk(
        self,
        x: Tensor,
        t: Tensor | float,
        modality: str,
        y: Tensor | None = None,
        cond_ids: Tensor | None = None,
        cond_mask: Tensor | None = None,
        x_mask: Tensor | None = None,
        grid: tuple[int, int] | None = None,
        drop_condition: bool = True,
        cond_latents: Tensor | None = None,
        cond_modality: str | None = None,
        cond_grid: tuple[int, int] | None = None,
        x_self_cond: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, tuple[int, int] | None]:
        """-> (hidden states of the x tokens [B, N', hidden], c [B, hidden], the grid or None)."""
        B, N = x.shape[:2]
        device = x.device
        tokens, grid = self._embed_latents(x, modality, grid)
        if self.self_condition:
            tokens = tokens + self._embed_self_condition(x_self_cond, x, grid).to(tokens.dtype)
        elif x_self_cond is not None:
            raise ValueError("DiffusionTransformer: x_self_cond given, but the trunk has self_condition=False")
        if x_mask is not None:
            if grid is not None and self.patch_size > 1:
                raise ValueError("DiffusionTransformer: x_mask is not supported for image grids with "
                                 "patch_size > 1 (a padded grid cannot be patchified)")
            if tuple(x_mask.shape) != (B, N):
                raise ValueError(f"DiffusionTransformer: x_mask must be [B, N]=({B}, {N}), got {tuple(x_mask.shape)}")
            x_mask = x_mask.to(torch.bool)

        t = torch.as_tensor(t, device=device)
        t = t.expand(B) if t.dim() == 0 else t
        if y is None:
            y = self.y_embedder.null_labels(B, device)
        dropping = self.training and drop_condition
        if dropping and self.class_dropout_prob > 0:
            y = self.y_embedder.drop(y, self.class_dropout_prob)
        c = self.t_embedder(t) + self.y_embedder(y)  # [B, hidden]

        cond = self._embed_condition(B, device, cond_ids, cond_mask, cond_latents, cond_modality, cond_grid)
        L = 0
        valid = x_mask
        segments = [self._segment(tokens.shape[1], grid, self.patch_size)]
        if cond is not None:
            cond_tokens, cond_valid, cond_segment = cond
            segments.insert(0, cond_segment)
            if dropping and self.cond_dropout_prob > 0:
                keep = torch.rand(B, 1, device=device) >= self.cond_dropout_prob
                cond_valid = cond_valid & keep
            if self.cond_pool is not None:
                c = c + self.cond_pool(cond_tokens, cond_valid).to(c.dtype)
            L = cond_tokens.shape[1]
            tokens = torch.cat([cond_tokens.to(tokens.dtype), tokens], dim=1)
            x_valid = x_mask if x_mask is not None else torch.ones(B, tokens.shape[1] - L, dtype=torch.bool,
                                                                   device=device)
            valid = torch.cat([cond_valid, x_valid], dim=1)
        attn_mask = None
        if valid is not None:
            # a row with no valid key would give NaN: let such (all-padding) samples attend everywhere
            valid = valid | ~valid.any(dim=1, keepdim=True)
            attn_mask = valid[:, None, None, :]  # [B, 1, 1, S]: broadcast over heads and queries

        rope = self._rope(segments, device) if self.rope else None
        layout = tuple(segments) if self.conv_mlp else None
        return self._blocks(tokens, c, attn_mask, rope, layout)[:, L:], c, grid

    def _blocks(self, h: Tensor, c: Tensor, attn_mask: Tensor | None, rope: Tensor | None = None,
                layout: tuple | None = None) -> Tensor:
        """The DiT blocks: tokens [B, S, hidden], c [B, hidden], attn_mask [B, 1, 1, S] bool or None,
        rope [S, 2 * head_dim] or None, layout (``conv_mlp``: the segments, :mod:`multimodal.rope`) or None."""
        use_checkpoint = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        n_skip = len(self.skip_linears) if self.skip_linears is not None else 0
        first_out, skips = len(self.blocks) - n_skip, []  # blocks [first_out, depth) read their mirror's output
        for i, block in enumerate(self.blocks):
            if i >= first_out:
                h = self.skip_linears[i - first_out](torch.cat([h, skips.pop()], dim=-1))
            if use_checkpoint:
                h = checkpoint(block, h, c, attn_mask, rope, layout, use_reentrant=False)
            else:
                h = block(h, c, attn_mask, rope, layout)
            if i < n_skip:  # first half: kept for its mirror
                skips.append(h)
        return h

    def forward(
        self,
        x: Tensor,
        t: Tensor | float,
        modality: str,
        y: Tensor | None = None,
        cond_ids: Tensor | None = None,
        cond_mask: Tensor | None = None,
        x_mask: Tensor | None = None,
        grid: tuple[int, int] | None = None,
        drop_condition: bool = True,
        cond_latents: Tensor | None = None,
        cond_modality: str | None = None,
        cond_grid: tuple[int, int] | None = None,
        x_self_cond: Tensor | None = None,
    ) -> Tensor:
        """Predict eps or v (or a flow velocity) for noisy latents.

        x [B, N, D]; t [B] or scalar, float or long, timesteps on the [0, num_timesteps) scale
        (rectified flow passes 1000 * s for s in [0, 1]); modality ``image`` (grid ``(h, w)``, square
        if None) or ``audio``; y [B] long or None (-1 / None = null label); cond_ids [B, L] long or
        cond_latents [B, L, D] (+ cond_modality, cond_grid) with cond_mask [B, L] bool (True = real
        token); x_mask [B, N] bool (True = real token); x_self_cond [B, N, D] (``self_condition``; None =
        zeros) the previous estimate of the clean, normalised latents. Returns [B, N, out_dim] (out_dim = D
        unless set); padded positions are 0.
        """
        h, c, grid = self._trunk(x, t, modality, y, cond_ids, cond_mask, x_mask, grid, drop_condition,
                                 cond_latents, cond_modality, cond_grid, x_self_cond)
        if grid is None and self.patch_size > 1 and self.final_layer.linear_seq is None:
            raise ValueError("DiffusionTransformer: this trunk has no sequence output (sequence_output=False): "
                             f"it cannot denoise {modality} latents; set sequence_output: true")
        out = self.final_layer(h, c, sequence=grid is None)
        if grid is not None:
            out = unpatchify(out, grid, self.patch_size)
            if self.refiner is not None:
                out = out + self.refiner(h, x, grid).to(out.dtype)
        if x_mask is not None:
            out = out * x_mask[..., None].to(out.dtype)
        return out

    def features(self, x: Tensor, modality: str, x_mask: Tensor | None = None,
                 grid: tuple[int, int] | None = None) -> Tensor:
        """Encode CLEAN latents: x [B, N, D] -> final hidden states [B, N', hidden] at t = 0 with the
        null condition (N' = N, or N / p^2 for patchified images). Padded positions are 0."""
        h, _, _ = self._trunk(x, 0, modality, None, x_mask=x_mask, grid=grid, drop_condition=False)
        if x_mask is not None:
            h = h * x_mask[..., None].to(h.dtype)
        return h

    def text_features(self, ids: Tensor, mask: Tensor | None = None) -> Tensor:
        """Encode text: ids [B, L] long (mask [B, L] bool, True = real token) -> hidden states
        [B, L, hidden] at t = 0 with the null condition, through the trunk's text table. Padded
        positions are 0."""
        B = ids.shape[0]
        tokens, valid, _ = self._embed_condition(B, ids.device, ids, mask, None, None, None)  # text: not rotated
        c = self.t_embedder(torch.zeros(B, device=ids.device)) + self.y_embedder(
            self.y_embedder.null_labels(B, ids.device))
        attn_mask = None
        if mask is not None:
            attn_mask = (valid | ~valid.any(dim=1, keepdim=True))[:, None, None, :]
        h = self._blocks(tokens, c, attn_mask)
        return h * valid[..., None].to(h.dtype)


def _check_positive(**settings: int) -> None:
    for name, value in settings.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"DiffusionTransformer: {name} must be a positive integer, got {value!r}")
