"""Generate images or audio from a trained generation checkpoint, for classes or captions.

    python scripts/sample.py --ckpt runs/generation/lightning_logs/version_0/checkpoints/last.ckpt \\
        --out samples/digits --classes 0 1 2 3 4 5 6 7 8 9 --per-class 8 --steps 50 --guidance 3 --seed 0
    python scripts/sample.py --ckpt runs/generation_shapes --out samples/shapes \\
        --captions-file captions.txt --per-class 4

Every sample is written as ``<class-or-caption-index>_<i>.png`` (or ``.wav``): the class id, or the
caption's line number (from 0) in the captions file; plus one ``grid.png`` (a row per class or
caption; for audio, of log-mel spectrograms) and ``prompts.json`` (index -> the class name or
caption each file was generated for). Same seed, same files. The checkpoint's EMA weights are used
when the run had the EMA callback (Lightning saves the averaged weights as the model's).

Classes are ids or names (``--classes left 3``); an unknown name or an id outside the class table is
an error naming the classes. A caption longer than the model's condition length (the run's
``data.text_max_length``) is truncated, and the count is printed; an empty line of the captions file
is the null condition (unconditional samples), said so for that line. Audio is turned into
waveforms by the run's learned vocoder (``backbone.vocoder_ckpt``), ``--vocoder RUN`` (another
``configs/vocoder.yaml`` run), or Griffin-Lim (``--griffin-lim``, or when there is no vocoder).
"""

from __future__ import annotations

import argparse
import json
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
    p.add_argument("--vocoder", default=None, help="a configs/vocoder.yaml run: its vocoder makes the waveforms")
    p.add_argument("--griffin-lim", action="store_true", help="waveforms by Griffin-Lim even when there is a vocoder")
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
    if args.vocoder:
        from multimodal.vocoder import load_vocoder

        vocoder, source = load_vocoder(args.vocoder)
        vocoder.check_layout(model.backbone.codec("audio").frontend, f"{ckpt}'s audio codec")
        model.backbone.vocoder, model.backbone.vocoder_source = vocoder.to(args.device).eval(), source
    method = "griffin_lim" if args.griffin_lim or model.backbone.vocoder is None else "vocoder"

    groups: list[tuple[int, dict]] = []
    prompts: dict[int, str] = {}
    if head.condition == "text":
        if args.captions_file is None:
            raise SystemExit(f"head {task!r} is caption-conditional: pass --captions-file")
        max_length = head.text_vocab.max_length if head.text_vocab is not None else 64
        tok = TextTokenizer(args.tokenizer or _run_tokenizer(ckpt), max_length)
        lines = args.captions_file.read_text(encoding="utf-8").splitlines()
        while lines and not lines[-1].strip():
            lines.pop()  # the file's last newline(s), not empty captions
        truncated = 0
        for i, caption in enumerate(c.strip() for c in lines):
            if not caption:
                print(f"caption {i} is empty: its samples come from the null condition (unconditional)")
                ids = torch.zeros(1, dtype=torch.long)  # one padding id, masked out: no condition token
                length = 0
            else:
                ids, cut = tok.encode(caption)
                truncated += int(cut)
                length = len(ids)
            prompts[i] = caption
            groups.append((i, {"text_ids": ids[None].repeat(args.per_class, 1).to(args.device),
                               "text_lengths": torch.full((args.per_class,), length, device=args.device)}))
        if truncated:
            print(f"{truncated} of {len(lines)} captions are longer than the model's condition length "
                  f"({max_length - 2} tokens) and were truncated")
    elif head.condition == "label":
        if not args.classes:
            raise SystemExit(f"head {task!r} is class-conditional: pass --classes")
        if args.classes == ["all"]:
            args.classes = list(range(head.num_classes))
        try:  # ids or names; ClassNames.index names the classes when one is unknown or out of range
            args.classes = [head.class_names.index(c) for c in args.classes]
        except ValueError as err:
            raise SystemExit(f"--classes: {err}") from None
        groups = [(c, {"y": torch.full((args.per_class,), c, device=args.device)}) for c in args.classes]
        prompts.update({c: head.class_names.names[c] for c in args.classes})
    else:
        groups = [(0, {"num": args.per_class})]

    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    dtype = autocast_dtype(args.device)  # bf16 where the hardware has it (multimodal.precision)
    for index, cond in groups:
        generator = torch.Generator(device=args.device).manual_seed(args.seed * 100_003 + index)
        with torch.autocast(torch.device(args.device).type, dtype=dtype, enabled=dtype is not None):
            samples, judged = head.generate(model.backbone, generator=generator, steps=args.steps,
                                            guidance=args.guidance, num=args.per_class, waveform=method, **cond)
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
    (args.out / "prompts.json").write_text(json.dumps({str(k): v for k, v in prompts.items()}, indent=1))
    how = f" (waveforms by {method.replace('_', '-')})" if head.modality == "audio" else ""
    print(f"wrote {len(groups) * args.per_class} samples, grid.png and prompts.json to {args.out}{how}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
