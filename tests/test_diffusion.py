"""GaussianDiffusion: schedules, forward process, parameterisations, samplers, training a tiny trunk."""

from __future__ import annotations

import math

import pytest
import torch

from multimodal.diffusion import GaussianDiffusion
from multimodal.dit import DiffusionTransformer


def test_schedules_monotone() -> None:
    for schedule in ("linear", "cosine"):
        for T in (1000, 100):
            diff = GaussianDiffusion(T, schedule)
            abar = diff.alphas_cumprod.double()
            assert abar.shape == (T,)
            assert ((diff.betas > 0) & (diff.betas <= 0.999)).all()
            assert (abar[1:] < abar[:-1]).all() and abar[0] > 0.99
            assert abar[-1] < 1e-3
    assert GaussianDiffusion(1000, "cosine").alphas_cumprod[-1] < 1e-6  # cosine: abar_T ~ 0
    linear = GaussianDiffusion(1000, "linear")
    assert math.isclose(linear.betas[0].item(), 1e-4, rel_tol=1e-5)
    assert math.isclose(linear.betas[-1].item(), 0.02, rel_tol=1e-5)


def test_q_sample_statistics() -> None:
    torch.manual_seed(0)
    diff = GaussianDiffusion(1000, "cosine")
    x0 = torch.full((20000, 4), 2.0)
    for step in (0, 300, 999):
        t = torch.full((20000,), step)
        x_t = diff.q_sample(x0, t)
        a = diff.alphas_cumprod[step].item()
        assert abs(x_t.mean().item() - 2.0 * math.sqrt(a)) < 0.02
        assert abs(x_t.std().item() - math.sqrt(1 - a)) < 0.02 + 0.02 * math.sqrt(1 - a)
    flow = GaussianDiffusion(objective="flow")
    x_s = flow.q_sample(x0, torch.full((20000,), 0.25))
    assert abs(x_s.mean().item() - 1.5) < 0.02 and abs(x_s.std().item() - 0.25) < 0.01


