"""Where in the time range does an image generation trunk lose a real scene? (SDEdit, Meng et al. 2022)

    python scripts/denoise_probe.py --ckpt runs/generation_shapes --start 0.2 0.4 0.6 0.8 1.0 \
        --samples 128 --grid runs/denoise_probe.png

Real validation images are encoded to their code vectors, noised to ``t = start * (T - 1)`` and
denoised from there by the trunk with their own captions or labels (the head's sampler, guidance
and step count), then snapped and decoded like any sample, and judged by the head's own judges: the
scene judge (GenEval-style scores) when the head has one, the label judge otherwise. At start = 1
this is plain generation; as start falls the trunk is handed more of the real scene. The start at
which an attribute's score collapses is where the trunk would have had to decide it, and failed.

``--grid`` writes one row per start (the first eight images), under the real images and their
renderings by the tokenizer. Uses the checkpoint's weights (EMA ones when the run had the callback).

``--swap shape`` (or any attribute of the scene annotations) asks whether the trunk READS that word:
the one-object scenes are denoised with their caption's word for it replaced by another value
("a large red circle" -> "a large red square"), and the result is judged twice, against the caption
it was given (``follows caption``) and against the scene it started from (``follows image``). A trunk
that uses the word follows the caption once the start leaves it room to redraw (start >= 0.6); one
that ignores it follows the image at low starts and neither at high ones. Before sampling, the same
scenes give the trunk's diffusion loss at fixed timesteps (``--loss-t``, the same noise for every
caption) with the true caption, the swapped one and none: ``word share = (swapped - true) / (none -
true)`` is the part of what the caption tells the trunk at that t that the word carries (0: the trunk
ignores the word). It needs no sampling, so it shows a word being learnt long before samples do.

    python scripts/denoise_probe.py --ckpt runs/generation_shapes --start 0.4 0.6 1.0 --swap shape

``--breakdown size`` (any attribute of the annotations; a head with ``scene_breakdown`` uses its own)
also scores the one-object scenes per value of it, e.g. whether small objects are lost at a start
where large ones survive.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from multimodal.checkpoint import resolve_checkpoint, run_datamodule
from multimodal.precision import autocast_dtype
from tasks import GenerationHead, MultiTaskModule
from tasks.scene_judge import SceneScores

SHOWN = ("1_object/all", "1_object/count", "1_object/colour", "1_object/shape", "1_object/size",
         "2_objects/all", "all_captions/all")


def _batches(loader, n: int) -> list[dict]:
    out, seen = [], 0
    for batch in loader:
        out.append(batch)
        seen += len(batch["image"])
        if seen >= n:
            break
    return out


def _judge(head: GenerationHead, images: torch.Tensor, batch: dict, scores: dict) -> None:
    """Accumulate the head's judges' verdicts on ``images`` for ``batch``'s conditions into ``scores``."""
    if head.scene_judge is not None:
        metric = scores.setdefault("scene", SceneScores(list(head.scene_attributes), prefix="scene",
                                                        breakdown=head.scene_breakdown))
        head._score_scenes(metric, images, batch["objects"])
    if head.judge is not None and "label" in batch:
        hits = (head.judge.classify(images.float()).argmax(-1) == batch["label"]).float()
        scores.setdefault("label", []).append(hits)


def _swapped(batch: dict, name: str, values: list[str], column: int, tokenizer) -> dict | None:
    """The batch's one-object items with the caption's ``name`` word replaced by another value of it
    (value index + 1 + item % (n - 1), so every other value occurs) -> a batch with the new
    ``text_ids``/``text_lengths``/``objects`` and the old objects as ``objects_image``; None if none."""
    keep = [i for i in range(len(batch["text"])) if batch["objects"][i, 1, 0] < 0]
    ids, objects, images, originals = [], [], [], []
    for n, i in enumerate(keep):
        old = int(batch["objects"][i, 0, column])
        new = (old + 1 + n % (len(values) - 1)) % len(values)
        text, count = re.subn(rf"\b{re.escape(values[old])}\b", values[new], batch["text"][i], count=1)
        if not count:
            continue  # the caption does not name it with the annotation's word
        ids.append(tokenizer.encode(text)[0])
        swapped = batch["objects"][i].clone()
        swapped[0, column] = new
        objects.append(swapped)
        originals.append(batch["objects"][i])
        images.append(i)
    if not images:
        return None
    lengths = torch.tensor([len(x) for x in ids])
    padded = torch.full((len(ids), int(lengths.max())), tokenizer.pad_id, dtype=torch.long)
    for row, x in enumerate(ids):
        padded[row, : len(x)] = x
    return {"text_ids": padded, "text_lengths": lengths, "objects": torch.stack(objects),
            "objects_image": torch.stack(originals), "index": torch.tensor(images)}


