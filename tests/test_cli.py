"""The ``lightning`` console script (a LightningCLI): config printing, fit, test report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from multimodal.cli import main


def _base(root: Path, run_dir: Path) -> list[str]:
    return [
        "--model=tests.cli_model.TinyClassifier",
        "--model.num_classes=3",
        "--data=datamodules.WebDataModule",
        f"--data.root={root}",
        "--data.keys=[image, label]",
        "--data.batch_size=4",
        f"--trainer.default_root_dir={run_dir}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ]


def test_print_config(shard_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *_base(shard_dir, tmp_path), "--print_config"])
    assert exit_info.value.code in (0, None)
    out = capsys.readouterr().out
    assert "class_path: tests.cli_model.TinyClassifier" in out
    assert "class_path: datamodules.WebDataModule" in out and f"root: {shard_dir}" in out


def test_fit_two_steps_then_test_writes_report(shard_dir: Path, tmp_path: Path) -> None:
    main(["fit", *_base(shard_dir, tmp_path), "--trainer.max_steps=2", "--trainer.limit_val_batches=1"])
    version = tmp_path / "lightning_logs" / "version_0"
    assert (version / "config.yaml").is_file()
    assert list(version.glob("events.out.tfevents.*"))
    ckpts = list((version / "checkpoints").glob("*.ckpt"))
    assert len(ckpts) == 1 and "step=2" in ckpts[0].name
    main(["test", *_base(shard_dir, tmp_path), f"--ckpt_path={ckpts[0]}"])
    reports = list(tmp_path.glob("lightning_logs/version_*/test_metrics.json"))
    assert len(reports) == 1
    main(["test", *_base(shard_dir, tmp_path), f"--ckpt_path={tmp_path}"])  # a run folder: its newest checkpoint
    again = sorted(tmp_path.glob("lightning_logs/version_*/test_metrics.json"))
    assert len(again) == 2 and json.loads(again[1].read_text())["test/acc"] == json.loads(reports[0].read_text())["test/acc"]
    metrics = json.loads(reports[0].read_text())
    assert {"test/loss", "test/acc", "test/skipped"} <= set(metrics)
    assert 0.0 <= metrics["test/acc"] <= 1.0
    assert (reports[0].parent / "test_metrics.md").read_text().startswith("| metric | value |")


def test_configured_model_wins_over_the_checkpoints_hyperparameters(shard_dir: Path, tmp_path: Path) -> None:
    """``test --ckpt_path FILE`` with a model setting on the command line tests with that setting: Lightning
    alone would replace it by the checkpoint's saved hyperparameters without a word."""
    import yaml

    main(["fit", *_base(shard_dir, tmp_path), "--trainer.max_steps=1", "--trainer.limit_val_batches=0"])
    ckpt = next((tmp_path / "lightning_logs" / "version_0" / "checkpoints").glob("*.ckpt"))
    out = tmp_path / "test_run"
    main(["test", *_base(shard_dir, out), "--model.lr=0.5", f"--ckpt_path={ckpt}"])
    version = next(out.glob("lightning_logs/version_*"))
    assert yaml.safe_load((version / "hparams.yaml").read_text())["lr"] == 0.5
    assert yaml.safe_load((version / "config.yaml").read_text())["model"]["init_args"]["lr"] == 0.5


def test_console_script_and_module_entry_point() -> None:
    exe = Path(sys.executable).parent / "lightning"
    for cmd in ([str(exe), "fit", "--help"], [sys.executable, "-m", "multimodal", "fit", "--help"]):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert "--trainer.max_steps" in proc.stdout and "--config" in proc.stdout


def test_bad_config_fails_at_start(shard_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *_base(shard_dir, tmp_path), "--data.no_such_option=1"])
    assert exit_info.value.code != 0


def test_fit_on_embedded_demo_data(tmp_path: Path) -> None:
    main([
        "fit",
        "--model=tests.cli_model.TinyClassifier",
        "--model.num_classes=10",
        "--data=datamodules.WebDataModule",
        "--data.demo=digits",
        "--data.demo_size=tiny",
        f"--data.cache_dir={tmp_path / 'cache'}",
        "--data.keys=[image, label]",
        "--data.batch_size=4",
        "--trainer.max_steps=2",
        "--trainer.limit_val_batches=1",
        f"--trainer.default_root_dir={tmp_path / 'run'}",
        "--trainer.enable_progress_bar=false",
    ])
    info = json.loads(next((tmp_path / "cache").glob("digits-*/info.json")).read_text())
    assert info["classes"] == [str(d) for d in range(10)]
    assert next((tmp_path / "run").rglob("*step=2.ckpt"))


def test_nonfinite_loss_skips_the_step_then_stops(tmp_path) -> None:
    """A NaN loss skips the step (counted); NaN every step stops the run with a clear message."""
    import lightning as L
    import pytest as _pytest
    import torch

    from multimodal import Backbone, ImageCodec, VectorQuantizer
    from tasks import MultiTaskModule, ReconstructionHead

    class Flaky(ReconstructionHead):
        def __init__(self, bad_steps):
            super().__init__(modality="image")
            self.bad_steps = bad_steps
            self.calls = 0

        def loss(self, backbone, batch, step):
            loss, logs = super().loss(backbone, batch, step)
            self.calls += 1
            return (loss * float("nan") if self.calls in self.bad_steps else loss), logs

    def build(bad_steps, patience=20):
        backbone = Backbone(quantizer=VectorQuantizer(num_codes=16, dim=8),
                            codecs={"image": ImageCodec(preset="tiny", in_channels=3, image_size=16, code_dim=8)})
        return MultiTaskModule(backbone, {"x": Flaky(bad_steps)}, nonfinite_patience=patience, lr=1e-3)

    items = [{"image": torch.rand(2, 3, 16, 16) * 2 - 1, "__key__": ["a", "b"]} for _ in range(6)]
    batches = torch.utils.data.DataLoader(items, batch_size=None)
    model = build({2, 4})
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        default_root_dir=tmp_path)
    trainer.fit(model, train_dataloaders=batches)
    # Lightning still counts the (gradient-free, hence no-op) optimizer call of a skipped step
    assert trainer.global_step == 6 and model._nonfinite_total == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())
    model = build(set(range(1, 7)), patience=3)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        default_root_dir=tmp_path)
    with _pytest.raises(RuntimeError, match="3 training steps in a row had NaN"):
        trainer.fit(model, train_dataloaders=batches)