def test_v_parameterisation_algebra() -> None:
    torch.manual_seed(0)
    diff = GaussianDiffusion(1000, "linear", prediction="v")
    x0, eps = torch.randn(5, 3, 4), torch.randn(5, 3, 4)
    t = torch.tensor([0, 10, 500, 900, 999])
    x_t = diff.q_sample(x0, t, eps)
    v = diff.v_target(x0, eps, t)
    a = diff.sqrt_alphas_cumprod[t][:, None, None]
    b = diff.sqrt_one_minus_alphas_cumprod[t][:, None, None]
    torch.testing.assert_close(v, a * eps - b * x0)
    x0_hat, eps_hat = diff.split_prediction(x_t, t, v)
    torch.testing.assert_close(x0_hat, x0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(eps_hat, eps, atol=1e-5, rtol=1e-5)
    eps_diff = GaussianDiffusion(1000, "linear", prediction="eps")
    x0_hat, eps_hat = eps_diff.split_prediction(x_t, t[:], eps)
    torch.testing.assert_close(x0_hat[1:], x0[1:], atol=1e-4, rtol=1e-4)


def point_oracle(diff: GaussianDiffusion, x0: torch.Tensor):
    """The exact model for data that is the single point x0 (normalised space)."""

    def model_fn(x, t, **kwargs):
        if diff.objective == "flow":
            s = (t.float() / diff.num_timesteps)[:, None, None]
            return (x - x0) / s  # eps - x0 with eps = (x - (1 - s) x0) / s
        a = diff.sqrt_alphas_cumprod[t][:, None, None]
        b = diff.sqrt_one_minus_alphas_cumprod[t][:, None, None]
        eps = (x - a * x0) / b
        return a * eps - b * x0 if diff.prediction == "v" else eps

    return model_fn


@pytest.mark.parametrize("kind", ["eps", "v", "flow"])
def test_oracle_recovers_point(kind: str) -> None:
    diff = GaussianDiffusion(objective="flow") if kind == "flow" else GaussianDiffusion(prediction=kind)
    x0 = torch.randn(1, 6, 4).expand(3, -1, -1)
    out = diff.sample(point_oracle(diff, x0), (3, 6, 4), steps=20, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=1e-4)


def gaussian_oracle(diff: GaussianDiffusion, mu: float, sigma: float):
    """The exact model (posterior mean) for data x0 ~ N(mu, sigma^2 I)."""

    def model_fn(x, t, **kwargs):
        if diff.objective == "flow":
            s = (t.float() / diff.num_timesteps)[:, None, None]
            a, b = 1 - s, s
        else:
            a = diff.sqrt_alphas_cumprod[t][:, None, None]
            b = diff.sqrt_one_minus_alphas_cumprod[t][:, None, None]
        x0 = mu + a * sigma**2 / (a**2 * sigma**2 + b**2) * (x - a * mu)
        eps = (x - a * x0) / b
        if diff.objective == "flow":
            return eps - x0
        return a * eps - b * x0 if diff.prediction == "v" else eps

    return model_fn


@pytest.mark.parametrize(
    "kind, sampler, eta",
    [("eps", "ddim", 0.0), ("eps", "ddim", 1.0), ("v", "ddim", 0.0), ("eps", "ddpm", 0.0), ("flow", "euler", 0.0)],
)
def test_samplers_reach_the_data_distribution(kind: str, sampler: str, eta: float) -> None:
    """With the exact posterior-mean model of Gaussian data, samples have the data's mean and std.

    (The discretisation error shrinks with the step count: at 50 steps ancestral sampling gives a std
    ~7 % low, DDIM ~3 % low; at 250 steps both are within 1 %.)"""
    diff = GaussianDiffusion(objective="flow") if kind == "flow" else GaussianDiffusion(1000, "cosine", kind)
    mu, sigma = 1.5, 0.5
    out = diff.sample(gaussian_oracle(diff, mu, sigma), (2048, 4, 4), steps=250, sampler=sampler, eta=eta,
                      generator=torch.Generator().manual_seed(0))
    assert abs(out.mean().item() - mu) < 0.02
    assert abs(out.std().item() - sigma) < 0.015


def test_ddpm_equals_ddim_eta_one() -> None:
    diff = GaussianDiffusion(1000, "linear")
    model = gaussian_oracle(diff, 0.5, 0.7)
    a = diff.sample(model, (8, 3, 4), steps=25, sampler="ddpm", generator=torch.Generator().manual_seed(3))
    b = diff.sample(model, (8, 3, 4), steps=25, sampler="ddim", eta=1.0, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_training_loss_masks_padding() -> None:
    torch.manual_seed(0)
    for diff in (GaussianDiffusion(prediction="v"), GaussianDiffusion(objective="flow")):
        x0 = torch.randn(2, 5, 3)
        mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)
        noise = torch.randn_like(x0)
        t = torch.tensor([10, 700]) if diff.objective == "diffusion" else torch.tensor([0.1, 0.7])
        target = diff.v_target(x0, noise, t) if diff.objective == "diffusion" else noise - x0
        seen = {}

        def model_fn(x, tt, x_mask=None, target=target, seen=seen):
            seen["t"], seen["mask"] = tt, x_mask
            return torch.where(x_mask[..., None], target + 0.5, torch.full_like(target, 1e3))

        loss, logs = diff.training_loss(model_fn, x0, x_mask=mask, t=t, noise=noise)
        assert math.isclose(loss.item(), 0.25, rel_tol=1e-5)  # padded tokens (error 1e3) are ignored
        assert seen["mask"] is mask
        expected_t = t * 1000 if diff.objective == "flow" else t
        torch.testing.assert_close(seen["t"], expected_t)
        assert set(logs) == {"loss", "loss_q0", "loss_q1", "loss_q2", "loss_q3"}


def test_training_loss_weights_tokens() -> None:
    diff = GaussianDiffusion(prediction="v")
    x0, noise, t = torch.randn(2, 4, 3), torch.randn(2, 4, 3), torch.tensor([10, 700])
    target = diff.v_target(diff.normalize(x0), noise, t)
    offsets = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 1.0, 1.0]])  # error a token: offset^2

    def model_fn(x, tt):
        return target + offsets[..., None]

    weight = torch.tensor([[1.0, 1.0, 1.0, 5.0], [1.0, 3.0, 1.0, 1.0]])
    loss, _ = diff.training_loss(model_fn, x0, t=t, noise=noise, loss_weight=weight)
    expected = (weight * offsets.square()).sum() / weight.sum()  # a weighted mean over the tokens
    assert math.isclose(loss.item(), expected.item(), rel_tol=1e-5)
    plain, _ = diff.training_loss(model_fn, x0, t=t, noise=noise)
    assert math.isclose(plain.item(), offsets.square().mean().item(), rel_tol=1e-5)


