"""A run whose prerequisites are missing fails at start with one line: what is missing, the setting
that names it and the command that makes it (``multimodal.prerequisites``), not a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from multimodal.cli import main
from tests.tiny import CONFIGS, tiny_config


def _fails(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, lines
    return lines[0]


def test_each_missing_prerequisite_is_one_line(tmp_path: Path, shard_dir: Path, tokenizer_run: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    recipe = ["fit", "--config", str(CONFIGS / "classify_digits.yaml"),
              f"--model.init_args.backbone.init_args.tokenizer_ckpt={tokenizer_run}"]
    line = _fails(["fit", "--config", str(CONFIGS / "classify_digits.yaml"),
                   f"--model.init_args.backbone.init_args.tokenizer_ckpt={tmp_path / 'stage1'}"], capsys)
    assert "no stage-1 tokenizer checkpoint at" in line and "model.init_args.backbone.init_args.tokenizer_ckpt" in line
    assert "lightning fit --config configs/tokenizer.yaml" in line
    line = _fails([*recipe, f"--data.init_args.root={tmp_path / 'shards'}", "--data.init_args.demo=null"], capsys)
    assert "no shard folder at" in line and "data.init_args.root" in line and "scripts/make_shards.py" in line
    (tmp_path / "empty").mkdir()
    line = _fails([*recipe, f"--data.init_args.root={tmp_path / 'empty'}", "--data.init_args.demo=null"], capsys)
    assert "holds no info.json" in line
    line = _fails([*recipe, f"--data.init_args.root={shard_dir}", "--data.init_args.demo=null",
                   "--data.init_args.keys=[image, text, label]", f"--data.init_args.tokenizer_path={tmp_path / 'sp.model'}"],
                  capsys)
    assert "no sentencepiece model at" in line and "data.init_args.tokenizer_path" in line
    line = _fails([*recipe, f"--model.init_args.init_from={tmp_path / 'gone.ckpt'}"], capsys)
    assert "no checkpoint to initialise from" in line and "model.init_args.init_from" in line


def test_heads_and_data_tasks_that_differ_are_named_at_start(tmp_path: Path, shard_dir: Path, tokenizer_run: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    cfg = tiny_config("multitask.yaml", shard_dir, tmp_path / "run", tokenizer_run)
    del cfg["model"]["init_args"]["heads"]["caption"]  # an override that left a data task without its head
    cfg["model"]["init_args"]["loss_weights"] = {}
    path = tmp_path / "mismatch.yaml"
    path.write_text(yaml.safe_dump(cfg))
    line = _fails(["fit", "--config", str(path)], capsys)
    assert "heads ['classify', 'generate', 'transcribe']" in line and "tasks ['caption', 'classify', 'generate', 'transcribe']" in line


def test_a_fresh_clone_gets_at_most_three_lines(tmp_path: Path) -> None:
    """The README's multi-task command before stage 1, as a new user runs it (a fresh process)."""
    out = subprocess.run([sys.executable, "-m", "multimodal", "fit", "--config", str(CONFIGS / "multitask.yaml"),
                          f"--model.init_args.backbone.init_args.tokenizer_ckpt={tmp_path / 'runs' / 'tokenizer'}"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    lines = [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]
    assert out.returncode == 2 and len(lines) <= 3, lines
    assert "no stage-1 tokenizer checkpoint" in lines[-1]
