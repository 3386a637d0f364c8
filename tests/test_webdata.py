"""WebDataModule / ShardStream / MultiTaskDataModule: batch format, skips, splitting."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import pytest
import torch

from datamodules import COUNTS_KEY, MultiTaskDataModule, WebDataModule
from datamodules.stream import expand_urls
from datamodules.text import BOS_ID, EOS_ID, PAD_ID
from tests.conftest import build_shards


def _dm(root: Path, **kw) -> WebDataModule:
    kw.setdefault("vocab_size", 40)
    kw.setdefault("audio_max_seconds", 0.2)
    dm = WebDataModule(root=str(root), **kw)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_batch_format_every_modality(shard_dir: Path) -> None:
    dm = _dm(shard_dir, batch_size=4, image_size=24, image_channels=3)
    batch = next(iter(dm.val_dataloader()))
    assert set(batch) >= {"image", "audio", "audio_lengths", "text", "text_ids", "text_lengths", "label", "__key__"}
    assert batch["image"].shape == (4, 3, 24, 24) and batch["image"].dtype == torch.float32
    assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert batch["image"].min() < -0.9 and batch["image"].max() > 0.9  # full range used (random pixels)
    audio, lengths = batch["audio"], batch["audio_lengths"]
    assert audio.dtype == torch.float32 and lengths.dtype == torch.long
    assert audio.shape == (4, int(lengths.max()))
    for row, n in zip(audio, lengths):
        assert row[:n].abs().max() > 0.1  # the sine is there (16-bit PCM of amplitude 0.3)
        assert torch.all(row[n:] == 0)  # padding
    # eval keeps full length: the fixture's clips are 0.1-0.5 s and crop is 0.2 s
    assert int(lengths.max()) > int(0.2 * 16000)
    ids, tlen = batch["text_ids"], batch["text_lengths"]
    assert ids.dtype == torch.long and ids.shape == (4, int(tlen.max()))
    for row, n, text in zip(ids, tlen, batch["text"]):
        assert row[0] == BOS_ID and row[n - 1] == EOS_ID
        assert torch.all(row[n:] == PAD_ID)
        assert dm.tokenizer.decode(row.tolist()) == text
    assert batch["label"].dtype == torch.long and batch["label"].max() < 3
    assert len(batch["__key__"]) == 4 and all(k.startswith("val") for k in batch["__key__"])


def test_training_crops_audio_and_grayscale(shard_dir: Path) -> None:
    dm = _dm(shard_dir, batch_size=5, image_channels=1, keys=["image", "audio"])
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"image", "audio", "audio_lengths", "__key__", COUNTS_KEY}
    assert batch["image"].shape == (5, 1, 32, 32)
    assert int(batch["audio_lengths"].max()) <= int(0.2 * 16000)


def test_bad_samples_are_skipped_counted_and_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = build_shards(tmp_path, counts={"train": 10, "val": 10}, bad={"image": [1], "audio": [2], "text": [3], "label": [4]})
    dm = WebDataModule(train_urls=str(root / "train-{000000..000001}.tar"), root=None, demo=None,
                       samples_per_epoch=100, batch_size=1, shuffle_buffer=1, tokenizer_path=None,
                       keys=["image", "audio", "label"])
    # no text: the bad caption is not a problem for this loader; the other three are
    dm._info = {"splits": {}, "modalities": ["image", "audio", "label"], "classes": ["a", "b", "c"]}
    stream = dm.train_dataloader().dataset
    stream.train = False  # read each shard once, in order
    stream.urls = [str(root / "train-000000.tar"), str(root / "train-000001.tar")]
    with caplog.at_level(logging.WARNING):
        batches = list(stream)
    counts = Counter()
    for b in batches:
        counts.update(b[COUNTS_KEY])
    keys = [k for b in batches for k in b["__key__"]]
    assert counts == {"skipped/corrupt_image": 1, "skipped/truncated_audio": 1, "skipped/unknown_label": 1}
    assert sorted(keys) == [f"train{i:05d}" for i in range(10) if i not in (1, 2, 4)]
    assert "train00001" in caplog.text and "train-000000.tar" in caplog.text


def test_empty_text_is_skipped(tmp_path: Path) -> None:
    root = build_shards(tmp_path, counts={"train": 10, "val": 5}, bad={"text": [3, 7]})
    dm = _dm(root, batch_size=1, keys=["text"], val_split="train")
    batches = list(dm.val_dataloader())
    counts = Counter()
    for b in batches:
        counts.update(b[COUNTS_KEY])
    assert len(batches) == 8 and counts["skipped/empty_text"] == 2


def test_long_text_is_truncated_and_counted(shard_dir: Path) -> None:
    dm = _dm(shard_dir, batch_size=8, keys=["text"], text_max_length=4)
    batches = list(dm.val_dataloader())
    truncated = sum(b[COUNTS_KEY].get("truncated_text", 0) for b in batches)
    assert truncated > 0
    assert all(b["text_ids"].shape[1] <= 4 for b in batches)


def _keys_of(loader) -> list[str]:
    return [k for b in loader for k in b["__key__"]]


def test_validation_split_ranks_and_workers_see_each_sample_once(shard_dir: Path) -> None:
    # val has 12 samples in 3 shards of 5,5,2 -> add shards so 2 ranks x 2 workers all get some
    seen: list[str] = []
    for rank in range(2):
        dm = _dm(shard_dir, batch_size=2, num_workers=2, keys=["label"])
        dm.set_distributed(rank, 2)
        seen += _keys_of(dm.val_dataloader())
    assert sorted(seen) == sorted(f"val{i:05d}" for i in range(12))
    assert len(seen) == len(set(seen)) == 12


def test_training_every_rank_same_number_of_batches(shard_dir: Path) -> None:
    lengths = []
    for rank in range(2):
        dm = _dm(shard_dir, batch_size=3, num_workers=2, samples_per_epoch=37, keys=["label"])
        dm.set_distributed(rank, 2)
        loader = dm.train_dataloader()
        batches = list(loader)
        assert len(batches) == len(loader) == 37 // (2 * 3)
        assert all(len(b["__key__"]) == 3 for b in batches)
        lengths.append(len(batches))
    assert lengths[0] == lengths[1]


def test_training_order_is_seeded_by_epoch(shard_dir: Path) -> None:
    dm = _dm(shard_dir, batch_size=4, keys=["label"], samples_per_epoch=16)
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(0)
    a = _keys_of(loader)
    loader.sampler.set_epoch(0)
    b = _keys_of(loader)
    loader.sampler.set_epoch(1)
    c = _keys_of(loader)
    assert a == b and a != c


def test_missing_modality_names_key_and_data_set(tmp_path: Path, shard_dir: Path) -> None:
    dm = WebDataModule(root=str(shard_dir), keys=["image"])
    dm._info = dict(dm.info, modalities=["audio"])
    with pytest.raises(ValueError, match=r"has no \['image'\].*data.keys"):
        _ = dm.keys
    with pytest.raises(ValueError, match="data.keys has unknown"):
        WebDataModule(root=str(shard_dir), keys=["video"])
    with pytest.raises(ValueError, match="data.root"):
        WebDataModule()
    with pytest.raises(ValueError, match="no split 'nope'"):
        WebDataModule(root=str(shard_dir)).split_urls("nope")


def test_explicit_urls_and_brace_expansion(shard_dir: Path) -> None:
    assert expand_urls("s-{000000..000002}.tar") == ["s-000000.tar", "s-000001.tar", "s-000002.tar"]
    dm = _dm(shard_dir, batch_size=4, keys=["label"], val_urls=str(shard_dir / "val-{000000..000001}.tar"))
    assert len(_keys_of(dm.val_dataloader())) == 10  # two shards of 5, not the whole split


def test_multitask_datamodule_combines_tasks(shard_dir: Path) -> None:
    a = WebDataModule(root=str(shard_dir), keys=["image", "label"], batch_size=4, samples_per_epoch=16)
    b = WebDataModule(root=str(shard_dir), keys=["audio"], batch_size=2, samples_per_epoch=16)
    mdm = MultiTaskDataModule({"classify": a, "speech": b})
    mdm.prepare_data()
    mdm.setup("fit")
    train = list(mdm.train_dataloader())
    assert len(train) == 8  # max_size_cycle: the longer task (16 / 2) sets the length
    for batch, _, _ in train:
        assert set(batch) == {"classify", "speech"}
        assert batch["classify"]["image"].shape[0] == 4 and "audio" in batch["speech"]
    seen = Counter()
    for batch, _, _ in mdm.val_dataloader():
        for task, sub in batch.items():
            if sub is not None:
                seen[task] += len(sub["__key__"])
    assert seen == {"classify": 12, "speech": 12}
    with pytest.raises(ValueError, match="data.mode"):
        MultiTaskDataModule({"a": a}, mode="zip")


def test_image_format_follows_the_codec_or_must_agree(shard_dir: Path, caplog) -> None:
    import datamodules.decode as decode

    dm = _dm(shard_dir, batch_size=2, keys=["image"])
    assert (dm.image_size, dm.image_channels) == (32, 3)  # no model: the defaults
    dm.bind_image_format(24, 1)  # what the model's image codec takes
    decode._UPSAMPLING_WARNED.clear()
    with caplog.at_level(logging.WARNING, logger="datamodules.decode"):
        batch = next(iter(dm.val_dataloader()))
        next(iter(dm.val_dataloader()))
    assert batch["image"].shape == (2, 1, 24, 24)
    # the fixture's images are 16 px: upsampled, warned once (not once per image)
    warned = [r for r in caplog.records if "upsampled to 24 px" in r.getMessage()]
    assert len(warned) == 1 and "16 x 16" in warned[0].getMessage()
    fixed = _dm(shard_dir, batch_size=2, keys=["image"], image_size=16)
    fixed.bind_image_format(16, 3)  # agrees: fine
    with pytest.raises(ValueError, match=r"data.image_size=16 but the image codec takes 64.*null"):
        fixed.bind_image_format(64, 3, "the image codec")
    with pytest.raises(ValueError, match="data.image_size must be positive"):
        WebDataModule(root=str(shard_dir), image_size=0)
