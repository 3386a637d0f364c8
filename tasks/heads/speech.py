"""Speech recognition: audio -> text by CTC over the trunk's features of the audio tokens.

The trunk encodes the clean audio tokens (``tasks.heads.features.TrunkFeatures``); optional
upsampling (each token's feature repeated ``upsample`` times plus a learned offset per copy) and
a few small transformer layers follow, then a projection to the output vocabulary, trained with
CTC (blank = id 0 = pad). Decoding: greedy (best class per position, repeats collapsed, blanks
dropped) or, with ``beam_size > 1``, CTC prefix beam search (:func:`ctc_prefix_beam_search`).

Token rate vs transcript length. CTC needs at least as many output positions as target symbols
(plus one blank between equal neighbours). The audio codec gives 25 tokens per second (hop 160,
4 frames per token). Sentencepiece word pieces run at about 3 per second of speech (the spoken
demo's closed vocabulary makes each word one piece), leaving ~8x slack; characters run at about
15 per second (up to ~20 for fast voices), too close to 25 for CTC to align reliably, and doubled
letters ("three", "off") need the blank in between. Hence the default: ``sentencepiece`` with
``upsample=1``; use ``chars`` (an open vocabulary, no tokenizer needed) with ``upsample >= 2``
(50 positions per second). Targets longer than an alignment allows are dropped from the loss and
counted (``skipped/too_long_for_ctc``), as are empty transcripts (``skipped/empty_text``).

Metrics: ``wer`` and ``cer`` (torchmetrics) of the decoded text against the reference
(whitespace-normalised; lower-cased for ``chars``, whose alphabet is lower-case).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.text import CharErrorRate, WordErrorRate

from multimodal.backbone import Backbone
from tasks.heads.base import Head
from tasks.heads.features import TrunkFeatures
from tasks.heads.vocab import BOS_ID, EOS_ID, PAD_ID, TextVocabulary

BLANK = PAD_ID
NEG_INF = float("-inf")


# ---------------------------------------------------------------------------------------- decoding
def ctc_greedy_decode(log_probs: Tensor, lengths: Tensor | None = None, blank: int = BLANK) -> list[list[int]]:
    """Best path: log_probs [B, T, V] (or [T, V]) with valid lengths [B] -> label ids per sample
    (argmax per position, repeats collapsed, blanks dropped)."""
    if log_probs.dim() == 2:
        log_probs = log_probs[None]
    best = log_probs.argmax(dim=-1).cpu()
    lengths = lengths.cpu() if lengths is not None else torch.full((best.shape[0],), best.shape[1])
    out = []
    for row, n in zip(best, lengths.tolist()):
        ids, prev = [], None
        for s in row[: int(n)].tolist():
            if s != prev and s != blank:
                ids.append(s)
            prev = s
        out.append(ids)
    return out


def _logaddexp(a: float, b: float) -> float:
    if a == NEG_INF:
        return b
    if b == NEG_INF:
        return a
    hi, lo = (a, b) if a > b else (b, a)
    return hi + math.log1p(math.exp(lo - hi))


def _add(beams: dict[tuple[int, ...], list[float]], prefix: tuple[int, ...], pb: float, pnb: float) -> None:
    entry = beams.setdefault(prefix, [NEG_INF, NEG_INF])
    entry[0] = _logaddexp(entry[0], pb)
    entry[1] = _logaddexp(entry[1], pnb)


def ctc_prefix_beam_search(log_probs: Tensor, beam_size: int = 4, blank: int = BLANK,
                           top_k: int | None = None) -> tuple[list[int], float]:
    """CTC prefix beam search over one sequence: log_probs [T, V] -> (best label ids, its log probability).

    Each prefix keeps two log probabilities: of the paths ending in blank (``pb``) and ending in
    its last label (``pnb``). Per position, a prefix (a) stays by a blank (from both), (b) stays
    by repeating its last label (from ``pnb`` only: the repeat collapses), (c) grows by a label c
    (from both, except c equal to its last label: then only from ``pb``, since a blank must
    separate two equal labels). The ``beam_size`` most probable prefixes (summed over all their
    paths) survive each position; ``top_k`` limits the labels tried per position (default all).
    With a beam as large as the number of prefixes the result is the exact most probable labelling.
    """
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    lp = log_probs.detach().float().cpu()
    T, V = lp.shape
    k = V if top_k is None else max(1, min(V, top_k))
    rows = lp.tolist()
    beams: dict[tuple[int, ...], tuple[float, float]] = {(): (0.0, NEG_INF)}
    for t in range(T):
        row = rows[t]
        if k < V:
            cands = [c for c in lp[t].topk(k).indices.tolist() if c != blank]
        else:
            cands = [c for c in range(V) if c != blank]
        nxt: dict[tuple[int, ...], list[float]] = {}
        for prefix, (pb, pnb) in beams.items():
            total = _logaddexp(pb, pnb)
            _add(nxt, prefix, total + row[blank], NEG_INF)
            last = prefix[-1] if prefix else None
            if last is not None:
                _add(nxt, prefix, NEG_INF, pnb + row[last])
            for c in cands:
                _add(nxt, prefix + (c,), NEG_INF, (pb if c == last else total) + row[c])
        ranked = sorted(nxt.items(), key=lambda kv: _logaddexp(*kv[1]), reverse=True)
        beams = {p: (s[0], s[1]) for p, s in ranked[:beam_size]}
    best, (pb, pnb) = max(beams.items(), key=lambda kv: _logaddexp(*kv[1]))
    return list(best), _logaddexp(pb, pnb)


def ctc_min_length(ids: list[int]) -> int:
    """The fewest CTC positions that can emit ``ids``: one per label plus a blank between equal neighbours."""
    return len(ids) + sum(a == b for a, b in zip(ids, ids[1:]))


# ---------------------------------------------------------------------------------------- the head
def ctc_targets(vocab: TextVocabulary, texts: list[str], lengths: Tensor) -> tuple[list[list[int]], dict[str, int]]:
    """Texts -> CTC target ids (no BOS/EOS; truncated to ``vocab.max_length - 2``), and the counts of
    truncated, empty and infeasible ones (those two get an empty target: dropped)."""
    counts = {"empty_text": 0, "too_long_for_ctc": 0, "truncated": 0}
    targets = []
    for text, n in zip(texts, lengths.tolist()):
        ids = vocab.ids(text)
        if len(ids) > vocab.max_length - 2:
            counts["truncated"] += 1
            ids = ids[: vocab.max_length - 2]
        if not ids:
            counts["empty_text"] += 1
        elif ctc_min_length(ids) > n:
            counts["too_long_for_ctc"] += 1
            ids = []
        targets.append(ids)
    return targets, counts


def ctc_text_loss(log_probs: Tensor, lengths: Tensor, texts: list[str], vocab: TextVocabulary) -> tuple[Tensor, dict[str, Tensor]]:
    """CTC (blank = pad id) of log-probabilities [B, T, V] with valid lengths [B] against ``texts``,
    per target symbol, averaged over the samples with a feasible target; the skips counted in the logs."""
    targets, counts = ctc_targets(vocab, texts, lengths)
    device = log_probs.device
    logs = {f"skipped/{k}": torch.tensor(float(counts[k]), device=device) for k in ("empty_text", "too_long_for_ctc")}
    logs["truncated_text"] = torch.tensor(float(counts["truncated"]), device=device)
    keep = [i for i, t in enumerate(targets) if t]
    if not keep:
        return log_probs.sum() * 0.0, logs  # keeps the graph (every rank runs the same backward)
    index = torch.tensor(keep, device=device)
    flat = torch.tensor([s for i in keep for s in targets[i]], dtype=torch.long, device=device)
    target_lengths = torch.tensor([len(targets[i]) for i in keep], dtype=torch.long, device=device)
    per_sample = F.ctc_loss(log_probs[index].transpose(0, 1), flat, lengths[index], target_lengths,
                            blank=BLANK, reduction="none", zero_infinity=True)
    return (per_sample / target_lengths.float()).mean(), logs


class SpeechHead(Head):
    """Args:
    vocabulary: ``sentencepiece`` (the data's model, saved in the checkpoint) or ``chars``.
    vocab_size: output classes for sentencepiece (>= the data's vocabulary; checked at setup).
    max_length: ids per transcript including BOS/EOS (longer ones are truncated and counted).
    trunk_hidden: the trunk's hidden size (``cpu`` preset 256, ``tiny`` 64), checked against
        ``model.backbone.trunk.hidden_size``; the head's weights are built from it.
    source: ``quantized`` or ``continuous`` trunk inputs (see ``tasks.heads.features``).
    feature_norm: ``batch`` (standardise the trunk features per channel, see ``tasks.heads.features``) or ``none``.
    upsample: output positions per audio token (>= 1): each token's feature is repeated with a
        learned offset per copy (see the module docstring on token rate vs transcript length).
    layers: transformer layers (pre-norm, width ``trunk_hidden``) after upsampling; 0 allowed.
    layer_heads: attention heads of those layers (must divide ``trunk_hidden``).
    dropout: in those layers.
    beam_size: 1 = greedy decoding; > 1 = CTC prefix beam search with that beam.
    num_media: transcripts (and up to 4 clips) written to TensorBoard per validation.
    """

    def __init__(
        self,
        vocabulary: str = "sentencepiece",
        vocab_size: int = 512,
        max_length: int = 64,
        trunk_hidden: int | None = None,
        source: str = "quantized",
        feature_norm: str = "batch",
        upsample: int = 1,
        layers: int = 1,
        layer_heads: int = 4,
        dropout: float = 0.1,
        beam_size: int = 1,
        num_media: int = 4,
    ) -> None:
        super().__init__()
        if trunk_hidden is None or trunk_hidden < 1:
            raise ValueError("speech head: set trunk_hidden to the trunk's hidden_size "
                             f"(DiffusionTransformer preset cpu: 256, tiny: 64), got {trunk_hidden!r}")
        if upsample < 1 or layers < 0 or beam_size < 1 or num_media < 0:
            raise ValueError(f"speech head: upsample >= 1, layers >= 0, beam_size >= 1, num_media >= 0; got "
                             f"upsample={upsample}, layers={layers}, beam_size={beam_size}, num_media={num_media}")
        if layers and (layer_heads < 1 or trunk_hidden % layer_heads):
            raise ValueError(f"speech head: layer_heads={layer_heads} must divide trunk_hidden={trunk_hidden}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"speech head: dropout must be in [0, 1), got {dropout}")
        self.vocab = TextVocabulary(vocabulary, vocab_size, max_length)
        self.trunk_hidden, self.upsample, self.beam_size, self.num_media = int(trunk_hidden), int(upsample), int(beam_size), int(num_media)
        self.modality = "audio"
        self.reader = TrunkFeatures("audio", source, feature_norm, trunk_hidden)
        self.required_keys = (*self.reader.keys, "text")
        self.backbone_modalities = ("audio",)
        H = self.trunk_hidden
        self.offsets = nn.Parameter(torch.randn(upsample, H) * 0.02) if upsample > 1 else None
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(H, layer_heads, dim_feedforward=2 * H, dropout=dropout, activation="gelu",
                                       batch_first=True, norm_first=True)
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(H)
        self.proj = nn.Linear(H, self.vocab.size)
        nn.init.normal_(self.proj.weight, std=0.02)
        nn.init.zeros_(self.proj.bias)
        never = torch.zeros(self.vocab.size)
        never[[BOS_ID, EOS_ID]] = -1e4  # never emitted: CTC targets carry no BOS/EOS
        self.register_buffer("never", never, persistent=False)

    # ------------------------------------------------------------------ setup
    def attach(self, backbone: Backbone, task: str) -> None:
        self.reader.check(backbone, task)

    def latent_request(self, backbone: Backbone) -> tuple[str, tuple[str, ...]] | None:
        return self.reader.latent_request(backbone)

    def bind_data(self, data: Any, task: str) -> None:
        self.vocab.bind(getattr(data, "tokenizer", None), task)

    # ------------------------------------------------------------------ forward
    def log_probs(self, backbone: Backbone, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """batch -> (log probabilities [B, T, V] float32, valid lengths [B]); T = tokens x upsample."""
        h, mask = self.reader(backbone, batch)
        B, N, H = h.shape
        lengths = mask.sum(dim=1)
        if self.offsets is not None:
            h = (h[:, :, None, :] + self.offsets.to(h.dtype)).reshape(B, N * self.upsample, H)
            lengths = lengths * self.upsample
            mask = torch.arange(h.shape[1], device=h.device)[None, :] < lengths[:, None]
        if len(self.layers):
            pad = ~(mask | ~mask.any(dim=1, keepdim=True))  # an all-padded row attends everywhere (no NaN)
            for layer in self.layers:
                h = layer(h, src_key_padding_mask=pad)
        logits = self.proj(self.norm(h)).float() + self.never
        return logits.log_softmax(dim=-1), lengths

    def _ctc(self, log_probs: Tensor, lengths: Tensor, texts: list[str]) -> tuple[Tensor, dict[str, Tensor]]:
        return ctc_text_loss(log_probs, lengths, texts, self.vocab)

    def loss(self, backbone: Backbone, batch: dict[str, Any], step: int) -> tuple[Tensor, dict[str, Tensor]]:
        log_probs, lengths = self.log_probs(backbone, batch)
        return self._ctc(log_probs, lengths, batch["text"])

    # ------------------------------------------------------------------ decoding
    def decode(self, log_probs: Tensor, lengths: Tensor) -> list[str]:
        """Log probabilities [B, T, V] + lengths [B] -> one transcript per sample."""
        if self.beam_size == 1:
            ids = ctc_greedy_decode(log_probs, lengths)
        else:
            top_k = max(2 * self.beam_size, 8)
            ids = [ctc_prefix_beam_search(lp[: int(n)], self.beam_size, top_k=top_k)[0]
                   for lp, n in zip(log_probs, lengths.tolist())]
        return [self.vocab.decode(i) for i in ids]

    @torch.no_grad()
    def transcribe(self, backbone: Backbone, batch: dict[str, Any]) -> list[str]:
        return self.decode(*self.log_probs(backbone, batch))

    def reference(self, text: str) -> str:
        """What the hypothesis is compared with: whitespace-normalised (and lower-cased for chars)."""
        text = " ".join(text.split())
        return text.lower() if self.vocab.kind == "chars" else text

    # ------------------------------------------------------------------ evaluation
    def build_metrics(self, backbone: Backbone) -> MetricCollection:
        return MetricCollection({"wer": WordErrorRate(), "cer": CharErrorRate()}, compute_groups=False)

    def evaluate(self, backbone: Backbone, batch: dict[str, Any], metrics: MetricCollection) -> dict[str, Tensor]:
        log_probs, lengths = self.log_probs(backbone, batch)
        loss, logs = self._ctc(log_probs, lengths, batch["text"])
        hyps = self.decode(log_probs, lengths)
        pairs = [(h, self.reference(r)) for h, r in zip(hyps, batch["text"]) if r.strip()]
        if pairs:
            metrics.update([h for h, _ in pairs], [r for _, r in pairs])
        return {"loss": loss.detach(), **logs}

    @torch.no_grad()
    def predict(self, backbone: Backbone, batch: dict[str, Any]) -> list[dict[str, Any]]:
        hyps = self.transcribe(backbone, batch)
        records = []
        for i, key in enumerate(batch["__key__"]):
            record: dict[str, Any] = {"__key__": key, "transcript": hyps[i]}
            if "text" in batch:
                record["reference"] = batch["text"][i]
            records.append(record)
        return records

    @torch.no_grad()
    def log_media(self, backbone: Backbone, batch: dict[str, Any], experiment: Any, step: int, tag: str) -> None:
        n = min(self.num_media, len(batch.get("__key__", [])))
        if n <= 0:
            return
        hyps = self.transcribe(backbone, batch)
        if hasattr(experiment, "add_text"):
            cell = lambda s: s.replace("|", "\\|") or " "  # noqa: E731
            rows = ["| key | reference | hypothesis |", "| --- | --- | --- |"]
            rows += [f"| {batch['__key__'][i]} | {cell(batch['text'][i])} | {cell(hyps[i])} |" for i in range(n)]
            experiment.add_text(f"{tag}/transcripts", "\n".join(rows), step)
        if hasattr(experiment, "add_audio"):
            rate = getattr(backbone.codec("audio"), "sample_rate", 16000)
            for i in range(min(n, 4)):
                wave = batch["audio"][i, : int(batch["audio_lengths"][i])].float().clamp(-1, 1).cpu()
                experiment.add_audio(f"{tag}/clip{i}", wave[None], step, sample_rate=rate)
