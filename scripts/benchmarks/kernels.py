"""The kernel-level measurements behind the CPU speed choices: attention, GELU, allocator, TaskAdamW.

    python scripts/benchmark.py kernels --threads 1

* attention, forward + backward, torch's SDPA in bf16 and fp32 vs ``multimodal.attention``'s explicit
  softmax(QK^T)V in bf16, at the quickstart's image shape [64, 4, 16, 64] and its speech shape
  [32, 4, 80, 64] with a padding mask;
* GELU forward, and forward + backward, on [32, 256, 1536] in bf16, the tanh approximation vs the exact one;
* ``x / 3.0`` on a 1.5 MB tensor ([1536, 256], fp32) with glibc's default malloc settings vs
  ``multimodal.allocator``'s (each in a fresh process: mallopt is process-wide);
* one ``TaskAdamW`` step for the quickstart trunk's shared parameters x 4 tasks, fused vs loop.

Medians of ``--repeats`` after ``--warmup`` calls, milliseconds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

ALLOC = """
import statistics, time, torch
torch.set_num_threads(1)
from multimodal.allocator import tune_allocator
tune_allocator()
x = torch.randn(1536, 256)
times = []
for i in range(220):
    t = time.perf_counter(); y = x / 3.0; del y
    if i >= 20: times.append(time.perf_counter() - t)
print(statistics.median(times) * 1000)
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)


def _time(fn, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def run(args: argparse.Namespace) -> None:
    import torch
    import torch.nn.functional as F

    from multimodal import attention as attn

    torch.set_num_threads(args.threads)
    r, w = args.repeats, args.warmup
    print(f"threads={args.threads}; milliseconds, medians of {r}")

    print("attention forward + backward:")
    for shape, masked in (((64, 4, 16, 64), False), ((32, 4, 80, 64), True)):
        B, h, L, d = shape
        mask = None
        if masked:
            lengths = torch.randint(L // 2, L + 1, (B,))
            mask = (torch.arange(L)[None, :] < lengths[:, None])[:, None, None, :]
        row = []
        for name, dtype, explicit in (("SDPA bf16", torch.bfloat16, False), ("SDPA fp32", torch.float32, False),
                                      ("explicit bf16", torch.bfloat16, True)):
            q, k, v = (torch.randn(shape, dtype=dtype, requires_grad=True) for _ in range(3))

            def step(q=q, k=k, v=v, explicit=explicit, mask=mask) -> None:
                if explicit:
                    out = attn.attention(q, k, v, mask)
                else:
                    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
                out.float().sum().backward()

            if explicit and not attn.uses_explicit(q):
                row.append(f"{name}: off (MULTIMODAL_ATTENTION=sdpa)")
                continue
            row.append(f"{name} {_time(step, r, w):.1f}")
        print(f"  {list(shape)}{' + mask' if masked else ''}: " + ", ".join(row))

    x = torch.randn(32, 256, 1536, dtype=torch.bfloat16, requires_grad=True)
    for label, backward in (("forward", False), ("forward + backward", True)):
        def gelu(approx: str, backward: bool = backward) -> None:
            if backward:
                F.gelu(x, approximate=approx).float().sum().backward()
            else:
                with torch.no_grad():
                    F.gelu(x, approximate=approx)

        tanh, exact = (_time(lambda a=a: gelu(a), r, w) for a in ("tanh", "none"))
        print(f"GELU {label}, bf16 [32, 256, 1536]: tanh {tanh:.1f}, exact {exact:.1f} ({tanh / exact:.1f}x)")

    alloc = {}
    for name, value in (("glibc defaults", "default"), ("multimodal.allocator", "")):
        env = {**os.environ, "MULTIMODAL_MALLOC": value, "OMP_NUM_THREADS": "1"}
        out = subprocess.run([sys.executable, "-c", ALLOC], capture_output=True, text=True, cwd=ROOT, env=env, check=True)
        alloc[name] = float(out.stdout.strip().splitlines()[-1])
    print("x / 3.0 on [1536, 256] fp32: " + ", ".join(f"{k} {v:.3f}" for k, v in alloc.items()))

    from multimodal import DiffusionTransformer
    from tasks.task_adam import TaskAdamW, TaskGradients

    tasks = ["generate", "classify", "caption", "transcribe"]
    result = {}
    for fused in (False, True):
        torch.manual_seed(0)
        trunk = DiffusionTransformer(in_dim=64, preset="cpu", patch_size=2, num_classes=10, sequence_output=False)
        taps = TaskGradients([trunk], tasks)
        for task in tasks:
            taps.grads[task] = {p: torch.randn_like(p) for p in taps.params}
        opt = TaskAdamW([{"params": taps.params}], taps, lr=1e-3, weight_decay=0.01, fused=fused)

        def step(taps=taps, opt=opt) -> None:
            grads = {t: dict(g) for t, g in taps.grads.items()}
            opt.step()
            taps.grads = grads  # the same gradients again next call

        result["fused" if fused else "loop"] = _time(step, r, w)
    n = sum(p.numel() for p in taps.params)
    print(f"TaskAdamW step, {n / 1e6:.1f} M shared parameters x {len(tasks)} tasks: loop {result['loop']:.1f}, "
          f"fused {result['fused']:.1f}")
