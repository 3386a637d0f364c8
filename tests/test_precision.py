"""Speed settings chosen from the hardware: the precision, the CPU attention path, the allocator, and
the progress bar that suits stdout."""

from __future__ import annotations

import io
import platform
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.demos.boring_classes import BoringModel

from multimodal import allocator, attention, precision
from multimodal.cli import build_cli
from multimodal.progress import LineProgressBar, default_progress_bar
from tests.tiny import write_tiny_config


@pytest.fixture
def cpu_flags(monkeypatch: pytest.MonkeyPatch):
    """Set the CPU's bf16 flags as /proc/cpuinfo would report them."""

    def use(flags: tuple[str, ...]) -> None:
        monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: flags)
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True, raising=False)

    return use


def test_unset_precision_follows_the_cpu(cpu_flags) -> None:
    cpu_flags(("avx512_bf16",))
    chosen, why = precision.resolve_precision(None, "cpu")
    assert chosen == "bf16-mixed" and "avx512_bf16" in why and "trainer.precision" in why
    cpu_flags(())
    chosen, why = precision.resolve_precision(None, "cpu")
    assert chosen == "32-true" and "no native bf16" in why
    assert precision.resolve_precision("32", "cpu")[0] == "32"  # an explicit choice is kept
    assert precision.resolve_precision("16-mixed", "cpu")[0] == "16-mixed"


def test_bf16_without_native_support_is_refused_at_start(cpu_flags, shard_dir: Path, tmp_path: Path) -> None:
    cpu_flags(())
    with pytest.raises(ValueError, match="trainer.precision=bf16-mixed asks for bf16.*--trainer.precision 32"):
        precision.resolve_precision("bf16-mixed", "cpu")
    config = write_tiny_config("tokenizer.yaml", shard_dir, tmp_path / "run")
    with pytest.raises(ValueError, match="asks for bf16"):
        build_cli(["--config", str(config), "--trainer.precision", "bf16-mixed", "--trainer.accelerator", "cpu"],
                  run=False)
    cli = build_cli(["--config", str(config), "--trainer.accelerator", "cpu"], run=False)
    assert cli.trainer.precision == "32-true"  # unset: the hardware's choice
    cpu_flags(("amx_bf16",))
    cli = build_cli(["--config", str(config), "--trainer.accelerator", "cpu"], run=False)
    assert cli.trainer.precision == "bf16-mixed"


def test_real_cpu_flags_are_read() -> None:
    flags = precision.cpu_bf16_flags.__wrapped__()
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    assert ("avx512_bf16" in flags) == (" avx512_bf16" in text)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_explicit_attention_matches_sdpa(causal: bool, masked: bool) -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 9, 16) for _ in range(3))
    mask = (torch.rand(2, 1, 1, 9) > 0.3) | (torch.arange(9) == 0) if masked and not causal else None
    reference = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    assert torch.equal(attention.attention(q, k, v, mask, is_causal=causal), reference)  # fp32: SDPA itself
    qb, kb, vb = (t.bfloat16() for t in (q, k, v))
    assert attention.uses_explicit(qb)
    explicit = attention.attention(qb, kb, vb, mask, is_causal=causal).float()
    flash = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, is_causal=causal).float()
    # both round to bf16 along the way: the explicit path is as close to fp32 as torch's bf16 kernel
    assert (explicit - reference).abs().max() <= 2 * (flash - reference).abs().max() + 1e-2
    # and it has a gradient like SDPA's
    qg = qb.clone().requires_grad_()
    attention.attention(qg, kb, vb, mask, is_causal=causal).float().sum().backward()
    assert qg.grad is not None and torch.isfinite(qg.grad).all()


def test_allocator_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(allocator, "_tuned", None)
    monkeypatch.setenv("MULTIMODAL_MALLOC", "default")
    assert allocator.tune_allocator() is False
    monkeypatch.setattr(allocator, "_tuned", None)
    monkeypatch.delenv("MULTIMODAL_MALLOC")
    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert allocator.tune_allocator() is glibc


