"""Score interpolation over the codebook: Gaussian diffusion on code vectors, trained as classification.

CDCD (Dieleman et al. 2022, "Continuous diffusion for categorical data"). The forward process is
unchanged: clean latents are code vectors e_k of the shared codebook (normalised by the diffusion's
``latent_scale``), ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``. What changes is the trunk's output:
instead of regressing eps or v [B, N, D] it gives logits over the K codes for every token [B, N, K]
(``DiffusionTransformer(out_dim=K)``), and the denoised estimate is the expected code vector

    p(k | x_t, t, c) = softmax(l_k + f_k),        x0_hat = sum_k p(k | x_t, t, c) e_k,

trained with cross-entropy against each token's true code. ``l_k`` is the token's own evidence, the
log-likelihood of its x_t under code k (x_t = a e_k + b eps, up to a constant in k):

    l_k = -|x_t - a e_k|^2 / (2 b^2) = (a <x_t, e_k> - a^2 |e_k|^2 / 2) / b^2 + const,

so ``softmax(l)`` alone is the exact posterior of a model that knows nothing but that token (a uniform
prior over codes), and the trunk's logits ``f`` add what the other tokens and the condition say (an
outline, a caption). Without it the trunk would first have to learn a 512-way nearest-code classifier of
the codebook to denoise even at low noise, where ``l`` is already sharp (measured: README,
caption -> image). The samplers are untouched: they receive the
eps / v / flow velocity that x0_hat and x_t imply (:meth:`GaussianDiffusion.prediction_from_x0`), and
classifier-free guidance mixes the two halves' logits (the trunk's ``forward_with_cfg``).

Why, for a VQ code space: a regression loss weighs a wrong code by the distance between two code vectors,
which says little about how different the pictures are that the two codes draw (the codebook's geometry
is arbitrary below the coarse colour clusters); cross-entropy charges every wrong code alike, and its
gradient sits on the tokens the trunk is unsure of.

Nothing here exists in the libraries the project uses (diffusers' and timm's DiTs regress eps or v), so
it is written by hand.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from multimodal.diffusion import GaussianDiffusion
from multimodal.quantizer import nearest_code

TARGETS = ("latents", "codes")


class CodeDenoiser:
    """A trunk that gives logits over the codes, seen by the diffusion as an ordinary denoiser.

    trunk: a :class:`multimodal.dit.DiffusionTransformer` with ``out_dim = K``; diffusion: the process
    (its ``latent_scale`` normalises the codes); codebook: the K code vectors [K, D] as the codec reads
    them (RAW, i.e. ``quantizer.lookup(arange(K))``).

    ``denoiser(x_t, t, **kwargs)`` and ``denoiser.forward_with_cfg(x_t, t, guidance=g, **kwargs)`` return
    the diffusion's prediction [B, N, D]; :meth:`logits` the codes' logits [B, N, K]; :meth:`loss` the
    training loss.
    """

    def __init__(self, trunk: nn.Module, diffusion: GaussianDiffusion, codebook: Tensor) -> None:
        K, D = codebook.shape
        if getattr(trunk, "out_dim", None) != K:
            raise ValueError(f"target 'codes' needs a trunk with out_dim = the codebook size: set "
                             f"model.backbone.trunk.init_args.out_dim to {K} (it is {getattr(trunk, 'out_dim', None)})")
        if getattr(trunk, "in_dim", D) != D:
            raise ValueError(f"the trunk's in_dim={trunk.in_dim} does not match the codebook's dim={D}")
        self.trunk, self.diffusion = trunk, diffusion
        self.codebook = codebook.float()  # fp32 island: code distances and expectations

    # ------------------------------------------------------------------ pieces
    def codes_of(self, x0: Tensor) -> Tensor:
        """Clean code vectors [B, N, D] (rows of the codebook) -> their codes [B, N] long."""
        flat = x0.detach().float().reshape(-1, x0.shape[-1])
        return nearest_code(flat, self.codebook).view(x0.shape[:-1])

    def token_evidence(self, x: Tensor, t: Tensor) -> Tensor:
        """Each token's own log-likelihood under every code, l [B, N, K] float32 (the module doc): x [B, N, D]
        NORMALISED noisy latents, t [B] on the model's scale."""
        codes = self.diffusion.normalize(self.codebook)  # [K, D]
        a, b = (c.float()[:, None, None] for c in self.diffusion.signal_and_noise(t))
        b = b.clamp(min=1e-3)  # the flow's s = 0 (the diffusion's b >= sqrt(beta_0))
        # fp32 island: code distances, scaled by up to 1 / b^2 = 1e4 at t = 0
        return (a * (x.float() @ codes.T) - 0.5 * a * a * codes.square().sum(-1)) / (b * b)

    def logits(self, x: Tensor, t: Tensor, trunk_logits: Tensor) -> Tensor:
        """The codes' logits [B, N, K]: the token's own evidence plus the trunk's."""
        return self.token_evidence(x, t) + trunk_logits.float()

    def expected_code(self, logits: Tensor) -> Tensor:
        """Logits [B, N, K] -> x0_hat [B, N, D] in NORMALISED latent units (the diffusion's space)."""
        codes = self.diffusion.normalize(self.codebook)
        return torch.softmax(logits.float(), dim=-1) @ codes  # fp32: a softmax over K and its expectation

    def _prediction(self, x: Tensor, t: Tensor | float, trunk_logits: Tensor) -> Tensor:
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(x.shape[0]) if t.dim() == 0 else t
        return self.diffusion.prediction_from_x0(x.float(), t, self.expected_code(self.logits(x, t, trunk_logits)))

    # ------------------------------------------------------------------ the denoiser protocol
    def __call__(self, x: Tensor, t: Tensor | float, **model_kwargs: Any) -> Tensor:
        return self._prediction(x, t, self.trunk(x, t, **model_kwargs))

    def forward_with_cfg(self, x: Tensor, t: Tensor | float, guidance: float, **model_kwargs: Any) -> Tensor:
        """Guidance on the trunk's logits ``f_u + g (f_c - f_u)`` (the token's evidence is the same in both
        halves), then the expectation."""
        return self._prediction(x, t, self.trunk.forward_with_cfg(x, t, guidance=guidance, **model_kwargs))

    # ------------------------------------------------------------------ training
    def loss(self, x0: Tensor, x_mask: Tensor | None = None, t: Tensor | None = None,
             noise: Tensor | None = None, **model_kwargs: Any) -> tuple[Tensor, dict[str, Tensor]]:
        """Cross-entropy of the trunk's logits at a noised x0 against x0's codes.

        x0: RAW clean code vectors [B, N, D]; x_mask [B, N] bool (True = real token; None = all);
        t [B] as :meth:`GaussianDiffusion.sample_timesteps` gives (uniform if None); noise like x0.
        Returns (mean cross-entropy over valid tokens, logs): ``loss`` and its quarters ``loss_q0..3``
        (as :meth:`GaussianDiffusion.training_loss`), ``code_acc`` (argmax = true code).
        """
        diffusion = self.diffusion
        codes = self.codes_of(x0)
        x0 = diffusion.normalize(x0)
        B, N = codes.shape
        t = diffusion.sample_timesteps(B, x0.device) if t is None else t
        noise = torch.randn_like(x0) if noise is None else noise
        x_t = diffusion.q_sample(x0, t, noise)
        if x_mask is not None:
            model_kwargs["x_mask"] = x_mask
        model_t = diffusion.model_timesteps(t)
        logits = self.logits(x_t, model_t, self.trunk(x_t, model_t, **model_kwargs))
        # fp32 island: the loss reduction
        ce = F.cross_entropy(logits.float().reshape(B * N, -1), codes.reshape(-1), reduction="none").view(B, N)
        valid = torch.ones_like(ce) if x_mask is None else x_mask.to(ce.dtype)
        loss, logs = diffusion.reduce_loss(ce, valid, t)
        with torch.no_grad():
            hit = (logits.argmax(dim=-1) == codes).to(ce.dtype)
            logs["code_acc"] = (hit * valid).sum() / valid.sum().clamp(min=1)
        return loss, logs
