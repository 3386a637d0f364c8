"""Stage 1 through the one training loop: MultiTaskModule + ReconstructionHead + shared codebook."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.loggers import TensorBoardLogger

from datamodules import MultiTaskDataModule, WebDataModule
from multimodal import AudioCodec, Backbone, ImageCodec, VectorQuantizer, load_backbone
from multimodal.cli import main
from tasks import MultiTaskModule, PatchDiscriminator, ReconstructionHead

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def tiny_backbone(num_codes: int = 32, dim: int = 16, audio: bool = True) -> Backbone:
    codecs = {"image": ImageCodec(preset="tiny", image_size=32, downsample=4, code_dim=dim)}
    if audio:
        codecs["audio"] = AudioCodec(preset="tiny", downsample=4, code_dim=dim)
    return Backbone(VectorQuantizer(num_codes=num_codes, dim=dim, dead_code_steps=5), codecs)


def _data(root: Path, tasks: dict[str, list[str]], batch_size: int = 4) -> MultiTaskDataModule:
    return MultiTaskDataModule(
        {t: WebDataModule(root=str(root), keys=k, batch_size=batch_size, samples_per_epoch=16, audio_max_seconds=0.3)
         for t, k in tasks.items()}
    )


def _trainer(tmp_path: Path, **kw) -> L.Trainer:
    kw.setdefault("max_steps", 3)
    kw.setdefault("limit_val_batches", 1)
    return L.Trainer(default_root_dir=tmp_path, logger=TensorBoardLogger(tmp_path), enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=1, **kw)


def test_images_and_audio_train_one_codebook_and_log_metrics(shard_dir: Path, tmp_path: Path) -> None:
    backbone = tiny_backbone()
    heads = {"img": ReconstructionHead("image", num_media=2), "aud": ReconstructionHead("audio", num_media=1)}
    model = MultiTaskModule(backbone, heads, loss_weights={"aud": 0.5}, warmup_steps=1)
    before = backbone.quantizer.codebook.clone()
    trainer = _trainer(tmp_path, max_steps=4)  # one epoch of 16 / 4 batches, then validation
    trainer.fit(model, _data(shard_dir, {"img": ["image"], "aud": ["audio"]}))
    m = trainer.callback_metrics
    for key in ("train/img/rec_l1", "train/aud/spectral", "train/img/codebook/perplexity", "train/aud/codebook/dead_codes",
                "val/img/psnr", "val/img/ssim", "val/aud/log_mel_l1", "val/aud/mel_snr", "val/img/codebook/usage",
                "val/aud/codebook/perplexity", "val/codebook/all/usage", "val/codebook/image/usage",
                "val/codebook/audio/perplexity"):
        assert key in m, key
    assert torch.isfinite(m["val/img/psnr"]) and 0 < m["val/img/codebook/usage"] <= 1
    assert not torch.equal(before, backbone.quantizer.codebook)  # the shared codebook moved (k-means + EMA)
    tags = set()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for event_file in tmp_path.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(event_file), size_guidance={"images": 0, "audio": 0, "histograms": 0})
        acc.Reload()
        tags |= set(acc.Tags()["images"]) | set(acc.Tags()["audio"]) | set(acc.Tags()["histograms"])
    assert any(t.startswith("val/img/original_then_reconstruction") for t in tags), tags
    assert any(t.startswith("val/aud/clip0_reconstruction") for t in tags), tags
    assert "val/img/code_histogram" in tags and "val/aud/code_histogram" in tags


def test_adversarial_head_uses_two_optimizers_and_counts_generator_steps(shard_dir: Path, tmp_path: Path) -> None:
    disc = PatchDiscriminator(in_channels=3, channels=8, num_layers=2)
    head = ReconstructionHead("image", discriminator=disc, gan_start_step=1, num_media=0)
    model = MultiTaskModule(tiny_backbone(audio=False), {"img": head}, warmup_steps=1)
    assert not model.automatic_optimization
    d_before = copy.deepcopy(disc.state_dict())
    trainer = _trainer(tmp_path, max_steps=3, limit_val_batches=0)
    trainer.fit(model, WebDataModule(root=str(shard_dir), keys=["image"], batch_size=4, samples_per_epoch=16))
    assert trainer.global_step == 3  # discriminator steps do not count
    assert any(not torch.equal(d_before[k], v) for k, v in disc.state_dict().items())
    assert "train/img/g_loss" in trainer.callback_metrics and "train/img/d_loss" in trainer.callback_metrics
    assert torch.isfinite(trainer.callback_metrics["train/img/gan_adaptive_weight"])


def test_bad_input_is_named(shard_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no codec for modality 'audio'.*codecs.audio"):
        MultiTaskModule(tiny_backbone(audio=False), {"aud": ReconstructionHead("audio")})
    with pytest.raises(ValueError, match="code_dim=8 does not match.*dim=16"):
        Backbone(VectorQuantizer(num_codes=8, dim=16), {"image": ImageCodec(preset="tiny", code_dim=8)})
    with pytest.raises(ValueError, match="loss_weights names tasks with no head: \\['nope'\\]"):
        MultiTaskModule(tiny_backbone(), {"img": ReconstructionHead("image")}, loss_weights={"nope": 1.0})
    model = MultiTaskModule(tiny_backbone(audio=False), {"img": ReconstructionHead("image")})
    batch = {"image": torch.zeros(2, 3, 32, 32), "__key__": ["a", "b"]}
    batch["image"][1, 0, 0, 0] = float("nan")
    assert model._check("img", batch) == "image"  # named; the step is skipped (tests/test_cli.py)
    with pytest.raises(KeyError, match="needs batch keys \\['image'\\]"):
        model._check("img", {"audio": torch.zeros(1, 10), "__key__": ["a"]})
    # a head whose data does not load what it needs fails before the first step
    trainer = _trainer(tmp_path)
    with pytest.raises(ValueError, match="head 'img' needs \\['image'\\].*loads only \\['audio'\\]"):
        trainer.fit(model, WebDataModule(root=str(shard_dir), keys=["audio"], batch_size=2))


def _tiny_tokenizer_config(root: Path, run_dir: Path, num_codes: int = 64) -> dict:
    cfg = yaml.safe_load((CONFIGS / "tokenizer.yaml").read_text())
    model = cfg["model"]["init_args"]
    model["backbone"]["init_args"]["quantizer"]["init_args"].update(num_codes=num_codes, dim=16)
    for codec in model["backbone"]["init_args"]["codecs"].values():
        codec["init_args"].update(preset="tiny", code_dim=16)
    for task in cfg["data"]["init_args"]["tasks"].values():
        task["init_args"].pop("demo")
        task["init_args"].update(root=str(root), batch_size=4, samples_per_epoch=8)
    cfg["trainer"].update(max_steps=2, val_check_interval=2, limit_val_batches=1, default_root_dir=str(run_dir),
                          enable_progress_bar=False)
    cfg["trainer"]["callbacks"][0]["init_args"]["every_n_train_steps"] = 1
    return cfg


def test_tokenizer_config_fits_and_checkpoint_encodes_and_decodes(shard_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(_tiny_tokenizer_config(shard_dir, tmp_path / "run")))
    main(["fit", "--config", str(path)])
    ckpt = next((tmp_path / "run").rglob("last.ckpt"))
    backbone = load_backbone(ckpt)
    assert isinstance(backbone, Backbone) and not backbone.training
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    codes, lengths = backbone.encode_codes("image", images)
    assert codes.shape == (2, 64) and codes.dtype == torch.long and int(codes.max()) < 64
    assert backbone.decode_codes("image", codes).shape == (2, 3, 32, 32)
    audio = torch.randn(2, 8000) * 0.1
    a_codes, a_len = backbone.encode_codes("audio", audio, torch.tensor([8000, 4000]))
    assert a_len.tolist() == [13, 7] and a_codes.shape == (2, 13)
    wave = backbone.decode_codes("audio", a_codes)
    assert wave.dim() == 2 and wave.shape[0] == 2 and torch.isfinite(wave).all()
    # a model with another codebook size refuses the checkpoint before loading, naming the setting
    # (through the CLI, `--ckpt_path` makes LightningCLI rebuild the model from the checkpoint's config)
    other = MultiTaskModule(tiny_backbone(num_codes=32), {"digits": ReconstructionHead("image")})
    trainer = _trainer(tmp_path / "other")
    with pytest.raises(ValueError, match="(?s)codebook size/dimension.*quantizer.*\\(64, 16\\) vs model \\(32, 16\\)"):
        trainer.validate(other, WebDataModule(root=str(shard_dir), keys=["image"], batch_size=4), ckpt_path=ckpt)


def test_tokenizer_image_config_runs(shard_dir: Path, tmp_path: Path) -> None:
    cfg = _tiny_tokenizer_config(shard_dir, tmp_path / "run")
    image_cfg = yaml.safe_load((CONFIGS / "tokenizer_image.yaml").read_text())
    assert "audio" not in image_cfg["model"]["init_args"]["backbone"]["init_args"]["codecs"]
    image_cfg["model"]["init_args"]["backbone"] = {
        **cfg["model"]["init_args"]["backbone"],
        "init_args": {**cfg["model"]["init_args"]["backbone"]["init_args"],
                      "codecs": {"image": cfg["model"]["init_args"]["backbone"]["init_args"]["codecs"]["image"]}},
    }
    for task in image_cfg["data"]["init_args"]["tasks"].values():
        task["init_args"].pop("demo")
        task["init_args"].update(root=str(shard_dir), batch_size=4, samples_per_epoch=8)
    image_cfg["trainer"].update(fast_dev_run=True, default_root_dir=str(tmp_path / "run"), enable_progress_bar=False)
    path = tmp_path / "img.yaml"
    path.write_text(yaml.safe_dump(image_cfg))
    main(["fit", "--config", str(path)])


def test_codebook_share_reports_every_modality(tokenizer_run: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    """scripts/codebook_share.py on the tiny stage-1 run: one row per demo set, codes used in (0, 100] %,
    and the continuous-latent figure beside the quantized one."""
    import importlib.util

    monkeypatch.setenv("MULTIMODAL_CACHE", str(tmp_path / "demo"))
    spec = importlib.util.spec_from_file_location("codebook_share", Path(__file__).parents[1] / "scripts" / "codebook_share.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.measure(str(tokenizer_run), "test", batches=1, demo_size="tiny")
    assert [r["set"] for r in rows] == ["digits", "shapes", "spoken"]
    for r in rows:
        assert 0.0 < r["codes"] <= 1.0 and r["metric"] == ("mel SNR" if r["set"] == "spoken" else "PSNR")
        assert r["quantized"] == r["quantized"] and r["continuous"] == r["continuous"]  # finite, not NaN
