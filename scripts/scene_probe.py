"""Train the scene judge ALONE on real shapes images and score it on the validation split, seen vs
held-out attribute combinations: a diagnostic of ``tasks.scene_judge.SceneJudge``, apart from any
generation run.

    python scripts/scene_probe.py --variant two_pathways --steps 600   # the judge the head trains
    python scripts/scene_probe.py --variant one_network --steps 600    # one body reads every attribute

``two_pathways``: geometry body on recoloured images + its own colour pathway (what ``GenerationHead``
builds for ``scene_attributes`` with a ``colour``); ``one_network``: no colour pathway, no recolouring.
The training split never holds the held-out combinations (``info.json`` ``heldout_combinations``), so a
judge that learns "purple, so not a circle" misreads exactly the unseen ones: this is how that
shortcut was found. Prints one JSON line: count / each attribute / all, for seen and unseen captions
(``SceneScores`` on the real validation images), and the wall time. fp32 unless the CPU has bf16 units.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # probe_loop beside this file

from probe_loop import add_data_arguments, start, train_alone  # noqa: E402

from datamodules import WebDataModule  # noqa: E402
from tasks.scene_judge import SceneJudge, SceneScores, heldout_indices, unseen_mask  # noqa: E402

VARIANTS = ("two_pathways", "one_network")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", choices=VARIANTS, default="two_pathways")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--threshold", type=float, default=0.5)
    add_data_arguments(p, "shapes")
    args = p.parse_args(argv)
    source = start(args)
    data = WebDataModule(**source, keys=["image", "objects"], batch_size=args.batch_size, num_workers=0)
    data.setup("fit")
    attributes = data.attributes
    if not attributes:
        raise SystemExit("the data's info.json has no scene attributes (info.json 'attributes')")
    names = list(attributes)
    colour = [j for j, n in enumerate(names) if n in ("colour", "color")]
    colour_index = colour[0] if colour and args.variant == "two_pathways" else None
    judge = SceneJudge(3, [len(v) for v in attributes.values()], args.width, colour_index=colour_index)
    heldout = heldout_indices(attributes, data.heldout_combinations)
    train_s, bf16 = train_alone(judge, lambda b: judge.loss(b["image"], b["objects"])[0],
                                data.train_dataloader, args.steps, args.lr)
    scores = SceneScores(names, prefix="real")
    with torch.no_grad():
        for batch in data.val_dataloader():
            found = judge.detect(batch["image"], args.threshold)
            scores.update(found, batch["objects"], unseen_mask(batch["objects"], heldout))
    out = {k.removeprefix("real/"): round(float(v), 4) for k, v in scores.compute().items()
           if k.split("/")[1] in ("seen", "unseen", "all_captions")}
    print(json.dumps({"variant": args.variant, "steps": args.steps, "train_s": round(train_s, 1), "bf16": bf16,
                      **out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
