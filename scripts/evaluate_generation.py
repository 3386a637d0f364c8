"""Evaluate a generation checkpoint on a split at several guidance scales (the generation head's metrics).

    python scripts/evaluate_generation.py --ckpt runs/generation --guidance 1 3 5 --samples 500

For each guidance: ``gen_acc`` (the judge's accuracy on samples generated for each class, or for
the captions of the split's samples), ``fid_cls`` (real split vs samples, in the judge's feature
space) and, once, ``fid_cls_floor`` (real training data vs the real split), so the gap is visible.
Uses the checkpoint's weights (its EMA weights when the run had the EMA callback) and the data of
the run's saved config.yaml.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from multimodal.checkpoint import read_checkpoint, resolve_checkpoint, run_datamodule
from multimodal.diffusion import SAMPLERS
from tasks import GenerationHead, MultiTaskModule


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a checkpoint or a run folder (its newest last.ckpt)")
    p.add_argument("--task", default=None, help="the generation head (default: the first)")
    p.add_argument("--guidance", type=float, nargs="+", default=[3.0])
    p.add_argument("--samples", type=int, default=500, help="generated samples per guidance")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the head's)")
    p.add_argument("--sampler", choices=sorted({s for names in SAMPLERS.values() for s in names}), default=None,
                   help="the sampler (default: the head's; ddpm is ancestral, euler is for flow)")
    p.add_argument("--eta", type=float, default=None,
                   help="DDIM's stochasticity (default: the head's; 0 deterministic, 1 DDPM-like)")
    p.add_argument("--snap-denoised", type=float, default=None,
                   help="snap the x0 estimate to the codebook in this last fraction of the time range (default: "
                        "the head's; 0 never, 1 every step)")
    p.add_argument("--split", default="test", choices=["val", "test"])
    p.add_argument("--floor-samples", type=int, default=500, help="real training samples for the floor")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--weights", choices=["saved", "raw"], default="saved",
                   help="saved: the checkpoint's state_dict (its EMA average when the run had the EMA callback); "
                        "raw: the training weights of such a checkpoint (current_model_state)")
    args = p.parse_args(argv)

    ckpt = resolve_checkpoint(args.ckpt)
    model = MultiTaskModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True).eval()
    if args.weights == "raw":
        checkpoint = read_checkpoint(ckpt)
        if checkpoint.get("current_model_state") is None:
            raise SystemExit(f"{ckpt} has no current_model_state (the run had no EMA callback): use --weights saved")
        model.fill_tokenizer(checkpoint, ("current_model_state",))  # a frozen tokenizer is referenced, not stored
        model.load_state_dict(checkpoint["current_model_state"])
    heads = {t: h for t, h in model.heads.items() if isinstance(h, GenerationHead)}
    task = args.task or next(iter(heads))
    head, backbone = heads[task], model.backbone
    data = run_datamodule(ckpt, stage="test")
    data = data.tasks[task] if hasattr(data, "tasks") else data
    loader = data.test_dataloader() if args.split == "test" else data.val_dataloader()
    head.eval_samples = args.samples
    if args.steps:
        head.sample_steps = args.steps
    if args.sampler is not None:
        allowed = SAMPLERS[head.diffusion.objective]
        if args.sampler not in allowed:
            raise SystemExit(f"--sampler {args.sampler} does not fit this head's {head.diffusion.objective} process: "
                             f"choose one of {', '.join(allowed)}")
        head.sampler = args.sampler
    if args.eta is not None:
        if args.eta < 0:
            raise SystemExit(f"--eta must be >= 0, got {args.eta}")
        head.eta = args.eta
    if args.snap_denoised is not None:
        if not 0.0 <= args.snap_denoised <= 1.0:
            raise SystemExit(f"--snap-denoised must be in [0, 1], got {args.snap_denoised}")
        head.snap_denoised = args.snap_denoised
    with torch.no_grad():
        floor = []
        for batch in data.train_dataloader():
            floor.append(head.judge_input(backbone, batch))
            if sum(len(f) for f in floor) >= args.floor_samples:
                break
        head._floor = list(torch.cat(floor)[: args.floor_samples])
        results = {}
        for g in args.guidance:
            head.guidance = g
            metrics = head.build_metrics(backbone)
            head._evaluations = 0
            head.reset_evaluation(active=True)
            for batch in loader:
                head.evaluate(backbone, batch, metrics)
            head.evaluate_end(backbone, metrics, seed=args.seed)
            values = {k: float(v) for k, v in metrics.compute().items()}
            results[g] = values
            print(f"guidance {g:4.1f}: gen_acc {values['gen_acc']:.3f}  fid_cls {values['fid_cls']:.2f}  "
                  f"fid_cls_floor {values['fid_cls_floor']:.2f}  judge_acc_real {values['judge_acc_real']:.3f}  "
                  f"({args.samples} samples, {head.sample_steps} steps, {head.sampler or 'default'} sampler, "
                  f"eta {head.eta}, snap {head.snap_denoised}, {args.split} split)", flush=True)
            scene = {k.removeprefix("scene/"): v for k, v in values.items() if k.startswith("scene/") and k.endswith("/all")}
            if scene:  # the scene judge's whole-caption accuracy by caption group (all of its metrics: --json)
                print("  whole caption right: " + "  ".join(f"{k.removesuffix('/all')} {v:.3f}" for k, v in scene.items()),
                      flush=True)
    if args.json:
        args.json.write_text(json.dumps({str(k): v for k, v in results.items()}, indent=2))


if __name__ == "__main__":
    main()