def test_latent_scale_travels_in_state_dict() -> None:
    torch.manual_seed(0)
    diff = GaussianDiffusion()
    latents = 4.0 * torch.randn(64, 16, 8) + 1.0
    scale = diff.set_latent_scale_from(latents)
    assert math.isclose(scale, 0.25, rel_tol=0.02)
    assert abs(diff.normalize(latents).std().item() - 1.0) < 0.01
    torch.testing.assert_close(diff.unnormalize(diff.normalize(latents)), latents)
    state = diff.state_dict()
    assert set(state) == {"latent_scale"}
    fresh = GaussianDiffusion()
    fresh.load_state_dict(state)
    assert fresh.latent_scale.item() == diff.latent_scale.item()
    # masked statistics ignore padding
    mask = torch.zeros(64, 16, dtype=torch.bool)
    mask[:, :8] = True
    padded = torch.where(mask[..., None], latents, torch.full_like(latents, 1e4))
    assert math.isclose(diff.set_latent_scale_from(padded, mask), scale, rel_tol=0.05)


def test_sample_returns_unnormalised_latents() -> None:
    diff = GaussianDiffusion(latent_scale=0.5)
    x0 = torch.randn(1, 4, 2)  # the oracle's point lives in normalised space
    out = diff.sample(point_oracle(diff, x0), (1, 4, 2), steps=10)
    torch.testing.assert_close(out, x0 / 0.5, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- with the trunk

CENTERS = torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0], [-2.0, -2.0, 0.0, 0.0], [0.0, 0.0, 2.0, -2.0]])


