"""GPU paths: bf16 autocast, torch.compile and a bf16-mixed fit on CUDA. Skipped without CUDA
(conftest.py); run by scripts/gpu_check.sh where a GPU is at hand."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from multimodal import DiffusionTransformer, GaussianDiffusion
from multimodal.cli import main
from tests.tiny import write_tiny_config

pytestmark = pytest.mark.gpu


def test_dit_bf16_autocast_matches_fp32() -> None:
    torch.manual_seed(0)
    model = DiffusionTransformer(in_dim=16, preset="S", num_classes=10).cuda()
    for p in model.parameters():  # adaLN-Zero starts at zero: perturb so the blocks do something
        p.data.add_(torch.randn_like(p) * 0.02)
    x, t, y = torch.randn(4, 64, 16, device="cuda"), torch.randint(0, 1000, (4,), device="cuda"), torch.arange(4, device="cuda")
    with torch.no_grad():
        ref = model(x, t, "image", y=y, drop_condition=False)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x, t, "image", y=y, drop_condition=False)
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), ref, atol=5e-2, rtol=5e-2)


def test_dit_compiles_and_trains() -> None:
    torch.manual_seed(0)
    model = DiffusionTransformer(in_dim=16, preset="S", num_classes=10).cuda()
    diffusion = GaussianDiffusion(prediction="v").cuda()
    compiled = torch.compile(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x0 = torch.randn(8, 64, 16, device="cuda")
    for _ in range(3):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = diffusion.training_loss(compiled, x0, modality="image", y=torch.arange(8, device="cuda") % 10)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.isfinite(loss)


def test_multitask_fit_bf16_on_cuda(shard_dir: Path, tokenizer_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    path = write_tiny_config("multitask.yaml", shard_dir, run, tokenizer_run)
    main(["fit", "--config", str(path), "--trainer.accelerator=gpu", "--trainer.devices=1",
          "--trainer.precision=bf16-mixed"])
    assert next(run.rglob("last.ckpt")).is_file()
