"""Benchmarks, side by side with reference implementations.

    python scripts/benchmark.py data        # WebDataModule vs bare webdataset vs ImageFolder
    python scripts/benchmark.py quantizer   # VectorQuantizer vs vector-quantize-pytorch
    python scripts/benchmark.py matmul      # this machine's fp32 and bf16 matmul rates
    python scripts/benchmark.py dit         # DiT-S/2: ours vs facebookresearch/DiT vs diffusers, fp32 and bf16
    python scripts/benchmark.py stage2      # a quickstart stage-2 step: the old path vs each speed-up
    python scripts/benchmark.py assistant   # the assistant: model load, one image, one clip, generation
    python scripts/benchmark.py kernels     # attention, GELU, allocator, TaskAdamW: the CPU speed choices
    python scripts/benchmark.py sizes       # what an image size costs per step, stage 1 and stage 2
    python scripts/benchmark.py text_metrics  # chrF++: torchmetrics vs sacrebleu; the constant-caption search
    python scripts/benchmark.py vocoder     # the learned vocoder vs gemelo-ai/vocos vs Griffin-Lim, mel -> waveform

Each subcommand lives in ``scripts/benchmarks/<name>.py`` and exposes ``add_arguments(parser)``
and ``run(args)``. Numbers are printed, never asserted in tests.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv: list[str] | None = None) -> None:
    import benchmarks

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="bench", required=True)
    for info in sorted(pkgutil.iter_modules(benchmarks.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"benchmarks.{info.name}")
        p = sub.add_parser(info.name, help=(module.__doc__ or "").strip().splitlines()[0])
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    args = parser.parse_args(argv)
    args._run(args)


if __name__ == "__main__":
    main()
