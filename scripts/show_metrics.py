"""Print the latest value of every scalar a run logged to TensorBoard (optionally filtered).

    python scripts/show_metrics.py runs/tokenizer                      # newest version under it
    python scripts/show_metrics.py runs/tokenizer/lightning_logs/version_3 --grep val/ psnr
    python scripts/show_metrics.py runs/generation --grep train/ loss_q --steps 800 1000   # mean over steps [800, 1000)
    python scripts/show_metrics.py runs/generation --timing   # wall time: the whole fit, a step, the pauses
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


def timing(run: Path) -> dict[str, float]:
    """How long a fit took, from the wall times of its most often logged training scalar: the first and
    last logged step, the wall seconds between them, the median seconds a step between consecutive logged
    steps (training alone: a validation or a checkpoint falls in few intervals), and the rest of the wall
    time (validations, checkpoints, sample logging)."""
    files = sorted(run.rglob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise SystemExit(f"no TensorBoard event files under {run}")
    events: dict[str, list] = {}
    for f in sorted(files[-1].parent.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            if tag.startswith("train/"):
                events.setdefault(tag, []).extend(acc.Scalars(tag))
    if not events:
        raise SystemExit(f"no train/ scalars under {run}")
    series = max(events.values(), key=len)
    if len(series) < 3:
        raise SystemExit(f"too few logged training steps under {run} to time it ({len(series)})")
    rates = sorted((b.wall_time - a.wall_time) / (b.step - a.step) for a, b in zip(series, series[1:]) if b.step > a.step)
    first, last = series[0], series[-1]
    wall = last.wall_time - first.wall_time
    step = rates[len(rates) // 2]
    return {"first_step": first.step, "last_step": last.step, "wall_s": wall, "step_s": step,
            "pauses_s": max(wall - step * (last.step - first.step), 0.0)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a run folder (the newest event files under it are read)")
    parser.add_argument("--grep", nargs="*", default=[], help="show only tags containing all of these strings")
    parser.add_argument("--steps", nargs=2, type=int, metavar=("FROM", "TO"),
                        help="the mean of each scalar over the steps in [FROM, TO) instead of its newest value")
    parser.add_argument("--timing", action="store_true",
                        help="print the fit's wall time, its median time a step and its pauses instead")
    args = parser.parse_args(argv)
    if args.timing:
        t = timing(args.run)
        print(f"steps {t['first_step']}-{t['last_step']}: {t['wall_s'] / 60:.1f} min wall, {t['step_s']:.3f} s a step "
              f"(median between logged steps), {t['pauses_s'] / 60:.1f} min of pauses (validation, checkpoints)")
        return
    scalars = latest_scalars(args.run, tuple(args.steps) if args.steps else None)
    for tag, (step, value) in sorted(scalars.items()):
        if all(g in tag for g in args.grep):
            label = f"mean of {step:4d}" if args.steps else f"step {step:6d}"
            print(f"{tag:60s} {label}  {value:.4f}")


if __name__ == "__main__":
    main()
