"""Captioning: trunk features of an image (or audio clip) -> text, by a transformer decoder.

The trunk encodes the CLEAN latents of the input (``TrunkFeatures``: t = 0, null condition); a
:class:`tasks.text_decoder.TextDecoder` cross-attends to those features and writes the caption's
sentencepiece ids (``TextVocabulary``: the data's model, saved in the checkpoint).

Training: teacher-forced cross-entropy (label smoothing, pad ignored) on the caption encoded as
``BOS ... EOS`` (a sample with several captions gives the one the data module drew for this step);
captions longer than ``max_length`` ids are truncated (logged as ``truncated``), empty captions are
left out of the loss (``skipped/empty_text``).

Evaluation: every validation/test batch is decoded (beam search, or greedy for ``beam_size=1``)
and scored against ALL the references of each sample (``batch["references"]``; ``references:
first`` scores against the first only, the single-reference protocol) with ``bleu4`` (corpus
BLEU-4), ``rouge_l`` (ROUGE-L F-measure, best reference), ``chrf`` (chrF++,
:class:`tasks.text_metrics.ChrF`) and ``cider_d`` (:class:`tasks.cider.CIDErD`, document frequencies
over the evaluated references). The same four metrics are computed for a BASELINE that writes one
constant caption for every input (``baseline_bleu4``, ...), so every report shows the gap: per
metric, the best constant caption of the training set under that metric against all references
(:mod:`tasks.caption_baseline`; searched once, at the first evaluation, from
``data.split_references('train')``, the same in ``fit`` and in ``test`` from a checkpoint). When the
data module cannot list its training split, the most frequent caption seen in training ``loss``
calls serves every metric (a counter on the head, not checkpointed, per rank); with neither (e.g.
``test`` from URLs without training) the baseline metrics are not reported.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MetricCollection
from torchmetrics.text import BLEUScore

from multimodal.backbone import Backbone
from tasks.caption_baseline import best_constant_captions
from tasks.cider import CIDErD
from tasks.heads.base import Head, check_modality
from tasks.heads.features import TrunkFeatures
from tasks.heads.vocab import PAD_ID, TextVocabulary
from tasks.text_decoder import TextDecoder
from tasks.text_metrics import ChrF, RougeLF

METRICS = ("bleu4", "rouge_l", "chrf", "cider_d")
MAX_DISTINCT_CAPTIONS = 100_000  # the training-caption counter stops adding new captions beyond this


log = logging.getLogger(__name__)

def _text_metrics() -> dict[str, Any]:
    return {"bleu4": BLEUScore(n_gram=4), "rouge_l": RougeLF(), "chrf": ChrF(), "cider_d": CIDErD()}


def _corpus_score(name: str) -> Any:
    """A scorer for the baseline search: a fresh metric ``name`` over one corpus."""

    def score(preds: list[str], target: list[list[str]]) -> float:
        metric = _text_metrics()[name]
        metric.update(preds, target)
        return float(metric.compute())

    return score


class CaptioningHead(Head):
    """Args:
    modality: ``image`` (default) or ``audio``: whose trunk features the decoder reads.
    vocab_size: output classes of the decoder; must be >= the data's sentencepiece vocabulary.
    max_length: ids per caption including BOS and EOS (longer captions are truncated and counted);
        also the longest generated caption.
    source: ``quantized`` (code vectors) or ``continuous`` (encoder output) trunk input.
    feature_norm: ``batch`` (standardise the trunk features per channel, see ``tasks.heads.features``) or ``none``.
    trunk_hidden: the trunk's hidden size (the decoder's memory width); must equal
        ``model.backbone.trunk`` 's hidden size (checked at construction).
    width / depth / num_heads / dropout: the decoder's size and dropout.
    label_smoothing: of the training cross-entropy.
    beam_size: beams when decoding (1 = greedy); length_penalty: the GNMT alpha of beam search.
    references: ``all`` (score against every caption of a sample) or ``first`` (its first only).
    num_media: examples written to TensorBoard (captions table and images) per logged validation.
    """

    def __init__(
        self,
        modality: str = "image",
        vocab_size: int = 512,
        max_length: int = 32,
        source: str = "quantized",
        feature_norm: str = "batch",
        trunk_hidden: int = 256,
        width: int = 256,
        depth: int = 3,
        num_heads: int = 4,
        dropout: float = 0.1,
        label_smoothing: float = 0.1,
        beam_size: int = 3,
        length_penalty: float = 0.6,
        references: str = "all",
        num_media: int = 8,
    ) -> None:
        super().__init__()
        keys = check_modality(modality, "captioning")
        if beam_size < 1:
            raise ValueError(f"captioning head: beam_size must be >= 1 (1 = greedy), got {beam_size}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"captioning head: label_smoothing must be in [0, 1), got {label_smoothing}")
        if num_media < 0:
            raise ValueError(f"captioning head: num_media must be >= 0, got {num_media}")
        if references not in ("all", "first"):
            raise ValueError(f"captioning head: references must be 'all' or 'first', got {references!r}")
        self.references = references
        self.modality, self.source = modality, source
        self.trunk_hidden, self.max_length = trunk_hidden, max_length
        self.label_smoothing, self.beam_size, self.length_penalty = label_smoothing, beam_size, length_penalty
        self.num_media = num_media
        self.required_keys = (*keys, "text")
        self.backbone_modalities = (modality,)
        self.features = TrunkFeatures(modality, source, feature_norm, trunk_hidden)
        self.vocab = TextVocabulary("sentencepiece", vocab_size, max_length)
        self.decoder = TextDecoder(vocab_size, trunk_hidden, width=width, depth=depth, num_heads=num_heads,
                                   dropout=dropout, max_length=max_length)
        self.caption_counts: Counter[str] = Counter()  # captions seen in training (not checkpointed)
        self._data: Any = None
        self._split_baselines: dict[str, str] | None = None

    # ------------------------------------------------------------------ checks and data
    def attach(self, backbone: Backbone, task: str) -> None:
        self.features.check(backbone, task)

    def latent_request(self, backbone: Backbone) -> tuple[str, tuple[str, ...]] | None:
        return self.features.latent_request(backbone)

    def bind_data(self, data: Any, task: str) -> None:
        self.vocab.bind(getattr(data, "tokenizer", None), task)
        self._data = data  # the baseline's training captions are read lazily, at the first evaluation

    def baseline_captions(self) -> dict[str, str] | None:
        """``{metric: constant caption}`` (see the module docstring), or None when unknown."""
        if self._split_baselines is None and self._data is not None:
            try:
                references = self._data.split_references("train")
            except Exception as err:  # no training split (e.g. URLs for test only): use the counter
                log.info("captioning baseline: no training captions from the data (%s)", err)
                references = []
            if self.references == "first":
                references = [refs[:1] for refs in references]
            best = best_constant_captions(references, {name: _corpus_score(name) for name in METRICS})
            self._split_baselines = {name: caption for name, (caption, _) in best.items()}
            for name, (caption, score) in best.items():
                log.info("captioning baseline for %s: %r (%.4f on training references)", name, caption, score)
        if self._split_baselines:
            return self._split_baselines
        if self.caption_counts:
            caption = self.caption_counts.most_common(1)[0][0]
            return dict.fromkeys(METRICS, caption)
        return None

    def _references(self, batch: dict[str, Any]) -> list[list[str]]:
        """The references of each sample (all or the first, by ``references``), blanks dropped."""
        refs = batch.get("references") or [[t] for t in batch["text"]]
        refs = [[str(r).strip() for r in rs if str(r).strip()] for rs in refs]
        return [r[:1] for r in refs] if self.references == "first" else refs

    # ------------------------------------------------------------------ training
    def _targets(self, batch: dict[str, Any], device: torch.device) -> tuple[Tensor, Tensor, int, Tensor]:
        """-> (ids [B, L], lengths [B], truncated count, keep [B] bool: captions with at least one id)."""
        texts = [str(t) for t in batch["text"]]
        ids, lengths, truncated = self.vocab.encode(texts, device)
        return ids, lengths, truncated, lengths > 2

    def loss(self, backbone: Backbone, batch: dict[str, Any], step: int) -> tuple[Tensor, dict[str, Tensor]]:
        return self._loss(backbone, batch)

    def _loss(self, backbone: Backbone, batch: dict[str, Any],
              features: tuple[Tensor, Tensor | None] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Teacher-forced cross-entropy; ``features`` (memory, mask) when already computed."""
        device = backbone.quantizer.codebook.device
        ids, lengths, truncated, keep = self._targets(batch, device)
        logs = {"truncated": torch.tensor(float(truncated), device=device), "skipped/empty_text": (~keep).sum().float()}
        if self.training:
            self._count_captions(t for t, k in zip(batch["text"], keep.tolist()) if k)
        memory, mask = features if features is not None else self.features(backbone, batch)
        if not bool(keep.any()):  # a zero that still reaches every trainable weight (backward and DDP work)
            zero = (memory.float().sum() + sum(p.float().sum() for p in self.decoder.parameters())) * 0.0
            return zero, logs
        if not bool(keep.all()):
            memory, ids = memory[keep], ids[keep]
            mask = mask[keep] if mask is not None else None
        ids = ids[:, : int(lengths[keep].max())]
        logits = self.decoder(ids[:, :-1], memory, mask)
        targets = ids[:, 1:]
        loss = F.cross_entropy(logits.transpose(1, 2).float(), targets, ignore_index=PAD_ID,
                               label_smoothing=self.label_smoothing)
        with torch.no_grad():
            real = targets != PAD_ID
            logs["token_acc"] = ((logits.argmax(-1) == targets) & real).sum().float() / real.sum().clamp(min=1)
        return loss, logs

    def _count_captions(self, texts: Any) -> None:
        for text in texts:
            text = str(text).strip()
            if text in self.caption_counts or len(self.caption_counts) < MAX_DISTINCT_CAPTIONS:
                self.caption_counts[text] += 1

    # ------------------------------------------------------------------ decoding
    @torch.no_grad()
    def generate(self, backbone: Backbone, batch: dict[str, Any],
                 features: tuple[Tensor, Tensor | None] | None = None) -> list[str]:
        """One caption per batch item (beam search, or greedy for ``beam_size=1``)."""
        memory, mask = features if features is not None else self.features(backbone, batch)
        if self.beam_size == 1:
            ids = self.decoder.greedy(memory, mask, self.max_length)
        else:
            ids = self.decoder.beam_search(memory, mask, self.beam_size, self.max_length, self.length_penalty)
        return [self.vocab.decode(row[1:]) for row in ids]

    # ------------------------------------------------------------------ evaluation
    def build_metrics(self, backbone: Backbone) -> MetricCollection:
        metrics = _text_metrics()
        metrics.update({f"baseline_{k}": v for k, v in _text_metrics().items()})
        return MetricCollection(metrics, compute_groups=False)

    def evaluate(self, backbone: Backbone, batch: dict[str, Any], metrics: MetricCollection) -> dict[str, Tensor]:
        features = self.features(backbone, batch)  # once for the loss and the decoding
        loss, logs = self._loss(backbone, batch, features)
        preds = self.generate(backbone, batch, features)
        pairs = [(p, r) for p, r in zip(preds, self._references(batch)) if r]
        if pairs:
            hyps, refs = [p for p, _ in pairs], [r for _, r in pairs]
            for name in METRICS:
                metrics[name].update(hyps, refs)
            baselines = self.baseline_captions()
            if baselines is not None:
                for name in METRICS:
                    metrics[f"baseline_{name}"].update([baselines[name]] * len(refs), refs)
        return {"loss": loss.detach(), **logs}

    def predict(self, backbone: Backbone, batch: dict[str, Any]) -> list[dict[str, Any]]:
        captions = self.generate(backbone, batch)
        records = []
        for i, key in enumerate(batch["__key__"]):
            record: dict[str, Any] = {"__key__": key, "caption": captions[i]}
            if "text" in batch:
                record["reference"] = batch["text"][i]
                record["references"] = self._references(batch)[i]
            records.append(record)
        return records

    @torch.no_grad()
    def log_media(self, backbone: Backbone, batch: dict[str, Any], experiment: Any, step: int, tag: str) -> None:
        n = min(self.num_media, len(batch["__key__"]))
        if n == 0 or not hasattr(experiment, "add_text"):
            return
        sub = {k: (v[:n] if isinstance(v, (Tensor, list)) else v) for k, v in batch.items()}
        captions = self.generate(backbone, sub)
        rows = ["| # | key | generated | reference |", "| --- | --- | --- | --- |"]
        refs = self._references(sub) if "text" in sub else [[] for _ in range(n)]
        for i in range(n):
            ref = " / ".join(refs[i])
            rows.append(f"| {i} | {sub['__key__'][i]} | {_cell(captions[i])} | {_cell(ref)} |")
        baselines = self.baseline_captions()
        if baselines is not None:
            rows.append("\nbaselines (the best constant caption per metric):")
            rows.extend(f"- {name}: {_cell(caption)}" for name, caption in baselines.items())
        experiment.add_text(f"{tag}/captions", "\n".join(rows), step)
        if self.modality == "image" and hasattr(experiment, "add_images"):
            experiment.add_images(f"{tag}/images", ((sub["image"].float() + 1) / 2).clamp(0, 1), step)


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ") or "(empty)"
