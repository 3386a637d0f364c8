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
Every judge is also scored on the real validation data as the frozen tokenizer renders it
(``judge_acc_codec``, ``wer_codec``, ``scene_codec/...``): the ceiling a generated sample, always
a rendering, can reach.

Audio is generated at a fixed length, ``audio_tokens``, its clips padded with the code of silence
(:mod:`tasks.heads.fixed_length_audio`).

Text -> speech (``condition='text'`` on audio, ``transcriber=True``): a
:class:`tasks.transcriber.Transcriber` (CTC, trained on the real clips, its loss never reaching the
trunk) transcribes the generated clips; ``wer`` is its word error rate against the transcripts they
were generated for, ``wer_real`` the same on the real validation clips (its ceiling).

Caption -> image with scene annotations (``scene_attributes``, data key ``objects``): a
:class:`tasks.scene_judge.SceneJudge`, trained the same way, reads every object back from each
generated image and scores it against the objects the caption described, GenEval-style
(``scene/<group>/<score>``: count, each attribute, relation, all at once; per 1/2/3-object captions
and seen/unseen attribute combinations); the same judge on the real validation images
(``scene_real/...``, its ceiling) and on them through the codec (``scene_codec/...``, the tokenizer's).

What the trunk learns (``target``): ``latents`` regresses the diffusion's eps / v on the code vectors
(MSE); ``codes`` gives logits over the codebook for every token, trained with cross-entropy, and denoises
with their expected code vector (score interpolation, :mod:`multimodal.score_interpolation`; the trunk's
``out_dim`` is then the codebook size).

A scene map (``scene_map='probe'`` or ``'supervise'``, needs ``scene_attributes``): a linear read-out of
block ``scene_map_layer``'s image tokens, asked where each object is and what its attributes are
while the trunk denoises (:mod:`tasks.heads.scene_map`): a probe of what the trunk knows, by noise
level (``scene_map/<attribute>_acc_q<q>``), or an auxiliary loss (weight ``scene_map_weight``) that
trains the trunk to know it.
"""

from __future__ import annotations

import warnings
import zlib
from typing import Any

import torch
from torch import Tensor
from torchmetrics import MetricCollection

from multimodal.backbone import Backbone
from multimodal.diffusion import GaussianDiffusion
from multimodal.score_interpolation import TARGETS, CodeDenoiser
from tasks.heads.base import Head, check_modality
from tasks.heads.fixed_length_audio import FixedLengthAudio
from tasks.heads.generation_judges import Judged
from tasks.heads.labels import ClassNames
from tasks.heads.scene_map import MODES as SCENE_MAP_MODES
from tasks.heads.scene_map import SceneMap, object_bumps, scene_map_metrics
from tasks.heads.vocab import TextVocabulary
from tasks.judge import JudgeNet
from tasks.scene_judge import SceneJudge
from tasks.transcriber import Transcriber

CONDITIONS = ("label", "text", "none")


class GenerationHead(Judged, FixedLengthAudio, Head):
    """Args:
    modality: ``image`` or ``audio``.
    condition: ``label`` (class-conditional), ``text`` (caption-conditional) or ``none``.
    num_classes: classes of the data (the trunk's class table and the judge).
    diffusion: the process (default ``GaussianDiffusion()``: linear schedule, eps prediction).
    target: ``latents`` (the trunk regresses the process's eps / v / velocity: MSE) or ``codes`` (logits
        over the codebook, cross-entropy; needs ``trunk.out_dim`` = the codebook size; see the module doc).
    audio_tokens: length of generated audio in tokens (25 = 1 s at hop 160, r = 4).
    sample_steps / sampler / eta / guidance: sampling at evaluation and prediction.
    guidance_interval: (lo, hi): guidance only at the sampling steps with t / T in [lo, hi] (the
        conditional half alone elsewhere; ``GaussianDiffusion.sample``).
    snap_denoised: snap the sampler's x0 estimate to the nearest codes (the data's latents are code
        vectors) at every step in the last ``snap_denoised`` of the time range (0 = never, 1 = every step;
        as clipping x0 to [-1, 1] in pixel space): the sample commits to codes before the last step.
    eval_samples / eval_every_n / eval_batch: generated samples per evaluation, how often, in chunks of.
    judge: train the judge network (needs ``label`` in the data); judge_width / judge_weight its size and loss weight.
    scene_map: ``off``, ``probe`` or ``supervise`` (:mod:`tasks.heads.scene_map`; images with ``scene_attributes``);
        scene_map_layer (1-based block), scene_map_weight (its loss weight when it supervises).
    judge_pool: the judge's pooling (``tasks.judge.JudgeNet``); default ``mean`` for images, ``peak``
        (max over time) for audio, whose word is a short part of a clip padded with silence.
    num_media: generated samples written to TensorBoard per evaluation.
    floor_samples: real training inputs kept (a reservoir) for the ``fid_cls_floor``.
    scene_attributes: images with scene annotations: ``{attribute: number of values}`` in the order of
        the data's ``info.json`` ``attributes`` (names checked at setup); trains the scene judge
        (an attribute named ``colour`` or ``color`` is read by its colour pathway).
    scene_width / scene_threshold: the scene judge's width and detection threshold.
    scene_breakdown: ``{attribute: [value names]}`` (one attribute, its values as the data's ``info.json``
        names them): the scene scores also of the one-object captions per value (``scene/1_object_size=small/all``).
    transcriber: audio with transcripts (data key ``text``): train the CTC transcriber (``wer``).
    judge_batch: the judges train on the first ``judge_batch`` real items of each batch (they learn
        fast; the full batch would cost as much again as the trunk's step on a CPU).
    judge_decoded: the judges also learn from those items as the frozen tokenizer renders them
        (``tasks.heads.generation_judges``), so they read decoded samples as well as originals;
        judge_decoded_batch: of the first that many of them only (None: all; the decoded view is about
        30 % of a one-thread CPU step of the shapes recipe: ``python scripts/benchmark.py step``).
    object_loss_weight / object_loss_sigma: images with scene annotations: in training, the diffusion
        loss of each latent cell weighs ``1 + object_loss_weight * sum_k bump_k(cell)``, a Gaussian bump
        (std ``object_loss_sigma`` cells) on every object's centre (0 = uniform). A small object covers a
        few percent of the cells, so its outline is a few percent of a uniform loss. Evaluation losses
        stay uniform (comparable between runs).
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
        guidance_interval: tuple[float, float] = (0.0, 1.0),
        snap_denoised: float = 0.0,
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
        scene_breakdown: dict[str, list[str]] | None = None,
        transcriber: bool = False,
        judge_batch: int = 16,
        judge_decoded: bool = True,
        judge_decoded_batch: int | None = None,
        judge_pool: str | None = None,
        scene_map: str = "off",
        scene_map_layer: int = 2,
        scene_map_weight: float = 0.25,
        target: str = "latents",
        object_loss_weight: float = 0.0,
        object_loss_sigma: float = 1.5,
    ) -> None:
        super().__init__()
        modality_keys = check_modality(modality, "generation")
        if condition not in CONDITIONS:
            raise ValueError(f"generation head: condition must be one of {CONDITIONS}, got {condition!r}")
        if target not in TARGETS:
            raise ValueError(f"generation head: target must be one of {TARGETS}, got {target!r}")
        self.target = target
        if guidance < 0:
            raise ValueError(f"generation head: guidance must be >= 0, got {guidance}")
        if not 0.0 <= snap_denoised <= 1.0:
            raise ValueError(f"generation head: snap_denoised must be in [0, 1], got {snap_denoised}")
        self.snap_denoised = snap_denoised
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
        lo, hi = (float(v) for v in guidance_interval)
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"generation head: guidance_interval must be (lo, hi) with 0 <= lo < hi <= 1, got "
                             f"{guidance_interval!r}")
        self.guidance_interval = (lo, hi)
        self.eval_samples, self.eval_every_n, self.eval_batch = eval_samples, eval_every_n, eval_batch
        self.judge_weight, self.num_media, self.floor_samples = judge_weight, num_media, floor_samples
        if judge_batch < 1:
            raise ValueError(f"generation head: judge_batch must be >= 1, got {judge_batch}")
        if judge_decoded_batch is not None and judge_decoded_batch < 1:
            raise ValueError(f"generation head: judge_decoded_batch must be >= 1 or None, got {judge_decoded_batch}")
        self.judge_batch, self.judge_decoded, self.judge_decoded_batch = judge_batch, judge_decoded, judge_decoded_batch
        keys = list(modality_keys)
        if condition == "label" or judge:
            keys.append("label")
        if condition == "text":
            keys += ["text_ids", "text_lengths"]
        if scene_attributes:
            if modality != "image":
                raise ValueError("generation head: scene_attributes (the scene judge) is for images")
            keys.append("objects")
        if scene_map not in SCENE_MAP_MODES:
            raise ValueError(f"generation head: scene_map must be one of {SCENE_MAP_MODES}, got {scene_map!r}")
        if scene_map != "off" and not (scene_attributes and modality == "image"):
            raise ValueError("generation head: scene_map needs images with scene annotations (scene_attributes)")
        if scene_map_layer < 1 or scene_map_weight < 0:
            raise ValueError(f"generation head: scene_map_layer must be >= 1 and scene_map_weight >= 0, got "
                             f"{scene_map_layer}, {scene_map_weight}")
        self.scene_map_mode, self.scene_map_layer, self.scene_map_weight = scene_map, scene_map_layer, scene_map_weight
        self.scene_map: SceneMap | None = None  # built at attach: it needs the trunk's width
        if object_loss_weight < 0 or object_loss_sigma <= 0:
            raise ValueError(f"generation head: object_loss_weight must be >= 0 and object_loss_sigma > 0, got "
                             f"{object_loss_weight}, {object_loss_sigma}")
        if object_loss_weight and not (scene_attributes and modality == "image" and target == "latents"):
            raise ValueError("generation head: object_loss_weight needs images with scene annotations "
                             "(scene_attributes) and target='latents'")
        self.object_loss_weight, self.object_loss_sigma = object_loss_weight, object_loss_sigma
        if transcriber:
            if modality != "audio":
                raise ValueError("generation head: the transcriber is for audio")
            keys += [k for k in ("text", "text_ids", "text_lengths") if k not in keys]
        self.required_keys = tuple(keys)
        self.backbone_modalities = (modality,)
        pool = judge_pool or ("mean" if modality == "image" else "peak")
        self.judge = JudgeNet(3 if modality == "image" else 1, num_classes, judge_width, pool=pool) if judge else None
        # kept in the checkpoint, bound at setup: what a class is called, and the captions' tokenizer
        self.class_names = ClassNames(num_classes) if num_classes else None
        self.text_vocab = TextVocabulary("sentencepiece", size=1 << 30) if condition == "text" or transcriber else None
        self.use_transcriber = transcriber
        self.transcriber: Transcriber | None = None  # built at attach: it needs the codec's mel bands
        self.scene_attributes = dict(scene_attributes or {})
        self.scene_threshold = scene_threshold
        self.scene_breakdown = self._check_breakdown(scene_breakdown)
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

    def _check_breakdown(self, breakdown: dict[str, list[str]] | None) -> tuple[str, list[str]] | None:
        """``scene_breakdown`` -> (attribute, value names), checked against ``scene_attributes``."""
        if not breakdown:
            return None
        if len(breakdown) != 1:
            raise ValueError(f"generation head: scene_breakdown takes one attribute, got {list(breakdown)}")
        ((name, values),) = breakdown.items()
        if name not in self.scene_attributes:
            raise ValueError(f"generation head: scene_breakdown attribute {name!r} is not one of scene_attributes "
                             f"{list(self.scene_attributes) or '(none: no scene judge)'}")
        values = [str(v) for v in values]
        if len(values) != self.scene_attributes[name]:
            raise ValueError(f"generation head: scene_breakdown names {len(values)} values of {name!r} but "
                             f"scene_attributes gives it {self.scene_attributes[name]}")
        return name, values

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
        out_dim = getattr(trunk, "out_dim", trunk.in_dim)
        if self.target == "codes" and out_dim != backbone.num_codes:
            raise ValueError(f"head {task!r} (target 'codes') predicts logits over the {backbone.num_codes} codes: set "
                             f"model.backbone.trunk.init_args.out_dim to {backbone.num_codes} (it is {out_dim})")
        if self.target == "codes" and getattr(trunk, "self_condition", False):
            raise ValueError(f"head {task!r}: target 'codes' does not self-condition; set "
                             "model.backbone.trunk.init_args.self_condition false (or target: latents)")
        if self.target == "latents" and out_dim != trunk.in_dim:
            raise ValueError(f"head {task!r} (target 'latents') regresses latents: the trunk's out_dim={out_dim} must "
                             f"equal its in_dim={trunk.in_dim} (or set the head's target: codes)")
        channels = trunk.in_dim * trunk.patch_size**2
        if self.modality == "image" and self.target == "latents" and channels > trunk.hidden_size:
            # The final layer is a Linear(hidden_size -> in_dim * p^2): its predictions span at most
            # hidden_size of a patch's channels. The noise in the other directions is never predicted,
            # so sampling never removes it (measured: README, caption -> image).
            warnings.warn(
                f"head {task!r}: a {trunk.patch_size} x {trunk.patch_size} patch of {trunk.in_dim}-dim latents has "
                f"{channels} channels but the trunk's hidden_size is {trunk.hidden_size}: it cannot denoise the "
                "rest; use a smaller patch_size or code dim, or a wider trunk", stacklevel=2)
        if self.condition == "label" and trunk.num_classes < self.num_classes:
            raise ValueError(f"head {task!r}: trunk num_classes={trunk.num_classes} < the head's num_classes={self.num_classes}")
        if self.condition == "text" and not trunk.text_vocab_size:
            raise ValueError(f"head {task!r} conditions on text: set model.backbone.trunk.text_vocab_size (the data's vocabulary)")
        if self.text_vocab is not None:
            if not trunk.text_vocab_size:
                raise ValueError(f"head {task!r} transcribes text: set model.backbone.trunk.text_vocab_size (the data's vocabulary)")
            self.text_vocab.size = int(trunk.text_vocab_size)
        if self.use_transcriber and self.transcriber is None:
            self.transcriber = Transcriber(backbone.codec("audio").n_mels, int(trunk.text_vocab_size))
        if self.scene_map_mode != "off" and self.scene_map is None:
            if self.scene_map_layer > len(trunk.blocks):
                raise ValueError(f"head {task!r}: scene_map_layer={self.scene_map_layer} but the trunk has "
                                 f"{len(trunk.blocks)} blocks")
            self.scene_map = SceneMap(trunk.hidden_size, self.scene_attributes, self.scene_map_layer,
                                      self.scene_map_mode)

    def bind_data(self, data: Any, task: str) -> None:
        if self.class_names is not None:
            self.class_names.bind(getattr(data, "classes", None), task)
        if self.text_vocab is not None:
            self.text_vocab.bind(getattr(data, "tokenizer", None), task, follow_max_length=True, required=False)
        if self.scene_judge is not None:
            self._bind_attributes(getattr(data, "attributes", None) or {}, task,
                                  getattr(data, "heldout_combinations", None) or [])

    # ------------------------------------------------------------------ pieces
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

    # ------------------------------------------------------------------ training
    def loss(self, backbone: Backbone, batch: dict[str, Any], step: int) -> tuple[Tensor, dict[str, Tensor]]:
        x0, mask = self._latents(backbone, batch)
        if not bool(self.scale_measured) and self.training:
            self.diffusion.set_latent_scale_from(x0, mask)  # summed over ranks under DDP
            self.scale_measured.fill_(True)
        kwargs = self._model_kwargs(backbone, x0.shape[0], **self._batch_conditions(batch))
        t = self.diffusion.sample_timesteps(x0.shape[0], x0.device)
        if self.object_loss_weight and self.training:
            bumps = object_bumps(batch["objects"], kwargs["grid"], self.object_loss_sigma)  # [B, N, K]
            kwargs["loss_weight"] = 1.0 + self.object_loss_weight * bumps.sum(dim=-1)
        if self.scene_map is None:
            loss, logs = self.denoising_loss(backbone, x0, mask, t, **kwargs)
        else:
            with self.scene_map.capture(backbone.trunk):
                loss, logs = self.denoising_loss(backbone, x0, mask, t, **kwargs)
            p = backbone.trunk.patch_size
            h, w = kwargs["grid"]
            map_loss, map_logs = self.scene_map.loss(batch["objects"], (h // p, w // p), self.diffusion.time_fraction(t))
            logs.update({f"scene_map/{k}": v for k, v in map_logs.items()})
            # a probe's loss reaches only the probe (its input is detached): weight 1, nothing else moves
            loss = loss + (self.scene_map_weight if self.scene_map.mode == "supervise" else 1.0) * map_loss
        logs["latent_scale"] = self.diffusion.latent_scale.detach()
        judges_loss, judges_logs = self.judges_loss(backbone, batch)
        logs.update(judges_logs)
        loss = loss + self.judge_weight * judges_loss
        return loss, logs

    def denoiser(self, backbone: Backbone) -> Any:
        """What the diffusion trains and samples: the trunk, or for ``target='codes'`` the trunk's logits
        through :class:`multimodal.score_interpolation.CodeDenoiser`."""
        if self.target == "latents":
            return backbone.trunk
        table = backbone.quantizer.lookup(torch.arange(backbone.num_codes, device=backbone.quantizer.codebook.device))
        return CodeDenoiser(backbone.trunk, self.diffusion, table)

    def denoising_loss(self, backbone: Backbone, x0: Tensor, mask: Tensor | None, t: Tensor,
                       noise: Tensor | None = None, **kwargs: Any) -> tuple[Tensor, dict[str, Tensor]]:
        """The trunk's loss on clean latents x0 [B, N, D] at times t [B] -> (loss, ``diffusion/...`` logs):
        MSE of eps / v (``target='latents'``) or the cross-entropy of the codes (``'codes'``)."""
        if self.target == "latents":
            loss, logs = self.diffusion.training_loss(backbone.trunk, x0, x_mask=mask, t=t, noise=noise, **kwargs)
        else:
            loss, logs = self.denoiser(backbone).loss(x0, x_mask=mask, t=t, noise=noise, **kwargs)
        return loss, {f"diffusion/{k}": v for k, v in logs.items()}

    # ------------------------------------------------------------------ evaluation
    def build_metrics(self, backbone: Backbone) -> MetricCollection:
        metrics = super().build_metrics(backbone)
        if self.scene_map_mode != "off":  # built before attach, so not by the map itself
            metrics.add_metrics(scene_map_metrics(self.scene_attributes))
        return metrics

    def evaluate(self, backbone: Backbone, batch: dict[str, Any], metrics: MetricCollection) -> dict[str, Tensor]:
        logs = super().evaluate(backbone, batch, metrics)
        if self.scene_map is not None:
            self.scene_map.update_metrics(metrics)  # what the loss above left
        return logs

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, backbone: Backbone, y: Tensor | None = None, text_ids: Tensor | None = None,
                 text_lengths: Tensor | None = None, num: int | None = None,
                 generator: torch.Generator | None = None, steps: int | None = None,
                 guidance: float | None = None, waveform: str | None = None,
                 x_start: Tensor | None = None, start: float = 1.0) -> tuple[Tensor, Tensor]:
        """Samples for the given conditions -> (images [B, C, H, W] in [-1, 1] or waveforms [B, T],
        what the judge sees [B, C, H, W]). ``num`` is the count for ``condition='none'``; ``waveform``
        (``vocoder`` / ``griffin_lim``; default: the backbone's vocoder if any) makes audio samples.
        ``x_start`` (clean latents [B, N, D]) and ``start``: SDEdit from them (``GaussianDiffusion.sample``)."""
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
            self.denoiser(backbone), (batch, n_tokens, backbone.quantizer.dim), steps=steps or self.sample_steps,
            sampler=self.sampler, eta=self.eta, guidance=guidance, guidance_interval=self.guidance_interval,
            generator=generator, device=device,
            x_start=x_start, start=start, denoised_fn=self._snapper(backbone), **kwargs,
        )
        snapped = backbone.snap_to_codebook(latents)
        if self.modality == "image":
            images = backbone.decode("image", snapped).clamp(-1.0, 1.0)
            return images, images
        codec = backbone.codec("audio")
        mel = backbone.decode("audio", snapped)
        return backbone.to_audio(mel, generator=generator, method=waveform), self._fixed_mel(mel, codec)

    def _snapper(self, backbone: Backbone) -> Any:
        """``snap_denoised``'s ``denoised_fn``: normalised x0 [B, N, D] at model times t [B] -> the nearest code
        vectors where t is in the last ``snap_denoised`` of the range, else x0 unchanged (None when 0)."""
        if self.snap_denoised <= 0:
            return None
        diffusion = self.diffusion

        def snap(x0: Tensor, t: Tensor) -> Tensor:
            if float(t.max()) >= self.snap_denoised * diffusion.num_timesteps:
                return x0
            return diffusion.normalize(backbone.snap_to_codebook(diffusion.unnormalize(x0)))

        return snap

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
