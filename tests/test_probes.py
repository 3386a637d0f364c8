"""The judge diagnostics in scripts/ (judge_probe.py, scene_probe.py) run end to end on small shards."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("pool", ["mean", "peak"])
def test_judge_probe_reports_validation_accuracy(pool: str, shard_dir: Path, capsys: pytest.CaptureFixture) -> None:
    assert _script("judge_probe").main(["--root", str(shard_dir), "--pool", pool, "--steps", "2", "--width", "8",
                                        "--batch-size", "4", "--num-classes", "3", "--seconds", "0.5"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["pool"] == pool and out["val_clips"] == 12 and 0.0 <= out["val_acc"] <= 1.0


@pytest.mark.parametrize("variant", ["two_pathways", "one_network"])
def test_scene_probe_scores_seen_and_unseen(variant: str, shard_dir: Path, capsys: pytest.CaptureFixture) -> None:
    assert _script("scene_probe").main(["--root", str(shard_dir), "--variant", variant, "--steps", "2",
                                        "--width", "8", "--batch-size", "4"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["variant"] == variant
    assert 0.0 <= out["all_captions/shape"] <= 1.0 and 0.0 <= out["all_captions/all"] <= 1.0
    assert {k.split("/")[0] for k in out if "/" in k} <= {"seen", "unseen", "all_captions"}
