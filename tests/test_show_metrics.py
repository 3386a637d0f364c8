"""scripts/show_metrics.py: the newest value of each scalar, its mean over a window of steps, a fit's timing."""

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


def test_timing_separates_steps_from_pauses(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    writer = SummaryWriter(str(tmp_path / "version_0"))
    wall = 1000.0
    for step in range(0, 100, 10):  # logged every 10 steps at 0.5 s a step, a 60 s validation after step 50
        writer.add_scalar("train/a/loss", 1.0, step, walltime=wall)
        if step == 0:  # a scalar logged once: the most often logged one times the fit
            writer.add_scalar("train/a/rare", 1.0, step, walltime=wall)
        wall += 5.0 + (60.0 if step == 50 else 0.0)
    writer.close()
    spec = importlib.util.spec_from_file_location("show_metrics", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    t = script.timing(tmp_path)
    assert (t["first_step"], t["last_step"]) == (0, 90)
    assert t["wall_s"] == pytest.approx(90 * 0.5 + 60) and t["step_s"] == pytest.approx(0.5)
    assert t["pauses_s"] == pytest.approx(60)
    script.main([str(tmp_path), "--timing"])
    assert capsys.readouterr().out.startswith("steps 0-90: 1.8 min wall, 0.500 s a step")
