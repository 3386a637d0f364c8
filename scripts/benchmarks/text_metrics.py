"""Caption metrics: chrF++ by torchmetrics vs sacrebleu (``tasks.text_metrics.ChrF``), and the baseline search.

    python scripts/benchmark.py text_metrics --threads 1

* chrF++ of ``--captions`` demo-shapes training captions (each scored against its scene's four
  references, the candidate being another scene's first caption): torchmetrics' ``CHRFScore`` vs
  ``ChrF`` (sacrebleu), the time of one update + compute and both values;
* ``tasks.caption_baseline.best_constant_captions`` on the demo shapes' training references with the
  captioning head's four metrics: the time per metric and the chosen captions.

Best of ``--repeats``, seconds.
"""

from __future__ import annotations

import argparse
import time


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--captions", type=int, default=200)
    p.add_argument("--repeats", type=int, default=3)


def _best(fn, repeats: int) -> tuple[float, float]:
    best, value = float("inf"), 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - t)
    return best, value


def run(args: argparse.Namespace) -> None:
    import torch
    from torchmetrics.text import CHRFScore

    from datamodules import WebDataModule
    from tasks.caption_baseline import best_constant_captions
    from tasks.heads.captioning import METRICS, _corpus_score
    from tasks.text_metrics import ChrF

    torch.set_num_threads(args.threads)
    references = WebDataModule(demo="shapes", keys=["text"]).split_references("train")
    refs = references[: args.captions]
    preds = [references[i + 1][0] for i in range(len(refs))]

    def score(metric) -> float:
        metric.update(preds, refs)
        return float(metric.compute())

    for name, make in (("torchmetrics CHRFScore", CHRFScore), ("ChrF (sacrebleu)", ChrF)):
        seconds, value = _best(lambda make=make: score(make()), args.repeats)
        print(f"{name:<24} {len(refs)} captions x {len(refs[0])} references: {seconds:.3f} s, chrF++ {value:.4f}")
    for name in METRICS:
        t = time.perf_counter()
        (caption, value), = best_constant_captions(references, {name: _corpus_score(name)}).values()
        print(f"best constant caption for {name:<8} {time.perf_counter() - t:6.1f} s  {value:.4f}  {caption!r}")
