"""Where a recipe's training step goes: the step time of the recipe and of the recipe with one change
each (a part switched off, cheapened or added), every row a fresh ``lightning fit`` process.

    python scripts/benchmark.py step --config configs/generation_shapes.yaml \\
        --tokenizer runs/tokenizer_image_f2 --threads 1

The default rows are the caption -> image recipe's parts (``configs/generation_shapes.yaml``): the judges'
decoded view (off, or of fewer items), their batch, self-conditioning, the scene map, and a cell refiner. ``--row NAME=ARGS`` (any
number) replaces them: ARGS are ``lightning fit`` arguments added to the recipe's, e.g.
``--row "no self-conditioning=--model.init_args.backbone.init_args.trunk.init_args.self_condition false"``;
a row with no ARGS is the recipe itself. Timing as ``scripts/benchmarks/stage2.py`` (no validation,
no checkpoints, the recipe's own callbacks replaced by EMA; median of ``--steps`` after ``--warmup``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from benchmarks.stage2 import StepTimer

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
    import lightning.pytorch.cli as lcli

    from multimodal.cli import main

    overlay = {
        "trainer": {
            "max_steps": spec["warmup"] + spec["steps"], "limit_val_batches": 0, "num_sanity_val_steps": 0,
            "logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
            "default_root_dir": spec["root"],
            "callbacks": [{"class_path": "multimodal.callbacks.EMA", "init_args": {"decay": 0.995}}],
        },
        "model": {"init_args": {"backbone": {"init_args": {"tokenizer_ckpt": spec["tokenizer"]}}}},
    }
    path = Path(spec["root"]) / "overlay.yaml"
    path.write_text(yaml.safe_dump(overlay))
    timer = StepTimer.make(spec["out"])
    original = lcli.LightningCLI._instantiate_trainer

    def with_timer(self, config, callbacks):  # the timer joins the recipe's callbacks
        return original(self, config, [*callbacks, timer])

    lcli.LightningCLI._instantiate_trainer = with_timer
    main(["fit", "--config", spec["config"], "--config", str(path), *spec["args"]])


def _measure(args: argparse.Namespace, extra: list[str]) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        spec = {"config": args.config, "tokenizer": args.tokenizer, "steps": args.steps, "warmup": args.warmup,
                "root": tmp, "out": str(Path(tmp) / "marks.json"), "args": extra}
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(ROOT))
        proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark.py"), "step", "--worker",
                               json.dumps(spec)], env=env, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            raise SystemExit(f"row {extra} failed:\n{proc.stderr[-3000:]}")
        marks = json.loads(Path(spec["out"]).read_text())
    timed = list(zip(marks[:-1], marks[1:]))[args.warmup:]
    med = statistics.median
    return {"step": med(b["start"] - a["start"] for a, b in timed),
            "forward": med(a["forward"] - a["start"] for a, _ in timed),
            "backward": med(a["backward"] - a["forward"] for a, _ in timed)}


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
        r = _measure(args, extra)
        base = base or r["step"]
        print(f"| {name} | {r['step']:.3f} | {r['forward']:.3f} | {r['backward']:.3f} | {r['step'] / base:.2f} |",
              flush=True)
