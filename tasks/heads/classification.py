"""Classification: a label per image, audio clip or text, read from the trunk's features.

The trunk encodes the CLEAN input (``tasks.heads.features.TrunkFeatures``: t = 0, null
condition); the head pools its features into one vector and maps it to class logits:

* ``attention`` pooling: a learned query attends over the (masked) features, multi-head, after a
  LayerNorm (the trunk's last hidden states are not normalised);
* ``mean`` pooling: the masked mean.

Then LayerNorm -> Linear -> GELU -> Dropout -> Linear (zero-initialised: every class starts at the
same logit, so the first loss is log(num_classes)).

Metrics: ``acc`` (micro), ``acc_top5`` (only with >= 5 classes), ``f1_macro`` and the confusion
matrix; the matrix is consumed in ``evaluate_end`` (kept as ``last_confusion`` and drawn as a
row-normalised heat-map for TensorBoard), so only scalars reach the logger.

Labels outside ``[0, num_classes)`` are dropped from loss and metrics and counted
(``skipped/bad_label``), never an error: e.g. a data set with more classes than the head.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassF1Score

from multimodal.backbone import Backbone
from tasks.heads.base import Head
from tasks.heads.features import INPUT_MODALITIES, TrunkFeatures
from tasks.heads.labels import ClassNames
from tasks.metrics import update_fp32

POOLINGS = ("attention", "mean")


def masked_mean(h: Tensor, mask: Tensor | None) -> Tensor:
    """h [B, N, H], mask [B, N] bool (True = real) or None -> [B, H]; an all-padded row gives 0."""
    if mask is None:
        return h.mean(dim=1)
    w = mask.to(h.dtype)[..., None]
    return (h * w).sum(dim=1) / w.sum(dim=1).clamp(min=1.0)


class AttentionPool(nn.Module):
    """A learned query attending over a sequence: [B, N, H] (+ mask [B, N]) -> [B, H]."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention pooling: width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.norm = nn.LayerNorm(dim)
        self.query = nn.Parameter(torch.randn(dim) * 0.02)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        for layer in (self.key, self.value, self.out):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, h: Tensor, mask: Tensor | None = None) -> Tensor:
        B, N, D = h.shape
        nh, hd = self.num_heads, D // self.num_heads
        x = self.norm(h)
        k = self.key(x).view(B, N, nh, hd)
        v = self.value(x).view(B, N, nh, hd)
        q = self.query.view(nh, hd)
        scores = torch.einsum("hd,bnhd->bhn", q, k) / math.sqrt(hd)  # [B, heads, N]
        if mask is not None:
            keep = mask | ~mask.any(dim=1, keepdim=True)  # an all-padded row attends everywhere (no NaN)
            scores = scores.masked_fill(~keep[:, None, :], float("-inf"))
        weights = scores.softmax(dim=-1)
        pooled = torch.einsum("bhn,bnhd->bhd", weights, v).reshape(B, D)
        return self.out(pooled)


