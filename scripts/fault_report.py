"""Fault injection: shard sets with one kind of damage each, read through ``WebDataModule``.

    python scripts/fault_report.py            # prints a Markdown table
    python scripts/fault_report.py --keep DIR # and keeps the shard sets in DIR

Each fault is injected into a few samples (or one shard) of both splits of a small shard set
(train 12, val 10 samples; shards of 4). The validation split is read once (every sample exactly
once), so the row's numbers are exact: how many samples (or shards) were damaged, how many skips
of the expected reason the data module counted (and any other skips), and how many of the
undamaged samples came through. One training epoch (shards resampled) is read as well, and must
finish with undamaged samples only. ``tests/test_faults.py`` runs the same functions.
"""

from __future__ import annotations

import argparse
import io
import re
import struct
import tarfile
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
from PIL import Image

from datamodules import COUNTS_KEY, WebDataModule
from datamodules.shards import ShardSink, encode_png, encode_wav, make_info, write_info

COUNTS = {"train": 12, "val": 10}
PER_SHARD = 4
BAD = (1, 6)  # indices of the damaged samples in each split (shards 0 and 1)
NUM_CLASSES = 3
RATE = 16000
WORDS = ["red", "green", "blue", "circle", "square", "small", "large", "left", "of", "a", "the"]


def _garbage(data: bytes, rng: np.random.Generator, width: int = 64) -> bytes:
    """Overwrite ``width`` bytes in the middle with random bytes (same length)."""
    mid = len(data) // 2
    return data[:mid] + rng.integers(0, 256, width, dtype=np.uint8).tobytes() + data[mid + width :]


def _data_size(wav: bytes, size: Callable[[int], int]) -> bytes:
    """The WAV with its ``data`` chunk's size field rewritten (the bytes stay)."""
    at = wav.index(b"data") + 4
    (old,) = struct.unpack("<I", wav[at : at + 4])
    return wav[:at] + struct.pack("<I", size(old)) + wav[at + 4 :]


