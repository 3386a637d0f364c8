"""Token codes of a frozen tokenizer, computed once per training sample and read instead of re-encoding.

A stage whose tokenizer is frozen (stage 2) would otherwise decode and encode every sample again at
every step of every epoch, through the same frozen codecs, to get the same codes. Like fast-DiT's
and diffusers' training scripts (which extract latents once), the training split is encoded once;
training then reads the codes, which also skips image and audio decoding.

What is stored, per sample of the training split (the batch format, with codes instead of pixels):

* ``<modality>_codes`` int16 [N] (images: the token grid, row-major; audio: ``<modality>_code_lengths``
  tokens of the full clip), read back as long [B, N] (audio right-padded with 0);
* ``label``, ``objects`` (scene annotations), ``text`` (raw strings, every caption of a sample: text is tokenized per batch, as from
  shards, so truncation is still counted; a multi-caption sample draws one per step, seeded by the
  pass like the audio crops), ``__key__``;
* the raw ``image`` (uint8, exact) or ``audio`` (16-bit PCM) only when a head reads it too (the
  generation head's judge), requested with ``keep_raw``.

Where: ``<cache root>/<fingerprint>/`` (``part-<rank>-of-<world>.pt`` + ``index.json``), cache root
``$MULTIMODAL_LATENT_CACHE``, ``$MULTIMODAL_CACHE/latents`` (default ``~/.cache/multimodal-dit/latents``)
or ``data.latent_cache_dir``.
The fingerprint is a SHA-256 over the tokenizer's identity (the model passes a hash of the frozen
weights it encodes with), the shards' identity (URL, size and modification time of each local
file; the URL alone for remote ones) and the decode settings, so a cache is used only for the very
tokenizer and shards it was built from: another tokenizer or changed shards get a new folder and are
encoded afresh (a log line says so), never read stale. ``index.json`` repeats the components and is
checked on load; a folder whose index disagrees is refused with both named.

Building: each DDP rank encodes its share of the shards (``shards[rank::world]``, read once like
validation), writes its part (atomically), and waits for the others (a barrier); rank 0 writes the
index. Samples that do not decode are skipped and counted (logged once, and added to the first
training batch's ``__counts__`` on rank 0 of each epoch, so they reach the logger).

Reading (:class:`CachedStream`): every epoch is a seeded permutation of the cached samples (by seed
and epoch), dealt to ranks and workers, continued into the next permutation when an epoch wants
more batches; the stream has the stateful-resume contract of ``ShardStream`` (``ShardLoader`` saves
its position), so a resumed run continues with the very next batch.

Random audio crops (``data.audio_max_seconds``) are taken in token space, at a random token offset
aligned to the tokenizer's hop (``samples_per_token``): the crop holds the full clip's codes of that
window, so its edge tokens saw context outside the window that a crop of the waveform would cut off.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import IterableDataset, get_worker_info

from .decode import collate, pad_1d
from .stream import COUNTS_KEY, ShardStream, tokenize_text

log = logging.getLogger(__name__)

FORMAT = 2  # 2: every caption of a sample is kept (``texts`` holds lists)
"""Bumped whenever what is stored changes (part of the fingerprint)."""

RAGGED = ("audio_codes", "audio")
"""Fields of variable length per sample (stored flat with offsets)."""

Encoder = Callable[[dict[str, Any]], dict[str, tuple[Tensor, Tensor]]]
"""``batch -> {modality: (codes [B, N] long, token lengths [B] long)}`` (the frozen tokenizer)."""


def default_root() -> Path:
    """``$MULTIMODAL_LATENT_CACHE``, else ``$MULTIMODAL_CACHE/latents``, else ``~/.cache/multimodal-dit/latents``."""
    if os.environ.get("MULTIMODAL_LATENT_CACHE"):
        return Path(os.environ["MULTIMODAL_LATENT_CACHE"])
    base = os.environ.get("MULTIMODAL_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "multimodal-dit") / "latents"


def shard_identity(urls: list[str]) -> list[list[Any]]:
    """Per shard: [url, size, mtime_ns] for a local file, [url] for anything else."""
    out: list[list[Any]] = []
    for url in urls:
        path = Path(url[len("file:"):] if url.startswith("file:") else url)
        try:
            st = path.stat()
            out.append([str(path.resolve()), st.st_size, st.st_mtime_ns])
        except OSError:
            out.append([url])
    return out


def fingerprint(components: dict[str, Any]) -> str:
    blob = json.dumps(components, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


class LatentCache:
    """The cached training split in memory: ``keys`` and per-field arrays (see the module docstring).

    ``fields``: ``{name: Tensor [n, ...]}`` for fixed-size fields, ``{name: (flat [total], offsets
    [n + 1])}`` for variable-length ones (audio codes, raw audio); ``texts`` (every caption of each
    sample) list[list[str]] or None.
    """

    def __init__(self, keys: list[str], fields: dict[str, Any], texts: list[list[str]] | None,
                 counts: dict[str, int] | None = None) -> None:
        self.keys, self.fields, self.texts, self.counts = keys, fields, texts, dict(counts or {})

    def __len__(self) -> int:
        return len(self.keys)

    # ------------------------------------------------------------------ building
    @classmethod
    def encode_split(cls, stream: ShardStream, encode: Encoder, keep_raw: tuple[str, ...]) -> LatentCache:
        """Read an evaluation-mode stream (every sample of its shards once), encode every batch."""
        keys: list[str] = []
        texts: list[list[str]] = []
        columns: dict[str, list[Tensor]] = {}
        counts: Counter[str] = Counter()
        for batch in stream:
            counts.update(batch.get(COUNTS_KEY, {}))
            keys.extend(batch["__key__"])
            for modality, (codes, lengths) in encode(batch).items():
                codes, lengths = codes.cpu(), lengths.cpu()
                if codes.numel() and (int(codes.max()) > 32767 or int(codes.min()) < 0):
                    raise ValueError(f"latent cache: {modality} codes outside int16 [0, 32767]")
                for row, n in zip(codes, lengths.tolist()):
                    columns.setdefault(f"{modality}_codes", []).append(row[:n].to(torch.int16))
            for name in ("label", "objects"):
                if name in batch:
                    columns.setdefault(name, []).extend(batch[name].cpu())
            if "text" in batch:
                texts.extend(batch["references"])
            if "image" in keep_raw:  # [-1, 1] floats of uint8 pixels -> the uint8 again (exact)
                pixels = ((batch["image"].cpu() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
                columns.setdefault("image", []).extend(pixels)
            if "audio" in keep_raw:
                for wave, n in zip(batch["audio"].cpu(), batch["audio_lengths"].tolist()):
                    pcm = (wave[:n] * 32768.0).round().clamp(-32768, 32767).to(torch.int16)
                    columns.setdefault("audio", []).append(pcm)
        fields: dict[str, Any] = {}
        for name, items in columns.items():  # fixed-size fields stacked, variable-length ones ragged
            fields[name] = _ragged(items) if name in RAGGED else torch.stack(items)
        return cls(keys, fields, texts if texts else None, dict(counts))

    # ------------------------------------------------------------------ files
    def save(self, path: Path) -> None:
        tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
        torch.save({"keys": self.keys, "fields": self.fields, "texts": self.texts, "counts": self.counts}, tmp)
        os.replace(tmp, path)  # atomic: a reader never sees half a part

    @classmethod
    def load(cls, paths: list[Path]) -> LatentCache:
        parts = [torch.load(p, map_location="cpu", weights_only=True) for p in paths]
        parts = [p for p in parts if p["keys"]]
        if not parts:
            return cls([], {}, None)
        keys = [k for p in parts for k in p["keys"]]
        texts = [t for p in parts for t in p["texts"]] if parts[0]["texts"] is not None else None
        fields: dict[str, Any] = {}
        for name, first in parts[0]["fields"].items():
            values = [p["fields"][name] for p in parts]
            fields[name] = _cat_ragged(values) if isinstance(first, (tuple, list)) else torch.cat(values)
        counts: Counter[str] = Counter()
        for p in parts:
            counts.update(p["counts"])
        return cls(keys, fields, texts, dict(counts))

    # ------------------------------------------------------------------ reading
    def sample(self, i: int) -> dict[str, Any]:
        """Sample ``i`` as the decoder would give it, codes in place of (or beside) the raw modality."""
        out: dict[str, Any] = {"__key__": self.keys[i]}
        for name, value in self.fields.items():
            if isinstance(value, (tuple, list)):
                flat, offsets = value
                out[name] = flat[int(offsets[i]): int(offsets[i + 1])]
            else:
                out[name] = value[i]
        if self.texts is not None:
            out["references"] = list(self.texts[i])
            out["text"] = out["references"][0]
        return out


def _ragged(items: list[Tensor]) -> tuple[Tensor, Tensor]:
    lengths = torch.tensor([len(t) for t in items], dtype=torch.long)
    offsets = torch.zeros(len(items) + 1, dtype=torch.long)
    offsets[1:] = lengths.cumsum(0)
    flat = torch.cat(items) if items else torch.zeros(0, dtype=torch.int16)
    return flat, offsets


def _cat_ragged(values: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    flats, offsets, base = [], [torch.zeros(1, dtype=torch.long)], 0
    for flat, off in values:
        flats.append(flat)
        offsets.append(off[1:] + base)
        base += int(off[-1])
    return torch.cat(flats), torch.cat(offsets)


_UNIT = torch.arange(256, dtype=torch.float32).div_(127.5).sub_(1.0)  # uint8 -> [-1, 1], as the decoder


def collate_cached(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Cached samples -> the batch dict: ``<m>_codes`` long (+ ``audio_code_lengths``), raw media when
    kept, label, text (+ ids), ``__key__``."""
    decoded = []
    for s in samples:
        d = {k: v for k, v in s.items() if not k.endswith("_codes") and k not in ("image", "audio")}
        if "image" in s:
            d["image"] = _UNIT[s["image"].long()]
        if "audio" in s:
            d["audio"] = s["audio"].float() / 32768.0
        decoded.append(d)
    batch = collate(decoded)
    for name in samples[0]:
        if name.endswith("_codes"):
            codes = [s[name].long() for s in samples]
            if name == "audio_codes":
                batch[name], batch["audio_code_lengths"] = pad_1d(codes, 0)
            else:
                batch[name] = torch.stack(codes)
    return batch