def confusion_image(matrix: Tensor, size: int = 256) -> Tensor:
    """A confusion matrix [K, K] (rows = true class) -> an RGB heat-map [3, S, S] in [0, 1].

    Each row is normalised to sum 1 (an empty row stays 0); white = 0, dark blue = 1; every cell is
    a block of ``max(4, size // K)`` pixels (nearest upsampling), with a 1-pixel grey grid.
    """
    m = matrix.detach().float().cpu()
    k = m.shape[0]
    rows = m / m.sum(dim=1, keepdim=True).clamp(min=1.0)
    low = torch.tensor([1.0, 1.0, 1.0])
    high = torch.tensor([0.03, 0.19, 0.42])
    colours = low[:, None, None] + (high - low)[:, None, None] * rows[None]  # [3, K, K]
    cell = max(4, size // max(k, 1))
    image = colours.repeat_interleave(cell, dim=1).repeat_interleave(cell, dim=2)
    image[:, ::cell, :] = 0.7
    image[:, :, ::cell] = 0.7
    return image.clamp(0.0, 1.0)


class ClassificationHead(Head):
    """Args:
    modality: the input: ``image``, ``audio`` or ``text`` (text through the trunk's text table).
    num_classes: the classes; labels outside ``[0, num_classes)`` are dropped and counted.
    trunk_hidden: the trunk's hidden size (``cpu`` preset 256, ``tiny`` 64); the head's weights
        are built from it at construction (so checkpoints load) and it is checked against
        ``model.backbone.trunk.hidden_size``.
    source: ``quantized`` or ``continuous`` trunk inputs (see ``tasks.heads.features``).
    feature_norm: ``batch`` (standardise the trunk features per channel, see ``tasks.heads.features``) or ``none``.
    pooling: ``attention`` (a learned query) or ``mean``.
    pool_heads: attention heads of the pooling (must divide ``trunk_hidden``).
    hidden: the width of the MLP after pooling.
    dropout: in the MLP.
    label_smoothing: of the cross-entropy.
    num_media: examples written to TensorBoard with their predictions (0 = only the confusion matrix).
    """

    def __init__(
        self,
        modality: str = "image",
        num_classes: int | None = None,
        trunk_hidden: int | None = None,
        source: str = "quantized",
        feature_norm: str = "batch",
        pooling: str = "attention",
        pool_heads: int = 4,
        hidden: int = 256,
        dropout: float = 0.1,
        label_smoothing: float = 0.0,
        num_media: int = 8,
    ) -> None:
        super().__init__()
        if modality not in INPUT_MODALITIES:
            raise ValueError(f"classification head: modality must be one of {INPUT_MODALITIES}, got {modality!r}")
        if not num_classes or num_classes < 2:
            raise ValueError(f"classification head: num_classes must be >= 2, got {num_classes!r}")
        if trunk_hidden is None or trunk_hidden < 1:
            raise ValueError("classification head: set trunk_hidden to the trunk's hidden_size "
                             f"(DiffusionTransformer preset cpu: 256, tiny: 64), got {trunk_hidden!r}")
        if pooling not in POOLINGS:
            raise ValueError(f"classification head: pooling must be one of {POOLINGS}, got {pooling!r}")
        if hidden < 1 or pool_heads < 1:
            raise ValueError(f"classification head: hidden and pool_heads must be >= 1, got {hidden}, {pool_heads}")
        if not 0.0 <= dropout < 1.0 or not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"classification head: dropout and label_smoothing must be in [0, 1), got "
                             f"{dropout}, {label_smoothing}")
        if pooling == "attention" and trunk_hidden % pool_heads:
            raise ValueError(f"classification head: pool_heads={pool_heads} must divide trunk_hidden={trunk_hidden}")
        self.modality, self.num_classes, self.trunk_hidden = modality, int(num_classes), int(trunk_hidden)
        self.pooling, self.label_smoothing, self.num_media = pooling, float(label_smoothing), int(num_media)
        self.reader = TrunkFeatures(modality, source, feature_norm, trunk_hidden)
        self.class_names = ClassNames(num_classes)  # the data's names, kept in the checkpoint
        self.required_keys = (*self.reader.keys, "label")
        self.backbone_modalities = (modality,) if modality != "text" else ()
        self.pool = AttentionPool(trunk_hidden, pool_heads) if pooling == "attention" else None
        self.norm = nn.LayerNorm(trunk_hidden)
        self.fc1 = nn.Linear(trunk_hidden, hidden)
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, num_classes)
        nn.init.xavier_uniform_(self.fc1.weight)
        nn.init.zeros_(self.fc1.bias)
        nn.init.zeros_(self.fc2.weight)  # every class starts equal: first loss = log(num_classes)
        nn.init.zeros_(self.fc2.bias)
        self.last_confusion: Tensor | None = None
        self.last_confusion_image: Tensor | None = None

    # ------------------------------------------------------------------ checks against the backbone
    def attach(self, backbone: Backbone, task: str) -> None:
        self.reader.check(backbone, task)

    def latent_request(self, backbone: Backbone) -> tuple[str, tuple[str, ...]] | None:
        return self.reader.latent_request(backbone)

    def bind_data(self, data: Any, task: str) -> None:
        self.class_names.bind(getattr(data, "classes", None), task)
        self.reader.bind_data(data, task)

    # ------------------------------------------------------------------ forward
    def logits(self, backbone: Backbone, batch: dict[str, Any]) -> Tensor:
        """batch -> class logits [B, num_classes]."""
        h, mask = self.reader(backbone, batch)
        return self.classify(h, mask)

    def classify(self, h: Tensor, mask: Tensor | None = None) -> Tensor:
        """Trunk features [B, N, H] as the reader gives them (mask [B, N] or None) -> logits [B, num_classes]."""
        pooled = self.pool(h, mask) if self.pool is not None else masked_mean(h, mask)
        return self.fc2(self.drop(F.gelu(self.fc1(self.norm(pooled)))))

    def _valid(self, labels: Tensor) -> Tensor:
        return (labels >= 0) & (labels < self.num_classes)

    def _loss(self, logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        valid = self._valid(labels)
        if not bool(valid.any()):
            return logits.sum() * 0.0, valid  # keeps the graph (every rank runs the same backward)
        loss = F.cross_entropy(logits[valid].float(), labels[valid], label_smoothing=self.label_smoothing)
        return loss, valid

    def loss(self, backbone: Backbone, batch: dict[str, Any], step: int) -> tuple[Tensor, dict[str, Tensor]]:
        logits = self.logits(backbone, batch)
        labels = batch["label"].to(logits.device)
        loss, valid = self._loss(logits, labels)
        logs = {"skipped/bad_label": (~valid).sum().float().detach()}
        if bool(valid.any()):
            logs["acc"] = (logits[valid].argmax(-1) == labels[valid]).float().mean().detach()
        return loss, logs

    # ------------------------------------------------------------------ evaluation
    def build_metrics(self, backbone: Backbone) -> MetricCollection:
        k = self.num_classes
        metrics: dict[str, Any] = {"acc": MulticlassAccuracy(k, average="micro")}
        if k >= 5:
            metrics["acc_top5"] = MulticlassAccuracy(k, top_k=5, average="micro")
        metrics["f1_macro"] = MulticlassF1Score(k, average="macro")
        metrics["confusion_matrix"] = MulticlassConfusionMatrix(k)
        return MetricCollection(metrics, compute_groups=False)

    def evaluate(self, backbone: Backbone, batch: dict[str, Any], metrics: MetricCollection) -> dict[str, Tensor]:
        logits = self.logits(backbone, batch)
        labels = batch["label"].to(logits.device)
        loss, valid = self._loss(logits, labels)
        if bool(valid.any()):
            update_fp32(metrics, logits[valid], labels[valid])
        return {"loss": loss.detach(), "skipped/bad_label": (~valid).sum().float()}

    def evaluate_end(self, backbone: Backbone, metrics: MetricCollection, seed: int = 0) -> None:
        """Take the confusion matrix (kept as ``last_confusion`` + its heat-map) and reset it, so
        the module logs only the scalar metrics."""
        matrix = metrics["confusion_matrix"] if "confusion_matrix" in metrics else None
        if matrix is None or not matrix.update_called:
            return
        self.last_confusion = matrix.compute().detach().cpu()
        self.last_confusion_image = confusion_image(self.last_confusion)
        matrix.reset()

    @torch.no_grad()
    def predict(self, backbone: Backbone, batch: dict[str, Any]) -> list[dict[str, Any]]:
        probs = self.logits(backbone, batch).float().softmax(-1).cpu()
        records = []
        for i, key in enumerate(batch["__key__"]):
            record: dict[str, Any] = {
                "__key__": key,
                "pred": int(probs[i].argmax()),
                "probs": [round(float(p), 4) for p in probs[i]],
            }
            if "label" in batch:
                record["label"] = int(batch["label"][i])
            records.append(record)
        return records

    @torch.no_grad()
    def log_media(self, backbone: Backbone, batch: dict[str, Any], experiment: Any, step: int, tag: str) -> None:
        if self.last_confusion_image is not None and hasattr(experiment, "add_image"):
            experiment.add_image(f"{tag}/confusion_matrix", self.last_confusion_image, step)
        n = min(self.num_media, len(batch.get("__key__", [])))
        if n <= 0 or not hasattr(experiment, "add_text"):
            return
        preds = self.logits(backbone, batch).argmax(-1).cpu()
        rows = ["| key | label | prediction |", "| --- | --- | --- |"]
        rows += [f"| {batch['__key__'][i]} | {int(batch['label'][i])} | {int(preds[i])} |" for i in range(n)]
        experiment.add_text(f"{tag}/predictions", "\n".join(rows), step)
        if self.modality == "image" and hasattr(experiment, "add_images"):
            experiment.add_images(f"{tag}/inputs", (batch["image"][:n].float().clamp(-1, 1) + 1) / 2, step)
        elif self.modality == "audio" and hasattr(experiment, "add_audio"):
            rate = getattr(backbone.codec("audio"), "sample_rate", 16000)
            for i in range(min(n, 2)):
                wave = batch["audio"][i, : int(batch["audio_lengths"][i])].float().clamp(-1, 1).cpu()
                experiment.add_audio(f"{tag}/clip{i}", wave[None], step, sample_rate=rate)
