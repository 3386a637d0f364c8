"""Turn any recipe in ``configs/`` into a tiny one that runs in seconds on the test shards.

Every ``class_path`` entry is shrunk by the settings below, applied only where the class takes
the argument (read from its signature), so a new config or a new head argument does not need a
new test helper: ``tests/test_configs.py`` runs every YAML through fit, test and predict.
"""

from __future__ import annotations

import copy
import importlib
import inspect
from pathlib import Path
from typing import Any

import yaml

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CODE_DIM = 16
TRUNK_HIDDEN = 64  # the tiny DiT preset's width
NUM_CLASSES = 3  # tests/conftest.py build_shards

# class_path -> arguments to set (when the class accepts them)
SHRINK: dict[str, dict[str, Any]] = {
    "multimodal.VectorQuantizer": {"num_codes": 64, "dim": CODE_DIM},
    "multimodal.FSQ": {"dim": CODE_DIM},
    "multimodal.ImageCodec": {"preset": "tiny", "code_dim": CODE_DIM},
    "multimodal.AudioCodec": {"preset": "tiny", "code_dim": CODE_DIM},
    "multimodal.DiffusionTransformer": {"preset": "tiny", "in_dim": CODE_DIM, "hidden_size": None, "depth": None},
    "tasks.GenerationHead": {"sample_steps": 2, "eval_samples": 4, "audio_tokens": 5},
    "multimodal.Vocoder": {"width": 16, "depth": 1},
}
# arguments that are only replaced when the config sets them (a class's default stays otherwise)
IF_SET: dict[str, Any] = {
    "num_classes": NUM_CLASSES,
    "text_vocab_size": 64,
    "out_dim": 64,  # a trunk that gives logits over the codes (target: codes): the tiny codebook's size
    "vocab_size": 64,
    "trunk_hidden": TRUNK_HIDDEN,
    "eval_samples": 4,
    "num_media": 2,
    "gan_start_step": 1,  # the adversarial recipes' discriminator runs within the 2 test steps
}
DATA: dict[str, Any] = {"batch_size": 4, "samples_per_epoch": 8, "eval_batch_size": None}


def _accepts(class_path: str) -> set[str]:
    module, name = class_path.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    return set(inspect.signature(cls.__init__).parameters)


def _shrink(node: Any, shard_dir: Path, tokenizer_run: Path | None) -> None:
    if isinstance(node, list):
        for item in node:
            _shrink(item, shard_dir, tokenizer_run)
        return
    if not isinstance(node, dict):
        return
    path = node.get("class_path")
    args = node.get("init_args")
    if isinstance(path, str) and isinstance(args, dict):
        accepted = _accepts(path)
        for key, value in SHRINK.get(path, {}).items():
            if key in accepted:
                args[key] = value
        for key, value in IF_SET.items():
            if key in args and key in accepted:
                args[key] = value
        if path == "datamodules.WebDataModule":
            args.pop("demo", None)
            args["root"] = str(shard_dir)
            args.update({k: v for k, v in DATA.items()})
            if "text" in (args.get("keys") or ["text"]):
                args["vocab_size"] = 40
        if path == "multimodal.Backbone" and args.get("tokenizer_ckpt"):
            if tokenizer_run is None:
                raise ValueError("this config needs a stage-1 run: pass tokenizer_run")
            args["tokenizer_ckpt"] = str(tokenizer_run)
        if path == "tasks.MultiTaskModule":
            args["init_from"] = None
    for value in node.values():
        _shrink(value, shard_dir, tokenizer_run)


def tiny_config(name: str, shard_dir: Path, run_dir: Path, tokenizer_run: Path | None = None) -> dict[str, Any]:
    """``configs/<name>`` made tiny: tiny presets, the test shards, 2 training steps, one val batch."""
    cfg = copy.deepcopy(yaml.safe_load((CONFIGS / name).read_text()))
    _shrink(cfg["model"], shard_dir, tokenizer_run)
    _shrink(cfg["data"], shard_dir, tokenizer_run)
    trainer = cfg.setdefault("trainer", {})
    for key in ("max_time", "max_epochs", "fast_dev_run"):
        trainer.pop(key, None)
    trainer.update(max_steps=2, val_check_interval=2, check_val_every_n_epoch=None, limit_val_batches=1,
                   limit_test_batches=2, limit_predict_batches=1, default_root_dir=str(run_dir),
                   enable_progress_bar=False, log_every_n_steps=1)
    for callback in trainer.get("callbacks", []):
        args = callback.setdefault("init_args", {})
        if "every_n_train_steps" in args:
            args["every_n_train_steps"] = 1
        if "update_starting_at_step" in args:
            args["update_starting_at_step"] = 0
    return cfg


def write_tiny_config(name: str, shard_dir: Path, run_dir: Path, tokenizer_run: Path | None = None) -> Path:
    path = run_dir.parent / f"{run_dir.name}-{name}"
    path.write_text(yaml.safe_dump(tiny_config(name, shard_dir, run_dir, tokenizer_run)))
    return path
