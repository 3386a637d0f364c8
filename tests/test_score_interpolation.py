"""Score interpolation over the codebook (multimodal/score_interpolation.py): the trunk's logits over the
codes, seen by the samplers as an ordinary denoiser, trained by cross-entropy."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from multimodal import Backbone, DiffusionTransformer, GaussianDiffusion
from multimodal.score_interpolation import CodeDenoiser
from tasks import GenerationHead, MultiTaskModule

K, D = 12, 4


def _denoiser(diffusion: GaussianDiffusion | None = None, **trunk_kw) -> tuple[CodeDenoiser, torch.Tensor]:
    torch.manual_seed(0)
    trunk = DiffusionTransformer(in_dim=D, preset="tiny", patch_size=2, num_classes=3, out_dim=K, **trunk_kw)
    book = torch.randn(K, D)
    diffusion = diffusion or GaussianDiffusion(prediction="v")
    diffusion.latent_scale.fill_(0.7)
    return CodeDenoiser(trunk, diffusion, book), book


def _random_trunk(trunk: DiffusionTransformer) -> None:
    """Non-zero final layers: an untrained trunk's zero-initialised output would hide every mix-up; eval
    mode: no condition dropout, so two calls agree."""
    trunk.eval()
    with torch.no_grad():
        for p in trunk.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.1)


@pytest.mark.parametrize("settings", [dict(prediction="v"), dict(prediction="eps"), dict(objective="flow")],
                         ids=["v", "eps", "flow"])
def test_the_samplers_see_the_expected_code(settings: dict) -> None:
    """Whatever the process predicts (eps, v, flow velocity), turning the denoiser's output back into
    an x0 estimate gives sum_k softmax(logits)_k e_k (normalised codes)."""
    den, book = _denoiser(GaussianDiffusion(**settings))
    _random_trunk(den.trunk)
    diffusion = den.diffusion
    x = torch.randn(3, 16, D)
    kw = dict(modality="image", grid=(4, 4), y=torch.tensor([0, 1, 2]))
    t = torch.tensor([100, 500, 900]) if diffusion.objective == "diffusion" else torch.tensor([100.0, 500.0, 900.0])
    out = den(x, t, **kw)
    expected = torch.softmax(_evidence(x, t, book * 0.7, diffusion) + den.trunk(x, t, **kw), dim=-1) @ (book * 0.7)
    if diffusion.objective == "flow":  # x_s = (1 - s) x0 + s eps, velocity eps - x0: x0 = x_s - s v
        x0 = x - (t / 1000.0)[:, None, None] * out
    else:
        x0, _ = diffusion.split_prediction(x, t, out)
    torch.testing.assert_close(x0, expected, atol=1e-4, rtol=1e-4)


def _evidence(x: torch.Tensor, t: torch.Tensor, codes: torch.Tensor, diffusion: GaussianDiffusion) -> torch.Tensor:
    """log N(x; a e_k, b^2 I) for every code, by brute force (the constant in k dropped by the softmax)."""
    if diffusion.objective == "flow":
        s = t.float() / 1000.0
        a, b = 1 - s, s
    else:
        abar = diffusion.alphas_cumprod[t.long()]
        a, b = abar.sqrt(), (1 - abar).sqrt()
    diff = x[:, :, None, :] - a[:, None, None, None] * codes  # [B, N, K, D]
    return -diff.square().sum(-1) / (2 * b[:, None, None] ** 2)


def test_an_untrained_trunk_denoises_each_token_by_its_own_evidence() -> None:
    """Zero trunk logits: x0_hat is the exact posterior mean of a token drawn uniformly from the codebook
    and noised, sharp at low noise (the true code back) and the mean code at the end of the range."""
    den, book = _denoiser()
    codes = torch.randint(0, K, (2, 16))
    x0 = book[codes] * 0.7
    kw = dict(modality="image", grid=(4, 4), y=torch.tensor([0, 1]))
    for t_value, close_to in ((5, x0), (999, (book * 0.7).mean(0).expand_as(x0))):
        t = torch.full((2,), t_value)
        x = den.diffusion.q_sample(x0, t)
        x0_hat, _ = den.diffusion.split_prediction(x, t, den(x, t, **kw))
        posterior = torch.softmax(_evidence(x, t, book * 0.7, den.diffusion), dim=-1) @ (book * 0.7)
        torch.testing.assert_close(x0_hat, posterior, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(x0_hat, close_to, atol=0.05, rtol=0.0)


def test_guidance_mixes_the_logits_of_both_halves() -> None:
    den, book = _denoiser(text_vocab_size=20)
    _random_trunk(den.trunk)
    x, t = torch.randn(2, 16, D), torch.tensor([300, 700])
    ids, mask = torch.randint(0, 20, (2, 5)), torch.ones(2, 5, dtype=torch.bool)
    kw = dict(modality="image", grid=(4, 4))
    cond = den.trunk(x, t, cond_ids=ids, cond_mask=mask, **kw)
    null = den.trunk(x, t, cond_ids=ids, cond_mask=torch.zeros_like(mask), **kw)
    expected = torch.softmax(_evidence(x, t, book * 0.7, den.diffusion) + null + 3.0 * (cond - null), dim=-1) @ (book * 0.7)
    x0, _ = den.diffusion.split_prediction(x, t, den.forward_with_cfg(x, t, guidance=3.0, cond_ids=ids, cond_mask=mask, **kw))
    torch.testing.assert_close(x0, expected, atol=1e-4, rtol=1e-4)


def test_cross_entropy_learns_the_codes_the_condition_names() -> None:
    """From pure noise (t = 999) a token's own evidence says nothing (loss ln K at initialisation); a
    few steps on a fixed picture per class teach the trunk to name every code from the class alone."""
    den, book = _denoiser()
    codes = torch.randint(0, K, (3, 16))  # one fixed 4 x 4 picture per class
    y = torch.tensor([0, 1, 2])
    t = torch.full((3,), 999)
    loss, logs = den.loss(book[codes], t=t, modality="image", grid=(4, 4), y=y)
    assert abs(loss.item() - math.log(K)) < 0.05
    assert {"loss", "loss_q0", "loss_q3", "code_acc"} <= set(logs)
    opt = torch.optim.Adam(den.trunk.parameters(), lr=3e-3)
    for _ in range(80):
        opt.zero_grad()
        loss, logs = den.loss(book[codes], t=t, modality="image", grid=(4, 4), y=y)
        loss.backward()
        opt.step()
    assert loss.item() < 0.3 * math.log(K) and float(logs["code_acc"]) > 0.8


def test_the_codes_are_read_back_exactly_and_padding_is_left_out() -> None:
    den, book = _denoiser()
    codes = torch.randint(0, K, (2, 16))
    assert torch.equal(den.codes_of(book[codes]), codes)
    trunk = DiffusionTransformer(in_dim=D, preset="tiny", out_dim=K)  # audio: sequences may be padded
    den = CodeDenoiser(trunk, GaussianDiffusion(prediction="v"), book)
    _random_trunk(trunk)
    mask = torch.ones(2, 16, dtype=torch.bool)
    mask[1, 10:] = False
    x0 = book[codes]
    t, noise = torch.tensor([400, 400]), torch.randn(2, 16, D)
    a, _ = den.loss(x0, x_mask=mask, t=t, noise=noise, modality="audio")
    x0[1, 10:] = book[0]  # what the padding holds does not matter
    b, _ = den.loss(x0, x_mask=mask, t=t, noise=noise, modality="audio")
    torch.testing.assert_close(a, b)


def test_a_trunk_without_code_logits_is_refused(tokenizer_run: Path) -> None:
    book = torch.randn(K, D)
    with pytest.raises(ValueError, match=f"out_dim to {K} \\(it is {D}\\)"):
        CodeDenoiser(DiffusionTransformer(in_dim=D, preset="tiny"), GaussianDiffusion(), book)
    with pytest.raises(ValueError, match="target must be one of"):
        GenerationHead("image", "label", num_classes=3, target="logits")
    # the head names the setting against the tokenizer's codebook (the tiny tokenizer: 16-dim, 64 codes)
    backbone = lambda **kw: Backbone(tokenizer_ckpt=str(tokenizer_run),  # noqa: E731
                                     trunk=DiffusionTransformer(in_dim=16, preset="tiny", num_classes=3, **kw))
    with pytest.raises(ValueError, match="set model.backbone.trunk.init_args.out_dim to 64 \\(it is 16\\)"):
        MultiTaskModule(backbone(), {"gen": GenerationHead("image", "label", num_classes=3, target="codes")})
    with pytest.raises(ValueError, match="out_dim=64 must equal its in_dim=16"):
        MultiTaskModule(backbone(out_dim=64), {"gen": GenerationHead("image", "label", num_classes=3)})
    with pytest.raises(ValueError, match="target 'codes' does not self-condition"):
        MultiTaskModule(backbone(out_dim=64, self_condition=True),
                        {"gen": GenerationHead("image", "label", num_classes=3, target="codes")})


def test_the_head_trains_and_samples_through_the_codes(shard_dir: Path, tokenizer_run: Path, tmp_path: Path) -> None:
    """GenerationHead(target='codes') through the one training loop: the cross-entropy and code accuracy
    are logged, evaluation samples, and sampling is seeded and decodes to images in [-1, 1]."""
    import lightning as L

    from datamodules import WebDataModule

    trunk = DiffusionTransformer(in_dim=16, preset="tiny", patch_size=2, num_classes=3, out_dim=64)
    backbone = Backbone(tokenizer_ckpt=str(tokenizer_run), trunk=trunk)
    head = GenerationHead("image", "label", num_classes=3, target="codes", sample_steps=3, eval_samples=4,
                          eval_batch=4, num_media=2)
    model = MultiTaskModule(backbone, {"gen": head}, warmup_steps=1)
    trainer = L.Trainer(default_root_dir=tmp_path, logger=False, max_steps=3, limit_val_batches=1,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(model, WebDataModule(root=str(shard_dir), keys=["image", "label"], batch_size=4, samples_per_epoch=12))
    m = trainer.callback_metrics
    assert 0.0 <= float(m["train/gen/diffusion/code_acc"]) <= 1.0 and float(m["train/gen/diffusion/loss"]) > 0
    assert 0.0 <= float(m["val/gen/gen_acc"]) <= 1.0
    y = torch.tensor([0, 1, 2])
    a, _ = head.generate(backbone, y=y, generator=torch.Generator().manual_seed(3))
    b, _ = head.generate(backbone, y=y, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == (3, 3, 32, 32) and a.min() >= -1 and a.max() <= 1
