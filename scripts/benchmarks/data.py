"""WebDataModule vs a bare webdataset pipeline and torchvision ImageFolder: samples/s, same decode.

For every data set (a demo name such as ``shapes``, ``digits``, ``spoken``, or a shard folder with
``info.json``) and every ``--workers`` value, the same images / clips go through:

* ``WDM train``: ``WebDataModule.train_dataloader()`` (resampled shards, shuffle buffer on);
* ``WDM val``:   ``WebDataModule.val_dataloader()`` (each val shard once; persistent workers,
  repeated passes until the sample count is reached);
* ``wds``:       a bare webdataset pipeline, ``SimpleShardList -> split_by_worker ->
  tarfile_to_samples -> map(decode) -> batched`` in a ``DataLoader(batch_size=None)``, over the
  training shards in order, with the same decode written out plainly here (PIL open, convert,
  resize + center crop when needed, tensor in [-1, 1]; for audio soundfile + soxr + random crop);
* ``ImageFolder`` (image sets only): torchvision's ``ImageFolder`` over the training images
  extracted once to ``<tmp>/<label>/<key>.png``, ``Resize + CenterCrop + ToTensor + Normalize``,
  random sampling, same batch size and workers.

The first ``--warmup`` batches (at least one per worker, so worker start-up is excluded) are
skipped, then ``--samples`` samples are timed. Ratios are WebDataModule / reference (> 1: faster).
Two tables: samples per wall-clock second, and for ``num_workers=0`` samples per CPU second of the
process, which stays comparable when other jobs share the cores (wall-clock numbers then swing by
tens of percent; ``--repeats`` keeps the best of several interleaved runs).
``--profile`` prints cProfile tables of ``WDM train`` and ``wds`` with ``num_workers=0``.

Note: the training loader reads ``shuffle_buffer`` extra raw samples per worker and epoch to fill
its buffer (discarded at the epoch's end); with these short epochs that shows (try
``--shuffle-buffer 100``).
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import itertools
import math
import multiprocessing
import pstats
import random
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

IMAGE_SAMPLES, AUDIO_SAMPLES = 4096, 1024


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sets", nargs="+", default=["shapes", "digits", "spoken"],
                        help="demo set names or shard folders with info.json (default: shapes digits spoken)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader num_workers values")
    parser.add_argument("--samples", type=int, default=None,
                        help=f"timed samples per loader (default {IMAGE_SAMPLES} images / {AUDIO_SAMPLES} clips)")
    parser.add_argument("--warmup", type=int, default=2,
                        help="batches skipped before timing (raised to num_workers when smaller)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="measure every loader this many times (interleaved) and keep the best; "
                        "use 3 or more on a busy machine")
    parser.add_argument("--cache-dir", default=None, help="where demo sets are generated (demo default)")
    parser.add_argument("--demo-size", default="default", help="demo set size: default or tiny")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--sample-rate", type=int, nargs="+", default=[16000],
                        help="target audio rates; a rate other than the data's adds resampling (e.g. 16000 22050)")
    parser.add_argument("--audio-max-seconds", type=float, default=2.0, help="training crop length of clips")
    parser.add_argument("--shuffle-buffer", type=int, default=1000, help="WebDataModule training shuffle buffer")
    parser.add_argument("--profile", action="store_true",
                        help="also print cProfile tables (num_workers=0) of WDM train and the bare pipeline")


# ---------------------------------------------------------------------------------------- data
def _resolve(name: str, args: argparse.Namespace) -> Path:
    path = Path(name)
    if (path / "info.json").is_file():
        return path
    from datamodules.demo import demo_root

    return Path(demo_root(name, cache_dir=args.cache_dir, seed=0, size=args.demo_size))


def _shards(root: Path, info: dict[str, Any], split: str) -> list[str]:
    return [str(root / s) for s in info["splits"].get(split, {}).get("shards", [])]


def _describe(info: dict[str, Any]) -> str:
    parts = []
    for split, entry in sorted(info["splits"].items()):
        parts.append(f"{split} {entry.get('count', '?')} in {len(entry.get('shards', []))} shards")
    return ", ".join(parts)


# ------------------------------------------------------------------- reference decode (written plainly)
def _ref_image(data: bytes, size: int):
    import torch
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image = image.convert("RGB")
        w, h = image.size
        if (w, h) != (size, size):
            scale = size / min(w, h)
            nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
            image = image.resize((nw, nh), Image.BICUBIC)
            left, top = (nw - size) // 2, (nh - size) // 2
            image = image.crop((left, top, left + size, top + size))
        array = np.array(image)
    return torch.from_numpy(array).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def _ref_audio(data: bytes, rate: int, max_samples: int | None, rng: random.Random):
    import soundfile as sf
    import soxr
    import torch

    wave, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    wave = wave.mean(axis=1)
    if sr != rate:
        wave = soxr.resample(wave, sr, rate, quality="HQ")
    if max_samples and len(wave) > max_samples:
        start = rng.randint(0, len(wave) - max_samples)
        wave = wave[start : start + max_samples]
    return torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32))


class _RefDecode:
    """The bare pipeline's map function (a class so that it pickles for spawned workers)."""

    def __init__(self, kind: str, label: bool, image_size: int, rate: int, max_samples: int | None) -> None:
        self.kind, self.label, self.image_size = kind, label, image_size
        self.rate, self.max_samples, self.rng = rate, max_samples, random.Random(0)

    def __call__(self, sample: dict[str, Any]) -> tuple:
        if self.kind == "image":
            data = next(sample[e] for e in ("png", "jpg", "jpeg", "webp") if e in sample)
            x = _ref_image(data, self.image_size)
        else:
            data = next(sample[e] for e in ("wav", "flac") if e in sample)
            x = _ref_audio(data, self.rate, self.max_samples, self.rng)
        return (x, int(sample["cls"])) if self.label else (x,)


