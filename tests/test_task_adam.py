"""Per-task AdamW (``shared_adam: per_task``): the recorded per-task gradients, the update rule, its
state, and the module's checks."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from tasks import MultiTaskModule
from tasks.task_adam import TaskAdamW, TaskGradients
from tests.test_multitask import _data, _model


def _nets(seed: int = 0) -> tuple[nn.Module, nn.ModuleDict]:
    torch.manual_seed(seed)
    trunk = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8))
    heads = nn.ModuleDict({"a": nn.Linear(8, 1), "b": nn.Linear(8, 3)})
    return trunk, heads


def _loss(task: str, trunk: nn.Module, heads: nn.ModuleDict, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    h = trunk(x)
    if task == "b":  # a different path through the same weights, used twice
        h = torch.tanh(h) + trunk(x * 0.5)
    return heads[task](h).pow(2).mean() * scale


def test_capture_records_each_tasks_gradient_and_restores_parameters() -> None:
    trunk, heads = _nets()
    ref = copy.deepcopy(trunk)
    x = torch.randn(16, 4)
    taps = TaskGradients([trunk], ["a", "b"])
    with taps.capture("a"):
        la = _loss("a", trunk, heads, x)
    with taps.capture("b"):
        lb = _loss("b", trunk, heads, x, scale=7.0)
    assert all(type(p) is nn.Parameter for p in trunk.parameters())  # swapped back after each block
    (la + lb).backward()
    ga = torch.autograd.grad(_loss("a", ref, heads, x), list(ref.parameters()))
    gb = torch.autograd.grad(_loss("b", ref, heads, x, scale=7.0), list(ref.parameters()))
    for p, a, b in zip(trunk.parameters(), ga, gb):
        assert torch.allclose(taps.grads["a"][p], a, atol=1e-6)
        assert torch.allclose(taps.grads["b"][p], b, atol=1e-6)
        assert torch.allclose(p.grad, a + b, atol=1e-5)  # p.grad still holds the sum (DDP, logging)
    # zero_grad forgets recorded gradients too (a skipped step leaves none behind)
    opt = TaskAdamW(list(trunk.parameters()), taps)
    opt.zero_grad()
    assert not taps.grads["a"] and not taps.grads["b"]
    # an exception inside the block still restores the parameters
    with pytest.raises(RuntimeError), taps.capture("a"):
        raise RuntimeError("boom")
    assert all(type(p) is nn.Parameter for p in trunk.parameters())


def test_one_task_is_exactly_adamw() -> None:
    trunk, heads = _nets()
    t2, h2 = copy.deepcopy(trunk), copy.deepcopy(heads)
    taps = TaskGradients([trunk], ["a"])
    groups = [{"params": list(trunk.parameters()), "lr": 3e-3}, {"params": list(heads.parameters())}]
    opt = TaskAdamW(groups, taps, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)
    ref = torch.optim.AdamW([{"params": list(t2.parameters()), "lr": 3e-3}, {"params": list(h2.parameters())}],
                            lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)
    for step in range(6):
        x = torch.randn(16, 4, generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        with taps.capture("a"):
            loss = _loss("a", trunk, heads, x)
        loss.backward()
        opt.step()
        ref.zero_grad()
        _loss("a", t2, h2, x).backward()
        ref.step()
    for p, q in zip([*trunk.parameters(), *heads.parameters()], [*t2.parameters(), *h2.parameters()]):
        assert torch.allclose(p, q, atol=1e-6)


def test_update_is_the_sum_of_per_task_adamw_updates_and_ignores_loss_scale() -> None:
    x = torch.randn(16, 4)

    def one_step(scale_b: float, weights: dict[str, float] | None = None) -> list[torch.Tensor]:
        trunk, heads = _nets()
        taps = TaskGradients([trunk], ["a", "b"])
        opt = TaskAdamW([{"params": list(trunk.parameters())}], taps, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.0,
                        task_weights=weights)
        with taps.capture("a"):
            la = _loss("a", trunk, heads, x)
        with taps.capture("b"):
            lb = _loss("b", trunk, heads, x, scale=scale_b)
        (la + lb).backward()
        opt.step()
        return [p.detach().clone() for p in trunk.parameters()]

    trunk, heads = _nets()
    ga = torch.autograd.grad(_loss("a", trunk, heads, x), list(trunk.parameters()))
    gb = torch.autograd.grad(_loss("b", trunk, heads, x), list(trunk.parameters()))
    # Adam's first step moves each coordinate by lr * sign(g) (|g| >> eps): one such step per task
    expected = [p - 1e-2 * (a.sign() + b.sign()) for p, a, b in zip(trunk.parameters(), ga, gb)]
    for got, want in zip(one_step(1.0), expected):
        assert torch.allclose(got, want, atol=1e-5)
    for a, b in zip(one_step(1.0), one_step(1000.0)):  # a task's loss scale does not change its share
        assert torch.allclose(a, b, atol=1e-5)
    # a task weight scales that task's step
    weighted = [p - 1e-2 * (a.sign() + 0.25 * b.sign()) for p, a, b in zip(trunk.parameters(), ga, gb)]
    for got, want in zip(one_step(1.0, {"b": 0.25}), weighted):
        assert torch.allclose(got, want, atol=1e-5)


def test_fused_step_equals_the_loop() -> None:
    """The fused kernel path (one call per task) and the per-parameter loop are the same update rule."""
    results = {}
    for fused in (True, False):
        trunk, heads = _nets()
        taps = TaskGradients([trunk], ["a", "b"])
        opt = TaskAdamW([{"params": list(trunk.parameters()), "lr": 3e-3}, {"params": list(heads.parameters())}], taps,
                        lr=1e-2, betas=(0.9, 0.99), weight_decay=0.05, task_weights={"b": 0.25}, fused=fused)
        for step in range(4):
            x = torch.randn(8, 4, generator=torch.Generator().manual_seed(step))
            opt.zero_grad()
            loss = 0
            for task in ("a", "b") if step != 2 else ("b",):  # a step where one task is absent
                with taps.capture(task):
                    loss = loss + _loss(task, trunk, heads, x)
            loss.backward()
            opt.step()
        results[fused] = [p.detach().clone() for p in [*trunk.parameters(), *heads.parameters()]]
        assert opt.state[next(trunk.parameters())]["tasks"]["a"]["step"] == 3
    for p, q in zip(results[True], results[False]):
        assert torch.allclose(p, q, atol=1e-6)
    assert any(not torch.equal(p, q) for p, q in zip(results[True], _nets()[0].parameters()))


def test_state_resumes_exactly() -> None:
    def run(steps: int, state: dict | None = None, weights: dict | None = None) -> tuple[nn.Module, TaskAdamW]:
        trunk, heads = _nets()
        if weights is not None:
            trunk.load_state_dict(weights["trunk"])
            heads.load_state_dict(weights["heads"])
        taps = TaskGradients([trunk], ["a", "b"])
        opt = TaskAdamW([{"params": list(trunk.parameters())}, {"params": list(heads.parameters())}], taps,
                        lr=1e-2, betas=(0.9, 0.99), weight_decay=0.01)
        if state is not None:
            opt.load_state_dict(state)
        start = 0 if state is None else 3
        for step in range(start, start + steps):
            x = torch.randn(8, 4, generator=torch.Generator().manual_seed(step))
            opt.zero_grad()
            loss = 0
            for task in ("a", "b"):
                with taps.capture(task):
                    loss = loss + _loss(task, trunk, heads, x)
            loss.backward()
            opt.step()
        return nn.ModuleDict({"trunk": trunk, "heads": heads}), opt

    full, _ = run(5)
    first, opt = run(3)
    saved = copy.deepcopy(opt.state_dict())
    assert set(saved["state"][0]["tasks"]) == {"a", "b"}  # per-task moments of a shared weight
    resumed, _ = run(2, saved, {k: v.state_dict() for k, v in first.items()})
    for p, q in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_module_per_task_fit_and_checks(shard_dir: Path, tokenizer_run: Path, tmp_path: Path) -> None:
    model = _model(tokenizer_run, shared_adam="per_task", lr=1e-3)
    trainer = L.Trainer(max_steps=2, limit_val_batches=0, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0)
    before = {k: v.detach().clone() for k, v in model.backbone.trunk.state_dict().items()}
    trainer.fit(model, _data(shard_dir))
    opt = trainer.optimizers[0].optimizer if hasattr(trainer.optimizers[0], "optimizer") else trainer.optimizers[0]
    assert isinstance(opt, TaskAdamW)
    assert opt.task_weights == {"gen": 1.0, "cls": 1.0}
    blocks = model.backbone.trunk.blocks[0].attn.qkv.weight
    assert set(opt.state[blocks]["tasks"]) == {"gen", "cls"}  # both tasks reached the shared blocks
    assert opt.state[blocks]["tasks"]["gen"]["step"] == 2
    assert any(not torch.equal(before[k], v) for k, v in model.backbone.trunk.state_dict().items())
    assert all(type(p) is nn.Parameter for p in model.parameters())

    with pytest.raises(ValueError, match="shared_adam must be 'joint' or 'per_task'"):
        _model(tokenizer_run, shared_adam="pcgrad")
    with pytest.raises(ValueError, match="gradient checkpointing"):
        m = _model(tokenizer_run)
        m.backbone.trunk.grad_checkpointing = True
        MultiTaskModule(m.backbone, dict(m.heads), shared_adam="per_task")
    clipped = L.Trainer(max_steps=1, gradient_clip_val=1.0, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0)
    with pytest.raises(ValueError, match="gradient_clip_val"):
        clipped.fit(_model(tokenizer_run, shared_adam="per_task"), _data(shard_dir))
