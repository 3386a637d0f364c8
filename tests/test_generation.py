"""Stage 2: the generation head on a frozen tokenizer, through the one training loop and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.loggers import TensorBoardLogger

from datamodules import WebDataModule
from multimodal import Backbone, DiffusionTransformer, GaussianDiffusion
from multimodal.cli import main
from tasks import GenerationHead, MultiTaskModule
from tests.tiny import tiny_config

ROOT = Path(__file__).resolve().parents[1]


def _trunk(**kw) -> DiffusionTransformer:
    return DiffusionTransformer(in_dim=16, preset="tiny", **kw)


def test_generation_trains_on_frozen_tokenizer_and_evaluates(shard_dir: Path, tokenizer_run: Path, tmp_path: Path) -> None:
    backbone = Backbone(tokenizer_ckpt=str(tokenizer_run), trunk=_trunk(num_classes=3))
    codebook = backbone.quantizer.codebook.clone()
    enc = {k: v.clone() for k, v in backbone.codecs.state_dict().items()}
    head = GenerationHead("image", "label", num_classes=3, sample_steps=3, eval_samples=6, eval_batch=4, num_media=4)
    model = MultiTaskModule(backbone, {"gen": head}, warmup_steps=1)
    trainer = L.Trainer(default_root_dir=tmp_path, logger=TensorBoardLogger(tmp_path), max_steps=5, limit_val_batches=2,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=1)
    trainer.fit(model, WebDataModule(root=str(shard_dir), keys=["image", "label"], batch_size=4, samples_per_epoch=20))
    m = trainer.callback_metrics
    for key in ("train/gen/diffusion/loss", "train/gen/judge/loss", "val/gen/gen_acc", "val/gen/fid_cls",
                "val/gen/fid_cls_floor", "val/gen/judge_acc_real", "val/gen/diffusion_loss"):
        assert key in m, key
    assert 0.0 <= float(m["val/gen/gen_acc"]) <= 1.0 and torch.isfinite(m["val/gen/fid_cls"])
    assert bool(head.scale_measured) and float(head.diffusion.latent_scale) != 1.0  # measured on the data
    # the tokenizer stayed frozen: codebook and codec weights unchanged
    assert torch.equal(codebook, backbone.quantizer.codebook)
    assert all(torch.equal(enc[k], v) for k, v in backbone.codecs.state_dict().items())
    assert head.last_samples is not None and head.last_samples.shape[1:] == (3, 32, 32)
    # same seed, same samples
    g = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    y = torch.tensor([0, 1, 2])
    a, _ = head.generate(backbone, y=y, generator=g())
    b, _ = head.generate(backbone, y=y, generator=g())
    assert torch.equal(a, b) and a.shape == (3, 3, 32, 32) and a.min() >= -1 and a.max() <= 1


def test_audio_and_caption_conditioning(shard_dir: Path, tokenizer_run: Path, tmp_path: Path) -> None:
    backbone = Backbone(tokenizer_ckpt=str(tokenizer_run), trunk=_trunk(num_classes=3, text_vocab_size=64))
    heads = {
        "speech": GenerationHead("audio", "label", num_classes=3, audio_tokens=5, sample_steps=2, eval_samples=4),
        "caption": GenerationHead("image", "text", num_classes=3, sample_steps=2, eval_samples=4),
    }
    model = MultiTaskModule(backbone, heads, warmup_steps=1)
    from datamodules import MultiTaskDataModule

    data = MultiTaskDataModule({
        "speech": WebDataModule(root=str(shard_dir), keys=["audio", "label"], batch_size=4, samples_per_epoch=8, audio_max_seconds=0.3),
        "caption": WebDataModule(root=str(shard_dir), keys=["image", "text", "label"], batch_size=4, samples_per_epoch=8, vocab_size=40),
    })
    trainer = L.Trainer(default_root_dir=tmp_path, logger=False, max_steps=2, limit_val_batches=1, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(model, data)
    assert "val/speech/gen_acc" in trainer.callback_metrics and "val/caption/gen_acc" in trainer.callback_metrics
    wave, judged = heads["speech"].generate(backbone, y=torch.tensor([1, 2]))
    assert wave.shape[0] == 2 and wave.shape[1] == 5 * 4 * 160 and judged.shape[:2] == (2, 1)


def test_bad_generation_settings_fail_at_start(tokenizer_run: Path, shard_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="guidance must be >= 0"):
        GenerationHead("image", "label", num_classes=3, guidance=-1)
    with pytest.raises(ValueError, match="sample_steps must be >= 1"):
        GenerationHead("image", "label", num_classes=3, sample_steps=0)
    with pytest.raises(ValueError, match="guidance_interval must be"):
        GenerationHead("image", "label", num_classes=3, guidance_interval=(0.8, 0.2))
    with pytest.raises(ValueError, match="trunk.in_dim=32 does not match the tokenizer's latent size"):
        MultiTaskModule(Backbone(tokenizer_ckpt=str(tokenizer_run), trunk=DiffusionTransformer(in_dim=32, preset="tiny", num_classes=3)),
                        {"gen": GenerationHead("image", "label", num_classes=3)})
    with pytest.raises(ValueError, match="set model.backbone.trunk"):
        MultiTaskModule(Backbone(tokenizer_ckpt=str(tokenizer_run)), {"gen": GenerationHead("image", "label", num_classes=3)})
    with pytest.raises(ValueError, match="text_vocab_size"):
        MultiTaskModule(Backbone(tokenizer_ckpt=str(tokenizer_run), trunk=_trunk(num_classes=3)),
                        {"gen": GenerationHead("image", "text", num_classes=3)})
    # caption conditioning on a data set without text: named before the first step
    model = MultiTaskModule(Backbone(tokenizer_ckpt=str(tokenizer_run), trunk=_trunk(num_classes=3, text_vocab_size=64)),
                            {"gen": GenerationHead("image", "text", num_classes=3)})
    trainer = L.Trainer(default_root_dir=tmp_path, logger=False, max_steps=1, enable_progress_bar=False)
    with pytest.raises(ValueError, match="head 'gen' needs \\['text'\\]"):
        trainer.fit(model, WebDataModule(root=str(shard_dir), keys=["image", "label"], batch_size=2))
    with pytest.raises(FileNotFoundError, match=r"no last.ckpt \(no checkpoint at all\) under"):
        Backbone(tokenizer_ckpt=str(tmp_path), trunk=_trunk())


def test_warns_when_a_patch_is_wider_than_the_trunk(tokenizer_run: Path) -> None:
    """The final Linear(hidden -> in_dim * p^2) spans at most `hidden` directions of a patch: an image
    generation head on such a trunk could not denoise the rest, so attaching it says so (tiny preset:
    hidden 64, 16-dim codes); a trunk that only encodes, or a narrower patch, is left alone."""
    wide = lambda: Backbone(tokenizer_ckpt=str(tokenizer_run), trunk=_trunk(num_classes=3, patch_size=4))  # noqa: E731
    with pytest.warns(UserWarning, match="256 channels but the trunk's hidden_size is 64"):
        MultiTaskModule(wide(), {"gen": GenerationHead("image", "label", num_classes=3)})
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        DiffusionTransformer(in_dim=16, preset="tiny", patch_size=4)
        MultiTaskModule(Backbone(tokenizer_ckpt=str(tokenizer_run), trunk=_trunk(num_classes=3, patch_size=2)),
                        {"gen": GenerationHead("image", "label", num_classes=3)})
    assert not [w for w in seen if "cannot denoise" in str(w.message)]


def _tiny_generation_config(name: str, shard_dir: Path, tokenizer_run: Path, run_dir: Path) -> dict:
    return tiny_config(name, shard_dir, run_dir, tokenizer_run)


def test_sample_script_writes_files_deterministically(shard_dir: Path, tokenizer_run: Path, tmp_path: Path) -> None:
    path = tmp_path / "gen.yaml"
    path.write_text(yaml.safe_dump(_tiny_generation_config("generation.yaml", shard_dir, tokenizer_run, tmp_path / "run")))
    main(["fit", "--config", str(path)])
    ckpt = next((tmp_path / "run").rglob("last.ckpt"))
    outs = []
    for k in range(2):
        out = tmp_path / f"samples{k}"
        cmd = [sys.executable, str(ROOT / "scripts" / "sample.py"), "--ckpt", str(ckpt), "--out", str(out),
               "--classes", "0", "2", "--per-class", "2", "--steps", "2", "--guidance", "2.0", "--seed", "3"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-2000:]
        outs.append(out)
    names = sorted(p.name for p in outs[0].glob("*.png"))
    assert names == ["0_0.png", "0_1.png", "2_0.png", "2_1.png", "grid.png"]
    for n in names:
        assert (outs[0] / n).read_bytes() == (outs[1] / n).read_bytes()
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "sample.py"), "--ckpt", str(ckpt), "--out",
                           str(tmp_path / "bad"), "--classes", "0", "--steps", "0"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode != 0 and "steps" in proc.stderr
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "sample.py"), "--ckpt", str(ckpt), "--out",
                           str(tmp_path / "bad"), "--classes", "0", "7", "--steps", "1"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode != 0 and "class id 7 is outside [0, 3)" in proc.stderr, proc.stderr[-500:]
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "sample.py"), "--ckpt", str(ckpt), "--out",
                           str(tmp_path / "named"), "--classes", "c2", "--per-class", "1", "--steps", "1"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0 and json.loads((tmp_path / "named" / "prompts.json").read_text()) == {"2": "c2"}
    # the evaluation script reports gen_acc / fid_cls / floor per guidance
    report = tmp_path / "eval.json"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "evaluate_generation.py"), "--ckpt", str(ckpt),
                           "--guidance", "1", "2", "--samples", "4", "--steps", "2", "--floor-samples", "4",
                           "--json", str(report)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(report.read_text())
    assert set(results) == {"1.0", "2.0"}
    assert all(0.0 <= r["gen_acc"] <= 1.0 and r["fid_cls"] >= 0 for r in results.values())
    # the raw (non-averaged) weights of an EMA run
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "evaluate_generation.py"), "--ckpt", str(ckpt),
                           "--guidance", "2", "--samples", "4", "--steps", "2", "--floor-samples", "4",
                           "--weights", "raw", "--sampler", "ddpm"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0 and "guidance  2.0: gen_acc" in proc.stdout, proc.stderr[-2000:]
    assert "2 steps, ddpm sampler" in proc.stdout, proc.stdout
    # a sampler of the other process is refused before any sampling
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "evaluate_generation.py"), "--ckpt", str(ckpt),
                           "--sampler", "euler"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode != 0 and "--sampler euler does not fit this head's diffusion process" in proc.stderr, \
        proc.stderr[-500:]


def test_sample_script_says_what_it_did_with_empty_and_long_captions(shard_dir: Path, tokenizer_run: Path,
                                                                     tmp_path: Path) -> None:
    path = tmp_path / "gen.yaml"
    path.write_text(yaml.safe_dump(_tiny_generation_config("generation_shapes.yaml", shard_dir, tokenizer_run, tmp_path / "run")))
    main(["fit", "--config", str(path)])
    captions = tmp_path / "captions.txt"
    captions.write_text("alpha beta\n\n" + " ".join(["gamma delta"] * 80) + "\n\n")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "sample.py"), "--ckpt", str(tmp_path / "run"),
                           "--out", str(tmp_path / "out"), "--captions-file", str(captions), "--per-class", "1",
                           "--steps", "1"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "caption 1 is empty: its samples come from the null condition (unconditional)" in proc.stdout
    assert "1 of 3 captions are longer than the model's condition length" in proc.stdout, proc.stdout
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["0_0.png", "1_0.png", "2_0.png", "grid.png"]
    assert json.loads((tmp_path / "out" / "prompts.json").read_text())["1"] == ""
    # the evaluation script also prints the scene judge's whole-caption accuracy by caption group
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "evaluate_generation.py"), "--ckpt", str(tmp_path / "run"),
                           "--split", "val", "--samples", "4", "--steps", "1", "--floor-samples", "4", "--eta", "1"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "eta 1.0" in proc.stdout and "whole caption right: " in proc.stdout and "all_captions " in proc.stdout, proc.stdout


def test_diffusion_default_is_gaussian() -> None:
    assert isinstance(GenerationHead("image", "label", num_classes=2).diffusion, GaussianDiffusion)


def test_judge_pooling_keeps_a_short_word_in_a_long_silence() -> None:
    """Audio judges pool by the peak over time (a command word is a short part of a 2 s clip padded
    with silence); image judges average. Only the known pools are accepted."""
    from tasks.judge import JudgeNet

    assert GenerationHead("audio", "label", num_classes=2).judge.pool == "peak"
    assert GenerationHead("image", "label", num_classes=2).judge.pool == "mean"
    assert GenerationHead("audio", "label", num_classes=2, judge_pool="mean").judge.pool == "mean"
    with pytest.raises(ValueError, match="pool must be one of"):
        JudgeNet(1, 2, pool="max")
    torch.manual_seed(0)
    judge = JudgeNet(1, 3, width=8, pool="peak").eval()
    x = torch.full((2, 1, 16, 64), -1.6)  # silence (judge_mel's scale)
    x[1, :, 4:12, 20:28] = 0.8  # a short burst in the second clip only
    h = judge.body(x)  # [2, 32, 2, 8]
    assert torch.allclose(judge(x), judge.proj(h.mean(dim=2).amax(dim=2)))  # mean over bands, max over time
    judge.pool = "mean"
    assert torch.allclose(judge(x), judge.proj(h.mean(dim=(2, 3))))


def test_snap_denoised_commits_the_x0_estimate_to_codes(tokenizer_run: Path) -> None:
    backbone = Backbone(tokenizer_ckpt=str(tokenizer_run), trunk=_trunk(num_classes=3))
    head = GenerationHead("image", "label", num_classes=3, snap_denoised=0.5, sample_steps=4)
    MultiTaskModule(backbone, {"gen": head}).eval()
    head.diffusion.latent_scale.fill_(2.0)
    snap = head._snapper(backbone)
    x0 = torch.randn(2, backbone.codec("image").num_tokens, 16)
    late, early = torch.full((2,), 400), torch.full((2,), 600)
    assert torch.equal(snap(x0, early), x0)  # before the last half of the range: left alone
    codes = head.diffusion.unnormalize(snap(x0, late))  # after: code vectors, nearest in RAW latent space
    torch.testing.assert_close(codes, backbone.snap_to_codebook(head.diffusion.unnormalize(x0)))
    book = backbone.quantizer.lookup(torch.arange(backbone.num_codes))
    assert (codes.reshape(-1, 1, 16) - book[None]).abs().amax(dim=-1).min(dim=1).values.max() < 1e-5  # each a code
    head.snap_denoised = 0.0
    assert head._snapper(backbone) is None
    images, _ = head.generate(backbone, y=torch.tensor([0, 1]))  # and it samples with it on
    head.snap_denoised = 1.0
    snapped, _ = head.generate(backbone, y=torch.tensor([0, 1]), generator=torch.Generator().manual_seed(0))
    assert snapped.shape == images.shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="snap_denoised must be in \\[0, 1\\]"):
        GenerationHead("image", "label", num_classes=3, snap_denoised=1.5)
