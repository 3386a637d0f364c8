"""The embedded demo data sets, generated on first use into a cache folder.

Three small data sets in the shard format of DESIGN.md, built from nothing but the installed
packages (no downloads), deterministic for a seed:

``shapes``  32x32 RGB scenes of 1-3 coloured shapes with four captions from their attributes and
            relations (true paraphrases: the same scene with objects and relations named in another
            order or with other words; ``captions.json``, the first also in ``txt``); label = shape
            of the largest object; ``json`` = the scene's objects (shape, colour, size, centre).
            Five (shape, colour) pairs (:data:`HELDOUT_COMBINATIONS`) never occur in the training
            split, only in val/test: generation is measured on combinations it never saw.
``spoken``  spoken commands ("go three one") synthesised by espeak-ng with many voices, rates,
            pitches and noise levels, 16 kHz; label = the command word. Two voice variants are
            kept out of train/val/test and form an extra ``heldout`` split. espeak-ng carries
            state from clip to clip, so the speech comes from a fresh child process given the
            same sequence of calls every time (:class:`~datamodules.espeak.EspeakProcess`).
``digits``  scikit-learn's 1797 real 8x8 handwritten digits, upsampled to 32x32 grayscale.

:func:`demo_root` returns the folder (``info.json`` + ``{split}-%06d.tar``), generating it when
missing. Generation writes into a temporary sibling folder renamed when complete, under an
``fcntl`` lock, so concurrent callers (DDP ranks, test processes) generate a set once and a
crash never leaves a half set that looks whole.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .shards import ShardSink, encode_png, encode_wav, make_info, read_info, write_info

log = logging.getLogger(__name__)

__all__ = [
    "DEMO_SETS",
    "SIZES",
    "FORMAT_VERSIONS",
    "SHAPES",
    "COMMANDS",
    "default_cache_dir",
    "demo_root",
    "generate",
]

DEMO_SETS: tuple[str, ...] = ("shapes", "spoken", "digits")
SIZES: tuple[str, ...] = ("default", "tiny")
FORMAT_VERSIONS: dict[str, int] = {"shapes": 4, "spoken": 2, "digits": 2}
"""Per set, bumped whenever its generated content changes, so stale caches are not reused
(shapes v3: four captions per scene; v4: held-out combinations, attribute vocabularies in info.json)."""
CACHE_ENV = "MULTIMODAL_CACHE"
MAX_PER_SHARD = 1000
MIN_SHARDS = 4  # per split: the loader splits shards across ranks x workers

# Samples per split for each set and size (digits: fractions of the 1797 real images).
COUNTS: dict[str, dict[str, dict[str, int]]] = {
    "shapes": {
        "default": {"train": 4000, "val": 500, "test": 500},
        "tiny": {"train": 48, "val": 24, "test": 24},
    },
    "spoken": {
        "default": {"train": 3000, "val": 300, "test": 300, "heldout": 300},
        "tiny": {"train": 48, "val": 24, "test": 24, "heldout": 24},
    },
}
DIGITS_FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}
DIGITS_TINY_PER_CLASS = {"train": 4, "val": 2, "test": 2}


def default_cache_dir() -> Path:
    """``$MULTIMODAL_CACHE`` if set, else ``~/.cache/multimodal-dit``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "multimodal-dit"


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed, *keys])


def _shard_size(count: int) -> int:
    """Samples per shard: at most MAX_PER_SHARD, and at least MIN_SHARDS shards when possible."""
    shards = max(MIN_SHARDS, math.ceil(count / MAX_PER_SHARD))
    return max(1, math.ceil(count / shards))


PROGRESS_SECONDS = 10.0
"""Demo generation logs one progress line per split at most this often (and when the split is done)."""


def _write_split(out: Path, split: str, samples: Iterator[dict[str, Any]], count: int) -> dict[str, Any]:
    name = out.name.lstrip(".").split("-v")[0]  # the set's name, from its (temporary) folder
    start = last = time.perf_counter()
    with ShardSink(out, split, max_count=_shard_size(count)) as sink:
        for sample in samples:
            sink.write(sample)
            now = time.perf_counter()
            if now - last >= PROGRESS_SECONDS:
                last = now
                log.info("demo %s %s: %d/%d samples (%.0f%%), %.0f s", name, split, sink.count, count,
                         100 * sink.count / count, now - start)
    log.info("demo %s %s: %d samples in %.1f s", name, split, sink.count, time.perf_counter() - start)
    if sink.count != count:
        raise RuntimeError(f"demo split {split!r}: wrote {sink.count} samples, expected {count}")
    return {"count": sink.count, "shards": sink.shards}


