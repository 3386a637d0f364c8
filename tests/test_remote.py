"""Shards over HTTP (a local server): ``pipe:curl`` and ``http://`` URLs, a shard that vanishes
mid-run, and the shard-count check of the evaluation split."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import fsspec
import lightning as L
import pytest
import torch

from datamodules import COUNTS_KEY, WebDataModule, stream
from multimodal import Backbone, ImageCodec, VectorQuantizer
from tasks import MultiTaskModule, ReconstructionHead
from tests.conftest import build_shards

VAL_KEYS = [f"val{i:05d}" for i in range(12)]  # 3 shards: 5, 5, 2


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A shard folder (train 4 shards of 5, val 3 shards) and the URL of a local server for it."""
    root = build_shards(tmp_path / "shards", counts={"train": 20, "val": 12})
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


class _Recorder(L.Callback):
    """Validation keys per validation run and training skip counts; deletes ``doomed`` files
    (from the served folder) after the first validation."""

    def __init__(self, doomed: list[Path]) -> None:
        self.doomed, self.val_keys, self.train_counts = doomed, [[]], Counter()

    def on_validation_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.val_keys[-1] += batch["__key__"]

    def on_validation_epoch_end(self, trainer, module) -> None:
        if len(self.val_keys) == 1:
            for path in self.doomed:
                path.unlink()
        self.val_keys.append([])

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.train_counts.update(batch[COUNTS_KEY])


def test_fit_over_pipe_curl_survives_a_vanished_shard(served: tuple[Path, str], tmp_path: Path) -> None:
    root, url = served
    curl = "pipe:curl -f -s -L "  # -f: an HTTP error fails the command instead of returning an error page
    data = WebDataModule(train_urls=curl + url + "/train-{000000..000003}.tar",
                         val_urls=curl + url + "/val-{000000..000002}.tar",
                         keys=["image"], batch_size=4, samples_per_epoch=16, num_workers=2, shuffle_buffer=8)
    backbone = Backbone(VectorQuantizer(num_codes=16, dim=8),
                        {"image": ImageCodec(preset="tiny", image_size=32, downsample=4, code_dim=8)})
    model = MultiTaskModule(backbone, {"img": ReconstructionHead("image", num_media=0)}, warmup_steps=1)
    recorder = _Recorder([root / "val-000001.tar", root / "train-000001.tar", root / "train-000002.tar"])
    trainer = L.Trainer(default_root_dir=tmp_path, max_epochs=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[recorder])
    trainer.fit(model, data)
    assert trainer.global_step == 2 * 4  # the run went on
    first, *later = recorder.val_keys[:-1]
    assert sorted(first) == VAL_KEYS  # 2 workers, 3 shards: every sample exactly once
    survivors = [k for k in VAL_KEYS if k not in {f"val{i:05d}" for i in range(5, 10)}]
    assert len(later) == 1 and all(sorted(keys) == survivors for keys in later)
    # the vanished shard is counted where the other skips are, and training drew its vanished ones too
    assert float(trainer.callback_metrics["data/val/img/skipped/missing_shard"]) == 1
    assert recorder.train_counts["skipped/missing_shard"] >= 1
    assert set(recorder.train_counts) == {"skipped/missing_shard"}
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("opener", ["curl", "fsspec"])
def test_http_urls_read_every_sample_once_and_count_a_404(served: tuple[Path, str], opener: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    root, url = served
    monkeypatch.setattr(stream, "HTTP_OPENER", opener)  # fsspec: what is used where curl is missing
    opened = stream.open_shard(url + "/val-000000.tar")
    assert type(opened).__module__.split(".")[0] == ("webdataset" if opener == "curl" else "fsspec")
    opened.close()
    data = WebDataModule(val_urls=url + "/val-{000000..000003}.tar", keys=["image", "label"],  # 000003: 404
                         batch_size=5)
    counts, keys = Counter(), []
    for batch in data.val_dataloader():
        counts.update(batch[COUNTS_KEY])
        keys += batch["__key__"]
    assert sorted(keys) == VAL_KEYS
    assert counts == {"skipped/missing_shard": 1}


def test_other_fsspec_schemes(shard_dir: Path) -> None:
    fs = fsspec.filesystem("memory")
    for i in range(3):
        fs.pipe(f"/shards/val-{i:06d}.tar", (shard_dir / f"val-{i:06d}.tar").read_bytes())
    data = WebDataModule(val_urls="memory://shards/val-{000000..000002}.tar", keys=["label"], batch_size=4)
    assert sorted(k for b in data.val_dataloader() for k in b["__key__"]) == VAL_KEYS


def test_too_few_evaluation_shards_name_the_settings(shard_dir: Path) -> None:
    data = WebDataModule(root=str(shard_dir), keys=["label"], batch_size=4, num_workers=2)
    data.set_distributed(0, 4)  # 3 validation shards for 4 ranks: a rank would get none
    with pytest.raises(ValueError, match=r"3 shards for 4 ranks \(trainer.devices x trainer.num_nodes\)"):
        data.val_dataloader()
    data.set_distributed(0, 2)  # 2 ranks x 2 workers: one worker idles
    with pytest.warns(UserWarning, match=r"3 shards for 4 readers \(2 ranks x data.num_workers=2\)"):
        data.val_dataloader()
