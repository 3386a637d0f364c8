"""Turn your own images, audio clips, captions and labels into WebDataset shards.

Writes ``OUT/{train,val,test}-%06d.tar`` and ``OUT/info.json`` in the shard format of DESIGN.md.
Three kinds of input:

  imagefolder SRC   SRC/<class>/<file>.jpg|png|webp|bmp|gif|tif; label = index of <class> in
                    sorted order. Images are checked by decoding them; by default the original
                    bytes are stored (under the extension of their real format, jpeg -> jpg).
  audiofolder SRC   SRC/<class>/<file>.wav|flac|ogg|mp3|...; clips are decoded, downmixed to
                    mono, resampled to --sample-rate and stored as 16-bit wav (or flac).
  manifest FILE     a .csv/.tsv or .jsonl/.ndjson file with columns path, text, label, split (any
                    subset with path or text). Paths are relative to FILE's folder; the file
                    extension decides image or audio. Labels are integers or class names (names
                    are numbered in sorted order). A split column replaces the ratio split.
                    Several captions per image (COCO/Flickr style): rows that share a path are
                    one sample holding every caption of them, in row order (in JSONL, a text
                    may also be a list of strings); such a sample stores them as a JSON list in
                    its ``captions.json`` member and the first in ``txt``. The rows of one path
                    must agree on split and label (refused, naming the path, otherwise).

Bad input is skipped, counted per reason, listed in info.json ("skipped", "bad_samples") and
never fatal. The same input and --seed give byte-identical shards.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import re
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from datamodules.decode import CAPTIONS_MEMBER
from datamodules.shards import (
    AUDIO_EXTS,
    AUDIO_READ_EXTS,
    IMAGE_EXTS,
    SPLITS,
    AudioDecodeError,
    ShardSink,
    encode_png,
    encode_wav,
    make_info,
    read_audio,
    write_info,
)

EXAMPLES = """\
examples:
  # an image folder, 5% validation and 5% test, shards of at most 2000 images or 500 MB
  python scripts/make_shards.py imagefolder data/pets shards/pets \\
      --val-ratio 0.05 --test-ratio 0.05 --seed 0 --max-count 2000 --max-size 500MB

  # an audio folder, resampled to 22.05 kHz and stored as FLAC
  python scripts/make_shards.py audiofolder data/commands shards/commands \\
      --sample-rate 22050 --audio-format flac

  # a caption manifest (path,text[,label][,split]); re-encode every image to PNG
  python scripts/make_shards.py manifest data/captions.csv shards/captions --image-format png

  # a JSONL transcript manifest with its own split column, replacing an earlier run
  python scripts/make_shards.py manifest data/speech.jsonl shards/speech --overwrite --quiet

  # shard size may be written 1e8, 100000000, 500MB, 1.5GB, 256MiB, 64k
  python scripts/make_shards.py imagefolder data/pets shards/pets --max-size 1e8

reasons counted under "skipped" in info.json:
  corrupt_image, truncated_audio, empty_audio, undecodable_audio, non_finite_audio,
  unreadable_file, unsupported_type, no_class_folder, missing_file, missing_path, empty_text,
  missing_label, bad_label, unknown_split, bad_row, bad_captions
"""

# Image formats stored as they are (PIL format name -> shard extension); the rest become PNG.
_KEEP_FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}
_INPUT_IMAGE_EXTS = (*IMAGE_EXTS, "bmp", "gif", "tif", "tiff")
_PNG_MODES = {"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"}
_SPLIT_ALIASES = {
    "train": "train", "training": "train",
    "val": "val", "valid": "val", "validation": "val", "dev": "val",
    "test": "test", "testing": "test",
}  # fmt: skip
_MANIFEST_COLUMNS = ("path", "text", "label", "split")
_SHARD_RE = re.compile(r"^(train|val|test)-\d{6}\.tar(\.tmp)?$")
_SIZE_UNITS = {
    "": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip
_SHOWN_WARNINGS = 20
_MODALITY_EXTS = {"image": set(IMAGE_EXTS), "audio": set(AUDIO_EXTS), "text": {"txt"}, "label": {"cls"}}


class BadSample(Exception):
    """A sample that is skipped; ``reason`` is the counter it goes to."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class Item:
    """One candidate sample: where it comes from, never its decoded content."""

    index: int  # gives the key; position in the sorted listing or the manifest row number
    where: str  # how to name it in messages: relative path or "row N"
    path: Path | None = None
    kind: str | None = None  # "image" | "audio" | None (text only)
    texts: list[str] | None = None  # every caption (one per row of the same path)
    label: int | None = None
    split: str | None = None  # from a split column; None -> ratio split


