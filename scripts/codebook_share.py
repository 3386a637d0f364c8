"""How a stage-1 tokenizer shares its codebook among modalities, and what quantization costs each.

    python scripts/codebook_share.py runs/tokenizer runs/v3/tokenizer_balanced --threads 1

For every checkpoint and every demo set its codecs read (digits and shapes: images; spoken: audio),
over the ``--split`` split: the codes the set uses (share of the K codes), its reconstruction
through the codebook (PSNR for images, mel SNR for speech, as ``ReconstructionHead`` reports
them) and the same WITHOUT quantization (the codec's continuous latents decoded directly). The
gap between the two is what the codebook costs that modality; the continuous figure bounds what
any codebook, however many codes it gives the modality, could reach with that codec.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SETS = {"digits": "image", "shapes": "image", "spoken": "audio"}


def measure(ckpt: str, split: str, batches: int | None, demo_size: str = "default") -> list[dict]:
    import torch
    from torchmetrics.audio import SignalNoiseRatio
    from torchmetrics.image import PeakSignalNoiseRatio

    from datamodules import WebDataModule
    from multimodal import Backbone
    from multimodal.checkpoint import resolve_checkpoint

    backbone = Backbone(tokenizer_ckpt=str(resolve_checkpoint(ckpt))).eval()
    rows = []
    for name, modality in SETS.items():
        if modality not in backbone.codecs:
            continue
        data = WebDataModule(demo=name, keys=[modality], batch_size=64, audio_max_seconds=None,
                             test_split=split, demo_size=demo_size)
        codec = backbone.codec(modality)
        if modality == "image":
            data.bind_image_format(codec.image_size[0], codec.in_channels)
        metric = {"image": lambda: PeakSignalNoiseRatio(data_range=2.0), "audio": SignalNoiseRatio}[modality]
        quantized, continuous = metric(), metric()
        used = torch.zeros(backbone.num_codes, dtype=torch.bool)
        with torch.no_grad():
            for i, batch in enumerate(data.test_dataloader()):
                if batches is not None and i >= batches:
                    break
                if modality == "image":
                    target = batch["image"]
                    z, lengths = backbone.encode("image", target)
                    tokens = backbone.quantize(z, lengths)
                    q_rec = backbone.decode("image", tokens.quantized).clamp(-1, 1)
                    c_rec = backbone.decode("image", z).clamp(-1, 1)
                    quantized.update(q_rec, target)
                    continuous.update(c_rec, target)
                else:
                    audio, lengths = batch["audio"], batch["audio_lengths"]
                    target = codec.mel(audio, lengths)
                    token_lengths = codec.tokens_for(lengths)
                    z = codec.encode_mel(target, token_lengths)
                    tokens = backbone.quantize(z, token_lengths)
                    frames = token_lengths * codec.downsample
                    mask = (torch.arange(target.shape[-1])[None, :] < frames[:, None]).unsqueeze(1).float()
                    for rec, m in ((backbone.decode("audio", tokens.quantized, token_lengths), quantized),
                                   (backbone.decode("audio", z, token_lengths), continuous)):
                        m.update(rec.float().exp() * mask, target.float().exp() * mask)  # as ReconstructionHead
                used[tokens.codes[tokens.mask].unique()] = True
        rows.append({"ckpt": ckpt, "set": name, "modality": modality, "codes": float(used.float().mean()),
                     "metric": "PSNR" if modality == "image" else "mel SNR",
                     "quantized": float(quantized.compute()), "continuous": float(continuous.compute())})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpts", nargs="+", help="stage-1 checkpoints or run folders")
    parser.add_argument("--split", default="test")
    parser.add_argument("--batches", type=int, default=None, help="at most this many batches per set")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--demo-size", default="default", help="default or tiny (tests)")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    print("| checkpoint | set | codes used | metric | through the codebook (dB) | continuous latents (dB) | gap (dB) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for ckpt in args.ckpts:
        for r in measure(ckpt, args.split, args.batches, args.demo_size):
            print(f"| {r['ckpt']} | {r['set']} | {100 * r['codes']:.1f} % | {r['metric']} | {r['quantized']:.2f} | "
                  f"{r['continuous']:.2f} | {r['continuous'] - r['quantized']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
