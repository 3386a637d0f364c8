"""Killed and resumed: a stage-1 fit through the CLI, SIGKILLed after its step-6 checkpoint and
resumed with ``--ckpt_path last``, ends with the weights of an uninterrupted run.

The runs are subprocesses (``python -m multimodal fit``), as on a cluster. The kill lands at a
fixed point (the start of step 7, held there by :class:`PauseAtStep`) so the test is repeatable;
the step-6 checkpoint is mid-epoch (4 batches an epoch), so the data stream has to resume mid-pass.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from tests.test_tokenizer import _tiny_tokenizer_config

ROOT = Path(__file__).resolve().parents[1]
MAX_STEPS, KILL_AFTER = 12, 6


class PauseAtStep(L.Callback):
    """Holds a run at the start of the batch after ``step`` optimizer steps (writes ``marker`` first)."""

    def __init__(self, step: int, marker: str, seconds: float = 120.0) -> None:
        self.step, self.marker, self.seconds = step, marker, seconds

    def on_train_batch_start(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_step == self.step:
            Path(self.marker).write_text(str(self.step))
            time.sleep(self.seconds)


def _config(shard_dir: Path, run: Path, pause_marker: Path | None = None) -> Path:
    cfg = _tiny_tokenizer_config(shard_dir, run)
    # dead codes restart every few steps: the restart draws (the quantizer's own generator) and the
    # ring buffer of recent latents must be checkpointed for the resumed run to match
    cfg["model"]["init_args"]["backbone"]["init_args"]["quantizer"]["init_args"]["dead_code_steps"] = 2
    for task in cfg["data"]["init_args"]["tasks"].values():
        task["init_args"]["samples_per_epoch"] = 16  # 4 batches an epoch: step 6 is mid-epoch
    cfg["trainer"].update(max_steps=MAX_STEPS, val_check_interval=4, log_every_n_steps=1, num_sanity_val_steps=0)
    cfg["trainer"]["logger"] = {"class_path": "lightning.pytorch.loggers.CSVLogger",
                                "init_args": {"save_dir": str(run), "flush_logs_every_n_steps": 1}}
    ckpt = cfg["trainer"]["callbacks"][0]["init_args"]
    ckpt.update(every_n_train_steps=2, save_last=True, save_top_k=-1, dirpath=str(run / "ckpts"))
    if pause_marker is not None:
        cfg["trainer"]["callbacks"].append({"class_path": "tests.test_resume.PauseAtStep",
                                            "init_args": {"step": KILL_AFTER, "marker": str(pause_marker)}})
    path = run.with_suffix(".yaml")
    run.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return env


def _fit(cfg: Path, *extra: str) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "multimodal", "fit", "--config", str(cfg), *extra],
                         cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def _losses(run: Path) -> dict[int, dict[int, float]]:
    """``{version: {step: train/loss}}`` from the CSVLogger files of a run folder."""
    out: dict[int, dict[int, float]] = {}
    for path in sorted(run.glob("lightning_logs/version_*/metrics.csv")):
        version = int(path.parent.name.split("_")[1])
        with path.open() as f:
            rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
        out[version] = {int(r["step"]): float(r["train/loss"]) for r in rows}
    return out


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


@pytest.mark.slow
def test_killed_run_resumes_where_it_stopped(shard_dir: Path, tmp_path: Path) -> None:
    # the uninterrupted reference
    _fit(_config(shard_dir, tmp_path / "ref"))
    # a run killed (SIGKILL: no clean-up) after its step-6 checkpoint
    run, marker = tmp_path / "run", tmp_path / "paused"
    cfg = _config(shard_dir, run, pause_marker=marker)
    err = tmp_path / "killed.err"
    with err.open("w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "multimodal", "fit", "--config", str(cfg)], cwd=ROOT,
                                env=_env(), stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = time.monotonic() + 240
        step6 = None
        while time.monotonic() < deadline and proc.poll() is None:
            step6 = next(run.glob(f"ckpts/*step={KILL_AFTER}.ckpt"), None)
            if step6 is not None and marker.exists():
                break
            time.sleep(0.1)
        assert step6 is not None and marker.exists(), err.read_text()[-3000:]
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # every file a checkpoint (Lightning writes each to a temporary file and moves it into place)
    names = sorted(p.name for p in (run / "ckpts").iterdir())
    assert names == ["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt", "epoch=1-step=6.ckpt", "last.ckpt"], names
    for name in names:
        torch.load(run / "ckpts" / name, map_location="cpu", weights_only=False)
    saved = torch.load(run / "ckpts" / "last.ckpt", map_location="cpu", weights_only=False)
    assert saved["global_step"] == KILL_AFTER
    # the data loaders' positions are in the checkpoint (one per task: epoch 1, 2 of 4 batches handed out)
    loaders = saved["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert [(s["epoch"], s["batches"]) for s in loaders] == [(1, 2)] * 3, loaders

    _fit(_config(shard_dir, run), "--ckpt_path", "last")
    losses = _losses(run)
    before, after = losses[0], losses[1]  # CSV step = global_step when the loss was logged
    assert max(before) == KILL_AFTER - 1 and min(after) == saved["global_step"], (sorted(before), sorted(after))
    assert max(after) == MAX_STEPS - 1
    pre_mean = sum(before.values()) / len(before)
    assert after[KILL_AFTER] < 2 * pre_mean, (after, before)  # no spike after resuming
    # same batches, same updates: the losses and the final weights and optimizer state are the
    # uninterrupted run's, bit for bit (one thread each; dead codes restarted along the way)
    ref = _losses(tmp_path / "ref")[0]
    assert {**before, **after} == ref
    final = torch.load(run / "ckpts" / "last.ckpt", map_location="cpu", weights_only=True)
    ref_final = torch.load(tmp_path / "ref" / "ckpts" / "last.ckpt", map_location="cpu", weights_only=True)
    assert final["global_step"] == ref_final["global_step"] == MAX_STEPS
    assert final["state_dict"].keys() == ref_final["state_dict"].keys()
    differ = [k for k, v in final["state_dict"].items() if not _same(v, ref_final["state_dict"][k])]
    assert not differ, differ
    for opt, ref_opt in zip(final["optimizer_states"], ref_final["optimizer_states"]):
        for i, state in opt["state"].items():
            assert all(torch.equal(v, ref_opt["state"][i][k]) for k, v in state.items()), i


def _same(a, b) -> bool:
    """Equal tensors, or equal nested extra state (dicts of tensors and numbers)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    return a == b


