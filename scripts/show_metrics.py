"""Print the latest value of every scalar a run logged to TensorBoard (optionally filtered).

    python scripts/show_metrics.py runs/tokenizer                      # newest version under it
    python scripts/show_metrics.py runs/tokenizer/lightning_logs/version_3 --grep val/ psnr
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def latest_scalars(run: Path) -> dict[str, tuple[int, float]]:
    files = sorted(run.rglob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise SystemExit(f"no TensorBoard event files under {run}")
    folder = files[-1].parent
    out: dict[str, tuple[int, float]] = {}
    for f in sorted(folder.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            event = acc.Scalars(tag)[-1]
            out[tag] = (event.step, event.value)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a run folder (the newest event files under it are read)")
    parser.add_argument("--grep", nargs="*", default=[], help="show only tags containing all of these strings")
    args = parser.parse_args()
    for tag, (step, value) in sorted(latest_scalars(args.run).items()):
        if all(g in tag for g in args.grep):
            print(f"{tag:60s} step {step:6d}  {value:.4f}")


if __name__ == "__main__":
    main()
