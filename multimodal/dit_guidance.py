"""Classifier-free guidance over the DiT trunk (a mixin of :class:`multimodal.dit.DiffusionTransformer`).

    out = out_u + guidance * (out_c - out_u)        (Ho & Salimans 2022)

with the conditional half ``out_c`` (the given label, condition tokens) and the unconditional half
``out_u`` (the null label, every condition token masked out) run as ONE batch of 2B. Uses the trunk's
``forward`` and ``patch_size``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .dit_inputs import GRID_MODALITIES


class GuidedForward:
    """:meth:`forward_with_cfg`: the trunk's forward with classifier-free guidance."""

    def forward_with_cfg(self, x: Tensor, t: Tensor | float, modality: str, guidance: float,
                         **cond: Any) -> Tensor:
        """Classifier-free guidance: ``eps_u + guidance * (eps_c - eps_u)`` -> [B, N, D].

        The conditional and the unconditional (null label, condition tokens masked out) halves run as
        ONE batch of 2B. ``cond`` takes :meth:`forward`'s keyword arguments (y, cond_ids, cond_mask,
        cond_latents, cond_modality, cond_grid, x_mask, grid, x_self_cond). guidance = 1 is the plain conditional
        forward (one half only), 0 the unconditional one.
        """
        if guidance < 0:
            raise ValueError(f"forward_with_cfg: guidance must be >= 0, got {guidance!r}")
        cond.pop("drop_condition", None)
        y, cond_ids, cond_latents = cond.get("y"), cond.get("cond_ids"), cond.get("cond_latents")
        if y is None and cond_ids is None and cond_latents is None:
            raise ValueError("forward_with_cfg: guidance needs a condition (y, cond_ids or cond_latents)")
        if guidance == 1:
            return self(x, t, modality, drop_condition=False, **cond)
        B = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(B) if t.dim() == 0 else t
        both = dict(cond)
        if y is not None:
            both["y"] = torch.cat([y, torch.full_like(y, -1)])
        tokens = cond_ids if cond_ids is not None else cond_latents
        if tokens is not None:
            mask = cond.get("cond_mask")
            if mask is None:
                L = tokens.shape[1]
                if cond_latents is not None and cond.get("cond_modality") in GRID_MODALITIES:
                    L = L // (self.patch_size * self.patch_size)
                mask = torch.ones(B, L, dtype=torch.bool, device=x.device)
            both["cond_mask"] = torch.cat([mask.to(torch.bool), torch.zeros_like(mask, dtype=torch.bool)])
            key = "cond_ids" if cond_ids is not None else "cond_latents"
            both[key] = torch.cat([tokens, tokens])
        for key in ("x_mask", "x_self_cond"):  # both halves see the same mask and the same (guided) estimate
            if cond.get(key) is not None:
                both[key] = torch.cat([cond[key], cond[key]])
        out = self(torch.cat([x, x]), torch.cat([t, t]), modality, drop_condition=False, **both)
        eps_c, eps_u = out.chunk(2)
        return eps_u + guidance * (eps_c - eps_u)
