"""What an image size costs: a stage-1 step (codec + shared codebook) and a stage-2 step (the DiT) per size.

    python scripts/benchmark.py sizes --threads 1

For every size of ``multimodal.image_codec.IMAGE_SIZES`` (32, 64, 128, 256 px): the codec preset and
down-sampling that table gives, the token grid, and the DiT tokens at patch size 2; then the median
time of one training step (forward + backward + AdamW) on a batch of ``--batch`` images:

* stage 1: the image codec (``--codec-preset``, default ``small``) encodes, the shared 512-code
  quantizer quantizes, the codec decodes, L1 + VQ loss;
* stage 2: the DiT trunk (``--dit-preset``, default ``cpu``: hidden 256, depth 6) denoises the token
  grid (class-conditional, ``in_dim`` = the code dimension).

Under bf16 autocast when the CPU has bf16 matrix units (``multimodal.precision``), as the recipes
train. Milliseconds per step; sizes whose step would take longer than ``--max-seconds`` are listed
but not run.
"""

from __future__ import annotations

import argparse
import contextlib
import time


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--codec-preset", default="small")
    p.add_argument("--dit-preset", default="cpu")
    p.add_argument("--sizes", type=int, nargs="*", default=None, help="default: every size of the table")
    p.add_argument("--max-seconds", type=float, default=20.0, help="skip a step measured slower than this")


def _median_step(step, repeats: int, warmup: int, max_seconds: float) -> float | None:
    """Median milliseconds of ``step``; None when its first call takes longer than ``max_seconds``."""
    from benchmarks.kernels import _time

    t = time.perf_counter()
    step()
    if time.perf_counter() - t > max_seconds:
        return None
    return _time(step, repeats, max(0, warmup - 1))


def _size_row(size: int, args: argparse.Namespace, autocast) -> str:
    import torch
    import torch.nn.functional as F

    from multimodal import DiffusionTransformer, ImageCodec, VectorQuantizer
    from multimodal.image_codec import IMAGE_SIZES

    f, p = IMAGE_SIZES[size]["downsample"], IMAGE_SIZES[size]["patch_size"]
    codec = ImageCodec(preset=args.codec_preset, image_size=size, downsample=f, code_dim=64).train()
    quantizer = VectorQuantizer(num_codes=512, dim=64, kmeans_init=False).train()
    opt1 = torch.optim.AdamW([*codec.parameters(), *quantizer.parameters()], lr=1e-4)
    images = torch.rand(args.batch, 3, size, size) * 2 - 1
    h, w = codec.grid_size

    def stage1() -> None:
        with autocast():
            q, _, vq_loss, _ = quantizer(codec.encode(images))
            loss = F.l1_loss(codec.decode(q).float(), images) + vq_loss
        opt1.zero_grad(set_to_none=True)
        loss.backward()
        opt1.step()

    dit = DiffusionTransformer(in_dim=64, preset=args.dit_preset, patch_size=p, num_classes=10).train()
    opt2 = torch.optim.AdamW(dit.parameters(), lr=1e-4)
    latents = torch.randn(args.batch, h * w, 64)
    labels = torch.randint(0, 10, (args.batch,))
    t = torch.rand(args.batch)

    def stage2() -> None:
        with autocast():
            loss = F.mse_loss(dit(latents, t, "image", y=labels).float()[..., :64], latents)
        opt2.zero_grad(set_to_none=True)
        loss.backward()
        opt2.step()

    def cell(ms: float | None) -> str:
        return f"{ms:.0f}" if ms is not None else f"> {args.max_seconds * 1000:.0f} (not run)"

    s1 = _median_step(stage1, args.repeats, args.warmup, args.max_seconds)
    s2 = _median_step(stage2, args.repeats, args.warmup, args.max_seconds)
    return f"| {size} | {f} | {h} x {w} | {(h // p) * (w // p)} | {cell(s1)} | {cell(s2)} |"


def run(args: argparse.Namespace) -> None:
    import torch

    from multimodal.image_codec import IMAGE_SIZES
    from multimodal.precision import resolve_precision

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    precision, why = resolve_precision(None, "cpu")
    bf16 = precision == "bf16-mixed"
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    print(f"threads {args.threads}, batch {args.batch}, precision {precision} ({why})")
    print("| size | downsample | token grid | DiT tokens | stage-1 step (ms) | stage-2 step (ms) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for size in args.sizes or sorted(IMAGE_SIZES):
        print(_size_row(size, args, autocast), flush=True)
