"""``ShardLoader``: the DataLoader of a stream that batches inside its workers (``ShardStream``,
``CachedStream``), with the epoch bookkeeping and the saved position that make resuming exact."""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch.multiprocessing
from torch.utils.data import DataLoader, Sampler

from .stream import COUNTS_KEY, ShardStream

log = logging.getLogger(__name__)


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