def _ref_collate(samples: list[tuple]) -> tuple:
    import torch

    xs = [s[0] for s in samples]
    if xs[0].dim() == 1:  # audio: right-pad
        lengths = torch.tensor([len(x) for x in xs])
        x = xs[0].new_zeros(len(xs), int(lengths.max()))
        for i, row in enumerate(xs):
            x[i, : len(row)] = row
        out: tuple = (x, lengths)
    else:
        out = (torch.stack(xs),)
    if len(samples[0]) > 1:
        out += (torch.tensor([s[1] for s in samples]),)
    return out


# ------------------------------------------------------------------------------------ loaders
def _wdm(root: Path, keys: list[str], args: argparse.Namespace, workers: int, rate: int, n_batches: int,
         persistent: bool = False):
    from datamodules import WebDataModule

    dm = WebDataModule(root=str(root), keys=keys, batch_size=args.batch_size, num_workers=workers,
                       persistent_workers=persistent, samples_per_epoch=n_batches * args.batch_size,
                       shuffle_buffer=args.shuffle_buffer, image_size=args.image_size, sample_rate=rate,
                       audio_max_seconds=args.audio_max_seconds, seed=0)
    dm.setup("fit")
    return dm


def _wdm_train(root, keys, args, workers, rate, n_batches) -> Iterator:
    return iter(_wdm(root, keys, args, workers, rate, n_batches).train_dataloader())


def _wdm_val(root, keys, args, workers, rate, n_batches) -> Iterator:
    loader = _wdm(root, keys, args, workers, rate, n_batches, persistent=workers > 0).val_dataloader()
    return itertools.chain.from_iterable(_passes(loader))


def _passes(loader: Iterable) -> Iterator[Iterator]:
    while True:
        yield iter(loader)


