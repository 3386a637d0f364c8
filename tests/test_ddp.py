"""DDP on CPU: the multi-task recipe in two processes over gloo, through the CLI.

Asserted from what each rank wrote (tests/ddp_probe.py): every rank ran the same number of steps,
validation saw every sample exactly once across the ranks, all parameters and buffers (the
codebook included) are identical on both ranks at the end, and the validation metrics every rank
logged are equal (reduced across ranks) although the ranks saw different samples.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

from tests.tiny import tiny_config

ROOT = Path(__file__).resolve().parents[1]


def _keys(shard_dir: Path, split: str) -> list[str]:
    keys = set()
    for shard in sorted(shard_dir.glob(f"{split}-*.tar")):
        with tarfile.open(shard) as tar:
            keys |= {m.name.split(".", 1)[0] for m in tar.getmembers()}
    return sorted(keys)


@pytest.mark.slow
def test_multitask_ddp_two_cpu_processes(shard_dir: Path, tokenizer_run: Path, tmp_path: Path) -> None:
    run, probe = tmp_path / "run", tmp_path / "probe"
    cfg = tiny_config("multitask.yaml", shard_dir, run, tokenizer_run)
    cfg["trainer"].update(accelerator="cpu", devices=2, strategy="ddp", max_steps=4, val_check_interval=4,
                          limit_val_batches=1.0, num_sanity_val_steps=0)
    cfg["trainer"]["callbacks"].append({"class_path": "tests.ddp_probe.DDPProbe", "init_args": {"out_dir": str(probe)}})
    for task in cfg["data"]["init_args"]["tasks"].values():
        task["init_args"]["batch_size"] = 2  # several validation batches per rank
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "multimodal", "fit", "--config", str(path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((probe / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    # the same number of steps on every rank (resampled training: no rank runs dry first)
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 4
    assert ranks[0]["train_batches"] == ranks[1]["train_batches"]
    # validation: every sample of every task exactly once over the two ranks
    expected = _keys(shard_dir, "val")
    for task in cfg["model"]["init_args"]["heads"]:
        seen = ranks[0]["val_keys"].get(task, []) + ranks[1]["val_keys"].get(task, [])
        assert sorted(seen) == expected, task
        assert ranks[0]["val_keys"].get(task) and ranks[1]["val_keys"].get(task), "both ranks validate"
    # identical weights and buffers (codebook, EMA statistics, latent scales) on both ranks
    assert ranks[0]["checksum"] == ranks[1]["checksum"]
    # metrics reduced across ranks: the same values on both, for every head
    metrics = ranks[0]["val_metrics"]
    for task in cfg["model"]["init_args"]["heads"]:
        assert any(k.startswith(f"val/{task}/") for k in metrics), (task, sorted(metrics))
    assert metrics == ranks[1]["val_metrics"]


@pytest.mark.slow
def test_a_single_task_recipe_trains_under_the_scale_overlays_strategy(shard_dir: Path, tokenizer_run: Path,
                                                                       tmp_path: Path) -> None:
    """classify_digits.yaml never uses the trunk's final layer (an understanding head reads the features):
    plain ``ddp`` stops at the first step; configs/scale/gpu_ddp.yaml's strategy trains it."""
    overlay = yaml.safe_load((ROOT / "configs" / "scale" / "gpu_ddp.yaml").read_text())["trainer"]
    cfg = tiny_config("classify_digits.yaml", shard_dir, tmp_path / "run", tokenizer_run)
    cfg["trainer"].update(accelerator="cpu", devices=2, strategy=overlay["strategy"], max_steps=2,
                          limit_val_batches=0, num_sanity_val_steps=0)
    path = tmp_path / "ddp.yaml"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for strategy, ok in ((overlay["strategy"], True), ("ddp", False)):
        cfg["trainer"]["strategy"] = strategy
        path.write_text(yaml.safe_dump(cfg))
        proc = subprocess.run([sys.executable, "-m", "multimodal", "fit", "--config", str(path)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=600)
        assert (proc.returncode == 0) == ok, (strategy, proc.stderr[-3000:])
        if not ok:
            assert "parameters that were not used in producing the loss" in proc.stderr