@dataclass
class Report:
    """Counts skipped samples per reason and keeps the first ``max_listed`` of them."""

    verbose: bool = True
    max_listed: int = 100
    skipped: Counter = field(default_factory=Counter)
    bad_samples: list[list[str]] = field(default_factory=list)

    def add(self, where: str, reason: str, detail: str = "") -> None:
        self.skipped[reason] += 1
        if len(self.bad_samples) < self.max_listed:
            self.bad_samples.append([where, reason])
        if self.verbose and self.total <= _SHOWN_WARNINGS:
            tqdm.write(f"skipped {where}: {reason}" + (f" ({detail})" if detail else ""), file=sys.stderr)

    @property
    def total(self) -> int:
        return sum(self.skipped.values())


class UsageError(Exception):
    """A bad command line or an input that cannot be read at all (exit status 2)."""


# ----------------------------------------------------------------------------------- argument types
def parse_size(text: str) -> float:
    """Bytes in ``500MB``, ``1.5GB``, ``256MiB``, ``64k``, ``1e8`` or ``100000000``."""
    match = re.fullmatch(r"\s*((?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?)\s*([a-z]*)\s*", str(text).lower())
    if match is None or match.group(2) not in _SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 500MB, 1.5GB, 1e8)")
    size = float(match.group(1)) * _SIZE_UNITS[match.group(2)]
    if size <= 0:
        raise argparse.ArgumentTypeError(f"size must be > 0, got {text!r}")
    return size


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"a ratio must lie in [0, 1], got {text}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="make_shards.py",
        description=__doc__,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("kind", choices=("imagefolder", "audiofolder", "manifest"), help="the kind of input")
    parser.add_argument("src", type=Path, help="input folder (imagefolder, audiofolder) or manifest file")
    parser.add_argument("out", type=Path, help="output folder for the shards and info.json")
    parser.add_argument(
        "--val-ratio", type=_ratio, default=0.05, metavar="R",
        help="fraction of samples for the val split, e.g. 0.05 (default: %(default)s; at least one "
        "sample when > 0; ignored when a manifest has a split column)",
    )  # fmt: skip
    parser.add_argument(
        "--test-ratio", type=_ratio, default=0.0, metavar="R",
        help="fraction of samples for the test split, e.g. 0.1 (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--seed", type=int, default=0,
        help="seed of the split assignment and of the sample order in the shards, e.g. 1 "
        "(default: %(default)s); the same input and seed give the same bytes",
    )  # fmt: skip
    parser.add_argument(
        "--max-count", type=_positive_int, default=10_000, metavar="N",
        help="most samples per shard, e.g. 2000 (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--max-size", type=parse_size, default=parse_size("500MB"), metavar="SIZE",
        help="most bytes per shard, e.g. 500MB, 1.5GB, 256MiB or 1e8 (default: 500MB)",
    )  # fmt: skip
    parser.add_argument(
        "--sample-rate", type=_positive_int, default=16_000, metavar="HZ",
        help="audio is resampled (soxr) to this rate, e.g. 22050 (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--audio-format", choices=AUDIO_EXTS, default="wav",
        help="how audio is stored, 16-bit PCM: e.g. --audio-format flac (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--image-format", choices=("keep", "png"), default="keep",
        help="keep the original image bytes (jpg/png/webp; other formats become png) or "
        "re-encode every image to png, e.g. --image-format png (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--no-shuffle", action="store_true",
        help="write samples in listing/manifest order instead of a seeded shuffle (the split "
        "assignment is unchanged), e.g. for an evaluation set",
    )  # fmt: skip
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="delete shards and info.json already in OUT first (otherwise such an OUT is refused)",
    )
    parser.add_argument(
        "--quiet",
        action="store_true",
        help="no progress bar and no per-sample warnings (the summary is still printed)",
    )
    return parser


