"""The diffusion process on (normalised) token latents, and its samplers.

``GaussianDiffusion`` (DDPM, Ho et al. 2020; improved schedules, Nichol & Dhariwal 2021):

    x_t = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * eps,          t in {0, ..., T-1},  eps ~ N(0, I)

with ``abar_t = prod_{s <= t} (1 - beta_s)``. The model predicts ``eps`` or the velocity
``v = sqrt(abar_t) * eps - sqrt(1 - abar_t) * x0`` (Salimans & Ho 2022); either gives
``x0 = (x_t - sqrt(1 - abar_t) * eps) / sqrt(abar_t) = sqrt(abar_t) * x_t - sqrt(1 - abar_t) * v``.

``objective="flow"`` is rectified flow instead: ``x_s = (1 - s) * x0 + s * eps`` for continuous
``s in [0, 1]``, the model predicts the velocity ``eps - x0`` and sampling integrates
``dx/ds = v`` from s = 1 to 0 with Euler steps. The model is always called with timesteps on the
DISCRETE scale ``[0, T)``: the diffusion passes (original, not respaced) integer timesteps, the flow
passes ``s * T`` as a float. So one trunk sees the same range in either case, and ``t = 0`` is
clean data for both.

The model is any callable ``model_fn(x_t [B, N, D], t [B], **model_kwargs) -> [B, N, D]``; ``x_mask``
is passed on when given. Classifier-free guidance (``guidance != 1``) needs a model with
``forward_with_cfg(x, t, guidance=g, **model_kwargs)`` that runs the conditional and null halves as
one batch, e.g. :class:`multimodal.dit.DiffusionTransformer` (pass ``modality=...`` in the
kwargs).

Self-conditioning (Chen et al. 2023, "Analog Bits"): a model with a true ``self_condition`` attribute
(``DiffusionTransformer(self_condition=True)``) also takes ``x_self_cond``, an estimate of the clean
normalised latents. Training gives it, with probability ``self_condition_prob``, the estimate of a first
no-grad pass on the same x_t (else None: zeros), and the loss is on the second pass; evaluation always
does both passes; the samplers hand each step the previous step's (guided) estimate.

Latent normalisation: a ``latent_scale`` buffer (default 1, saved in the state dict so it travels in
checkpoints; :meth:`set_latent_scale_from` measures ``1 / std`` of data latents, like the 0.18215 DiT
uses for SD's VAE). :meth:`training_loss` takes RAW latents and normalises them; :meth:`sample`
returns RAW (unnormalised) latents. Those are continuous: snap them to the nearest code of the shared
codebook (the backbone's ``snap_to_codebook``) before the codec decodes them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

SCHEDULES = ("linear", "cosine")
PREDICTIONS = ("eps", "v")
OBJECTIVES = ("diffusion", "flow")
TIMESTEP_SAMPLERS = ("uniform", "logit_normal")
SAMPLERS = {"diffusion": ("ddim", "ddpm"), "flow": ("euler",)}


def linear_betas(num_timesteps: int) -> Tensor:
    """DDPM's linear schedule 1e-4 -> 0.02 for T = 1000, scaled by 1000 / T for other T. [T] float64."""
    scale = 1000.0 / num_timesteps
    return torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Nichol & Dhariwal's cosine schedule: abar(t) = cos^2(((t / T + s) / (1 + s)) * pi / 2),
    beta_t = min(1 - abar(t + 1) / abar(t), max_beta). [T] float64."""
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    abar = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - abar[1:] / abar[:-1]).clamp(max=max_beta)


def _expand(values: Tensor, ndim: int) -> Tensor:
    """[B] -> [B, 1, ..., 1] with ``ndim`` dims in total."""
    return values.reshape(-1, *([1] * (ndim - 1)))


class GaussianDiffusion(nn.Module):
    """Args:
    num_timesteps: T, the number of discrete diffusion steps (also the model's timestep scale).
    schedule: ``linear`` or ``cosine`` beta schedule.
    prediction: ``eps`` or ``v`` for ``objective="diffusion"`` (default ``eps``); must stay None
        (or ``velocity``) for ``objective="flow"``, whose model predicts ``eps - x0``.
    objective: ``diffusion`` (Gaussian DDPM process) or ``flow`` (rectified flow).
    latent_scale: initial value of the ``latent_scale`` buffer (normalised = raw * latent_scale).
    self_condition_prob: how often training self-conditions a model that takes it (see the module doc).
    timesteps: how training draws its times: ``uniform`` over the range, or ``logit_normal`` (Esser et al.
        2024, SD3): the time fraction is ``sigmoid(loc + scale * n)``, n ~ N(0, 1), which spends the
        steps on the middle of the range (``timestep_loc`` > 0 moves them towards the noisy end, where a
        sample from noise decides its layout) instead of the nearly clean and nearly pure-noise ends.
    timestep_loc, timestep_scale: ``logit_normal``'s location and scale (ignored by ``uniform``).
    """

    def __init__(
        self,
        num_timesteps: int = 1000,
        schedule: str = "linear",
        prediction: str | None = None,
        objective: str = "diffusion",
        latent_scale: float = 1.0,
        self_condition_prob: float = 0.5,
        timesteps: str = "uniform",
        timestep_loc: float = 0.0,
        timestep_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if not isinstance(num_timesteps, int) or num_timesteps < 1:
            raise ValueError(f"GaussianDiffusion: num_timesteps must be a positive integer, got {num_timesteps!r}")
        if schedule not in SCHEDULES:
            raise ValueError(f"GaussianDiffusion: schedule must be one of {SCHEDULES}, got {schedule!r}")
        if objective not in OBJECTIVES:
            raise ValueError(f"GaussianDiffusion: objective must be one of {OBJECTIVES}, got {objective!r}")
        if objective == "flow":
            if prediction not in (None, "velocity"):
                raise ValueError(f"GaussianDiffusion: objective='flow' predicts the velocity eps - x0; "
                                 f"prediction must be None or 'velocity', got {prediction!r}")
            prediction = "velocity"
        else:
            prediction = prediction or "eps"
            if prediction not in PREDICTIONS:
                raise ValueError(f"GaussianDiffusion: prediction must be one of {PREDICTIONS}, got {prediction!r}")
        if not 0.0 <= self_condition_prob <= 1.0:
            raise ValueError(f"GaussianDiffusion: self_condition_prob must be in [0, 1], got {self_condition_prob!r}")
        self.self_condition_prob = self_condition_prob
        if timesteps not in TIMESTEP_SAMPLERS:
            raise ValueError(f"GaussianDiffusion: timesteps must be one of {TIMESTEP_SAMPLERS}, got {timesteps!r}")
        if not timestep_scale > 0:
            raise ValueError(f"GaussianDiffusion: timestep_scale must be positive, got {timestep_scale!r}")
        self.timesteps = timesteps
        self.timestep_loc = float(timestep_loc)
        self.timestep_scale = float(timestep_scale)
        if not latent_scale > 0:
            raise ValueError(f"GaussianDiffusion: latent_scale must be positive, got {latent_scale!r}")
        self.num_timesteps = num_timesteps
        self.schedule = schedule
        self.prediction = prediction
        self.objective = objective

        betas = linear_betas(num_timesteps) if schedule == "linear" else cosine_betas(num_timesteps)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        # derived from the configuration: not saved (checkpoints stay loadable if this code changes)
        for name, value in {
            "betas": betas,
            "alphas_cumprod": alphas_cumprod,
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt(),
        }.items():
            self.register_buffer(name, value.float(), persistent=False)
        self._abar = alphas_cumprod.tolist()  # float64 values for the samplers' per-step scalars
        self.register_buffer("latent_scale", torch.tensor(float(latent_scale)))

    # ------------------------------------------------------------------ latent normalisation

    def normalize(self, x: Tensor) -> Tensor:
        """Raw latents -> normalised latents (x * latent_scale)."""
        return x * self.latent_scale.to(x.dtype)

    def unnormalize(self, x: Tensor) -> Tensor:
        """Normalised latents -> raw latents (x / latent_scale)."""
        return x / self.latent_scale.to(x.dtype)

    @torch.no_grad()
    def set_latent_scale_from(self, latents: Tensor, mask: Tensor | None = None) -> float:
        """Set ``latent_scale = 1 / std`` of data latents [B, N, D] (see :func:`measure_latent_scale`).
        Returns the new scale."""
        self.latent_scale.fill_(measure_latent_scale(latents, mask))
        return float(self.latent_scale)

    # ------------------------------------------------------------------ forward process

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor | None = None) -> Tensor:
        """Noise clean latents: x0 [B, ...], t [B] -> x_t [B, ...].

        Diffusion: t long in [0, T), ``sqrt(abar_t) x0 + sqrt(1 - abar_t) noise``.
        Flow: t float in [0, 1], ``(1 - t) x0 + t noise``.
        """
        noise = torch.randn_like(x0) if noise is None else noise
        if self.objective == "flow":
            s = _expand(t.to(x0.dtype), x0.dim())
            return (1 - s) * x0 + s * noise
        return (_expand(self.sqrt_alphas_cumprod[t], x0.dim()).to(x0.dtype) * x0
                + _expand(self.sqrt_one_minus_alphas_cumprod[t], x0.dim()).to(x0.dtype) * noise)

    def v_target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 (diffusion; t long [B])."""
        a = _expand(self.sqrt_alphas_cumprod[t], x0.dim()).to(x0.dtype)
        b = _expand(self.sqrt_one_minus_alphas_cumprod[t], x0.dim()).to(x0.dtype)
        return a * noise - b * x0

    def split_prediction(self, x_t: Tensor, t: Tensor, out: Tensor) -> tuple[Tensor, Tensor]:
        """The model output at (x_t, t) -> (x0 estimate, eps estimate). Diffusion only; t long [B]."""
        a = _expand(self.sqrt_alphas_cumprod[t], x_t.dim()).to(x_t.dtype)
        b = _expand(self.sqrt_one_minus_alphas_cumprod[t], x_t.dim()).to(x_t.dtype)
        if self.prediction == "v":
            return a * x_t - b * out, b * x_t + a * out
        return (x_t - b * out) / a, out

    def x0_from_output(self, x_t: Tensor, t: Tensor, out: Tensor) -> Tensor:
        """The model output at (x_t, t) -> its estimate of the clean latents (normalised, [B, ...]); t [B]
        on the model's scale (flow: ``s * T``), as the model is called."""
        if self.objective == "flow":
            s = _expand(t.float() / self.num_timesteps, x_t.dim()).to(x_t.dtype)
            return x_t - s * out  # x_s = (1 - s) x0 + s eps, out = eps - x0
        return self.split_prediction(x_t, t.long(), out)[0]

    @torch.no_grad()
    def self_condition(self, model_fn: Callable[..., Tensor], x_t: Tensor, t: Tensor,
                       model_kwargs: dict[str, Any]) -> Tensor | None:
        """Training's self-conditioning input for x_t [B, ...] at t [B] (model scale): None (zeros) with
        probability 1 - ``self_condition_prob`` in training, else a no-grad pass's x0 estimate."""
        if getattr(model_fn, "training", False) and float(torch.rand(())) >= self.self_condition_prob:
            return None
        return self.x0_from_output(x_t, t, model_fn(x_t, t, **model_kwargs).float()).to(x_t.dtype)

    def model_timesteps(self, t: Tensor) -> Tensor:
        """What the model sees: discrete t as is, flow time s in [0, 1] as ``s * T`` (float)."""
        return t * self.num_timesteps if self.objective == "flow" else t

    # ------------------------------------------------------------------ training

    def sample_timesteps(self, batch: int, device: torch.device | str) -> Tensor:
        """Training times (``timesteps``: uniform or logit-normal): [B] long in [0, T) (diffusion) or
        float in [0, 1) (flow). In eval mode always uniform: an evaluation loss means the same whatever
        the training sampler."""
        if self.timesteps == "uniform" or not self.training:
            if self.objective == "flow":
                return torch.rand(batch, device=device)
            return torch.randint(0, self.num_timesteps, (batch,), device=device)
        u = torch.sigmoid(self.timestep_loc + self.timestep_scale * torch.randn(batch, device=device))
        if self.objective == "flow":
            return u
        return (u * self.num_timesteps).long().clamp_(0, self.num_timesteps - 1)

    def time_fraction(self, t: Tensor) -> Tensor:
        """Times [B] (as :meth:`sample_timesteps` gives them) -> the fraction of the time range, float [B]
        (0 = clean)."""
        return t.float() if self.objective == "flow" else t.float() / self.num_timesteps

    def training_loss(
        self,
        model_fn: Callable[..., Tensor],
        x0: Tensor,
        x_mask: Tensor | None = None,
        t: Tensor | None = None,
        noise: Tensor | None = None,
        loss_weight: Tensor | None = None,
        **model_kwargs: Any,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """MSE of the model's prediction on RAW latents x0 [B, N, D] (normalised here).

        t (optional): [B] long in [0, T) (diffusion) or float in [0, 1] (flow), uniform if None;
        noise (optional): like x0. The squared error is averaged over the valid tokens of ``x_mask``
        [B, N] (all when None) and the D channels; ``loss_weight`` [B, N] (optional, >= 0) makes it a
        weighted mean over the tokens. Returns (loss, logs) where logs hold the detached
        loss and its mean per quarter of the time range (``loss_q0`` = least noisy).
        """
        x0 = self.normalize(x0)
        B = x0.shape[0]
        if t is None:
            t = self.sample_timesteps(B, x0.device)
        noise = torch.randn_like(x0) if noise is None else noise
        x_t = self.q_sample(x0, t, noise)
        if self.objective == "flow":
            target = noise - x0
        elif self.prediction == "v":
            target = self.v_target(x0, noise, t)
        else:
            target = noise
        if x_mask is not None:
            model_kwargs["x_mask"] = x_mask
        if getattr(model_fn, "self_condition", False):
            model_kwargs["x_self_cond"] = self.self_condition(model_fn, x_t, self.model_timesteps(t), model_kwargs)
        out = model_fn(x_t, self.model_timesteps(t), **model_kwargs)
        err = (out.float() - target.float()).square().mean(dim=-1)  # [B, N]
        valid = torch.ones_like(err) if x_mask is None else x_mask.to(err.dtype)
        if loss_weight is not None:
            valid = valid * loss_weight.to(err.dtype)
        return self.reduce_loss(err, valid, t)

    def reduce_loss(self, err: Tensor, valid: Tensor, t: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """A per-token loss err [B, N] (fp32), valid [B, N] (1 = real token) and the times t [B] ->
        (the mean over valid tokens, logs: ``loss`` and its mean per quarter of the time range,
        ``loss_q0`` = least noisy)."""
        per_sample = (err * valid).sum(dim=1)  # [B]
        tokens = valid.sum(dim=1)  # [B]
        loss = per_sample.sum() / tokens.sum().clamp(min=1)

        logs = {"loss": loss.detach()}
        with torch.no_grad():
            quarter = (self.time_fraction(t) * 4).long().clamp(0, 3)
            for q in range(4):
                sel = (quarter == q).to(per_sample.dtype)
                logs[f"loss_q{q}"] = (per_sample * sel).sum() / (tokens * sel).sum().clamp(min=1)
        return loss, logs

    def prediction_from_x0(self, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        """What this process's model predicts at (x_t, t) when its estimate of the clean latents is x0
        (all NORMALISED, [B, ...]; t [B] on the model's scale, as the samplers pass it) -> eps, v, or the
        flow velocity eps - x0. For denoisers that estimate x0 directly
        (:class:`multimodal.score_interpolation.CodeDenoiser`)."""
        a, b = (_expand(c, x_t.dim()).to(x_t.dtype) for c in self.signal_and_noise(t))
        if self.objective == "flow":
            return (x_t - x0) / b.clamp(min=1e-4)  # the samplers stop short of s = 0
        eps = (x_t - a * x0) / b
        return a * eps - b * x0 if self.prediction == "v" else eps

    def signal_and_noise(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """t [B] on the model's scale -> (a, b) [B] float32 with x_t = a x0 + b eps: (sqrt(abar_t),
        sqrt(1 - abar_t)) for the diffusion, (1 - s, s) with s = t / T for the flow."""
        if self.objective == "flow":
            s = t.float() / self.num_timesteps
            return 1.0 - s, s
        t = t.long()
        return self.sqrt_alphas_cumprod[t], self.sqrt_one_minus_alphas_cumprod[t]

    # ------------------------------------------------------------------ sampling

    def respaced_timesteps(self, steps: int, first: int | None = None) -> list[int]:
        """``steps`` evenly spaced original timesteps, descending from ``first`` (default T - 1) to 0."""
        first = self.num_timesteps - 1 if first is None else first
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"sample: steps must be a positive integer, got {steps!r}")
        if steps > first + 1:
            raise ValueError(f"sample: steps={steps} exceeds the {first + 1} timesteps from t = {first}")
        if steps == 1:
            return [first]
        grid = torch.linspace(0, first, steps, dtype=torch.float64).round().long()
        return grid.flip(0).tolist()

    @torch.no_grad()
    def sample(
        self,
        model_fn: Callable[..., Tensor],
        shape: tuple[int, ...],
        steps: int = 50,
        sampler: str | None = None,
        eta: float = 0.0,
        guidance: float = 1.0,
        generator: torch.Generator | None = None,
        x_mask: Tensor | None = None,
        noise: Tensor | None = None,
        device: torch.device | str | None = None,
        clip_denoised: float | None = None,
        x_start: Tensor | None = None,
        start: float = 1.0,
        denoised_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        guidance_interval: tuple[float, float] = (0.0, 1.0),
        **model_kwargs: Any,
    ) -> Tensor:
        """Draw latents of ``shape`` [B, N, D] -> RAW (unnormalised) latents [B, N, D].

        sampler: ``ddim`` (default; ``eta`` = 0 deterministic, 1 = DDPM-like) or ``ddpm`` (ancestral,
        posterior variance) over ``steps`` respaced timesteps, or ``euler`` (flow; the default there).
        guidance: classifier-free guidance scale (1 = conditional only, no extra compute; > 1 calls
        ``model_fn.forward_with_cfg``, both halves in one batch), applied only at the steps whose time
        fraction t / T lies in ``guidance_interval`` = (lo, hi) (Kynkaanniemi et al. 2024, "Applying
        guidance in a limited interval"; elsewhere the conditional half alone). The same ``generator`` state gives
        the same samples. ``noise`` (optional) replaces the initial Gaussian draw. Padded positions
        (``x_mask`` False) come back as 0. ``device`` defaults to the buffers' device.
        ``clip_denoised`` (diffusion samplers) clamps every x0 estimate to [-c, c] in normalised
        space: it tames eps prediction where abar_t ~ 0 (cosine schedule), where x0 = (x - b eps) / a
        amplifies the model's error by 1 / sqrt(abar_t).
        ``denoised_fn(x0, t)`` (as in guided-diffusion): applied to every x0 estimate (normalised [B, ...],
        t [B] on the model's scale) before the step uses it, e.g. to snap it to the codebook
        (``GenerationHead(snap_denoised=...)``); the step's eps is made consistent with its result.
        ``x_start`` (RAW latents like ``shape``) and ``start`` in (0, 1] (the fraction of the time range):
        SDEdit (Meng et al. 2022): noise ``x_start`` to ``t = start * (T - 1)`` (flow: ``s = start``) and
        denoise from there in ``steps`` steps; how much of a real sample survives tells where in the
        time range a trunk decides what (``scripts/denoise_probe.py``).
        """
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"sample: steps must be a positive integer, got {steps!r}")
        if not guidance >= 0:
            raise ValueError(f"sample: guidance must be >= 0, got {guidance!r}")
        if not eta >= 0:
            raise ValueError(f"sample: eta must be >= 0, got {eta!r}")
        lo, hi = (float(v) for v in guidance_interval)
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"sample: guidance_interval must be (lo, hi) with 0 <= lo < hi <= 1, got {guidance_interval!r}")
        if clip_denoised is not None and not clip_denoised > 0:
            raise ValueError(f"sample: clip_denoised must be positive or None, got {clip_denoised!r}")
        if not 0.0 < start <= 1.0:
            raise ValueError(f"sample: start must be in (0, 1], got {start!r}")
        if x_start is not None and tuple(x_start.shape) != tuple(shape):
            raise ValueError(f"sample: x_start has shape {tuple(x_start.shape)}, expected {tuple(shape)}")
        if start < 1.0 and x_start is None:
            raise ValueError("sample: start < 1 denoises a given sample: pass x_start")
        sampler = sampler or SAMPLERS[self.objective][0]
        if sampler not in SAMPLERS[self.objective]:
            raise ValueError(f"sample: sampler must be one of {SAMPLERS[self.objective]} for "
                             f"objective={self.objective!r}, got {sampler!r}")
        device = torch.device(device) if device is not None else self.latent_scale.device
        if guidance != 1:
            if not hasattr(model_fn, "forward_with_cfg"):
                raise ValueError("sample: guidance != 1 needs a model with forward_with_cfg(x, t, guidance=..., "
                                 "**kwargs) (e.g. DiffusionTransformer) that runs both halves as one batch")

            def predict(x: Tensor, t: Tensor) -> Tensor:
                if lo <= float(t.reshape(-1)[0]) / self.num_timesteps <= hi:  # t on the model's scale
                    return model_fn.forward_with_cfg(x, t, guidance=guidance, **model_kwargs)
                return model_fn(x, t, **model_kwargs)
        else:
            def predict(x: Tensor, t: Tensor) -> Tensor:
                return model_fn(x, t, **model_kwargs)
        if x_mask is not None:
            model_kwargs["x_mask"] = x_mask
        self_condition = bool(getattr(model_fn, "self_condition", False))
        if self_condition:
            model_kwargs["x_self_cond"] = None  # the first step: zeros; then the previous step's x0 estimate

        def randn(like_shape: tuple[int, ...]) -> Tensor:
            gen_device = generator.device if generator is not None else device
            return torch.randn(like_shape, generator=generator, device=gen_device).to(device)

        x = randn(tuple(shape)) if noise is None else noise.to(device)
        B = x.shape[0]
        first = round(start * (self.num_timesteps - 1))
        if x_start is not None:  # SDEdit: the given sample, noised to where sampling starts
            x0 = self.normalize(x_start.to(device))
            if self.objective == "flow":
                x = (1 - start) * x0 + start * x
            else:
                x = self.q_sample(x0, torch.full((B,), first, dtype=torch.long, device=device), x)
        if self.objective == "flow":
            x = self._euler(predict, x, steps, start, model_kwargs if self_condition else None, denoised_fn)
        else:
            timesteps = self.respaced_timesteps(steps, first)
            for i, t_now in enumerate(timesteps):
                t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
                t = torch.full((B,), t_now, dtype=torch.long, device=device)
                x, x0 = self._step(sampler, x, predict(x, t).float(), t_now, t_prev, eta, randn, clip_denoised,
                                   None if denoised_fn is None else lambda x0, t=t: denoised_fn(x0, t))
                if self_condition:
                    model_kwargs["x_self_cond"] = x0
        if x_mask is not None:
            x = x * x_mask[..., None].to(x.dtype)
        return self.unnormalize(x)

    def _step(self, sampler: str, x: Tensor, out: Tensor, t_now: int, t_prev: int, eta: float,
              randn: Callable[[tuple[int, ...]], Tensor], clip: float | None = None,
              denoised_fn: Callable[[Tensor], Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """One reverse step from timestep t_now to t_prev (-1 = clean data) given the model output ->
        (x at t_prev, the step's x0 estimate); ``clip`` and then ``denoised_fn`` act on the x0 estimate."""
        abar = self._abar[t_now]
        abar_prev = self._abar[t_prev] if t_prev >= 0 else 1.0
        a, b = math.sqrt(abar), math.sqrt(1.0 - abar)
        if self.prediction == "v":  # same algebra as split_prediction, with float64 scalars
            x0, eps = a * x - b * out, b * x + a * out
        else:
            x0, eps = (x - b * out) / a, out
        if clip is not None:
            x0 = x0.clamp(-clip, clip)
        if denoised_fn is not None:
            x0 = denoised_fn(x0)
        if clip is not None or denoised_fn is not None:  # eps consistent with the changed x0
            eps = (x - a * x0) / b
        if t_prev < 0:
            return x0, x0
        if sampler == "ddpm":
            # posterior q(x_prev | x_t, x0) of the respaced chain, beta' = 1 - abar / abar_prev
            beta = 1.0 - abar / abar_prev
            coef_x0 = math.sqrt(abar_prev) * beta / (1.0 - abar)
            coef_xt = math.sqrt(1.0 - beta) * (1.0 - abar_prev) / (1.0 - abar)
            var = beta * (1.0 - abar_prev) / (1.0 - abar)
            return coef_x0 * x0 + coef_xt * x + math.sqrt(var) * randn(tuple(x.shape)), x0
        # DDIM (Song et al. 2021): sigma = eta * sqrt((1 - abar_prev) / (1 - abar)) * sqrt(1 - abar / abar_prev)
        sigma = eta * math.sqrt((1.0 - abar_prev) / (1.0 - abar) * (1.0 - abar / abar_prev))
        x_prev = math.sqrt(abar_prev) * x0 + math.sqrt(max(1.0 - abar_prev - sigma**2, 0.0)) * eps
        if sigma > 0:
            x_prev = x_prev + sigma * randn(tuple(x.shape))
        return x_prev, x0

    def _euler(self, predict: Callable[[Tensor, Tensor], Tensor], x: Tensor, steps: int, start: float = 1.0,
               self_cond: dict[str, Any] | None = None,
               denoised_fn: Callable[[Tensor, Tensor], Tensor] | None = None) -> Tensor:
        """Rectified flow: integrate dx/ds = v(x, s) from s = start (1: noise) to s = 0 (data) in ``steps``;
        ``self_cond`` (the model kwargs, for a self-conditioned model) gets each step's x0 estimate,
        ``denoised_fn`` changes it (v is then (x - x0) / s)."""
        B = x.shape[0]
        s_grid = torch.linspace(start, 0.0, steps + 1, dtype=torch.float64).tolist()
        for s_now, s_next in zip(s_grid[:-1], s_grid[1:]):
            s = torch.full((B,), s_now, dtype=torch.float32, device=x.device)
            t = self.model_timesteps(s)
            v = predict(x, t).float()
            x0 = x - s_now * v
            if denoised_fn is not None:
                x0 = denoised_fn(x0, t)
                v = (x - x0) / s_now
            if self_cond is not None:
                self_cond["x_self_cond"] = x0
            x = x + (s_next - s_now) * v
        return x


@torch.no_grad()
def measure_latent_scale(latents: Tensor, mask: Tensor | None = None) -> float:
    """``1 / std`` of data latents [B, N, D] (valid tokens only with a mask [B, N] bool).

    The statistics are summed over every rank when torch.distributed is initialised, so all ranks
    get the same scale.
    """
    x = latents.detach().double()
    if mask is None:
        mask = torch.ones(x.shape[:-1], dtype=torch.bool, device=x.device)
    m = mask.to(x.dtype)[..., None].expand_as(x)
    stats = torch.stack([m.sum(), (x * m).sum(), (x * x * m).sum()])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(stats)
    count, total, total_sq = stats.tolist()
    if count < 2:
        raise ValueError("measure_latent_scale: needs at least 2 valid latent values")
    var = (total_sq - total * total / count) / (count - 1)
    if not var > 0:
        raise ValueError("measure_latent_scale: the latents have zero variance")
    return 1.0 / math.sqrt(var)