class CachedStream(IterableDataset):
    """Training batches from a :class:`LatentCache` (see the module docstring); the resume contract of
    ``ShardStream`` (``epoch``, ``resume_batches``, ``batches_per_rank``, ``leftovers``)."""

    train = True

    def __init__(self, cache: LatentCache, batch_size: int, batches_per_rank: int, tokenizer: Any = None,
                 seed: int = 0, rank: int = 0, world_size: int = 1, crop_tokens: int | None = None,
                 samples_per_token: int | None = None) -> None:
        super().__init__()
        if len(cache) == 0:
            raise ValueError("the latent cache holds no sample (every training sample failed to decode?)")
        self.cache, self.batch_size, self.batches_per_rank = cache, batch_size, batches_per_rank
        self.tokenizer, self.seed, self.rank, self.world_size = tokenizer, seed, rank, world_size
        self.crop_tokens, self.samples_per_token = crop_tokens, samples_per_token
        self.epoch = 0
        self.resume_batches = 0
        self.leftovers: Any = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.batches_per_rank

    def _indices(self, epoch: int, worker: int, num_workers: int, n_batches: int) -> Iterator[int]:
        """This worker's sample indices: permutations seeded by (seed, epoch, round), dealt to ranks and
        workers round-robin, as many rounds as the epoch's batches need."""
        need = n_batches * self.batch_size
        stride = self.world_size * num_workers
        slot = self.rank * num_workers + worker
        made, rnd = 0, 0
        while made < need:
            order = list(range(len(self.cache)))
            random.Random(f"{self.seed}-{epoch}-{rnd}").shuffle(order)
            for i in order[slot::stride]:
                yield i
                made += 1
                if made >= need:
                    return
            rnd += 1

    def _crop(self, sample: dict[str, Any], rng: random.Random) -> dict[str, Any]:
        codes = sample.get("audio_codes")
        if self.crop_tokens is None or codes is None or len(codes) <= self.crop_tokens:
            return sample
        start = rng.randint(0, len(codes) - self.crop_tokens)
        sample["audio_codes"] = codes[start: start + self.crop_tokens]
        if "audio" in sample and self.samples_per_token:
            a = start * self.samples_per_token
            sample["audio"] = sample["audio"][a: a + self.crop_tokens * self.samples_per_token]
        return sample

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch, self.epoch = self.epoch, self.epoch + 1
        skip, self.resume_batches = self.resume_batches, 0
        skip = skip // num_workers + (worker < skip % num_workers)
        n_batches = self.batches_per_rank // num_workers + (worker < self.batches_per_rank % num_workers)
        rng = random.Random(f"{self.seed}-{epoch}-{self.rank}-{worker}-crop")
        counts: Counter[str] = Counter(self.cache.counts if (self.rank == 0 and worker == 0) else {})
        buffer: list[dict[str, Any]] = []
        made = 0
        for i in self._indices(epoch, worker, num_workers, n_batches):
            sample = self._crop(self.cache.sample(i), rng)
            if len(sample.get("references", ())) > 1:  # as the shard decoder draws in training
                sample["text"] = rng.choice(sample["references"])
            tokenize_text(sample, self.tokenizer, counts)
            buffer.append(sample)
            if len(buffer) < self.batch_size:
                continue
            made += 1
            if made > skip:
                batch = collate_cached(buffer)
                batch[COUNTS_KEY] = {k: v for k, v in counts.items() if v}
                counts.clear()
                yield batch
            buffer = []


