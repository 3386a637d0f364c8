"""The training loop of the judge diagnostics (``judge_probe.py``, ``scene_probe.py``): one network
trained alone, outside Lightning, for a fixed number of steps. Not a recipe; recipes go through
``lightning fit``."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from multimodal.precision import native_bf16


def train_alone(model: nn.Module, loss_fn: Callable[[dict], Tensor], batches: Callable[[], Iterable[dict]],
                steps: int, lr: float) -> tuple[float, bool]:
    """AdamW at ``lr`` for ``steps`` steps over ``batches()`` (re-iterated as often as needed), bf16
    autocast only where the CPU has bf16 units (emulated bf16 is ~10x slower than fp32 here) ->
    (seconds, whether bf16 was used). Leaves the model in eval mode."""
    bf16, _ = native_bf16("cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    start, step = time.perf_counter(), 0
    model.train()
    while step < steps:
        for batch in batches():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = loss_fn(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step >= steps:
                break
    model.eval()
    return time.perf_counter() - start, bf16


def add_data_arguments(p, demo: str) -> None:
    """--demo / --root (the data), --threads, --seed: the arguments every probe takes."""
    p.add_argument("--demo", default=demo, help=f"a demo set (default {demo})")
    p.add_argument("--root", default=None, help="a shard folder instead of --demo")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)


def start(args) -> dict:
    """Threads and seed set from ``args``; -> the WebDataModule source (``root`` or ``demo``)."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    return {"root": args.root} if args.root else {"demo": args.demo}
