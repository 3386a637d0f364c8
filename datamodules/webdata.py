"""``WebDataModule``: one WebDataset shard folder (or URL patterns, or a demo set) -> batches.

Splitting (the part that keeps DDP from hanging and evaluation exact):

* training reads shards *resampled* (drawn with replacement, seeded by seed/epoch/rank/worker)
  and stops after a fixed number of batches, ``samples_per_epoch // (world_size * batch_size)``
  per rank, divided among the workers, so every rank yields the same number of batches;
* validation/test/predict split the shard list by rank, then by worker, and read each shard
  once, so every sample is seen exactly once across ranks and workers (this needs at least
  ``world_size`` shards, an error naming the settings otherwise; fewer than
  ``world_size * num_workers`` leaves some workers idle, with a warning).

Shard URLs: local paths (brace patterns expand), ``file:``, ``pipe:CMD`` (the command's output is
read) and the other schemes of webdataset's ``gopen`` (``http(s)://`` through the ``curl`` program,
which it runs with ``-f``, so an HTTP error fails the shard); any other scheme fsspec knows
(``s3://``, ``gcs://``, ``memory://`` ... with the backend installed), and ``http(s)://`` too when
there is no ``curl``, goes through ``fsspec.open``. Use ``curl -f`` in ``pipe:`` commands as well: without it
an HTTP error page is read as a (broken) shard.

Faults never stop a run: a sample that does not decode is skipped (``skipped/<reason>`` of
``decode.py``), and so is a shard that cannot be read: ``skipped/missing_shard`` (it could not be
opened or fetched), ``skipped/unreadable_shard`` (its bytes are not a tar archive) or
``skipped/truncated_shard`` (the archive breaks off or ends without its end-of-archive blocks; the
samples before the break are kept, the one cut through is dropped). Every skip is logged as a
warning and counted in the batch's ``__counts__`` (an evaluation pass holds its last batch back
until all its readers are done, so even the skips of a reader left with no batch reach it). Only
a training stream with nothing usable left stops, with an error: after ``BAD_IN_A_ROW`` unusable
samples, or shard after shard giving no sample.

Resuming: the training loader is *stateful* (``state_dict``/``load_state_dict``, which Lightning
saves in checkpoints): it records the epoch of its current pass and the batches handed out in it,
and a resumed run replays that pass, dropping the batches already trained on, so it continues
with the very batches (same samples, same audio crops) an uninterrupted run would have used.

webdataset does the URL opening and shard expansion; the tar reading, splitting and seeding are
written here: the reading to tell these faults apart, the seeding because webdataset's
``ResampledShards`` does not know Lightning's epoch (its epoch counter resets whenever
non-persistent workers are re-created).
"""

from __future__ import annotations

import logging
import random
import re
import shutil
import tarfile
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import IO, Any
from urllib.parse import urlparse

import lightning as L
import torch.multiprocessing
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, Sampler, get_worker_info
from webdataset.gopen import gopen, gopen_schemes

from .decode import MODALITIES, SAMPLE_REASONS, BadSample, SampleDecoder, collate
from .shards import read_info
from .text import TextTokenizer, train_sentencepiece

log = logging.getLogger(__name__)

COUNTS_KEY = "__counts__"
"""Batch key of a ``{event: count}`` dict: samples skipped (``skipped/<reason>``) and captions
truncated (``truncated_text``) since the previous batch of the same worker. The training module
sums and logs them, so data problems reach the logger."""

SHARD_REASONS = ("missing_shard", "unreadable_shard", "truncated_shard")
"""Skip reasons of whole shards (see the module docstring)."""

COUNT_EVENTS = (*(f"skipped/{r}" for r in (*SAMPLE_REASONS, *SHARD_REASONS)), "truncated_text")
"""Every event a ``__counts__`` dict may hold (a logger that must log the same keys on every rank,
as a DDP metric sync needs, can fill in zeros for the others)."""

BAD_IN_A_ROW = 1000
"""A training stream stops with an error after this many unusable samples in a row."""

HTTP_OPENER = "curl" if shutil.which("curl") else "fsspec"
"""How ``http(s)://`` shard URLs are fetched: webdataset's ``curl`` pipe, or ``fsspec`` (aiohttp)."""


def expand_urls(urls: str | list[str]) -> list[str]:
    """Brace-expand URL patterns (``a-{000000..000009}.tar``); lists may mix patterns."""
    if isinstance(urls, str):
        urls = [urls]
    out: list[str] = []
    for u in urls:
        out.extend(wds.shardlists.expand_urls(u))
    return out


