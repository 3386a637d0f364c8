"""Generate images or audio from a trained generation checkpoint, for classes or captions.

    python scripts/sample.py --ckpt runs/generation/lightning_logs/version_0/checkpoints/last.ckpt \\
        --out samples/digits --classes 0 1 2 3 4 5 6 7 8 9 --per-class 8 --steps 50 --guidance 3 --seed 0
    python scripts/sample.py --ckpt runs/generation_shapes --out samples/shapes \\
        --captions-file captions.txt --per-class 4

Every sample is written as ``<class-or-caption-index>_<i>.png`` (or ``.wav``): the class id, or the
caption's line number (from 0) in the captions file; plus one ``grid.png`` (a row per class or
caption; for audio, of log-mel spectrograms). Same seed, same files. The checkpoint's EMA weights
are used when the run had the EMA callback (Lightning saves the averaged weights as the model's).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from datamodules.text import TextTokenizer
from multimodal.checkpoint import resolve_checkpoint, run_datamodule
from multimodal.precision import autocast_dtype
from multimodal.writer import wav_bytes
from tasks import GenerationHead, MultiTaskModule


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a generation checkpoint, or a run folder (its newest last.ckpt)")
    p.add_argument("--out", required=True, type=Path, help="output folder (created)")
    cond = p.add_mutually_exclusive_group()
    cond.add_argument("--classes", nargs="+", help="class ids to generate for, or 'all' (class-conditional heads)")
    cond.add_argument("--captions-file", type=Path, help="a UTF-8 file with one caption per line (text-conditional heads)")
    p.add_argument("--per-class", type=int, default=4, help="samples per class or caption (default 4)")
    p.add_argument("--steps", type=int, default=50, help="sampling steps (default 50)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default: the head's)")
    p.add_argument("--sampler", default=None, help="ddim | ddpm | euler (default: the head's)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--task", default=None, help="the generation head to use when the model has several")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="sentencepiece model for captions (default: the one of the run's data config)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def _run_tokenizer(ckpt: Path) -> Path:
    """The sentencepiece model of the run's data (its saved config.yaml)."""
    return run_datamodule(ckpt).tokenizer_file


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.steps < 1:
        _parser().error(f"--steps must be >= 1, got {args.steps}")
    if args.per_class < 1:
        _parser().error(f"--per-class must be >= 1, got {args.per_class}")
    if args.guidance is not None and args.guidance < 0:
        _parser().error(f"--guidance must be >= 0, got {args.guidance}")
    ckpt = resolve_checkpoint(args.ckpt)
    model = MultiTaskModule.load_from_checkpoint(ckpt, map_location=args.device, weights_only=True).eval()
    heads = {t: h for t, h in model.heads.items() if isinstance(h, GenerationHead)}
    if not heads:
        raise SystemExit(f"{ckpt} has no generation head (heads: {sorted(model.heads)})")
    task = args.task or next(iter(heads))
    if task not in heads:
        raise SystemExit(f"--task {task!r}: generation heads are {sorted(heads)}")
    head = heads[task]
    if args.sampler:
        head.sampler = args.sampler

    groups: list[tuple[int, dict]] = []
    if head.condition == "text":
        if args.captions_file is None:
            raise SystemExit(f"head {task!r} is caption-conditional: pass --captions-file")
        tok = TextTokenizer(args.tokenizer or _run_tokenizer(ckpt))
        captions = [c.strip() for c in args.captions_file.read_text(encoding="utf-8").splitlines() if c.strip()]
        for i, caption in enumerate(captions):
            ids, _ = tok.encode(caption)
            groups.append((i, {"text_ids": ids[None].repeat(args.per_class, 1).to(args.device),
                               "text_lengths": torch.full((args.per_class,), len(ids), device=args.device)}))
    elif head.condition == "label":
        if not args.classes:
            raise SystemExit(f"head {task!r} is class-conditional: pass --classes")
        if args.classes == ["all"]:
            args.classes = list(range(head.num_classes))
        try:
            args.classes = [int(c) for c in args.classes]
        except ValueError:
            raise SystemExit(f"--classes takes class ids or 'all', got {args.classes}") from None
        bad = [c for c in args.classes if not 0 <= c < head.num_classes]
        if bad:
            raise SystemExit(f"--classes {bad} outside [0, {head.num_classes})")
        groups = [(c, {"y": torch.full((args.per_class,), c, device=args.device)}) for c in args.classes]
    else:
        groups = [(0, {"num": args.per_class})]

    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    dtype = autocast_dtype(args.device)  # bf16 where the hardware has it (multimodal.precision)
    for index, cond in groups:
        generator = torch.Generator(device=args.device).manual_seed(args.seed * 100_003 + index)
        with torch.autocast(torch.device(args.device).type, dtype=dtype, enabled=dtype is not None):
            samples, judged = head.generate(model.backbone, generator=generator, steps=args.steps,
                                            guidance=args.guidance, num=args.per_class, **cond)
        samples, judged = samples.float(), judged.float()
        if head.modality == "image":
            arrays = _to_uint8(samples)
            for i, a in enumerate(arrays):
                Image.fromarray(a).save(args.out / f"{index}_{i}.png")
            rows.append(np.concatenate(list(arrays), axis=1))
        else:
            rate = model.backbone.codec("audio").sample_rate
            for i, wave in enumerate(samples):
                (args.out / f"{index}_{i}.wav").write_bytes(wav_bytes(wave, rate, peak=0.9))
            mels = judged[:, 0]
            mels = (mels - mels.amin()) / (mels.amax() - mels.amin()).clamp(min=1e-6)
            rows.append(np.concatenate(list((mels.flip(1) * 255).to(torch.uint8).cpu().numpy()), axis=1))
    grid = np.concatenate(rows, axis=0)
    Image.fromarray(grid).save(args.out / "grid.png")
    print(f"wrote {sum(1 for _ in args.out.iterdir()) - 1} samples and grid.png to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
