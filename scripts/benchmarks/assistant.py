"""The assistant on one checkpoint: model load, one image, one clip, generation per request.

    python scripts/benchmark.py assistant --ckpt runs/quickstart/stage2 --threads 1

Load is timed in a fresh process each time (``Assistant.from_checkpoint`` after the imports; the
first with the checkpoint just evicted from the page cache where the OS allows it, i.e. as root on
Linux, the others warm). Answers are medians over ``--repeats`` calls after one warm-up, per input
kind: every understanding head that reads the input answers in one call; generation (text naming a
class, a class) is timed separately, at each head's own sampling steps. Inputs are the demo sets'
test files (``$MULTIMODAL_CACHE``) when present, else synthetic ones.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

LOAD = """
import json, sys, time, torch
torch.set_num_threads({threads})
from tasks.assistant import Assistant
t = time.perf_counter()
a = Assistant.from_checkpoint({ckpt!r}, out_dir={out!r})
print(json.dumps({{"load": time.perf_counter() - t}}))
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="a stage-2 checkpoint or run folder")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--loads", type=int, default=3, help="fresh processes timing the load")
    p.add_argument("--out", default="runs/assistant_bench")


def _evict(path: Path) -> bool:
    """Drop a file's pages from the page cache (posix_fadvise DONTNEED after a sync)."""
    try:
        os.sync()
        with open(path, "rb") as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        return True
    except (AttributeError, OSError):
        return False


def _demo(member_ext: str, demo: str) -> bytes | None:
    cache = Path(os.environ.get("MULTIMODAL_CACHE", ROOT / ".cache" / "demo"))
    tars = sorted(cache.glob(f"{demo}-*/test-000000.tar"))
    if not tars:
        return None
    with tarfile.open(tars[0]) as t:
        member = next(m for m in t.getmembers() if m.name.endswith(member_ext))
        return t.extractfile(member).read()


def run(args: argparse.Namespace) -> None:
    import numpy as np
    import torch

    from datamodules.shards import encode_png, encode_wav
    from multimodal.checkpoint import resolve_checkpoint

    torch.set_num_threads(args.threads)
    ckpt = resolve_checkpoint(args.ckpt)
    loads = []
    for i in range(args.loads):
        cold = i == 0 and _evict(ckpt)
        code = LOAD.format(threads=args.threads, ckpt=str(ckpt), out=args.out)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                             env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        if out.returncode:
            raise SystemExit(out.stderr[-2000:])
        loads.append((cold, json.loads(out.stdout.strip().splitlines()[-1])["load"]))
    print(f"checkpoint {ckpt} ({ckpt.stat().st_size / 2**20:.0f} MiB), {args.threads} thread(s)")
    for cold, seconds in loads:
        print(f"  model load ({'cold: page cache dropped' if cold else 'warm'}): {seconds:.2f} s")

    from tasks.assistant import Assistant

    assistant = Assistant.from_checkpoint(ckpt, out_dir=args.out)
    rng = np.random.default_rng(0)
    image = _demo(".png", "digits") or encode_png(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    clip = _demo(".wav", "spoken") or encode_wav(0.3 * np.sin(np.arange(16000) * 0.05), 16000)
    cases = [("image", {"image": image}, {"generate": False}), ("audio", {"audio": clip}, {})]
    text_heads = [t for t in assistant.tasks if t in assistant.readers["text"]]
    if text_heads:
        cases.append(("text (understanding)", {"text": "a large red circle"}, {"generate": False}))
    for name, head in assistant.generators.items():
        if head.condition == "label":
            cases.append((f"class -> {head.modality} ({name}, {head.sample_steps} steps)",
                          {"label": head.class_names.names[0]}, {"tasks": [name]}))
    print(f"  answers, median of {args.repeats} after one warm-up ({assistant.precision}):")
    for name, value, kwargs in cases:
        assistant(**value, **kwargs)
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            response = assistant(**value, **kwargs)
            times.append(time.perf_counter() - t)
        heads = ", ".join(f"{a.task} {a.seconds * 1000:.0f} ms" for a in response.answers)
        print(f"    {name}: {statistics.median(times) * 1000:.0f} ms  ({heads})")
