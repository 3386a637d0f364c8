"""multimodal.callbacks: last.ckpt at the final step whatever ended training; EMA with a decay warm-up."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel

from multimodal.callbacks import EMA, ModelCheckpoint, ema_warmup_avg_fn, ema_warmup_multi_avg_fn


class StopAt(Callback):
    """Stops training after ``step`` optimizer steps, as the ``max_time`` Timer does."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def _fit(tmp_path: Path, checkpoint: Callback, *extra: Callback, **trainer_kwargs) -> tuple[BoringModel, dict]:
    L.seed_everything(0)
    model = BoringModel()
    kwargs = dict(max_steps=7, limit_val_batches=1, val_check_interval=4, check_val_every_n_epoch=None)
    kwargs.update(trainer_kwargs)
    trainer = L.Trainer(default_root_dir=tmp_path, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[checkpoint, *extra], **kwargs)
    trainer.fit(model)
    return model, torch.load(tmp_path / "ckpts" / "last.ckpt", weights_only=True)


@pytest.mark.parametrize("save_last", [True, "link"])
@pytest.mark.parametrize("end", ["max_steps", "stop", "max_epochs"])
def test_last_checkpoint_is_the_final_step(tmp_path: Path, end: str, save_last: bool | str) -> None:
    extra = [StopAt(5)] if end == "stop" else []
    kwargs = {"max_steps": -1, "max_epochs": 2, "limit_train_batches": 3} if end == "max_epochs" else {}
    expected = {"max_steps": 7, "stop": 5, "max_epochs": 6}[end]
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpts", save_last=save_last, every_n_train_steps=4, save_top_k=-1)
    model, saved = _fit(tmp_path, ckpt, *extra, **kwargs)
    assert saved["global_step"] == expected
    for name, value in model.state_dict().items():
        assert torch.equal(saved["state_dict"][name], value), name
    folder = tmp_path / "ckpts"
    assert list(folder.glob("epoch=*-step=4.ckpt"))  # the periodic checkpoints still happen
    last = folder / "last.ckpt"
    assert last.is_symlink() == (save_last == "link")
    if save_last == "link":  # a link to a step checkpoint of the final step, not a second copy
        assert last.resolve().name.endswith(f"step={expected}.ckpt")
    assert not list(folder.glob("*.partial")) and not list(folder.glob("*.link-*"))  # nothing half-written left


def test_resume_last_takes_the_newest_complete_checkpoint_of_the_run(tmp_path: Path) -> None:
    """A kill after step 8's checkpoint but before last.ckpt was re-linked (here: the link put back
    to step 4 by hand) and a resumed run in a new version folder still continue from step 8."""

    def trainer(steps: int) -> L.Trainer:
        ckpt = ModelCheckpoint(save_last="link", every_n_train_steps=4, save_top_k=-1)
        return L.Trainer(default_root_dir=tmp_path, max_steps=steps, limit_val_batches=0, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[ckpt])

    L.seed_everything(0)
    trainer(8).fit(BoringModel())
    folder = next(tmp_path.rglob("checkpoints"))
    last = folder / "last.ckpt"
    assert last.resolve().name == "epoch=0-step=8.ckpt"
    last.unlink()
    last.symlink_to("epoch=0-step=4.ckpt")  # what a kill between the two writes used to leave behind
    (folder / "epoch=0-step=12.ckpt.partial").write_bytes(b"half a checkpoint")  # a save cut short: ignored
    resumed = trainer(10)
    resumed.fit(BoringModel(), ckpt_path="last")
    assert resumed.ckpt_path is not None and resumed.ckpt_path.endswith("step=8.ckpt")
    assert resumed.global_step == 10


def test_lightning_checkpoint_alone_keeps_a_stale_last(tmp_path: Path) -> None:
    """Why the subclass exists: the stock callback's last.ckpt stays at the last periodic step."""
    ckpt = LightningModelCheckpoint(dirpath=tmp_path / "ckpts", save_last=True, every_n_train_steps=4, save_top_k=-1)
    _, saved = _fit(tmp_path, ckpt)
    assert saved["global_step"] == 4


