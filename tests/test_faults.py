"""Fault injection: every kind of damaged data is skipped, counted under its reason, and costs no
good sample (``scripts/fault_report.py`` builds the shard sets and prints the same table).

    python -m pytest -q -s tests/test_faults.py   # prints the table at the end
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from datamodules import WebDataModule
from datamodules.stream import COUNT_EVENTS
from multimodal import AudioCodec, Backbone, VectorQuantizer
from tasks import MultiTaskModule, ReconstructionHead

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "fault_report.py"
_spec = importlib.util.spec_from_file_location("fault_report", SCRIPT)
fault_report = sys.modules.setdefault("fault_report", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(fault_report)  # registered first: its dataclasses look their module up

RESULTS: dict[str, object] = {}
"""fault name -> fault_report.Result of this session (printed as a table at the end of the module)."""


@pytest.fixture(scope="module", autouse=True)
def _print_table():
    yield
    if RESULTS:
        print("\n" + fault_report.table(list(RESULTS.values())))


@pytest.mark.parametrize("name", [f.name for f in fault_report.FAULTS])
def test_fault_is_skipped_counted_and_costs_no_good_sample(name: str, tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    fault = fault_report.FAULTS_BY_NAME[name]
    assert f"skipped/{fault.reason}" in COUNT_EVENTS
    with caplog.at_level(logging.WARNING, logger="datamodules"):
        result = fault_report.run(fault, tmp_path)
    RESULTS[name] = result
    expected = 1 if fault.shard is not None else len(fault_report.BAD)
    assert result.injected == expected
    assert result.skipped == expected, (fault.reason, result)
    assert not result.other_skips, result.other_skips
    assert result.kept == result.good > 0 and not result.extra, result
    # one training epoch (resampled shards) finishes with good samples only
    assert result.train_batches == result.train_expected > 0 and not result.train_bad_keys
    assert set(result.train_skips) <= {fault.reason}, result.train_skips
    assert fault.reason in caplog.text  # each skip is logged, naming its reason


def test_nan_audio_never_reaches_a_loss(tmp_path: Path) -> None:
    root = tmp_path / "nan"
    fault_report.build(fault_report.FAULTS_BY_NAME["NaN in float WAV"], root)
    backbone = Backbone(VectorQuantizer(num_codes=16, dim=8, dead_code_steps=5),
                        {"audio": AudioCodec(preset="tiny", downsample=4, code_dim=8)})
    model = MultiTaskModule(backbone, {"aud": ReconstructionHead("audio", num_media=0)}, warmup_steps=1)
    data = WebDataModule(root=str(root), keys=["audio"], batch_size=3, samples_per_epoch=12, audio_max_seconds=0.2,
                         shuffle_buffer=4)
    trainer = L.Trainer(default_root_dir=tmp_path, max_steps=4, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model, data)
    assert trainer.global_step == 4
    metrics = trainer.callback_metrics
    assert float(metrics["data/val/aud/skipped/non_finite_audio"]) == len(fault_report.BAD)
    assert "train/skipped_nonfinite_steps" not in metrics  # nothing for the module's own guard to catch
    assert torch.isfinite(metrics["train/loss"])
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.isfinite(b).all() for b in model.buffers() if b.is_floating_point())


def test_training_on_unusable_data_stops_with_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from datamodules import stream
    from datamodules.shards import ShardSink

    with ShardSink(tmp_path, "train", max_count=5) as sink:  # labels only: no image to load
        for i in range(10):
            sink.write({"__key__": f"s{i}", "cls": "0"})
    monkeypatch.setattr(stream, "BAD_IN_A_ROW", 50)
    data = WebDataModule(train_urls=str(tmp_path / "train-{000000..000001}.tar"), keys=["image"], batch_size=2,
                         samples_per_epoch=8)
    with pytest.raises(RuntimeError, match=r"50 training samples in a row could not be used.*missing_image"):
        list(data.train_dataloader())
    gone = WebDataModule(train_urls=str(tmp_path / "gone-{000000..000001}.tar"), keys=["label"], batch_size=2,
                         samples_per_epoch=8)
    with pytest.raises(RuntimeError, match=r"20 training shards in a row gave no sample.*missing_shard"):
        list(gone.train_dataloader())