# ------------------------------------------------------------------ the data layer alone
def _loader(shard_dir: Path, num_workers: int):
    from datamodules import WebDataModule

    dm = WebDataModule(root=str(shard_dir), keys=["image", "audio"], batch_size=2, samples_per_epoch=20,
                       num_workers=num_workers, audio_max_seconds=0.1, shuffle_buffer=8)
    dm.setup("fit")
    return dm.train_dataloader()


def _fingerprint(batch: dict) -> tuple:
    return tuple(batch["__key__"]), float(batch["audio"].sum()), float(batch["image"].sum())


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_state_resumes_mid_epoch(shard_dir: Path, num_workers: int) -> None:
    loader = _loader(shard_dir, num_workers)
    loader.sampler.set_epoch(3)
    whole = [_fingerprint(b) for b in loader]  # epoch 3, 10 batches over the workers
    loader.sampler.set_epoch(3)
    it = iter(loader)
    head = [_fingerprint(next(it)) for _ in range(4)]
    state = loader.state_dict()
    del it
    assert head == whole[:4] and (state["epoch"], state["batches"]) == (3, 4)

    fresh = _loader(shard_dir, num_workers)  # a new process: same settings, the checkpoint's state
    fresh.load_state_dict(state)
    rest = iter(fresh)  # Lightning creates the iterator, then sets the restored epoch
    fresh.sampler.set_epoch(3)
    assert [_fingerprint(b) for b in rest] == whole[4:]  # same samples, same random audio crops
    fresh.sampler.set_epoch(4)
    after = [_fingerprint(b) for b in fresh]
    loader.sampler.set_epoch(4)
    assert after == [_fingerprint(b) for b in loader]  # and on with the next epoch as usual

    done = loader.state_dict()  # a finished pass resumes at the start of the next epoch
    assert (done["epoch"], done["batches"]) == (4, 10)
    fresh = _loader(shard_dir, num_workers)
    fresh.load_state_dict(done)
    assert [_fingerprint(b) for b in fresh] == [_fingerprint(b) for b in _epoch(loader, 5)]


def _epoch(loader, epoch: int) -> list[dict]:
    loader.sampler.set_epoch(epoch)
    return list(loader)


def test_epoch_set_after_the_iterator_is_made(shard_dir: Path) -> None:
    """Lightning makes the first iterator of a fit before it calls ``set_epoch`` (and a reloaded
    loader's too): the pass still reads that epoch; a pass with no new epoch reads the next one."""
    loader = _loader(shard_dir, 0)
    it = iter(loader)
    loader.sampler.set_epoch(2)
    assert [_fingerprint(b) for b in it] == [_fingerprint(b) for b in _epoch(_loader(shard_dir, 0), 2)]
    again = [_fingerprint(b) for b in loader]  # a loader cycled within an epoch
    assert again == [_fingerprint(b) for b in _epoch(_loader(shard_dir, 0), 3)]
    assert loader.state_dict()["epoch"] == 3
