"""A stage-2 training step of ``configs/quickstart.yaml``: today's path vs each speed-up, in one run.

    python scripts/benchmark.py stage2 --tokenizer runs/quickstart/stage1 --threads 1

Each row is a fresh ``lightning fit`` process (the CLI, the recipe's batch sizes, its EMA callback; no
validation, no checkpoints) that times ``--steps`` training steps after ``--warmup``; rows add one
change at a time:

* ``fp32, shards``: the path before these changes: float32, every batch decoded from the shards and
  encoded by the frozen tokenizer, the per-parameter optimizer loop, torch's SDPA, GELU's tanh
  approximation, glibc's default allocator settings (``--trainer.precision 32
  --model.init_args.cache_latents false --model.init_args.fused_optimizer false``, the trunk's
  ``gelu: tanh``, ``MULTIMODAL_ATTENTION=sdpa MULTIMODAL_MALLOC=default``);
* ``+ bf16``: bf16 autocast (torch's SDPA flash kernel on the CPU);
* ``+ explicit attention``: ``multimodal.attention``'s explicit softmax(QK^T)V on CPUs in bf16;
* ``+ latent cache``: codes read from ``datamodules.latent_cache`` instead of decoding and encoding;
* ``+ fused optimizer``: torch's fused AdamW kernel per task in ``TaskAdamW``;
* ``+ allocator``: ``multimodal.allocator``'s glibc settings;
* ``+ exact GELU``: the trunk's MLP with the exact (erf) GELU: the defaults of ``lightning fit`` now.

A step is the time between two consecutive ``on_train_batch_start`` hooks (forward, backward,
optimizer, EMA update, logging and the next batch's loading), reported as the median; forward
(to ``on_before_backward``), backward (to ``on_after_backward``) and the rest are medians too.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]

_BEFORE = {"precision": "32", "cache": False, "fused": False, "attention": "sdpa", "malloc": "default", "gelu": "tanh"}
ROWS = [("fp32, shards (before)", _BEFORE)]
for _name, _change in (("+ bf16 autocast", {"precision": "bf16-mixed"}), ("+ explicit attention", {"attention": "explicit"}),
                       ("+ latent cache", {"cache": True}), ("+ fused optimizer", {"fused": True}),
                       ("+ allocator", {"malloc": "tuned"}), ("+ exact GELU (now the default)", {"gelu": "exact"})):
    ROWS.append((_name, {**ROWS[-1][1], **_change}))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=str(ROOT / "configs" / "quickstart.yaml"))
    parser.add_argument("--tokenizer", default="runs/quickstart/stage1", help="stage-1 checkpoint or run folder")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every row")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--rows", default=None, help="comma-separated row numbers (1-based) to run; default all")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)


class StepTimer:
    """A Lightning callback recording the hook times of every training step (built lazily: the parent
    process needs no Lightning import)."""

    @staticmethod
    def make(out: str):
        import lightning as L

        class _Timer(L.Callback):
            def __init__(self) -> None:
                self.marks: list[dict[str, float]] = []

            def on_train_batch_start(self, *args) -> None:
                self.marks.append({"start": time.perf_counter()})

            def on_before_backward(self, *args) -> None:
                self.marks[-1]["forward"] = time.perf_counter()

            def on_after_backward(self, *args) -> None:
                self.marks[-1]["backward"] = time.perf_counter()

            def on_train_end(self, *args) -> None:
                self.marks.append({"start": time.perf_counter()})
                Path(out).write_text(json.dumps(self.marks))

        return _Timer()


def timed_fit(config: str, overlay: dict, root: str, out: str, extra: list[str] = ()) -> None:
    """In a worker process: ``lightning fit --config CONFIG --config OVERLAY EXTRA...`` with a
    :class:`StepTimer` joining the recipe's callbacks (its marks written to ``out``)."""
    import lightning.pytorch.cli as lcli

    from multimodal.cli import main

    path = Path(root) / "overlay.yaml"
    path.write_text(yaml.safe_dump(overlay))
    timer = StepTimer.make(out)
    original = lcli.LightningCLI._instantiate_trainer

    def with_timer(self, config, callbacks):  # the timer joins the recipe's callbacks
        return original(self, config, [*callbacks, timer])

    lcli.LightningCLI._instantiate_trainer = with_timer
    main(["fit", "--config", config, "--config", str(path), *extra])


