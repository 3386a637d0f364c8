"""How the tasks of a multi-task checkpoint pull on the shared trunk: per-task gradient sizes, their
cosines, and each task's share of one joint AdamW step.

    python scripts/task_gradients.py --ckpt runs/compare_joint/multi --batches 3

For every task, the gradient of its loss w.r.t. the trunk's parameters is averaged over
``--batches`` training batches (each task's loss backpropagated alone, the model in training mode
as in fit). Printed: the norm of each task's gradient, the norm after dividing by the checkpoint's
AdamW second moment (``g / sqrt(v)``: how far that task moves the trunk in one joint-AdamW step,
when the checkpoint was trained with ``shared_adam: joint``), the pairwise cosines, and the norms
per trunk block. This measurement motivated ``shared_adam: per_task`` (:mod:`tasks.task_adam`).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from multimodal.checkpoint import read_checkpoint, resolve_checkpoint, run_datamodule  # noqa: E402
from tasks import MultiTaskModule  # noqa: E402


def group_of(name: str) -> str:
    """``backbone.trunk.blocks.3.attn.qkv.weight`` -> ``blocks.3``; other trunk names -> their module."""
    parts = name.split(".")
    return ".".join(parts[2:4]) if parts[2] == "blocks" else parts[2]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a multi-task checkpoint or a run folder (its newest last.ckpt)")
    p.add_argument("--batches", type=int, default=3, help="training batches per task to average over")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    ckpt = resolve_checkpoint(args.ckpt)
    torch.manual_seed(args.seed)
    model = MultiTaskModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
    model.train()
    data = run_datamodule(ckpt, stage="fit")
    tasks = data.tasks if hasattr(data, "tasks") else {next(iter(model.heads)): data}
    for task, dm in tasks.items():
        model.heads[task].bind_data(dm, task)
    trunk = [(n, q) for n, q in model.named_parameters() if n.startswith("backbone.trunk.") and q.requires_grad]

    grads: dict[str, torch.Tensor] = {}
    for task, dm in tasks.items():
        loader = iter(dm.train_dataloader())
        total = torch.zeros(sum(q.numel() for _, q in trunk))
        for _ in range(args.batches):
            model.zero_grad(set_to_none=True)
            loss, _ = model.heads[task].loss(model.backbone, next(loader), model.global_step)
            loss.backward()
            total += torch.cat([(q.grad if q.grad is not None else torch.zeros_like(q)).flatten() for _, q in trunk])
        grads[task] = total / args.batches

    # the checkpoint's joint AdamW second moments, in the optimizer's parameter order
    denom = None
    state = read_checkpoint(ckpt).get("optimizer_states", [{}])[0]
    if model.hparams.get("shared_adam", "joint") == "joint" and state.get("state"):
        order = [id(q) for g in model.configure_optimizers()["optimizer"].param_groups for q in g["params"]]
        index = {pid: i for i, pid in enumerate(order)}
        beta2 = model.hparams.betas[1]
        parts = []
        for _, q in trunk:
            s = state["state"].get(index.get(id(q), -1))
            if s is None:
                parts.append(torch.full((q.numel(),), float("inf")))
                continue
            parts.append((s["exp_avg_sq"] / (1 - beta2 ** float(s["step"]))).sqrt().flatten() + 1e-8)
        denom = torch.cat(parts)

    print(f"{ckpt}: trunk gradients averaged over {args.batches} batches per task")
    for task, g in grads.items():
        share = f"  |g/sqrt(v)| {float((g / denom).norm()):8.1f}" if denom is not None else ""
        print(f"{task:12s} |g| {float(g.norm()):.4f}{share}")
    for a, b in itertools.combinations(grads, 2):
        print(f"cos({a}, {b}) = {float(torch.nn.functional.cosine_similarity(grads[a], grads[b], dim=0)):+.3f}")
    spans: dict[str, list[tuple[int, int]]] = {}
    offset = 0
    for name, q in trunk:
        spans.setdefault(group_of(name), []).append((offset, offset + q.numel()))
        offset += q.numel()
    tables = [("|g|", {t: g for t, g in grads.items()})]
    if denom is not None:
        tables.append(("|g/sqrt(v)|", {t: g / denom for t, g in grads.items()}))
    for title, values in tables:
        print(f"per-group {title}: " + " ".join(f"{t:>11s}" for t in values))
        for group, ranges in spans.items():
            norms = [float(torch.cat([g[a:b] for a, b in ranges]).norm()) for g in values.values()]
            print(f"{group:14s} " + " ".join(f"{x:11.4f}" for x in norms))


if __name__ == "__main__":
    main()
