"""What a checkpoint's bytes are spent on: weights by module, the EMA's raw copy, optimizer moments per task.

    python scripts/checkpoint_size.py runs/quickstart/stage2            # a run folder (its newest last.ckpt) or a file

Prints the file size and a table of tensor bytes by part: ``state_dict`` (the weights; under EMA the
average) by top-level module, ``current_model_state`` (EMA's raw weights), the optimizer's moments (per
task for ``TaskAdamW``'s shared parameters), and everything else; and whether the frozen tokenizer is
stored or referenced (``tokenizer_reference``).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from multimodal.checkpoint import read_checkpoint, resolve_checkpoint  # noqa: E402


def tensor_bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    return 0


def breakdown(checkpoint: dict[str, Any]) -> Counter[str]:
    """Bytes of tensors by part (see the module docstring)."""
    parts: Counter[str] = Counter()
    for key, value in checkpoint.items():
        if key in ("state_dict", "current_model_state"):
            for name, tensor in value.items():
                module = ".".join(name.split(".")[:2]) if name.startswith(("backbone.", "heads.")) else name.split(".")[0]
                parts[f"{key}: {module}"] += tensor_bytes(tensor)
        elif key == "optimizer_states":
            for opt in value:
                for state in opt.get("state", {}).values():
                    for task, moments in state.get("tasks", {}).items():
                        parts[f"optimizer: shared weights, task {task}"] += tensor_bytes(moments)
                    rest = {k: v for k, v in state.items() if k != "tasks"}
                    parts["optimizer: other weights"] += tensor_bytes(rest)
        else:
            parts[key] += tensor_bytes(value)
    return parts


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", help="a checkpoint file or a run folder")
    args = p.parse_args(argv)
    path = resolve_checkpoint(args.ckpt)
    checkpoint = read_checkpoint(path)
    size = path.stat().st_size
    link = f" (link to {path.resolve().name})" if path.is_symlink() else ""
    print(f"{path}{link}: {size / 2**20:.1f} MiB on disk, step {checkpoint.get('global_step')}")
    reference = checkpoint.get("tokenizer_reference")
    print(f"frozen tokenizer: {'referenced: ' + reference['path'] if reference else 'stored in the checkpoint'}")
    print("| part | MiB |\n| --- | --- |")
    for part, n in sorted(breakdown(checkpoint).items(), key=lambda kv: -kv[1]):
        if n:
            print(f"| {part} | {n / 2**20:.1f} |")


if __name__ == "__main__":
    main()
