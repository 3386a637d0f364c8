"""How usable are a trained trunk's features for a NEW classification head? (frozen trunk)

    python scripts/probe_features.py --ckpt runs/quickstart/stage2 [--task classify] [--steps 300]

For a checkpoint with a ``ClassificationHead``, encodes training and test inputs once through the
frozen trunk as the head reads them (t = 0, null condition; ``tasks.heads.features``) and prints:

* ``sample share``: per-sample std / total std of the features (1 = all of the variation is between
  samples; small = a sample-independent offset dominates);
* ``linear probe``: test accuracy of a logistic regression on the standardised, flattened features
  (what the features contain);
* ``fresh head, norm=none|batch``: test accuracy of a new head of the same settings trained
  ``--steps`` steps on them (AdamW, the head's own code), without and with ``FeatureNorm``
  (how easily a head finds it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from multimodal.checkpoint import resolve_checkpoint, run_datamodule  # noqa: E402
from tasks import ClassificationHead, MultiTaskModule  # noqa: E402


@torch.no_grad()
def encode(head: ClassificationHead, backbone, loader, n: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """-> raw trunk features [n, N, H] (before the reader's norm), mask or None, labels [n]."""
    hs, masks, ys = [], [], []
    for batch in loader:
        h, mask = head.reader._encode(backbone, batch)
        hs.append(h)
        masks.append(mask)
        ys.append(batch["label"])
        if sum(len(y) for y in ys) >= n:
            break
    if masks[0] is not None:  # pad variable-length audio to one width
        width = max(h.shape[1] for h in hs)
        hs = [F.pad(h, (0, 0, 0, width - h.shape[1])) for h in hs]
        masks = [F.pad(m, (0, width - m.shape[1])) for m in masks]
        return torch.cat(hs)[:n], torch.cat(masks)[:n], torch.cat(ys)[:n]
    return torch.cat(hs)[:n], None, torch.cat(ys)[:n]


def linear_probe(xtr: torch.Tensor, ytr: torch.Tensor, xte: torch.Tensor, yte: torch.Tensor, classes: int) -> float:
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    w = torch.zeros(xtr.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(xtr @ w + b, ytr) + 1e-3 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(((xte @ w + b).argmax(-1) == yte).float().mean())


def fresh_head(template: ClassificationHead, norm: str, data: tuple, steps: int, batch: int, lr: float, seed: int) -> float:
    htr, mtr, ytr, hte, mte, yte = data
    torch.manual_seed(seed)
    head = ClassificationHead(
        modality=template.modality, num_classes=template.num_classes, trunk_hidden=template.trunk_hidden,
        feature_norm=norm, pooling=template.pooling, hidden=template.fc1.out_features,
        pool_heads=template.pool.num_heads if template.pool is not None else 4,
        label_smoothing=template.label_smoothing,
    )
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.01)

    def forward(h: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
        if head.reader.norm is not None:
            h = head.reader.norm(h, m)
        return head.classify(h, m)

    head.train()
    for _ in range(steps):
        idx = torch.randint(0, len(htr), (batch,))
        m = mtr[idx] if mtr is not None else None
        loss = F.cross_entropy(forward(htr[idx], m), ytr[idx], label_smoothing=head.label_smoothing)
        opt.zero_grad()
        loss.backward()
        opt.step()
    head.eval()
    with torch.no_grad():
        return float((forward(hte, mte).argmax(-1) == yte).float().mean())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a checkpoint or a run folder (its newest last.ckpt)")
    p.add_argument("--task", default=None, help="the classification head (default: the first)")
    p.add_argument("--train-samples", type=int, default=2048)
    p.add_argument("--test-samples", type=int, default=500)
    p.add_argument("--steps", type=int, default=300, help="training steps of each fresh head")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    ckpt = resolve_checkpoint(args.ckpt)
    model = MultiTaskModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True).eval()
    heads = {t: h for t, h in model.heads.items() if isinstance(h, ClassificationHead)}
    if not heads:
        raise SystemExit(f"{ckpt} has no ClassificationHead (heads: {sorted(model.heads)})")
    task = args.task or next(iter(heads))
    head = heads[task]
    data = run_datamodule(ckpt, stage="fit")
    data = data.tasks[task] if hasattr(data, "tasks") else data
    htr, mtr, ytr = encode(head, model.backbone, data.train_dataloader(), args.train_samples)
    data.setup("test")
    hte, mte, yte = encode(head, model.backbone, data.test_dataloader(), args.test_samples)

    real = htr[mtr] if mtr is not None else htr.reshape(-1, htr.shape[-1])
    flat_tr = htr.flatten(1) if mtr is None else (htr * mtr[..., None]).sum(1) / mtr.sum(1, keepdim=True)
    flat_te = hte.flatten(1) if mte is None else (hte * mte[..., None]).sum(1) / mte.sum(1, keepdim=True)
    share = float(htr.std(0).mean() / real.std())
    print(f"{ckpt} head {task!r}: {len(htr)} train / {len(hte)} test inputs, features {tuple(htr.shape[1:])}")
    print(f"sample share of the feature variation: {share:.3f}")
    print(f"linear probe ({'flattened' if mtr is None else 'mean-pooled'}): test acc {linear_probe(flat_tr, ytr, flat_te, yte, head.num_classes):.3f}")
    for norm in ("none", "batch"):
        acc = fresh_head(head, norm, (htr, mtr, ytr, hte, mte, yte), args.steps, args.batch, args.lr, args.seed)
        print(f"fresh head, norm={norm:5s}: test acc {acc:.3f} after {args.steps} steps of batch {args.batch}")


if __name__ == "__main__":
    main()