def open_shard(url: str) -> IO[bytes]:
    """A binary stream of a shard URL (see the module docstring for the schemes)."""
    scheme = urlparse(url).scheme
    if len(scheme) <= 1 or scheme == "file" or (scheme in gopen_schemes and not (
            scheme in ("http", "https") and HTTP_OPENER == "fsspec")):
        return gopen(url, "rb")  # a one-letter "scheme" is a Windows drive
    import fsspec

    return fsspec.open(url, "rb").open()


def _close_quietly(stream: IO[bytes]) -> Exception | None:
    """Close a shard stream; returns what closing raised (a ``pipe:``/curl exit status, say)."""
    try:
        stream.close()
    except Exception as exn:  # any failure of the source is reported, not raised
        return exn
    return None


_SKIP_FILE = re.compile(r"(^|/)__[^/]*__($|/)")


def read_shard(url: str, on_skip: Callable[[str, str], None]) -> Iterator[dict[str, Any]]:
    """The samples of one tar shard, ``{"__key__", "__url__", ext: bytes}``, members grouped by key.

    Never raises for a bad shard (only for a URL it cannot handle at all, e.g. an fsspec protocol
    whose package is not installed): ``on_skip(reason, detail)`` is called once with one of
    :data:`SHARD_REASONS` and the shard ends there (the samples complete before a break are kept).
    """
    try:
        stream = open_shard(url)
    except OSError as exn:  # not found, refused, ...; other errors (an unknown scheme) are raised
        on_skip("missing_shard", f"{url}: {exn!r}")
        return
    ends: list[str] = []

    class _Header(tarfile.TarInfo):  # notes how the member list ended: EOFHeaderError = end-of-archive blocks
        @classmethod
        def frombuf(cls, buf: bytes, encoding: str, errors: str) -> tarfile.TarInfo:
            try:
                return super().frombuf(buf, encoding, errors)
            except tarfile.HeaderError as exn:
                ends.append(type(exn).__name__)
                raise

    try:
        tar = tarfile.open(fileobj=stream, mode="r|*", tarinfo=_Header)
    except Exception as exn:
        closed = _close_quietly(stream)
        if isinstance(exn, OSError) or closed is not None:  # e.g. curl -f: HTTP 404 -> exit 22, no bytes
            on_skip("missing_shard", f"{url}: {closed or exn!r}")
        else:
            on_skip("unreadable_shard", f"{url} is not a tar archive ({exn}); an HTTP error page? (use curl -f)")
        return
    current: dict[str, Any] | None = None
    try:
        for info in tar:
            if not info.isreg() or _SKIP_FILE.search(info.name):
                continue
            data = tar.extractfile(info).read()
            tar.members = []  # a stream keeps every header otherwise
            key, ext = wds.tariterators.base_plus_ext(info.name)
            if key is None:
                continue
            if current is not None and key != current["__key__"]:
                yield current
                current = None
            if current is None:
                current = {"__key__": key, "__url__": url}
            current[ext.lower()] = data
        if not ends or ends[-1] != "EOFHeaderError":
            raise tarfile.ReadError(f"the archive ends without its end-of-archive blocks ({ends[-1:] or 'no header'})")
    except Exception as exn:  # cut short, or its source failed mid-way
        closed = _close_quietly(stream)
        where = f" inside sample {current['__key__']!r} (dropped)" if current is not None else ""
        on_skip("truncated_shard", f"{url} breaks off{where}: {exn}" + (f"; {closed!r}" if closed else ""))
        return
    finally:
        _close_quietly(stream)  # also when the reader stops early (a training pass is done)
    if current is not None:
        yield current


