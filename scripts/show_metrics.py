"""Print the latest value of every scalar a run logged to TensorBoard (optionally filtered).

    python scripts/show_metrics.py runs/tokenizer                      # newest version under it
    python scripts/show_metrics.py runs/tokenizer/lightning_logs/version_3 --grep val/ psnr
    python scripts/show_metrics.py runs/generation --grep train/ loss_q --steps 800 1000   # mean over steps [800, 1000)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def latest_scalars(run: Path, steps: tuple[int, int] | None = None) -> dict[str, tuple[int, float]]:
    """tag -> (step, value) of the newest event, or with ``steps = (a, b)`` -> (events, their mean) over
    the steps in [a, b) (a train loss is noisy step to step)."""
    files = sorted(run.rglob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise SystemExit(f"no TensorBoard event files under {run}")
    folder = files[-1].parent
    out: dict[str, tuple[int, float]] = {}
    window: dict[str, list[float]] = {}
    for f in sorted(folder.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            events = acc.Scalars(tag)
            out[tag] = (events[-1].step, events[-1].value)
            if steps is not None:
                window.setdefault(tag, []).extend(e.value for e in events if steps[0] <= e.step < steps[1])
    if steps is not None:
        return {tag: (len(values), sum(values) / len(values)) for tag, values in window.items() if values}
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a run folder (the newest event files under it are read)")
    parser.add_argument("--grep", nargs="*", default=[], help="show only tags containing all of these strings")
    parser.add_argument("--steps", nargs=2, type=int, metavar=("FROM", "TO"),
                        help="the mean of each scalar over the steps in [FROM, TO) instead of its newest value")
    args = parser.parse_args(argv)
    scalars = latest_scalars(args.run, tuple(args.steps) if args.steps else None)
    for tag, (step, value) in sorted(scalars.items()):
        if all(g in tag for g in args.grep):
            label = f"mean of {step:4d}" if args.steps else f"step {step:6d}"
            print(f"{tag:60s} {label}  {value:.4f}")


if __name__ == "__main__":
    main()