def _meta(obj: dict[str, Any]) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


# ============================================================================================ shapes
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 90, 230),
    "yellow": (235, 210, 40),
    "purple": (150, 60, 200),
    "orange": (245, 135, 30),
}
IMAGE_SIZE = 32
SUPERSAMPLE = 4  # antialiasing: draw at 4x and average 4x4 blocks
SIZE_RADIUS = {"small": (3.0, 4.0), "large": (6.5, 8.0)}  # half-extent in pixels
COLOUR_JITTER = 12
DARK_BACKGROUND = (10, 60)
LIGHT_BACKGROUND = (195, 245)
GAP = 1.5  # min pixels between bounding boxes
RELATION_RATIO = 1.5  # the dominant axis of an offset must be this much longer than the other
RELATIONS = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}
# the other words of the paraphrases (same meaning)
RELATION_SYNONYMS = {"left": "left of", "right": "right of", "above": "over", "below": "under"}
SIZE_SYNONYMS = {"small": "little", "large": "big"}
OBJECT_SIZES: tuple[str, ...] = ("small", "large")
HELDOUT_COMBINATIONS: tuple[dict[str, str], ...] = tuple(
    {"shape": shape, "colour": colour}
    for shape, colour in (("circle", "purple"), ("square", "orange"), ("triangle", "green"),
                          ("diamond", "red"), ("cross", "blue"))
)
"""(shape, colour) pairs no object of the training split has (one per shape, each colour once but
yellow): val/test scenes holding one measure generation on attribute combinations never seen."""
_HELDOUT_PAIRS = {(c["shape"], c["colour"]) for c in HELDOUT_COMBINATIONS}

_grid = (np.arange(IMAGE_SIZE * SUPERSAMPLE, dtype=np.float32) + 0.5) / SUPERSAMPLE
_GY, _GX = np.meshgrid(_grid, _grid, indexing="ij")


def _shape_mask(shape: str, cx: float, cy: float, r: float) -> np.ndarray:
    """Boolean mask at the supersampled resolution of a shape centred at (cx, cy), half-extent r."""
    dx, dy = _GX - cx, _GY - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        s = r * 0.85  # visually as large as the circle
        return (np.abs(dx) <= s) & (np.abs(dy) <= s)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= r * 1.1
    if shape == "cross":
        arm = r * 0.38
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    if shape == "triangle":  # apex up; base at cy + 0.8 r
        base = 0.8 * r
        inside = dy <= base
        # two sides through the apex (0, -r) and base corners (+-r, base)
        slope = r / (base + r)
        return inside & (np.abs(dx) <= (dy + r) * slope)
    raise ValueError(f"unknown shape {shape!r}")


def draw_background(rng: np.random.Generator) -> tuple[bool, np.ndarray]:
    """A scene's background: dark or light (even odds), a grey level with a slight tint -> (dark, rgb)."""
    dark = bool(rng.random() < 0.5)
    level = rng.integers(*(DARK_BACKGROUND if dark else LIGHT_BACKGROUND))
    return dark, np.clip(level + rng.integers(-8, 9, size=3), 0, 255)


def draw_jitter(rng: np.random.Generator) -> np.ndarray:
    """An object's colour jitter: an offset in [-COLOUR_JITTER, COLOUR_JITTER] a channel."""
    return rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, 3)


def object_rgb(colour: str, jitter: np.ndarray) -> np.ndarray:
    """The 0-255 RGB an object of ``colour`` is painted in, with its ``jitter``."""
    return np.clip(np.array(COLOURS[colour]) + jitter, 0, 255)


def render_scene(objects: list[dict[str, Any]], rgbs: list[Any], background: Any) -> Image.Image:
    """A 32 x 32 RGB scene: ``objects`` (``shape``, centre ``x``, ``y`` and half-extent ``r`` in pixels)
    painted in order in colours ``rgbs`` (0-255 triples) over ``background``, antialiased by drawing
    at ``SUPERSAMPLE`` x and averaging (box filter)."""
    canvas = np.empty((IMAGE_SIZE * SUPERSAMPLE, IMAGE_SIZE * SUPERSAMPLE, 3), dtype=np.uint8)
    canvas[:] = background
    for obj, rgb in zip(objects, rgbs, strict=True):
        canvas[_shape_mask(obj["shape"], obj["x"], obj["y"], obj["r"])] = rgb
    return Image.fromarray(canvas, mode="RGB").reduce(SUPERSAMPLE)


