"""Image and audio codecs, shared conv layers, log-mel front end and Griffin-Lim."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from multimodal.audio_codec import AUDIO_PRESETS, AudioCodec
from multimodal.image_codec import IMAGE_PRESETS, ImageCodec
from multimodal.layers import GroupNorm, length_mask
from multimodal.mel import LOG_SILENCE, MelSpectrogram, griffin_lim, hz_to_mel, mel_filterbank, mel_to_hz

SR = 16000


@pytest.fixture(autouse=True)
def single_thread():
    """These models are far too small to gain from intra-op threads; on a busy 2-core machine
    the OpenMP threads of concurrent processes fight each other and one thread is ~10x faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sine(freq: float, seconds: float = 1.0, amplitude: float = 0.5) -> torch.Tensor:
    t = torch.arange(int(SR * seconds)) / SR
    return amplitude * torch.sin(2 * math.pi * freq * t)


def smooth_images(n: int, size: int) -> torch.Tensor:
    """n structured RGB images [n, 3, size, size] in [-1, 1]."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    images = []
    for k in range(n):
        r = ((xx - 0.3 * math.cos(k)) ** 2 + (yy - 0.3 * math.sin(k)) ** 2).sqrt()
        disc = torch.tanh(3 * (0.5 - r))
        ramp = xx * math.cos(k) + yy * math.sin(k)
        stripes = 0.8 * torch.sin(3 * (k + 1) * xx)
        images.append(torch.stack([disc, ramp, stripes]))
    return torch.stack(images)


# ---- image codec ---------------------------------------------------------------------------------


@pytest.mark.parametrize("downsample", [4, 8])
@pytest.mark.parametrize("in_channels", [1, 3])
def test_image_codec_shapes(downsample, in_channels):
    codec = ImageCodec("tiny", in_channels=in_channels, image_size=32, downsample=downsample)
    image = torch.rand(2, in_channels, 32, 32) * 2 - 1
    z = codec.encode(image)
    h = w = 32 // downsample
    assert codec.grid_size == (h, w) and codec.num_tokens == h * w
    assert z.shape == (2, h * w, IMAGE_PRESETS["tiny"]["code_dim"])
    assert codec.decode(z).shape == image.shape


def test_image_codec_rectangular_grid_and_size_check():
    codec = ImageCodec("tiny", image_size=(16, 32), downsample=8, code_dim=8)
    assert codec.grid_size == (2, 4)
    z = codec.encode(torch.zeros(1, 3, 16, 32))
    assert z.shape == (1, 8, 8)
    with pytest.raises(ValueError, match="expects"):
        codec.encode(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="expects"):
        codec.decode(torch.zeros(1, 7, 8))


def test_image_token_order_is_row_major():
    torch.manual_seed(0)
    codec = ImageCodec("tiny", image_size=(16, 32), downsample=4)
    image = torch.rand(2, 3, 16, 32) * 2 - 1
    grid = codec.encoder(image)  # [B, D, h, w]
    z = codec.encode(image)
    h, w = codec.grid_size
    for i, j in [(0, 0), (0, 5), (2, 1), (h - 1, w - 1)]:
        torch.testing.assert_close(z[:, i * w + j], grid[:, :, i, j])

    seen = []
    codec.decoder.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    codec.decode(z)
    torch.testing.assert_close(seen[0], grid)


def test_image_last_layer_weight_receives_gradient():
    codec = ImageCodec("tiny", image_size=16)
    assert codec.last_layer_weight is codec.decoder.conv_out.weight
    codec(torch.zeros(1, 3, 16, 16)).square().mean().backward()
    assert codec.last_layer_weight.grad is not None


def test_image_codec_overfits_one_batch():
    torch.manual_seed(0)
    images = smooth_images(2, 16)
    codec = ImageCodec("tiny", image_size=16)
    optimizer = torch.optim.Adam(codec.parameters(), lr=2e-3)
    losses = []
    for _ in range(60):
        loss = (codec(images) - images).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0], losses[::10]


# ---- log-mel front end and Griffin-Lim -----------------------------------------------------------


def test_mel_scales_round_trip():
    hz = torch.tensor([0.0, 100.0, 999.0, 1000.0, 4000.0, 8000.0], dtype=torch.float64)
    for scale in ("slaney", "htk"):
        torch.testing.assert_close(mel_to_hz(hz_to_mel(hz, scale), scale), hz)
    assert hz_to_mel(torch.tensor(1000.0), "slaney") == pytest.approx(15.0)
    assert hz_to_mel(torch.tensor(700.0), "htk") == pytest.approx(2595 * math.log10(2))


def test_mel_filterbank_rows():
    fb = mel_filterbank(SR, 512, 64, norm=None)
    assert fb.shape == (64, 257) and bool((fb >= 0).all())
    assert bool((fb <= 1).all() and (fb.max(dim=1).values > 0.5).all())  # triangles peaking near 1
    # Unnormalised triangles are a partition of unity between the first and the last peak.
    peaks = fb.argmax(dim=1)
    columns = fb.sum(dim=0)[peaks[0] + 1 : peaks[-1]]
    torch.testing.assert_close(columns, torch.ones_like(columns))
    # Slaney normalisation: every filter has unit area in Hz (fine bins, so the sum is an integral).
    fine = mel_filterbank(SR, 4096, 64, norm="slaney")
    assert bool((fine >= 0).all())
    area = fine.sum(dim=1) * (SR / 4096)
    torch.testing.assert_close(area, torch.ones_like(area), atol=0.05, rtol=0)


def test_mel_filterbank_rejects_bad_settings():
    with pytest.raises(ValueError, match="n_mels"):
        mel_filterbank(SR, 64, 128)
    with pytest.raises(ValueError, match="f_max"):
        mel_filterbank(SR, 512, 64, f_max=9000)
    with pytest.raises(ValueError, match="mel_scale"):
        mel_filterbank(SR, 512, 64, scale="bark")
    with pytest.raises(ValueError, match="hop_length"):
        MelSpectrogram(hop_length=1000, n_fft=512)


def test_mel_of_silence_is_finite():
    frontend = MelSpectrogram()
    log_mel = frontend(torch.zeros(2, 1600))
    assert log_mel.shape == (2, 64, 10)
    assert bool(torch.isfinite(log_mel).all())
    torch.testing.assert_close(log_mel, torch.full_like(log_mel, LOG_SILENCE))
    assert frontend(torch.zeros(1, 1)).shape == (1, 64, 1)  # one sample is one frame


def test_mel_frame_count_and_autocast():
    frontend = MelSpectrogram(hop_length=160)
    for T, frames in [(160, 1), (161, 2), (16000, 100), (15999, 100)]:
        assert frontend(torch.zeros(1, T)).shape[-1] == frames == frontend.frames_for(T)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert frontend(sine(440.0, 0.1)[None]).dtype == torch.float32


@pytest.mark.parametrize("freq", [440.0, 1000.0])
def test_griffin_lim_recovers_sine_frequency(freq):
    frontend = MelSpectrogram(SR, n_fft=512, hop_length=160, n_mels=64)
    audio = sine(freq)[None]
    log_mel = frontend(audio)
    waveform = griffin_lim(log_mel, frontend, n_iter=32)
    assert waveform.shape == (1, log_mel.shape[-1] * 160) and bool(torch.isfinite(waveform).all())
    # The dominant frequency over the whole clip, in STFT bins of SR / n_fft = 31.25 Hz.
    spectrum = torch.fft.rfft(waveform[0] * torch.hann_window(waveform.shape[-1]))
    peak_hz = spectrum.abs().argmax().item() * SR / waveform.shape[-1]
    assert abs(peak_hz - freq) <= 2 * SR / 512, peak_hz
    # Phase reconstruction makes the spectrogram consistent: the iterations beat random phases.
    loud = log_mel > -6

    def error(n_iter):
        return (frontend(griffin_lim(log_mel, frontend, n_iter=n_iter)) - log_mel)[loud].abs().mean()

    assert error(32) < 0.5 * error(0)


# ---- audio codec ---------------------------------------------------------------------------------


def test_audio_frame_and_token_counts():
    codec = AudioCodec("tiny", hop_length=160, downsample=4)
    assert codec.sample_rate == SR and codec.samples_per_token == 640
    for T, frames, tokens in [
        (1, 4, 1),
        (160, 4, 1),
        (640, 4, 1),
        (641, 8, 2),
        (16000, 100, 25),
        (8000, 52, 13),
    ]:
        assert codec.frames_for(T) == frames and codec.tokens_for(T) == tokens
    lengths = torch.tensor([16000, 8000, 1])
    assert codec.tokens_for(lengths).tolist() == [25, 13, 1]
    assert AudioCodec("tiny", downsample=2).tokens_for(16000) == 50


@pytest.mark.parametrize("downsample", [2, 4])
def test_audio_codec_shapes_and_token_lengths(downsample):
    codec = AudioCodec("tiny", downsample=downsample)
    lengths = torch.tensor([16000, 8000, 1000, 1])
    audio = torch.randn(4, 16000) * 0.1 * length_mask(lengths, 16000)[:, 0]
    z, token_lengths = codec.encode(audio, lengths)
    n = codec.tokens_for(16000)
    assert z.shape == (4, n, AUDIO_PRESETS["tiny"]["code_dim"])
    assert token_lengths.tolist() == [codec.tokens_for(int(t)) for t in lengths]
    assert token_lengths.tolist() == ([50, 25, 4, 1] if downsample == 2 else [25, 13, 2, 1])
    mask = torch.arange(n)[None] < token_lengths[:, None]
    assert bool((z[~mask] == 0).all())  # padded tokens are zero
    log_mel = codec.decode(z, token_lengths)
    assert log_mel.shape == (4, 64, n * downsample) == codec.mel(audio).shape
    assert bool((log_mel[1, :, token_lengths[1] * downsample :] == LOG_SILENCE).all())
    z_all, all_lengths = codec.encode(audio)  # no lengths: every token valid
    assert z_all.shape == z.shape and all_lengths.tolist() == [n] * 4
    with pytest.raises(ValueError, match="lengths"):
        codec.encode(audio, torch.tensor([16000, 0, 5, 5]))


def test_audio_tokens_do_not_depend_on_batch_padding():
    torch.manual_seed(0)
    codec = AudioCodec("tiny").eval()
    lengths = torch.tensor([4800, 2000, 700])
    clips = [torch.randn(int(n)) * 0.2 for n in lengths]
    batch = torch.zeros(3, 4800)
    for i, clip in enumerate(clips):
        batch[i, : len(clip)] = clip
    batch[1, 2000:] = 0.7  # garbage padding must not leak into the clip's tokens
    z, token_lengths = codec.encode(batch, lengths)
    for i, clip in enumerate(clips):
        z_alone, n = codec.encode(clip[None])
        assert n.item() == token_lengths[i].item()
        torch.testing.assert_close(z[i, : n.item()], z_alone[0], atol=1e-5, rtol=1e-4)


def test_audio_to_audio_length_and_last_layer():
    codec = AudioCodec("tiny", griffin_lim_iters=4)
    log_mel = codec.mel(sine(300.0, 0.2)[None])
    waveform = codec.to_audio(log_mel)
    assert waveform.shape == (1, log_mel.shape[-1] * codec.hop_length)
    assert codec.last_layer_weight is codec.decoder.conv_out.weight


def test_audio_codec_overfits_log_mel():
    torch.manual_seed(0)
    t = torch.arange(5120) / SR
    audio = torch.stack([0.5 * torch.sin(2 * math.pi * (300 + 900 * t) * t), sine(800.0, 0.32) * (t < 0.15)])
    audio[1] += 0.05 * torch.randn(5120)
    codec = AudioCodec("tiny")
    target = codec.mel(audio)
    optimizer = torch.optim.Adam(codec.parameters(), lr=3e-3)
    losses = []
    for _ in range(50):
        z, _ = codec.encode(audio)
        loss = (codec.decode(z) - target).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0], losses[::10]


# ---- shared layers, presets and validation ---------------------------------------------------------


def test_masked_group_norm_matches_group_norm_on_valid_part():
    torch.manual_seed(0)
    norm = GroupNorm(4, 8)
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    x = torch.randn(2, 8, 10)
    lengths = torch.tensor([10, 6])
    out = norm(x, length_mask(lengths, 10))
    torch.testing.assert_close(out[0], norm(x[:1])[0])
    torch.testing.assert_close(out[1, :, :6], norm(x[1:, :, :6])[0])


def test_preset_overrides():
    codec = ImageCodec("tiny", channels=8, code_dim=4)
    assert codec.config == dict(IMAGE_PRESETS["tiny"], channels=8, code_dim=4)
    assert codec.encode(torch.zeros(1, 3, 32, 32)).shape == (1, 64, 4)
    assert AudioCodec("small", code_dim=12).code_dim == 12


def test_preset_parameter_counts_increase():
    def count(module):
        return sum(p.numel() for p in module.parameters())

    for cls in (ImageCodec, AudioCodec):
        tiny, small, base = (count(cls(p)) for p in ("tiny", "small", "base"))
        assert tiny < small < base, (cls.__name__, tiny, small, base)
    for preset in ("tiny", "small", "base"):  # one shared code dimension per preset
        assert IMAGE_PRESETS[preset]["code_dim"] == AUDIO_PRESETS[preset]["code_dim"]


@pytest.mark.parametrize(
    "build, setting",
    [
        (lambda: ImageCodec("huge"), "preset"),
        (lambda: AudioCodec("large"), "preset"),
        (lambda: ImageCodec("tiny", downsample=3), "downsample"),
        (lambda: ImageCodec("tiny", downsample=16), "downsample"),
        (lambda: AudioCodec("tiny", downsample=8), "downsample"),
        (lambda: ImageCodec("tiny", norm_groups=5), "norm_groups"),
        (lambda: AudioCodec("tiny", channels=24, norm_groups=16), "norm_groups"),
        (lambda: ImageCodec("tiny", image_size=30), "image_size"),
        (lambda: ImageCodec("tiny", image_size=(32, 36), downsample=8), "image_size"),
        (lambda: ImageCodec("tiny", in_channels=4), "in_channels"),
        (lambda: ImageCodec("tiny", num_res_blocks=0), "num_res_blocks"),
        (lambda: ImageCodec("tiny", channel_mult=()), "channel_mult"),
        (lambda: AudioCodec("tiny", n_mels=200, n_fft=256), "n_mels"),
    ],
)
def test_invalid_settings_raise_naming_the_setting(build, setting):
    with pytest.raises(ValueError, match=setting):
        build()
