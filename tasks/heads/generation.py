"""Generation: a diffusion model over the shared codebook's latents, conditioned on a class or a caption.

Training: the frozen stage-1 tokenizer turns the batch into code vectors x0 [B, N, D] (a lookup,
no codebook update); the trunk learns to denoise them (``multimodal.diffusion``), with the
condition dropped with p = 0.1 for classifier-free guidance (done by the trunk). The latent
scale (1 / std of x0) is measured on the first batch and stored in the checkpoint.

Sampling: DDIM/DDPM/Euler with guidance, both CFG halves in one batch; the raw latents snap to
their nearest codes, then the codec decodes them.

Evaluation: a :class:`tasks.judge.JudgeNet` trained here on the real data (its loss never reaches
the trunk) judges samples: ``gen_acc`` = its accuracy on samples generated for a class (or, for a
caption, the label of the sample the caption came from: the shape of the described largest
object on the demo shapes), ``fid_cls`` = FID between real validation data and samples in the
judge's feature space, and ``fid_cls_floor`` = the same between real training and real validation
data, so the gap is visible. Computed every ``eval_every_n`` validations on ``eval_samples`` samples.

Caption -> image with scene annotations (``scene_attributes``, data key ``objects``): a
:class:`tasks.scene_judge.SceneJudge`, trained the same way, reads every object back from each
generated image and scores it against the objects the caption described, GenEval-style
(``scene/<group>/<score>``: count, each attribute, relation, all at once; per 1/2/3-object captions
and seen/unseen attribute combinations); the same judge on the real validation images
(``scene_real/...``, its ceiling) and on them through the codec (``scene_codec/...``, the tokenizer's).
"""

from __future__ import annotations

import zlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.image.fid import FrechetInceptionDistance

from multimodal.backbone import Backbone
from multimodal.diffusion import GaussianDiffusion
from tasks.heads.base import Head, check_modality, clean_latents
from tasks.heads.labels import ClassNames
from tasks.heads.vocab import TextVocabulary
from tasks.judge import JudgeNet
from tasks.metrics import update_fp32
from tasks.scene_judge import SceneJudge, SceneScores, unseen_mask

CONDITIONS = ("label", "text", "none")