def _relation(anchor: dict[str, Any], other: dict[str, Any]) -> str | None:
    """Where ``anchor`` is relative to ``other`` (left/right/above/below), None when ambiguous."""
    dx, dy = anchor["x"] - other["x"], anchor["y"] - other["y"]
    if abs(dx) >= RELATION_RATIO * abs(dy):
        return "left" if dx < 0 else "right"
    if abs(dy) >= RELATION_RATIO * abs(dx):
        return "above" if dy < 0 else "below"
    return None


def _phrase(obj: dict[str, Any], synonyms: bool = False) -> str:
    size = SIZE_SYNONYMS[obj["size"]] if synonyms else obj["size"]
    return f"a {size} {obj['colour']} {obj['shape']}"


def _captions(objects: list[dict[str, Any]]) -> list[str]:
    """Four true descriptions of a scene whose first object is the largest (the anchor).

    1. the canonical caption: ``a large red circle to the left of a small blue square and above ...``
       (every relation says where the anchor is);
    2. the same with other words (big/little, left of / right of / over / under);
    3. the objects in another order: the second object first, its relation to the anchor inverted
       (``a small blue square to the right of a large red circle``), and a third object, if any, in a
       relative clause (``..., which is above a small green cross``); one object: ``there is ...``;
    4. one object: ``there is`` with other words; three: the anchor's relations in the other order,
       other words; two: (3) with other words.
    """
    anchor, others = objects[0], objects[1:]

    def rel(obj: dict[str, Any], other: dict[str, Any], synonyms: bool) -> str:
        name = _relation(obj, other)
        return (RELATION_SYNONYMS if synonyms else RELATIONS)[name]

    def canonical(order: list[dict[str, Any]], syn: bool) -> str:
        text = _phrase(anchor, syn)
        if order:
            text += " " + " and ".join(f"{rel(anchor, o, syn)} {_phrase(o, syn)}" for o in order)
        return text

    def inverted(syn: bool) -> str:
        first = others[0]
        text = f"{_phrase(first, syn)} {rel(first, anchor, syn)} {_phrase(anchor, syn)}"
        if len(others) > 1:
            text += f", which is {rel(anchor, others[1], syn)} {_phrase(others[1], syn)}"
        return text

    if not others:
        return [canonical([], False), canonical([], True), f"there is {_phrase(anchor)}",
                f"there is {_phrase(anchor, True)}"]
    fourth = canonical(others[::-1], True) if len(others) > 1 else inverted(True)
    return [canonical(others, False), canonical(others, True), inverted(False), fourth]


def _place(rng: np.random.Generator, n: int) -> list[dict[str, Any]] | None:
    """Sizes and positions of n objects (the first is strictly the largest), or None on failure."""
    sizes = [str(rng.choice(["small", "large"]))] if n == 1 else ["large"] + ["small"] * (n - 1)
    objects: list[dict[str, Any]] = []
    for size in sizes:
        r = round(float(rng.uniform(*SIZE_RADIUS[size])), 2)
        for _ in range(50):
            x, y = (round(float(v), 2) for v in rng.uniform(r + 1.0, IMAGE_SIZE - r - 1.0, size=2))
            apart = all(max(abs(x - o["x"]), abs(y - o["y"])) >= r + o["r"] + GAP for o in objects)
            if apart and (not objects or _relation(objects[0], {"x": x, "y": y}) is not None):
                objects.append({"size": size, "r": r, "x": x, "y": y})
                break
        else:
            return None
    return objects