def test_final_checkpoint_with_ema_keeps_the_raw_weights(tmp_path: Path) -> None:
    """With EMA the final last.ckpt has the average as state_dict and the RAW final weights as
    current_model_state (saved before the average is copied into the model at train end)."""
    plain = ModelCheckpoint(dirpath=tmp_path / "a" / "ckpts", save_last=True, every_n_train_steps=4)
    raw_model, _ = _fit(tmp_path / "a", plain, StopAt(6))
    ckpt = ModelCheckpoint(dirpath=tmp_path / "b" / "ckpts", save_last=True, every_n_train_steps=4)
    ema_model, saved = _fit(tmp_path / "b", ckpt, StopAt(6), EMA(decay=0.9))
    assert saved["global_step"] == 6
    for name, value in raw_model.state_dict().items():
        assert torch.allclose(saved["current_model_state"][name], value), name  # raw weights kept
        assert torch.equal(saved["state_dict"][name], ema_model.state_dict()[name]), name  # model holds the average
        assert not torch.allclose(saved["state_dict"][name], value), name


def test_ema_warmup_decay() -> None:
    avg = ema_warmup_avg_fn(0.999)
    a, c = torch.zeros(3), torch.ones(3)
    # after n updates the decay is min(0.999, (1 + n) / (10 + n))
    assert torch.allclose(avg(a, c, torch.tensor(0)), torch.full((3,), 0.9))
    assert torch.allclose(avg(a, c, torch.tensor(8)), torch.full((3,), 0.5))
    assert torch.allclose(avg(a, c, torch.tensor(10_000)), torch.full((3,), 0.001))
    with pytest.raises(ValueError, match="decay"):
        ema_warmup_avg_fn(1.5)
    # the foreach form (what EMA uses) is the same average over a list of tensors at once
    multi = ema_warmup_multi_avg_fn(0.999)
    for n in (0, 8, 10_000):
        averaged = [torch.zeros(3), torch.full((2, 2), 2.0)]
        current = [torch.ones(3), torch.full((2, 2), -1.0)]
        want = [avg(a, c, torch.tensor(n)) for a, c in zip(averaged, current)]
        multi(averaged, current, torch.tensor(n))
        for got, w in zip(averaged, want):
            assert torch.allclose(got, w, atol=1e-6)


def test_ema_tracks_a_short_run(tmp_path: Path) -> None:
    """With warm-up the average of a short run is close to the final weights; without, it is not."""
    results = {}
    for warmup in (True, False):
        ckpt = ModelCheckpoint(dirpath=tmp_path / str(warmup) / "ckpts", save_last=True)
        _, saved = _fit(tmp_path / str(warmup), ckpt, EMA(decay=0.995, warmup=warmup), max_steps=30)
        raw, avg = saved["current_model_state"], saved["state_dict"]
        results[warmup] = sum(float((raw[k] - avg[k]).norm()) for k in raw)
    assert results[True] < 0.5 * results[False]


class Recorder(BoringModel):
    """Records its weights at its own on_validation_epoch_end (where heads compute epoch-end metrics)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self.seen.append(self.layer.weight.detach().clone())


def test_ema_weights_stay_in_for_the_module_epoch_end(tmp_path: Path) -> None:
    L.seed_everything(0)
    model, ema = Recorder(), EMA(decay=0.9)
    trainer = L.Trainer(default_root_dir=tmp_path, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        max_steps=6, limit_val_batches=1, val_check_interval=3, check_val_every_n_epoch=None,
                        callbacks=[ema], enable_checkpointing=False, num_sanity_val_steps=0)
    trainer.fit(model)
    assert len(model.seen) == 2
    # the module's epoch-end saw the AVERAGE; after validation, training went on from the raw weights
    averaged = ema._average_model.module.layer.weight.detach()
    assert torch.allclose(model.seen[-1], averaged)
    assert torch.equal(model.layer.weight.detach(), averaged)  # on_train_end copies the average in
    assert not torch.allclose(model.seen[0], model.seen[1])