# ------------------------------------------------------------------------------------------ listing
def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name.startswith("__")


def _ext(path: Path | str) -> str:
    return Path(path).suffix.lower().lstrip(".")


def _walk_files(root: Path) -> list[str]:
    """Relative POSIX paths of the non-hidden files under ``root``, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not _is_hidden(d)]
        rel_dir = Path(dirpath).relative_to(root)
        found.extend((rel_dir / name).as_posix() for name in filenames if not _is_hidden(name))
    return sorted(found)


def list_folder(src: Path, kind: str, exts: Sequence[str], report: Report) -> tuple[list[Item], list[str]]:
    """Items of a ``SRC/<class>/<file>`` folder and the sorted class names."""
    if not src.is_dir():
        raise UsageError(f"{src} is not a folder")
    classes = sorted(p.name for p in src.iterdir() if p.is_dir() and not _is_hidden(p.name))
    if not classes:
        raise UsageError(f"{src} has no class folders; expected the layout SRC/<class>/<file>")
    for path in sorted(p for p in src.iterdir() if p.is_file() and not _is_hidden(p.name)):
        report.add(path.name, "no_class_folder")
    items: list[Item] = []
    for label, name in enumerate(classes):
        for rel in _walk_files(src / name):
            where = f"{name}/{rel}"
            if _ext(rel) not in exts:
                report.add(where, "unsupported_type", f"not one of {', '.join(exts)}")
                continue
            items.append(Item(index=len(items), where=where, path=src / name / rel, kind=kind, label=label))
    return items, classes


def _read_rows(manifest: Path) -> Iterable[tuple[int, dict[str, Any] | None]]:
    """``(row number, row)`` pairs of a CSV/TSV/JSONL manifest; ``row`` is None when malformed."""
    ext = _ext(manifest)
    with open(manifest, encoding="utf-8-sig", newline="") as f:
        if ext in ("csv", "tsv"):
            reader = csv.DictReader(f, delimiter="\t" if ext == "tsv" else ",")
            if reader.fieldnames is None:
                return
            reader.fieldnames = [name.strip().lower() for name in reader.fieldnames]
            for number, row in enumerate(reader):
                yield number, {k: v for k, v in row.items() if k is not None}
        else:
            number = 0
            for line in f:
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    row = None
                yield (
                    number,
                    ({str(k).strip().lower(): v for k, v in row.items()} if isinstance(row, dict) else None),
                )
                number += 1


def _columns(manifest: Path) -> set[str]:
    if _ext(manifest) in ("csv", "tsv"):
        with open(manifest, encoding="utf-8-sig", newline="") as f:
            header = next(csv.reader(f, delimiter="\t" if _ext(manifest) == "tsv" else ","), [])
        return {name.strip().lower() for name in header}
    return {k for _, row in _read_rows(manifest) if row for k in row}


def _cell(row: dict[str, Any], column: str) -> Any:
    """A cell with blanks (None, empty or whitespace-only strings) as None."""
    value = row.get(column)
    if isinstance(value, str):
        value = value.strip()
    return None if value in (None, "") else value


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value):
        return int(value)
    return None


def list_manifest(manifest: Path, report: Report) -> tuple[list[Item], list[str]]:
    """Items of a manifest and the class names (see the module doc for the columns)."""
    if not manifest.is_file():
        raise UsageError(f"manifest {manifest} does not exist")
    if _ext(manifest) not in ("csv", "tsv", "jsonl", "ndjson"):
        raise UsageError(f"manifest {manifest}: the extension must be .csv, .tsv, .jsonl or .ndjson")
    columns = _columns(manifest)
    if not columns & {"path", "text"}:
        raise UsageError(
            f"manifest {manifest} has neither a 'path' nor a 'text' column "
            f"(columns: {', '.join(sorted(columns)) or 'none'})"
        )
    has = {c: c in columns for c in _MANIFEST_COLUMNS}
    root = manifest.parent

    # Labels: integers when every label is one, otherwise class names numbered in sorted order.
    labels = [_cell(row, "label") for _, row in _read_rows(manifest) if row] if has["label"] else []
    labels = [v for v in labels if v is not None]
    int_labels = all(_as_int(v) is not None for v in labels)
    if int_labels:
        top = max((_as_int(v) for v in labels), default=-1)
        classes = [str(i) for i in range(top + 1)]
    else:
        classes = sorted({str(v) for v in labels if (_as_int(v) is None or _as_int(v) >= 0)})
    class_index = {name: i for i, name in enumerate(classes)}

    items: list[Item] = []
    for number, row in _read_rows(manifest):
        where = f"row {number}"
        if row is None:
            report.add(where, "bad_row", "not a JSON object")
            continue
        rel, text = _cell(row, "path"), _cell(row, "text")
        if rel is not None:
            where = str(rel)
        try:
            item = Item(index=number, where=where)
            if has["text"]:
                item.texts = _captions(text)
            if has["path"]:
                if rel is None:
                    raise BadSample("missing_path")
                ext = _ext(str(rel))
                item.kind = (
                    "image" if ext in _INPUT_IMAGE_EXTS else "audio" if ext in AUDIO_READ_EXTS else None
                )
                if item.kind is None:
                    raise BadSample("unsupported_type", f"extension {ext!r} is neither image nor audio")
                item.path = root / str(rel)
                if not item.path.is_file():
                    raise BadSample("missing_file", str(item.path))
            if has["label"]:
                value = _cell(row, "label")
                if value is None:
                    raise BadSample("missing_label")
                number_value = _as_int(value)
                if number_value is not None and number_value < 0:
                    raise BadSample("bad_label", f"negative label {value}")
                item.label = number_value if int_labels else class_index[str(value)]
            if has["split"]:
                value = _cell(row, "split")
                item.split = _SPLIT_ALIASES.get(str(value).lower()) if value is not None else None
                if item.split is None:
                    raise BadSample("unknown_split", f"{value!r} is not one of train, val, test")
        except BadSample as bad:
            report.add(where, bad.reason, bad.detail)
            continue
        items.append(item)
    return group_captions(items) if has["path"] and has["text"] else items, classes


def _captions(value: Any) -> list[str]:
    """The captions of a manifest cell: a string, or (JSONL) a list of strings; raises BadSample."""
    if isinstance(value, list):
        if not all(isinstance(c, str) for c in value):
            kinds = ", ".join(sorted({type(c).__name__ for c in value}))
            raise BadSample("bad_captions", f"a caption list must hold only strings, got {kinds}")
        captions = [c.strip() for c in value if c.strip()]
    elif value is None or isinstance(value, (dict, bool)):
        captions = []
    else:
        captions = [str(value)]
    if not captions:
        raise BadSample("empty_text")
    return captions


def group_captions(items: list[Item]) -> list[Item]:
    """One item per path, holding the captions of all its rows in row order (duplicates kept once);
    its index (hence its key) is its first row's. Rows of one path that disagree on the split or the
    label are refused (UsageError naming the path)."""
    by_path: dict[Path, Item] = {}
    for item in items:
        first = by_path.get(item.path)
        if first is None:
            by_path[item.path] = item
            continue
        for what in ("split", "label"):
            if getattr(first, what) != getattr(item, what):
                raise UsageError(
                    f"manifest: {item.where} has captions with {what} {getattr(first, what)!r} (row {first.index}) "
                    f"and {getattr(item, what)!r} (row {item.index}); one image or clip must have one {what}"
                )
        first.texts.extend(t for t in item.texts if t not in first.texts)
    return list(by_path.values())


# ---------------------------------------------------------------------------------------- splitting
def assign_splits(
    items: list[Item], val_ratio: float, test_ratio: float, seed: int, shuffle: bool = True
) -> list[Item]:
    """Give every item without a split one by ratio; return the items in writing order.

    A seeded permutation decides: its first ``round(n * val_ratio)`` items go to val (at least
    one when the ratio is > 0 and n > 1), the next ``round(n * test_ratio)`` to test, the rest to
    train. With ``shuffle`` the same permutation is the writing order, so shards are not sorted by
    class; without it, items are written in listing order (the assignment is the same).
    """
    order = np.random.default_rng(seed).permutation(len(items))
    free = [i for i in order if items[i].split is None]
    n = len(free)

    def count(ratio: float) -> int:
        k = int(round(n * ratio))
        return max(k, 1) if ratio > 0 and n > 1 else k

    n_val = min(count(val_ratio), n)
    n_test = min(count(test_ratio), n - n_val)
    for rank, i in enumerate(free):
        items[i].split = "val" if rank < n_val else "test" if rank < n_val + n_test else "train"
    return [items[i] for i in order] if shuffle else list(items)


# --------------------------------------------------------------------------------------- processing
def encode_image_file(data: bytes, image_format: str) -> tuple[str, bytes]:
    """``(extension, bytes)`` to store for an image file, after decoding it fully."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            ext = _KEEP_FORMATS.get(image.format or "")
            if image_format == "keep" and ext is not None:
                return ext, data
            if image.mode not in _PNG_MODES:
                alpha = "A" in image.getbands() or "transparency" in image.info
                image = image.convert("RGBA" if alpha else "RGB")
            return "png", encode_png(image)
    except UnidentifiedImageError:
        raise BadSample("corrupt_image", "not a recognised image format") from None
    except Exception as exc:  # PIL raises many types on broken files
        raise BadSample("corrupt_image", f"{type(exc).__name__}: {exc}") from exc


