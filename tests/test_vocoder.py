"""The learned vocoder (multimodal/vocoder.py), its head, how a backbone takes it, and fixed-length audio
generation (silence padding, the transcriber)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from multimodal import Backbone, Vocoder
from multimodal.mel import MelSpectrogram
from multimodal.vocoder import load_vocoder, vocoder_loss
from tasks import GenerationHead, MultiTaskModule, VocoderHead


def _tiny(**kw) -> Vocoder:
    return Vocoder(width=16, depth=1, **kw)


def test_shapes_and_the_saved_configuration() -> None:
    voc = _tiny()
    wave = voc(torch.randn(2, 64, 20) - 5)
    assert wave.shape == (2, 20 * 160) and wave.dtype == torch.float32 and torch.isfinite(wave).all()
    assert voc.state_dict()["_extra_state"]["config"]["width"] == 16
    with pytest.raises(ValueError, match=r"log-mel \[B, 64, F\]"):
        voc(torch.randn(2, 32, 20))


def test_another_mel_layout_is_refused_with_both_named() -> None:
    with pytest.raises(ValueError, match=r"differs in \['n_mels', 'sample_rate'\].*'sample_rate': 22050.*'sample_rate': 16000"):
        _tiny(sample_rate=22050, n_mels=80).check_layout(MelSpectrogram(16000, n_mels=64))
    _tiny().check_layout(MelSpectrogram(16000, 512, 160, n_mels=64))  # the same layout passes


def test_it_learns_a_tone() -> None:
    """A few steps of the multi-resolution STFT + mel loss on a 440 Hz tone lower the loss."""
    torch.manual_seed(0)
    voc = _tiny()
    t = torch.arange(3200) / 16000
    target = (0.5 * torch.sin(2 * math.pi * 440 * t))[None]
    mel = voc.frontend(target)[..., :20]
    opt = torch.optim.Adam(voc.parameters(), 3e-3)
    losses = []
    for _ in range(80):  # measured here (fp32): 13.6 -> 9.8 at step 40, 8.6 at step 80
        loss, logs = vocoder_loss(voc(mel), target, voc.frontend)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.75 * losses[0] and set(logs) == {"stft", "mel_l1"}


def _fake_run(tmp_path: Path, vocoder: Vocoder) -> Path:
    path = tmp_path / "vocoder.ckpt"
    torch.save({"state_dict": {f"heads.spoken.vocoder.{k}": v for k, v in vocoder.state_dict().items()}}, path)
    return path


def test_a_backbone_takes_a_vocoder_run_and_refuses_another_layout(tokenizer_run: Path, tmp_path: Path) -> None:
    voc = _tiny()
    backbone = Backbone(tokenizer_ckpt=str(tokenizer_run), vocoder_ckpt=str(_fake_run(tmp_path, voc)))
    mel = torch.randn(1, 64, 8) - 5
    assert torch.equal(backbone.to_audio(mel), voc.eval()(mel))  # the vocoder, not Griffin-Lim
    assert backbone.to_audio(mel, method="griffin_lim").shape == (1, 8 * 160)
    assert not any(p.requires_grad for p in backbone.vocoder.parameters())
    loaded, source = load_vocoder(str(tmp_path / "vocoder.ckpt"))
    assert loaded.config == voc.config and source.endswith("vocoder.ckpt")
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(ValueError, match=r"another mel layout.*vocoder \{'sample_rate': 16000, .*'n_mels': 80"):
        Backbone(tokenizer_ckpt=str(tokenizer_run), vocoder_ckpt=str(_fake_run(other, _tiny(n_mels=80))))
    with pytest.raises(ValueError, match="no learned vocoder"):
        Backbone(tokenizer_ckpt=str(tokenizer_run)).to_audio(mel, method="vocoder")


def test_stage_two_checkpoints_reference_the_vocoder_instead_of_storing_it(tokenizer_run: Path, tmp_path: Path) -> None:
    backbone = Backbone(tokenizer_ckpt=str(tokenizer_run), vocoder_ckpt=str(_fake_run(tmp_path, _tiny())))
    model = MultiTaskModule(backbone, {"rec": VocoderHead(vocoder=_tiny(), source="mel")})
    checkpoint = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(checkpoint)
    assert not any(k.startswith("backbone.vocoder.") for k in checkpoint["state_dict"])
    assert checkpoint["vocoder_reference"]["path"].endswith("vocoder.ckpt")
    assert any(k.startswith("heads.rec.vocoder.") for k in checkpoint["state_dict"])  # a head's own stays
    model.on_load_checkpoint(checkpoint)  # the model's own vocoder is put back: a strict load works
    model.load_state_dict(checkpoint["state_dict"], strict=True)


def test_the_head_refuses_a_vocoder_for_another_codec(tokenizer_run: Path) -> None:
    with pytest.raises(ValueError, match="another mel layout than model.backbone's audio codec"):
        MultiTaskModule(Backbone(tokenizer_ckpt=str(tokenizer_run)), {"voc": VocoderHead(vocoder=_tiny(n_mels=32))})
    with pytest.raises(ValueError, match="source must be one of"):
        VocoderHead(source="wave")


def test_generated_audio_has_a_fixed_length_padded_with_silence(tokenizer_run: Path) -> None:
    """Training latents: each clip's tokens, then the code of silence up to audio_tokens (no mask)."""
    backbone = Backbone(tokenizer_ckpt=str(tokenizer_run))
    head = GenerationHead("audio", "label", num_classes=3, audio_tokens=6, judge=False)
    codec = backbone.codec("audio")
    audio = torch.randn(2, 9 * codec.samples_per_token) * 0.3
    lengths = torch.tensor([9 * codec.samples_per_token, 2 * codec.samples_per_token])
    x0, mask = head._latents(backbone, {"audio": audio, "audio_lengths": lengths})
    assert x0.shape == (2, 6, backbone.quantizer.dim) and mask is None
    silence = head._silence(backbone)
    assert torch.equal(x0[1, 2:], silence.expand(4, -1))  # the short clip: 2 tokens, then silence
    assert not torch.equal(x0[0, 2:], silence.expand(4, -1))  # the long one: cut to 6 tokens of speech
    quiet, _ = backbone.quantized_latents("audio", torch.zeros(1, 8 * codec.samples_per_token))
    assert torch.equal(silence, quiet[0, 4])
