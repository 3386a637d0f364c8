"""Per-sample decoding and batch collation: shard members -> the batch dict of DESIGN.md.

    image        float [B, C, H, W] in [-1, 1]
    audio        float [B, T] mono at the configured rate; audio_lengths long [B]
    text         list[str]; text_ids long [B, L] (BOS ... EOS, right-padded with pad id); text_lengths long [B]
    references   list[list[str]]: every caption of each sample (``text`` is one of them, see below)
    label        long [B]
    objects      float [B, MAX_OBJECTS, 2 + A]: scene annotations (below), rows of padding all -1
    __key__      list[str]

Several captions per sample (COCO/Flickr style): a ``captions.json`` member holding a JSON list of
strings (:data:`CAPTIONS_MEMBER`; ``txt`` then holds the first, for readers that know only ``txt``).
Training draws one caption per sample with the pass's seeded generator (so a resumed pass draws the
same); evaluation takes the first as ``text``; ``references`` always holds all of them (a one-item
list for single-caption data, which is read exactly as before).

Scene annotations (key ``objects``, asked for in ``data.keys``; never loaded by default): the
``json`` member ``{"objects": [{"x": px, "y": px, "<attribute>": "<value>", ...}, ...]}`` with each
object's centre in pixels of the stored image and a value for every attribute ``info.json`` names in
``attributes`` (``{"shape": [...], "colour": [...], "size": [...]}`` for the demo shapes). One row per
object: its centre in [0, 1] of the decoded image (after the resize and centre crop), then each
attribute's value index in the order of ``attributes``. The scene judge of the generation head reads
them (``tasks/scene_judge.py``).

A sample that cannot be decoded raises :class:`BadSample` with a reason; the pipeline in
``webdata.py`` turns that into a counted, logged skip.
"""

from __future__ import annotations

import io
import json
import logging
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from .shards import AUDIO_EXTS, IMAGE_EXTS, AudioDecodeError, read_audio

log = logging.getLogger(__name__)

MODALITIES = ("image", "audio", "text", "label")
ANNOTATIONS = ("objects",)
"""Keys read from the ``json`` member, loaded only when ``data.keys`` names them."""
MAX_OBJECTS = 8
SAMPLE_REASONS = (
    "corrupt_image", "truncated_audio", "empty_audio", "undecodable_audio", "non_finite_audio", "empty_text",
    "bad_captions", "bad_label", "unknown_label", "bad_objects", *(f"missing_{m}" for m in MODALITIES),
    "missing_objects",
)
"""Every :class:`BadSample` reason (audio ones from ``shards.read_audio``)."""


CAPTIONS_MEMBER = "captions.json"
"""Shard member (extension) holding every caption of a sample as a JSON list of strings."""