def _summary(scores: dict) -> dict[str, float]:
    out = {}
    if "scene" in scores:
        values = scores["scene"].compute()
        out.update({k: float(values[f"scene/{k}"]) for k in SHOWN if f"scene/{k}" in values})
        out.update({k.removeprefix("scene/"): float(v) for k, v in values.items()  # --breakdown groups
                    if k.startswith("scene/1_object_") and k.endswith("/all")})
    if "label" in scores:
        out["judge_acc"] = float(torch.cat(scores["label"]).mean())
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="an image generation checkpoint or its run folder")
    p.add_argument("--task", default=None, help="the generation head (default: the first)")
    p.add_argument("--start", type=float, nargs="+", default=[0.2, 0.4, 0.6, 0.8, 1.0],
                   help="where denoising starts, as fractions of the time range (1 = pure noise)")
    p.add_argument("--samples", type=int, default=128, help="validation images (default 128)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps over the whole range (default: the head's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grid", type=Path, default=None, help="write the first eight images of each start here")
    p.add_argument("--swap", default=None, metavar="ATTRIBUTE",
                   help="denoise one-object scenes with this attribute's word swapped in the caption (e.g. shape)")
    p.add_argument("--breakdown", default=None, metavar="ATTRIBUTE",
                   help="also score the one-object scenes per value of this attribute (e.g. size)")
    p.add_argument("--loss-t", type=int, nargs="+", default=[200, 400, 600, 800],
                   help="with --swap: timesteps of the true / swapped / no-caption loss table")
    args = p.parse_args(argv)
    if any(not 0 < s <= 1 for s in args.start):
        p.error(f"--start values must be in (0, 1], got {args.start}")
    if args.samples < 1:
        p.error(f"--samples must be >= 1, got {args.samples}")

    torch.set_grad_enabled(False)
    ckpt = resolve_checkpoint(args.ckpt)
    model = MultiTaskModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True).eval()
    heads = {t: h for t, h in model.heads.items() if isinstance(h, GenerationHead)}
    task = args.task or next(iter(heads), None)
    if task not in heads:
        raise SystemExit(f"{ckpt}: no generation head {task!r} (generation heads: {sorted(heads)})")
    head, backbone = heads[task], model.backbone
    if head.modality != "image":
        raise SystemExit(f"head {task!r} generates {head.modality}: the probe judges images only")
    if head.scene_judge is None and head.judge is None:
        raise SystemExit(f"head {task!r} has no judge to score the denoised images with")
    data = run_datamodule(ckpt, stage="validate")
    data = data.tasks[task] if hasattr(data, "tasks") else data
    batches = _batches(data.val_dataloader(), args.samples)
    steps = args.steps or head.sample_steps
    if args.breakdown is not None:
        attributes = getattr(data, "attributes", None) or {}
        if head.scene_judge is None or args.breakdown not in attributes:
            raise SystemExit(f"--breakdown {args.breakdown}: needs a head with a scene judge and the attribute in "
                             f"the data's annotations ({sorted(attributes)})")
        head.scene_breakdown = (args.breakdown, list(attributes[args.breakdown]))
    if args.swap is not None:
        attributes = getattr(data, "attributes", None) or {}
        if head.scene_judge is None or head.condition != "text" or args.swap not in attributes:
            raise SystemExit(f"--swap {args.swap}: needs a caption-conditioned head with a scene judge and "
                             f"the attribute in the data's annotations ({sorted(attributes)})")
        column = 2 + list(attributes).index(args.swap)
        return _swap_probe(head, backbone, batches, args, steps, attributes[args.swap], column, data.tokenizer)

    rows = [torch.cat([b["image"] for b in batches])[:8]]
    codec_scores: dict = {}
    latents = []
    for batch in batches:
        x0, _ = head._latents(backbone, batch)
        latents.append(x0)
        decoded = backbone.decode("image", x0).clamp(-1, 1)
        _judge(head, decoded, batch, codec_scores)
        if len(rows) == 1:
            rows.append(decoded[:8])
    print(f"{len(torch.cat(latents))} validation images of {ckpt}, {head.sampler or 'ddim'} sampler, "
          f"guidance {head.guidance}, {steps} steps over the whole range")
    print("through the tokenizer (the ceiling):", {k: round(v, 3) for k, v in _summary(codec_scores).items()})
    for start in args.start:
        generator = torch.Generator().manual_seed(args.seed)
        scores: dict = {}
        shown = None
        for batch, x0 in zip(batches, latents):
            cond = head._batch_conditions(batch)
            images = _denoise(head, backbone, x0, start, steps, generator, y=cond.get("y"),
                              text_ids=cond.get("text_ids"), text_lengths=cond.get("text_lengths"))
            _judge(head, images, batch, scores)
            shown = images[:8] if shown is None else shown
        rows.append(shown)
        t = round(start * (head.diffusion.num_timesteps - 1))
        print(f"start {start:.2f} (t = {t}):", {k: round(v, 3) for k, v in _summary(scores).items()}, flush=True)
    if args.grid:
        grid = torch.cat([torch.cat(list(r.float()), dim=2) for r in rows], dim=1)
        pixels = ((grid.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
        args.grid.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.ascontiguousarray(pixels)).save(args.grid)
        print(f"wrote {args.grid}: real, through the tokenizer, then one row per start {args.start}")
    return 0


def _denoise(head: GenerationHead, backbone, x0: torch.Tensor, start: float, steps: int,
             generator: torch.Generator, **cond) -> torch.Tensor:
    """SDEdit: x0 [B, N, D] noised to ``start`` and denoised with ``cond`` (y / text_ids, text_lengths) in
    ``round(steps * start)`` steps under the CPU's autocast -> decoded images [B, 3, H, W] float."""
    dtype = autocast_dtype("cpu")
    with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        _, images = head.generate(backbone, generator=generator, steps=max(1, round(steps * start)),
                                  x_start=x0, start=start, **cond)
    return images.float()


def _loss_table(head: GenerationHead, backbone, swaps: list[tuple[dict, dict]], args) -> None:
    """``--swap``: the diffusion loss at fixed t with the true caption, the swapped one and none."""
    for t_value in args.loss_t:
        if not 0 <= t_value < head.diffusion.num_timesteps:
            raise SystemExit(f"--loss-t {t_value}: outside [0, {head.diffusion.num_timesteps})")
        sums = {"true": 0.0, "swapped": 0.0, "none": 0.0}
        count = 0
        for k, (batch, swap) in enumerate(swaps):
            x0 = head._latents(backbone, batch)[0][swap["index"]]
            n = len(x0)
            t = torch.full((n,), t_value, dtype=torch.long)
            noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(args.seed + k))
            true_ids, true_lengths = batch["text_ids"][swap["index"]], batch["text_lengths"][swap["index"]]
            for name, ids, lengths in (("true", true_ids, true_lengths),
                                       ("swapped", swap["text_ids"], swap["text_lengths"]),
                                       ("none", true_ids, torch.zeros_like(true_lengths))):  # all masked: null
                kwargs = head._model_kwargs(backbone, n, text_ids=ids, text_lengths=lengths)
                loss, _ = head.denoising_loss(backbone, x0, None, t, noise=noise, **kwargs)
                sums[name] += float(loss) * n
            count += n
        loss = {k: v / count for k, v in sums.items()}
        gain = loss["none"] - loss["true"]  # what the caption is worth at this t
        share = f"{(loss['swapped'] - loss['true']) / gain:.2f}" if gain > 0 else "n/a (the caption does not help here)"
        print(f"loss at t = {t_value}: true caption {loss['true']:.5f}, {args.swap} swapped {loss['swapped']:.5f}, "
              f"no caption {loss['none']:.5f}; word share {share}", flush=True)


