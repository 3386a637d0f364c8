"""scripts/show_metrics.py: the newest value of each scalar, or its mean over a window of steps."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from torch.utils.tensorboard import SummaryWriter

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "show_metrics.py"


def test_newest_value_and_mean_over_a_window(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    writer = SummaryWriter(str(tmp_path / "version_0"))
    for step in range(10):
        writer.add_scalar("train/a/loss", float(step), step)
        writer.add_scalar("val/a/acc", 0.5, step)
    writer.close()
    spec = importlib.util.spec_from_file_location("show_metrics", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main([str(tmp_path), "--grep", "train/"])
    assert capsys.readouterr().out.split() == ["train/a/loss", "step", "9", "9.0000"]
    script.main([str(tmp_path), "--grep", "loss", "--steps", "4", "8"])  # steps 4, 5, 6, 7
    assert capsys.readouterr().out.split() == ["train/a/loss", "mean", "of", "4", "5.5000"]
