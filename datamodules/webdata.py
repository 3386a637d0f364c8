"""``WebDataModule``: one WebDataset shard folder (or URL patterns, or a demo set) -> batches.

Splitting (the part that keeps DDP from hanging and evaluation exact):

* training reads shards *resampled* (drawn with replacement, seeded by seed/epoch/rank/worker)
  and stops after a fixed number of batches, ``samples_per_epoch // (world_size * batch_size)``
  per rank, divided among the workers, so every rank yields the same number of batches;
* validation/test/predict split the shard list by rank, then by worker, and read each shard
  once, so every sample is seen exactly once across ranks and workers (this needs at least
  ``world_size * num_workers`` shards; fewer gives a warning at setup).

webdataset does the tar streaming, URL opening (local brace patterns, ``pipe:`` commands,
http(s) and fsspec URLs pass through untouched) and shard expansion. The splitting and seeding
are written here because webdataset's ``ResampledShards`` does not know Lightning's epoch (its
epoch counter resets whenever non-persistent workers are re-created).
"""

from __future__ import annotations

import logging
import random
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, Sampler, get_worker_info

from .decode import MODALITIES, BadSample, SampleDecoder, collate
from .shards import read_info
from .text import TextTokenizer, train_sentencepiece

log = logging.getLogger(__name__)

COUNTS_KEY = "__counts__"
"""Batch key of a ``{event: count}`` dict: samples skipped (``skipped/<reason>``) and captions
truncated (``truncated_text``) since the previous batch of the same worker. The training module
sums and logs them, so data problems reach the logger."""


def expand_urls(urls: str | list[str]) -> list[str]:
    """Brace-expand URL patterns (``a-{000000..000009}.tar``); lists may mix patterns."""
    if isinstance(urls, str):
        urls = [urls]
    out: list[str] = []
    for u in urls:
        out.extend(wds.shardlists.expand_urls(u))
    return out


