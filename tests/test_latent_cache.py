"""Cached tokenizer codes (``datamodules.latent_cache``): the same latents as encoding every batch, a
stale cache never read, exact resume, token-space audio crops, and the switch that turns it off."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch

from datamodules import ShardLoader, ShardStream, WebDataModule
from datamodules.latent_cache import CachedStream, LatentCache, load_or_build
from multimodal import Backbone, DiffusionTransformer
from tasks import ClassificationHead, GenerationHead, MultiTaskModule
from tasks.heads.base import clean_latents
from tests.conftest import build_shards
from tests.test_multitask import _data, _model, _trainer
from tests.tiny import NUM_CLASSES, TRUNK_HIDDEN


def _folders(root: Path) -> set[Path]:
    return {p.parent for p in root.glob("*/index.json")}


def test_cached_batches_hold_the_codes_the_tokenizer_gives(tmp_path: Path, tokenizer_run: Path,
                                                           latent_cache_root: Path) -> None:
    shards = build_shards(tmp_path / "shards", counts={"train": 12, "val": 4})
    model = _model(tokenizer_run)
    data = _data(shards)
    before = _folders(latent_cache_root)
    _trainer(tmp_path / "run").fit(model, data)
    new = _folders(latent_cache_root) - before
    assert len(new) == 2  # one per task: the generation task also keeps its raw images (the judge)
    # a training batch of the cache vs the same samples read from the shards and encoded
    loader = data.tasks["gen"].train_dataloader()
    assert isinstance(loader.dataset, CachedStream)
    batch = next(iter(loader))
    assert {"image_codes", "image", "label", "__key__"} <= set(batch)
    raw = WebDataModule(root=str(shards), keys=["image", "label"], batch_size=12)
    by_key = {}
    for b in ShardStream(raw.split_urls("train"), raw._decoder(False), 12, False):
        by_key.update({k: (img, y) for k, img, y in zip(b["__key__"], b["image"], b["label"])})
    images = torch.stack([by_key[k][0] for k in batch["__key__"]])
    assert torch.equal(batch["image"], images)  # raw images kept exactly (uint8 round trip)
    assert torch.equal(batch["label"], torch.stack([by_key[k][1] for k in batch["__key__"]]))
    backbone = model.backbone
    codes, _ = backbone.encode_codes("image", images)
    assert torch.equal(batch["image_codes"], codes)
    cached, _ = clean_latents(backbone, {"image_codes": batch["image_codes"]}, "image")
    encoded, _ = clean_latents(backbone, {"image": images}, "image")
    assert torch.equal(cached, encoded)
    # the classification task keeps no raw image (its head reads only the codes)
    cls_batch = next(iter(data.tasks["cls"].train_dataloader()))
    assert "image" not in cls_batch and "image_codes" in cls_batch

    # a second run with the same tokenizer and shards reads the cache: no new folder
    _trainer(tmp_path / "run2").fit(_model(tokenizer_run), _data(shards))
    assert _folders(latent_cache_root) - before == new


def test_another_tokenizer_or_changed_shards_get_a_new_cache(tmp_path: Path, tokenizer_run: Path,
                                                             latent_cache_root: Path) -> None:
    shards = build_shards(tmp_path / "shards", counts={"train": 12, "val": 4})
    model = _model(tokenizer_run)
    keys = {"cls": ["image", "label"]}
    model = MultiTaskModule(model.backbone, {"cls": model.heads["cls"]})
    _trainer(tmp_path / "a").fit(model, _data(shards, keys))
    first = _folders(latent_cache_root)
    # another tokenizer: one weight of the frozen image encoder differs
    other = MultiTaskModule(_model(tokenizer_run).backbone, {"cls": _model(tokenizer_run).heads["cls"]})
    with torch.no_grad():
        next(other.backbone.codec("image").parameters()).add_(0.01)
    assert other.backbone.tokenizer_fingerprint("image") != model.backbone.tokenizer_fingerprint("image")
    _trainer(tmp_path / "b").fit(other, _data(shards, keys))
    second = _folders(latent_cache_root)
    assert len(second - first) == 1
    # changed shards (rewritten with other samples): a new cache again, not the old codes
    shutil.rmtree(shards)
    build_shards(shards, counts={"train": 12, "val": 4}, seed=7)
    _trainer(tmp_path / "c").fit(MultiTaskModule(_model(tokenizer_run).backbone, {"cls": _model(tokenizer_run).heads["cls"]}),
                                 _data(shards, keys))
    assert len(_folders(latent_cache_root) - second) == 1


def test_an_index_for_other_components_is_refused(tmp_path: Path) -> None:
    cache = LatentCache(["a", "b"], {"label": torch.tensor([0, 1])}, None)
    components = {"tokenizer": "image-1", "shards": [["x.tar", 1, 2]]}
    loaded, folder, built = load_or_build(tmp_path, components, lambda: cache)
    assert built and loaded.keys == ["a", "b"]
    assert not load_or_build(tmp_path, components, lambda: pytest.fail("rebuilt"))[2]  # read, not rebuilt
    index = folder / "index.json"
    meta = json.loads(index.read_text())
    meta["components"]["tokenizer"] = "image-2"
    index.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="image-2.*image-1|built for"):
        load_or_build(tmp_path, components, lambda: cache)


def _audio_cache(n: int = 10) -> LatentCache:
    gen = torch.Generator().manual_seed(0)
    codes = [torch.randint(0, 60, (int(k),), generator=gen, dtype=torch.int16) for k in torch.randint(3, 12, (n,), generator=gen)]
    waves = [torch.arange(len(c) * 4, dtype=torch.int16) for c in codes]  # 4 samples per token
    from datamodules.latent_cache import _ragged

    return LatentCache([f"k{i}" for i in range(n)], {"audio_codes": _ragged(codes), "audio": _ragged(waves),
                                                     "label": torch.arange(n)},
                       [[f"text {i}"] if i % 2 else [f"text {i}", f"other {i}"] for i in range(n)],
                       counts={"skipped/corrupt_image": 2})


def test_cached_stream_resumes_exactly_and_crops_in_token_space() -> None:
    cache = _audio_cache()

    def loader() -> ShardLoader:
        return ShardLoader(CachedStream(cache, batch_size=3, batches_per_rank=5, seed=3, crop_tokens=4,
                                        samples_per_token=4))

    full = [b for _, b in zip(range(7), _cycle(loader()))]
    interrupted = loader()
    it = _cycle(interrupted)
    for _ in range(3):
        next(it)
    state = interrupted.state_dict()
    resumed = loader()
    resumed.load_state_dict(state)
    rest = [b for _, b in zip(range(4), _cycle(resumed))]
    for a, b in zip(full[3:], rest):
        assert a["__key__"] == b["__key__"] and a["text"] == b["text"]  # the same captions drawn
        assert torch.equal(a["audio_codes"], b["audio_codes"])
    # a sample with two captions draws one per step, and carries both as its references
    drawn = [t.split()[0] for batch in full for key, t in zip(batch["__key__"], batch["text"]) if int(key[1:]) % 2 == 0]
    assert {"text", "other"} == set(drawn), drawn
    for batch in full:
        for key, text, refs in zip(batch["__key__"], batch["text"], batch["references"]):
            i = int(key[1:])
            assert refs == ([f"text {i}"] if i % 2 else [f"text {i}", f"other {i}"]) and text in refs
    for batch in full:
        assert batch["audio_codes"].shape[1] <= 4 and int(batch["audio_code_lengths"].max()) <= 4
        for wave, n, codes_len in zip(batch["audio"], batch["audio_lengths"], batch["audio_code_lengths"]):
            assert int(n) == 4 * int(codes_len)  # the raw crop is the same window, token-aligned
            assert int(wave[0] * 32768) % 4 == 0
    # skips counted while encoding reach the first batch of every epoch (rank 0), once
    assert full[0]["__counts__"] == {"skipped/corrupt_image": 2} and not full[1]["__counts__"]
    assert full[5]["__counts__"] == {"skipped/corrupt_image": 2}  # epoch 2 starts at batch 5


def _cycle(loader: ShardLoader):
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def test_epochs_deal_every_sample_across_ranks() -> None:
    cache = _audio_cache(12)
    keys = []
    for rank in range(2):
        stream = CachedStream(cache, batch_size=3, batches_per_rank=2, rank=rank, world_size=2)
        keys += [k for b in stream for k in b["__key__"]]
    assert sorted(keys) == sorted(cache.keys)  # 2 ranks x 2 batches x 3 = 12: every sample once


def test_cache_latents_off_or_a_trained_tokenizer_reads_shards(tmp_path: Path, tokenizer_run: Path) -> None:
    shards = build_shards(tmp_path / "shards", counts={"train": 12, "val": 4})
    off = _model(tokenizer_run, cache_latents=False)
    data = _data(shards)
    _trainer(tmp_path / "off").fit(off, data)
    assert data.tasks["gen"]._latents is None
    backbone = Backbone(tokenizer_ckpt=str(tokenizer_run), freeze_tokenizer=False,
                        trunk=DiffusionTransformer(in_dim=16, preset="tiny", patch_size=2, num_classes=NUM_CLASSES))
    trained = MultiTaskModule(backbone, {"cls": ClassificationHead(modality="image", num_classes=NUM_CLASSES,
                                                                   trunk_hidden=TRUNK_HIDDEN),
                                         "gen": GenerationHead(modality="image", num_classes=NUM_CLASSES,
                                                               eval_samples=0, sample_steps=2)})
    data = _data(shards)
    trainer = L.Trainer(max_steps=1, limit_val_batches=0, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path / "t", num_sanity_val_steps=0)
    trainer.fit(trained, data)
    assert data.tasks["cls"]._latents is None and data.tasks["gen"]._latents is None