def _shapes_scene(rng: np.random.Generator, train: bool = False) -> tuple[Image.Image, list[str], int, dict[str, Any]]:
    """One scene; ``train`` redraws any object whose (shape, colour) is held out."""
    n = int(rng.integers(1, 4))
    objects = None
    while objects is None:
        objects = _place(rng, n)
    used: set[tuple[str, str]] = set()
    for obj in objects:
        while True:
            shape, colour = str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS)))
            if (shape, colour) not in used and not (train and (shape, colour) in _HELDOUT_PAIRS):
                break
        used.add((shape, colour))
        obj["shape"], obj["colour"] = shape, colour

    dark, background = draw_background(rng)
    rgbs = [object_rgb(obj["colour"], draw_jitter(rng)) for obj in objects]
    image = render_scene(objects, rgbs, background)

    meta = {"objects": objects, "background": "dark" if dark else "light"}
    return image, _captions(objects), SHAPES.index(objects[0]["shape"]), meta


def _generate_shapes(out: Path, seed: int, size: str) -> dict[str, Any]:
    splits = {}
    for split_index, (split, count) in enumerate(COUNTS["shapes"][size].items()):
        rng = _rng(seed, 1, split_index)

        def samples(rng: np.random.Generator = rng, split: str = split, count: int = count) -> Iterator[dict]:
            for i in range(count):
                image, captions, label, meta = _shapes_scene(rng, train=split == "train")
                yield {
                    "__key__": f"shapes-{split}-{i:06d}",
                    "png": encode_png(image),
                    "txt": captions[0],
                    "captions.json": json.dumps(captions),
                    "cls": str(label),
                    "json": _meta(meta),
                }

        splits[split] = _write_split(out, split, samples(), count)
    return make_info(
        splits,
        ["image", "text", "label"],
        classes=list(SHAPES),
        sample_rate=None,
        source=_source("shapes", seed, size),
        # the scene annotations of the ``json`` member (datamodules/decode.py, key ``objects``)
        attributes={"shape": list(SHAPES), "colour": list(COLOURS), "size": list(OBJECT_SIZES)},
        heldout_combinations=[dict(c) for c in HELDOUT_COMBINATIONS],
        heldout_from="train",
    )


# ============================================================================================ spoken
COMMANDS: tuple[str, ...] = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
DIGIT_WORDS: tuple[str, ...] = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
)
BASE_VOICES: tuple[str, ...] = ("en", "en-us", "en-gb-x-rp")
TRAIN_VARIANTS: tuple[str, ...] = ("", "m1", "m2", "m3", "m4", "m5", "m6", "f1", "f2", "f3", "f4")
HELDOUT_VARIANTS: tuple[str, ...] = ("f5", "m7")  # never in train/val/test: the ``heldout`` split
SAMPLE_RATE = 16000
RATE_RANGE = (130, 210)  # words per minute
PITCH_RANGE = (30, 70)
SNR_DB_RANGE = (10.0, 30.0)
PEAK_RANGE = (0.3, 0.9)
PAD_SECONDS = (0.02, 0.15)  # silence (then noise) before and after the speech
MAX_SECONDS = 2.0
SILENCE_THRESHOLD = 1e-3


def _voices(variants: tuple[str, ...]) -> list[str]:
    return [base + (f"+{v}" if v else "") for base in BASE_VOICES for v in variants]


