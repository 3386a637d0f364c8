"""Captioning: the text decoder (teacher forcing, greedy, beam search), CIDEr-D, and the head through the CLI.

The tiny stage-1 run (``tokenizer_run``) and the shards (``shard_dir``) are fixtures of tests/conftest.py.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from datamodules import WebDataModule
from multimodal import Backbone, DiffusionTransformer
from multimodal.cli import main
from tasks import MultiTaskModule
from tasks.cider import CIDErD, cider_d, tokenize
from tasks.heads.captioning import CaptioningHead
from tasks.text_decoder import TextDecoder
from tests.conftest import build_shards
from tests.tiny import tiny_config

ROOT = Path(__file__).resolve().parents[1]
BOS, EOS = 2, 3


def _decoder(vocab: int = 12, scale: float = 1.0, **kw) -> TextDecoder:
    torch.manual_seed(0)
    kw = {"width": 32, "depth": 2, "num_heads": 2, "dropout": 0.0, "max_length": 8, **kw}
    dec = TextDecoder(vocab, 16, **kw).eval()
    if scale != 1.0:  # sharper, more varied distributions than the small initialisation gives
        with torch.no_grad():
            for p in dec.parameters():
                if p.dim() > 1:
                    p.mul_(scale)
    return dec


# ---------------------------------------------------------------------------------- the decoder
def test_decoder_shapes_causality_and_memory_mask() -> None:
    dec = _decoder()
    ids = torch.tensor([[BOS, 5, 6, 7, 8], [BOS, 4, EOS, 0, 0]])
    memory, mask = torch.randn(2, 6, 16), torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
    logits = dec(ids, memory, mask)
    assert logits.shape == (2, 5, 12)
    later = ids.clone()
    later[:, 3] = 9
    changed = dec(later, memory, mask)
    assert torch.allclose(changed[:, :3], logits[:, :3], atol=1e-6)  # earlier positions never see later ids
    assert not torch.allclose(changed[:, 3:], logits[:, 3:])
    masked = memory.clone()
    masked[1, 3:] = 100.0  # padded memory tokens are not read
    assert torch.allclose(dec(ids, masked, mask)[1], logits[1], atol=1e-5)
    everything_masked = torch.zeros(2, 6, dtype=torch.bool)  # no NaN when a row has no real memory token
    assert torch.isfinite(dec(ids, memory, everything_masked)).all()
    with pytest.raises(ValueError, match="max_length=8"):
        dec(torch.full((1, 9), BOS), memory[:1])
    sincos = _decoder(positions="sincos")
    assert sincos(torch.full((1, 12), BOS), memory[:1]).shape == (1, 12, 12)  # fixed positions: any length
    with pytest.raises(ValueError, match="positions"):
        TextDecoder(12, 16, positions="rope")


def test_greedy_and_beam_size_one_agree() -> None:
    dec = _decoder(scale=6.0)
    memory = torch.randn(5, 4, 16)
    mask = torch.ones(5, 4, dtype=torch.bool)
    mask[0, 2:] = False
    greedy = dec.greedy(memory, mask, max_length=8)
    beam = dec.beam_search(memory, mask, beam_size=1, max_length=8, length_penalty=0.7)
    assert greedy[:, 0].eq(BOS).all() and greedy.shape[1] <= 8
    assert torch.equal(greedy, beam)
    assert len({tuple(r.tolist()) for r in greedy}) > 1  # the constructed decoder does vary with the memory
    # the cached one-id-per-step decoding computes what teacher forcing computes
    ids = torch.randint(4, 12, (5, 7))
    ids[:, 0] = BOS
    full = dec(ids, memory, mask).float()
    full[..., [0, BOS]] = float("-inf")
    state = dec._start(memory, mask)
    for t in range(1, 8):
        assert torch.allclose(dec._next_logprobs(ids[:, :t], state), full[:, t - 1].log_softmax(-1), atol=1e-4)
    # greedy is the argmax of the teacher-forced logits along its own output
    logits = dec(greedy[:, :-1], memory, mask)
    logits[..., [0, BOS]] = float("-inf")
    for row, out in zip(logits.argmax(-1), greedy[:, 1:]):
        real = out != 0
        assert torch.equal(row[real], out[real])


def test_decoder_learns_to_write_what_the_memory_says() -> None:
    """Three memories, three captions: a few Adam steps, then greedy and beam search write them."""
    torch.manual_seed(0)
    dec = TextDecoder(10, 16, width=32, depth=1, num_heads=2, dropout=0.0, max_length=8)
    memory = torch.randn(3, 2, 16)
    targets = torch.tensor([[BOS, 4, 5, 6, EOS, 0], [BOS, 7, 7, EOS, 0, 0], [BOS, 9, 8, 4, 5, EOS]])
    opt = torch.optim.Adam(dec.parameters(), lr=1e-2)
    for _ in range(80):
        logits = dec(targets[:, :-1], memory)
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets[:, 1:], ignore_index=0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    dec.eval()
    assert float(loss) < 0.05
    assert torch.equal(dec.greedy(memory, None, 8), targets)
    assert torch.equal(dec.beam_search(memory, None, beam_size=3, max_length=8), targets)


def _score(dec: TextDecoder, hyp: list[int], memory: torch.Tensor, alpha: float) -> float:
    """logprob / GNMT penalty of a hypothesis (BOS first), as beam search ranks them."""
    lp = float(dec.sequence_logprob(torch.tensor([hyp]), memory[None]))
    return lp / ((5 + len(hyp) - 1) / 6) ** alpha


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_beam_search_with_enough_beams_finds_the_best_sequence(alpha: float) -> None:
    dec = _decoder(vocab=6, scale=4.0, max_length=4)  # emitted ids: 1 (unk), 3 (EOS), 4, 5
    memory = torch.randn(3, 4, 16)
    beam = dec.beam_search(memory, None, beam_size=48, max_length=4, length_penalty=alpha)
    words = (1, 4, 5)
    every = [[BOS, EOS]] + [[BOS, *w, EOS] for n in (1, 2) for w in itertools.product(words, repeat=n)]
    every += [[BOS, *w] for w in itertools.product(words, repeat=3)]  # max_length reached without EOS
    for b in range(3):
        scores = [_score(dec, h, memory[b], alpha) for h in every]
        best = every[max(range(len(every)), key=scores.__getitem__)]
        got = [i for i in beam[b].tolist() if i != 0]
        assert got == best, (b, got, best)
        greedy = [i for i in dec.greedy(memory[b: b + 1], None, 4)[0].tolist() if i != 0]
        assert _score(dec, got, memory[b], alpha) >= _score(dec, greedy, memory[b], alpha) - 1e-6


def test_beam_search_beats_greedy_on_a_constructed_case() -> None:
    """First step: id 4 (p .55) or 5 (p .45). After 4 the best is EOS at p .3; after 5, EOS at p .97.
    Greedy: 4 EOS (p .55 * .3 = .165); two beams find 5 EOS (p .45 * .97 = .4365)."""
    dec = _decoder(vocab=6)
    table = {(BOS,): {4: 0.55, 5: 0.43, EOS: 0.01, 1: 0.01},
             (BOS, 4): {EOS: 0.3, 4: 0.25, 5: 0.25, 1: 0.2},
             (BOS, 5): {EOS: 0.97, 4: 0.01, 5: 0.01, 1: 0.01}}

    def fake_next_logprobs(ids: torch.Tensor, state: dict) -> torch.Tensor:
        out = torch.full((ids.shape[0], 6), float("-inf"))
        for n, row in enumerate(ids.tolist()):
            for token, p in table.get(tuple(row), {EOS: 0.97, 4: 0.01, 5: 0.01, 1: 0.01}).items():
                out[n, token] = math.log(p)
        return out

    dec._next_logprobs = fake_next_logprobs
    memory = torch.zeros(1, 2, 16)
    assert dec.greedy(memory, None, 6)[0].tolist() == [BOS, 4, EOS]
    assert dec.beam_search(memory, None, beam_size=2, max_length=6, length_penalty=0.0)[0].tolist() == [BOS, 5, EOS]
    assert dec.beam_search(memory, None, beam_size=1, max_length=6, length_penalty=0.0)[0].tolist() == [BOS, 4, EOS]


# ---------------------------------------------------------------------------------- CIDEr-D
def test_cider_d_by_hand() -> None:
    # Two images, N = 2: idf = log 2 - log df. "a" is in both references: weight 0.
    # Image 1: candidate == reference "a red circle": cosine 1 for n = 1, 2, 3; no 4-gram -> 0.
    #   (1 + 1 + 1 + 0) / 4 * 10 = 7.5
    # Image 2: "a blue circle" vs "a blue square": every non-zero weight is log 2 (df 1, or df 0 -> 1).
    #   n=1: dot = w^2 (blue), norms sqrt(2) w each -> 1/2; n=2: "a blue" shared of 2 each -> 1/2;
    #   n=3: nothing shared -> 0; n=4: none -> 0. Same length: penalty 1. (0.5 + 0.5) / 4 * 10 = 2.5
    # CIDEr-D = (7.5 + 2.5) / 2 = 5.0
    score, per_image = cider_d(["a red circle", "a blue circle"], [["a red circle"], ["a blue square"]])
    assert per_image == pytest.approx([7.5, 2.5]) and score == pytest.approx(5.0)
    metric = CIDErD()
    metric.update(["A red, circle."], [["a red circle"]])  # case and punctuation do not matter
    metric.update(["a blue circle"], ["a blue square"])  # a plain string is one reference
    assert float(metric.compute()) == pytest.approx(5.0)
    assert tokenize("A Red, circle!") == ["a", "red", "circle"]


def test_cider_d_identical_unrelated_and_length_penalty() -> None:
    refs = ["a large red circle left of a small blue square", "a small green cross above a large purple diamond",
            "a large orange triangle right of a small yellow circle", "a small blue square below a large red cross"]
    score, _ = cider_d(refs, [[r] for r in refs])
    assert score == pytest.approx(10.0)
    unrelated, per = cider_d(["zebra runs quickly home today"] + refs[1:], [[r] for r in refs])
    assert per[0] == pytest.approx(0.0) and unrelated < score
    truncated = "a large red circle left of"  # 6 of 9 words: every n-gram matches, shorter
    _, cut = cider_d([truncated] + refs[1:], [[r] for r in refs])
    assert 0.0 < cut[0] < 10.0
    # the clipping (-D): repeating a matching word does not raise the score
    _, rep = cider_d(["red red red red red red red red red"] + refs[1:], [[r] for r in refs])
    _, once = cider_d(["red"] + refs[1:], [[r] for r in refs])
    assert rep[0] <= once[0] + 1e-9
    # several references: the mean over them
    _, two = cider_d([refs[0]] + refs[1:], [[refs[0], refs[1]]] + [[r] for r in refs[1:]])
    assert 0.0 < two[0] < 10.0
    assert cider_d(["a red circle"], [["a red circle"]])[0] == 0.0  # one image: every idf is 0


def test_cider_d_metric_accumulates_resets_and_gathers_strings(monkeypatch: pytest.MonkeyPatch) -> None:
    metric = CIDErD()
    metric.update(["a red circle"], [["a red circle"]])
    metric.update(["a blue circle"], [["a blue square"]])
    assert float(metric.compute()) == pytest.approx(5.0)
    metric.reset()
    assert metric.preds == [] and metric.target == []
    with pytest.raises(ValueError, match="dist_sync_on_step"):
        CIDErD(dist_sync_on_step=True)
    # two ranks (simulated): each holds one image; the sync gathers both before computing
    other = {"preds": ["a blue circle"], "target": [["a blue square"]]}
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)

    def gather(out: list, obj: list, group=None) -> None:
        out[0] = obj
        out[1] = other["preds"] if isinstance(obj[0], str) else other["target"]

    monkeypatch.setattr(torch.distributed, "all_gather_object", gather)
    metric.update(["a red circle"], [["a red circle"]])
    metric._sync_dist()
    assert metric.preds == ["a red circle", "a blue circle"]
    assert float(metric.compute()) == pytest.approx(5.0)


# ---------------------------------------------------------------------------------- text metrics
def test_chrf_matches_torchmetrics_with_several_references() -> None:
    from torchmetrics.text import CHRFScore

    from tasks.text_metrics import ChrF

    preds = ["a red circle left of a blue square", "the green cross", "a big square"]
    target = [["a red circle to the left of a blue square", "a blue square right of a red circle"],
              ["a green cross"], ["a large square", "one big square", "a square that is big"]]
    ours, theirs = ChrF(), CHRFScore()
    ours.update(preds[:2], target[:2])
    ours.update(preds[2:], target[2:])  # updates accumulate over a corpus
    theirs.update(preds, target)
    assert float(ours.compute()) == pytest.approx(float(theirs.compute()), abs=1e-4)
    assert 0.0 < float(ours.compute()) < 1.0


def test_best_constant_caption_is_chosen_by_the_metric_against_all_references() -> None:
    from tasks.caption_baseline import best_constant_captions, candidate_pool
    from tasks.heads.captioning import METRICS, _corpus_score

    # most images show "a small red circle" in captions that are all different; the most frequent
    # caption ("a photo", repeated by six images) describes a sixth of them: frequency alone would pick it
    refs = [[f"a small red circle number {i}", f"one small red circle, picture {i}"] for i in range(30)]
    refs += [["a photo", "a photo", "a photo"]] * 6
    pool = candidate_pool(refs, refs)
    assert pool[0] == "a photo" and len(pool) == len(set(pool))
    best = best_constant_captions(refs, {name: _corpus_score(name) for name in METRICS})  # scored on all 36
    assert set(best) == set(METRICS)
    for name, (caption, score) in best.items():
        # (CIDEr-D's IDF weights the words most images share least: it may prefer the rare exact match)
        assert "red circle" in caption or name == "cider_d", (name, caption)
        assert score >= _corpus_score(name)(["a photo"] * len(refs), refs)
    assert best_constant_captions([], {"bleu4": _corpus_score("bleu4")}) == {}
    # on a seeded sample of the references: deterministic (same data, same seed, same answer)
    scorers = {name: _corpus_score(name) for name in METRICS}
    assert best_constant_captions(refs, scorers, max_samples=20) == best_constant_captions(refs, scorers, max_samples=20)


def test_head_scores_against_all_references_or_the_first() -> None:
    batch = {"text": ["a red circle", "x"], "references": [["a red circle", "a circle in red", " "], ["x"]]}
    assert CaptioningHead(trunk_hidden=16, width=16, depth=1, num_heads=2)._references(batch) == [
        ["a red circle", "a circle in red"], ["x"]]
    first = CaptioningHead(trunk_hidden=16, width=16, depth=1, num_heads=2, references="first")
    assert first._references(batch) == [["a red circle"], ["x"]]
    assert first._references({"text": ["only text"]}) == [["only text"]]  # a batch without references
    with pytest.raises(ValueError, match="references"):
        CaptioningHead(references="some")


# ---------------------------------------------------------------------------------- the head
def _tiny_caption_config(shard_dir: Path, tokenizer_dir: Path, run_dir: Path) -> dict:
    """configs/caption_shapes.yaml on the test shards and the tiny stage-1 run, with a tiny decoder."""
    cfg = tiny_config("caption_shapes.yaml", shard_dir, run_dir, tokenizer_dir)
    head = cfg["model"]["init_args"]["heads"]["shapes"]["init_args"]
    head.update(vocab_size=64, trunk_hidden=64, width=32, depth=1, num_heads=2, max_length=16, beam_size=2, num_media=2)
    cfg["model"]["init_args"]["warmup_steps"] = 1
    cfg["trainer"]["limit_test_batches"] = None  # the whole test split (8 images)
    cfg["trainer"]["limit_predict_batches"] = None
    return cfg


def test_caption_config_fits_tests_and_predicts(tokenizer_run: Path, tmp_path: Path) -> None:
    path = tmp_path / "caption.yaml"
    run = tmp_path / "run"
    shard_dir = build_shards(tmp_path / "shards", captions=3)  # three references per image
    path.write_text(yaml.safe_dump(_tiny_caption_config(shard_dir, tokenizer_run, run)))
    main(["fit", "--config", str(path)])
    ckpt = next(run.rglob("last.ckpt"))
    main(["test", "--config", str(path), f"--ckpt_path={ckpt}"])
    report = json.loads(next(run.rglob("test_metrics.json")).read_text())
    for name in ("bleu4", "rouge_l", "chrf", "cider_d"):
        for key in (f"test/shapes/{name}", f"test/shapes/baseline_{name}"):
            assert key in report and math.isfinite(report[key]), (key, sorted(report))
    assert "test/shapes/loss" in report and "test/shapes/truncated" in report
    main(["predict", "--config", str(path), f"--ckpt_path={ckpt}"])
    records = [json.loads(line) for line in next(run.rglob("predictions/shapes.jsonl")).read_text().splitlines()]
    assert len(records) == 8  # the whole test split
    assert all(isinstance(r["caption"], str) and r["reference"] and r["__key__"].startswith("test") for r in records)
    assert all(len(r["references"]) == 3 and r["references"][0] == r["reference"] for r in records)
    # the validation wrote a captions table (and the images) to TensorBoard
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: set[str] = set()
    for events in run.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events), size_guidance={"tensors": 0, "images": 0})
        acc.Reload()
        tags |= set(acc.Tags()["tensors"]) | set(acc.Tags()["images"])
    assert any(t.startswith("val/shapes/captions") for t in tags), tags
    assert "val/shapes/images" in tags


@pytest.fixture(scope="module")
def caption_parts(shard_dir: Path, tokenizer_run: Path) -> tuple[Backbone, WebDataModule]:
    data = WebDataModule(root=str(shard_dir), keys=["image", "text"], batch_size=2, samples_per_epoch=4, vocab_size=40)
    data.setup()
    backbone = Backbone(tokenizer_ckpt=str(tokenizer_run), trunk=DiffusionTransformer(in_dim=16, preset="tiny", patch_size=2))
    return backbone, data


def _head(**kw) -> CaptioningHead:
    kw = {"vocab_size": 64, "max_length": 8, "trunk_hidden": 64, "width": 32, "depth": 1, "num_heads": 2, "beam_size": 1, **kw}
    return CaptioningHead(**kw)


def test_long_and_empty_captions_are_counted_not_fatal(caption_parts) -> None:
    backbone, data = caption_parts
    head = _head(max_length=16)  # 14 pieces: "a small square" (14 characters) always fits
    MultiTaskModule(backbone, {"cap": head})  # attach
    head.bind_data(data, "cap")
    head.train()
    image = torch.rand(3, 3, 32, 32) * 2 - 1
    batch = {"__key__": ["a", "b", "c"], "image": image, "text": ["red circle " * 20, "   ", "a small square"]}
    loss, logs = head.loss(backbone, batch, step=0)
    assert float(logs["truncated"]) == 1 and float(logs["skipped/empty_text"]) == 1 and torch.isfinite(loss)
    loss.backward()
    assert head.decoder.embed.weight.grad is not None
    assert head.caption_counts == {"red circle " * 19 + "red circle": 1, "a small square": 1}
    empty = {"__key__": ["a", "b"], "image": image[:2], "text": ["", " "]}
    loss, logs = head.loss(backbone, empty, step=1)
    assert float(loss.detach()) == 0.0 and loss.requires_grad and float(logs["skipped/empty_text"]) == 2
    loss.backward()
    # generation: at most max_length ids (BOS .. EOS), decoded to text
    head.eval()
    captions = head.generate(backbone, batch)
    assert len(captions) == 3 and all(isinstance(c, str) for c in captions)
    records = head.predict(backbone, batch)
    assert records[0]["__key__"] == "a" and "caption" in records[0] and records[2]["reference"] == "a small square"


def test_bad_captioning_settings_fail_at_start(caption_parts, tmp_path: Path) -> None:
    backbone, data = caption_parts
    with pytest.raises(ValueError, match="trunk_hidden=256 does not match model.backbone.trunk hidden_size=64"):
        MultiTaskModule(backbone, {"cap": _head(trunk_hidden=256)})
    with pytest.raises(ValueError, match="beam_size"):
        _head(beam_size=0)
    with pytest.raises(ValueError, match="modality"):
        _head(modality="video")
    # the data's sentencepiece vocabulary does not fit the head's output layer: named at setup
    model = MultiTaskModule(backbone, {"cap": _head(vocab_size=8)})
    trainer = L.Trainer(default_root_dir=tmp_path, logger=False, max_steps=1, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False)
    fresh = WebDataModule(root=data.root, keys=["image", "text"], batch_size=2, samples_per_epoch=4, vocab_size=40)
    with pytest.raises(ValueError, match="vocab_size is 8"):
        trainer.fit(model, fresh)
    assert trainer.global_step == 0
