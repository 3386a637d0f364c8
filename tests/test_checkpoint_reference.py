"""Stage-2 checkpoints reference their frozen tokenizer (file + fingerprints) instead of storing it:
smaller files that load everywhere a full one did, and a clear refusal when the tokenizer changed."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from multimodal import load_backbone
from multimodal.checkpoint import read_checkpoint, resolve_checkpoint
from multimodal.cli import main
from tasks import MultiTaskModule
from tests.tiny import write_tiny_config


def test_stage2_checkpoint_references_the_frozen_tokenizer(tmp_path: Path, shard_dir: Path, tokenizer_run: Path) -> None:
    tokenizer = tmp_path / "tokenizer.ckpt"
    shutil.copy(resolve_checkpoint(tokenizer_run), tokenizer)
    run = tmp_path / "run"
    config = write_tiny_config("generation.yaml", shard_dir, run, tokenizer_run)
    main(["fit", "--config", str(config), f"--model.init_args.backbone.init_args.tokenizer_ckpt={tokenizer}"])
    path = next(run.rglob("last.ckpt"))
    saved = read_checkpoint(path)
    for key in ("state_dict", "current_model_state"):  # the weights, and the raw weights beside the EMA
        assert not [k for k in saved[key] if k.startswith(("backbone.codecs.", "backbone.quantizer."))]
    reference = saved["tokenizer_reference"]
    assert reference["path"] == str(tokenizer.resolve()) and set(reference["fingerprints"]) == {"image", "audio"}
    stage1 = load_backbone(tokenizer)
    # every way of loading it gets the tokenizer back, equal to the one trained on
    loaded = MultiTaskModule.load_from_checkpoint(path, weights_only=True)
    assert torch.equal(loaded.backbone.quantizer.codebook, stage1.quantizer.codebook)
    for name, value in loaded.state_dict().items():
        if name.startswith("backbone.trunk."):
            assert torch.equal(saved["state_dict"][name], value), name
    backbone = load_backbone(path)
    assert torch.equal(backbone.quantizer.codebook, stage1.quantizer.codebook)
    test = main(["test", "--config", str(config), f"--ckpt_path={path}",
                 f"--model.init_args.backbone.init_args.tokenizer_ckpt={tokenizer}"])
    assert test is None and list(run.rglob("test_metrics.json"))

    # the tokenizer file changed since (retrained into the same path): refused, both named
    other = torch.load(tokenizer, weights_only=True)
    key = next(k for k in other["state_dict"] if k.startswith("backbone.codecs.image"))
    other["state_dict"][key] = other["state_dict"][key] + 1.0
    torch.save(other, tokenizer)
    with pytest.raises(ValueError, match="was trained on the tokenizer .*tokenizer.ckpt.*retrained"):
        load_backbone(path)
    tokenizer.unlink()  # and gone
    with pytest.raises(FileNotFoundError, match="references its frozen tokenizer .* gone"):
        load_backbone(path)