def _swap_probe(head: GenerationHead, backbone, batches: list[dict], args, steps: int, values: list[str],
                column: int, tokenizer) -> int:
    """``--swap``: denoise one-object scenes with the attribute's word swapped; judge against both."""
    swaps = [(batch, _swapped(batch, args.swap, values, column, tokenizer)) for batch in batches]
    swaps = [(b, s) for b, s in swaps if s is not None]
    total = sum(len(s["index"]) for _, s in swaps)
    if not total:
        raise SystemExit(f"--swap {args.swap}: no one-object validation scene whose caption names its "
                         f"{args.swap} with the annotation's word ({values})")
    print(f"{total} one-object validation scenes, their caption's {args.swap} word swapped; "
          f"{head.sampler or 'ddim'} sampler, guidance {head.guidance}")
    _loss_table(head, backbone, swaps, args)
    for start in args.start:
        generator = torch.Generator().manual_seed(args.seed)
        follows: dict[str, dict] = {"caption": {}, "image": {}}
        for batch, swap in swaps:
            x0, _ = head._latents(backbone, batch)
            images = _denoise(head, backbone, x0[swap["index"]], start, steps, generator,
                              text_ids=swap["text_ids"], text_lengths=swap["text_lengths"])
            _judge(head, images, {"objects": swap["objects"]}, follows["caption"])
            _judge(head, images, {"objects": swap["objects_image"]}, follows["image"])
        line = {who: {k.split("/")[1]: round(v, 3) for k, v in _summary(s).items() if k.startswith("1_object")}
                for who, s in follows.items()}
        print(f"start {start:.2f}: follows caption {line['caption']}; follows image {line['image']}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