def test_line_progress_bar_prints_one_line_per_update(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert isinstance(default_progress_bar(io.StringIO()), LineProgressBar)  # not a terminal

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert isinstance(default_progress_bar(Tty()), TQDMProgressBar)
    trainer = L.Trainer(default_root_dir=tmp_path, max_steps=6, limit_val_batches=2, val_check_interval=3,
                        logger=False, enable_checkpointing=False, enable_model_summary=False,
                        callbacks=[LineProgressBar(every_seconds=0.0)])
    trainer.fit(BoringModel())
    trainer.test(BoringModel(), verbose=False)
    out = capsys.readouterr().out.splitlines()
    fit = [line for line in out if line.startswith("fit")]
    assert len(fit) == 6 and fit[0].split()[:3] == ["fit", "step", "1/6"] and "100%" in fit[-1]
    assert "\r" not in "".join(out)  # plain lines, no carriage-return redraws
    assert any(line.startswith("validate") and "2/2" in line for line in out)
    assert any(line.startswith("test") for line in out)


def test_compiled_trunk_records_the_same_per_task_gradients(tokenizer_run: Path) -> None:
    """``model.compile``: the trunk's blocks compiled in place give the eager per-task gradients
    (shared_adam='per_task' swaps the parameters for taps around the compiled blocks)."""
    from tasks.task_adam import TaskGradients
    from tests.test_multitask import _model

    torch.manual_seed(0)
    x = torch.randn(4, 16, 16)
    t, y = torch.randint(0, 1000, (4,)), torch.randint(0, 3, (4,))
    grads = {}
    for compiled in (False, True):
        model = _model(tokenizer_run, shared_adam="per_task", compile=compiled)
        trunk = model.backbone.trunk
        for p in trunk.parameters():
            torch.manual_seed(p.numel())
            p.data.normal_(0.0, 0.05)
        model.configure_model()
        assert model._compiled is compiled
        taps = TaskGradients([trunk], ["a", "b"])
        loss = 0
        for task, scale in (("a", 1.0), ("b", 3.0)):
            with taps.capture(task):
                loss = loss + scale * trunk(x * scale, t, "image", y=y, drop_condition=False).square().mean()
        loss.backward()
        grads[compiled] = {task: [taps.grads[task].get(p) for p in taps.params] for task in ("a", "b")}
    for task in ("a", "b"):
        assert sum(g is not None for g in grads[True][task]) > 10  # the blocks' weights were reached
        for eager, comp in zip(grads[False][task], grads[True][task]):
            assert (eager is None) == (comp is None)
            if eager is not None:
                assert torch.allclose(eager, comp, rtol=1e-4, atol=1e-6)


class _Losses(L.Callback):
    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.values.append(float(outputs["loss"]))


def test_bf16_loss_curve_follows_fp32(shard_dir: Path, tokenizer_run: Path, tmp_path: Path) -> None:
    """A tiny two-head recipe (generation + classification, 20 steps, same seed and data) under bf16
    autocast stays within 1 % of the fp32 loss on average and 2 % at every step (measured: 0.008 % and
    0.03 %), differs from it (bf16 did run), and both learn."""
    from tests.test_multitask import _data, _model

    curves = {}
    for prec in ("32-true", "bf16-mixed"):
        L.seed_everything(0)
        model = _model(tokenizer_run, lr=3e-3)
        losses = _Losses()
        trainer = L.Trainer(max_steps=20, limit_val_batches=0, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                            num_sanity_val_steps=0, precision=prec, callbacks=[losses])
        trainer.fit(model, _data(shard_dir))
        curves[prec] = torch.tensor(losses.values)
    fp32, bf16 = curves["32-true"], curves["bf16-mixed"]
    rel = (bf16 - fp32).abs() / fp32.abs()
    assert rel.mean() < 0.01 and rel.max() < 0.02, rel
    assert rel.max() > 0  # not the same numbers: the bf16 run did compute in bf16
    assert fp32[-5:].mean() < fp32[:5].mean() and bf16[-5:].mean() < bf16[:5].mean()


def test_metrics_are_fed_in_float32_under_bf16_autocast() -> None:
    """SSIM of bf16 images computed in bf16 is not even bounded by 1; update_fp32 computes it in fp32."""
    from torchmetrics.image import StructuralSimilarityIndexMeasure

    from tasks.metrics import update_fp32

    torch.manual_seed(0)
    target = torch.rand(4, 3, 32, 32) * 2 - 1
    rec = (target + 0.05 * torch.randn_like(target)).clamp(-1, 1)
    reference = StructuralSimilarityIndexMeasure(data_range=2.0)
    reference.update(rec.bfloat16().float(), target.bfloat16().float())
    fed = StructuralSimilarityIndexMeasure(data_range=2.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        update_fp32(fed, rec.bfloat16(), target.bfloat16())
    assert float(fed.compute()) <= 1.0
    assert torch.allclose(fed.compute(), reference.compute(), atol=1e-6)
