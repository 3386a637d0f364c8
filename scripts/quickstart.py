"""From nothing to a trained multi-task model on the embedded demo data, in one command.

    python scripts/quickstart.py                 # ~10 minutes on a 2-core CPU

1. stage 1: the shared VQ tokenizer (``configs/tokenizer.yaml``, shortened) on digits, shapes, spoken;
2. stage 2: one DiT trunk under four heads at once (``configs/quickstart.yaml``): class-conditional
   digit generation, digit classification, shape captioning, speech transcription;
3. ``lightning test``: every head's metrics on the test splits -> test_metrics.json / .md;
4. ``lightning predict``: generated digits, captions, transcripts next to their sample keys;
5. ``scripts/sample.py``: a grid of generated digits, one row per class.

Ends by printing the test report, a few answers of every head next to their references (the grid of
generated digits, three captions, three transcripts, three classified digits), where the TensorBoard
logs, samples and checkpoints are, the wall time and the peak memory. Each stage is the plain CLI (``multimodal.cli.main``), so every step can be
rerun by hand with the printed command.
"""

from __future__ import annotations

import argparse
import json
import resource
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from multimodal.cli import main as lightning  # noqa: E402

sys.path.insert(0, str(ROOT / "scripts"))
import sample  # noqa: E402


def run(args: list[str]) -> None:
    print(f"\n$ lightning {shlex.join(args)}", flush=True)
    lightning(args)


def newest(folder: Path, pattern: str) -> Path:
    found = sorted(folder.rglob(pattern), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no {pattern} under {folder}")
    return found[-1]


def _records(path: Path, n: int) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()[:n]]


def examples(predictions: Path, grid: Path, n: int = 3) -> str:
    """A few answers of every head next to their references, from the predict step's JSONL files."""
    lines = ["What the heads answer (test split):",
             f"  generate:   {grid} (one row per class, 8 samples each)"]
    for r in _records(predictions / "caption.jsonl", n):
        lines.append(f"  caption:    {r.get('caption')!r}\n              reference {r.get('reference')!r}")
    for r in _records(predictions / "transcribe.jsonl", n):
        lines.append(f"  transcribe: {r.get('transcript')!r}\n              reference {r.get('reference')!r}")
    for r in _records(predictions / "classify.jsonl", n):
        probs = r.get("probs") or []
        p = f" (p = {max(probs):.2f})" if probs else ""
        lines.append(f"  classify:   {r.get('__key__')}: predicted {r.get('pred')}{p}, label {r.get('label')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/quickstart", help="run folder (stage1/, stage2/ inside)")
    parser.add_argument("--stage1-config", default=str(ROOT / "configs" / "tokenizer.yaml"))
    parser.add_argument("--stage1-steps", type=int, default=250)
    parser.add_argument("--stage2-config", default=str(ROOT / "configs" / "quickstart.yaml"))
    parser.add_argument("--skip-stage1", action="store_true", help="reuse <out>/stage1 when it has a checkpoint")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    out = Path(args.out)
    stage1, stage2 = out / "stage1", out / "stage2"

    if not (args.skip_stage1 and list(stage1.rglob("last.ckpt"))):
        run(["fit", "--config", args.stage1_config, f"--trainer.default_root_dir={stage1}",
             f"--trainer.max_steps={args.stage1_steps}", f"--trainer.val_check_interval={args.stage1_steps}"])
    tokenizer = newest(stage1, "last.ckpt")
    common = ["--config", args.stage2_config, f"--trainer.default_root_dir={stage2}",
              f"--model.init_args.backbone.init_args.tokenizer_ckpt={tokenizer}"]
    run(["fit", *common])
    ckpt = newest(stage2, "last.ckpt")
    run(["test", *common, f"--ckpt_path={ckpt}"])
    report = newest(stage2, "test_metrics.md")
    run(["predict", *common, f"--ckpt_path={ckpt}"])
    predictions = newest(stage2, "predictions")
    grid_dir = out / "samples"
    print(f"\n$ python scripts/sample.py --ckpt {ckpt} --out {grid_dir} --classes all --per-class 8 --steps 25",
          flush=True)
    sample.main(["--ckpt", str(ckpt), "--out", str(grid_dir), "--classes", "all", "--per-class", "8", "--steps", "25"])

    minutes = (time.perf_counter() - start) / 60
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    print("\n" + report.read_text())
    print(examples(predictions, grid_dir / "grid.png"))
    print(f"done in {minutes:.1f} min, peak memory {peak_gib:.2f} GiB")
    print(f"  TensorBoard:  tensorboard --logdir {out}")
    print(f"  test report:  {report} (and .json)")
    print(f"  predictions:  {predictions} (generated digits, captions, transcripts)")
    print(f"  samples:      {grid_dir / 'grid.png'}")
    print(f"  checkpoints:  {tokenizer} (stage 1), {ckpt} (stage 2)")
    return {"report": report, "predictions": predictions, "checkpoint": ckpt}


if __name__ == "__main__":
    main()
