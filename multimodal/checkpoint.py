"""Load the shared backbone from a training checkpoint, to encode and decode with it.

    backbone = load_backbone("runs/tokenizer/.../last.ckpt")
    codes, lengths = backbone.encode_codes("image", images)     # [B, N] long
    images = backbone.decode_codes("image", codes)               # [B, C, H, W] in [-1, 1]

The checkpoint must come from a ``lightning fit`` run (the LightningCLI stores the model's
configuration, ``class_path`` entries included, in ``hyper_parameters``). Loading uses
``torch.load(weights_only=True)``: no pickled code is executed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from jsonargparse import ArgumentParser

from .backbone import Backbone

PREFIX = "backbone."


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint file, or a run folder: then its newest ``last.ckpt`` (by modification time), or
    its newest checkpoint where no ``last.ckpt`` was written."""
    path = Path(path)
    if path.is_dir():
        found = sorted(path.rglob("last*.ckpt"), key=lambda p: p.stat().st_mtime)
        found = found or sorted(path.rglob("*.ckpt"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise FileNotFoundError(f"no last.ckpt (no checkpoint at all) under {path}: train that stage first")
        return found[-1]
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return path


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """``torch.load(weights_only=True)`` of a checkpoint file or a run folder's newest last.ckpt."""
    return torch.load(resolve_checkpoint(path), map_location=map_location, weights_only=True)


def backbone_config(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The ``class_path`` configuration of the backbone stored in a checkpoint."""
    config = checkpoint.get("hyper_parameters", {}).get("backbone")
    if not isinstance(config, dict) or "class_path" not in config:
        raise ValueError(
            "checkpoint has no backbone configuration in hyper_parameters['backbone']: "
            "it was not written by `lightning fit` with a tasks.MultiTaskModule model"
        )
    return config


def build_backbone(config: dict[str, Any]) -> Backbone:
    """Instantiate a backbone from its ``class_path`` / ``init_args`` configuration."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--backbone", type=Backbone)
    return parser.instantiate_classes(parser.parse_object({"backbone": config})).backbone


def run_datamodule(checkpoint_path: str | os.PathLike, stage: str | None = None):
    """The DataModule a run was trained with, rebuilt from the ``config.yaml`` LightningCLI saved
    beside its checkpoints (``prepare_data`` done; ``setup(stage)`` when ``stage`` is given)."""
    import lightning as L
    import yaml

    path = resolve_checkpoint(checkpoint_path)
    config = next((p / "config.yaml" for p in path.parents if (p / "config.yaml").is_file()), None)
    if config is None:
        raise FileNotFoundError(f"no config.yaml in the folders above {path}")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--data", type=L.LightningDataModule)
    data_config = yaml.safe_load(config.read_text(encoding="utf-8"))["data"]
    data = parser.instantiate_classes(parser.parse_object({"data": data_config})).data
    data.prepare_data()
    if stage is not None:
        data.setup(stage)
    return data


def backbone_state(checkpoint: dict[str, Any]) -> dict[str, Any]:
    return {k[len(PREFIX):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(PREFIX)}


TOKENIZER_KEYS = ("codecs.", "quantizer.")
"""Backbone state keys of the tokenizer (codecs and shared quantizer)."""


def tokenizer_fingerprints(backbone: Backbone) -> dict[str, str]:
    """``{modality: Backbone.tokenizer_fingerprint(modality)}`` for every codec."""
    return {m: backbone.tokenizer_fingerprint(m) for m in backbone.codecs}


def tokenizer_state(checkpoint: dict[str, Any], backbone: Backbone | None = None) -> dict[str, Any]:
    """The codecs' and quantizer's weights of a checkpoint (backbone-relative keys).

    A stage-2 checkpoint whose tokenizer was frozen does not store them: it names the tokenizer file
    and its fingerprints (``tokenizer_reference``, written by ``tasks.MultiTaskModule``). They are then
    taken from ``backbone`` when its tokenizer has those fingerprints (nothing read), else from the
    named file, and refused with both named when the file is gone or no longer the same tokenizer."""
    state = {k: v for k, v in backbone_state(checkpoint).items() if k.startswith(TOKENIZER_KEYS)}
    reference = checkpoint.get("tokenizer_reference")
    if not reference:
        return state
    wanted = reference["fingerprints"]
    if backbone is not None and tokenizer_fingerprints(backbone) == wanted:
        return {k: v for k, v in backbone.state_dict().items() if k.startswith(TOKENIZER_KEYS)}
    path = Path(reference["path"])
    if not path.is_file():
        raise FileNotFoundError(
            f"this checkpoint references its frozen tokenizer {path} (fingerprints {wanted}) instead of storing it, "
            "and that file is gone: restore it, or set model.backbone.init_args.tokenizer_ckpt to a copy")
    source = read_checkpoint(path)
    tokenizer = build_backbone(backbone_config(source))
    tokenizer.load_state_dict(tokenizer_state(source), strict=False)
    found = tokenizer_fingerprints(tokenizer)
    if found != wanted:
        raise ValueError(f"this checkpoint was trained on the tokenizer {path} with fingerprints {wanted}, but that "
                         f"file now holds {found} (retrained since?): point model.backbone.init_args.tokenizer_ckpt "
                         "at the tokenizer the run was trained with")
    return {k: v for k, v in tokenizer.state_dict().items() if k.startswith(TOKENIZER_KEYS)}


def load_backbone(path: str | os.PathLike, map_location: str | torch.device = "cpu", eval_mode: bool = True) -> Backbone:
    """Build the backbone a checkpoint was trained with and load its weights (strictly).

    ``path``: a checkpoint file or a run folder (its newest last.ckpt)."""
    checkpoint = read_checkpoint(path, map_location)
    try:
        backbone = build_backbone(backbone_config(checkpoint))
    except FileNotFoundError as err:
        reference = checkpoint.get("tokenizer_reference")
        if not reference:
            raise
        raise FileNotFoundError(
            f"{path} references its frozen tokenizer {reference['path']} (fingerprints {reference['fingerprints']}) "
            f"instead of storing it, and that file is gone ({err})") from err
    state = {**tokenizer_state(checkpoint, backbone), **backbone_state(checkpoint)}
    # a learned vocoder is read from its own file (backbone.vocoder_ckpt), never from a stage-2 checkpoint
    state = {k: v for k, v in state.items() if not k.startswith("vocoder.")}
    state.update({k: v for k, v in backbone.state_dict().items() if k.startswith("vocoder.")})
    backbone.load_state_dict(state, strict=True)
    return backbone.eval() if eval_mode else backbone
