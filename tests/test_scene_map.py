"""The scene map (tasks/heads/scene_map.py): its targets, its two modes, and a generation head using it."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from datamodules import WebDataModule
from multimodal import Backbone, DiffusionTransformer
from tasks import GenerationHead, MultiTaskModule
from tasks.heads.scene_map import SceneMap, centre_tokens, object_bumps

ATTRS = {"colour": 6, "shape": 5, "size": 2}


def _objects(rows: list[list[float]], k: int = 3) -> torch.Tensor:
    """[1, k, 5]: the given rows (x, y, colour, shape, size), padded with -1 rows."""
    out = -torch.ones(1, k, 5)
    out[0, : len(rows)] = torch.tensor(rows)
    return out


def test_bumps_peak_on_each_centre_and_ignore_padding() -> None:
    # a 4 x 4 grid; object at the centre of token (row 1, col 2) = x 2.5/4, y 1.5/4
    objects = _objects([[2.5 / 4, 1.5 / 4, 0, 1, 1], [0.5 / 4, 3.5 / 4, 2, 3, 0]])
    bumps = object_bumps(objects, (4, 4), sigma=1.0)
    assert bumps.shape == (1, 16, 3)
    assert bumps[0, :, 0].argmax() == 1 * 4 + 2 and torch.isclose(bumps[0, 6, 0], torch.tensor(1.0))
    assert bumps[0, :, 1].argmax() == 3 * 4 + 0
    assert torch.isclose(bumps[0, 7, 0], torch.exp(torch.tensor(-0.5)))  # one token to the right
    assert bumps[0, :, 2].abs().sum() == 0  # the padding row
    assert centre_tokens(objects, (4, 4))[0, :2].tolist() == [6, 12]


def test_each_token_is_asked_for_its_nearest_object() -> None:
    """A map that reads back the right attributes where the bumps are scores 1; the loss falls when a
    probe is fitted to states that hold the answer, and only the probe moves."""
    torch.manual_seed(0)
    grid, hidden = (4, 4), 32
    objects = _objects([[0.6, 0.4, 4, 2, 1], [0.1, 0.9, 1, 4, 0]])
    smap = SceneMap(hidden, ATTRS, layer=1, mode="probe")
    # states: a one-hot code of the nearest object's identity, scaled by its bump
    weight, nearest = object_bumps(objects, grid, 1.0).max(-1)
    h = torch.zeros(1, 16, hidden)
    h[0, torch.arange(16), nearest[0]] = 3 * weight[0]
    h[0, :, 10] = 1.0
    states = h.requires_grad_(True)
    opt = torch.optim.Adam(smap.parameters(), lr=0.05)
    losses = []
    for _ in range(150):
        smap._captured = [states]
        loss, logs = smap.loss(objects, grid, torch.tensor([0.1]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.3 * losses[0]
    for name in ATTRS:
        assert float(logs[f"{name}_acc"]) == 1.0 and float(logs[f"{name}_acc_q0"]) == 1.0
        assert f"{name}_acc_q1" not in logs  # no object in that quarter in this batch
    assert states.grad is None  # probe: detached


def test_supervise_trains_the_states_and_capture_reads_the_block() -> None:
    trunk = DiffusionTransformer(in_dim=4, preset="tiny", patch_size=1, text_vocab_size=16)
    smap = SceneMap(trunk.hidden_size, ATTRS, layer=1, mode="supervise")
    x = torch.randn(2, 16, 4)
    ids = torch.randint(0, 16, (2, 3))
    with smap.capture(trunk):
        with torch.no_grad():  # a self-conditioned trunk's first pass: not the one the loss is on
            trunk(x, torch.tensor([10, 900]), "image", cond_ids=ids, grid=(4, 4))
        trunk(x, torch.tensor([10, 900]), "image", cond_ids=ids, grid=(4, 4))
    assert len(smap._captured) == 1 and smap._captured[0].shape == (2, 3 + 16, trunk.hidden_size)
    assert smap._captured[0].requires_grad  # the last pass is kept
    objects = torch.cat([_objects([[0.3, 0.3, 1, 1, 1]]), _objects([[0.7, 0.2, 2, 2, 0]])])
    loss, logs = smap.loss(objects, (4, 4), torch.tensor([0.01, 0.9]))
    loss.backward()
    grad = trunk.blocks[0].adaLN_modulation[1].weight.grad  # (adaLN-zero: the gates' grads are not 0)
    assert grad is not None and grad.abs().sum() > 0  # the trunk learns from the map
    assert trunk.blocks[1].adaLN_modulation[1].weight.grad is None  # blocks past the layer do not
    assert trunk(x, torch.tensor([10, 900]), "image", cond_ids=ids, grid=(4, 4)) is not None
    assert not smap._captured  # outside capture() nothing is kept
    with pytest.raises(RuntimeError, match="did not run inside capture"):
        smap.loss(objects, (4, 4), torch.tensor([0.0, 0.0]))


def test_bad_scene_map_settings_fail_at_start(tokenizer_run: Path) -> None:
    with pytest.raises(ValueError, match="scene_map must be one of"):
        GenerationHead("image", "text", num_classes=3, scene_attributes=ATTRS, scene_map="yes")
    with pytest.raises(ValueError, match="scene_map needs images with scene annotations"):
        GenerationHead("image", "text", num_classes=3, scene_map="probe")
    trunk = DiffusionTransformer(in_dim=16, preset="tiny", text_vocab_size=64)
    with pytest.raises(ValueError, match=f"scene_map_layer=9 but the trunk has {len(trunk.blocks)} blocks"):
        MultiTaskModule(Backbone(tokenizer_ckpt=str(tokenizer_run), trunk=trunk),
                        {"gen": GenerationHead("image", "text", num_classes=3, scene_attributes=ATTRS,
                                               scene_map="supervise", scene_map_layer=9)})


@pytest.mark.parametrize("mode", ["probe", "supervise"])
def test_a_generation_head_with_a_scene_map_fits_and_reports(mode: str, shard_dir: Path, tokenizer_run: Path,
                                                             tmp_path: Path) -> None:
    torch.manual_seed(0)
    backbone = Backbone(tokenizer_ckpt=str(tokenizer_run),
                        trunk=DiffusionTransformer(in_dim=16, preset="tiny", text_vocab_size=64))
    head = GenerationHead("image", "text", num_classes=3, scene_attributes=ATTRS, scene_map=mode,
                          sample_steps=2, eval_samples=4)
    model = MultiTaskModule(backbone, {"gen": head}, warmup_steps=1)
    trainer = L.Trainer(default_root_dir=tmp_path, logger=False, max_steps=3, limit_val_batches=2,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(model, WebDataModule(root=str(shard_dir), keys=["image", "text", "label", "objects"], batch_size=4,
                                     samples_per_epoch=12, vocab_size=40))
    m = trainer.callback_metrics
    for key in ("train/gen/scene_map/loss", "train/gen/scene_map/shape_acc", "val/gen/scene_map/shape_acc",
                "val/gen/scene_map/loss", "val/gen/diffusion_loss"):
        assert key in m and torch.isfinite(m[key]), key
    quarters = [m[f"val/gen/scene_map/colour_acc_q{q}"] for q in range(4) if f"val/gen/scene_map/colour_acc_q{q}" in m]
    assert quarters and all(0.0 <= float(v) <= 1.0 or torch.isnan(v) for v in quarters)
    assert any(k.startswith("gen.scene_map.out") for k in model.heads.state_dict())  # in the checkpoint


def test_object_loss_weight_weighs_the_cells_near_objects_in_training_only(shard_dir: Path, tokenizer_run: Path) -> None:
    with pytest.raises(ValueError, match="object_loss_weight needs images with scene annotations"):
        GenerationHead("image", "text", num_classes=3, object_loss_weight=2.0)
    with pytest.raises(ValueError, match="object_loss_weight must be >= 0 and object_loss_sigma > 0"):
        GenerationHead("image", "text", num_classes=3, scene_attributes=ATTRS, object_loss_weight=1.0,
                       object_loss_sigma=0.0)
    torch.manual_seed(0)
    backbone = Backbone(tokenizer_ckpt=str(tokenizer_run),
                        trunk=DiffusionTransformer(in_dim=16, preset="tiny", text_vocab_size=64))
    head = GenerationHead("image", "text", num_classes=3, scene_attributes=ATTRS, object_loss_weight=3.0,
                          object_loss_sigma=1.0)
    MultiTaskModule(backbone, {"gen": head})
    data = WebDataModule(root=str(shard_dir), keys=["image", "text", "label", "objects"], batch_size=4, vocab_size=40)
    data.setup("fit")
    head.bind_data(data, "gen")
    batch = next(iter(data.train_dataloader()))
    seen: list = []
    original = head.diffusion.training_loss

    def spy(*args, **kwargs):
        seen.append(kwargs.get("loss_weight"))
        return original(*args, **kwargs)

    head.diffusion.training_loss = spy
    head.train()
    head.loss(backbone, batch, 0)
    head.eval()
    head.loss(backbone, batch, 0)
    weight, uniform = seen
    assert uniform is None  # evaluation: the plain mean
    grid = backbone.codec("image").grid_size
    assert weight.shape == (4, grid[0] * grid[1])
    expected = 1 + 3.0 * object_bumps(batch["objects"], grid, 1.0).sum(-1)
    torch.testing.assert_close(weight, expected)
    centres = centre_tokens(batch["objects"][:, :1], grid)[:, 0]  # each scene's first object
    assert bool((weight.gather(1, centres[:, None])[:, 0] > 2.0).all())  # near a centre: weight ~ 1 + 3


@pytest.mark.parametrize("decoded_batch", [None, 2])
def test_judges_learn_from_the_decoded_view_of_the_first_items(decoded_batch, shard_dir: Path,
                                                               tokenizer_run: Path) -> None:
    torch.manual_seed(0)
    backbone = Backbone(tokenizer_ckpt=str(tokenizer_run),
                        trunk=DiffusionTransformer(in_dim=16, preset="tiny", text_vocab_size=64))
    head = GenerationHead("image", "text", num_classes=3, scene_attributes=ATTRS, judge_batch=3,
                          judge_decoded_batch=decoded_batch)
    MultiTaskModule(backbone, {"gen": head})
    data = WebDataModule(root=str(shard_dir), keys=["image", "text", "label", "objects"], batch_size=4, vocab_size=40)
    data.setup("fit")
    head.bind_data(data, "gen")
    batch = next(iter(data.train_dataloader()))
    seen: dict = {}
    classify, scene_loss = head.judge.classify, head.scene_judge.loss

    def spy_classify(x):
        seen["judge"] = x
        return classify(x)

    def spy_scene(x, objects):
        seen["scene"] = (x, objects)
        return scene_loss(x, objects)

    head.judge.classify, head.scene_judge.loss = spy_classify, spy_scene
    loss, logs = head.judges_loss(backbone, batch)
    m = 3 if decoded_batch is None else decoded_batch
    real, decoded = seen["judge"][:3], seen["judge"][3:]
    assert decoded.shape[0] == m  # the first m of the 3 judged items, decoded

    def first(k: int) -> dict:
        return {key: (v[:k] if isinstance(v, (torch.Tensor, list)) else v) for key, v in batch.items()}

    torch.testing.assert_close(real, head.judge_input(backbone, first(3)))
    torch.testing.assert_close(decoded, head._decoded_input(backbone, first(m)))
    x, objects = seen["scene"]
    assert x is seen["judge"] and torch.equal(objects, torch.cat([batch["objects"][:3], batch["objects"][:m]]))
    assert torch.isfinite(loss) and "judge/acc" in logs
    with pytest.raises(ValueError, match="judge_decoded_batch must be >= 1"):
        GenerationHead("image", "text", num_classes=3, judge_decoded_batch=0)
