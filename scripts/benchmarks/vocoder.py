"""The learned vocoder: ours (multimodal.vocoder) vs gemelo-ai/vocos' own backbone + ISTFT head vs Griffin-Lim.

    git clone https://github.com/gemelo-ai/vocos .peers/vocos   # its vocos/ package (ignored by git; used only here)
    python scripts/benchmark.py vocoder --threads 1              # one CPU core, 10 s of 16 kHz audio

Inference speed only (mel -> waveform, random weights: speed does not depend on them): every model
turns the same log-mel [1, n_mels, F] (``--seconds`` at the codec's 100 frames/s) into a waveform,
under ``torch.no_grad`` at fp32, the models taking turns; medians of ``--repeats`` after ``--warmup``.
RTF = seconds of compute per second of audio (< 1: faster than real time).

* ``ours``: ``multimodal.Vocoder`` at ``configs/vocoder.yaml``'s size (``--width`` 192, ``--depth`` 4);
* ``vocos (same size)``: ``vocos.models.VocosBackbone(n_mels, width, 3 * width, depth)`` + ``vocos.heads.ISTFTHead``
  (n_fft 512, hop 160, ``padding="center"``): the same ConvNeXt stack and STFT head as ours, their code;
* ``vocos (published size)``: their 24 kHz recipe's backbone (512 wide, 1536 hidden, 8 layers) at our mel layout;
* ``griffin-lim``: ``multimodal.mel.griffin_lim`` (what the codec falls back to; 32 iterations).

vocos imports torchaudio (its mel-scale helpers, used by a head we do not build); torchaudio has no build
for this torch, so a stand-in ``torchaudio.functional.functional`` module is put in ``sys.modules``
before the import, with those two names raising if ever called; and ``vocos/__init__.py`` (the pretrained
loader: encodec, the hub) is not run, only ``vocos.models``, ``vocos.modules``, ``vocos.heads`` and
``vocos.spectral_ops`` are imported.
"""

from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path

import torch

from multimodal.mel import MelSpectrogram, griffin_lim
from multimodal.vocoder import Vocoder

from .kernels import _time

ROOT = Path(__file__).resolve().parents[2]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--width", type=int, default=192)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--vocos-repo", default=str(ROOT / ".peers" / "vocos"),
                   help="a clone of gemelo-ai/vocos (its vocos/ package); skipped when missing")


def _vocos(repo: str):
    """vocos' VocosBackbone and ISTFTHead, or None when the clone is missing."""
    if not (Path(repo) / "vocos" / "models.py").is_file():
        return None
    if "torchaudio" not in sys.modules:  # see the module docstring
        def missing(*_a, **_k):
            raise RuntimeError("torchaudio stand-in: not available here")
        fake = types.ModuleType("torchaudio.functional.functional")
        fake._hz_to_mel = fake._mel_to_hz = missing
        for name in ("torchaudio", "torchaudio.functional"):
            sys.modules[name] = types.ModuleType(name)
        sys.modules["torchaudio.functional.functional"] = fake
    import importlib
    package = types.ModuleType("vocos")  # the package without its __init__ (which imports encodec, hub code)
    package.__path__ = [str(Path(repo) / "vocos")]
    sys.modules.setdefault("vocos", package)
    models = importlib.import_module("vocos.models")
    heads = importlib.import_module("vocos.heads")
    return models.VocosBackbone, heads.ISTFTHead


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    frontend = MelSpectrogram()  # the codec's layout: 16 kHz, n_fft 512, hop 160, 64 bands
    frames = int(args.seconds * frontend.sample_rate / frontend.hop_length)
    mel = torch.randn(1, 64, frames) - 4.0
    models: dict[str, object] = {"ours": Vocoder(width=args.width, depth=args.depth).eval()}
    peer = _vocos(args.vocos_repo)
    if peer is None:
        print(f"vocos: no clone at {args.vocos_repo} (git clone https://github.com/gemelo-ai/vocos there); skipped")
    else:
        backbone, head = peer
        for name, (w, h, d) in {"vocos (same size)": (args.width, 3 * args.width, args.depth),
                                "vocos (published size)": (512, 1536, 8)}.items():
            b, o = backbone(64, w, h, d).eval(), head(w, frontend.n_fft, frontend.hop_length, padding="center").eval()
            models[name] = (b, o)

    def call(model) -> torch.Tensor:
        if isinstance(model, tuple):
            return model[1](model[0](mel))
        return model(mel)

    print(f"mel -> waveform, {args.seconds:g} s of audio ({frames} frames), {args.threads} thread(s), fp32")
    print("| model | params | ms | RTF | x real time |")
    print("| --- | --- | --- | --- | --- |")
    rows = [(name, m) for name, m in models.items()] + [("griffin-lim (32 iterations)", None)]
    with torch.no_grad():
        for name, model in rows:
            if model is None:
                fn = lambda: griffin_lim(mel, frontend, generator=torch.Generator().manual_seed(0))  # noqa: E731
                params = 0
            else:
                fn = lambda m=model: call(m)  # noqa: E731
                parts = model if isinstance(model, tuple) else (model,)
                params = sum(p.numel() for part in parts for p in part.parameters())
            ms = _time(fn, args.repeats, args.warmup)
            rtf = ms / 1000 / args.seconds
            print(f"| {name} | {params / 1e6:.2f} M | {ms:.1f} | {rtf:.4f} | {1 / rtf:.0f} |")
