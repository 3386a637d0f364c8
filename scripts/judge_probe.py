"""Train the command judge ALONE on real clips and report its validation accuracy: a diagnostic of the
judge network (``tasks.judge.JudgeNet``), apart from any generation run.

    python scripts/judge_probe.py --pool mean --seconds 2 --steps 400
    python scripts/judge_probe.py --pool peak --seconds 2 --steps 400

Each run: the demo ``spoken`` set (or ``--root``), clips padded with the log-mel of silence (or cut) to
``--seconds`` exactly as ``GenerationHead`` feeds its judge (``judge_mel``), AdamW at ``--lr``, bf16
autocast, one thread by default; prints one JSON line (accuracy on the whole validation split, the
wall time). This is how the judge's failure on 2 s windows was found and its ``peak`` pooling chosen.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # probe_loop beside this file

from probe_loop import add_data_arguments, start, train_alone  # noqa: E402

from datamodules import WebDataModule  # noqa: E402
from multimodal.audio_codec import AudioCodec  # noqa: E402
from tasks.heads.fixed_length_audio import judge_mel  # noqa: E402
from tasks.judge import POOLS, JudgeNet  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pool", choices=POOLS, default="peak")
    p.add_argument("--width", type=int, default=32, help="the judge's width (GenerationHead judge_width)")
    p.add_argument("--seconds", type=float, default=2.0, help="window the clips are padded or cut to")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--sample-rate", type=int, default=16000, help="the AudioCodec mel front end (its defaults otherwise)")
    add_data_arguments(p, "spoken")
    args = p.parse_args(argv)
    source = start(args)
    data = WebDataModule(**source, keys=["audio", "label"], batch_size=args.batch_size,
                         audio_max_seconds=args.seconds, sample_rate=args.sample_rate, num_workers=0)
    data.setup("fit")
    codec = AudioCodec(sample_rate=args.sample_rate)  # only its mel front end is used (no weights in it)
    frames = round(args.seconds * args.sample_rate / codec.hop_length)
    judge = JudgeNet(1, args.num_classes, args.width, pool=args.pool)

    def inputs(batch: dict) -> torch.Tensor:
        return judge_mel(codec.mel(batch["audio"], batch["audio_lengths"]), frames)

    train_s, bf16 = train_alone(
        judge, lambda b: F.cross_entropy(judge.classify(inputs(b)).float(), b["label"]),
        data.train_dataloader, args.steps, args.lr)
    right = total = 0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for batch in data.val_dataloader():
            right += int((judge.classify(inputs(batch)).argmax(-1) == batch["label"]).sum())
            total += len(batch["label"])
    if total == 0:
        raise SystemExit("the validation split is empty")
    print(json.dumps({"pool": args.pool, "width": args.width, "seconds": args.seconds, "steps": args.steps, "lr": args.lr,
                      "batch_size": args.batch_size, "val_acc": round(right / total, 4), "val_clips": total,
                      "train_s": round(train_s, 1), "bf16": bf16}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
