"""Understanding heads on the trunk's features: classification (image/audio) and speech recognition (CTC)."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from multimodal import Backbone, DiffusionTransformer
from multimodal.cli import main
from tasks import ClassificationHead, MultiTaskModule, SpeechHead
from tasks.heads.classification import confusion_image
from tasks.heads.speech import ctc_greedy_decode, ctc_min_length, ctc_prefix_beam_search
from tests.tiny import tiny_config


# ------------------------------------------------------------------------------------ CTC decoding
def _table(probs: list[list[float]]) -> torch.Tensor:
    return torch.tensor(probs).log()


def _brute_force(log_probs: torch.Tensor) -> dict[tuple[int, ...], float]:
    """Probability of every labelling: the sum over all paths that collapse to it."""
    T, V = log_probs.shape
    out: dict[tuple[int, ...], float] = {}
    for path in itertools.product(range(V), repeat=T):
        labels = tuple(s for i, s in enumerate(path) if s != 0 and (i == 0 or s != path[i - 1]))
        out[labels] = out.get(labels, 0.0) + math.exp(sum(float(log_probs[t, s]) for t, s in enumerate(path)))
    return out


def test_beam_search_sums_paths_where_greedy_picks_one() -> None:
    # blank 0.6 / "a" 0.4 at both positions: the best PATH is blank-blank ("" with 0.36), but "a"
    # collects three paths (a-a, a-blank, blank-a: 0.16 + 0.24 + 0.24 = 0.64)
    lp = _table([[0.6, 0.4], [0.6, 0.4]])
    assert ctc_greedy_decode(lp) == [[]]
    ids, score = ctc_prefix_beam_search(lp, beam_size=4)
    assert ids == [1] and score == pytest.approx(math.log(0.64), abs=1e-6)
    assert ctc_prefix_beam_search(lp, beam_size=1)[0] == []  # a beam of one keeps only "" after the first position


def test_greedy_collapses_repeats_and_drops_blanks_within_lengths() -> None:
    # paths: a a - a b b | padding ; and  - b b - - -
    best = torch.tensor([[1, 1, 0, 1, 2, 2, 1, 1], [0, 2, 2, 0, 0, 0, 1, 1]])
    lp = torch.nn.functional.one_hot(best, 3).float().clamp(min=1e-3).log()
    assert ctc_greedy_decode(lp, torch.tensor([6, 6])) == [[1, 1, 2], [2]]
    assert ctc_min_length([1, 1, 2]) == 4 and ctc_min_length([]) == 0


def test_beam_search_finds_the_most_probable_labelling() -> None:
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        lp = torch.randn(4, 3, generator=gen).mul(1.5).log_softmax(-1)
        exact = _brute_force(lp)
        best = max(exact, key=exact.get)
        ids, score = ctc_prefix_beam_search(lp, beam_size=64)  # larger than the number of prefixes: exact
        assert tuple(ids) == best and score == pytest.approx(math.log(exact[best]), abs=1e-5)
        assert ctc_prefix_beam_search(lp, beam_size=3, top_k=2)[0] is not None  # pruned search runs
    with pytest.raises(ValueError, match="beam_size"):
        ctc_prefix_beam_search(lp, beam_size=0)


# ------------------------------------------------------------------------------------ heads directly
def _backbone(tokenizer_run: Path) -> Backbone:
    return Backbone(tokenizer_ckpt=str(tokenizer_run), trunk=DiffusionTransformer(in_dim=16, preset="tiny"))


def test_labels_outside_the_classes_are_counted_not_fatal(tokenizer_run: Path) -> None:
    backbone = _backbone(tokenizer_run)
    head = ClassificationHead("image", num_classes=3, trunk_hidden=64, pooling="mean")
    MultiTaskModule(backbone, {"cls": head})
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    loss, logs = head.loss(backbone, {"image": images, "label": torch.tensor([0, 5, -1, 2])}, step=0)
    assert torch.isfinite(loss) and float(logs["skipped/bad_label"]) == 2
    loss.backward()
    loss, logs = head.loss(backbone, {"image": images[:2], "label": torch.tensor([3, 7])}, step=0)
    assert float(loss.detach()) == 0.0 and loss.requires_grad and float(logs["skipped/bad_label"]) == 2
    metrics = head.build_metrics(backbone)
    assert set(metrics) == {"acc", "f1_macro", "confusion_matrix"}  # no top-5 with 3 classes
    head.eval()
    logs = head.evaluate(backbone, {"image": images, "label": torch.tensor([0, 5, 1, 9])}, metrics)
    assert float(logs["skipped/bad_label"]) == 2
    head.evaluate_end(backbone, metrics)
    assert int(head.last_confusion.sum()) == 2 and not metrics["confusion_matrix"].update_called
    assert head.last_confusion_image.shape[0] == 3 and 0 <= float(head.last_confusion_image.min())
    assert "acc_top5" in ClassificationHead("image", num_classes=10, trunk_hidden=64).build_metrics(backbone)
    records = head.predict(backbone, {"__key__": ["a", "b"], "image": images[:2], "label": torch.tensor([1, 2])})
    assert [r["label"] for r in records] == [1, 2] and all(len(r["probs"]) == 3 and 0 <= r["pred"] < 3 for r in records)
    assert confusion_image(torch.tensor([[2, 0], [1, 1]])).shape == (3, 256, 256)


def test_speech_head_counts_empty_and_unalignable_transcripts(tokenizer_run: Path) -> None:
    backbone = _backbone(tokenizer_run)
    head = SpeechHead("chars", trunk_hidden=64, upsample=2, layers=1, beam_size=2, max_length=12)
    MultiTaskModule(backbone, {"asr": head})
    # 4000 samples = 7 tokens = 14 positions after upsampling
    batch = {"audio": torch.randn(4, 4000) * 0.1, "audio_lengths": torch.tensor([4000, 4000, 4000, 2000]),
             "text": ["", "go", "a transcript far too long", "off"], "__key__": list("abcd")}
    loss, logs = head.loss(backbone, batch, step=0)
    assert torch.isfinite(loss) and loss.requires_grad
    assert float(logs["skipped/empty_text"]) == 1 and float(logs["truncated_text"]) == 1
    assert float(logs["skipped/too_long_for_ctc"]) == 0  # truncated to 10 chars: fits 14 positions
    batch["text"] = ["", "go", "off", "aaaaaaa"]  # 7 tokens x 2 = 14 positions; 7 equal letters need 13, fits
    batch["audio_lengths"] = torch.tensor([4000, 4000, 4000, 1000])  # ... but 2 tokens = 4 positions do not
    _, logs = head.loss(backbone, batch, step=0)
    assert float(logs["skipped/too_long_for_ctc"]) == 1
    loss, logs = head.loss(backbone, {**batch, "text": ["", "", "", ""]}, step=0)
    assert float(loss.detach()) == 0.0 and float(logs["skipped/empty_text"]) == 4
    metrics = head.build_metrics(backbone)
    head.eval()
    head.evaluate(backbone, batch, metrics)
    assert 0.0 <= float(metrics["cer"].compute())
    records = head.predict(backbone, batch)
    assert [r["reference"] for r in records] == batch["text"] and all(isinstance(r["transcript"], str) for r in records)


def test_bad_settings_fail_at_construction(tokenizer_run: Path) -> None:
    with pytest.raises(ValueError, match="pooling must be one of"):
        ClassificationHead("image", num_classes=3, trunk_hidden=64, pooling="max")
    with pytest.raises(ValueError, match="set trunk_hidden"):
        ClassificationHead("image", num_classes=3)
    with pytest.raises(ValueError, match="modality must be one of"):
        ClassificationHead("video", num_classes=3, trunk_hidden=64)
    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        ClassificationHead("audio", num_classes=1, trunk_hidden=64)
    with pytest.raises(ValueError, match="features source"):
        ClassificationHead("image", num_classes=3, trunk_hidden=64, source="raw")
    with pytest.raises(ValueError, match="upsample >= 1"):
        SpeechHead("chars", trunk_hidden=64, upsample=0)
    with pytest.raises(ValueError, match="layer_heads=3 must divide"):
        SpeechHead("chars", trunk_hidden=64, layer_heads=3)
    with pytest.raises(ValueError, match="text vocabulary must be one of"):
        SpeechHead("bytes", trunk_hidden=64)
    backbone = _backbone(tokenizer_run)
    with pytest.raises(ValueError, match="trunk_hidden=256 does not match model.backbone.trunk hidden_size=64"):
        MultiTaskModule(backbone, {"cls": ClassificationHead("image", num_classes=3, trunk_hidden=256)})
    with pytest.raises(ValueError, match="trunk_hidden=32 does not match"):
        MultiTaskModule(backbone, {"asr": SpeechHead("chars", trunk_hidden=32)})
    with pytest.raises(ValueError, match="set model.backbone.trunk"):
        MultiTaskModule(Backbone(tokenizer_ckpt=str(tokenizer_run)), {"cls": ClassificationHead("audio", 3, 64)})
    with pytest.raises(ValueError, match="text_vocab_size"):
        MultiTaskModule(backbone, {"cls": ClassificationHead("text", 3, 64)})


# ------------------------------------------------------------------------------------ recipes through the CLI
@pytest.mark.parametrize("name, task, metric, fields", [
    ("classify_digits.yaml", "digits", "acc", {"__key__", "pred", "probs", "label"}),
    ("classify_spoken.yaml", "spoken", "f1_macro", {"__key__", "pred", "probs", "label"}),
    ("transcribe_spoken.yaml", "spoken", "wer", {"__key__", "transcript", "reference"}),
])
def test_recipes_fit_test_and_predict(name: str, task: str, metric: str, fields: set[str], shard_dir: Path,
                                      tokenizer_run: Path, tmp_path: Path) -> None:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(tiny_config(name, shard_dir, tmp_path / "run", tokenizer_run)))
    main(["fit", "--config", str(path)])
    ckpt = next((tmp_path / "run").rglob("last.ckpt"))
    main(["test", "--config", str(path), f"--ckpt_path={ckpt}"])
    report = json.loads(next((tmp_path / "run").rglob("test_metrics.json")).read_text())
    assert f"test/{task}/{metric}" in report and f"test/{task}/loss" in report, sorted(report)
    if "transcribe" in name:
        assert 0.0 <= report[f"test/{task}/cer"] and f"test/{task}/skipped/too_long_for_ctc" in report
    else:
        assert 0.0 <= report[f"test/{task}/acc"] <= 1.0 and f"test/{task}/confusion_matrix" not in report
    main(["predict", "--config", str(path), f"--ckpt_path={ckpt}"])
    jsonl = next((tmp_path / "run").rglob(f"predictions/{task}.jsonl"))
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert len(records) >= 4 and all(set(r) == fields for r in records)
    assert len({r["__key__"] for r in records}) == len(records)
    if "classify" in name:
        assert all(0 <= r["pred"] < 3 and abs(sum(r["probs"]) - 1) < 1e-2 for r in records)
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        tags: set[str] = set()
        for event_file in (tmp_path / "run").rglob("events.out.tfevents.*"):
            acc = EventAccumulator(str(event_file), size_guidance={"images": 0})
            acc.Reload()
            tags |= set(acc.Tags()["images"])
        assert f"val/{task}/confusion_matrix" in tags, tags


def test_feature_norm_standardises_real_tokens_only() -> None:
    from tasks.heads.features import FeatureNorm

    torch.manual_seed(0)
    norm = FeatureNorm(8)
    h = torch.randn(3, 5, 8) * 4.0 + torch.linspace(-20, 20, 8)  # a large per-channel offset
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]], dtype=torch.bool)
    out = norm(h, mask)
    real = out[mask]
    assert torch.allclose(real.mean(0), torch.zeros(8), atol=1e-5)
    assert torch.allclose(real.var(0, unbiased=False), torch.ones(8), atol=1e-3)
    assert torch.equal(out[~mask], torch.zeros_like(out[~mask]))  # padding stays 0
    # the padded values never reach the statistics
    h2 = h.clone()
    h2[~mask] = 1e6
    assert torch.allclose(norm(h2, mask)[mask], real, atol=1e-5)
    # evaluation uses the running statistics; a one-token training batch does not crash
    norm.eval()
    assert not torch.allclose(norm(h, mask)[mask], real)
    norm.train()
    assert norm(h[:1, :1], None).shape == (1, 1, 8)


def test_feature_norm_setting_is_checked() -> None:
    with pytest.raises(ValueError, match="feature_norm must be one of"):
        ClassificationHead(modality="image", num_classes=10, trunk_hidden=64, feature_norm="layer")
    head = ClassificationHead(modality="image", num_classes=10, trunk_hidden=64)
    assert head.reader.norm is not None  # batch is the default
    assert ClassificationHead(modality="image", num_classes=10, trunk_hidden=64, feature_norm="none").reader.norm is None


def test_checkpoint_from_before_feature_norm_loads_without_it() -> None:
    old = ClassificationHead(modality="image", num_classes=10, trunk_hidden=64, feature_norm="none")
    new = ClassificationHead(modality="image", num_classes=10, trunk_hidden=64)
    with pytest.warns(UserWarning, match="before feature_norm"):
        new.load_state_dict(old.state_dict())
    assert new.reader.norm is None
    h = torch.randn(2, 4, 64)
    old.eval(), new.eval()
    assert torch.equal(old.classify(h), new.classify(h))