def _bare_wds(urls: list[str], decode: _RefDecode, args: argparse.Namespace, workers: int, n_batches: int,
              per_shard: float) -> Iterator:
    import webdataset as wds
    from torch.utils.data import DataLoader

    # repeat the shard list so that every worker gets shards and the timed count is reached
    repeat = max(math.ceil(n_batches * args.batch_size / max(1.0, per_shard * len(urls))) + 1,
                 math.ceil(max(1, workers) / len(urls)))
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(urls * repeat),
        wds.split_by_worker,
        wds.tarfile_to_samples(),
        wds.map(decode),
        wds.batched(args.batch_size, collation_fn=_ref_collate, partial=False),
    )
    return iter(DataLoader(pipeline, batch_size=None, num_workers=workers))


def _extract_images(urls: list[str], out: Path) -> int:
    """Training images of the shards -> ``out/<label>/<key>.<ext>`` (bytes as stored); returns the count."""
    import webdataset as wds

    n = 0
    for sample in wds.tarfile_to_samples()(iter([{"url": u} for u in urls])):
        ext = next((e for e in ("png", "jpg", "jpeg", "webp") if e in sample), None)
        if ext is None:
            continue
        label = int(sample["cls"]) if "cls" in sample else 0
        folder = out / f"{label:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{sample['__key__'].replace('/', '_')}.{ext}").write_bytes(sample[ext])
        n += 1
    return n


def _image_folder(folder: Path, args: argparse.Namespace, workers: int, n_batches: int) -> Iterator:
    from torch.utils.data import DataLoader, RandomSampler
    from torchvision import datasets, transforms

    size = args.image_size
    transform = transforms.Compose([
        transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(size),
        transforms.ToTensor(),
        transforms.Normalize([0.5] * 3, [0.5] * 3),
    ])
    dataset = datasets.ImageFolder(str(folder), transform=transform)
    sampler = RandomSampler(dataset, num_samples=n_batches * args.batch_size, generator=None)
    return iter(DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, num_workers=workers,
                           drop_last=True))


# ------------------------------------------------------------------------------------ timing
def _batch_len(batch: Any) -> int:
    return len(batch["__key__"]) if isinstance(batch, dict) else len(batch[0])