def build_sample(item: Item, args: argparse.Namespace) -> dict[str, Any]:
    """The shard sample of an item; raises :class:`BadSample`."""
    sample: dict[str, Any] = {"__key__": f"{item.index:08d}"}
    meta: dict[str, Any] = {"source": item.where}
    if item.path is not None:
        try:
            data = item.path.read_bytes()
        except FileNotFoundError:
            raise BadSample("missing_file", str(item.path)) from None
        except OSError as exc:
            raise BadSample("unreadable_file", str(exc)) from exc
        if item.kind == "image":
            ext, payload = encode_image_file(data, args.image_format)
        else:
            try:
                wave, _ = read_audio(data, args.sample_rate)
            except AudioDecodeError as exc:
                raise BadSample(exc.reason, exc.detail) from exc
            ext, payload = args.audio_format, encode_wav(wave, args.sample_rate, args.audio_format)
        sample[ext] = payload
    if item.texts:
        sample["txt"] = item.texts[0]
        if len(item.texts) > 1:
            sample[CAPTIONS_MEMBER] = json.dumps(item.texts, ensure_ascii=False)
    if item.label is not None:
        sample["cls"] = str(item.label)
    sample["json"] = json.dumps(meta, sort_keys=True, ensure_ascii=False)
    return sample


