"""Shared fixtures: small shard folders built from scratch (no downloads)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from datamodules.shards import ShardSink, encode_png, encode_wav, make_info, write_info

WORDS = ["red", "green", "blue", "circle", "square", "small", "large", "left", "of", "a", "the"]


ATTRIBUTES = {"colour": ["red", "green", "blue", "yellow", "purple", "orange"],
              "shape": ["circle", "square", "triangle", "diamond", "cross"], "size": ["small", "large"]}


def build_shards(
    out: Path,
    counts: dict[str, int] | None = None,
    per_shard: int = 5,
    sample_rate: int = 16000,
    num_classes: int = 3,
    seed: int = 0,
    bad: dict[str, list[int]] | None = None,
    captions: int = 1,
) -> Path:
    """Shards with png (16x16 RGB), wav (0.1-0.5 s), txt, cls and json (scene annotations: 1-3 objects
    with the demo shapes' attributes, :data:`ATTRIBUTES`) per sample; with ``captions`` > 1 every sample
    also holds that many captions in ``captions.json`` (the first is its ``txt``).

    ``bad`` maps a kind (``image``, ``audio``, ``text``, ``label``) to train indices to corrupt.
    """
    counts = counts or {"train": 20, "val": 12, "test": 8}
    bad = bad or {}
    rng = np.random.default_rng(seed)
    scene_rng = np.random.default_rng(seed + 1)  # its own stream: the other members stay as they were
    splits = {}
    for split, n in counts.items():
        with ShardSink(out, split, max_count=per_shard) as sink:
            for i in range(n):
                label = int(rng.integers(num_classes))
                image = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
                wave = 0.3 * np.sin(np.arange(int(sample_rate * rng.uniform(0.1, 0.5))) * 0.05 * (label + 1))
                text = " ".join(rng.choice(WORDS, size=int(rng.integers(2, 7))))
                sample = {
                    "__key__": f"{split}{i:05d}",
                    "png": encode_png(image),
                    "wav": encode_wav(wave, sample_rate),
                    "txt": text,
                    "cls": str(label),
                    "json": json.dumps({"objects": [
                        {"x": float(scene_rng.uniform(0, 16)), "y": float(scene_rng.uniform(0, 16)),
                         **{k: str(scene_rng.choice(v)) for k, v in ATTRIBUTES.items()}}
                        for _ in range(int(scene_rng.integers(1, 4)))]}),
                }
                if captions > 1:
                    more = [" ".join(rng.choice(WORDS, size=int(rng.integers(2, 7)))) for _ in range(captions - 1)]
                    sample["captions.json"] = json.dumps([text, *more])
                if split == "train":
                    if i in bad.get("image", []):
                        sample["png"] = b"\x89PNG not really"
                    if i in bad.get("audio", []):
                        sample["wav"] = sample["wav"][:30]
                    if i in bad.get("text", []):
                        sample["txt"] = "   "
                    if i in bad.get("label", []):
                        sample["cls"] = str(num_classes + 5)
                sink.write(sample)
        splits[split] = {"count": n, "shards": sink.shards}
    write_info(
        out,
        make_info(splits, ["image", "audio", "text", "label"], classes=[f"c{k}" for k in range(num_classes)],
                  sample_rate=sample_rate, source="tests", attributes=ATTRIBUTES,
                  heldout_combinations=[{"shape": "circle", "colour": "red"}]),
    )
    return out


@pytest.fixture(scope="session", autouse=True)
def latent_cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Cached tokenizer codes of every test go to a temporary folder (inherited by subprocesses)."""
    import os

    root = tmp_path_factory.mktemp("latents")
    previous = os.environ.get("MULTIMODAL_LATENT_CACHE")
    os.environ["MULTIMODAL_LATENT_CACHE"] = str(root)
    yield root
    if previous is None:
        os.environ.pop("MULTIMODAL_LATENT_CACHE", None)
    else:
        os.environ["MULTIMODAL_LATENT_CACHE"] = previous


@pytest.fixture(scope="session")
def shard_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="session")
def tokenizer_run(shard_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny stage-1 run (images + audio, 64 codes of dim 16) that stage-2 recipes build on."""
    from multimodal.cli import main
    from tests.tiny import write_tiny_config

    run = tmp_path_factory.mktemp("tok") / "run"
    main(["fit", "--config", str(write_tiny_config("tokenizer.yaml", shard_dir, run))])
    return run


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` are skipped where CUDA is missing (CI never has a GPU)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