def toy_batch(batch: int, tokens: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Every token is one of 4 fixed vectors; the label is the first token's vector."""
    pick = torch.randint(0, 4, (batch, tokens))
    return CENTERS[pick], pick[:, 0]


def nearest_distance(x: torch.Tensor) -> float:
    return torch.cdist(x.reshape(-1, 4), CENTERS).min(dim=1).values.mean().item()


@pytest.fixture
def one_thread():
    """Tiny models are dominated by per-op overhead; extra threads only add contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train_tiny(diff: GaussianDiffusion, steps: int) -> DiffusionTransformer:
    torch.manual_seed(0)
    model = DiffusionTransformer(in_dim=4, preset="tiny", num_classes=4)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        x0, y = toy_batch(64)
        loss, _ = diff.training_loss(model, x0, modality="audio", y=y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize(
    "kind, schedule, steps",
    [("eps", "linear", 400), ("v", "cosine", 250), ("flow", None, 250)],
)
def test_tiny_trunk_learns_toy_data(kind: str, schedule: str | None, steps: int, one_thread: None) -> None:
    """A tiny trunk trained for a few hundred steps samples tokens near the 4 data vectors."""
    diff = GaussianDiffusion(objective="flow") if kind == "flow" else GaussianDiffusion(1000, schedule, kind)
    model = train_tiny(diff, steps)
    y = torch.arange(4).repeat(64)
    gen = torch.Generator().manual_seed(0)
    samples = diff.sample(model, (256, 4, 4), steps=20, generator=gen, modality="audio", y=y)
    noise_distance = nearest_distance(torch.randn(256, 4, 4, generator=gen))
    assert nearest_distance(samples) < 0.25 * noise_distance, (nearest_distance(samples), noise_distance)
    # with guidance, the first token (which the label names) lands on its class's vector
    guided = diff.sample(model, (256, 4, 4), steps=20, guidance=3.0, generator=gen, modality="audio", y=y)
    hit = (torch.cdist(guided[:, 0], CENTERS).argmin(dim=1) == y).float().mean().item()
    assert hit > 0.9, hit


@pytest.mark.parametrize("objective", ["diffusion", "flow"])
def test_guidance_interval_guides_only_its_steps(objective: str) -> None:
    diff = GaussianDiffusion(objective=objective)
    calls: list[tuple[str, float]] = []

    class Model:
        def __call__(self, x, t, **kw):
            calls.append(("cond", float(t[0]) / diff.num_timesteps))
            return torch.zeros_like(x)

        def forward_with_cfg(self, x, t, guidance, **kw):
            calls.append(("cfg", float(t[0]) / diff.num_timesteps))
            return torch.zeros_like(x)

    diff.sample(Model(), (2, 3, 4), steps=10, guidance=3.0, guidance_interval=(0.3, 0.7))
    assert len(calls) == 10 and {kind for kind, _ in calls} == {"cond", "cfg"}
    assert all((kind == "cfg") == (0.3 <= frac <= 0.7) for kind, frac in calls)
    calls.clear()
    diff.sample(Model(), (2, 3, 4), steps=10, guidance=3.0)  # the default interval: every step guided
    assert [kind for kind, _ in calls] == ["cfg"] * 10
    for bad in ((0.5, 0.5), (-0.1, 0.5), (0.2, 1.5)):
        with pytest.raises(ValueError, match="guidance_interval"):
            diff.sample(Model(), (2, 3, 4), steps=2, guidance=3.0, guidance_interval=bad)


def test_seed_and_guidance_semantics() -> None:
    torch.manual_seed(0)
    model = DiffusionTransformer(in_dim=4, preset="tiny", num_classes=3).eval()
    with torch.no_grad():
        for p in model.parameters():  # leave adaLN-Zero so the output is not trivially zero
            p.add_(0.05 * torch.randn_like(p))
    diff = GaussianDiffusion(1000, "linear")
    y = torch.tensor([0, 1, 2, 0])
    kw = {"modality": "audio", "y": y}

    def run(seed: int, guidance: float, fn=model) -> torch.Tensor:
        return diff.sample(fn, (4, 5, 4), steps=8, eta=0.5, guidance=guidance,
                           generator=torch.Generator().manual_seed(seed), **kw)

    assert torch.equal(run(0, 2.0), run(0, 2.0))
    assert not torch.allclose(run(0, 2.0), run(1, 2.0))
    # guidance 1 is the plain conditional model
    torch.testing.assert_close(run(0, 1.0), run(0, 1.0, fn=lambda x, t, **k: model(x, t, **k)))
    # guidance 2 equals two separate calls combined by hand

    def two_calls(x, t, modality, y):
        cond, uncond = model(x, t, modality, y=y), model(x, t, modality, y=None)
        return uncond + 2.0 * (cond - uncond)

    torch.testing.assert_close(run(0, 2.0), run(0, 1.0, fn=two_calls), atol=1e-4, rtol=1e-4)


def test_invalid_arguments() -> None:
    diff = GaussianDiffusion(100)

    def fn(x, t, **kwargs):
        return torch.zeros_like(x)

    for steps in (0, -3, 2.5):
        with pytest.raises(ValueError, match="steps"):
            diff.sample(fn, (1, 2, 3), steps=steps)
    with pytest.raises(ValueError, match="steps=101"):
        diff.sample(fn, (1, 2, 3), steps=101)
    with pytest.raises(ValueError, match="guidance"):
        diff.sample(fn, (1, 2, 3), guidance=-1.0)
    with pytest.raises(ValueError, match="forward_with_cfg"):
        diff.sample(fn, (1, 2, 3), guidance=2.0)
    with pytest.raises(ValueError, match="sampler"):
        diff.sample(fn, (1, 2, 3), sampler="euler")
    with pytest.raises(ValueError, match="eta"):
        diff.sample(fn, (1, 2, 3), eta=-0.1)
    with pytest.raises(ValueError, match="start must be in"):
        diff.sample(fn, (1, 2, 3), x_start=torch.zeros(1, 2, 3), start=0.0)
    with pytest.raises(ValueError, match="pass x_start"):
        diff.sample(fn, (1, 2, 3), start=0.5)
    with pytest.raises(ValueError, match=r"x_start has shape \(1, 2, 2\)"):
        diff.sample(fn, (1, 2, 3), x_start=torch.zeros(1, 2, 2), start=0.5)
    with pytest.raises(ValueError, match="exceeds the 11 timesteps"):
        diff.sample(fn, (1, 2, 3), x_start=torch.zeros(1, 2, 3), start=0.1, steps=20)
    with pytest.raises(ValueError, match="schedule"):
        GaussianDiffusion(schedule="sqrt")
    with pytest.raises(ValueError, match="prediction"):
        GaussianDiffusion(prediction="x0")
    with pytest.raises(ValueError, match="prediction"):
        GaussianDiffusion(prediction="eps", objective="flow")
    with pytest.raises(ValueError, match="objective"):
        GaussianDiffusion(objective="edm")
    with pytest.raises(ValueError, match="num_timesteps"):
        GaussianDiffusion(0)
    with pytest.raises(ValueError, match="timesteps must be one of"):
        GaussianDiffusion(timesteps="lognormal")
    with pytest.raises(ValueError, match="timestep_scale"):
        GaussianDiffusion(timesteps="logit_normal", timestep_scale=0.0)


def test_clip_denoised_bounds_the_x0_estimate() -> None:
    diff = GaussianDiffusion(1000, "cosine")  # abar_T ~ 0: x0 = (x - b eps) / a explodes for a poor eps

    def poor(x, t, **kwargs):
        return 0.5 * x

    gen = torch.Generator().manual_seed(0)
    wild = diff.sample(poor, (4, 3, 2), steps=10, generator=gen)
    tame = diff.sample(poor, (4, 3, 2), steps=10, generator=gen, clip_denoised=3.0)
    assert wild.abs().max() > 100 and tame.abs().max() <= 3.0 + 1e-5
    with pytest.raises(ValueError, match="clip_denoised"):
        diff.sample(poor, (1, 2, 3), clip_denoised=0.0)


@pytest.mark.parametrize("kind", ["v", "flow"])
def test_sdedit_keeps_what_little_noise_leaves(kind: str) -> None:
    """SDEdit with the exact model of N(0, 1) data: from a little noise the sample comes back close to
    where it started; from pure noise (start = 1) it forgets it (a fresh draw, uncorrelated with it)."""
    diff = GaussianDiffusion(objective="flow") if kind == "flow" else GaussianDiffusion(prediction="v")
    model = gaussian_oracle(diff, 0.0, 1.0)
    x_start = torch.randn(512, 4, 4, generator=torch.Generator().manual_seed(1))

    def run(start: float) -> torch.Tensor:
        return diff.sample(model, tuple(x_start.shape), steps=50, x_start=x_start, start=start,
                           generator=torch.Generator().manual_seed(2))

    near, far = run(0.05), run(1.0)
    corr = lambda a: torch.corrcoef(torch.stack([a.flatten(), x_start.flatten()]))[0, 1]  # noqa: E731
    assert corr(near) > 0.95, corr(near)
    assert abs(corr(far)) < 0.05, corr(far)
    assert 0.9 < float(near.std()) < 1.1  # still a sample of the data distribution


class SelfConditionSpy:
    """A model that takes ``x_self_cond`` (as a self-conditioned trunk does) and records every call;
    it answers with the point oracle, so sampling still recovers the point."""

    self_condition = True

    def __init__(self, diff: GaussianDiffusion, x0: torch.Tensor, training: bool = False) -> None:
        self.oracle, self.training = point_oracle(diff, x0), training
        self.calls: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, bool]] = []

    def __call__(self, x, t, x_self_cond=None, **kwargs):
        out = self.oracle(x, t)
        self.calls.append((x.clone(), None if x_self_cond is None else x_self_cond.clone(), out.clone(),
                           torch.is_grad_enabled()))
        return out


@pytest.mark.parametrize("kind, sampler", [("eps", "ddim"), ("v", "ddim"), ("v", "ddpm"), ("flow", "euler")])
def test_samplers_hand_each_step_the_previous_x0_estimate(kind: str, sampler: str) -> None:
    diff = GaussianDiffusion(objective="flow") if kind == "flow" else GaussianDiffusion(prediction=kind)
    x0 = torch.randn(1, 6, 4).expand(3, -1, -1)
    spy = SelfConditionSpy(diff, x0)
    out = diff.sample(spy, (3, 6, 4), steps=10, sampler=sampler, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=1e-4)
    assert len(spy.calls) == 10 and spy.calls[0][1] is None  # the first step has no estimate yet
    for (x, _, prev_out, _), (_, given, _, _), t in zip(spy.calls, spy.calls[1:], _model_times(diff, 10)):
        torch.testing.assert_close(given, diff.x0_from_output(x, t, prev_out))
        torch.testing.assert_close(given, x0, atol=1e-3, rtol=1e-3)  # the oracle's estimate is the point


def _model_times(diff: GaussianDiffusion, steps: int) -> list[torch.Tensor]:
    if diff.objective == "flow":
        return [torch.full((3,), s * diff.num_timesteps) for s in torch.linspace(1.0, 0.0, steps + 1).tolist()[:-1]]
    return [torch.full((3,), t, dtype=torch.long) for t in diff.respaced_timesteps(steps)]


@pytest.mark.parametrize("kind", ["eps", "v", "flow"])
def test_training_self_conditions_with_a_no_grad_estimate(kind: str) -> None:
    diff = GaussianDiffusion(objective="flow") if kind == "flow" else GaussianDiffusion(prediction=kind)
    x0 = torch.randn(4, 6, 4)
    t = torch.rand(4) * 0.9 + 0.05 if kind == "flow" else torch.randint(50, 950, (4,))
    for prob, training, passes in ((1.0, True, 2), (0.0, True, 1), (0.0, False, 2)):
        diff.self_condition_prob = prob
        spy = SelfConditionSpy(diff, x0, training=training)
        with torch.enable_grad():
            diff.training_loss(spy, x0, t=t)
        assert len(spy.calls) == passes, (prob, training)
        if passes == 2:  # a no-grad first pass, then the loss's pass given its x0 estimate
            (x, none, first, grad0), (x_again, given, _, grad1) = spy.calls
            assert none is None and not grad0 and grad1
            torch.testing.assert_close(x_again, x)
            torch.testing.assert_close(given, diff.x0_from_output(x, diff.model_timesteps(t), first))
            torch.testing.assert_close(given, x0, atol=1e-3, rtol=1e-3)
        else:
            assert spy.calls[0][1] is None
    with pytest.raises(ValueError, match="self_condition_prob"):
        GaussianDiffusion(self_condition_prob=1.5)


def test_self_conditioned_trunk_trains_and_samples() -> None:
    torch.manual_seed(0)
    diff = GaussianDiffusion(prediction="v")
    trunk = DiffusionTransformer(in_dim=4, preset="tiny", patch_size=2, num_classes=3, self_condition=True)
    x0, y = torch.randn(2, 16, 4), torch.tensor([0, 2])
    diff.self_condition_prob = 1.0
    loss, _ = diff.training_loss(trunk, x0, modality="image", y=y)
    loss.backward()
    assert not trunk.self_cond_embedder.weight.grad.any()  # zero final layer: no gradient reaches the inputs yet
    trunk.final_layer.linear.weight.data.normal_(std=0.02)
    trunk.zero_grad()
    diff.training_loss(trunk, x0, modality="image", y=y)[0].backward()
    assert trunk.self_cond_embedder.weight.grad.abs().sum() > 0
    trunk.eval()
    out = diff.sample(trunk, (2, 16, 4), steps=3, guidance=2.0, modality="image", y=y,
                      generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 16, 4) and torch.isfinite(out).all()


@pytest.mark.parametrize("kind, sampler", [("v", "ddim"), ("eps", "ddpm"), ("flow", "euler")])
def test_denoised_fn_acts_on_every_x0_estimate(kind: str, sampler: str) -> None:
    diff = GaussianDiffusion(objective="flow") if kind == "flow" else GaussianDiffusion(prediction=kind)
    model = gaussian_oracle(diff, 0.5, 0.7)
    run = lambda fn: diff.sample(model, (4, 3, 2), steps=8, sampler=sampler, denoised_fn=fn,  # noqa: E731
                                 generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(run(lambda x0, t: x0), run(None))  # the identity changes nothing
    seen = []

    def to_constant(x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen.append(t.clone())
        return torch.full_like(x0, 2.0)

    torch.testing.assert_close(run(to_constant), torch.full((4, 3, 2), 2.0))  # the last estimate is the sample
    assert len(seen) == 8 and all(t.shape == (4,) for t in seen)
    assert seen[0].float().mean() > seen[-1].float().mean()  # noisiest first
    spy = SelfConditionSpy(diff, torch.zeros(1, 3, 2))  # a self-conditioned model is handed the changed estimate
    diff.sample(spy, (4, 3, 2), steps=4, sampler=sampler, denoised_fn=to_constant)
    assert all(torch.equal(given, torch.full((4, 3, 2), 2.0)) for _, given, _, _ in spy.calls[1:])


@pytest.mark.parametrize("objective", ["diffusion", "flow"])
def test_logit_normal_timesteps_follow_their_location(objective: str) -> None:
    """``logit_normal`` times: in range, their median at sigmoid(loc) of the range, and more of them in the
    middle than uniform ones; ``uniform`` stays flat."""
    torch.manual_seed(0)
    n, T = 40_000, 1000
    for loc in (0.0, 1.0):
        diff = GaussianDiffusion(T, objective=objective, timesteps="logit_normal", timestep_loc=loc)
        frac = diff.time_fraction(diff.sample_timesteps(n, "cpu"))
        assert 0.0 <= float(frac.min()) and float(frac.max()) < 1.0
        assert abs(float(frac.median()) - 1.0 / (1.0 + math.exp(-loc))) < 0.01
        if objective == "diffusion":
            assert diff.sample_timesteps(8, "cpu").dtype == torch.long

    def middle_share(diff: GaussianDiffusion) -> float:
        f = diff.time_fraction(diff.sample_timesteps(n, "cpu"))
        return float(((f > 0.25) & (f < 0.75)).float().mean())

    middle = GaussianDiffusion(T, objective=objective, timesteps="logit_normal")
    assert middle_share(middle) > 0.6
    assert abs(middle_share(GaussianDiffusion(T, objective=objective)) - 0.5) < 0.02
    middle.eval()  # evaluation losses are comparable across training samplers: uniform times
    assert abs(middle_share(middle) - 0.5) < 0.02