def load_or_build(root: Path, components: dict[str, Any], build: Callable[[], LatentCache], rank: int = 0,
                  world_size: int = 1) -> tuple[LatentCache, Path, bool]:
    """The cache for ``components`` under ``root``: read when complete, else built (each rank its part,
    then a barrier). Returns (cache, its folder, whether it was built now)."""
    folder = root / fingerprint(components)
    index = folder / "index.json"
    built = False
    if not index.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        build().save(folder / f"part-{rank}-of-{world_size}.pt")
        _barrier(world_size)
        if rank == 0:
            parts = [f"part-{r}-of-{world_size}.pt" for r in range(world_size)]
            tmp = index.with_name(f"index.json.tmp-{os.getpid()}")
            tmp.write_text(json.dumps({"format": FORMAT, "components": components, "parts": parts}, indent=1,
                                      default=str), encoding="utf-8")
            os.replace(tmp, index)
        _barrier(world_size)
        built = True
    meta = json.loads(index.read_text(encoding="utf-8"))
    wanted = json.loads(json.dumps(components, default=str))
    if meta.get("components") != wanted:
        raise ValueError(f"latent cache {folder} was built for {meta.get('components')}, not for {wanted}: "
                         "delete the folder")
    return LatentCache.load([folder / p for p in meta["parts"]]), folder, built


def _barrier(world_size: int) -> None:
    if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
