"""This machine's matrix-multiply rate in fp32 and bf16: the ceiling every training number is read against.

    python scripts/benchmark.py matmul --threads 1

Square products ``a @ b`` of n x n, the best of ``--repeats`` half-second runs, in GFLOP/s (2 n^3 per
product).
"""

from __future__ import annotations

import argparse
import time

import torch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", default="256,512,1024")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: leave as is)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)


def matmul_rate(n: int, dtype: torch.dtype, device: str | torch.device = "cpu", seconds: float = 0.5,
                repeats: int = 3) -> float:
    """GFLOP/s of n x n x n products in ``dtype`` (the best of ``repeats`` runs of ``seconds``)."""
    device = torch.device(device)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start, count = time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            a @ b
            count += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = max(best, 2 * n**3 * count / (time.perf_counter() - start) / 1e9)
    return best


def run(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"device={args.device} threads={torch.get_num_threads()} torch={torch.__version__}")
    print("| n | fp32 GFLOP/s | bf16 GFLOP/s | bf16 / fp32 |")
    print("| --- | --- | --- | --- |")
    for n in (int(s) for s in args.sizes.split(",")):
        fp32 = matmul_rate(n, torch.float32, args.device, repeats=args.repeats)
        bf16 = matmul_rate(n, torch.bfloat16, args.device, repeats=args.repeats)
        print(f"| {n} | {fp32:.0f} | {bf16:.0f} | {bf16 / fp32:.2f}x |", flush=True)