class ShardStream(IterableDataset):
    """Streams batches (already collated) from tar shards; see the module docstring for splitting.

    In training it yields exactly ``len(self)`` batches per rank over all workers.
    """

    def __init__(
        self,
        urls: list[str],
        decoder: SampleDecoder,
        batch_size: int,
        train: bool,
        tokenizer: TextTokenizer | None = None,
        batches_per_rank: int | None = None,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__()
        if not urls:
            raise ValueError("ShardStream got no shard URLs")
        if train and not batches_per_rank:
            raise ValueError("a training ShardStream needs batches_per_rank >= 1")
        self.urls, self.decoder, self.batch_size, self.train = urls, decoder, batch_size, train
        self.tokenizer, self.batches_per_rank = tokenizer, batches_per_rank
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self._epoch_fresh = True
        self._offset = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self._epoch_fresh = epoch, True

    def _effective_epoch(self) -> int:
        # Non-persistent workers get a fresh copy each epoch (epoch just set). A persistent
        # worker's copy never sees set_epoch again, so it advances by itself on each new pass.
        if self._epoch_fresh:
            self._epoch_fresh, self._offset = False, 0
        else:
            self._offset += 1
        return self.epoch + self._offset

    def __len__(self) -> int:
        if not self.train:
            raise TypeError("evaluation streams have no fixed length")
        return self.batches_per_rank

    def _worker(self) -> tuple[int, int]:
        info = get_worker_info()
        return (info.id, info.num_workers) if info is not None else (0, 1)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, num_workers = self._worker()
        epoch = self._effective_epoch()
        rng = random.Random(f"{self.seed}-{epoch}-{self.rank}-{worker}")
        self.decoder.rng = rng
        counts: Counter[str] = Counter()

        def on_error(exn: Exception) -> bool:  # tar-level errors: a broken or vanished shard
            counts["skipped/shard_error"] += 1
            log.warning("skipping unreadable shard data: %r", exn)
            return True

        if self.train:
            n_batches = self.batches_per_rank // num_workers + (worker < self.batches_per_rank % num_workers)
            if n_batches == 0:
                return
            shards = ({"url": rng.choice(self.urls)} for _ in iter(int, 1))
        else:
            n_batches = None
            mine = self.urls[self.rank :: self.world_size][worker::num_workers]
            shards = iter([{"url": u} for u in mine])
        samples = wds.tarfile_to_samples(handler=on_error)(shards)
        if self.train and self.shuffle_buffer > 1:
            # a buffer larger than a quarter of this worker's epoch mostly reads samples that are
            # thrown away when the epoch ends (measured: ~50% extra tar reads at 4096 samples/epoch)
            bufsize = max(2, min(self.shuffle_buffer, n_batches * self.batch_size // 4))
            samples = wds.filters._shuffle(samples, bufsize, min(100, bufsize), rng)

        buffer: list[dict[str, Any]] = []
        yielded = 0
        for raw in samples:
            try:
                sample = self.decoder(raw)
            except BadSample as bad:
                counts[f"skipped/{bad.reason}"] += 1
                log.warning("skipping sample %r from %s: %s", raw.get("__key__"), raw.get("__url__"), bad)
                continue
            if self.tokenizer is not None and "text" in sample:
                sample["text_ids"], truncated = self.tokenizer.encode(sample["text"])
                sample["pad_id"] = self.tokenizer.pad_id
                counts["truncated_text"] += int(truncated)
            buffer.append(sample)
            if len(buffer) == self.batch_size:
                yield self._batch(buffer, counts)
                buffer = []
                yielded += 1
                if n_batches is not None and yielded >= n_batches:
                    return
        if self.train and yielded < (n_batches or 0):
            raise RuntimeError(
                f"training shards ran dry after {yielded} of {n_batches} batches "
                f"(every sample unreadable? counts: {dict(counts)})"
            )
        if buffer and not self.train:
            yield self._batch(buffer, counts)

    @staticmethod
    def _batch(samples: list[dict[str, Any]], counts: Counter[str]) -> dict[str, Any]:
        batch = collate(samples)
        batch[COUNTS_KEY] = {k: v for k, v in counts.items() if v}
        counts.clear()
        return batch


class _EpochSampler(Sampler):
    """The sampler slot of a DataLoader over an IterableDataset (an endless stream of ``None``,
    like torch's own), forwarding Lightning's ``set_epoch`` (called at every epoch start and
    restored on resume) to the dataset."""

    def __init__(self, dataset: ShardStream) -> None:
        self.dataset = dataset

    def __iter__(self) -> Iterator[None]:
        while True:
            yield None

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)


class ShardLoader(DataLoader):
    """A DataLoader over a :class:`ShardStream` (batches are made inside the workers)."""

    def __init__(self, dataset: ShardStream, num_workers: int = 0, persistent_workers: bool = False,
                 pin_memory: bool = False, **kwargs: Any) -> None:
        # Lightning re-creates loaders (e.g. for predict) passing every DataLoader argument; the
        # sampling ones must stay unset for a stream that batches inside its workers
        for key in ("batch_size", "shuffle", "sampler", "batch_sampler", "drop_last"):
            kwargs.pop(key, None)
        super().__init__(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                         persistent_workers=persistent_workers and num_workers > 0, **kwargs)
        object.__setattr__(self, "sampler", _EpochSampler(dataset))  # DataLoader forbids setattr


class WebDataModule(L.LightningDataModule):
    """Batches of the DESIGN.md batch format from WebDataset shards.

    Args:
        root: a shard folder with ``info.json`` (``{split}-NNNNNN.tar`` beside it).
        demo: the name of an embedded demo set (``shapes``, ``spoken``, ``digits``) instead of root.
        train_urls / val_urls / test_urls: explicit shard URLs or brace patterns; override root.
        keys: the modalities to load (subset of image, audio, text, label); default all the data has.
        batch_size / eval_batch_size: per-rank batch sizes (eval defaults to batch_size).
        samples_per_epoch: training samples per epoch over all ranks (default: the train count).
        shuffle_buffer: training shuffle buffer, in samples.
        image_size / image_channels: images are resized and center-cropped to this, RGB (3) or L (1).
        sample_rate / audio_max_seconds: audio rate; training clips are randomly cropped to this length.
        tokenizer_path: a sentencepiece model; when missing and text is loaded, one is trained on the
            training split's text in ``prepare_data`` and stored beside the shards.
        vocab_size / text_max_length: for that training, and truncation (counted) of long texts.
        seed: seeds shard resampling, shuffling and audio crops.
        cache_dir / demo_size: where demo sets are generated, and their size (``default`` or ``tiny``).
        val_split / test_split / predict_split: split names in ``info.json``.
    """

    def __init__(
        self,
        root: str | None = None,
        demo: str | None = None,
        train_urls: str | list[str] | None = None,
        val_urls: str | list[str] | None = None,
        test_urls: str | list[str] | None = None,
        keys: list[str] | None = None,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        samples_per_epoch: int | None = None,
        shuffle_buffer: int = 1000,
        num_workers: int = 0,
        persistent_workers: bool = False,
        pin_memory: bool = False,
        image_size: int = 32,
        image_channels: int = 3,
        sample_rate: int = 16000,
        audio_max_seconds: float | None = 2.0,
        tokenizer_path: str | None = None,
        vocab_size: int = 512,
        text_max_length: int = 64,
        seed: int = 0,
        cache_dir: str | None = None,
        demo_size: str = "default",
        val_split: str = "val",
        test_split: str = "test",
        predict_split: str = "test",
    ) -> None:
        super().__init__()
        if root is not None and demo is not None:
            raise ValueError("give either data.root or data.demo, not both")
        if root is None and demo is None and train_urls is None and val_urls is None and test_urls is None:
            raise ValueError("no data: set data.root (a shard folder), data.demo, or data.train_urls/val_urls/test_urls")
        if keys is not None:
            unknown = set(keys) - set(MODALITIES)
            if unknown:
                raise ValueError(f"data.keys has unknown modalities {sorted(unknown)}; choose from {MODALITIES}")
        for name, value in (("batch_size", batch_size), ("num_workers", num_workers + 1), ("image_size", image_size)):
            if value < 1:
                raise ValueError(f"data.{name} must be positive, got {value}")
        if image_channels not in (1, 3):
            raise ValueError(f"data.image_channels must be 1 or 3, got {image_channels}")
        # the settings, read by the hooks (save_hyperparameters is unreliable for DataModules built
        # inside another DataModule by the CLI)
        self.cfg = SimpleNamespace(**{k: v for k, v in locals().items() if k not in ('self', '__class__')})
        self.root, self.demo, self._keys = root, demo, keys
        self.urls = {"train": train_urls, val_split: val_urls, test_split: test_urls}
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.persistent_workers, self.pin_memory = num_workers, persistent_workers, pin_memory
        self.tokenizer: TextTokenizer | None = None
        self._info: dict[str, Any] | None = None
        self._rank, self._world_size = 0, 1

    # ----------------------------------------------------------------- data set description
    @property
    def data_dir(self) -> Path | None:
        """The shard folder (generating the demo set on first use)."""
        if self.demo is not None and self.root is None:
            from .demo import demo_root

            self.root = str(demo_root(self.demo, self.cfg.cache_dir, seed=0, size=self.cfg.demo_size))
        return Path(self.root) if self.root is not None else None

    @property
    def info(self) -> dict[str, Any]:
        """``info.json`` of the shard folder; a minimal description when only URLs were given."""
        if self._info is None:
            if self.data_dir is not None:
                self._info = read_info(self.data_dir)
            else:
                self._info = {"splits": {}, "modalities": list(self._keys or MODALITIES), "classes": []}
        return self._info

    @property
    def name(self) -> str:
        return self.demo or (str(self.root) if self.root else "the given URLs")

    @property
    def keys(self) -> tuple[str, ...]:
        keys = self._keys or [m for m in MODALITIES if m in self.info["modalities"]]
        missing = [k for k in keys if k not in self.info["modalities"]]
        if missing:
            raise ValueError(
                f"data set {self.name} has no {missing} (it has {self.info['modalities']}); fix data.keys"
            )
        return tuple(keys)

    @property
    def classes(self) -> list[str]:
        return list(self.info.get("classes") or [])

    @property
    def num_classes(self) -> int | None:
        return len(self.classes) or None

    def split_urls(self, split: str) -> list[str]:
        explicit = self.urls.get(split)
        if explicit is not None:
            return expand_urls(explicit)
        if self.data_dir is None:
            raise ValueError(f"no URLs for split {split!r}: set data.{split}_urls or data.root")
        entry = self.info["splits"].get(split)
        if not entry or not entry.get("shards"):
            raise ValueError(f"data set {self.name} has no split {split!r} (it has {sorted(self.info['splits'])})")
        return [str(self.data_dir / s) for s in entry["shards"]]

    @property
    def tokenizer_file(self) -> Path | None:
        if self.cfg.tokenizer_path:
            return Path(self.cfg.tokenizer_path)
        if self.data_dir is not None:
            return self.data_dir / f"spm-{self.cfg.vocab_size}.model"
        return None

    # ----------------------------------------------------------------- Lightning hooks
    def prepare_data(self) -> None:
        """Generate the demo set if asked for; train the text tokenizer if text is used and none exists."""
        _ = self.data_dir
        if "text" in self.keys and self.tokenizer_file is not None and not self.tokenizer_file.exists():
            if self.cfg.tokenizer_path:
                raise FileNotFoundError(f"data.tokenizer_path does not exist: {self.cfg.tokenizer_path}")
            texts = _read_texts(self.split_urls("train"))
            train_sentencepiece(texts, self.tokenizer_file, vocab_size=self.cfg.vocab_size)

    def setup(self, stage: str | None = None) -> None:
        if self.trainer is not None:
            self._rank, self._world_size = self.trainer.global_rank, self.trainer.world_size
        if "text" in self.keys:
            if self.tokenizer_file is None:
                raise ValueError("text is loaded from URLs only: set data.tokenizer_path to a sentencepiece model")
            if not self.tokenizer_file.exists():
                self.prepare_data()  # used outside a Trainer
            self.tokenizer = TextTokenizer(self.tokenizer_file, self.cfg.text_max_length)

    def set_distributed(self, rank: int, world_size: int) -> None:
        """Override rank and world size (the Trainer's are used otherwise)."""
        self._rank, self._world_size = rank, world_size

    @property
    def vocab_size(self) -> int | None:
        return self.tokenizer.vocab_size if self.tokenizer is not None else None

    def _decoder(self, train: bool) -> SampleDecoder:
        hp = self.cfg
        max_samples = int(hp.audio_max_seconds * hp.sample_rate) if hp.audio_max_seconds else None
        return SampleDecoder(
            keys=self.keys, image_size=hp.image_size, image_channels=hp.image_channels,
            sample_rate=hp.sample_rate, audio_max_samples=max_samples, train=train,
            num_classes=self.num_classes, seed=hp.seed,
        )

    def _stream(self, split: str, train: bool) -> ShardStream:
        if "text" in self.keys and self.tokenizer is None:
            self.setup()
        urls = self.split_urls(split)
        batches = None
        if train:
            total = self.cfg.samples_per_epoch or self.info["splits"].get("train", {}).get("count")
            if not total:
                raise ValueError("data.samples_per_epoch is required when training from URLs without info.json")
            batches = total // (self._world_size * self.batch_size)
            if batches < 1:
                raise ValueError(
                    f"data.samples_per_epoch={total} gives no full batch of {self.batch_size} "
                    f"on each of {self._world_size} ranks"
                )
        else:
            readers = self._world_size * max(1, self.num_workers)
            if len(urls) < readers:
                warnings.warn(
                    f"{split} of {self.name} has {len(urls)} shards for {readers} readers "
                    f"(ranks x workers): some readers get none; write more shards (make_shards.py --max-count)",
                    stacklevel=2,
                )
        return ShardStream(
            urls, self._decoder(train), self.batch_size if train else self.eval_batch_size, train,
            tokenizer=self.tokenizer, batches_per_rank=batches, shuffle_buffer=self.cfg.shuffle_buffer,
            seed=self.cfg.seed, rank=self._rank, world_size=self._world_size,
        )

    def _loader(self, split: str, train: bool) -> ShardLoader:
        return ShardLoader(self._stream(split, train), self.num_workers, self.persistent_workers, self.pin_memory)

    def train_dataloader(self) -> ShardLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> ShardLoader:
        return self._loader(self.cfg.val_split, train=False)

    def test_dataloader(self) -> ShardLoader:
        return self._loader(self.cfg.test_split, train=False)

    def predict_dataloader(self) -> ShardLoader:
        return self._loader(self.cfg.predict_split, train=False)


def _read_texts(urls: list[str]) -> Iterator[str]:
    """The ``txt`` members of shards, without decoding anything else."""
    for sample in wds.tarfile_to_samples(handler=wds.warn_and_continue)(iter([{"url": u} for u in urls])):
        if "txt" in sample:
            yield sample["txt"].decode("utf-8", errors="replace")

