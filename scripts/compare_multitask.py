"""Single-task vs multi-task at the same budget: train every head alone, then all together, and
print the test metrics side by side.

    python scripts/compare_multitask.py --config configs/multitask.yaml --steps 1500 --out runs/compare

Each single-task run is the multi-task config with one head and its data task left, trained for
the same number of optimizer steps (so the multi-task trunk sees every task's batch at every
step, as many steps as each single-task trunk). Every run is then tested on its test split;
the table (Markdown, also written to ``<out>/comparison.md`` and ``.json``) shows each head's
main metric alone vs together and the difference, signed so that positive = sharing helped.

``--jobs N`` trains N runs at once in separate processes, each with ``cores / N`` threads (the
runs are independent; on 2 cores ``--jobs 2`` halves the wall time). ``--eval-samples K`` sets the
generation heads' sample count for the test (the main metric's noise: 100 samples give a
binomial std of about 0.05 at accuracy 0.5).
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from multimodal.cli import main as lightning  # noqa: E402

# head class -> (main metric, higher is better)
MAIN_METRIC = {
    "tasks.GenerationHead": ("gen_acc", True),
    "tasks.ClassificationHead": ("acc", True),
    "tasks.CaptioningHead": ("bleu4", True),
    "tasks.SpeechHead": ("wer", False),
    "tasks.ReconstructionHead": ("psnr", True),
}


def single_task(cfg: dict[str, Any], task: str) -> dict[str, Any]:
    """The config with only ``task``'s head and data, and no loss weights: the single-task model is
    plain AdamW at the recipe's learning rate (under ``shared_adam: per_task`` a weight would scale
    that task's trunk step, i.e. its learning rate)."""
    out = copy.deepcopy(cfg)
    model = out["model"]["init_args"]
    model["heads"] = {task: model["heads"][task]}
    model.pop("loss_weights", None)
    data = out["data"]["init_args"]
    data["tasks"] = {task: data["tasks"][task]}
    return out


def train_and_test(cfg: dict[str, Any], run_dir: Path, steps: int) -> dict[str, float]:
    cfg = copy.deepcopy(cfg)
    cfg["trainer"].update(default_root_dir=str(run_dir), max_steps=steps)
    cfg["trainer"].pop("max_time", None)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    lightning(["fit", "--config", str(path)])
    ckpt = max(run_dir.rglob("last.ckpt"), key=lambda p: p.stat().st_mtime)
    lightning(["test", "--config", str(path), f"--ckpt_path={ckpt}"])
    report = max(run_dir.rglob("test_metrics.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(report.read_text())


def _worker(threads: int, cfg: dict[str, Any], run_dir: Path, steps: int) -> dict[str, float]:
    import torch

    torch.set_num_threads(threads)
    return train_and_test(cfg, run_dir, steps)


def compare(cfg: dict[str, Any], out: Path, steps: int, tasks: list[str] | None = None, jobs: int = 1,
            eval_samples: int | None = None) -> list[dict[str, Any]]:
    heads = cfg["model"]["init_args"]["heads"]
    tasks = tasks or list(heads)
    unknown = sorted(set(tasks) - set(heads))
    if unknown:
        raise SystemExit(f"--tasks names tasks with no head: {unknown} (heads: {sorted(heads)})")
    if eval_samples is not None:
        cfg = copy.deepcopy(cfg)
        for head in cfg["model"]["init_args"]["heads"].values():
            if head["class_path"] == "tasks.GenerationHead":
                head.setdefault("init_args", {})["eval_samples"] = eval_samples
    runs = {"multi": cfg, **{f"single-{task}": single_task(cfg, task) for task in tasks}}
    if jobs > 1:
        threads = max(1, (os.cpu_count() or jobs) // jobs)
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {name: pool.submit(_worker, threads, c, out / name, steps) for name, c in runs.items()}
            results = {name: f.result() for name, f in futures.items()}
    else:
        results = {name: train_and_test(c, out / name, steps) for name, c in runs.items()}
    multi = results["multi"]
    rows = []
    for task in tasks:
        metric, higher = MAIN_METRIC.get(heads[task]["class_path"], ("loss", False))
        alone = results[f"single-{task}"]
        key = f"test/{task}/{metric}"
        a, m = alone.get(key), multi.get(key)
        delta = None if a is None or m is None else (m - a if higher else a - m)
        rows.append({"task": task, "metric": metric, "higher_is_better": higher, "single": a, "multi": m,
                     "sharing_gain": delta})
    return rows


def table(rows: list[dict[str, Any]], steps: int) -> str:
    def fmt(v: Any) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    lines = [f"| task | metric | single-task ({steps} steps) | multi-task ({steps} steps) | gain from sharing |",
             "| --- | --- | --- | --- | --- |"]
    for r in rows:
        arrow = "" if r["higher_is_better"] else " (lower is better)"
        gain = "n/a" if r["sharing_gain"] is None else f"{r['sharing_gain']:+.4f}"
        lines.append(f"| {r['task']} | {r['metric']}{arrow} | {fmt(r['single'])} | {fmt(r['multi'])} | {gain} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "multitask.yaml"))
    parser.add_argument("--steps", type=int, default=1500, help="optimizer steps of every run")
    parser.add_argument("--out", default="runs/compare")
    parser.add_argument("--tasks", nargs="*", default=None, help="heads to train alone (default: all)")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at once (separate processes)")
    parser.add_argument("--eval-samples", type=int, default=None, help="generated samples per test (generation heads)")
    args = parser.parse_args(argv)
    cfg = yaml.safe_load(Path(args.config).read_text())
    if "tasks" not in cfg.get("data", {}).get("init_args", {}):
        raise SystemExit(f"{args.config} is not a multi-task config (data.init_args.tasks is missing)")
    out = Path(args.out)
    rows = compare(cfg, out, args.steps, args.tasks, args.jobs, args.eval_samples)
    text = table(rows, args.steps)
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.md").write_text(text)
    (out / "comparison.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(text)
    return rows


if __name__ == "__main__":
    main()
