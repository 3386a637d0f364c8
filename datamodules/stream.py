"""Reading WebDataset shards into batches: ``read_shard`` (one tar, faults told apart) and
``ShardStream`` (splitting, shuffling, decoding, batching; the stream a ``ShardLoader`` serves).

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

Resuming: ``epoch`` and ``resume_batches`` (set by ``ShardLoader`` from its saved state) make a
resumed pass replay the interrupted one, dropping the batches already trained on, so it continues
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
from collections import Counter
from collections.abc import Callable, Iterator
from typing import IO, Any
from urllib.parse import urlparse

import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.gopen import gopen, gopen_schemes

from .decode import SAMPLE_REASONS, BadSample, SampleDecoder, collate
from .text import TextTokenizer

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


def tokenize_text(sample: dict[str, Any], tokenizer: TextTokenizer | None, counts: Counter[str]) -> None:
    """Add ``text_ids`` (and the pad id) to a sample with text; count a truncated text."""
    if tokenizer is not None and "text" in sample:
        sample["text_ids"], truncated = tokenizer.encode(sample["text"])
        sample["pad_id"] = tokenizer.pad_id
        counts["truncated_text"] += int(truncated)


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
            tokenize_text(sample, self.tokenizer, counts)
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