def bench_overlay(steps: int, root: str, tokenizer: str) -> dict:
    """The trainer settings of a timed fit: ``steps`` steps, no validation, logger or checkpoints, the
    recipe's callbacks replaced by EMA; the backbone's stage-1 run."""
    return {
        "trainer": {
            "max_steps": steps, "limit_val_batches": 0, "num_sanity_val_steps": 0,
            "logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
            "default_root_dir": root,
            "callbacks": [{"class_path": "multimodal.callbacks.EMA", "init_args": {"decay": 0.995}}],
        },
        "model": {"init_args": {"backbone": {"init_args": {"tokenizer_ckpt": tokenizer}}}},
    }


def measure_worker(bench: str, spec: dict, env: dict, warmup: int, name: str) -> dict:
    """Run ``benchmark.py BENCH --worker SPEC`` (``spec`` holds ``root`` and ``out``) -> the medians of
    the timed steps after ``warmup``: ``step``, ``forward``, ``backward`` and ``rest`` (seconds)."""
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark.py"), bench, "--worker",
                           json.dumps(spec)], env=env, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"row {name!r} failed:\n{proc.stderr[-3000:]}")
    marks = json.loads(Path(spec["out"]).read_text())
    timed = list(zip(marks[:-1], marks[1:]))[warmup:]
    med = statistics.median
    return {
        "step": med(b["start"] - a["start"] for a, b in timed),
        "forward": med(a["forward"] - a["start"] for a, _ in timed),
        "backward": med(a["backward"] - a["forward"] for a, _ in timed),
        "rest": med(b["start"] - a["backward"] for a, b in timed),
    }


def _worker(spec: dict) -> None:
    overlay = bench_overlay(spec["warmup"] + spec["steps"], spec["root"], spec["tokenizer"])
    overlay["trainer"]["precision"] = spec["precision"]
    overlay["model"]["init_args"].update(cache_latents=spec["cache"], fused_optimizer=spec["fused"])
    overlay["model"]["init_args"]["backbone"]["init_args"]["trunk"] = {"init_args": {"gelu": spec["gelu"]}}
    timed_fit(spec["config"], overlay, spec["root"], spec["out"])


def _measure(name: str, row: dict, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        spec = {**row, "config": args.config, "tokenizer": args.tokenizer, "steps": args.steps,
                "warmup": args.warmup, "root": tmp, "out": str(Path(tmp) / "marks.json")}
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(ROOT),
                   MULTIMODAL_ATTENTION="sdpa" if row["attention"] == "sdpa" else "explicit",
                   MULTIMODAL_MALLOC="default" if row["malloc"] == "default" else "tuned")
        return measure_worker("stage2", spec, env, args.warmup, name)


def run(args: argparse.Namespace) -> None:
    if args.worker:
        _worker(json.loads(args.worker))
        return
    chosen = [int(i) for i in args.rows.split(",")] if args.rows else range(1, len(ROWS) + 1)
    print(f"stage-2 step of {Path(args.config).name}, OMP_NUM_THREADS={args.threads}, median of {args.steps} steps "
          f"after {args.warmup} (seconds)\n")
    print("| path | step | forward | backward | optimizer, EMA, data | speed-up |")
    print("| --- | --- | --- | --- | --- | --- |")
    base = None
    for i in chosen:
        name, row = ROWS[i - 1]
        r = _measure(name, row, args)
        base = base or r["step"]
        print(f"| {name} | {r['step']:.3f} | {r['forward']:.3f} | {r['backward']:.3f} | {r['rest']:.3f} | "
              f"{base / r['step']:.2f}x |", flush=True)