class GenerationHead(Head):
    """Args:
    modality: ``image`` or ``audio``.
    condition: ``label`` (class-conditional), ``text`` (caption-conditional) or ``none``.
    num_classes: classes of the data (the trunk's class table and the judge).
    diffusion: the process (default ``GaussianDiffusion()``: linear schedule, eps prediction).
    audio_tokens: length of generated audio in tokens (25 = 1 s at hop 160, r = 4).
    sample_steps / sampler / eta / guidance: sampling at evaluation and prediction.
    eval_samples / eval_every_n / eval_batch: generated samples per evaluation, how often, in chunks of.
    judge: train the judge network (needs ``label`` in the data); judge_width / judge_weight its size and loss weight.
    num_media: generated samples written to TensorBoard per evaluation.
    floor_samples: real training inputs kept (a reservoir) for the ``fid_cls_floor``.
    scene_attributes: images with scene annotations: ``{attribute: number of values}`` in the order of
        the data's ``info.json`` ``attributes`` (names checked at setup); trains the scene judge
        (an attribute named ``colour`` or ``color`` is read by its colour pathway).
    scene_width / scene_threshold: the scene judge's width and detection threshold.
    """

    def __init__(
        self,
        modality: str = "image",
        condition: str = "label",
        num_classes: int | None = None,
        diffusion: GaussianDiffusion | None = None,
        audio_tokens: int = 25,
        sample_steps: int = 25,
        sampler: str | None = None,
        eta: float = 0.0,
        guidance: float = 4.0,
        eval_samples: int = 100,
        eval_every_n: int = 1,
        eval_batch: int = 50,
        judge: bool = True,
        judge_width: int = 32,
        judge_weight: float = 1.0,
        num_media: int = 16,
        floor_samples: int = 500,
        scene_attributes: dict[str, int] | None = None,
        scene_width: int = 32,
        scene_threshold: float = 0.5,
    ) -> None:
        super().__init__()
        modality_keys = check_modality(modality, "generation")
        if condition not in CONDITIONS:
            raise ValueError(f"generation head: condition must be one of {CONDITIONS}, got {condition!r}")
        if guidance < 0:
            raise ValueError(f"generation head: guidance must be >= 0, got {guidance}")
        if sample_steps < 1:
            raise ValueError(f"generation head: sample_steps must be >= 1, got {sample_steps}")
        if (condition == "label" or judge) and not num_classes:
            raise ValueError("generation head: num_classes is required for condition='label' and for the judge")
        if eval_samples < 0 or eval_every_n < 0 or eval_batch < 1 or audio_tokens < 1:
            raise ValueError("generation head: eval_samples, eval_every_n >= 0; eval_batch, audio_tokens >= 1")
        self.modality, self.condition, self.num_classes = modality, condition, num_classes
        self.diffusion = diffusion if diffusion is not None else GaussianDiffusion()
        self.audio_tokens = audio_tokens
        self.sample_steps, self.sampler, self.eta, self.guidance = sample_steps, sampler, eta, guidance
        self.eval_samples, self.eval_every_n, self.eval_batch = eval_samples, eval_every_n, eval_batch
        self.judge_weight, self.num_media, self.floor_samples = judge_weight, num_media, floor_samples
        keys = list(modality_keys)
        if condition == "label" or judge:
            keys.append("label")
        if condition == "text":
            keys += ["text_ids", "text_lengths"]
        if scene_attributes:
            if modality != "image":
                raise ValueError("generation head: scene_attributes (the scene judge) is for images")
            keys.append("objects")
        self.required_keys = tuple(keys)
        self.backbone_modalities = (modality,)
        self.judge = JudgeNet(3 if modality == "image" else 1, num_classes, judge_width) if judge else None
        # kept in the checkpoint, bound at setup: what a class is called, and the captions' tokenizer
        self.class_names = ClassNames(num_classes) if num_classes else None
        self.text_vocab = TextVocabulary("sentencepiece", size=1 << 30) if condition == "text" else None
        self.scene_attributes = dict(scene_attributes or {})
        self.scene_threshold = scene_threshold
        colour = [j for j, name in enumerate(self.scene_attributes) if name in ("colour", "color")]
        self.scene_judge = (SceneJudge(3, list(self.scene_attributes.values()), scene_width,
                                       colour_index=colour[0] if colour else None) if scene_attributes else None)
        self._heldout: list[dict[int, int]] = []  # held-out combinations as {attribute column: value}
        self.register_buffer("scale_measured", torch.tensor(False))
        self._floor: list[Tensor] = []  # reservoir of real training judge inputs (not checkpointed)
        self._seen = 0
        self._conditions: list[dict[str, Tensor]] = []
        self._evaluations = 0
        self._due = False
        self.last_samples: Tensor | None = None

    # ------------------------------------------------------------------ checks against the backbone
    def attach(self, backbone: Backbone, task: str) -> None:
        trunk = backbone.trunk
        if trunk is None:
            raise ValueError(f"head {task!r} generates with the trunk: set model.backbone.trunk (a DiffusionTransformer)")
        if trunk.in_dim != backbone.quantizer.dim:
            raise ValueError(
                f"model.backbone.trunk.in_dim={trunk.in_dim} does not match the tokenizer's latent size "
                f"(quantizer dim={backbone.quantizer.dim})"
            )
        if self.condition == "label" and trunk.num_classes < self.num_classes:
            raise ValueError(f"head {task!r}: trunk num_classes={trunk.num_classes} < the head's num_classes={self.num_classes}")
        if self.condition == "text" and not trunk.text_vocab_size:
            raise ValueError(f"head {task!r} conditions on text: set model.backbone.trunk.text_vocab_size (the data's vocabulary)")
        if self.text_vocab is not None:
            self.text_vocab.size = int(trunk.text_vocab_size)

    def bind_data(self, data: Any, task: str) -> None:
        if self.class_names is not None:
            self.class_names.bind(getattr(data, "classes", None), task)
        if self.text_vocab is not None:
            self.text_vocab.bind(getattr(data, "tokenizer", None), task, follow_max_length=True, required=False)
        if self.scene_judge is not None:
            self._bind_attributes(getattr(data, "attributes", None) or {}, task,
                                  getattr(data, "heldout_combinations", None) or [])

    def _bind_attributes(self, attributes: dict[str, list[str]], task: str, heldout: list[dict[str, str]]) -> None:
        """The data's attributes must be the head's, in order and size; held-out combinations -> indices."""
        have = {k: len(v) for k, v in attributes.items()}
        if list(have.items()) != list(self.scene_attributes.items()):
            raise ValueError(f"head {task!r}: scene_attributes={self.scene_attributes} but the data's info.json "
                             f"attributes have {have or 'none'} (names and value counts, in order)")
        names = list(attributes)
        self._heldout = [{names.index(k): attributes[k].index(v) for k, v in combo.items()} for combo in heldout]

    # ------------------------------------------------------------------ pieces
    def _latents(self, backbone: Backbone, batch: dict[str, Any]) -> tuple[Tensor, Tensor | None]:
        x0, lengths = clean_latents(backbone, batch, self.modality)
        if self.modality == "image":
            return x0, None
        return x0, torch.arange(x0.shape[1], device=x0.device)[None, :] < lengths[:, None]

    def latent_request(self, backbone: Backbone) -> tuple[str, tuple[str, ...]] | None:
        """The codes of the modality it generates; the raw modality too when a judge trains on it."""
        raw = self.judge is not None or self.scene_judge is not None
        return self.modality, ((self.modality,) if raw else ())

    def _model_kwargs(self, backbone: Backbone, batch_size: int, y: Tensor | None = None,
                      text_ids: Tensor | None = None, text_lengths: Tensor | None = None) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"modality": self.modality}
        if self.modality == "image":
            kwargs["grid"] = backbone.codec("image").grid_size
        if self.condition == "label":
            kwargs["y"] = y
        elif self.condition == "text":
            kwargs["cond_ids"] = text_ids
            kwargs["cond_mask"] = torch.arange(text_ids.shape[1], device=text_ids.device)[None, :] < text_lengths[:, None]
        return kwargs

    def _batch_conditions(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        if self.condition == "label":
            return {"y": batch["label"]}
        if self.condition == "text":
            return {"text_ids": batch["text_ids"], "text_lengths": batch["text_lengths"]}
        return {}

    def _judge_input(self, backbone: Backbone, batch: dict[str, Any]) -> Tensor:
        """Real data as the judge sees it: images, or log-mel [B, 1, n_mels, frames] of fixed length."""
        if self.modality == "image":
            return batch["image"]
        codec = backbone.codec("audio")
        mel = codec.mel(batch["audio"], batch["audio_lengths"])
        return self._fixed_mel(mel, codec)

    def _fixed_mel(self, mel: Tensor, codec: nn.Module) -> Tensor:
        frames = self.audio_tokens * codec.downsample
        if mel.shape[-1] < frames:
            mel = F.pad(mel, (0, frames - mel.shape[-1]), value=float(mel.min()))
        return ((mel[..., :frames] + 5.0) / 4.0).unsqueeze(1)

    # ------------------------------------------------------------------ training
    def loss(self, backbone: Backbone, batch: dict[str, Any], step: int) -> tuple[Tensor, dict[str, Tensor]]:
        x0, mask = self._latents(backbone, batch)
        if not bool(self.scale_measured) and self.training:
            self.diffusion.set_latent_scale_from(x0, mask)  # summed over ranks under DDP
            self.scale_measured.fill_(True)
        kwargs = self._model_kwargs(backbone, x0.shape[0], **self._batch_conditions(batch))
        loss, logs = self.diffusion.training_loss(backbone.trunk, x0, x_mask=mask, **kwargs)
        logs = {f"diffusion/{k}": v for k, v in logs.items()}
        logs["latent_scale"] = self.diffusion.latent_scale.detach()
        if self.judge is not None:
            real = self._judge_input(backbone, batch).detach()
            logits = self.judge.classify(real)
            judge_loss = F.cross_entropy(logits, batch["label"])
            loss = loss + self.judge_weight * judge_loss
            logs["judge/loss"] = judge_loss.detach()
            logs["judge/acc"] = (logits.argmax(-1) == batch["label"]).float().mean()
            if self.training:
                self._remember_real(real)
        if self.scene_judge is not None:
            scene_loss, scene_logs = self.scene_judge.loss(batch["image"].detach(), batch["objects"])
            loss = loss + self.judge_weight * scene_loss
            logs.update({f"scene_judge/{k}": v for k, v in scene_logs.items()})
        return loss, logs

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

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, backbone: Backbone, y: Tensor | None = None, text_ids: Tensor | None = None,
                 text_lengths: Tensor | None = None, num: int | None = None,
                 generator: torch.Generator | None = None, steps: int | None = None,
                 guidance: float | None = None) -> tuple[Tensor, Tensor]:
        """Samples for the given conditions -> (images [B, C, H, W] in [-1, 1] or waveforms [B, T],
        what the judge sees [B, C, H, W]). ``num`` is the count for ``condition='none'``."""
        device = backbone.quantizer.codebook.device
        batch = len(y) if y is not None else len(text_ids) if text_ids is not None else int(num or 1)
        if self.modality == "image":
            n_tokens = backbone.codec("image").num_tokens
        else:
            n_tokens = self.audio_tokens
        kwargs = self._model_kwargs(backbone, batch, y=y, text_ids=text_ids, text_lengths=text_lengths)
        guidance = self.guidance if guidance is None else guidance
        if self.condition == "none":
            guidance = 1.0
        latents = self.diffusion.sample(
            backbone.trunk, (batch, n_tokens, backbone.quantizer.dim), steps=steps or self.sample_steps,
            sampler=self.sampler, eta=self.eta, guidance=guidance, generator=generator, device=device, **kwargs,
        )
        snapped = backbone.snap_to_codebook(latents)
        if self.modality == "image":
            images = backbone.decode("image", snapped).clamp(-1.0, 1.0)
            return images, images
        codec = backbone.codec("audio")
        mel = backbone.decode("audio", snapped)
        return codec.to_audio(mel, generator=generator), self._fixed_mel(mel, codec)

    # ------------------------------------------------------------------ evaluation
    def build_metrics(self, backbone: Backbone) -> MetricCollection:
        metrics: dict[str, Any] = {"diffusion_loss": MeanMetric()}
        if self.judge is not None:
            metrics["judge_acc_real"] = MulticlassAccuracy(self.num_classes, average="micro")
            metrics["gen_acc"] = MulticlassAccuracy(self.num_classes, average="micro")
            metrics["fid_cls"] = FrechetInceptionDistance(feature=self.judge, reset_real_features=True)
            metrics["fid_cls_floor"] = FrechetInceptionDistance(feature=self.judge, reset_real_features=True)
        if self.scene_judge is not None:
            for prefix in ("scene", "scene_real", "scene_codec"):
                metrics[prefix] = SceneScores(list(self.scene_attributes), prefix=prefix)
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
        if self.judge is not None:
            real = self._judge_input(backbone, batch)
            update_fp32(metrics["judge_acc_real"], self.judge.classify(real), batch["label"])
            if self._due:  # the judge's features inside FID in float32 too
                update_fp32(metrics["fid_cls"], real, real=True)
                update_fp32(metrics["fid_cls_floor"], real, real=True)
        if self.scene_judge is not None:
            self._score_scenes(metrics["scene_real"], batch["image"], batch["objects"])
            x0, _ = self._latents(backbone, batch)  # the real images through the tokenizer
            decoded = backbone.decode("image", backbone.snap_to_codebook(x0)).clamp(-1.0, 1.0)
            self._score_scenes(metrics["scene_codec"], decoded, batch["objects"])
        if self._due and sum(len(c["y"] if "y" in c else c.get("text_ids", [])) for c in self._conditions) < self.eval_samples:
            cond = {k: v for k, v in self._batch_conditions(batch).items()}
            if self.condition == "text" and "label" in batch:
                cond["y"] = batch["label"]
            if self.scene_judge is not None:
                cond["objects"] = batch["objects"]
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

    def predict(self, backbone: Backbone, batch: dict[str, Any]) -> list[dict[str, Any]]:
        """One sample per batch item, for its label or caption (seeded by the item's key)."""
        cond = self._batch_conditions(batch)
        seed = zlib.crc32("".join(batch["__key__"]).encode())  # stable across processes (hash() is salted)
        generator = torch.Generator(device=backbone.quantizer.codebook.device).manual_seed(seed)
        out, _ = self.generate(backbone, num=len(batch["__key__"]), generator=generator,
                               y=cond.get("y"), text_ids=cond.get("text_ids"), text_lengths=cond.get("text_lengths"))
        records = []
        for i, key in enumerate(batch["__key__"]):
            record: dict[str, Any] = {"__key__": key, self.modality: out[i].cpu()}
            if self.modality == "audio":
                record["sample_rate"] = backbone.codec("audio").sample_rate
            if "label" in batch:
                record["label"] = int(batch["label"][i])
            if "text" in batch:
                record["text"] = batch["text"][i]
            records.append(record)
        return records

    @torch.no_grad()
    def log_media(self, backbone: Backbone, batch: dict[str, Any], experiment: Any, step: int, tag: str) -> None:
        if self.last_samples is None or not hasattr(experiment, "add_images"):
            return
        if self.modality == "image":
            experiment.add_images(f"{tag}/generated", (self.last_samples + 1) / 2, step)
        else:
            mels = self.last_samples
            experiment.add_images(f"{tag}/generated_log_mel", ((mels - mels.amin()) / (mels.amax() - mels.amin()).clamp(min=1e-6)).flip(2), step)