def _spoken_clip(tts: Any, spec: dict[str, Any]) -> tuple[np.ndarray, int]:
    """Synthesise, trim, resample, pad and add noise to one clip; returns it and the rate used.

    Speech longer than 90% of MAX_SECONDS is synthesised again 15% faster.
    """
    import soxr

    rate = spec["rate"]
    while True:
        wave = tts.synthesize(
            spec["text"], voice=spec["voice"], rate=rate, pitch=spec["pitch"], seed=spec["seed"]
        )
        voiced = np.flatnonzero(np.abs(wave) > SILENCE_THRESHOLD)
        if voiced.size == 0:
            raise RuntimeError(f"espeak-ng produced silence for {spec}")
        wave = wave[voiced[0] : voiced[-1] + 1]
        if len(wave) <= MAX_SECONDS * tts.sample_rate * 0.9 or rate >= 400:
            break
        rate = int(rate * 1.15)  # too long: speak faster (deterministically)
    wave = soxr.resample(wave, tts.sample_rate, SAMPLE_RATE, quality="HQ").astype(np.float32)
    room = max(0, int(MAX_SECONDS * SAMPLE_RATE) - len(wave))
    lead = min(int(spec["lead"] * SAMPLE_RATE), room // 2)
    tail = min(int(spec["tail"] * SAMPLE_RATE), room - lead)
    wave = np.concatenate([np.zeros(lead, np.float32), wave, np.zeros(tail, np.float32)])
    rng = np.random.default_rng(spec["seed"])
    power = float(np.mean(wave[lead : len(wave) - tail] ** 2))
    noise = rng.standard_normal(len(wave)).astype(np.float32) * math.sqrt(power / 10 ** (spec["snr_db"] / 10))
    wave = wave + noise
    return wave * (spec["peak"] / max(float(np.abs(wave).max()), 1e-6)), rate


def _spoken_specs(seed: int, split_index: int, count: int, voices: list[str]) -> list[dict[str, Any]]:
    rng = _rng(seed, 2, split_index)
    specs = []
    for _ in range(count):
        command = int(rng.integers(len(COMMANDS)))
        digits = [DIGIT_WORDS[d] for d in rng.integers(0, 10, size=int(rng.integers(0, 4)))]
        specs.append(
            {
                "text": " ".join([COMMANDS[command], *digits]),
                "label": command,
                "voice": str(rng.choice(voices)),
                "rate": int(rng.integers(RATE_RANGE[0], RATE_RANGE[1] + 1)),
                "pitch": int(rng.integers(PITCH_RANGE[0], PITCH_RANGE[1] + 1)),
                "snr_db": round(float(rng.uniform(*SNR_DB_RANGE)), 2),
                "peak": round(float(rng.uniform(*PEAK_RANGE)), 3),
                "lead": float(rng.uniform(*PAD_SECONDS)),
                "tail": float(rng.uniform(*PAD_SECONDS)),
                "seed": int(rng.integers(0, 2**31 - 1)),
            }
        )
    return specs


def _generate_spoken(out: Path, seed: int, size: str) -> dict[str, Any]:
    from .espeak import EspeakProcess

    train_voices, heldout_voices = _voices(TRAIN_VARIANTS), _voices(HELDOUT_VARIANTS)
    splits = {}
    with EspeakProcess() as tts:  # a fresh library for each generation, all splits in order
        for split_index, (split, count) in enumerate(COUNTS["spoken"][size].items()):
            specs = _spoken_specs(
                seed, split_index, count, heldout_voices if split == "heldout" else train_voices
            )

            def samples(specs: list[dict[str, Any]] = specs, split: str = split) -> Iterator[dict]:
                for i, spec in enumerate(specs):
                    wave, rate = _spoken_clip(tts, spec)
                    meta = {k: spec[k] for k in ("voice", "pitch", "snr_db", "seed")}
                    meta["rate"] = rate
                    meta["seconds"] = round(len(wave) / SAMPLE_RATE, 4)
                    yield {
                        "__key__": f"spoken-{split}-{i:06d}",
                        "wav": encode_wav(wave, SAMPLE_RATE),
                        "txt": spec["text"],
                        "cls": str(spec["label"]),
                        "json": _meta(meta),
                    }

            splits[split] = _write_split(out, split, samples(), count)
    return make_info(
        splits,
        ["audio", "text", "label"],
        classes=list(COMMANDS),
        sample_rate=SAMPLE_RATE,
        source=_source("spoken", seed, size) + "; speech by espeak-ng",
        voices=train_voices,
        heldout_voices=heldout_voices,
    )


# ============================================================================================ digits
def _digit_image(pixels: np.ndarray) -> np.ndarray:
    """An 8x8 digit (0-16) -> 32x32 uint8, bicubic, stretched so the brightest pixel is 255."""
    small = Image.fromarray((pixels.reshape(8, 8) * (255.0 / 16.0)).astype(np.float32), mode="F")
    big = np.asarray(small.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC), dtype=np.float32)
    big = np.clip(big, 0.0, None)  # bicubic undershoot; the background stays 0
    return np.round(big * (255.0 / max(float(big.max()), 1e-6))).astype(np.uint8)


def _digits_split(labels: np.ndarray, seed: int, size: str) -> dict[str, np.ndarray]:
    """Stratified split of the indices: DIGITS_FRACTIONS per class (or a few per class for tiny)."""
    rng = _rng(seed, 3)
    parts: dict[str, list[int]] = {split: [] for split in DIGITS_FRACTIONS}
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))
        if size == "tiny":
            sizes = DIGITS_TINY_PER_CLASS
        else:
            n_val = round(len(idx) * DIGITS_FRACTIONS["val"])
            n_test = round(len(idx) * DIGITS_FRACTIONS["test"])
            sizes = {"train": len(idx) - n_val - n_test, "val": n_val, "test": n_test}
        start = 0
        for split in DIGITS_FRACTIONS:
            parts[split].extend(int(i) for i in idx[start : start + sizes[split]])
            start += sizes[split]
    return {split: rng.permutation(np.array(ix, dtype=np.int64)) for split, ix in parts.items()}