class BadSample(Exception):
    """A sample that must be skipped; ``reason`` is a short counter name."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


_UINT8_TO_UNIT = torch.arange(256, dtype=torch.uint8).float().div_(127.5).sub_(1.0).numpy()
"""``v / 127.5 - 1`` in float32 for every uint8 ``v``: one table look-up per pixel replaces four small
tensor ops per image (a quarter of the per-sample cost of a 32x32 image; same values)."""


def image_to_tensor(image: Image.Image, size: int, channels: int) -> torch.Tensor:
    """PIL image -> [C, size, size] in [-1, 1]: resize the short side (bicubic), center crop."""
    mode = "RGB" if channels == 3 else "L"
    if image.mode != mode:  # converting to the same mode would only copy
        image = image.convert(mode)
    w, h = image.size
    scale = size / min(w, h)
    if (w, h) != (size, size):
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        image = image.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        image = image.crop((left, top, left + size, top + size))
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(_UINT8_TO_UNIT.take(array.transpose(2, 0, 1)))  # a new contiguous array


@dataclass
class SampleDecoder:
    """Turns one raw WebDataset sample (``{"__key__", "png", "wav", "txt", "cls", ...}``) into tensors.

    ``keys`` are the modalities to produce; a sample missing one of them is a bad sample.
    Training crops audio to ``audio_max_samples`` at a random offset; evaluation keeps full length.
    """

    keys: tuple[str, ...]
    image_size: int = 32
    image_channels: int = 3
    sample_rate: int = 16000
    audio_max_samples: int | None = None
    train: bool = False
    num_classes: int | None = None
    seed: int = 0
    attributes: dict[str, list[str]] | None = None  # info.json's, for ``objects``
    rng: random.Random = field(default_factory=random.Random, repr=False)

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"__key__": sample["__key__"]}
        crop = None  # (scale, left, top) of the image transform, for the objects' centres
        if "image" in self.keys:
            data = _member(sample, IMAGE_EXTS, "image")
            try:
                with Image.open(io.BytesIO(data)) as image:
                    if min(image.size) < self.image_size:
                        _warn_upsampling(image.size, self.image_size, sample.get("__url__", sample["__key__"]))
                    out["image"] = image_to_tensor(image, self.image_size, self.image_channels)
                    crop = _crop_of(image.size, self.image_size)
            except Exception as err:  # PIL raises many types for corrupt bytes
                raise BadSample("corrupt_image", repr(err)) from err
        if "audio" in self.keys:
            data = _member(sample, AUDIO_EXTS, "audio")
            try:
                wave, _ = read_audio(data, self.sample_rate)
            except AudioDecodeError as err:
                raise BadSample(err.reason, err.detail) from err
            if self.train and self.audio_max_samples and len(wave) > self.audio_max_samples:
                start = self.rng.randint(0, len(wave) - self.audio_max_samples)
                wave = wave[start : start + self.audio_max_samples]
            out["audio"] = torch.from_numpy(np.ascontiguousarray(wave))
        if "text" in self.keys:
            captions = read_captions(sample)
            # one draw per multi-caption sample only: single-caption data keeps its random stream
            out["text"] = self.rng.choice(captions) if self.train and len(captions) > 1 else captions[0]
            out["references"] = captions
        if "label" in self.keys:
            raw = _member(sample, ("cls",), "label")
            try:
                label = int(raw.decode("utf-8").strip())
            except ValueError as err:
                raise BadSample("bad_label", repr(raw[:20])) from err
            if label < 0 or (self.num_classes is not None and label >= self.num_classes):
                raise BadSample("unknown_label", f"{label} not in [0, {self.num_classes})")
            out["label"] = label
        if "objects" in self.keys:
            out["objects"] = read_objects(sample, self.attributes or {}, crop)
        return out


def _crop_of(size: tuple[int, int], target: int) -> tuple[float, float, float]:
    """(scale, left, top) of :func:`image_to_tensor`'s resize and centre crop to ``target`` px, as
    ``decoded = (source - left / top) * scale``; ``scale`` includes the division by ``target``,
    so a decoded centre lies in [0, 1]."""
    w, h = size
    scale = target / min(w, h)
    nw, nh = max(target, round(w * scale)), max(target, round(h * scale))
    return scale / target, (nw - target) // 2 / scale, (nh - target) // 2 / scale


def read_objects(sample: dict[str, Any], attributes: dict[str, list[str]],
                 crop: tuple[float, float, float] | None) -> torch.Tensor:
    """The ``json`` member's objects -> float [MAX_OBJECTS, 2 + len(attributes)] (see the module
    docstring). ``crop`` (:func:`_crop_of`) maps source pixels to [0, 1] of the decoded image; without
    it (no image decoded) centres stay in source pixels. Raises :class:`BadSample` ``missing_objects``
    or ``bad_objects`` (not JSON, no list of 1 to MAX_OBJECTS objects, an unknown attribute value)."""
    if "json" not in sample:
        raise BadSample("missing_objects", "no json member")
    try:
        objects = json.loads(sample["json"])["objects"]
        if not isinstance(objects, list) or not 1 <= len(objects) <= MAX_OBJECTS:
            raise ValueError(f"objects must be a list of 1 to {MAX_OBJECTS} objects")
        rows = torch.full((MAX_OBJECTS, 2 + len(attributes)), -1.0)
        scale, left, top = crop or (1.0, 0.0, 0.0)
        for i, obj in enumerate(objects):
            rows[i, 0], rows[i, 1] = (float(obj["x"]) - left) * scale, (float(obj["y"]) - top) * scale
            for j, (name, values) in enumerate(attributes.items()):
                rows[i, 2 + j] = values.index(obj[name])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise BadSample("bad_objects", repr(err)) from err
    return rows


_UPSAMPLING_WARNED: set[int] = set()


def _warn_upsampling(size: tuple[int, int], target: int, where: str) -> None:
    """Warn once per process and target size that images are upsampled (allowed, but rarely meant)."""
    if target in _UPSAMPLING_WARNED:
        return
    _UPSAMPLING_WARNED.add(target)
    log.warning("images of %d x %d px (e.g. in %s) are upsampled to %d px (the image codec's image_size, or "
                "data.image_size): the model sees no detail the shards do not hold; write shards at >= %d px "
                "or train at a smaller size (warned once)", size[0], size[1], where, target, target)


def read_captions(sample: dict[str, Any]) -> list[str]:
    """Every caption of a raw sample: its ``captions.json`` list, else its ``txt``; stripped, blanks
    dropped. Raises :class:`BadSample` ``bad_captions`` (not a JSON list of strings, e.g. strings
    mixed with numbers), ``empty_text`` (no caption left) or ``missing_text``."""
    if CAPTIONS_MEMBER in sample:
        try:
            value = json.loads(sample[CAPTIONS_MEMBER])
        except (ValueError, UnicodeDecodeError) as err:
            raise BadSample("bad_captions", f"{CAPTIONS_MEMBER} is not JSON ({err})") from err
        if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
            kinds = sorted({type(c).__name__ for c in value}) if isinstance(value, list) else [type(value).__name__]
            raise BadSample("bad_captions", f"{CAPTIONS_MEMBER} must be a JSON list of strings, got {kinds}")
        captions = [c.strip() for c in value if c.strip()]
    else:
        text = _member(sample, ("txt",), "text").decode("utf-8", errors="replace").strip()
        captions = [text] if text else []
    if not captions:
        raise BadSample("empty_text")
    return captions


def _member(sample: dict[str, Any], exts: tuple[str, ...], modality: str) -> bytes:
    for ext in exts:
        if ext in sample:
            return sample[ext]
    raise BadSample(f"missing_{modality}", f"no member with extension {'|'.join(exts)}")


def pad_1d(seqs: list[torch.Tensor], value: float | int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad 1-D tensors to the longest: ``[B, T_max]`` and lengths ``[B]``."""
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    out = seqs[0].new_full((len(seqs), int(lengths.max())), value)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return out, lengths


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack decoded samples into the batch dict (text ids are added later by the tokenizer)."""
    batch: dict[str, Any] = {"__key__": [s["__key__"] for s in samples]}
    first = samples[0]
    if "image" in first:
        batch["image"] = torch.stack([s["image"] for s in samples])
    if "audio" in first:
        batch["audio"], batch["audio_lengths"] = pad_1d([s["audio"] for s in samples], 0.0)
    if "text" in first:
        batch["text"] = [s["text"] for s in samples]
        batch["references"] = [s.get("references") or [s["text"]] for s in samples]
        if "text_ids" in first:
            batch["text_ids"], batch["text_lengths"] = pad_1d([s["text_ids"] for s in samples], first["pad_id"])
    if "label" in first:
        batch["label"] = torch.tensor([s["label"] for s in samples], dtype=torch.long)
    if "objects" in first:
        batch["objects"] = torch.stack([s["objects"] for s in samples])
    return batch
