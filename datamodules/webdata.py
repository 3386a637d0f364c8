"""``WebDataModule``: one WebDataset shard folder (or URL patterns, or a demo set) -> batches.

The reading itself (splitting over ranks and workers, faults, resampling, resume) is
:mod:`datamodules.stream` and :mod:`datamodules.loader`; the training split of a stage on a frozen
tokenizer can be read from cached codes instead (:mod:`datamodules.latent_cache`,
:meth:`WebDataModule.cache_latents`).
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L

from .decode import ANNOTATIONS, CAPTIONS_MEMBER, MODALITIES, BadSample, SampleDecoder, read_captions
from .latent_cache import FORMAT as LATENT_FORMAT
from .latent_cache import CachedStream, Encoder, LatentCache, load_or_build, shard_identity
from .latent_cache import default_root as default_latent_root
from .loader import ShardLoader
from .shards import read_info
from .stream import ShardStream, expand_urls, read_shard
from .text import TextTokenizer, train_sentencepiece

log = logging.getLogger(__name__)

DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_CHANNELS = 32, 3
"""The image format of a data module used without a model (no codec to follow)."""


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
            Unset (null), they follow the model's image codec (the module binds them at setup:
            :meth:`bind_image_format`), so one setting, the stage-1 codec's ``image_size``, decides
            the size everywhere; set, they must agree with the codec (an error at start names both).
            Without a model: 32 px, RGB.
        sample_rate / audio_max_seconds: audio rate; training clips are randomly cropped to this length.
        tokenizer_path: a sentencepiece model; when missing and text is loaded, one is trained on the
            training split's text in ``prepare_data`` and stored beside the shards.
        vocab_size / text_max_length: for that training, and truncation (counted) of long texts.
        text_model_type: sentencepiece algorithm (``bpe``, ``unigram``, ``word``, ``char``). BPE is the
            default: on small closed vocabularies (the demo captions) unigram with a soft size limit
            collapses to near-characters (46 pieces, ~31 ids per shapes caption vs 11 words).
        seed: seeds shard resampling, shuffling and audio crops.
        cache_dir / demo_size: where demo sets are generated, and their size (``default`` or ``tiny``).
        latent_cache_dir: where cached tokenizer codes of the training split go when the model asks
            for them (:meth:`cache_latents`); default ``$MULTIMODAL_CACHE/latents``.
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
        image_size: int | None = None,
        image_channels: int | None = None,
        sample_rate: int = 16000,
        audio_max_seconds: float | None = 2.0,
        tokenizer_path: str | None = None,
        vocab_size: int = 512,
        text_model_type: str = "bpe",
        text_max_length: int = 64,
        seed: int = 0,
        cache_dir: str | None = None,
        latent_cache_dir: str | None = None,
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
            unknown = set(keys) - set(MODALITIES) - set(ANNOTATIONS)
            if unknown:
                raise ValueError(f"data.keys has unknown modalities {sorted(unknown)}; choose from "
                                 f"{MODALITIES + ANNOTATIONS}")
        for name, value in (("batch_size", batch_size), ("num_workers", num_workers + 1),
                            ("image_size", 1 if image_size is None else image_size)):
            if value < 1:
                raise ValueError(f"data.{name} must be positive, got {value}")
        if text_model_type not in ("bpe", "unigram", "word", "char"):
            raise ValueError(f"data.text_model_type must be bpe, unigram, word or char, got {text_model_type!r}")
        if image_channels not in (None, 1, 3):
            raise ValueError(f"data.image_channels must be 1 or 3, got {image_channels}")
        # the settings, read by the hooks (save_hyperparameters is unreliable for DataModules built
        # inside another DataModule by the CLI)
        self.cfg = SimpleNamespace(**{k: v for k, v in locals().items() if k not in ('self', '__class__')})
        self.root, self.demo, self._keys = root, demo, keys
        self.urls = {"train": train_urls, val_split: val_urls, test_split: test_urls}
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.persistent_workers, self.pin_memory = num_workers, persistent_workers, pin_memory
        self.tokenizer: TextTokenizer | None = None
        self._latents: dict[str, Any] | None = None  # set by cache_latents (the model, at setup)
        self._info: dict[str, Any] | None = None
        self._rank, self._world_size = 0, 1
        self._bound_image: tuple[int, int] | None = None  # (size, channels) of the model's image codec
        self._references: dict[str, list[list[str]]] = {}  # split -> captions per sample (read once)

    # ----------------------------------------------------------------- image format
    def bind_image_format(self, size: int, channels: int, source: str = "the model's image codec") -> None:
        """``source`` takes ``size`` x ``size`` images of ``channels`` channels: unset settings follow it,
        set ones must agree (ValueError naming both)."""
        wrong = [f"data.{name}={given} but {source} takes {want}"
                 for name, given, want in (("image_size", self.cfg.image_size, size),
                                           ("image_channels", self.cfg.image_channels, channels))
                 if given is not None and given != want]
        if wrong:
            raise ValueError(f"data set {self.name}: " + "; ".join(wrong)
                             + ": leave them unset (null) to follow the codec, or set them to match")
        self._bound_image = (int(size), int(channels))

    @property
    def image_size(self) -> int:
        if self.cfg.image_size is not None:
            return self.cfg.image_size
        return self._bound_image[0] if self._bound_image else DEFAULT_IMAGE_SIZE

    @property
    def image_channels(self) -> int:
        if self.cfg.image_channels is not None:
            return self.cfg.image_channels
        return self._bound_image[1] if self._bound_image else DEFAULT_IMAGE_CHANNELS

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
        missing = [k for k in keys if k not in self.info["modalities"] and k not in ANNOTATIONS]
        if "objects" in keys and not self.attributes:
            raise ValueError(f"data.keys asks for objects (scene annotations), but {self.name}'s info.json names no "
                             "attributes (e.g. {\"shape\": [...], \"colour\": [...]}; datamodules/decode.py)")
        if missing:
            raise ValueError(
                f"data set {self.name} has no {missing} (it has {self.info['modalities']}); fix data.keys"
            )
        return tuple(keys)

    @property
    def classes(self) -> list[str]:
        return list(self.info.get("classes") or [])

    @property
    def attributes(self) -> dict[str, list[str]]:
        """The scene annotations' attributes and their values (info.json), ``{}`` when it has none."""
        return {k: list(v) for k, v in (self.info.get("attributes") or {}).items()}

    @property
    def heldout_combinations(self) -> list[dict[str, str]]:
        """Attribute combinations info.json says the training split never holds (demo shapes: five)."""
        return [dict(c) for c in self.info.get("heldout_combinations") or []]

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
        """Every caption (``txt``, or each of ``captions.json``) of a split, in shard order; nothing else
        is decoded. Trains the sentencepiece model."""
        return [c for refs in self.split_references(split) for c in refs]

    def split_references(self, split: str = "train") -> list[list[str]]:
        """The captions of each sample of a split that has any, in shard order (samples whose text is
        unusable are left out, as the decoder skips them). Used by heads that need text statistics
        (the captioning head's best-constant-caption baseline). Read once per split and kept (the
        sentencepiece training and the baseline would otherwise each stream the whole split)."""
        if split not in self._references:
            self._references[split] = list(_read_references(self.split_urls(split)))
        return self._references[split]

    @property
    def tokenizer_file(self) -> Path | None:
        if self.cfg.tokenizer_path:
            return Path(self.cfg.tokenizer_path)
        if self.data_dir is not None:
            return self.data_dir / f"spm-{self.cfg.text_model_type}-{self.cfg.vocab_size}.model"
        return None

    # ----------------------------------------------------------------- cached tokenizer codes
    def cache_latents(self, encode: Encoder, tokenizer_id: str, keep_raw: tuple[str, ...] = (),
                      samples_per_token: int | None = None) -> None:
        """Train from codes of the training split encoded ONCE by ``encode`` (a frozen tokenizer,
        identified by ``tokenizer_id``) instead of decoding and encoding every batch; ``keep_raw``
        modalities are stored too (a head that reads them); ``samples_per_token`` (audio) aligns
        random crops to tokens. See :mod:`datamodules.latent_cache`. Called by the model at setup."""
        self._latents = {"encode": encode, "tokenizer": tokenizer_id, "keep_raw": tuple(keep_raw),
                         "samples_per_token": samples_per_token}

    @property
    def latent_cache_root(self) -> Path:
        return Path(self.cfg.latent_cache_dir) if self.cfg.latent_cache_dir else default_latent_root()

    def _cached_stream(self) -> CachedStream:
        if "text" in self.keys and self.tokenizer is None:
            self.setup()
        hp, request = self.cfg, self._latents
        urls = self.split_urls("train")
        components = {
            "format": LATENT_FORMAT, "tokenizer": request["tokenizer"], "shards": shard_identity(urls),
            "decode": {"keys": list(self.keys), "image_size": self.image_size, "image_channels": self.image_channels,
                       "sample_rate": hp.sample_rate, "keep_raw": list(request["keep_raw"])},
        }

        def build() -> LatentCache:  # this rank's share of the training shards, each sample once
            stream = ShardStream(urls, self._decoder(train=False), self.eval_batch_size, train=False,
                                 rank=self._rank, world_size=self._world_size)
            return LatentCache.encode_split(stream, request["encode"], request["keep_raw"])

        start = time.perf_counter()
        cache, folder, built = load_or_build(self.latent_cache_root, components, build, self._rank, self._world_size)
        what = "encoded once" if built else "read"
        log.info("latent cache (%s, training split of %s): %d samples %s in %.1f s from %s", request["tokenizer"],
                 self.name, len(cache), what, time.perf_counter() - start, folder)
        if cache.counts:
            log.warning("latent cache of %s: samples skipped while encoding: %s", self.name, cache.counts)
        spt = request["samples_per_token"]
        crop = int(hp.audio_max_seconds * hp.sample_rate) // spt if hp.audio_max_seconds and spt else None
        return CachedStream(cache, self.batch_size, self._batches_per_rank(), tokenizer=self.tokenizer,
                            seed=hp.seed, rank=self._rank, world_size=self._world_size, crop_tokens=crop,
                            samples_per_token=spt)

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
            keys=self.keys, image_size=self.image_size, image_channels=self.image_channels,
            sample_rate=hp.sample_rate, audio_max_samples=max_samples, train=train,
            num_classes=self.num_classes, seed=hp.seed,
            attributes=self.attributes if "objects" in self.keys else None,
        )

    def _batches_per_rank(self) -> int:
        total = self.cfg.samples_per_epoch or self.info["splits"].get("train", {}).get("count")
        if not total:
            raise ValueError("data.samples_per_epoch is required when training from URLs without info.json")
        batches = total // (self._world_size * self.batch_size)
        if batches < 1:
            raise ValueError(
                f"data.samples_per_epoch={total} gives no full batch of {self.batch_size} "
                f"on each of {self._world_size} ranks"
            )
        return batches

    def _stream(self, split: str, train: bool) -> ShardStream:
        if "text" in self.keys and self.tokenizer is None:
            self.setup()
        urls = self.split_urls(split)
        batches = self._batches_per_rank() if train else None
        if not train:
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
        if self._latents is not None:
            return ShardLoader(self._cached_stream(), self.num_workers, self.persistent_workers, self.pin_memory)
        return self._loader("train", train=True)

    def val_dataloader(self) -> ShardLoader:
        return self._loader(self.cfg.val_split, train=False)

    def test_dataloader(self) -> ShardLoader:
        return self._loader(self.cfg.test_split, train=False)

    def predict_dataloader(self) -> ShardLoader:
        return self._loader(self.cfg.predict_split, train=False)


def _read_references(urls: list[str]) -> Iterator[list[str]]:
    """The captions of each sample of shards, without decoding anything else (unreadable shards and
    unusable captions are skipped, with a warning)."""

    def on_skip(reason: str, detail: str) -> None:
        log.warning("reading captions: skipping shard data (%s): %s", reason, detail)

    for url in urls:
        for sample in read_shard(url, on_skip):
            if "txt" not in sample and CAPTIONS_MEMBER not in sample:
                continue
            try:
                yield read_captions(sample)
            except BadSample as bad:
                log.warning("reading captions: skipping sample %r of %s: %s", sample["__key__"], url, bad)
