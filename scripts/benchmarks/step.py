"""Where a recipe's training step goes: the step time of the recipe and of the recipe with one change
each (a part switched off, cheapened or added), every row a fresh ``lightning fit`` process.

    python scripts/benchmark.py step --config configs/generation_shapes.yaml \\
        --tokenizer runs/tokenizer_image_f2 --threads 1

The default rows are the caption -> image recipe's parts (``configs/generation_shapes.yaml``): the judges'
decoded view (off, or of fewer items), their batch, self-conditioning, the scene map, and a cell refiner. ``--row NAME=ARGS`` (any
number) replaces them: ARGS are ``lightning fit`` arguments added to the recipe's, e.g.
``--row "no self-conditioning=--model.init_args.backbone.init_args.trunk.init_args.self_condition false"``;
a row with no ARGS is the recipe itself. Timing as ``scripts/benchmarks/stage2.py`` (no validation,
no checkpoints, the recipe's own callbacks replaced by EMA; median of ``--steps`` after ``--warmup``; the
timed fit itself is ``benchmarks.stage2.timed_fit``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import tempfile
from pathlib import Path

from benchmarks.stage2 import bench_overlay, measure_worker, timed_fit

ROOT = Path(__file__).resolve().parents[2]
_HEAD = "--model.init_args.heads.shapes.init_args"
_TRUNK = "--model.init_args.backbone.init_args.trunk.init_args"
DEFAULT_ROWS = [
    "recipe=",
    f"judges without the decoded view={_HEAD}.judge_decoded false",
    f"the decoded view of 4 items, not 16={_HEAD}.judge_decoded_batch 4",
    f"judges on 4 items, not 16={_HEAD}.judge_batch 4",
    f"no self-conditioning={_TRUNK}.self_condition false",
    f"no scene map={_HEAD}.scene_map off",
    f"+ cell refiner (64 channels)={_TRUNK}.refiner 64",
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=str(ROOT / "configs" / "generation_shapes.yaml"))
    parser.add_argument("--tokenizer", default="runs/tokenizer_image_f2", help="stage-1 checkpoint or run folder")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every row")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--row", action="append", default=None, metavar="NAME=ARGS",
                        help="a row: its name and the lightning fit arguments it adds (repeatable)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)


def _worker(spec: dict) -> None:
    overlay = bench_overlay(spec["warmup"] + spec["steps"], spec["root"], spec["tokenizer"])
    timed_fit(spec["config"], overlay, spec["root"], spec["out"], spec["args"])


def _measure(args: argparse.Namespace, name: str, extra: list[str]) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        spec = {"config": args.config, "tokenizer": args.tokenizer, "steps": args.steps, "warmup": args.warmup,
                "root": tmp, "out": str(Path(tmp) / "marks.json"), "args": extra}
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(ROOT))
        return measure_worker("step", spec, env, args.warmup, name)


def run(args: argparse.Namespace) -> None:
    if args.worker:
        _worker(json.loads(args.worker))
        return
    rows = []
    for row in args.row or DEFAULT_ROWS:
        name, sep, extra = row.partition("=")
        if not sep or not name.strip():
            raise SystemExit(f"--row must be NAME=ARGS, got {row!r}")
        rows.append((name.strip(), shlex.split(extra)))
    print(f"training step of {Path(args.config).name}, OMP_NUM_THREADS={args.threads}, median of {args.steps} "
          f"steps after {args.warmup} (seconds)\n")
    print("| row | step | forward | backward | step vs the first row |")
    print("| --- | --- | --- | --- | --- |")
    base = None
    for name, extra in rows:
        r = _measure(args, name, extra)
        base = base or r["step"]
        print(f"| {name} | {r['step']:.3f} | {r['forward']:.3f} | {r['backward']:.3f} | {r['step'] / base:.2f} |",
              flush=True)