def _old_outputs(out: Path, overwrite: bool) -> list[Path]:
    """Shards and info.json already in ``out``; refused unless ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a folder")
    if not out.exists():
        return []
    old = sorted(
        p for p in out.iterdir() if _SHARD_RE.match(p.name) or p.name in ("info.json", "info.json.tmp")
    )
    if old and not overwrite:
        raise UsageError(f"{out} already holds shards or info.json; pass --overwrite to replace them")
    return old


def make_shards(args: argparse.Namespace) -> dict[str, Any]:
    """Run the conversion described by parsed arguments; returns the info written."""
    if args.val_ratio + args.test_ratio > 1.0:
        raise UsageError(f"--val-ratio + --test-ratio must be <= 1, got {args.val_ratio + args.test_ratio}")
    old = _old_outputs(args.out, args.overwrite)
    report = Report(verbose=not args.quiet)
    if args.kind == "imagefolder":
        items, classes = list_folder(args.src, "image", _INPUT_IMAGE_EXTS, report)
    elif args.kind == "audiofolder":
        items, classes = list_folder(args.src, "audio", AUDIO_READ_EXTS, report)
    else:
        items, classes = list_manifest(args.src, report)
    for path in old:
        path.unlink()
    args.out.mkdir(parents=True, exist_ok=True)
    ordered = assign_splits(items, args.val_ratio, args.test_ratio, args.seed, shuffle=not args.no_shuffle)

    modality_counts: Counter = Counter()
    caption_counts: Counter = Counter()  # samples by their number of captions
    with contextlib.ExitStack() as stack:
        sinks = {
            s: stack.enter_context(ShardSink(args.out, s, args.max_count, args.max_size)) for s in SPLITS
        }
        progress = stack.enter_context(
            tqdm(ordered, unit="sample", disable=args.quiet or not sys.stderr.isatty(), file=sys.stderr)
        )
        for item in progress:
            try:
                sample = build_sample(item, args)
            except BadSample as bad:
                report.add(item.where, bad.reason, bad.detail)
                continue
            sinks[item.split].write(sample)
            modality_counts.update(m for m, exts in _MODALITY_EXTS.items() if not exts.isdisjoint(sample))
            if item.texts:
                caption_counts[len(item.texts)] += 1
    modalities = set(modality_counts)
    splits = {s: {"count": sinks[s].count, "shards": list(sinks[s].shards)} for s in SPLITS}
    if not args.quiet and report.total > _SHOWN_WARNINGS:
        print(f"... {report.total - _SHOWN_WARNINGS} more skipped samples not shown", file=sys.stderr)

    info = make_info(
        splits,
        sorted(modalities),
        classes=classes if "label" in modalities else None,
        sample_rate=args.sample_rate if "audio" in modalities else None,
        source=f"{args.kind} {args.src.resolve()}",
        skipped=dict(sorted(report.skipped.items())),
        bad_samples=report.bad_samples,
        modality_counts=dict(sorted(modality_counts.items())),
        captions_per_sample={str(k): v for k, v in sorted(caption_counts.items())},
        num_classes=len(classes) if "label" in modalities else 0,
        options={
            "val_ratio": args.val_ratio, "test_ratio": args.test_ratio, "seed": args.seed,
            "shuffle": not args.no_shuffle, "max_count": args.max_count, "max_size": args.max_size,
            "image_format": args.image_format, "audio_format": args.audio_format,
        },
    )  # fmt: skip
    write_info(args.out, info)
    return info


def summary(info: dict[str, Any], out: Path) -> str:
    """The end-of-run report: samples and shards per split, skipped samples per reason."""
    total = sum(s["count"] for s in info["splits"].values())
    lines = [f"wrote {total} samples to {out} ({', '.join(info['modalities']) or 'nothing'})"]
    for split, entry in info["splits"].items():
        lines.append(f"  {split:<5} {entry['count']:>8} samples in {len(entry['shards'])} shard(s)")
    if info["classes"]:
        lines.append(f"  classes: {len(info['classes'])}")
    several = {int(k): v for k, v in info.get("captions_per_sample", {}).items() if int(k) > 1}
    if several:
        lines.append(f"  {sum(several.values())} samples with several captions (up to {max(several)})")
    skipped = info["skipped"]
    reasons = ", ".join(f"{reason}={count}" for reason, count in skipped.items())
    lines.append(f"  skipped {sum(skipped.values())}" + (f": {reasons}" if reasons else ""))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (1 when no sample could be written)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        info = make_shards(args)
    except UsageError as exc:
        parser.error(str(exc))  # exits with status 2
    print(summary(info, args.out))
    if not any(s["count"] for s in info["splits"].values()):
        print("error: no valid sample found", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
