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


def test_ideal_observer_is_right_without_noise_and_at_chance_without_signal() -> None:
    """ideal_observer.observer_hits: b = 0 always finds the scene's own latent; a -> 0 leaves chance;
    in between, accuracy falls as the noise grows."""
    import torch

    observer = _script("ideal_observer")
    g = torch.Generator().manual_seed(0)
    candidates = torch.randn(2000, 5, 4, 3, generator=g, dtype=torch.float64)
    truth = torch.randint(0, 5, (2000,), generator=g)
    assert bool(observer.observer_hits(candidates, truth, 1.0, 0.0, g).all())
    accuracy = [float(observer.observer_hits(candidates, truth, a, (1 - a * a) ** 0.5, g).double().mean())
                for a in (0.9, 0.3, 0.1, 1e-4)]
    assert accuracy == sorted(accuracy, reverse=True) and accuracy[0] > 0.95, accuracy
    assert abs(accuracy[-1] - 0.2) < 0.04, accuracy


@pytest.mark.parametrize("attribute", ["shape", "colour"])
def test_ideal_observer_scenes_differ_only_in_the_attribute(attribute: str) -> None:
    """draw_scenes renders each scene once per value; the renders agree away from the object, and the
    drawn value's render is the demo's drawing of that object."""
    import numpy as np
    import torch

    from datamodules import demo

    observer = _script("ideal_observer")
    images, truth, sizes = observer.draw_scenes(6, attribute, seed=1)
    values = demo.SHAPES if attribute == "shape" else tuple(demo.COLOURS)
    assert images.shape == (6, len(values), 3, demo.IMAGE_SIZE, demo.IMAGE_SIZE)
    assert images.min() >= -1 and images.max() <= 1 and set(sizes) <= set(demo.OBJECT_SIZES)
    for scene, value in zip(images, truth.tolist()):
        differs = (scene != scene[value]).any(dim=1).any(dim=0)  # [H, W]: pixels any render changes
        assert differs.any() and differs.float().mean() < 0.5  # only the object's pixels change
        others = [k for k in range(len(values)) if k != value]
        assert all(not torch.equal(scene[k], scene[value]) for k in others)
    # the same seed draws the same scenes
    again, truth_again, _ = observer.draw_scenes(6, attribute, seed=1)
    assert torch.equal(again, images) and torch.equal(truth_again, truth)
    assert np.isfinite(images.numpy()).all()
