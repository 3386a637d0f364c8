"""How the generation head is judged: the judge networks it trains on real data, and the metrics.

A mixin of :class:`tasks.heads.generation.GenerationHead` (see its docstring for what each metric
means); kept apart because judging is its own concept: the networks (label judge, scene judge,
transcriber) learn from the REAL batch only, their losses never reach the trunk, and evaluation
generates from the conditions of the validation batches and scores the samples with them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.text import WordErrorRate

from multimodal.backbone import Backbone
from tasks.heads.base import clean_latents
from tasks.metrics import update_fp32
from tasks.scene_judge import SceneScores, heldout_indices, unseen_mask


class Judged:
    """The judging half of ``GenerationHead`` (uses its attributes: judge, scene_judge, transcriber, ...)."""

    # ------------------------------------------------------------------ the judges' training
    def judges_loss(self, backbone: Backbone, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        """The judge networks' losses on the real batch (its first ``judge_batch`` items), detached from
        everything else: the label judge (cross-entropy), the transcriber (CTC), the scene judge.

        With ``judge_decoded`` they learn from those items twice (the first ``judge_decoded_batch`` of them,
        all when None): as they are, and as the frozen tokenizer renders them (encoded, snapped, decoded),
        which is what every generated sample goes through:
        a judge that only ever saw crisp originals misreads a rendering it would read as a true scene
        (measured on the shapes: the scene judge read the shape of 0.55 of decoded real objects
        against 0.99 of the originals)."""
        n = self.judge_batch
        sub = {k: (v[:n] if isinstance(v, (Tensor, list)) else v) for k, v in batch.items()}
        loss, logs = torch.zeros((), device=backbone.quantizer.codebook.device), {}
        if self.judge is None and self.transcriber is None and self.scene_judge is None:
            return loss, logs
        real = self.judge_input(backbone, sub).detach()
        if self.training and self.judge is not None:
            self._remember_real(real)
        items = torch.arange(real.shape[0], device=real.device)  # the item of sub each judged input shows
        x = real
        if self.judge_decoded:  # the decoded view of the first judge_decoded_batch items (None: all of them)
            m = real.shape[0] if self.judge_decoded_batch is None else min(self.judge_decoded_batch, real.shape[0])
            head = {k: (v[:m] if isinstance(v, (Tensor, list)) else v) for k, v in sub.items()}
            x = torch.cat([real, self._decoded_input(backbone, head)])
            items = torch.cat([items, items[:m]])
        if self.judge is not None:
            labels = sub["label"][items]
            logits = self.judge.classify(x)
            judge_loss = F.cross_entropy(logits, labels)
            loss = loss + judge_loss
            logs["judge/loss"] = judge_loss.detach()
            logs["judge/acc"] = (logits.argmax(-1) == labels).float().mean()
        if self.transcriber is not None:
            ctc, ctc_logs = self.transcriber.loss(x, [sub["text"][i] for i in items.tolist()], self.text_vocab)
            loss = loss + ctc
            logs["transcriber/ctc"] = ctc.detach()
            logs.update({f"transcriber/{k}": v for k, v in ctc_logs.items()})
        if self.scene_judge is not None:
            scene_loss, scene_logs = self.scene_judge.loss(x, sub["objects"][items])
            loss = loss + scene_loss
            logs.update({f"scene_judge/{k}": v for k, v in scene_logs.items()})
        return loss, logs

    @torch.no_grad()
    def _decoded_input(self, backbone: Backbone, batch: dict[str, Any]) -> Tensor:
        """The real batch as the frozen tokenizer renders it, in the judges' input format."""
        x0, lengths = clean_latents(backbone, batch, self.modality)
        if self.modality == "image":
            return backbone.decode("image", x0).clamp(-1.0, 1.0)
        codec = backbone.codec("audio")
        return self._fixed_mel(backbone.decode("audio", x0, lengths), codec)

    def _remember_real(self, real: Tensor) -> None:
        """Reservoir sampling of real training inputs for the FID floor."""
        for item in real.detach().cpu():
            self._seen += 1
            if len(self._floor) < self.floor_samples:
                self._floor.append(item)
            else:
                j = int(torch.randint(self._seen, ()))
                if j < self.floor_samples:
                    self._floor[j] = item


    def _bind_attributes(self, attributes: dict[str, list[str]], task: str, heldout: list[dict[str, str]]) -> None:
        """The data's attributes must be the head's, in order and size; held-out combinations -> indices."""
        have = {k: len(v) for k, v in attributes.items()}
        if list(have.items()) != list(self.scene_attributes.items()):
            raise ValueError(f"head {task!r}: scene_attributes={self.scene_attributes} but the data's info.json "
                             f"attributes have {have or 'none'} (names and value counts, in order)")
        self._heldout = heldout_indices(attributes, heldout)
        if self.scene_breakdown is not None:
            name, values = self.scene_breakdown
            if list(attributes[name]) != values:
                raise ValueError(f"head {task!r}: scene_breakdown names {name!r} values {values} but the data's "
                                 f"info.json has {list(attributes[name])}")

    # ------------------------------------------------------------------ evaluation
    def build_metrics(self, backbone: Backbone) -> MetricCollection:
        metrics: dict[str, Any] = {"diffusion_loss": MeanMetric()}
        if self.judge is not None:
            metrics["judge_acc_real"] = MulticlassAccuracy(self.num_classes, average="micro")
            metrics["judge_acc_codec"] = MulticlassAccuracy(self.num_classes, average="micro")
            metrics["gen_acc"] = MulticlassAccuracy(self.num_classes, average="micro")
            metrics["fid_cls"] = FrechetInceptionDistance(feature=self.judge, reset_real_features=True)
            metrics["fid_cls_floor"] = FrechetInceptionDistance(feature=self.judge, reset_real_features=True)
        if self.use_transcriber:
            metrics["wer"], metrics["wer_real"], metrics["wer_codec"] = WordErrorRate(), WordErrorRate(), WordErrorRate()
        if self.scene_judge is not None:
            for prefix in ("scene", "scene_real", "scene_codec"):
                metrics[prefix] = SceneScores(list(self.scene_attributes), prefix=prefix, breakdown=self.scene_breakdown)
        return MetricCollection(metrics, compute_groups=False)

    def _score_scenes(self, metric: SceneScores, images: Tensor, objects: Tensor) -> None:
        found = self.scene_judge.detect(images.float(), self.scene_threshold)
        metric.update(found, objects, unseen_mask(objects, self._heldout))

    def reset_evaluation(self, active: bool = True) -> None:
        self._conditions = []
        self._due = active and bool(self.eval_every_n) and self.eval_samples > 0 and self._evaluations % self.eval_every_n == 0
        self._evaluations += int(active)

    def evaluate(self, backbone: Backbone, batch: dict[str, Any], metrics: MetricCollection) -> dict[str, Tensor]:
        loss, logs = self.loss(backbone, batch, step=-1)
        update_fp32(metrics["diffusion_loss"], logs["diffusion/loss"])
        judged = (self.judge, self.transcriber, self.scene_judge)
        decoded = self._decoded_input(backbone, batch) if any(j is not None for j in judged) else None
        real = self.judge_input(backbone, batch) if self.judge is not None or self.transcriber is not None else None
        if self.judge is not None:
            update_fp32(metrics["judge_acc_real"], self.judge.classify(real), batch["label"])
            update_fp32(metrics["judge_acc_codec"], self.judge.classify(decoded), batch["label"])
            if self._due:  # the judge's features inside FID in float32 too
                update_fp32(metrics["fid_cls"], real, real=True)
                update_fp32(metrics["fid_cls_floor"], real, real=True)
        if self.transcriber is not None:
            texts = [" ".join(t.split()) for t in batch["text"]]
            metrics["wer_real"].update(self.transcriber.transcribe(real, self.text_vocab), texts)
            metrics["wer_codec"].update(self.transcriber.transcribe(decoded, self.text_vocab), texts)
        if self.scene_judge is not None:
            self._score_scenes(metrics["scene_real"], batch["image"], batch["objects"])
            self._score_scenes(metrics["scene_codec"], decoded, batch["objects"])
        if self._due and sum(len(c["y"] if "y" in c else c.get("text_ids", [])) for c in self._conditions) < self.eval_samples:
            cond = {k: v for k, v in self._batch_conditions(batch).items()}
            if self.condition == "text" and "label" in batch:
                cond["y"] = batch["label"]
            if self.scene_judge is not None:
                cond["objects"] = batch["objects"]
            if self.transcriber is not None:
                cond["text"] = list(batch["text"])
            self._conditions.append(cond)
        return {"loss": loss.detach()}

    def evaluate_end(self, backbone: Backbone, metrics: MetricCollection, seed: int = 0) -> None:
        """Generate ``eval_samples`` samples and update gen_acc / fid_cls / fid_cls_floor."""
        if not self._due or self.judge is None:
            return
        device = backbone.quantizer.codebook.device
        generator = torch.Generator(device=device).manual_seed(seed)
        targets, texts, lengths = self._eval_targets(device)
        objects = torch.cat([c["objects"] for c in self._conditions])[: len(targets)] if self.scene_judge else None
        transcripts = [t for c in self._conditions for t in c.get("text", [])][: len(targets)]
        samples = []
        for start in range(0, len(targets), self.eval_batch):
            sl = slice(start, start + self.eval_batch)
            y = targets[sl] if self.condition == "label" else None
            ids = texts[sl] if texts is not None else None
            lens = lengths[sl] if lengths is not None else None
            _, judged = self.generate(backbone, y=y, text_ids=ids, text_lengths=lens, num=len(targets[sl]),
                                      generator=generator)
            update_fp32(metrics["gen_acc"], self.judge.classify(judged), targets[sl])
            update_fp32(metrics["fid_cls"], judged, real=False)
            if objects is not None:
                self._score_scenes(metrics["scene"], judged, objects[sl].to(device))
            if self.transcriber is not None:
                metrics["wer"].update(self.transcriber.transcribe(judged, self.text_vocab),
                                      [" ".join(t.split()) for t in transcripts[sl]])
            samples.append(judged[: self.num_media] if not samples else judged[:0])
        self.last_samples = torch.cat(samples)[: self.num_media]
        if len(self._floor) > 1:
            update_fp32(metrics["fid_cls_floor"], torch.stack(self._floor).to(device), real=False)
        else:  # no training data seen in this process (e.g. `lightning test` from a checkpoint)
            metrics["fid_cls_floor"].reset()

    def _eval_targets(self, device: torch.device) -> tuple[Tensor, Tensor | None, Tensor | None]:
        n = self.eval_samples
        if self.condition == "label" or self.condition == "none":
            return torch.arange(n, device=device) % self.num_classes, None, None
        ys = torch.cat([c["y"] for c in self._conditions])[:n]
        width = max(c["text_ids"].shape[1] for c in self._conditions)
        ids = torch.cat([F.pad(c["text_ids"], (0, width - c["text_ids"].shape[1])) for c in self._conditions])[:n]
        lens = torch.cat([c["text_lengths"] for c in self._conditions])[:n]
        return ys, ids, lens