def _generate_digits(out: Path, seed: int, size: str) -> dict[str, Any]:
    from sklearn.datasets import load_digits

    data = load_digits()
    images, labels = np.asarray(data.data), np.asarray(data.target)
    splits = {}
    for split, indices in _digits_split(labels, seed, size).items():

        def samples(indices: np.ndarray = indices, split: str = split) -> Iterator[dict]:
            for i, index in enumerate(indices):
                label = int(labels[index])
                yield {
                    "__key__": f"digits-{split}-{i:06d}",
                    "png": encode_png(Image.fromarray(_digit_image(images[index]), mode="L")),
                    "txt": f"a handwritten {DIGIT_WORDS[label]}",
                    "cls": str(label),
                    "json": _meta({"sklearn_index": int(index)}),
                }

        splits[split] = _write_split(out, split, samples(), len(indices))
    return make_info(
        splits,
        ["image", "text", "label"],
        classes=[str(c) for c in range(10)],
        sample_rate=None,
        source=_source("digits", seed, size) + "; images from sklearn.datasets.load_digits (UCI optdigits)",
    )


# ============================================================================================ cache
GENERATORS: dict[str, Callable[[Path, int, str], dict[str, Any]]] = {
    "shapes": _generate_shapes,
    "spoken": _generate_spoken,
    "digits": _generate_digits,
}


def _source(name: str, seed: int, size: str) -> str:
    return (
        f"demo:{name} (generated by datamodules/demo.py, seed {seed}, size {size}, format v{FORMAT_VERSIONS[name]})"
    )


def _check_args(name: str, seed: int, size: str) -> None:
    if name not in DEMO_SETS:
        raise ValueError(f"unknown demo set {name!r}; choose one of {', '.join(DEMO_SETS)}")
    if size not in SIZES:
        raise ValueError(f"unknown demo size {size!r}; choose one of {', '.join(SIZES)}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"demo seed must be an integer >= 0, got {seed!r}")


def generate(name: str, out_dir: str | os.PathLike, seed: int = 0, size: str = "default") -> dict[str, Any]:
    """Write demo set ``name`` into ``out_dir`` (shards, then ``info.json``); returns the info.

    No locking or renaming: use :func:`demo_root` for the cached, concurrency-safe version.
    """
    _check_args(name, seed, size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    info = GENERATORS[name](out, int(seed), size)
    write_info(out, info)
    return info


def _is_complete(folder: Path) -> bool:
    try:
        info = read_info(folder)
    except (FileNotFoundError, ValueError):
        return False
    return all(
        (folder / shard).is_file() for split in info.get("splits", {}).values() for shard in split["shards"]
    )


def demo_root(
    name: str, cache_dir: str | os.PathLike | None = None, seed: int = 0, size: str = "default"
) -> Path:
    """The folder of demo set ``name`` (``info.json`` + shards), generated on first use.

    The folder is ``{cache_dir}/{name}-v{FORMAT_VERSIONS[name]}-s{seed}-{size}``; ``cache_dir`` defaults to
    :func:`default_cache_dir`. ``size`` is ``"default"`` or ``"tiny"`` (a few dozen samples per
    split, for tests). Generation goes into a temporary sibling folder renamed when complete;
    concurrent callers are serialised with an ``fcntl`` lock so the set is generated once.
    """
    _check_args(name, seed, size)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    final = cache / f"{name}-v{FORMAT_VERSIONS[name]}-s{int(seed)}-{size}"
    if _is_complete(final):
        return final
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f".{final.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if _is_complete(final):  # another process finished it while we waited
            return final
        for stale in cache.glob(f".{final.name}.tmp-*"):  # left by a crashed generator
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=cache))
        log.info("generating the %s demo set (first use) into %s", name, final)
        try:
            generate(name, tmp, seed, size)
            if final.exists():  # incomplete (a shard went missing): replace it
                shutil.rmtree(final)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final