def _throughput(make: Callable[[], Iterator], samples: int, warmup: int,
                profiler: cProfile.Profile | None = None) -> tuple[float, float]:
    """(samples per wall-clock second, samples per CPU second of this process) over the timed part.

    The second is the cost of the whole pipeline only with ``num_workers=0``; unlike the first it
    barely moves when other processes compete for the cores."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. "val has 1 shard for 2 readers": the table shows it
        it = make()
        for _ in range(warmup):
            next(it)
        if profiler is not None:
            profiler.enable()
        n, start, cpu = 0, time.perf_counter(), time.process_time()
        for batch in it:
            n += _batch_len(batch)
            if n >= samples:
                break
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
        if profiler is not None:
            profiler.disable()
        del it  # shuts worker processes down ...
        if multiprocessing.active_children():  # ... unless a reference cycle holds the iterator:
            gc.collect()  # collect it now, else the next loader's forked workers inherit it
    return n / elapsed, n / max(cpu, 1e-9)


def _profile(label: str, make: Callable[[], Iterator], samples: int, warmup: int) -> None:
    profiler = cProfile.Profile()
    rate, _ = _throughput(make, samples, warmup, profiler)
    print(f"\n--- cProfile of the timed part: {label}, num_workers=0, {rate:,.0f} samples/s under the profiler")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(14)


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for k, row in enumerate(rows):
        cells = [c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None else f"{a / b:.2f}x"


HEADER = ["set", "rate", "workers", "WDM train", "WDM val", "wds", "ImageFolder",
          "train/wds", "val/wds", "train/IF", "val/IF"]


def run(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(1)  # per-sample work is tiny; intra-op threads only add contention
    print(f"data benchmark: batch {args.batch_size}, image {args.image_size} px, best of {args.repeats}, "
          f"torch {torch.__version__}, 1 intra-op thread")
    wall, cpu = [HEADER], [HEADER]
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        for name in args.sets:
            rows = _bench_set(name, args, Path(tmp))
            wall += rows["wall"]
            cpu += rows["cpu"]
    print("\nsamples/s, wall clock (higher is better); ratios: WebDataModule / reference "
          "(wds: bare webdataset pipeline, IF: torchvision ImageFolder)")
    print(_table(wall))
    if len(cpu) > 1:
        print("\nsamples per CPU second, num_workers=0 (the whole pipeline runs in this process; "
              "robust to other load on the machine)")
        print(_table(cpu))


def _bench_set(name: str, args: argparse.Namespace, tmp: Path) -> dict[str, list[list[str]]]:
    from datamodules.shards import read_info

    root = _resolve(name, args)
    info = read_info(root)
    modalities = info["modalities"]
    kind = "image" if "image" in modalities else "audio" if "audio" in modalities else None
    if kind is None:
        print(f"{name}: no image or audio in {root}; skipped")
        return {"wall": [], "cpu": []}
    label = "label" in modalities
    keys = [kind] + (["label"] if label else [])
    train_urls = _shards(root, info, "train")
    per_shard = info["splits"]["train"].get("count", 0) / max(1, len(train_urls))
    samples = args.samples or (IMAGE_SAMPLES if kind == "image" else AUDIO_SAMPLES)
    print(f"{name}: {root} ({_describe(info)}; keys {keys}; {samples} timed samples per loader)")
    folder = None
    if kind == "image":
        folder = tmp / name.replace("/", "_")
        print(f"  extracted {_extract_images(train_urls, folder)} training images for ImageFolder")

    rows: dict[str, list[list[str]]] = {"wall": [], "cpu": []}
    for rate in args.sample_rate if kind == "audio" else [None]:
        r = rate or 16000
        max_samples = int(args.audio_max_seconds * r) if args.audio_max_seconds else None
        decode = _RefDecode(kind, label, args.image_size, r, max_samples)
        for workers in args.workers:
            warmup = max(args.warmup, workers)
            n_batches = warmup + math.ceil(samples / args.batch_size)
            makers: dict[str, Callable[[], Iterator]] = {
                "train": partial(_wdm_train, root, keys, args, workers, r, n_batches),
                "val": partial(_wdm_val, root, keys, args, workers, r, n_batches),
                "wds": partial(_bare_wds, train_urls, decode, args, workers, n_batches, per_shard),
            }
            if folder is not None:
                makers["if"] = partial(_image_folder, folder, args, workers, n_batches)
            best: dict[str, dict[str, float]] = {"wall": {}, "cpu": {}}
            for _ in range(max(1, args.repeats)):  # interleaved, so load changes hit every loader alike
                for key, make in makers.items():
                    for kind_, value in zip(("wall", "cpu"), _throughput(make, samples, warmup)):
                        best[kind_][key] = max(best[kind_].get(key, 0.0), value)
            for kind_, res in best.items():
                if kind_ == "cpu" and workers:
                    continue
                row = [name, str(rate or "-"), str(workers)]
                row += [_fmt(res.get(k)) for k in ("train", "val", "wds", "if")]
                row += [_ratio(res.get(a), res.get(b)) for a, b in
                        (("train", "wds"), ("val", "wds"), ("train", "if"), ("val", "if"))]
                rows[kind_].append(row)
                print(f"  {kind_:4s} " + "  ".join(f"{h}={v}" for h, v in zip(HEADER[1:], row[1:])), flush=True)
        if args.profile:
            n_batches = args.warmup + math.ceil(samples / args.batch_size)
            _profile(f"{name} WDM train", partial(_wdm_train, root, keys, args, 0, r, n_batches),
                     samples, args.warmup)
            _profile(f"{name} bare wds", partial(_bare_wds, train_urls, decode, args, 0, n_batches, per_shard),
                     samples, args.warmup)
    return rows
