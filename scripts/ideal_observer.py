"""How much of an object's shape (or colour) is still in the noisy latent x_t? An ideal observer.

    python scripts/ideal_observer.py --ckpt runs/generation_shapes --start 0.2 0.4 0.5 0.6 0.7 0.8 0.9

One-object scenes are drawn as the demo ``shapes`` set draws them (``datamodules/demo.py``: size,
place, background and colour jitter from the same distributions), encoded by the run's frozen
tokenizer and normalised by its generation head (the latent scale it trained with), then noised by
the head's forward process to ``x_t = a x_0 + b eps`` at ``t = start * (T - 1)``. The observer knows
everything about the scene but the attribute (``--attribute shape``: colour, size, place, background;
``colour``: the rest) and picks, of the scene rendered with each value of it, the one whose latent
``z_k`` makes x_t likeliest: ``argmin_k |x_t - a z_k|^2``, the maximum-likelihood (and, with every
value equally likely, Bayes-optimal) choice under the Gaussian noise. Its accuracy at t is the most
any denoiser handed the scene at t can keep of the attribute (with the rest known; a denoiser must
infer the rest too, so its ceiling is a little lower): the reference for ``denoise_probe.py``'s
SDEdit rows (``1_object/shape`` from ``--start``). Where the trunk keeps much less than the
observer, the evidence is in x_t and the trunk does not use it; where the observer is at chance,
the condition has to supply the attribute.

Nothing here runs the trunk; the head gives only its latent scale and schedule.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from torch import Tensor

from datamodules import demo
from multimodal.checkpoint import resolve_checkpoint
from tasks import GenerationHead, MultiTaskModule


def observer_hits(candidates: Tensor, truth: Tensor, a: float, b: float, generator: torch.Generator) -> Tensor:
    """The ideal observer's verdicts on one noise draw.

    candidates [M, K, N, D]: each scene's normalised latent with each of the K values of the attribute;
    truth [M] long: the value the scene has. x_t = a * candidates[m, truth[m]] + b * eps; the observer
    picks argmin_k |x_t - a * candidates[m, k]|^2 -> bool [M], True where it picked the truth.
    """
    M = candidates.shape[0]
    x0 = candidates[torch.arange(M), truth]
    eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
    x_t = a * x0 + b * eps
    distance = (x_t[:, None] - a * candidates).square().flatten(2).sum(-1)  # [M, K]
    return distance.argmin(dim=1) == truth


def draw_scenes(count: int, attribute: str, seed: int) -> tuple[Tensor, Tensor, list[str]]:
    """``count`` one-object demo scenes, each rendered once per value of ``attribute`` (shape or colour)
    -> images [count, K, 3, 32, 32] in [-1, 1], the drawn value [count] long, each scene's size."""
    values = list(demo.SHAPES) if attribute == "shape" else list(demo.COLOURS)
    rng = np.random.default_rng(seed)
    images, truth, sizes = [], [], []
    for _ in range(count):
        objects = None
        while objects is None:
            objects = demo._place(rng, 1)
        obj = objects[0]
        obj["shape"], obj["colour"] = str(rng.choice(demo.SHAPES)), str(rng.choice(list(demo.COLOURS)))
        _, background = demo.draw_background(rng)
        jitter = demo.draw_jitter(rng)
        renders = []
        for value in values:
            variant = {**obj, attribute: value}
            image = demo.render_scene([variant], [demo.object_rgb(variant["colour"], jitter)], background)
            renders.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1))
        images.append(torch.stack(renders))
        truth.append(values.index(obj[attribute]))
        sizes.append(obj["size"])
    return torch.stack(images), torch.tensor(truth), sizes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="an image generation checkpoint or its run folder")
    p.add_argument("--task", default=None, help="the generation head (default: the first)")
    p.add_argument("--attribute", default="shape", choices=["shape", "colour"])
    p.add_argument("--start", type=float, nargs="+", default=[0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9],
                   help="noise levels, as fractions of the time range (as denoise_probe.py's --start)")
    p.add_argument("--scenes", type=int, default=400, help="one-object scenes (default 400)")
    p.add_argument("--draws", type=int, default=4, help="noise draws a scene and level (default 4)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if any(not 0 <= s <= 1 for s in args.start):
        p.error(f"--start values must be in [0, 1], got {args.start}")
    if args.scenes < 1 or args.draws < 1:
        p.error("--scenes and --draws must be >= 1")

    torch.set_grad_enabled(False)
    ckpt = resolve_checkpoint(args.ckpt)
    model = MultiTaskModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True).eval()
    heads = {t: h for t, h in model.heads.items() if isinstance(h, GenerationHead)}
    task = args.task or next(iter(heads), None)
    if task not in heads:
        raise SystemExit(f"{ckpt}: no generation head {task!r} (generation heads: {sorted(heads)})")
    head = heads[task]
    if head.modality != "image":
        raise SystemExit(f"head {task!r} generates {head.modality}: the observer draws demo shapes images")
    diffusion = head.diffusion

    images, truth, sizes = draw_scenes(args.scenes, args.attribute, args.seed)
    M, K = images.shape[:2]
    latents = []
    for chunk in images.flatten(0, 1).split(256):
        latents.append(model.backbone.quantized_latents("image", chunk)[0])
    candidates = diffusion.normalize(torch.cat(latents)).double().view(M, K, *latents[0].shape[1:])
    groups = {size: torch.tensor([s == size for s in sizes]) for size in demo.OBJECT_SIZES}
    groups["all"] = torch.ones(M, dtype=torch.bool)
    print(f"{M} one-object scenes, {K} values of {args.attribute} each, tokenizer of {ckpt}; "
          f"chance {1 / K:.3f}")
    generator = torch.Generator().manual_seed(args.seed)
    one = torch.ones(1, 1, 1, dtype=torch.float64)
    for start in args.start:
        if diffusion.objective == "flow":
            t = torch.tensor([start], dtype=torch.float64)
            where = f"s = {start:.2f}"
        else:
            t = torch.tensor([round(start * (diffusion.num_timesteps - 1))])
            where = f"t = {int(t)}"
        a = float(diffusion.q_sample(one, t, torch.zeros_like(one)))  # x_t = a x0 + b eps
        b = float(diffusion.q_sample(torch.zeros_like(one), t, one))
        hits = torch.stack([observer_hits(candidates, truth, a, b, generator) for _ in range(args.draws)]).double()
        snr = a * a / max(b * b, 1e-300)
        accuracy = {name: round(float(hits[:, sel].mean()), 3) for name, sel in groups.items() if sel.any()}
        print(f"start {start:.2f} ({where}, SNR {snr:.4g}): {args.attribute} {accuracy}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
