"""Multi-task training and fine-tuning on one backbone: loss weighting, learning rates, init_from,
freeze, a new head on a trained backbone, bad input; the quickstart and the single-vs-multi script."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from datamodules import MultiTaskDataModule, WebDataModule
from multimodal import Backbone, DiffusionTransformer
from tasks import ClassificationHead, GenerationHead, MultiTaskModule
from tests.tiny import NUM_CLASSES, TRUNK_HIDDEN, tiny_config, write_tiny_config

ROOT = Path(__file__).resolve().parents[1]


def _model(tokenizer_run: Path, classes: int = NUM_CLASSES, **kw) -> MultiTaskModule:
    backbone = Backbone(tokenizer_ckpt=str(tokenizer_run),
                        trunk=DiffusionTransformer(in_dim=16, preset="tiny", patch_size=2, num_classes=NUM_CLASSES))
    heads = {
        "gen": GenerationHead(modality="image", num_classes=NUM_CLASSES, eval_samples=0, sample_steps=2),
        "cls": ClassificationHead(modality="image", num_classes=classes, trunk_hidden=TRUNK_HIDDEN),
    }
    return MultiTaskModule(backbone, heads, **kw)


def _data(shard_dir: Path, keys: dict[str, list[str]] | None = None) -> MultiTaskDataModule:
    keys = keys or {"gen": ["image", "label"], "cls": ["image", "label"]}
    return MultiTaskDataModule({task: WebDataModule(root=str(shard_dir), keys=k, batch_size=4, samples_per_epoch=8)
                                for task, k in keys.items()})


def _trainer(root: Path, steps: int = 2) -> L.Trainer:
    return L.Trainer(max_steps=steps, limit_val_batches=0, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=root, num_sanity_val_steps=0)


def test_uncertainty_weighting_and_separate_learning_rates(shard_dir: Path, tokenizer_run: Path, tmp_path: Path) -> None:
    model = _model(tokenizer_run, loss_weighting="uncertainty", lr=1e-3, backbone_lr=1e-4)
    assert set(model.log_vars) == {"gen", "cls"}
    before = {k: v.detach().clone() for k, v in model.log_vars.items()}
    trainer = _trainer(tmp_path)
    trainer.fit(model, _data(shard_dir))
    # the learned log-variances moved (they are trained with the model) and are in the checkpoint
    assert any(not torch.equal(before[k], model.log_vars[k].detach()) for k in before)
    assert "log_vars.gen" in model.state_dict()
    groups = trainer.optimizers[0].param_groups
    trunk_ids = {id(p) for p in model.backbone.trunk.parameters()}
    by_lr = {g["initial_lr"]: {id(p) for p in g["params"]} for g in groups}
    assert by_lr[1e-4] == trunk_ids  # the trainable backbone (the tokenizer is frozen)
    assert by_lr[1e-3] and not (by_lr[1e-3] & trunk_ids)  # heads and loss weights
    with pytest.raises(ValueError, match="loss_weighting must be 'static' or 'uncertainty'"):
        _model(tokenizer_run, loss_weighting="learned")


def test_init_from_new_class_list_and_freeze(shard_dir: Path, tokenizer_run: Path, tmp_path: Path) -> None:
    model = _model(tokenizer_run)
    trainer = _trainer(tmp_path / "a")
    trainer.fit(model, _data(shard_dir))
    ckpt = tmp_path / "a.ckpt"
    trainer.save_checkpoint(ckpt)
    # a new class list for one head: its mismatched layers are reported and start fresh; the rest loads
    tuned = _model(tokenizer_run, classes=5, init_from=str(ckpt), freeze=["trunk"])
    report = tuned.init_report
    assert report["skipped_shape"] and all(k.startswith("heads.cls.") for k in report["skipped_shape"])
    trunk_key = next(k for k in model.state_dict() if k.startswith("backbone.trunk."))
    assert torch.equal(tuned.state_dict()[trunk_key], model.state_dict()[trunk_key])
    assert not any(p.requires_grad for p in tuned.backbone.trunk.parameters())
    frozen = {k: v.clone() for k, v in tuned.backbone.trunk.state_dict().items()}
    _trainer(tmp_path / "b").fit(tuned, _data(shard_dir))
    assert all(torch.equal(v, tuned.backbone.trunk.state_dict()[k]) for k, v in frozen.items())
    assert not tuned.backbone.trunk.training  # frozen modules stay in eval mode


def test_bad_multitask_input_fails_at_start(shard_dir: Path, tokenizer_run: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"loss_weights names tasks with no head: \['nope'\]"):
        _model(tokenizer_run, loss_weights={"nope": 1.0})
    # a head whose key its data does not load: named, before the first step
    model = _model(tokenizer_run)
    with pytest.raises(ValueError, match=r"head 'cls' needs \['label'\] but its data set .* loads only \['image'\]"):
        _trainer(tmp_path).fit(model, _data(shard_dir, {"gen": ["image", "label"], "cls": ["image"]}))
    # a checkpoint of another model family shares no weights with this one
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"net.0.weight": torch.zeros(3)}}, other)
    with pytest.raises(ValueError, match="shares no weights with this model"):
        _model(tokenizer_run, init_from=str(other))
    # a data task without a head
    with pytest.raises(ValueError, match="head 'cls' has no data"):
        _trainer(tmp_path).fit(_model(tokenizer_run), _data(shard_dir, {"gen": ["image", "label"]}))


def test_quickstart_script_chains_both_stages(shard_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "qs"
    stage1 = write_tiny_config("tokenizer.yaml", shard_dir, tmp_path / "unused1")
    stage2 = write_tiny_config("quickstart.yaml", shard_dir, tmp_path / "unused2", tokenizer_run=tmp_path)
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "quickstart.py"), "--out", str(out),
                           "--stage1-config", str(stage1), "--stage1-steps", "2", "--stage2-config", str(stage2)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "TensorBoard:" in proc.stdout and "test report:" in proc.stdout and "peak memory" in proc.stdout
    report = json.loads(next((out / "stage2").rglob("test_metrics.json")).read_text())
    heads = yaml.safe_load(stage2.read_text())["model"]["init_args"]["heads"]
    assert all(any(k.startswith(f"test/{task}/") for k in report) for task in heads)
    assert {p.stem for p in (out / "stage2").rglob("predictions/*.jsonl")} == set(heads)
    assert (out / "samples" / "grid.png").is_file()  # generated samples, a row per class
    assert "What the heads answer" in proc.stdout and "reference" in proc.stdout  # examples next to references


def test_single_vs_multi_script(shard_dir: Path, tokenizer_run: Path, tmp_path: Path) -> None:
    cfg = tiny_config("multitask.yaml", shard_dir, tmp_path / "unused", tokenizer_run)
    path = tmp_path / "multi.yaml"
    path.write_text(yaml.safe_dump(copy.deepcopy(cfg)))
    out = tmp_path / "compare"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "compare_multitask.py"), "--config", str(path),
                           "--steps", "2", "--out", str(out), "--tasks", "classify", "transcribe", "--jobs", "2",
                           "--eval-samples", "4"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((out / "comparison.json").read_text())
    assert [r["task"] for r in rows] == ["classify", "transcribe"]
    assert [r["metric"] for r in rows] == ["acc", "wer"]
    assert all(r["single"] is not None and r["multi"] is not None for r in rows)
    assert "| classify | acc |" in (out / "comparison.md").read_text()
    saved = yaml.safe_load((out / "multi" / "config.yaml").read_text())["model"]["init_args"]["heads"]
    assert saved["generate"]["init_args"]["eval_samples"] == 4
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["multi", "single-classify", "single-transcribe"]