def _nan_wav(n: int) -> bytes:
    wave = (0.3 * np.sin(np.arange(n) * 0.05)).astype(np.float32)
    wave[n // 3 :: 97] = np.nan
    buf = io.BytesIO()
    sf.write(buf, wave, RATE, format="WAV", subtype="FLOAT")
    return buf.getvalue()


def _keys(path: Path) -> set[str]:
    with tarfile.open(path) as tar:
        return {m.name.split(".")[0] for m in tar.getmembers()}


def _cut_member(root: Path, split: str, index: int, ext: str = "png") -> set[str]:
    """Cut ``split``'s first shard in the middle of sample ``index``'s ``ext`` member; returns the
    keys of the samples whose bytes are (partly) gone: the one cut through and those after it."""
    path = root / f"{split}-000000.tar"
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    target = next(m for m in members if m.name == f"{split}{index:05d}.{ext}")
    path.write_bytes(path.read_bytes()[: target.offset_data + target.size // 2])
    return {key for key in _keys_of(members) if key >= f"{split}{index:05d}"}


def _keys_of(members: list[tarfile.TarInfo]) -> set[str]:
    return {m.name.split(".")[0] for m in members}


@dataclass
class Fault:
    name: str
    reason: str
    what: str
    sample: Callable[[dict[str, Any], np.random.Generator], None] | None = None
    shard: Callable[[Path, str], set[str]] | None = None  # damages files; returns the keys it took away
    image_ext: str = "png"


def _set(key: str, value: Callable[[dict[str, Any], np.random.Generator], Any]):
    def apply(sample: dict[str, Any], rng: np.random.Generator) -> None:
        sample[key] = value(sample, rng)
    return apply


def _drop(key: str):
    def apply(sample: dict[str, Any], rng: np.random.Generator) -> None:
        del sample[key]
    return apply


def _remove_shard(root: Path, split: str) -> set[str]:
    path = root / f"{split}-000001.tar"
    keys = _keys(path)
    path.unlink()
    return keys


def _html_shard(root: Path, split: str) -> set[str]:
    path = root / f"{split}-000001.tar"
    keys = _keys(path)
    path.write_bytes(b"<!DOCTYPE html><html><body>404 Not Found</body></html>\n")
    return keys


FAULTS = [
    Fault("truncated tar", "truncated_shard", "shard 0 cut inside sample 2's png",
          shard=lambda root, split: _cut_member(root, split, 2)),
    Fault("missing shard", "missing_shard", "shard 1 listed in info.json, file gone", shard=_remove_shard),
    Fault("not a tar", "unreadable_shard", "shard 1 is an HTML error page", shard=_html_shard),
    Fault("corrupt PNG", "corrupt_image", "64 random bytes in the middle",
          sample=_set("png", lambda s, rng: _garbage(s["png"], rng))),
    Fault("corrupt JPEG", "corrupt_image", "64 random bytes in the middle",
          sample=_set("jpg", lambda s, rng: _garbage(s["jpg"], rng)), image_ext="jpg"),
    Fault("WAV data size > bytes", "truncated_audio", "data chunk declares 1000 bytes more than present",
          sample=_set("wav", lambda s, rng: _data_size(s["wav"], lambda n: n + 1000))),
    Fault("WAV data size < bytes", "truncated_audio", "data chunk declares half its bytes",
          sample=_set("wav", lambda s, rng: _data_size(s["wav"], lambda n: n // 2))),
    Fault("zero-length audio", "empty_audio", "valid WAV header, 0 frames",
          sample=_set("wav", lambda s, rng: encode_wav(np.zeros(0), RATE))),
    Fault("NaN in float WAV", "non_finite_audio", "float32 WAV with NaN samples",
          sample=_set("wav", lambda s, rng: _nan_wav(4000))),
    Fault("empty text", "empty_text", "caption of spaces only", sample=_set("txt", lambda s, rng: "   ")),
    Fault("unknown label", "unknown_label", f"label {NUM_CLASSES + 5}, info.json has {NUM_CLASSES} classes",
          sample=_set("cls", lambda s, rng: str(NUM_CLASSES + 5))),
    Fault("missing member", "missing_audio", "sample without its wav", sample=_drop("wav")),
]
FAULTS_BY_NAME = {f.name: f for f in FAULTS}


def build(fault: Fault, root: Path, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Write the shard set with ``fault`` into ``root``; returns per split the damaged count and good keys."""
    rng = np.random.default_rng(seed)
    truth: dict[str, dict[str, Any]] = {}
    splits = {}
    for split, n in COUNTS.items():
        good = []
        with ShardSink(root, split, max_count=PER_SHARD) as sink:
            for i in range(n):
                label = int(rng.integers(NUM_CLASSES))
                pixels = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
                if fault.image_ext == "jpg":
                    buf = io.BytesIO()
                    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
                    image = buf.getvalue()
                else:
                    image = encode_png(pixels)
                wave = 0.3 * np.sin(np.arange(int(RATE * rng.uniform(0.1, 0.3))) * 0.05 * (label + 1))
                sample = {"__key__": f"{split}{i:05d}", fault.image_ext: image, "wav": encode_wav(wave, RATE),
                          "txt": " ".join(rng.choice(WORDS, size=int(rng.integers(2, 6)))), "cls": str(label)}
                if fault.sample is not None and i in BAD:
                    fault.sample(sample, rng)
                else:
                    good.append(sample["__key__"])
                sink.write(sample)
        splits[split] = {"count": n, "shards": sink.shards}
        truth[split] = {"injected": len(BAD) if fault.sample is not None else 0, "good": good, "lost": 0}
        if fault.shard is not None:
            taken = fault.shard(root, split)
            truth[split].update(injected=1, lost=len(taken), good=[k for k in good if k not in taken])
    write_info(root, make_info(splits, ["image", "audio", "text", "label"],
                               classes=[f"c{k}" for k in range(NUM_CLASSES)], sample_rate=RATE, source="fault_report"))
    return truth


@dataclass
class Result:
    fault: Fault
    injected: int
    skipped: int  # skips of the expected reason (validation pass)
    other_skips: dict[str, int]
    kept: int  # good samples that came through
    good: int
    lost: int  # samples whose bytes the damage took away (a cut shard's tail, a missing shard)
    extra: list[str] = field(default_factory=list)  # keys that came through but should not have
    train_batches: int = 0
    train_expected: int = 0
    train_bad_keys: list[str] = field(default_factory=list)
    train_skips: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return (self.skipped == self.injected and not self.other_skips and self.kept == self.good
                and not self.extra and self.train_batches == self.train_expected and not self.train_bad_keys)


def run(fault: Fault, root: Path) -> Result:
    """Build ``fault``'s shard set in ``root`` and read it: the validation split once, one training epoch."""
    truth = build(fault, root)
    dm = WebDataModule(root=str(root), batch_size=3, samples_per_epoch=12, vocab_size=40, audio_max_seconds=0.2,
                       shuffle_buffer=4)
    dm.prepare_data()
    dm.setup("fit")
    counts: Counter[str] = Counter()
    keys: list[str] = []
    for batch in dm.val_dataloader():
        counts.update(batch[COUNTS_KEY])
        keys += batch["__key__"]
    good = truth["val"]["good"]
    assert len(keys) == len(set(keys)), "a sample came twice"
    skips = {k.split("/", 1)[1]: v for k, v in counts.items() if k.startswith("skipped/")}
    result = Result(fault, truth["val"]["injected"], skips.pop(fault.reason, 0), skips, len(set(keys) & set(good)),
                    len(good), truth["val"]["lost"], extra=sorted(set(keys) - set(good)))
    loader = dm.train_dataloader()
    train_counts: Counter[str] = Counter()
    train_good = set(truth["train"]["good"])
    for batch in loader:
        result.train_batches += 1
        train_counts.update(batch[COUNTS_KEY])
        result.train_bad_keys += [k for k in batch["__key__"] if k not in train_good]
    result.train_expected = len(loader)
    result.train_skips = {k.split("/", 1)[1]: v for k, v in train_counts.items() if k.startswith("skipped/")}
    return result


def run_all(workdir: Path, names: list[str] | None = None) -> list[Result]:
    faults = [FAULTS_BY_NAME[n] for n in names] if names else FAULTS
    return [run(f, workdir / re.sub(r"\W+", "_", f.name)) for f in faults]


def table(results: list[Result]) -> str:
    rows = ["| fault | injected (val) | skipped (reason) | good kept / good total | damaged let through | train epoch |",
            "| --- | --- | --- | --- | --- | --- |"]
    for r in results:
        unit = "shard" if r.fault.shard is not None else "samples"
        injected = f"{r.injected} {unit}" + (f" ({r.lost} samples gone with it)" if r.lost else "")
        skipped = f"{r.skipped} ({r.fault.reason})" + "".join(f", {v} ({k})" for k, v in r.other_skips.items())
        train = f"{r.train_batches}/{r.train_expected} batches, {len(r.train_bad_keys)} bad keys"
        rows.append(f"| {r.fault.name}: {r.fault.what} | {injected} | {skipped} | {r.kept} / {r.good} "
                    f"| {len(r.extra)} | {train} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", type=Path, help="write the shard sets here (default: a temporary folder)")
    parser.add_argument("faults", nargs="*", help=f"fault names (default all): {[f.name for f in FAULTS]}")
    args = parser.parse_args(argv)
    import logging

    logging.getLogger("datamodules").setLevel(logging.ERROR)  # one warning per skip otherwise
    if args.keep:
        results = run_all(args.keep, args.faults or None)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            results = run_all(Path(tmp), args.faults or None)
    print(table(results))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