class ShardStream(IterableDataset):
    """Streams batches (already collated) from tar shards; see the module docstring for splitting.

    In training it yields exactly ``len(self)`` batches per rank over all workers. ``epoch`` is the
    epoch of the next pass (each pass advances it; :class:`ShardLoader` sets it from Lightning's);
    ``resume_batches`` batches of the next pass (over all workers) are read and dropped.
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
        self.resume_batches = 0
        self.leftovers: Any = None  # evaluation: where a reader puts the skip counts its batches could not carry

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        if not self.train:
            raise TypeError("evaluation streams have no fixed length")
        return self.batches_per_rank

    def _worker(self) -> tuple[int, int]:
        info = get_worker_info()
        return (info.id, info.num_workers) if info is not None else (0, 1)

    def _shards(self, rng: random.Random, worker: int, num_workers: int) -> Iterator[str]:
        if not self.train:
            yield from self.urls[self.rank :: self.world_size][worker::num_workers]
            return
        while True:
            yield rng.choice(self.urls)

    def _samples(self, rng: random.Random, worker: int, num_workers: int, counts: Counter[str]) -> Iterator[dict[str, Any]]:
        """Raw samples of this worker's shards; a training stream gives up when shard after shard is empty."""

        def on_skip(reason: str, detail: str) -> None:
            counts[f"skipped/{reason}"] += 1
            log.warning("skipping shard data (%s): %s", reason, detail)

        empty_in_a_row = 0
        for url in self._shards(rng, worker, num_workers):
            n = 0
            for sample in read_shard(url, on_skip):
                n += 1
                yield sample
            empty_in_a_row = 0 if n else empty_in_a_row + 1
            if self.train and empty_in_a_row >= max(20, 3 * len(self.urls)):
                raise RuntimeError(
                    f"{empty_in_a_row} training shards in a row gave no sample (of {len(self.urls)}, e.g. {url}): "
                    f"are the shards there? counts: {dict(counts)}"
                )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, num_workers = self._worker()
        epoch, self.epoch = self.epoch, self.epoch + 1  # a persistent worker's copy advances by itself
        skip, self.resume_batches = self.resume_batches, 0
        skip = skip // num_workers + (worker < skip % num_workers)  # the loader takes batches round-robin
        rng = random.Random(f"{self.seed}-{epoch}-{self.rank}-{worker}")
        self.decoder.rng = rng
        counts: Counter[str] = Counter()

        if self.train:
            n_batches = self.batches_per_rank // num_workers + (worker < self.batches_per_rank % num_workers)
            if n_batches == 0:
                return
        else:
            n_batches = None
        samples = self._samples(rng, worker, num_workers, counts)
        if self.train and self.shuffle_buffer > 1:
            # a buffer larger than a quarter of this worker's epoch mostly reads samples that are
            # thrown away when the epoch ends (measured: ~50% extra tar reads at 4096 samples/epoch)
            bufsize = max(2, min(self.shuffle_buffer, n_batches * self.batch_size // 4))
            samples = wds.filters._shuffle(samples, bufsize, min(100, bufsize), rng)

        buffer: list[dict[str, Any]] = []
        held: list[dict[str, Any]] | None = None  # evaluation: a full batch held back until the next
        # good sample, so skips after the last full batch still reach the logger with it
        made = bad_in_a_row = 0
        for raw in samples:
            try:
                sample = self.decoder(raw)
            except BadSample as bad:
                counts[f"skipped/{bad.reason}"] += 1
                log.warning("skipping sample %r from %s: %s", raw.get("__key__"), raw.get("__url__"), bad)
                bad_in_a_row += 1
                if self.train and bad_in_a_row >= BAD_IN_A_ROW:  # resampling would go on for ever
                    raise RuntimeError(
                        f"{bad_in_a_row} training samples in a row could not be used ({dict(counts)}): "
                        "does the data have what data.keys asks for?"
                    ) from bad
                continue
            bad_in_a_row = 0
            if self.tokenizer is not None and "text" in sample:
                sample["text_ids"], truncated = self.tokenizer.encode(sample["text"])
                sample["pad_id"] = self.tokenizer.pad_id
                counts["truncated_text"] += int(truncated)
            if held is not None:
                yield self._batch(held, counts)
                held = None
            buffer.append(sample)
            if len(buffer) < self.batch_size:
                continue
            made += 1
            if not self.train:
                held, buffer = buffer, []
                continue
            if made > skip:
                yield self._batch(buffer, counts)
            else:  # resuming: a batch trained on before the interruption
                counts.clear()
            buffer = []
            if made >= n_batches:
                return
        if self.train:
            raise RuntimeError(
                f"training shards ran dry after {made} of {n_batches} batches "
                f"(every sample unreadable? counts: {dict(counts)})"
            )
        if held is not None:
            yield self._batch(held, counts)
        if buffer:
            yield self._batch(buffer, counts)
        if counts:  # skips after this reader's last batch (or a reader with no batch at all)
            if self.leftovers is not None:
                self.leftovers.put(dict(counts))  # the loader adds them to the last batch of the pass
            else:
                log.warning("reader %d of rank %d ended with skips no batch could carry to the logger: %s",
                            worker, self.rank, dict(counts))

    @staticmethod
    def _batch(samples: list[dict[str, Any]], counts: Counter[str]) -> dict[str, Any]:
        batch = collate(samples)
        batch[COUNTS_KEY] = {k: v for k, v in counts.items() if v}
        counts.clear()
        return batch


class _ListQueue(list):
    """The ``put``/``get``/``empty`` of a queue, for a loader without worker processes."""

    def put(self, item: Any) -> None:
        self.append(item)

    def get(self) -> Any:
        return self.pop(0)

    def empty(self) -> bool:
        return not self


class _EpochSampler(Sampler):
    """The sampler slot of a DataLoader over an IterableDataset (an endless stream of ``None``,
    like torch's own), forwarding Lightning's ``set_epoch`` (called at every epoch start and
    restored on resume) to the loader."""

    def __init__(self, loader: ShardLoader) -> None:
        self.loader = loader

    def __iter__(self) -> Iterator[None]:
        while True:
            yield None

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)


class ShardLoader(DataLoader):
    """A DataLoader over a :class:`ShardStream` (batches are made inside the workers).

    It keeps the epoch bookkeeping in the main process. A pass starts at its first batch (Lightning
    creates the iterator before it calls ``set_epoch``) and reads the epoch ``set_epoch`` gave since
    the last pass, else the last pass's + 1 (a loader cycled within an epoch); persistent workers
    hear of the first epoch only and count on from it, and so does the loader.
    ``state_dict()`` is the current pass's epoch and the batches handed out in it (Lightning saves
    it in checkpoints); after ``load_state_dict`` the next pass resumes there.
    """

    def __init__(self, dataset: ShardStream, num_workers: int = 0, persistent_workers: bool = False,
                 pin_memory: bool = False, **kwargs: Any) -> None:
        # Lightning re-creates loaders (e.g. for predict) passing every DataLoader argument; the
        # sampling ones must stay unset for a stream that batches inside its workers
        for key in ("batch_size", "shuffle", "sampler", "batch_sampler", "drop_last"):
            kwargs.pop(key, None)
        super().__init__(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                         persistent_workers=persistent_workers and num_workers > 0, **kwargs)
        object.__setattr__(self, "sampler", _EpochSampler(self))  # DataLoader forbids setattr
        self._set_epoch: int | None = None  # Lightning's epoch, when set since the last pass started
        self._epoch = dataset.epoch  # Lightning's epoch of the current (or next) pass
        self._pass_epoch: int | None = None  # the stream's epoch of the current pass (seeds its order)
        self._handed_out = 0  # batches of the current pass
        self._restore: dict[str, int] | None = None
        self._passes = 0

    def set_epoch(self, epoch: int) -> None:
        self._set_epoch = epoch

    def __iter__(self) -> Iterator[Any]:
        return self._pass()

    def _start(self) -> Iterator[Any]:
        stream: ShardStream = self.dataset
        fresh_workers = self._passes == 0 or not self.persistent_workers
        restore, self._restore = self._restore, None
        if restore is not None and self._set_epoch in (None, restore["lightning_epoch"]):
            self._epoch, self._pass_epoch, skip = restore["lightning_epoch"], restore["epoch"], restore["batches"]
        elif self._set_epoch is not None and fresh_workers:
            self._epoch = self._pass_epoch = self._set_epoch
            skip = 0
        else:  # cycled within an epoch, or persistent workers counting on
            self._pass_epoch = self._epoch if self._pass_epoch is None else self._pass_epoch + 1
            skip = 0
        self._set_epoch = None
        self._handed_out = skip
        self._passes += 1
        stream.epoch, stream.resume_batches = self._pass_epoch, skip
        stream.leftovers = None if stream.train else self._leftovers
        iterator = super().__iter__()
        if self.num_workers > 0:
            stream.resume_batches = 0  # the workers have their copies; later passes start from 0
        return iterator

    def _pass(self) -> Iterator[Any]:
        iterator = self._start()
        if self.dataset.train:
            for batch in iterator:
                self._handed_out += 1
                yield batch
            return
        # evaluation: the last batch is held back until every reader is done, and carries the skips
        # its reader or another (one whose shards all failed, say) counted after their last batch
        held = None
        for batch in iterator:
            if held is not None:
                yield held
            held = batch
        late: Counter[str] = Counter()
        while not self._leftovers.empty():
            late.update(self._leftovers.get())
        if held is not None:
            held[COUNTS_KEY] = dict(Counter(held.get(COUNTS_KEY, {})) + late)
            yield held
        elif late:
            log.warning("an evaluation pass gave no batch to carry its skip counts to the logger: %s", dict(late))

    @property
    def _leftovers(self) -> Any:
        if getattr(self, "_queue", None) is None:
            self._queue = _ListQueue() if self.num_workers == 0 else (
                self.multiprocessing_context or torch.multiprocessing).SimpleQueue()
        return self._queue

    def state_dict(self) -> dict[str, Any]:
        stream: ShardStream = self.dataset
        if self._restore is not None:  # restored, not started yet
            position = dict(self._restore)
        elif self._pass_epoch is None:  # never started
            position = {"epoch": self._epoch, "lightning_epoch": self._epoch, "batches": 0}
        else:
            position = {"epoch": self._pass_epoch, "lightning_epoch": self._epoch, "batches": self._handed_out}
        return {**position, "batches_per_rank": stream.batches_per_rank, "num_workers": self.num_workers,
                "rank": stream.rank, "world_size": stream.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        stream: ShardStream = self.dataset
        same = (state.get("batches_per_rank"), state.get("num_workers"), state.get("world_size")) == (
            stream.batches_per_rank, self.num_workers, stream.world_size)
        batches = int(state.get("batches", 0))
        if batches and not same:
            warnings.warn(
                "resuming with other data settings (samples_per_epoch, batch_size, num_workers or devices) than "
                f"the checkpoint's {state}: the interrupted epoch starts over instead of resuming mid-way",
                stacklevel=2,
            )
            batches = 0
        epoch, lightning_epoch = int(state["epoch"]), int(state.get("lightning_epoch", state["epoch"]))
        if stream.batches_per_rank and batches >= stream.batches_per_rank:  # the pass was complete
            epoch, lightning_epoch, batches = epoch + 1, lightning_epoch + 1, 0
        self._restore = {"epoch": epoch, "lightning_epoch": lightning_epoch, "batches": batches}
        self._set_epoch = None
        self._passes = 0
        self._iterator = None  # persistent workers made before this must not serve the resumed pass


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
        text_model_type: sentencepiece algorithm (``bpe``, ``unigram``, ``word``, ``char``). BPE is the
            default: on small closed vocabularies (the demo captions) unigram with a soft size limit
            collapses to near-characters (46 pieces, ~31 ids per shapes caption vs 11 words).
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
        text_model_type: str = "bpe",
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
        if text_model_type not in ("bpe", "unigram", "word", "char"):
            raise ValueError(f"data.text_model_type must be bpe, unigram, word or char, got {text_model_type!r}")
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

    def split_texts(self, split: str = "train") -> list[str]:
        """The non-empty texts (``txt`` members) of a split, in shard order; nothing else is decoded.
        Used to train the sentencepiece model and by heads that need text statistics (e.g. the
        captioning head's most-frequent-caption baseline)."""
        return [t.strip() for t in _read_texts(self.split_urls(split)) if t.strip()]

    @property
    def tokenizer_file(self) -> Path | None:
        if self.cfg.tokenizer_path:
            return Path(self.cfg.tokenizer_path)
        if self.data_dir is not None:
            return self.data_dir / f"spm-{self.cfg.text_model_type}-{self.cfg.vocab_size}.model"
        return None

    # ----------------------------------------------------------------- Lightning hooks
    def prepare_data(self) -> None:
        """Generate the demo set if asked for; train the text tokenizer if text is used and none exists."""
        _ = self.data_dir
        if "text" in self.keys and self.tokenizer_file is not None and not self.tokenizer_file.exists():
            if self.cfg.tokenizer_path:
                raise FileNotFoundError(f"data.tokenizer_path does not exist: {self.cfg.tokenizer_path}")
            train_sentencepiece(self.split_texts("train"), self.tokenizer_file, vocab_size=self.cfg.vocab_size,
                                model_type=self.cfg.text_model_type)

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
            # each shard is read once, by one worker of one rank: a rank with no shard would have no
            # batch (and hang the others at the end-of-epoch metric sync), an idle worker only wastes
            where = f"{split} of {self.name}" + (f" (data.{split}_urls)" if self.urls.get(split) is not None else "")
            if len(urls) < self._world_size:
                raise ValueError(
                    f"{where} has {len(urls)} shards for {self._world_size} ranks (trainer.devices x trainer.num_nodes): "
                    "every rank needs at least one; write more, smaller shards (make_shards.py --max-count) "
                    "or evaluate on fewer devices"
                )
            readers = self._world_size * max(1, self.num_workers)
            if len(urls) < readers:
                warnings.warn(
                    f"{where} has {len(urls)} shards for {readers} readers ({self._world_size} ranks x "
                    f"data.num_workers={self.num_workers}): some workers read nothing; lower data.num_workers "
                    "or write more shards (make_shards.py --max-count)",
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
    """The ``txt`` members of shards, without decoding anything else (unreadable shards are skipped)."""

    def on_skip(reason: str, detail: str) -> None:
        log.warning("tokenizer training: skipping shard data (%s): %s", reason, detail)

    for url in urls:
        for sample in read_shard(url, on_skip):
            if "txt" in sample:
                yield sample["txt"].decode("utf-8", errors="replace")

